"""The per-iteration results table and plot of a run directory."""

from __future__ import annotations

import json
from pathlib import Path

from sparring.state import RunDir


def collect(run_dir: RunDir, iterations: int) -> list[dict]:
    """One row per model: the initial one, then θ_1 … θ_T (as far as the run got)."""
    train_rows = [r for r in _metrics(run_dir) if r.get("kind") == "train"]
    rows = []
    for label, t in [(run_dir.INITIAL, None)] + [(run_dir.stage_iteration(t), t) for t in range(iterations)]:
        path = run_dir.eval_file(label)
        if not path.exists():
            continue
        row = {"model": "θ0 (initial)" if t is None else f"θ{t + 1} (after iteration {t})", "iteration": t}
        row.update(json.loads(path.read_text()))
        mine = [r for r in train_rows if r.get("iteration") == t]
        if mine:
            last_epoch = [r for r in mine if r["epoch"] > mine[-1]["epoch"] - 1] or mine
            for key in ("rewards/margins", "rewards/accuracies", "loss"):
                values = [r[key] for r in last_epoch if key in r and r[key] == r[key]]  # NaN: not measured
                if values:
                    row[key] = sum(values) / len(values)
        rows.append(row)
    return rows


def _metrics(run_dir: RunDir) -> list[dict]:
    from sparring.training.metrics import MetricsLogger

    return MetricsLogger(run_dir.metrics_path).rows()


def table(rows: list[dict]) -> str:
    cols = [
        ("model", "model", "{}"),
        ("exact_match", "held-out exact match", "{:.3f}"),
        ("logps_real_per_token", "real log-prob/token", "{:.4f}"),
        ("rewards/margins", "train margin (last epoch)", "{:.4f}"),
        ("rewards/accuracies", "train reward acc.", "{:.3f}"),
    ]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(c[2].format(r[c[0]]) if c[0] in r else "–" for c in cols) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    xs = [0 if r["iteration"] is None else r["iteration"] + 1 for r in rows]
    key = "exact_match" if any("exact_match" in r for r in rows) else "logps_real_per_token"
    axes[0].plot(xs, [r.get(key, float("nan")) for r in rows], marker="o")
    axes[0].set_xlabel("model θ_t (0 = initial)")
    axes[0].set_ylabel("held-out exact match" if key == "exact_match" else "real log-prob per token")
    axes[0].grid(alpha=0.3)
    margin_rows = [(x, r["rewards/margins"]) for x, r in zip(xs, rows) if "rewards/margins" in r]
    if margin_rows:
        axes[1].plot([x for x, _ in margin_rows], [m for _, m in margin_rows], marker="o", color="C1")
    axes[1].set_xlabel("model θ_t (trained in iteration t−1)")
    axes[1].set_ylabel("train reward margin (last epoch mean)")
    axes[1].grid(alpha=0.3)
    for ax in axes:
        ax.set_xticks(xs)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
