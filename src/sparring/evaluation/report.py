"""The report of a run directory, for every method: ``results.md``, ``plot.png`` and ``report.html``.

``results.md`` holds one table row per model — θ0, then θ_{t+1} after each SPIN / T-SPIN / TPAW
iteration t, or the policy after each evaluated LSP step — and a short samples section: a few rows
the run generated (prompt, real y and generated y′ of the newest iteration, or LSP's newest
challenger queries with the solver's answers and rewards). ``plot.png`` shows held-out accuracy and
the training signal (reward margin, or LSP's mean task reward) against the same axis. ``report.html``
(``evaluation.html``) is the page of the whole run: every logged curve, the table, and the sample
prompts answered by every model side by side.

Runs write it at their end; ``sparring report RUN_DIR`` rewrites it from the run directory alone
(``write_report`` with the run's saved config). Every path comes from ``RunDir``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparring.config import RunConfig
from sparring.evaluation.lm_eval import PREFIX as LM_EVAL_PREFIX
from sparring.state import RunDir, atomic_write_text, read_jsonl

SAMPLES = 3  # rows shown in the samples section
TEXT_CHARS = 200  # each shown text is cut to this many characters

# (row key, column header, format); a column no row has is left out. ``columns`` puts the held-out
# verifier's metric (``exact_match`` for the proving ground, ``reward`` for a user function) after the model.
SPIN_COLUMNS = [
    ("model", "model", "{}"),
    ("logps_real_per_token", "real log-prob/token", "{:.4f}"),
    ("rewards/margins", "train margin (last epoch)", "{:.4f}"),
    ("rewards/accuracies", "train reward acc.", "{:.3f}"),
]
LSP_COLUMNS = [
    ("step", "step", "{}"),
    ("logps_real_per_token", "real log-prob/token", "{:.4f}"),
    ("train_reward", "mean task reward since last eval", "{:.3f}"),
]


def columns(base: list[tuple[str, str, str]], metric: str | None, rows: list[dict] = ()) -> list[tuple[str, str, str]]:
    """``base`` with the held-out verifier's ``metric`` (if any) as the second column, then one column per
    lm-evaluation-harness score of ``rows`` (``lm_eval/<task>/<metric>``, in the order they first appear)."""
    held = [(metric, held_out_label(metric), "{:.3f}")] if metric else []
    return base[:1] + held + lm_eval_columns(rows) + base[1:]


def lm_eval_columns(rows: list[dict]) -> list[tuple[str, str, str]]:
    keys = dict.fromkeys(k for r in rows for k in r if k.startswith(LM_EVAL_PREFIX))
    return [(k, "lm-eval " + k[len(LM_EVAL_PREFIX):].replace("/", " "), "{:.3f}") for k in keys]


def held_out_label(metric: str) -> str:
    return f"held-out {metric.replace('_', ' ')}"


def write_report(run_dir: RunDir, cfg: RunConfig, *, main: bool = True) -> list[dict]:
    """The table rows of the run; the main process also writes results.md and plot.png and prints the table."""
    lsp = cfg.method == "lsp"
    # An iterative method's section names its iterations; a method without one (sft) runs one.
    iterations = getattr(getattr(cfg, cfg.method, None), "iterations", 1)
    rows = lsp_rows(run_dir) if lsp else collect(run_dir, iterations)
    if main:
        from sparring.rewards.registry import metric_of

        metric = metric_of(cfg.eval.verifier)
        cols = columns(LSP_COLUMNS if lsp else SPIN_COLUMNS, metric, rows)
        text = table(rows, cols)
        samples = lsp_samples(run_dir) if lsp else pair_samples(run_dir, iterations)
        atomic_write_text(run_dir.results, text + "\n" + (f"\n{samples}\n" if samples else ""))
        title = f"LSP ({cfg.lsp.variant})" if lsp else (f"{cfg.method} on {Path(cfg.data.source).name}" if cfg.data.source else cfg.method)
        plot(rows, run_dir.plot, title=title, lsp=lsp, metric=metric)
        from sparring.evaluation.html import write_page

        write_page(run_dir, cfg, rows, cols, title=title)
        print(text)
        print(f"plot: {run_dir.plot}")
        print(f"report page: {run_dir.report_page}")
    return rows


# -- rows -------------------------------------------------------------------------------------------
def collect(run_dir: RunDir, iterations: int) -> list[dict]:
    """SPIN family: one row per model, the initial one, then θ_1 … θ_T (as far as the run got)."""
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


def lsp_rows(run_dir: RunDir) -> list[dict]:
    """LSP: one row per evaluated step, with the mean task reward of the steps since the previous one."""
    train = [r for r in _metrics(run_dir) if r.get("kind") == "lsp"]
    rows, previous = [], 0
    for step, path in run_dir.eval_steps():
        e = json.loads(path.read_text())
        window = [r["lsp/reward"] for r in train if previous < r["step"] <= step]
        rows.append({**e, "step": step, "train_reward": sum(window) / len(window) if window else None})
        previous = step
    return rows


def _metrics(run_dir: RunDir) -> list[dict]:
    from sparring.training.metrics import MetricsLogger

    return MetricsLogger(run_dir.metrics_path).rows()


# -- table and samples ------------------------------------------------------------------------------
def table(rows: list[dict], columns: list[tuple[str, str, str]] = SPIN_COLUMNS) -> str:
    """A markdown table of ``cells``."""
    headers, body = cells(rows, columns)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(line) + " |" for line in body])


def cells(rows: list[dict], columns: list[tuple[str, str, str]]) -> tuple[list[str], list[list[str]]]:
    """(headers, formatted cells per row) of the columns some row has; a missing (or None) value shows as –."""
    cols = [c for c in columns if any(r.get(c[0]) is not None for r in rows)]
    return [c[1] for c in cols], [[c[2].format(r[c[0]]) if r.get(c[0]) is not None else "–" for c in cols] for r in rows]


def pair_samples(run_dir: RunDir, iterations: int, n: int = SAMPLES) -> str:
    """The first ``n`` prompts of the newest iteration's generated set: prompt, real y, generated y′."""
    for t in reversed(range(iterations)):
        path = run_dir.generated(t)
        if path.exists():
            rows = read_jsonl(path)
            break
    else:
        return ""
    lines = [f"## Samples\n\nIteration {t} (y′ sampled by θ{t}), the first {min(n, len(rows))} of {len(rows)} prompts:\n"]
    for k, r in enumerate(rows[:n], 1):
        cut = "" if r.get("finished", True) else " (truncated)"
        lines += [f"{k}. prompt: {_prompt(r['prompt'])}", f"   - real y: {_short(r['real'])}",
                  f"   - generated y′: {_short(r['text'])}{cut}"]
    return "\n".join(lines)


def lsp_samples(run_dir: RunDir, n: int = SAMPLES) -> str:
    """The first ``n`` challenger queries of the newest sampled LSP step, each answer with its reward."""
    rows = read_jsonl(run_dir.samples) if run_dir.samples.exists() else []
    if not rows:
        return ""
    step = max(r["step"] for r in rows)
    rows = [r for r in rows if r["step"] == step]
    lines = [f"## Samples\n\nStep {step}, the first {min(n, len(rows))} of {len(rows)} challenger queries:\n"]
    for k, r in enumerate(rows[:n], 1):
        lines.append(f"{k}. query: {_short(r['query'])}")
        lines += [f"   - reward {reward:.3f}: {_short(answer)}" for answer, reward in zip(r["answers"], r["rewards"])]
    return "\n".join(lines)


def _prompt(prompt) -> str:
    if isinstance(prompt, str):
        return _short(prompt)
    return _short(" / ".join(f"{m['role']}: {m['content']}" for m in prompt))


def _short(text: str) -> str:
    """One line, at most TEXT_CHARS characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= TEXT_CHARS else flat[: TEXT_CHARS - 1] + "…"


# -- plot -------------------------------------------------------------------------------------------
def plot(rows: list[dict], path: Path, title: str = "", *, lsp: bool = False, metric: str | None = "exact_match") -> None:
    """The held-out verifier's ``metric`` (or, without one, the real log-prob per token) and the training
    signal against θ_t or the LSP step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    if lsp:
        xs, signal = [r["step"] for r in rows], "train_reward"
        xlabels = ("LSP step", "LSP step")
        signal_label = "mean task reward R since the previous evaluation"
    else:
        xs, signal = [0 if r["iteration"] is None else r["iteration"] + 1 for r in rows], "rewards/margins"
        xlabels = ("model θ_t (0 = initial)", "model θ_t (trained in iteration t−1)")
        signal_label = "train reward margin (last epoch mean)"
    key = metric if metric and any(metric in r for r in rows) else "logps_real_per_token"
    axes[0].plot(xs, [r.get(key, float("nan")) for r in rows], marker="o")
    axes[0].set(xlabel=xlabels[0], ylabel=held_out_label(key) if key == metric else "real log-prob per token")
    points = [(x, r[signal]) for x, r in zip(xs, rows) if r.get(signal) is not None]
    if points:
        axes[1].plot([x for x, _ in points], [m for _, m in points], marker="o", color="C1")
    axes[1].set(xlabel=xlabels[1], ylabel=signal_label)
    for ax in axes:
        ax.grid(alpha=0.3)
        if not lsp:
            ax.set_xticks(xs)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
