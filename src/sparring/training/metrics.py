"""metrics.jsonl + the run's trackers (TensorBoard by default, ``training.trackers``). Rows after a
resume point are dropped, so reruns never duplicate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sparring.state import atomic_write_text
from sparring.training.trackers import scalars


class MetricsLogger:
    """Rows to ``path`` (the source of reports); rows logged with a step also go to ``trackers``
    (a ``training.trackers.Trackers``, or None: metrics.jsonl only)."""

    def __init__(self, path: Path, trackers=None, enabled: bool = True):
        self.path, self.trackers, self.enabled = path, trackers, enabled

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                continue
        return rows

    def drop(self, where: Callable[[dict], bool]) -> None:
        """Remove rows matching ``where`` (used before redoing work that a kill interrupted)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.rows() if not where(r)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def open_trackers(self, purge_step: int | None = None) -> None:
        """Start the trackers (once per session): TensorBoard drops its events from ``purge_step`` on."""
        if self.enabled and self.trackers is not None:
            self.trackers.start(purge_step)

    def log(self, row: dict, *, step: int | None = None, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None and step is not None:
            self.trackers.log(scalars(row, prefix), step)

    def close(self) -> None:
        """The end of a logging phase (a training phase, LSP's loop): what the trackers hold is written;
        they stay open for the run's next phase."""
        if self.enabled and self.trackers is not None:
            self.trackers.flush()

    def finish(self) -> None:
        """The end of the run: the trackers end (``accelerator.end_training``; every process calls this)."""
        if self.trackers is not None:
            self.trackers.end()
