"""Run directory layout, state.json and atomic files: the outer loop's state lives on disk.

    RUN/
      config.yaml          resolved config of the run
      state.json           fingerprint of result-affecting settings + finished stages
      metrics.jsonl        every logged row (train steps, evaluations), rewritten on resume
      tb/                  TensorBoard events
      eval/                held-out scores per model: initial.json, iter{t}.json, step{k}.json (LSP),
                           and its answers to the first eval.sample_prompts prompts: <label>.answers.jsonl
      iter_000/            one folder per iteration: generated.jsonl (+ .chunks/ while sampling),
                           pairs/triplets/team records, *_logps caches, checkpoints/, model/ (θ_{t+1})
      checkpoints/, samples.jsonl, models/step{k}/, model/      LSP's resumable state and models
      plot.png, results.md, report.html
      export/<format>/     sparring export: every model's answers to a benchmark's prompts
      .lock                held (flock) by the live run: {host, pid, started}

Every stage key of state.json and every path inside RUN/ comes from ``RunDir``: the one place that
knows the names (existing run directories resume because the names never change).

Every stage is idempotent: it is skipped when state.json marks it done, and its outputs are written
to a temporary name and renamed into place, so a kill leaves either the old file or the new one.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import operator
import os
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sparring.config import ConfigError, RunConfig, dump_yaml, fingerprint, flat_settings


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class ChunkStore:
    """Rows written batch by batch as numbered chunk files, so a crash loses at most one batch.

    Chunk k is batch k of one layout (batch size, items). ``claim`` records the layout in
    manifest.json and discards chunks of another one, so a resume with another batch size
    recomputes instead of reading batches of two sizes side by side.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def manifest_path(self) -> Path:
        return self.folder / "manifest.json"

    def claim(self, layout: dict[str, Any]) -> bool:
        """Keep the chunks if they were written for ``layout``, else delete them (one printed line).

        Returns True when chunks were discarded; chunks without a manifest have an unknown layout and
        are discarded too. Call it on one process, before any process reads or writes a chunk.
        """
        old = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None
        if old == layout:
            return False
        chunks = sorted(self.folder.glob("chunk-*.jsonl")) if self.folder.exists() else []
        if chunks:
            changed = [k for k in sorted(set(layout) | set(old or {})) if (old or {}).get(k) != layout.get(k)]
            why = f"{', '.join(changed)} changed" if old is not None else "no layout manifest"
            print(f"{self.folder}: discarding {len(chunks)} chunks ({why}), recomputing them", flush=True)
            for chunk in chunks:
                chunk.unlink()
        atomic_write_json(self.manifest_path, layout)  # after the deletions: a kill leaves a consistent store
        return bool(chunks)

    def path(self, index: int) -> Path:
        return self.folder / f"chunk-{index:06d}.jsonl"

    def has(self, index: int) -> bool:
        return self.path(index).exists()

    def write(self, index: int, rows: list[dict]) -> None:
        write_jsonl(self.path(index), rows)

    def read_all(self, count: int) -> list[dict]:
        missing = [i for i in range(count) if not self.has(i)]
        if missing:
            raise RuntimeError(f"{self.folder}: chunks {missing[:5]} are missing")
        return [row for i in range(count) for row in read_jsonl(self.path(i))]


class StaleCache(RuntimeError):
    """A cache file on disk was computed from other inputs than the ones asked for now."""


def cache_key(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` (what produced a cache: model, data fingerprint, settings) plus ``key``, their sha256."""
    fields = json.loads(json.dumps(fields))  # as read back from a JSON file (tuples → lists)
    return {**fields, "key": hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()}


def check_cache_key(path: Path, stored: dict[str, Any] | None, expected: dict[str, Any]) -> None:
    """Raise StaleCache naming ``path`` and every field that differs unless ``stored`` is ``expected``."""
    if stored is None:
        raise StaleCache(f"{path} records no cache key (written by an older sparring): its inputs are unknown; "
                         "delete it and rerun to recompute it")
    if stored == expected:
        return
    changed = [f"{k}: {stored.get(k, '(not set)')!r} -> {expected.get(k, '(not set)')!r}"
               for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    raise StaleCache(f"{path} was computed from other inputs ({'; '.join(changed)}); it is not reused: "
                     "delete it and rerun to recompute it")


# Settings that may name a local file or folder: the same place reached through another path (relative
# vs absolute, a symlink, a moved experiment folder linked back) is the same setting.
PATH_SETTINGS = ("model.name_or_path", "data.source", "eval.source", "lsp.prompts")


def _same_place(a: Any, b: Any) -> bool:
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    pa, pb = Path(a), Path(b)
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def changed_settings(old: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs. A field added to sparring after the run started counts as
    unchanged when it holds its default; a field sparring no longer has is ignored; a path setting
    (``PATH_SETTINGS``) naming the same existing file or folder by another path is unchanged. Only
    ``current``'s keys are compared: a run started when the fingerprint held every method's sections
    resumes if the fields its method reads (``config.fingerprint``) are unchanged."""
    defaults = flat_settings(RunConfig())
    same = {k: _same_place for k in PATH_SETTINGS}
    return sorted(k for k in current if not same.get(k, operator.eq)(old.get(k, defaults.get(k)), current[k]))


class RunLocked(RuntimeError):
    """The run directory is held by another live run."""


class RunLock:
    """An exclusive flock on RUN/.lock, held for the life of the run; the file says who holds it.

    The kernel releases a flock when its holder dies, however it dies, so a lock left by a killed
    run never blocks the rerun. Within one process a new run supersedes the earlier one's lock (one
    process runs one run at a time: this is the earlier run, ended or failed).
    """

    _held: dict[Path, RunLock] = {}  # this process's locks, by resolved run directory

    def __init__(self, root: Path):
        self.path = root / ".lock"
        self._file = None

    def acquire(self) -> RunLock:
        key = self.path.parent.resolve()
        if key in RunLock._held:
            RunLock._held[key].release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # never truncate before holding it: the holder's details are in it
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            body = f.read()
            f.close()
            raise RunLocked(f"{self.path.parent} is in use by another run ({_describe_holder(body)}); "
                            "wait for it to end or stop it, or use another output_dir") from None
        f.seek(0)
        f.truncate()
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}) + "\n")
        f.flush()
        self._file = f
        RunLock._held[key] = self
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the last descriptor drops the flock
            self._file = None
        RunLock._held = {k: v for k, v in RunLock._held.items() if v is not self}

    @classmethod
    def release_all(cls) -> None:
        for lock in list(cls._held.values()):
            lock.release()


def _describe_holder(body: str) -> str:
    try:
        holder = json.loads(body)
        return f"host {holder['host']}, PID {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):  # the holder has not written its details yet
        return "holder details not written yet"


class RunFile:
    """A file or folder at the top of a run directory: ``RunDir(root).name`` is ``root / filename``."""

    def __init__(self, filename: str):
        self.filename = filename

    def __get__(self, run_dir: RunDir | None, owner=None):
        return self if run_dir is None else run_dir.root / self.filename


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def lock(self) -> RunLock:
        """Hold the run directory for this run, or raise RunLocked naming the live run that holds it."""
        return RunLock(self.root).acquire()

    # -- stage keys of state.json -----------------------------------------------------------
    INITIAL = "initial"  # eval label of θ_0
    FINAL = "final"  # LSP: the run has saved its final model

    @staticmethod
    def stage_iteration(t: int) -> str:
        """Iteration t is done (θ_{t+1} saved and evaluated); also θ_{t+1}'s eval label."""
        return f"iter{t}"

    @staticmethod
    def stage_generate(t: int, name: str = "generated") -> str:
        """Set ``name`` ("generated", T-SPIN's "proto") of iteration t is sampled."""
        return f"iter{t}/{name}"

    @staticmethod
    def stage_team(t: int, j: int) -> str:
        """TPAW round t: player θ_j's log-probs are cached."""
        return f"iter{t}/team{j}"

    @staticmethod
    def lsp_step_label(step: int) -> str:
        """LSP: the stage of a checkpointed step, and the eval label of the policy after it."""
        return f"step{step}"

    @staticmethod
    def parse_step_label(label: str) -> int:
        """The step of an ``lsp_step_label``; ValueError for any other label."""
        if not (label.startswith("step") and label[4:].isdigit()):
            raise ValueError(f"{label!r} is not an LSP step label (step<N>)")
        return int(label[4:])

    # -- files of the run ---------------------------------------------------------------------
    state_path = RunFile("state.json")
    metrics_path = RunFile("metrics.jsonl")
    config_path = RunFile("config.yaml")
    tensorboard = RunFile("tb")
    results = RunFile("results.md")
    plot = RunFile("plot.png")
    report_page = RunFile("report.html")

    def eval_file(self, label: str) -> Path:
        """Held-out scores of the model ``label`` (INITIAL, ``stage_iteration(t)``, ``lsp_step_label(k)``)."""
        return self.root / "eval" / f"{label}.json"

    def eval_answers(self, label: str) -> Path:
        """The model ``label``'s greedy answers to the first ``eval.sample_prompts`` held-out prompts."""
        return self.root / "eval" / f"{label}.answers.jsonl"

    def eval_steps(self) -> list[tuple[int, Path]]:
        """LSP: (step, eval file) of every evaluated step, by step."""
        found = [(self.parse_step_label(p.stem), p) for p in (self.root / "eval").glob("step*.json")
                 if p.stem[4:].isdigit()]
        return sorted(found)

    def checkpoints(self, t: int | None = None) -> Path:
        """The training loop's resumable checkpoints: iteration t's (``train(folder=iteration(t))``), or
        LSP's for the whole run (t None)."""
        return (self.root if t is None else self.iteration(t)) / "checkpoints"

    # -- iteration folders ----------------------------------------------------------------------
    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t:03d}"

    def model(self, t: int) -> Path:
        """θ_{t+1}: the model that iteration t trains."""
        return self.iteration(t) / "model"

    def generated(self, t: int, name: str = "generated") -> Path:
        """Set ``name`` of iteration t: one sampled response per training prompt."""
        return self.iteration(t) / f"{name}.jsonl"

    def generation_chunks(self, t: int, name: str = "generated") -> Path:
        return self.iteration(t) / f"{name}.chunks"

    def generated_source(self, t: int, name: str) -> Path:
        """Which checkpoint sampled set ``name`` (T-SPIN's proto set), for the record."""
        return self.iteration(t) / f"{name}.source.json"

    def opponent_logp_chunks(self, t: int) -> Path:
        """SPIN: θ_t's log-probs of iteration t's real and generated responses, batch by batch."""
        return self.iteration(t) / "opponent_logps.chunks"

    def pairs(self, t: int) -> Path:
        return self.iteration(t) / "pairs.jsonl"

    def triplets(self, t: int) -> Path:
        return self.iteration(t) / "triplets.jsonl"

    def team(self, t: int) -> Path:
        """TPAW round t: who played and how the rows were scored."""
        return self.iteration(t) / "team.json"

    def team_logps(self, t: int, j: int) -> Path:
        """TPAW round t: player θ_j's log-probs (with the cache key they were computed under)."""
        return self.iteration(t) / f"team_theta{j}.json"

    def team_logp_chunks(self, t: int, j: int) -> Path:
        return self.iteration(t) / f"team_theta{j}.chunks"

    def chunk_folders(self, t: int) -> list[Path]:
        """Every chunk store of iteration t (dropped once the iteration is done)."""
        return sorted(self.iteration(t).glob("*.chunks"))

    # -- LSP's run-level files ----------------------------------------------------------------
    samples = RunFile("samples.jsonl")

    def step_model(self, step: int) -> Path:
        """LSP with lsp.keep_models: the policy after ``step``."""
        return self.root / "models" / self.lsp_step_label(step)

    def step_models(self) -> list[tuple[int, Path]]:
        """LSP with lsp.keep_models: (step, saved policy) of every kept step, by step."""
        found = [(self.parse_step_label(p.name), p) for p in (self.root / "models").glob("step*")
                 if p.name[4:].isdigit()]
        return sorted(found)

    final_model = RunFile("model")  # LSP: the policy after the last step

    # -- exported answers -----------------------------------------------------------------------
    def export(self, fmt: str) -> Path:
        """``sparring export``'s answer files of every model in benchmark format ``fmt`` (default folder)."""
        return self.root / "export" / fmt

    # -- state.json ---------------------------------------------------------------------------
    def load_state(self) -> dict[str, Any]:
        if self.state_path.exists():
            return json.loads(self.state_path.read_text())
        return {"stages": {}}

    def is_done(self, stage: str) -> bool:
        return stage in self.load_state()["stages"]

    def mark_done(self, stage: str, info: dict[str, Any] | None = None) -> None:
        state = self.load_state()
        state["stages"][stage] = info or {}
        atomic_write_json(self.state_path, state)

    def stage_info(self, stage: str) -> dict[str, Any] | None:
        return self.load_state()["stages"].get(stage)

    def start(self, cfg: RunConfig, *, force: bool = False) -> bool:
        """Create or reopen the run. Refuses a changed result-affecting setting unless ``force``.

        Returns True when an existing run is being resumed.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        state = self.load_state()
        current = fingerprint(cfg)
        resumed = "fingerprint" in state
        if resumed and state.get("method") != cfg.method:
            raise ConfigError(f"{self.root} holds a {state.get('method')} run; this config is method {cfg.method}")
        changed = changed_settings(state["fingerprint"], current) if resumed else []
        if changed:
            old = state["fingerprint"]
            lines = [f"  {k}: {old.get(k, '(not set)')!r} -> {current.get(k, '(removed)')!r}" for k in changed[:20]]
            if not force:
                raise ConfigError(
                    f"{self.root} was started with different settings that change results:\n"
                    + "\n".join(lines)
                    + "\nuse a new output_dir, restore the settings, or pass --force to continue anyway"
                )
            state.setdefault("forced_changes", []).append(changed)
        state["fingerprint"] = current
        state["method"] = cfg.method
        atomic_write_json(self.state_path, state)
        atomic_write_text(self.config_path, dump_yaml(cfg))
        return resumed
