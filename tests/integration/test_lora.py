"""LoRA (the peft: section) runs of SPIN, T-SPIN, TPAW and LSP on a tiny model.

Each run checks what θ_t means under LoRA: only fresh adapters train on θ_t, whose weights stay as
they were; θ_{t+1} is the merged model, saved as a full model; each iteration starts at θ_t (SPIN's
first loss is log 2, TPAW's own-player margin is 0, LSP's KL is 0); a rerun of a finished run does nothing.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import rows, write_reward_module

import sparring.algorithms.lsp
import sparring.stages
from sparring.cli import main

pytestmark = pytest.mark.slow
RANK = 4
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # peft.target_modules' default
LORA = [f"peft.r={RANK}", "peft.alpha=8", "train.lr=5e-3"]
SMALL = ["data.num_prompts=16", "generation.max_new_tokens=10", "generation.batch_size=8", "train.batch_size=4",
         "train.logprob_batch_size=8", "train.save_steps=2", "eval.num_examples=8", "eval.max_new_tokens=10"]
LSP = ["eval.num_examples=8", "lsp.steps=2", "lsp.num_queries=2", "lsp.answers_per_query=2",
       "lsp.query_max_new_tokens=12", "lsp.answer_max_new_tokens=8", "lsp.eval_every=2", "lsp.save_every=1",
       "lsp.sample_every=2", "lsp.reward.kind=function", "lsp.reward.function=lsp_test_reward:reward"]
RUNS = {  # method: (extra overrides, the saved iterates θ_1, θ_2, … relative to the run folder)
    "spin": (["spin.iterations=2"], ["iter_000/model", "iter_001/model"]),
    "tspin": (["tspin.iterations=2"], ["iter_000/model", "iter_001/model"]),
    "tpaw": (["tpaw.iterations=2"], ["iter_000/model", "iter_001/model"]),
    "lsp": (LSP, ["model"]),
}


def load(path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


class MergeProbe:
    """Looks at the trained PeftModel right before its adapters are merged into θ_{t+1}."""

    def __init__(self, real, name_or_path: str):
        self.real, self.name_or_path, self.seen = real, name_or_path, []

    def __call__(self, model, cfg, base_path=None):
        theta_t = load(base_path or self.name_or_path)
        base, adapters = {}, {}
        for key, value in model.state_dict().items():
            name = key.removeprefix("base_model.model.")
            (adapters if "lora_" in name else base)[name.replace(".base_layer", "")] = value
        self.seen.append({
            "trainable_are_adapters": all("lora_" in n for n, p in model.named_parameters() if p.requires_grad),
            "base_is_theta_t": base.keys() == theta_t.keys() and all(torch.equal(base[k], theta_t[k]) for k in base),
            "adapters_moved": any(v.abs().sum() > 0 for k, v in adapters.items() if "lora_B" in k),
        })
        return self.real(model, cfg, base_path)


@pytest.fixture(scope="module", params=list(RUNS))
def lora_run(request, tiny_ground, tmp_path_factory):
    method = request.param
    root = tmp_path_factory.mktemp(f"lora-{method}")
    write_reward_module(root)
    config = str(REPO / "configs" / method / "tiny.yaml")
    extra, saved = RUNS[method]
    args = ["run", config, *tiny_overrides(tiny_ground, root / "run", data=method != "lsp"), *(SMALL if method != "lsp" else []),
            *extra, *LORA]
    probe = MergeProbe(sparring.stages.merge_adapters, tiny_ground["model"])
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.setattr(sparring.stages, "merge_adapters", probe)
        assert main(args) == 0
    return {"method": method, "out": root / "run", "args": args, "probe": probe, "saved": saved,
            "ground": tiny_ground, "reward_dir": root}


def test_only_the_adapters_train_and_theta_t_stays_as_it_was(lora_run):
    seen = lora_run["probe"].seen
    assert len(seen) == len(lora_run["saved"])  # one merge per saved iterate
    for calls in seen:
        assert calls == {"trainable_are_adapters": True, "base_is_theta_t": True, "adapters_moved": True}


def test_each_iterate_is_a_full_model_theta_t_plus_a_low_rank_change(lora_run):
    out = lora_run["out"]
    previous = load(lora_run["ground"]["model"])  # θ_0
    for folder in lora_run["saved"]:
        current = load(out / folder)  # AutoModelForCausalLM loads it: no adapter folder, a full model
        assert current.keys() == previous.keys()
        assert not (out / folder / "adapter_config.json").exists()
        changed = [k for k in current if not torch.equal(current[k], previous[k])]
        assert changed and all(any(t in k for t in TARGETS) for k in changed)  # only the adapted layers moved
        for k in changed:
            s = torch.linalg.svdvals((current[k] - previous[k]).double())
            assert s[RANK:].max() < 1e-3 * s[0], k  # merged B·A: rank ≤ peft.r
        previous = current


def test_each_iteration_starts_at_theta_t(lora_run):
    method, out = lora_run["method"], lora_run["out"]
    metrics = rows(out / "metrics.jsonl")
    if method == "lsp":
        first = next(r for r in metrics if r["kind"] == "lsp")
        assert first["lsp/kl_solver"] == 0.0  # adapters disabled (π_Ref) = fresh adapters (policy)
        return
    for t in range(2):
        first = next(r for r in metrics if r["kind"] == "train" and r["iteration"] == t)
        if method == "spin":
            assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = opponent θ_t
        elif method == "tpaw":
            assert first["tpaw/player0/margin"] == pytest.approx(0.0, abs=1e-6)  # column 0 is θ_t
            assert t > 0 or first["loss"] == pytest.approx(math.log(2), abs=1e-6)
        else:  # T-SPIN has no opponent: the policy's L(y) on the first batch is θ_t's, as saved on disk
            assert first["rewards/real"] == pytest.approx(first_batch_real_logp(lora_run, t), abs=1e-4)


def first_batch_real_logp(lora_run, t: int) -> float:
    """Mean L_θt(y) over the first training batch of iteration t, θ_t read back from disk."""
    from sparring.config import load_config
    from sparring.data.dataset import load_training_set
    from sparring.logprobs import collate, sequence_logps
    from sparring.modeling import load_model, load_tokenizer
    from sparring.training.loop import plan_steps

    cfg = load_config(lora_run["args"][1], lora_run["args"][2:])
    tok = load_tokenizer(cfg.model)
    data = load_training_set(cfg.data, tok)
    first = plan_steps(len(data.examples), cfg.train, 1)[0][0]
    model = load_model(cfg.model, lora_run["out"] / "iter_000" / "model" if t else None)
    with torch.no_grad():
        logps = sequence_logps(model, collate([(data.prompt_ids[i], data.real_ids[i]) for i in first], tok.pad_token_id))
    return cfg.tspin.scale * logps.mean().item()


def test_rerunning_the_finished_run_does_nothing_new(lora_run, monkeypatch):
    out = lora_run["out"]
    models = [out / f / "model.safetensors" for f in lora_run["saved"]]
    before = [p.stat().st_mtime_ns for p in models], (out / "metrics.jsonl").read_text()
    stages_before = json.loads((out / "state.json").read_text())["stages"]
    monkeypatch.syspath_prepend(str(lora_run["reward_dir"]))
    assert main(lora_run["args"]) == 0
    assert ([p.stat().st_mtime_ns for p in models], (out / "metrics.jsonl").read_text()) == before
    assert json.loads((out / "state.json").read_text())["stages"] == stages_before
