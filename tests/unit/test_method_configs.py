"""Per-method configs: a field the user sets that the method does not read is an error, the method
is checked against the registry, the resume fingerprint covers only what the method reads; the
proving ground is a plug-in (no default tied to it, built by the CLI, evaluation takes its verifier
from the rewards registry); vLLM gets model.dtype and model.revision."""

from __future__ import annotations

import json
import sys
import types

import pytest
import yaml
from tests.conftest import REPO

from sparring import algorithms
from sparring.config import (
    RESUMABLE_FIELDS,
    ConfigError,
    EvalConfig,
    ModelConfig,
    RunConfig,
    dump_yaml,
    fingerprint,
    flat_settings,
    load_config,
)
from sparring.state import RunDir

LSP = str(REPO / "configs" / "lsp" / "tiny.yaml")
SPIN = str(REPO / "configs" / "spin" / "tiny.yaml")


def write(tmp_path, data, name="cfg.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("override", ["generation.temperature=0.7", "generation.top_p=0.9", "generation.max_new_tokens=8",
                                      "train.epochs=3", "train.grad_accum=2", "data.source=x.jsonl",
                                      "train.logprob_batch_size=4", "spin.scale=5.0"])
def test_lsp_refuses_a_field_it_does_not_read(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(LSP, [override])
    message = str(err.value)
    assert message.startswith(f"'{key}' is set, but method lsp does not read it (remove it); lsp reads: ")
    assert "lsp.*" in message and "generation.seed" in message and "train.lr" in message
    readable = message.split("lsp reads: ")[1]
    assert "generation.*" not in readable and "train.epochs" not in readable


@pytest.mark.parametrize("section, field, value", [("lsp", "kl_coef", 0.1), ("tpaw", "scale", 0.2), ("tspin", "scale", 2.0),
                                                   ("sft", "steps", 5)])
def test_spin_refuses_other_methods_sections_in_the_file(tmp_path, section, field, value):
    data = {"model": {"name_or_path": "m"}, "data": {"source": "d.jsonl"}, section: {field: value}}
    with pytest.raises(ConfigError, match=rf"^'{section}\.{field}' is set, but method spin does not read it"):
        load_config(write(tmp_path, data))


def test_a_field_set_to_its_default_is_still_set():
    # train.epochs defaults to 2: set in an override (or the file), LSP still refuses it
    assert RunConfig().train.epochs == 2
    with pytest.raises(ConfigError, match="'train.epochs' is set, but method lsp does not read it"):
        load_config(LSP, ["train.epochs=2"])
    assert load_config(LSP).train.epochs == 2  # the default itself is no error


def test_a_section_override_is_checked_field_by_field():
    with pytest.raises(ConfigError, match="'train.epochs' is set, but method lsp"):
        load_config(LSP, ["train={lr: 1.0e-4, epochs: 1}"])
    assert load_config(LSP, ["train={lr: 1.0e-4}"]).train.lr == 1e-4


def test_the_sft_section_is_read_only_when_the_cli_builds_the_proving_ground():
    assert load_config(SPIN).sft.output_dir == "runs/proving-ground"  # build_proving_ground: true
    assert load_config(LSP).sft.output_dir == "runs/proving-ground-lsp"
    with pytest.raises(ConfigError, match=r"'sft.output_dir' is set, but method lsp does not read it .*"
                                          r"sft\.\* \(with model\.build_proving_ground: true\)"):
        load_config(LSP, ["model.build_proving_ground=false"])
    assert not load_config(SPIN, ["model.build_proving_ground=false"]).model.build_proving_ground


def test_a_whitelisted_per_iteration_field_the_method_does_not_read_is_refused(tmp_path):
    toy = types.ModuleType("toy_method")
    toy.READS, toy.run = ("data", "train.lr", "per_iteration"), (lambda cfg, force=False: [])
    algorithms.register("toy", toy)
    try:
        data = {"method": "toy", "model": {"name_or_path": "m"}, "data": {"source": "d"},
                "per_iteration": {1: {"train.epochs": 3}}}
        with pytest.raises(ConfigError, match=r"per_iteration\.1: 'train\.epochs': method toy does not read it; "
                                              r"per-iteration fields are: train\.lr$"):
            load_config(write(tmp_path, data))
    finally:
        algorithms.unregister("toy")


def test_method_is_validated_against_the_registry_and_a_registered_method_works(tmp_path):
    with pytest.raises(ConfigError, match=r"'method': 'dpo' is not a method; methods: spin, tspin, tpaw, lsp, sft"):
        load_config(write(tmp_path, {"method": "dpo", "model": {"name_or_path": "m"}}))
    toy = types.ModuleType("toy_method")
    toy.READS = ("data", "train", "spin.scale", "per_iteration")
    toy.run = lambda cfg, force=False: []
    algorithms.register("dpo", toy)
    try:
        base = {"method": "dpo", "model": {"name_or_path": "m"}, "data": {"source": "d"}}
        cfg = load_config(write(tmp_path, {**base, "spin": {"scale": 0.5}, "per_iteration": {1: {"spin.scale": 1.0}}}))
        assert cfg.method == "dpo" and cfg.for_iteration(1).spin.scale == 1.0
        with pytest.raises(ConfigError, match=r"'spin.loss' is set, but method dpo does not read it \(remove it\); dpo reads: .*spin\.scale"):
            load_config(write(tmp_path, {**base, "spin": {"loss": "hinge"}}))
        with pytest.raises(ConfigError, match="'generation.seed' is set, but method dpo"):
            load_config(write(tmp_path, base), ["generation.seed=1"])
        assert "generation.seed" not in fingerprint(cfg) and "spin.scale" in fingerprint(cfg)
    finally:
        algorithms.unregister("dpo")


def test_the_fingerprint_covers_only_what_the_method_reads():
    lsp = load_config(LSP)
    keys = set(fingerprint(lsp))
    assert "lsp.kl_coef" in keys and "train.lr" in keys and "model.name_or_path" in keys
    assert not {k for k in keys if k.startswith(("spin.", "tpaw.", "tspin.", "sft.", "generation.temperature", "data.source"))}
    spin = fingerprint(load_config(SPIN))
    assert "spin.scale" in spin and "generation.temperature" in spin and not [k for k in spin if k.startswith("lsp.")]


def test_an_lsp_run_resumes_when_a_setting_it_does_not_read_changed(tmp_path):
    cfg = load_config(LSP, [f"output_dir={tmp_path}"])
    run = RunDir(tmp_path)
    assert run.start(cfg) is False
    cfg.spin.scale, cfg.generation.temperature, cfg.train.epochs = 5.0, 0.3, 9  # read by other methods only
    assert run.start(cfg) is True
    cfg.lsp.kl_coef = 0.5
    with pytest.raises(ConfigError, match=r"lsp\.kl_coef: 0\.05 -> 0\.5"):
        run.start(cfg)


def test_a_run_started_with_the_old_all_sections_fingerprint_resumes(tmp_path):
    """state.json written before per-method fingerprints holds every section's settings: a run
    resumes when the fields its method reads are unchanged, whatever the others hold."""
    cfg = load_config(LSP, [f"output_dir={tmp_path}"])
    old = {k: v for k, v in flat_settings(cfg).items()
           if not any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)}  # the old fingerprint
    old["spin.scale"], old["generation.temperature"], old["data.source"] = 5.0, 0.3, "old.jsonl"
    assert set(fingerprint(cfg)) < set(old)
    (tmp_path / "state.json").write_text(json.dumps({"fingerprint": old, "method": "lsp", "stages": {"initial": {}}}))
    run = RunDir(tmp_path)
    assert run.start(cfg) is True
    assert run.load_state()["fingerprint"] == fingerprint(cfg)  # rewritten in the new form
    old["lsp.steps"] = 7  # a field LSP reads that changed: still refused
    (tmp_path / "state.json").write_text(json.dumps({"fingerprint": old, "method": "lsp", "stages": {}}))
    with pytest.raises(ConfigError, match=r"lsp\.steps: 7 -> 40"):
        run.start(cfg)


@pytest.mark.parametrize("config", [LSP, SPIN, str(REPO / "configs" / "tspin" / "tiny.yaml")])
def test_a_runs_saved_config_holds_what_the_method_reads_and_loads_back(tmp_path, config):
    cfg = load_config(config, [f"output_dir={tmp_path}"])
    RunDir(tmp_path).start(cfg)
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    if cfg.method == "lsp":
        assert "spin" not in saved and "data" in saved and set(saved["data"]) == {"max_length"}
        assert "temperature" not in saved["generation"]
    again = load_config(tmp_path / "config.yaml")
    assert fingerprint(again) == fingerprint(cfg) and dump_yaml(again) == dump_yaml(cfg)


# -- the proving ground is a plug-in ------------------------------------------------------------

def test_no_default_is_tied_to_the_demo_task(tmp_path):
    cfg = RunConfig()
    assert cfg.model.name_or_path is None and cfg.data.source is None
    assert cfg.eval.source is None and cfg.eval.verifier is None and not cfg.model.build_proving_ground
    with pytest.raises(ConfigError, match="model.name_or_path is required"):
        load_config(write(tmp_path, {"method": "spin", "data": {"source": "d.jsonl"}}))
    with pytest.raises(ConfigError, match="data.source is required by method spin"):
        load_config(write(tmp_path, {"method": "spin", "model": {"name_or_path": "m"}}))
    lsp = load_config(write(tmp_path, {"method": "lsp", "model": {"name_or_path": "m"}}))  # LSP reads no data
    assert lsp.data.source is None and lsp.eval.verifier is None


def test_eval_verifier_is_a_registered_name_or_a_function_spec(tmp_path):
    base = {"model": {"name_or_path": "m"}, "data": {"source": "d"}}
    ok = load_config(write(tmp_path, {**base, "eval": {"source": "e.jsonl", "verifier": "mypkg.rewards:judge"}}))
    assert ok.eval.verifier == "mypkg.rewards:judge"
    assert load_config(write(tmp_path, {**base, "eval": {"verifier": "none"}})).eval.verifier == "none"
    with pytest.raises(ConfigError, match=r"eval.verifier: 'exact' is not a verifier; verifiers: proving_ground"):
        load_config(write(tmp_path, {**base, "eval": {"source": "e.jsonl", "verifier": "exact"}}))
    with pytest.raises(ConfigError, match="eval.verifier=proving_ground scores held-out answers, but eval.source is not set"):
        load_config(write(tmp_path, {**base, "eval": {"verifier": "proving_ground"}}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from sparring.tasks import build_tiny_model, build_tokenizer

    tok = build_tokenizer()
    return build_tiny_model(tok, hidden_size=32, layers=1, heads=2), tok


JUDGE = """JUDGED = []


def judge(query, answer):
    JUDGED.append((query, answer))
    return None if query == "unjudgeable" else 0.25 * len(query)
"""


def test_evaluation_takes_a_user_function_as_its_verifier_on_the_last_user_turn(tiny, tmp_path, monkeypatch):
    from sparring.evaluation import evaluate, load_eval_set
    from sparring.state import write_jsonl

    (tmp_path / "eval_judge_module.py").write_text(JUDGE)  # a user's verifier: "eval_judge_module:judge"
    monkeypatch.syspath_prepend(str(tmp_path))
    model, tok = tiny
    rows = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"},
                          {"role": "assistant", "content": "x"}, {"role": "user", "content": "abcd"},
                          {"role": "assistant", "content": "y"}]},
            {"messages": [{"role": "user", "content": "unjudgeable"}, {"role": "assistant", "content": "z"}]}]
    write_jsonl(tmp_path / "eval.jsonl", rows)
    cfg = EvalConfig(source=str(tmp_path / "eval.jsonl"), verifier="eval_judge_module:judge", max_new_tokens=3)
    scores = evaluate(model, tok, load_eval_set(cfg, tok, 96), cfg)
    assert sorted(q for q, _ in sys.modules["eval_judge_module"].JUDGED) == ["abcd", "unjudgeable"]  # the last user turn, not the system turn
    assert scores["reward"] == pytest.approx((0.25 * 4 + 0.0) / 2)  # None scores 0
    assert "exact_match" not in scores and "logps_real_per_token" in scores


def test_the_proving_ground_verifier_comes_from_the_registry(tiny, tmp_path, monkeypatch):
    from sparring.evaluation import evaluate, load_eval_set
    from sparring.rewards import RewardBatch, registry
    from sparring.state import write_jsonl

    model, tok = tiny
    write_jsonl(tmp_path / "eval.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3)
    cfg = EvalConfig(source=str(tmp_path / "eval.jsonl"), verifier="proving_ground", max_new_tokens=2)
    assert evaluate(model, tok, load_eval_set(cfg, tok, 96), cfg)["exact_match"] == 0.0  # "q" is no task
    registry.register("always", lambda: (lambda qs, ans: RewardBatch([1.0] * len(qs), [True] * len(qs))), metric="solved")
    try:
        cfg.verifier = "always"
        assert evaluate(model, tok, load_eval_set(cfg, tok, 96), cfg)["solved"] == 1.0
    finally:
        registry.unregister("always")
    cfg.verifier = None
    assert set(evaluate(model, tok, load_eval_set(cfg, tok, 96), cfg)) == {"logps_real_per_token"}


def test_the_cli_builds_the_proving_ground_and_open_session_never_does(tmp_path, monkeypatch):
    import sparring.tasks.sft as sft
    from sparring import stages
    from sparring.cli import main

    built = []
    monkeypatch.setattr(sft, "build_proving_ground", lambda cfg, model_dir=None: built.append(str(model_dir)))
    ran = []
    monkeypatch.setattr(algorithms, "get", lambda method: lambda cfg, force=False: ran.append(cfg.method))
    target = tmp_path / "ground" / "sft"
    assert main(["run", SPIN, f"model.name_or_path={target}", f"output_dir={tmp_path / 'run'}"]) == 0
    assert built == [str(target)] and ran == ["spin"]
    cfg = load_config(SPIN, [f"model.name_or_path={target}", f"output_dir={tmp_path / 'session'}"])
    with pytest.raises(OSError):  # the tokenizer is missing: open_session went on without building it
        stages.open_session(cfg)
    assert built == [str(target)]


def test_a_user_run_needs_no_demo_task(tiny, tmp_path, monkeypatch):
    """SPIN on a user's model and data, no eval.source, no verifier: runs without the proving ground
    (its build and its check both fail here if called) and without runs/proving-ground."""
    import sparring.tasks as tasks
    import sparring.tasks.sft as sft
    from sparring.cli import main
    from sparring.state import write_jsonl

    def forbidden(*args, **kwargs):
        raise AssertionError("the demo task was used")

    monkeypatch.setattr(sft, "build_proving_ground", forbidden)
    monkeypatch.setattr(tasks, "check", forbidden)
    monkeypatch.chdir(tmp_path)
    model, tok = tiny
    model.save_pretrained(tmp_path / "mine")
    tok.save_pretrained(tmp_path / "mine")
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"say {c}", "completion": c} for c in "abcd"])
    config = write(tmp_path, {
        "method": "spin", "output_dir": "runs/mine", "model": {"name_or_path": str(tmp_path / "mine")},
        "data": {"source": "train.jsonl", "max_prompt_length": 16, "max_length": 24},
        "generation": {"max_new_tokens": 4, "batch_size": 4}, "train": {"batch_size": 4, "epochs": 1},
        "spin": {"iterations": 1},
    })
    assert main(["run", config]) == 0
    assert (tmp_path / "runs" / "mine" / "iter_000" / "model" / "config.json").exists()
    assert not (tmp_path / "runs" / "proving-ground").exists() and not (tmp_path / "runs" / "mine" / "eval").exists()


# -- vLLM gets the model: settings ------------------------------------------------------------------

def test_vllm_is_given_model_dtype_and_revision(tmp_path, monkeypatch):
    from sparring.generation.vllm import VLLMGenerator

    calls = []
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    model = ModelConfig(name_or_path=str(tmp_path / "base"), revision="abc123", dtype="float16", trust_remote_code=True)
    VLLMGenerator.for_model(model, None, tokenizer=None, gpu_memory_utilization=0.3)  # θ_0: the base at its revision
    VLLMGenerator.for_model(model, tmp_path / "iter_000" / "model", tokenizer=None)  # θ_1: this run's checkpoint
    assert calls[0] == {"model": str(tmp_path / "base"), "tokenizer": str(tmp_path / "base"), "dtype": "float16",
                        "revision": "abc123", "tokenizer_revision": "abc123", "trust_remote_code": True,
                        "gpu_memory_utilization": 0.3}
    assert calls[1]["model"] == str(tmp_path / "iter_000" / "model") and calls[1]["revision"] is None
    assert calls[1]["dtype"] == "float16"
    auto = VLLMGenerator.for_model(ModelConfig(name_or_path="m"), None, tokenizer=None)
    assert auto.llm is None and calls[2]["dtype"] in ("float32", "bfloat16")  # resolved as for the HF model, never vLLM's own auto
