"""RunDir owns the run directory's names; log-prob caches are keyed by what produced them."""

from __future__ import annotations

import json

import pytest
from tests.unit.table_lm import TableModel

from sparring.state import RunDir, StaleCache, cache_key, check_cache_key
from sparring.training.engine import checkpoint_dir
from sparring.training.precompute import logp_cache_key, score_sequences


def test_every_on_disk_name_is_the_one_existing_run_directories_use(tmp_path):
    rd = RunDir(tmp_path)
    paths = {  # relative to RUN/; changing one breaks resuming every existing run directory
        rd.state_path: "state.json",
        rd.metrics_path: "metrics.jsonl",
        rd.config_path: "config.yaml",
        rd.tensorboard: "tb",
        rd.results: "results.md",
        rd.plot: "plot.png",
        rd.eval_file(rd.INITIAL): "eval/initial.json",
        rd.eval_file(rd.stage_iteration(2)): "eval/iter2.json",
        rd.eval_file(rd.lsp_step_label(40)): "eval/step40.json",
        rd.iteration(0): "iter_000",
        rd.iteration(12): "iter_012",
        rd.model(1): "iter_001/model",
        rd.generated(1): "iter_001/generated.jsonl",
        rd.generated(0, "proto"): "iter_000/proto.jsonl",
        rd.generation_chunks(1): "iter_001/generated.chunks",
        rd.generation_chunks(0, "proto"): "iter_000/proto.chunks",
        rd.generated_source(0, "proto"): "iter_000/proto.source.json",
        rd.opponent_logp_chunks(1): "iter_001/opponent_logps.chunks",
        rd.pairs(1): "iter_001/pairs.jsonl",
        rd.triplets(1): "iter_001/triplets.jsonl",
        rd.team(2): "iter_002/team.json",
        rd.team_logps(2, 1): "iter_002/team_theta1.json",
        rd.team_logp_chunks(2, 1): "iter_002/team_theta1.chunks",
        rd.checkpoints(1): "iter_001/checkpoints",
        rd.checkpoints(): "checkpoints",
        checkpoint_dir(rd.checkpoints(), 4): "checkpoints/step-00000004",
        rd.samples: "samples.jsonl",
        rd.step_model(6): "models/step6",
        rd.final_model: "model",
    }
    assert {str(p.relative_to(tmp_path)): name for p, name in paths.items()} == {name: name for name in paths.values()}
    stages = {
        rd.stage_iteration(3): "iter3",
        rd.stage_generate(1): "iter1/generated",
        rd.stage_generate(0, "proto"): "iter0/proto",
        rd.stage_team(2, 1): "iter2/team1",
        rd.lsp_step_label(6): "step6",
        rd.FINAL: "final",
        rd.INITIAL: "initial",
    }
    assert list(stages) == list(stages.values())


def test_step_labels_round_trip_and_other_labels_are_refused(tmp_path):
    rd = RunDir(tmp_path)
    assert [rd.parse_step_label(rd.lsp_step_label(k)) for k in (0, 7, 120)] == [0, 7, 120]
    for label in ("iter3", "initial", "step", "stepx"):
        with pytest.raises(ValueError, match=label):
            rd.parse_step_label(label)
    for label in ("step10", "step2", "initial", "iter0"):
        (tmp_path / "eval").mkdir(exist_ok=True)
        rd.eval_file(label).write_text("{}")
    assert [k for k, _ in rd.eval_steps()] == [2, 10]  # by step, not by name


def test_a_cache_key_mismatch_names_the_file_and_the_fields_that_differ(tmp_path):
    path = tmp_path / "team_theta0.json"
    key = cache_key({"model": "iter_000/model", "dtype": "torch.float32", "items": "ab"})
    check_cache_key(path, json.loads(json.dumps(key)), key)  # as written and read back: accepted
    with pytest.raises(StaleCache, match=r"team_theta0\.json.*dtype: 'torch.bfloat16' -> 'torch.float32'"):
        check_cache_key(path, cache_key({**key, "dtype": "torch.bfloat16"}), key)
    with pytest.raises(StaleCache, match=r"team_theta0\.json.*key: 'tampered'"):
        check_cache_key(path, {**key, "key": "tampered"}, key)
    with pytest.raises(StaleCache, match=r"team_theta0\.json records no cache key"):
        check_cache_key(path, None, key)


def test_the_logprob_key_covers_the_model_the_rows_and_the_reduction():
    items = [([1, 2], [3]), ([1], [4, 5])]
    base = logp_cache_key(items, {"model": "base", "dtype": "torch.float32"}, average=False)
    assert logp_cache_key(items, {"model": "base", "dtype": "torch.float32"}, average=False) == base
    others = [
        logp_cache_key(items, {"model": "iter_000/model", "dtype": "torch.float32"}, average=False),
        logp_cache_key(items, {"model": "base", "dtype": "torch.bfloat16"}, average=False),
        logp_cache_key(items, {"model": "base", "dtype": "torch.float32"}, average=True),
        logp_cache_key([([1, 2], [3]), ([1], [4, 6])], {"model": "base", "dtype": "torch.float32"}, average=False),
        logp_cache_key([([1, 2, 3], []), ([1], [4, 5])], {"model": "base", "dtype": "torch.float32"}, average=False),
    ]
    assert len({k["key"] for k in [base, *others]}) == 6


def test_logprob_chunks_of_another_model_are_recomputed_not_reused(tmp_path, capsys):
    items = [([1 + i % 5], [2 + i % 4] * (1 + i % 3)) for i in range(12)]
    folder = tmp_path / "opponent_logps.chunks"

    def score(settings):
        return score_sequences(TableModel(vocab=7), items, pad_id=0, batch_size=4, folder=folder, settings=settings)

    first = score({"model": "iter_000/model"})
    for chunk in folder.glob("chunk-*.jsonl"):  # poison the cache: a reuse would show
        chunk.write_text("".join(json.dumps({**json.loads(line), "logp": 99.0}) + "\n" for line in chunk.read_text().splitlines()))
    capsys.readouterr()
    assert score({"model": "iter_001/model"}) == first  # another θ: recomputed
    out = capsys.readouterr().out
    assert "opponent_logps.chunks" in out and "model" in out
    assert json.loads((folder / "manifest.json").read_text())["model"] == "iter_001/model"


class _OneProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self):
        pass


def _tpaw_session(tmp_path):
    from types import SimpleNamespace

    from sparring.config import RunConfig

    cfg = RunConfig()
    cfg.train.logprob_batch_size = 2
    data = SimpleNamespace(prompt_ids=[[1], [2, 3], [4]], real_ids=[[2], [3, 4], [5, 1]], examples=[None] * 3)
    return SimpleNamespace(cfg=cfg, run_dir=RunDir(tmp_path), data=data, tokenizer=SimpleNamespace(pad_token_id=0),
                           accelerator=_OneProcess(), main=True)


def test_a_stale_team_logprob_file_is_refused_with_its_name_and_what_differs(tmp_path):
    from sparring.algorithms.tpaw import team_logps

    s, policy = _tpaw_session(tmp_path), TableModel(vocab=7)
    gen_ids = {0: [[3], [1, 2], [6]]}
    first = team_logps(s, policy, 0, 0, gen_ids, s.cfg)
    path = s.run_dir.team_logps(0, 0)
    assert team_logps(s, policy, 0, 0, gen_ids, s.cfg) == first  # same key: read back

    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "cache_key": {**stored["cache_key"], "dtype": "torch.float16"}}))
    with pytest.raises(StaleCache, match=r"iter_000/team_theta0\.json.*dtype: 'torch.float16' -> 'torch\."):
        team_logps(s, policy, 0, 0, gen_ids, s.cfg)
    path.write_text(json.dumps(stored))
    with pytest.raises(StaleCache, match=r"iter_000/team_theta0\.json.*items: "):  # other y′ than were scored
        team_logps(s, policy, 0, 0, {0: [[3], [1, 2], [5]]}, s.cfg)
    s.cfg.tpaw.logprob_reduction = "mean"
    with pytest.raises(StaleCache, match=r"team_theta0\.json.*average: False -> True"):
        team_logps(s, policy, 0, 0, gen_ids, s.cfg)
    s.cfg.tpaw.logprob_reduction = "sum"
    path.write_text(json.dumps({k: v for k, v in stored.items() if k != "cache_key"}))  # an older sparring's file
    with pytest.raises(StaleCache, match=r"team_theta0\.json records no cache key"):
        team_logps(s, policy, 0, 0, gen_ids, s.cfg)
    path.unlink()  # a missing cache file is recomputed
    assert team_logps(s, policy, 0, 0, gen_ids, s.cfg) == first
