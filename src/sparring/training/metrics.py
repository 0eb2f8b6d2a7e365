"""metrics.jsonl + TensorBoard. Rows after a resume point are dropped, so reruns never duplicate."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sparring.state import atomic_write_text


class MetricsLogger:
    def __init__(self, path: Path, tb_dir: Path | None = None, enabled: bool = True):
        self.path, self.tb_dir, self.enabled = path, tb_dir, enabled
        self._writer = None

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

    def open_tensorboard(self, purge_step: int | None = None) -> None:
        if not self.enabled or self.tb_dir is None:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.close()
        self._writer = SummaryWriter(str(self.tb_dir), purge_step=purge_step)

    def log(self, row: dict, *, step: int | None = None, prefix: str = "train") -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._writer is not None and step is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key not in ("step", "global_step", "iteration"):
                    self._writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
