"""Trackers through accelerate (the logging: section): TensorBoard in RUN/tb with stale steps purged on
resume, wandb (offline) and trackio (local) runs holding the run's config and metrics, config checks."""

from __future__ import annotations

import json
import sqlite3
import struct
import time
from pathlib import Path

import pytest
import yaml

from sparring.config import ConfigError, RunConfig, fingerprint, load_config
from sparring.modeling import make_accelerator
from sparring.training import MetricsLogger
from sparring.training.trackers import run_trackers


def session(cfg: RunConfig, purge_step: int, steps, value=lambda s: float(s)) -> MetricsLogger:
    """One session of a run: its accelerator and logger, ``steps`` logged as train rows from ``purge_step``."""
    logger = MetricsLogger(Path(cfg.output_dir) / "metrics.jsonl", run_trackers(make_accelerator(cfg), cfg))
    logger.open_trackers(purge_step=purge_step)
    for s in steps:
        logger.log({"kind": "train", "iteration": 0, "step": s, "loss": value(s), "note": "text"}, step=s)
    logger.close()
    return logger


def config(tmp_path: Path, *overrides: str, method: str = "spin") -> RunConfig:
    """A run of ``method`` in tmp_path/run (its model and data are never loaded here)."""
    data = [] if method == "lsp" else ["data.source=train.jsonl"]
    return load_config(None, [f"method={method}", f"output_dir={tmp_path / 'run'}", "model.name_or_path=some/model",
                              "model.build_proving_ground=false", *data, *overrides], check_reads=False)


def scalars(tb: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_writes_run_tb_and_a_resumed_session_purges_the_stale_steps(tmp_path):
    cfg = config(tmp_path)  # logging.report_to defaults to [tensorboard]
    session(cfg, 1, range(1, 6))  # killed after step 5, its checkpoint at step 3: no end_training
    # TensorBoard reads a folder's event files in name order, whose first key is the second the writer opened
    # and whose last is a per-process writer count compared as text ("…10" < "…9"): a resume in the same
    # second as the crash, after ten writers in one process (this test file among others), would read the
    # sessions out of order. A real resume starts seconds later; so does this one.
    time.sleep(1.0 - time.time() % 1.0 + 0.01)
    session(cfg, 4, (4, 5), value=lambda s: 10.0 * s).finish()  # the rerun redoes steps 4 and 5
    tb = tmp_path / "run" / "tb"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 2  # in RUN/tb itself, one file per session
    assert scalars(tb, "train/loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    hparams = [yaml.safe_load(p.read_text()) for p in tb.glob("*/hparams.yml")]
    assert hparams and hparams[0]["spin.scale"] == cfg.spin.scale and hparams[0]["method"] == "spin"
    assert json.loads(hparams[0]["peft.target_modules"]) == cfg.peft.target_modules  # lists as JSON
    assert "lsp.steps" not in hparams[0]  # only what the run reads


def test_no_tracker_writes_metrics_jsonl_only(tmp_path):
    cfg = config(tmp_path, "logging.report_to=[]")
    session(cfg, 1, (1, 2)).finish()
    assert not (tmp_path / "run" / "tb").exists()
    assert [r["step"] for r in MetricsLogger(tmp_path / "run" / "metrics.jsonl").rows()] == [1, 2]


def test_an_unknown_or_missing_tracker_is_a_config_error(tmp_path):
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    with pytest.raises(ConfigError, match="'tensorbord' is not a tracker"):
        config(tmp_path, "logging.report_to=[tensorbord]")
    missing = [str(t) for t in LoggerType if t not in get_available_trackers() and str(t) != "all"]
    if missing:
        with pytest.raises(ConfigError, match=f"{missing[0]} is not installed"):
            make_accelerator(config(tmp_path, f"logging.report_to=[{missing[0]}]"))


@pytest.mark.parametrize("method", ["spin", "tspin", "tpaw", "sft", "lsp"])
def test_every_method_reads_logging_and_it_does_not_change_the_fingerprint(tmp_path, method):
    data = {} if method == "lsp" else {"data": {"source": "train.jsonl"}}
    base = {"method": method, "model": {"name_or_path": "some/model"}, **data}
    mine = {**base, "logging": {"report_to": ["wandb"], "project": "p"}, "hub": {"push": True, "repo_id": "me/m"}}
    files = [tmp_path / "base.yaml", tmp_path / "mine.yaml"]
    for path, content in zip(files, (base, mine)):
        path.write_text(yaml.safe_dump(content))
    assert fingerprint(load_config(files[1])) == fingerprint(load_config(files[0]))  # may change on resume


def wandb_records(run_dir: Path):
    """The records of an offline wandb run file (W&B's leveldb-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("run-*.wandb")
    data, block, pos, buf = path.read_bytes(), 32768, 7, b""  # 7: the ":W&B" header
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # the rest of a block is padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def settled_records(run_dir: Path, timeout: float = 20.0) -> list:
    """The run's records once its file holds the run record and the summary: wandb's service process
    may still be writing the file when ``finish`` returns, on a busy machine."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(run_dir))
        kinds = {r.WhichOneof("record_type") for r in records}
        if {"run", "summary"} <= kinds or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_wandb(monkeypatch, folder: Path) -> None:
    """wandb in offline mode, writing under ``folder``: its settings are read again (``wandb.teardown``)."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # wandb reads WANDB_* once per process, at its first run
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(folder))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_offline_run_holds_the_config_and_the_metrics_at_the_global_step(tmp_path, monkeypatch):
    offline_wandb(monkeypatch, tmp_path)
    cfg = config(tmp_path, "logging.report_to=[wandb]", "logging.project=tiny-project")
    session(cfg, 1, (1, 2, 3)).finish()
    (offline,) = (tmp_path / "wandb").glob("offline-run-*")
    records = settled_records(offline)
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("tiny-project", "run")  # run name: the output_dir's name
    settings = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
                for i in r.config.update}
    assert settings["spin.scale"] == cfg.spin.scale and settings["train.lr"] == cfg.train.lr
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h["train/loss"]) for h in history] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert not any("train/note" in h or "train/step" in h for h in history)  # numbers only, step is the axis


def test_trackio_local_run_holds_the_config_and_the_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is first imported
    pytest.importorskip("trackio")
    from trackio import utils

    if Path(utils.TRACKIO_DIR) != tmp_path / "trackio":
        pytest.skip("trackio was imported before this test set its folder")
    cfg = config(tmp_path, "logging.report_to=[trackio]", "logging.run_name=tiny")
    session(cfg, 1, (1, 2)).finish()
    db = sqlite3.connect(tmp_path / "trackio" / "sparring.db")
    rows = db.execute("select run_name, step, metrics from metrics order by step").fetchall()
    assert [(name, step, json.loads(m)["train/loss"]) for name, step, m in rows] == [("tiny", 1, 1.0), ("tiny", 2, 2.0)]
    (stored,) = [json.loads(c) for (c,) in db.execute("select config from configs")]
    assert stored["spin.scale"] == cfg.spin.scale and stored["method"] == "spin"
