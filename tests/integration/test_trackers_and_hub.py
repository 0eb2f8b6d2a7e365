"""A tiny SPIN run with TensorBoard and wandb (offline) and hub.push / hub.push_iterations against a local
stand-in of the Hub: the run's config and metrics reach the tracker, the final model and every iterate
reach their revisions with a model card; a rerun pushes no iteration twice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import REPO, tiny_overrides
from tests.unit.test_hub import FakeHub
from tests.unit.test_trackers import offline_wandb, wandb_records

from sparring.cli import main

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
SMALL = ["data.num_prompts=16", "generation.batch_size=8", "train.logprob_batch_size=8", "eval.num_examples=8"]
PUSH = ["logging.report_to=[tensorboard,wandb]", "logging.project=tiny", "hub.push=true", "hub.repo_id=me/tiny-spin",
        "hub.push_iterations=true"]


def test_a_tiny_run_logs_to_wandb_and_pushes_its_models_with_a_card(tiny_ground, tmp_path, monkeypatch):
    offline_wandb(monkeypatch, tmp_path)
    api = FakeHub(tmp_path / "remote")
    monkeypatch.setattr("huggingface_hub.HfApi", lambda: api)
    monkeypatch.setattr("sparring.stages.check_can_push", lambda cfg: None)  # offline, no token: the stand-in needs none
    out = tmp_path / "run"
    args = ["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL, *PUSH]
    assert main(args) == 0

    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    records = list(wandb_records(offline))
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == list(range(1, len(steps) + 1))  # the global step across iterations
    assert all("train/loss" in h and "train/rewards/margins" in h for h in history)
    settings = {i.key or ".".join(i.nested_key) for r in records if r.WhichOneof("record_type") == "config"
                for i in r.config.update}
    assert {"spin.scale", "train.lr", "data.source", "hub.repo_id"} <= settings
    assert list((out / "tb").glob("events.out.tfevents.*"))

    assert [kw["revision"] for _, kw in api.named("upload_folder")] == ["iter-1", "iter-2", None]
    main_rev = tmp_path / "remote" / "me" / "tiny-spin" / "main"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "plot.png"} <= {p.name for p in main_rev.iterdir()}
    assert (main_rev / "model.safetensors").read_bytes() == (out / "iter_001" / "model" / "model.safetensors").read_bytes()
    card = (main_rev / "README.md").read_text()
    table = (out / "results.md").read_text().split("\n\n")[0]
    assert table.startswith("| model") and table in card and "held-out exact match" in card
    iterate = Path(tmp_path / "remote" / "me" / "tiny-spin" / "iter-1")
    assert (iterate / "model.safetensors").read_bytes() == (out / "iter_000" / "model" / "model.safetensors").read_bytes()

    assert main(args) == 0  # the finished run again: the final model is pushed again, no iteration twice
    assert [kw["revision"] for _, kw in api.named("upload_folder")] == ["iter-1", "iter-2", None, None]
