"""The plateau experiment's section of docs/RESULTS.md: tables over seeds, paired intervals, diagnosis."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from sparring.evaluation.metrics import paired_bootstrap, seed_spread
from sparring.evaluation.sampled import PromptScores

START, END = "<!-- plateau:start -->", "<!-- plateau:end -->"
METRICS = ("exact_match", "pass@1", "logps_real_per_token")
NAMES = {"exact_match": "greedy exact match", "pass@1": "sampled pass@1", "logps_real_per_token": "real log-prob/token"}


def variant_arms_note(cfg) -> list[str]:
    """A sentence on the variant arms in ``cfg.arms`` (none: nothing), for a report's setup."""
    if "spin_nll" not in cfg.arms:
        return []
    return [f"Arm spin_nll is SPIN's preset plus spin.nll_coef = {cfg.spin_nll_coef:g}: loss = SPIN's + "
            f"{cfg.spin_nll_coef:g} · per-token NLL of the real y (RPO-style, TRL's rpo_alpha; an extension, "
            "not SPIN's method); its loss column includes that term, shown alone as nll/real.", ""]


def curve_keys(cfg) -> tuple[str, ...]:
    """Training-curve metrics of the diagnosis tables after the loss: nll/real when spin_nll runs."""
    return ("logps/real", "logps/generated", "rewards/margins", "rewards/accuracies",
            *(("nll/real",) if "spin_nll" in cfg.arms else ()))


def scores(path: Path) -> PromptScores:
    return PromptScores(**json.loads(path.read_text()))


def mean_over_seeds(per_seed: list[PromptScores], metric: str) -> list[float]:
    """Per-prompt metric averaged over seeds: the unit the paired bootstrap resamples."""
    columns = [s.per_prompt(metric) for s in per_seed]
    return [sum(v) / len(v) for v in zip(*columns)]


def last_epoch_metrics(run: Path, iterations: int) -> list[dict]:
    """Per iteration: the mean of the last epoch's train rows (margins, log-probs), and stage info."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] if (
        run / "metrics.jsonl").exists() else []
    state = json.loads((run / "state.json").read_text())["stages"] if (run / "state.json").exists() else {}
    out = []
    for t in range(iterations):
        train = [r for r in rows if r.get("kind") == "train" and r.get("iteration") == t]
        last = [r for r in train if r["epoch"] > train[-1]["epoch"] - 1] if train else []
        summary = {}
        for key in ("logps/real", "logps/generated", "rewards/margins", "rewards/accuracies", "loss", "nll/real"):
            values = [r[key] for r in last if key in r and r[key] == r[key]]
            if values:
                summary[key] = sum(values) / len(values)
        info = state.get(f"iter{t}", {})
        gen = state.get(f"iter{t}/generated", {})
        summary["steps"] = info.get("steps") or sum(1 for r in train)
        if "pairs_generated_equals_real_frac" in info:
            summary["y′ = y"] = info["pairs_generated_equals_real_frac"]
        if gen.get("rows"):
            summary["truncated"] = gen.get("truncated", 0) / gen["rows"]
        out.append(summary)
    return out


def fmt(mean: float, std: float | None) -> str:
    """mean ± std; the mean alone when there is no spread to show (one seed: std None)."""
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


def over_seeds(seeds: list) -> str:
    """The table caption's statistic: "mean ± std over n seeds", or "one seed" (no spread)."""
    return f"mean ± std over {len(seeds)} seeds" if len(seeds) > 1 else "one seed (no spread)"


def write_plateau_report(cfg, root: Path, theta0: Path, chosen: dict, final: list, *, wall_seconds: float,
                         command: str) -> Path:
    from sparring.experiments.plateau import Job, checkpoints, run_dir, validation_score

    base = scores(root / "test" / "theta0.json")
    arms = {a: [j for j in final if j.arm == a] for a in cfg.arms}
    per = {a: {t: [scores(run_dir(root, j) / "test" / f"theta{t}.json") for j in jobs]
               for t, _ in checkpoints(root, jobs[0], cfg.iterations)} for a, jobs in arms.items()}
    k = cfg.eval_k
    lines = [START, "## Limited-data plateau (SPIN, T-SPIN, TPAW vs continued SFT)", ""]
    fitted = (f"{cfg.subset} of {cfg.pool} examples" if cfg.theta0_data == "subset" else
              f"all {cfg.pool} examples (the arms' {cfg.subset} prompts among them, as SPIN's SFT model had seen "
              "the prompts SPIN then used)")
    lines += [
        f"**Question (fixed before running).** From θ0 = SFT on {fitted}, early-stopped on a validation split, "
        f"does SPIN, T-SPIN or TPAW on {cfg.subset} examples raise held-out test accuracy beyond θ0 and beyond "
        f"continued SFT on the same {cfg.subset} examples with SPIN's optimizer steps? Does T-SPIN on "
        f"{cfg.subset} match SFT on all {cfg.pool} (arm sft_all)?", "",
        f"**Setup.** Tasks {', '.join(cfg.families)} (one family per row in turn); validation {cfg.validation}, "
        f"test {cfg.test} prompts, disjoint. Model: the proving ground's character-level Llama "
        f"(hidden {cfg.hidden_size}, {cfg.layers} layers). θ0: SFT from scratch on the {'subset' if cfg.theta0_data == 'subset' else 'whole pool'} (AdamW lr {cfg.sft_lr:g}, batch "
        f"{cfg.sft_batch_size}, cosine over {cfg.sft_max_steps} steps), validation greedy exact match every "
        f"{cfg.sft_eval_every} steps, stopped after {cfg.sft_patience} evaluations without a new best, best "
        f"weights kept. Arms from θ0, {cfg.iterations} iterations, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"AdamW, linear schedule; learning rate per arm picked on VALIDATION (final iterate's greedy exact match, "
        f"seed {cfg.seeds[0]}) from its grid; then seeds {cfg.seeds}. Test metrics: greedy exact match, sampled "
        f"pass@1 and pass@{k} from k = {k} samples at T = {cfg.eval_temperature:g}, real response log-prob per "
        "token. Intervals: 95% paired bootstrap over test prompts of the seed-averaged per-prompt score.", "",
        *variant_arms_note(cfg),
    ]
    history = json.loads((theta0 / "sft_history.json").read_text())
    best = history["best"]
    curve = ", ".join(f"{h['step']}: {h['score']:.3f}" for h in history["history"])
    train = history["train"]
    lines += [f"θ0: validation exact match {best['score']:.3f} at step {best['step']} (SFT curve: {curve}). "
              f"On the arms' {cfg.subset} training prompts (which θ0 was fitted on): greedy {train['exact_match']:.3f}, sampled pass@1 "
              f"{train['pass@1']:.3f} (4 samples, T = 1).", ""]
    lines += ["**Learning rates (validation exact match of the final iterate, seed "
              f"{cfg.seeds[0]}).**", "", "| arm | lr: validation exact match | chosen |", "|---|---|---|"]
    for arm in cfg.arms:
        cells = ", ".join(f"{lr:g}: {validation_score(root, Job(arm, lr, cfg.seeds[0]), cfg.iterations):.3f}"
                          for lr in cfg.lr_grid[arm])
        lines.append(f"| {arm} | {cells} | {chosen[arm]:g} |")
    lines += ["", f"**Test split ({cfg.test} prompts), mean ± std over {len(cfg.seeds)} seeds.** θ0: "
              + ", ".join(f"{NAMES[m]} {base.summary()[m]:.3f}" for m in METRICS)
              + f", pass@{k} {base.summary()[f'pass@{k}']:.3f}.", ""]
    lines += ["| arm | iterate | " + " | ".join(NAMES[m] for m in METRICS) + f" | pass@{k} |",
              "|---|---|" + "---|" * (len(METRICS) + 1)]
    for arm, by_t in per.items():
        for t, runs in by_t.items():
            cells = [fmt(*seed_spread([r.summary()[m] for r in runs])) for m in (*METRICS, f"pass@{k}")]
            lines.append(f"| {arm} (lr {chosen[arm]:g}) | θ{t} | " + " | ".join(cells) + " |")
    lines += ["", "**Final iterate vs θ0 and vs the control (continued SFT), paired over test prompts.** "
              "Difference of means [95% CI].", "",
              "| arm | metric | vs θ0 | vs sft | verdict |", "|---|---|---|---|---|"]
    last = cfg.iterations
    for arm in cfg.arms:
        for m in ("exact_match", "pass@1"):
            mine = mean_over_seeds(per[arm][last], m)
            d0 = paired_bootstrap(mine, base.per_prompt(m))
            ds = paired_bootstrap(mine, mean_over_seeds(per["sft"][last], m)) if "sft" in per and arm != "sft" else None
            beats = d0[1] > 0 and (ds is None or ds[1] > 0)
            verdict = "better than θ0 and the control" if beats and ds else (
                "better than θ0" if d0[1] > 0 else ("worse than θ0" if d0[2] < 0 else "no difference from θ0"))
            vs_s = f"{ds[0]:+.3f} [{ds[1]:+.3f}, {ds[2]:+.3f}]" if ds else "–"
            lines.append(f"| {arm} | {NAMES[m]} | {d0[0]:+.3f} [{d0[1]:+.3f}, {d0[2]:+.3f}] | {vs_s} | {verdict} |")
    lines += ["", "**Diagnosis: training curves per iteration (seed "
              f"{cfg.seeds[0]}, means over the last epoch; y′ = y: pairs with no gradient; truncated: y′ cut at "
              "max_new_tokens).**", "", "| arm | iteration | steps | loss | logps/real | logps/generated | margins | "
              "reward acc. | " + "".join(f"{k} | " for k in curve_keys(cfg)[4:]) + "y′ = y | truncated |",
              "|---|---|---|" + "---|" * (len(curve_keys(cfg)) + 3)]
    for arm, jobs in arms.items():
        for t, row in enumerate(last_epoch_metrics(run_dir(root, jobs[0]), cfg.iterations)):
            cells = [row.get(key) for key in ("loss", *curve_keys(cfg), "y′ = y", "truncated")]
            text = " | ".join("–" if c is None else f"{c:.3f}" for c in cells)
            lines.append(f"| {arm} | {t} | {row['steps']} | {text} |")
    plot_path = Path(cfg.plot)
    plot(cfg, base, per, chosen, plot_path)
    date = datetime.date.today().isoformat()
    lines += ["", f"![plateau]({os.path.relpath(plot_path, Path(cfg.report).parent)})", "",
              f"Command: `{command}`; "
              f"machine: {platform.machine()} CPU, 2 cores, 1 torch thread per worker, {cfg.workers} workers; "
              f"date {date}; wall time {wall_seconds / 60:.1f} min. Every run is kept under `{cfg.output_dir}`.",
              END]
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    text = report.read_text() if report.exists() else "# Results\n\nWhat each method does on proving grounds built to test its paper's claim.\n"
    section = "\n".join(lines)
    if START in text and END in text:
        text = text[: text.index(START)] + section + text[text.index(END) + len(END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    report.write_text(text)
    (Path(cfg.output_dir) / "summary.json").write_text(json.dumps(
        {arm: {t: {m: seed_spread([r.summary()[m] for r in runs]) for m in (*METRICS, f"pass@{k}")}
               for t, runs in by_t.items()} for arm, by_t in per.items()}, indent=1))
    print(section)
    return report


def plot(cfg, base: PromptScores, per: dict, chosen: dict, path: Path) -> None:
    fig, axes = new_figure(3, (14, 4))
    for ax, m in zip(axes, METRICS):
        for arm, by_t in per.items():
            by_t_values = {t: [r.summary()[m] for r in runs] for t, runs in by_t.items()}
            seed_curve(ax, base.summary()[m], by_t_values, f"{arm} (lr {chosen[arm]:g})")
        ax.set_title(NAMES[m])
        ax.set_xlabel("iterate θt")
        ax.set_xticks(range(cfg.iterations + 1))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    save_figure(fig, path, f"Limited-data plateau: test split ({cfg.test} prompts), mean ± std over {len(cfg.seeds)} seeds")


def new_figure(panels: int, size: tuple[float, float]):
    """(figure, axes): ``panels`` plots side by side, drawn off-screen (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, panels, figsize=size)


def save_figure(fig, path: Path, title: str) -> None:
    """The figure with its ``title``, written to ``path`` (its folder made) and closed."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def seed_curve(ax, start: float, by_x: dict[int, list[float]], label: str) -> None:
    """θ0's ``start`` at x = 0, then at every x of ``by_x`` (x → one value per seed) the mean ± std over
    seeds, as one line with error bars."""
    stats = [(start, 0.0)] + [seed_spread(values) for values in by_x.values()]
    ax.errorbar([0, *by_x], [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3, label=label)
