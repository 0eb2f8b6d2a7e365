"""Adding a method (docs/algorithms.md, "Adding a method"): plain DPO on SPIN's pairs, defined and
registered from this file alone — its record type, loss step and generate / precompute calls — and
run by the CLI with nothing in training/, stages or state changed. With the initial model as both
the reference and the sampler of y′, one round of DPO is SPIN's iteration 0: same weights."""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.conftest import REPO, tiny_overrides
from tests.integration.helpers import assert_same_weights

from sparring import algorithms, stages
from sparring.cli import main
from sparring.config import RunConfig
from sparring.logprobs import Sequences, collate, sequence_logps
from sparring.losses import LossOutput
from sparring.training import score_sequences

# -- the method: what a fifth method's file under algorithms/ would hold ----------------------------
READS = ("output_dir", "model", "data", "generation", "train", "eval", "spin.scale")


class DpoRecord(NamedTuple):
    prompt_ids: list[int]
    chosen_ids: list[int]  # the data's y
    rejected_ids: list[int]  # y′ ~ π_ref
    ref_chosen: float
    ref_rejected: float


class DpoBatch(NamedTuple):
    sequences: Sequences  # (2B, T): chosen, then rejected
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor


def collate_dpo(records: list[DpoRecord], pad_id: int) -> DpoBatch:
    seqs = [(r.prompt_ids, r.chosen_ids) for r in records] + [(r.prompt_ids, r.rejected_ids) for r in records]
    return DpoBatch(collate(seqs, pad_id), torch.tensor([r.ref_chosen for r in records]),
                    torch.tensor([r.ref_rejected for r in records]))


def dpo_step(model, batch: DpoBatch, *, beta: float) -> LossOutput:
    chosen, rejected = sequence_logps(model, batch.sequences).chunk(2)
    margin = (chosen - batch.ref_chosen) - (rejected - batch.ref_rejected)
    return LossOutput(-F.logsigmoid(beta * margin), {"rewards/margins": (beta * margin).detach().mean()})


def iteration(s: stages.Session, t: int, cfg: RunConfig, model):
    """One DPO round from ``model`` = θ0: π_ref (frozen by the precompute), sampler and starting point."""
    samples = stages.generate(s, model, t, "generated", cfg)  # 1. y′ ~ π_ref
    rejected = [stages.response_ids(s, i, y, cfg.data.max_length) for i, y in enumerate(samples)]
    prompts, chosen = s.data.prompt_ids, s.data.real_ids
    ref = score_sequences(  # 2. log π_ref of y and y′, once
        model, list(zip(prompts, chosen)) + list(zip(prompts, rejected)), pad_id=s.tokenizer.pad_token_id,
        batch_size=cfg.train.logprob_batch_size, folder=s.run_dir.opponent_logp_chunks(t),
        accelerator=s.accelerator, settings=stages.logp_settings(s, t, cfg))
    n = len(prompts)
    records = [DpoRecord(prompts[i], chosen[i], rejected[i], ref[i], ref[n + i]) for i in range(n)]
    result = stages.train_iteration(  # 3. the DPO loss on the shared loop
        s, t, cfg, model, records, collate=partial(collate_dpo, pad_id=s.tokenizer.pad_token_id),
        loss_step=partial(dpo_step, beta=cfg.spin.scale))
    return result, {"pairs": n}


def run(cfg: RunConfig, *, force: bool = False) -> list[dict]:
    return stages.run_iterations(cfg, 1, iteration, force=force)  # θ0 evaluated, θ1 saved and evaluated


# -- the test -----------------------------------------------------------------------------------
@pytest.fixture
def dpo_registered():
    algorithms.register("dpo", sys.modules[__name__])
    yield
    algorithms.unregister("dpo")


def test_a_method_registered_from_a_test_file_runs_end_to_end_and_equals_spin_iteration_0(
        dpo_registered, tiny_ground, tmp_path):
    spin = yaml.safe_load((REPO / "configs" / "spin" / "tiny.yaml").read_text())
    dpo = {k: spin[k] for k in ("model", "data", "generation", "train", "eval")} | {
        "method": "dpo", "spin": {"scale": spin["spin"]["scale"]}}
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(dpo))
    small = ["data.num_prompts=24", "generation.batch_size=8", "train.logprob_batch_size=8", "eval.num_examples=8"]
    assert main(["run", str(config), *tiny_overrides(tiny_ground, tmp_path / "dpo"), *small]) == 0
    # the toy's batches hold one sequence per response, as SPIN's without train.share_prompt
    spin_args = [*tiny_overrides(tiny_ground, tmp_path / "spin"), *small, "spin.iterations=1", "train.share_prompt=false"]
    assert main(["run", str(REPO / "configs" / "spin" / "tiny.yaml"), *spin_args]) == 0
    assert_same_weights(tmp_path / "dpo" / "iter_000" / "model", tmp_path / "spin" / "iter_000" / "model", atol=1e-6)
    assert "θ1 (after iteration 0)" in (tmp_path / "dpo" / "results.md").read_text()
    assert "method: dpo" in Path(tmp_path / "dpo" / "config.yaml").read_text()
