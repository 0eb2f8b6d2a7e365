"""The known-distribution proving ground: does SPIN move a model's answer distribution toward p_data?

Question, fixed before running: SPIN's fixed point is π_θ = p_data (Chen et al., Theorem 5.2). On
prompts with many valid answers and an exactly known target (uniform over the valid answers;
``sparring.tasks.distributions``), does SPIN lower the total-variation distance of θ's answer
distribution at T = 1 to the target below θ0's and below continued SFT's (the control), and does
it land beyond θ0's own temperature frontier? T-SPIN is the contrast: its reference-free minimiser is
π ∝ (p_data/π_t)^{1/α} (spec/tspin.md §4 item 19), SPIN's π ∝ π_t·(p_data/π_t)^{1/λ} (item 9).

Stages, each resumable (files under ``output_dir``):

1. data: training (``subset``, the name plateau's helpers read), validation and test prompts,
   disjoint, one response per prompt drawn uniformly from its valid answers (= p_data);
2. θ0: the tiny Llama, SFT from scratch on the training prompts, early-stopped on the validation
   split's mean exact TV at T = 1 (the quantity asked about; exact, so free of sampling noise);
3. learning rates: every arm at every rate of its grid with the first seed; the rate whose final
   iterate has the lowest validation exact TV at T = 1 is kept (ties: the smaller rate);
4. seeds: every arm at its rate with every seed;
5. test: θ0 at every temperature of ``temperatures`` (its frontier) and every iterate of those runs
   at T = 1, exact (enumerated) and sampled (``samples`` per prompt) metrics per prompt;
6. report: a section of ``report`` between ``<!-- distribution:start -->`` and
   ``<!-- distribution:end -->``, a plot, and ``summary.json`` in ``output_dir``.

The runs reuse the plateau experiment's machinery (``Job``, ``method_args``, ``run_sft_arm``,
``run_job``, ``parallel``, ``run_dir``): the method arms run their presets through ``sparring run``;
the control is continued SFT with SPIN's optimizer steps per iteration.

    sparring experiment configs/experiments/distribution.yaml
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sparring.config import ConfigError, ModelConfig, from_dict
from sparring.experiments.common import (
    TinyGround,
    add_wall_time,
    fit_theta0,
    open_experiment,
    open_model,
    read_config,
    tiny_sft,
)
from sparring.experiments.plateau import METHODS, Job, checkpoints, finished, load_set, parallel, run_dir, run_job

ARMS = ("sft", "spin", "tspin", "tpaw", "spin_nll")  # spin_nll: see plateau.arm_overrides
# The fields θ0 and its data are built from: a θ0 on disk built from other values is refused.
THETA0_FIELDS = ("families", "max_start", "widths", "letter_widths", "digit_widths", "word_lengths", "subset", "validation", "test", "data_seed", "hidden_size", "layers", "heads", "sft_lr", "sft_batch_size", "sft_max_steps", "sft_eval_every", "sft_patience", "max_new_tokens")


@dataclass
class DistributionConfig(TinyGround):
    experiment: str = "distribution"
    output_dir: str = "runs/experiments/distribution"
    plot: str = "docs/results/distribution.png"
    families: list[str] = field(default_factory=lambda: ["number_range", "letter_digit"])
    max_start: int = 199  # number_range: the range starts in 0..max_start
    widths: list[int] = field(default_factory=lambda: [4, 20])  # number_range: b − a + 1 in this range
    letter_widths: list[int] = field(default_factory=lambda: [2, 5])  # letter_digit: letters in the range
    digit_widths: list[int] = field(default_factory=lambda: [2, 4])  # letter_digit: digits in the range
    word_lengths: list[int] = field(default_factory=lambda: [3, 4])  # shuffle: distinct letters per word
    subset: int = 1000  # training prompts: θ0's SFT data and every arm's
    validation: int = 200
    test: int = 500
    sft_batch_size: int = 32
    sft_max_steps: int = 1000
    sft_patience: int = 3
    iterations: int = 2
    arms: list[str] = field(default_factory=lambda: ["sft", "spin", "tspin"])
    presets: dict[str, str] = field(default_factory=lambda: {m: f"configs/{m}/tiny.yaml" for m in METHODS})
    lr_grid: dict[str, list[float]] = field(default_factory=lambda: {a: [1e-4, 1e-3] for a in ARMS})
    spin_nll_coef: float = 1.0  # arm spin_nll: SPIN + this · per-token NLL of y (RPO-style, not the paper's)
    epochs: int = 1
    batch_size: int = 32
    samples: int = 64  # sampled responses per held-out prompt …
    sample_prompts: int = 100  # … on this many test prompts (the first ones); exact metrics use all
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2])
    eval_batch_size: int = 512


def load(path: str | Path, overrides: list[str] | None = None) -> DistributionConfig:
    cfg = read_config(DistributionConfig, path, overrides, name="distribution", arms=ARMS, default="distribution")
    if "sft" not in cfg.arms:
        raise ConfigError("the arms must include the control 'sft'")
    if 1.0 not in cfg.temperatures:
        raise ConfigError("temperatures must include 1.0 (θ0's point on its own frontier)")
    return cfg


def shape(cfg: DistributionConfig) -> dict:
    """``tasks.distributions.make_query``'s keywords from the config."""
    return {"max_start": cfg.max_start, "widths": tuple(cfg.widths), "letter_widths": tuple(cfg.letter_widths),
            "digit_widths": tuple(cfg.digit_widths), "word_lengths": tuple(cfg.word_lengths)}


# 1. data ------------------------------------------------------------------------------------------


def write_data(cfg: DistributionConfig, root: Path) -> dict[str, Path]:
    from sparring.state import write_jsonl
    from sparring.tasks.distributions import make_rows

    paths = {name: root / "data" / f"{name}.jsonl" for name in ("subset", "validation", "test")}
    if not all(p.exists() for p in paths.values()):
        rows = make_rows(cfg.subset + cfg.validation + cfg.test, cfg.data_seed, tuple(cfg.families), **shape(cfg))
        write_jsonl(paths["test"], rows[cfg.subset + cfg.validation :])
        write_jsonl(paths["validation"], rows[cfg.subset : cfg.subset + cfg.validation])
        write_jsonl(paths["subset"], rows[: cfg.subset])
    return paths


# 2. θ0 ---------------------------------------------------------------------------------------------


def exact_at_1(model, tokenizer, data, cfg: DistributionConfig):
    """Exact per-prompt metrics of ``model`` at T = 1 (no sampling)."""
    from sparring.evaluation.distribution import score_distribution

    return score_distribution(model, tokenizer, data, temperatures=[1.0], n=0, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.eval_batch_size)[1.0]


def real_answer_share(model, tokenizer, data) -> float:
    """Mean over prompts of p̃(y) · |S|, p̃ the model's distribution renormalised on S and y the row's
    own response: 1 when the model ignores which answer it was trained on, |S| when it memorised it."""
    from sparring.evaluation.distribution import support_ids, support_probs, supports_of

    supports = supports_of(data)
    probs = support_probs(model, tokenizer, data, support_ids(tokenizer, data, supports), [1.0])[1.0]
    shares = [p[s.index(e.real)] / max(sum(p), 1e-300) * len(s) for p, s, e in zip(probs, supports, data.examples)]
    return sum(shares) / len(shares)


def build_theta0(cfg: DistributionConfig, paths: dict[str, Path], root: Path) -> Path:
    """SFT from scratch on the training prompts, early-stopped on validation mean exact TV at T = 1."""
    from sparring.evaluation.heldout import EvalSet

    def fit(tokenizer, model) -> dict:
        train, validation = load_set(paths["subset"], tokenizer), load_set(paths["validation"], tokenizer)
        history = tiny_sft(cfg, model, tokenizer, list(zip(train.prompt_ids, train.response_ids)),
                           lambda m: -exact_at_1(m, tokenizer, validation, cfg).summary()["tv"],
                           patience=cfg.sft_patience)
        history = [{"step": h["step"], "tv": -h["score"], "loss": h["loss"]} for h in history]
        # θ0 on (as many) training prompts (as the validation split has): has it memorised its one answer?
        k = min(cfg.validation, len(train.examples))
        seen = EvalSet(train.examples[:k], train.prompt_ids[:k], train.response_ids[:k])
        on_train = {**exact_at_1(model, tokenizer, seen, cfg).summary(), "real_answer_share": real_answer_share(
            model, tokenizer, seen)}
        best = min(history, key=lambda h: h["tv"])
        print(f"θ0: best validation exact TV {best['tv']:.3f} at step {best['step']}", flush=True)
        return {"history": history, "best": best, "train": on_train}

    return fit_theta0(cfg, root, THETA0_FIELDS, fit)


# 3–5. runs and scores ------------------------------------------------------------------------------


def score_job(cfg_dict: dict, model_dir: str, data_path: str, temperature: float, n: int, out: str) -> str:
    """Per-prompt exact (and, n > 0, sampled) metrics of one checkpoint at one temperature, cached in
    ``out``. Sampling seeds are the same for every model (common random numbers)."""
    from sparring.evaluation.distribution import score_distribution
    from sparring.state import atomic_write_json

    if Path(out).exists():
        return out
    cfg = from_dict(DistributionConfig, cfg_dict)
    tokenizer, model = open_model(model_dir)
    data = load_set(Path(data_path), tokenizer)
    scores = score_distribution(model, tokenizer, data, temperatures=[temperature], n=n,
                                max_new_tokens=cfg.max_new_tokens, batch_size=cfg.eval_batch_size, seed=1234,
                                sample_prompts=cfg.sample_prompts,
                                answer_ids=cached_support_ids(Path(data_path), tokenizer, data))[temperature]
    atomic_write_json(Path(out), scores.to_dict())
    return out


def cached_support_ids(data_path: Path, tokenizer, data) -> list[list[list[int]]]:
    """``support_ids`` of a data file, computed once (rendering every answer through the chat template
    is a good part of a score job) and kept beside it; every checkpoint shares θ0's tokenizer."""
    from sparring.evaluation.distribution import support_ids, supports_of
    from sparring.state import atomic_write_text

    path = data_path.with_name(data_path.stem + ".support_ids.json")
    if path.exists():
        return json.loads(path.read_text())
    ids = support_ids(tokenizer, data, supports_of(data))
    atomic_write_text(path, json.dumps(ids))
    return ids


def theta0_score_path(root: Path, temperature: float) -> Path:
    return root / "test" / f"theta0_T{temperature:g}.json"


def iterate_score_path(root: Path, job: Job, t: int, split: str = "test") -> Path:
    return run_dir(root, job) / split / f"theta{t}.json"


def validation_tv(root: Path, job: Job, iterations: int) -> float:
    return load_scores(iterate_score_path(root, job, iterations, "validation")).summary()["tv"]


def choose_rates(cfg: DistributionConfig, root: Path) -> dict[str, float]:
    """Per arm, the grid rate with the lowest validation exact TV of the final iterate (ties: smaller)."""
    chosen = {}
    for arm in cfg.arms:
        tv = {lr: validation_tv(root, Job(arm, lr, cfg.seeds[0]), cfg.iterations) for lr in cfg.lr_grid[arm]}
        chosen[arm] = min(sorted(tv), key=lambda lr: tv[lr])
    return chosen


# the command ---------------------------------------------------------------------------------------


def run(cfg: DistributionConfig, *,
        command: str = "sparring experiment configs/experiments/distribution.yaml") -> Path:
    started, root, paths, theta0 = open_experiment(cfg, write_data, build_theta0)
    cfg_dict = asdict(cfg)
    shared = (str(root), {k: str(v) for k, v in paths.items()}, str(theta0), DistributionConfig)

    def runs(jobs: list[Job]) -> None:
        parallel(run_job, [(cfg_dict, j, *shared) for j in jobs if not finished(root, j, cfg.iterations)], cfg.workers)

    def scores(jobs: list[tuple]) -> None:  # score_job's arguments; the last one is its output file
        todo = [args for args in jobs if not Path(args[-1]).exists()]
        if todo:
            parallel(score_job, todo, cfg.workers)

    from sparring.modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(theta0)))
    for split in ("validation", "test"):  # once here, not in every score job
        cached_support_ids(paths[split], tokenizer, load_set(paths[split], tokenizer))

    grid = [Job(a, lr, cfg.seeds[0]) for a in cfg.arms for lr in cfg.lr_grid[a]]
    runs(grid)
    scores([(cfg_dict, str(checkpoints(root, j, cfg.iterations)[-1][1]), str(paths["validation"]), 1.0, 0,
             str(iterate_score_path(root, j, cfg.iterations, "validation"))) for j in grid])
    chosen = choose_rates(cfg, root)
    final = [Job(a, chosen[a], s) for a in cfg.arms for s in cfg.seeds]
    runs([j for j in final if j.seed != cfg.seeds[0]])

    tests = [(cfg_dict, str(theta0), str(paths["test"]), temperature, cfg.samples,
              str(theta0_score_path(root, temperature))) for temperature in cfg.temperatures]
    for job in final:
        for t, model_dir in checkpoints(root, job, cfg.iterations):
            tests.append((cfg_dict, str(model_dir), str(paths["test"]), 1.0, cfg.samples,
                          str(iterate_score_path(root, job, t))))
    scores(tests)

    return write_report(cfg, root, theta0, chosen, final, wall_seconds=add_wall_time(root, started), command=command)


# 6. report -----------------------------------------------------------------------------------------

START, END = "<!-- distribution:start -->", "<!-- distribution:end -->"
ROW_METRICS = ("tv", "tv_on_support", "valid_mass", "entropy_ratio", "validity", "coverage", "sampled_tv")
NAMES = {"tv": "exact TV", "tv_on_support": "exact TV on S", "valid_mass": "valid mass",
         "entropy_ratio": "entropy / log S", "validity": "sampled validity", "coverage": "coverage",
         "sampled_tv": "sampled TV", "floor": "TV floor"}


def load_scores(path: Path):
    from sparring.evaluation.distribution import DistributionScores

    return DistributionScores(**json.loads(path.read_text()))


def frontier_weights(validities: list[float], v: float) -> tuple[dict[int, float], bool]:
    """Linear-interpolation weights {point: w} of the frontier at validity ``v`` (points ordered by
    validity), and whether ``v`` lies outside the frontier's range (then the nearest end, w = 1)."""
    order = sorted(range(len(validities)), key=lambda j: validities[j])
    xs = [validities[j] for j in order]
    if v <= xs[0] or v >= xs[-1]:
        end = order[0] if v <= xs[0] else order[-1]
        return {end: 1.0}, not xs[0] <= v <= xs[-1]
    k = next(i for i in range(len(xs) - 1) if xs[i] <= v <= xs[i + 1])
    w = (v - xs[k]) / (xs[k + 1] - xs[k]) if xs[k + 1] > xs[k] else 0.0
    return {order[k]: 1.0 - w, order[k + 1]: w}, False


def frontier_comparison(frontier: list, runs: list) -> dict:
    """Where one arm's iterate (one DistributionScores per seed, at T = 1) lands against θ0's frontier.

    gap = frontier TV interpolated at the iterate's valid mass − the iterate's exact TV (> 0: lower TV
    than θ0 reaches at that validity by any temperature). Per seed (its own valid mass) for the seed
    spread; per prompt at the seed-mean valid mass for a paired bootstrap over prompts. Verdict:
    "beyond" iff the CI's low end > 0 and the mean gap > 2 seed standard deviations; "inside" for the
    mirror image; otherwise "on".
    """
    from sparring.evaluation.metrics import paired_bootstrap, seed_spread
    from sparring.experiments.report import mean_over_seeds

    validity = [f.summary()["valid_mass"] for f in frontier]
    tv = [f.summary()["tv"] for f in frontier]
    gaps = []
    for r in runs:
        s = r.summary()
        weights, _ = frontier_weights(validity, s["valid_mass"])
        gaps.append(sum(w * tv[j] for j, w in weights.items()) - s["tv"])
    gap, spread = seed_spread(gaps)
    mean_validity = sum(r.summary()["valid_mass"] for r in runs) / len(runs)
    weights, outside = frontier_weights(validity, mean_validity)
    curve = [sum(w * frontier[j].tv[i] for j, w in weights.items()) for i in range(len(frontier[0].tv))]
    ci = paired_bootstrap(curve, mean_over_seeds(runs, "tv"))
    verdict = ("beyond" if ci[1] > 0 and gap > 2 * spread else
               "inside" if ci[2] < 0 and gap < -2 * spread else "on")
    return {"gap": gap, "gap_sd": spread, "ci": list(ci), "validity": mean_validity, "outside_range": outside,
            "verdict": verdict}


def tv_verdict(d0: tuple[float, float, float], ds: tuple[float, float, float] | None) -> str:
    """From paired differences of exact TV (mean, low, high): lower TV is closer to the target."""
    if d0[2] < 0 and ds is not None and ds[2] < 0:
        return "closer to the target than θ0 and the control"
    if d0[2] < 0:
        return "closer than θ0"
    return "farther than θ0" if d0[1] > 0 else "no difference from θ0"


def write_section(path: Path, start: str, end: str, section: str) -> None:
    """Replace the text between the markers ``start`` … ``end`` (both kept, in ``section``) of the file
    at ``path``, or append the section when the markers are absent; the rest is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else (
        "# Results\n\nWhat each method does on proving grounds built to test its paper's claim.\n")
    if start in text and end in text:
        text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def describe_family(cfg: DistributionConfig, name: str) -> str:
    """One family's query shape and sizes, for the report."""
    if name == "number_range":
        return (f"number_range (\"Write a number between a and b.\", {cfg.widths[0]}–{cfg.widths[1]} integers "
                f"starting in 0–{cfg.max_start})")
    if name == "letter_digit":
        return (f"letter_digit (\"Write a letter from c to f, then a digit from 2 to 4.\", "
                f"{cfg.letter_widths[0]}–{cfg.letter_widths[1]} letters × {cfg.digit_widths[0]}–"
                f"{cfg.digit_widths[1]} digits, a letter then a digit)")
    return (f"shuffle (\"Shuffle the letters of w.\", {cfg.word_lengths[0]}–{cfg.word_lengths[1]} distinct "
            "letters, every distinct permutation valid)")


def write_report(cfg: DistributionConfig, root: Path, theta0: Path, chosen: dict, final: list[Job], *,
                 wall_seconds: float, command: str) -> Path:
    import datetime
    import platform

    from sparring.evaluation.metrics import paired_bootstrap, seed_spread
    from sparring.experiments.report import curve_keys, fmt, last_epoch_metrics, mean_over_seeds, variant_arms_note
    from sparring.state import read_jsonl
    from sparring.tasks.distributions import family

    frontier = {T: load_scores(theta0_score_path(root, T)) for T in cfg.temperatures}
    base = frontier[1.0]
    arms = {a: [j for j in final if j.arm == a] for a in cfg.arms}
    per = {a: {t: [load_scores(iterate_score_path(root, j, t)) for j in jobs] for t in range(1, cfg.iterations + 1)}
           for a, jobs in arms.items()}
    last = cfg.iterations
    n, floor = cfg.samples, base.summary()["floor"]
    lines = [START, "## Known-distribution proving ground (does SPIN move π_θ toward p_data?)", ""]
    lines += [
        "**Question (fixed before running).** SPIN's fixed point is π_θ = p_data. On prompts with many "
        "valid answers and an exactly known target (uniform over the valid answers), does SPIN lower the "
        "total-variation distance (TV) of the model's answer distribution at T = 1 below θ0's and below "
        "continued SFT's (the control), and beyond θ0's own temperature frontier? T-SPIN is the contrast: "
        "its reference-free minimiser is π ∝ (p_data/π_t)^{1/α} (it over-corrects away from what π_t "
        "favoured), SPIN's π ∝ π_t·(p_data/π_t)^{1/λ}; for a uniform target both fixed points are the "
        "target itself, so the contrast is in the path, not the end point.", "",
        f"**Setup.** Tasks {'; '.join(describe_family(cfg, f) for f in cfg.families)}; one family per row in "
        "turn, each training row with ONE response drawn "
        f"uniformly from the valid answers (SPIN's p_data); {cfg.subset} training, {cfg.validation} "
        f"validation, {cfg.test} test prompts, disjoint. Model: the character-level Llama (hidden "
        f"{cfg.hidden_size}, {cfg.layers} layers), θ0 = SFT from scratch (AdamW lr {cfg.sft_lr:g}, batch "
        f"{cfg.sft_batch_size}, cosine over {cfg.sft_max_steps} steps), validation mean exact TV at T = 1 "
        f"every {cfg.sft_eval_every} steps, stopped after {cfg.sft_patience} evaluations without a new "
        f"best, best weights kept. Arms from θ0: {', '.join(cfg.arms)} ({cfg.iterations} iterations, "
        f"{cfg.epochs} epoch{'' if cfg.epochs == 1 else 's'} per iteration, batch {cfg.batch_size}, AdamW; the "
        "control is continued SFT with SPIN's optimizer steps per iteration; the methods run their tiny "
        "presets' loss settings); learning rate per arm picked on "
        f"VALIDATION (final iterate's exact TV at T = 1, seed {cfg.seeds[0]}) from its grid, then seeds "
        f"{cfg.seeds}.", "", *variant_arms_note(cfg),
        "**Metrics, per test prompt with valid answers S.** Exact, by enumeration: p(y) = π_T(y + "
        "end-of-turn | x) for every y ∈ S (the token ids generation produces); valid mass m = Σ p(y); "
        "exact TV = ½(Σ_{y∈S} |p(y) − 1/|S|| + 1 − m); exact TV on S = the same for p/m (the shape "
        "alone); entropy / log |S| of p/m (1 = uniform). Sampled, from "
        f"n = {n} responses at T on the first {min(cfg.sample_prompts, cfg.test)} test prompts (CPU time; "
        "exact metrics use all): validity, coverage (share of S seen), sampled TV of the empirical "
        f"distribution. TV floor: the expected sampled TV of {n} draws from the target itself "
        f"(mean {floor:.3f} over those prompts; sampled TV cannot go below it in expectation, exact TV can "
        "reach 0). "
        "Intervals: 95% paired bootstrap over test prompts of the seed-averaged per-prompt exact TV.", "",
        "**Frontier rule.** θ0 scored at T ∈ {" + ", ".join(f"{t:g}" for t in cfg.temperatures) + "} "
        "traces (valid mass, exact TV). An iterate (at T = 1) lands *beyond* the frontier iff the frontier's "
        "TV linearly interpolated at the iterate's valid mass (the nearest end outside the frontier's "
        "range) exceeds the iterate's TV by more than 2 seed standard deviations of that gap AND the 95% "
        "paired bootstrap interval of the per-prompt gap excludes 0; *inside* for the mirror image; "
        "otherwise *on* the frontier.", "",
    ]
    history = json.loads((theta0 / "sft_history.json").read_text())
    best, train = history["best"], history["train"]
    curve = ", ".join(f"{h['step']}: {h['tv']:.3f}" for h in history["history"])
    lines += [f"θ0: validation exact TV {best['tv']:.3f} at step {best['step']} (curve: {curve}). On "
              f"{cfg.validation} of its training prompts: exact TV {train['tv']:.3f}, valid mass "
              f"{train['valid_mass']:.3f}, p̃(own training answer)·|S| = {train['real_answer_share']:.2f} "
              "(1: no memorisation of the one answer it saw; |S|: all of it).", ""]
    lines += [f"**θ0's temperature frontier (test split, {cfg.test} prompts).**", "",
              "| T | " + " | ".join(NAMES[m] for m in (*ROW_METRICS, "floor")) + " |",
              "|---|" + "---|" * (len(ROW_METRICS) + 1)]
    for T, s in frontier.items():
        summary = s.summary()
        lines.append(f"| {T:g} | " + " | ".join(f"{summary[m]:.3f}" for m in (*ROW_METRICS, "floor")) + " |")
    lines += ["", f"**Learning rates (validation exact TV of the final iterate, seed {cfg.seeds[0]}; lower is "
              "better).**", "", "| arm | lr: validation exact TV | chosen |", "|---|---|---|"]
    for arm in cfg.arms:
        cells = ", ".join(f"{lr:g}: {validation_tv(root, Job(arm, lr, cfg.seeds[0]), cfg.iterations):.4f}"
                          for lr in cfg.lr_grid[arm])
        lines.append(f"| {arm} | {cells} | {chosen[arm]:g} |")
    lines += ["", f"**Test split ({cfg.test} prompts) at T = 1, mean ± std over {len(cfg.seeds)} seeds.**", "",
              "| arm | iterate | " + " | ".join(NAMES[m] for m in ROW_METRICS) + " |",
              "|---|---|" + "---|" * len(ROW_METRICS)]
    lines.append("| θ0 | θ0 | " + " | ".join(f"{base.summary()[m]:.3f}" for m in ROW_METRICS) + " |")
    for arm, by_t in per.items():
        for t, runs in by_t.items():
            cells = [fmt(*seed_spread([r.summary()[m] for r in runs])) for m in ROW_METRICS]
            lines.append(f"| {arm} (lr {chosen[arm]:g}) | θ{t} | " + " | ".join(cells) + " |")
    families = [family(r["messages"][0]["content"]) for r in read_jsonl(root / "data" / "test.jsonl")]

    def by_family(values: list[float], name: str) -> float:
        picked = [v for v, f in zip(values, families) if f == name]
        return sum(picked) / max(len(picked), 1)

    lines += ["", f"**Exact TV at T = 1 per family (final iterate θ{last}, seed mean).**", "",
              "| arm | " + " | ".join(cfg.families) + " |", "|---|" + "---|" * len(cfg.families)]
    lines.append("| θ0 | " + " | ".join(f"{by_family(base.tv, f):.3f}" for f in cfg.families) + " |")
    for arm in cfg.arms:
        tv = mean_over_seeds(per[arm][last], "tv")
        lines.append(f"| {arm} | " + " | ".join(f"{by_family(tv, f):.3f}" for f in cfg.families) + " |")
    lines += ["", f"**Final iterate θ{last} vs θ0, vs the control and vs θ0's frontier (exact TV, paired over "
              "test prompts; difference of means [95% CI], negative = closer to the target; frontier gap "
              "positive = beyond).**", "",
              "| arm | vs θ0 | vs sft | verdict | valid mass | frontier gap ± seed sd [95% CI] | frontier |",
              "|---|---|---|---|---|---|---|"]
    verdicts = {}
    for arm in cfg.arms:
        mine = mean_over_seeds(per[arm][last], "tv")
        d0 = paired_bootstrap(mine, base.tv)
        ds = paired_bootstrap(mine, mean_over_seeds(per["sft"][last], "tv")) if arm != "sft" else None
        fc = frontier_comparison(list(frontier.values()), per[arm][last])
        verdicts[arm] = {"vs_theta0": list(d0), "vs_sft": list(ds) if ds else None, "verdict": tv_verdict(d0, ds),
                         "frontier": fc}
        vs_s = f"{ds[0]:+.4f} [{ds[1]:+.4f}, {ds[2]:+.4f}]" if ds else "–"
        where = " (outside the frontier's range)" if fc["outside_range"] else ""
        lines.append(f"| {arm} | {d0[0]:+.4f} [{d0[1]:+.4f}, {d0[2]:+.4f}] | {vs_s} | {tv_verdict(d0, ds)} | "
                     f"{fc['validity']:.3f}{where} | {fc['gap']:+.4f} ± {fc['gap_sd']:.4f} "
                     f"[{fc['ci'][1]:+.4f}, {fc['ci'][2]:+.4f}] | {fc['verdict']} |")
    lines += ["", f"**Diagnosis: training curves per iteration (seed {cfg.seeds[0]}, means over the last epoch; "
              "y′ = y: pairs with no gradient).**", "",
              "| arm | iteration | steps | loss | logps/real | logps/generated | margins | reward acc. | "
              + "".join(f"{k} | " for k in curve_keys(cfg)[4:]) + "y′ = y |",
              "|---|---|---|" + "---|" * (len(curve_keys(cfg)) + 2)]
    for arm, jobs in arms.items():
        for t, row in enumerate(last_epoch_metrics(run_dir(root, jobs[0]), cfg.iterations)):
            cells = [row.get(key) for key in ("loss", *curve_keys(cfg), "y′ = y")]
            text = " | ".join("–" if c is None else f"{c:.3f}" for c in cells)
            lines.append(f"| {arm} | {t} | {row['steps']} | {text} |")
    plot_path = Path(cfg.plot)
    plot(cfg, frontier, per, chosen, plot_path)
    lines += ["", f"![distribution]({os.path.relpath(plot_path, Path(cfg.report).parent)})", "",
              f"Command: `{command}`; machine: {platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread "
              f"per worker, {cfg.workers} workers; date {datetime.date.today().isoformat()}; wall time "
              f"{wall_seconds / 60:.1f} min. Every run is kept under `{cfg.output_dir}`; per-arm means in its "
              "`summary.json`.", END]
    section = "\n".join(lines)
    write_section(Path(cfg.report), START, END, section)
    metrics = (*ROW_METRICS, "entropy", "floor")
    summary = {
        "theta0": {f"T{T:g}": s.summary() for T, s in frontier.items()},
        "chosen_lr": chosen,
        "arms": {arm: {f"theta{t}": {m: seed_spread([r.summary()[m] for r in runs]) for m in metrics}
                       for t, runs in by_t.items()} for arm, by_t in per.items()},
        "final": verdicts,
        "wall_seconds": wall_seconds,
    }
    (root / "summary.json").write_text(json.dumps(summary, indent=1))
    print(section)
    return Path(cfg.report)


def plot(cfg: DistributionConfig, frontier: dict, per: dict, chosen: dict, path: Path) -> None:
    """Left: valid mass vs exact TV; right: sampled validity vs coverage. θ0's frontier over T
    (labelled), every arm's iterates at T = 1 (seed mean ± std, joined from θ0 in order)."""
    from sparring.evaluation.metrics import seed_spread
    from sparring.experiments.report import new_figure, save_figure

    fig, axes = new_figure(2, (12, 4.5))
    for ax, (x, y) in zip(axes, (("valid_mass", "tv"), ("validity", "coverage"))):
        points = [(s.summary()[x], s.summary()[y]) for s in frontier.values()]
        ax.plot(*zip(*points), "k-", marker=".", label="θ0 at temperature T")
        for T, (px, py) in zip(frontier, points):
            ax.annotate(f"T={T:g}", (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7)
        start = frontier[1.0].summary()
        for arm, by_t in per.items():
            xs = [seed_spread([r.summary()[x] for r in runs]) for runs in by_t.values()]
            ys = [seed_spread([r.summary()[y] for r in runs]) for runs in by_t.values()]
            line = ax.plot([start[x], *(m for m, _ in xs)], [start[y], *(m for m, _ in ys)], "--", alpha=0.6)[0]
            ax.errorbar([m for m, _ in xs], [m for m, _ in ys], xerr=[s for _, s in xs], yerr=[s for _, s in ys],
                        fmt="o", color=line.get_color(), capsize=3, label=f"{arm} (lr {chosen[arm]:g}) θ1…θ{len(xs)}")
            for t, (mx, _), (my, _) in zip(by_t, xs, ys):
                ax.annotate(f"θ{t}", (mx, my), textcoords="offset points", xytext=(-10, -10), fontsize=6,
                            color=line.get_color())
        ax.set_xlabel(NAMES[x])
        ax.set_ylabel(NAMES[y])
        ax.grid(alpha=0.3)
    axes[0].set_title("exact: closer to the target = lower")
    axes[1].set_title(f"sampled, n = {cfg.samples} per prompt")
    axes[0].legend(fontsize=7)
    save_figure(fig, path, f"Known-distribution ground: test split ({cfg.test} prompts), T = 1 for the arms, "
                           f"mean ± std over {len(cfg.seeds)} seeds")
