"""The limited-data plateau: do SPIN, T-SPIN and TPAW improve an SFT model where more SFT no longer does?

Question, fixed before running: from θ0 = SFT on ``subset`` of ``pool`` examples, early-stopped on
a validation split, does each method raise held-out TEST accuracy (greedy exact match, sampled
pass@1 at T = 1) beyond θ0 and beyond continued SFT on the same examples with the same optimizer
steps (the control)? And does T-SPIN on the subset match SFT on the whole pool (its data claim)?

Stages, each resumable (files under ``output_dir``):

1. data: pool / subset (its first ``subset`` rows) / validation / test, disjoint;
2. θ0: SFT from scratch on the subset, early-stopped on validation greedy exact match;
3. learning rates: every arm at every rate of its grid with the first seed, scored on VALIDATION
   (final iterate's greedy exact match); the best rate per arm is kept;
4. seeds: every arm at its rate with every seed;
5. test: every iterate of those runs (and θ0) scored per prompt on the TEST split;
6. report: a section of ``report`` (tables, paired bootstrap intervals, diagnosis) and a plot.

Arms: ``sft`` (continued SFT on the subset, SPIN's step count per iteration), ``sft_all`` (SFT on the
whole pool, the same steps), ``spin``, ``tspin``, ``tpaw`` (their presets' settings; their own step
counts, reported), and ``spin_nll`` (SPIN's preset plus ``spin.nll_coef`` = ``spin_nll_coef``: the
RPO-style NLL term on y, an extension, not the paper's method; not in the shipped config's arms).
Seeds change the methods' sampling and data order, not θ0.

    sparring experiment configs/experiments/plateau.yaml
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

from sparring.config import ConfigError, from_dict
from sparring.experiments.common import (
    TinyGround,
    add_wall_time,
    fit_theta0,
    open_experiment,
    open_model,
    read_config,
    tiny_sft,
)

ARMS = ("sft", "sft_all", "spin", "tspin", "tpaw", "spin_nll")
# The fields θ0 and its data are built from: a θ0 on disk built from other values is refused.
THETA0_FIELDS = ("families", "pool", "subset", "validation", "test", "data_seed", "hidden_size", "layers", "heads", "sft_lr", "sft_batch_size", "sft_max_steps", "sft_eval_every", "sft_patience", "theta0_data", "max_new_tokens")
METHODS = ("spin", "tspin", "tpaw")  # the keys of ``presets``
# Arms run through ``sparring run``: a method, or a variant of one (the method's preset plus overrides).
METHOD_ARMS = (*METHODS, "spin_nll")


def arm_method(arm: str) -> str:
    """The method an arm runs: ``spin_nll`` is SPIN (its preset) with the NLL term on y."""
    return {"spin_nll": "spin"}.get(arm, arm)


def arm_overrides(cfg: PlateauConfig, arm: str) -> list[str]:
    """What a variant arm adds to its method's preset; applied after ``overrides``, so the arm is what its
    name says. ``spin_nll``: spin.nll_coef = ``spin_nll_coef`` (an extension, not the paper's method)."""
    return [f"spin.nll_coef={cfg.spin_nll_coef}"] if arm == "spin_nll" else []


@dataclass
class PlateauConfig(TinyGround):
    output_dir: str = "runs/experiments/plateau"
    plot: str = "docs/results/plateau.png"
    families: list[str] = field(default_factory=lambda: ["add_lsd", "add", "sort", "reverse"])
    pool: int = 4000
    subset: int = 1000
    validation: int = 500
    test: int = 3000
    hidden_size: int = 128
    sft_patience: int = 4
    # What θ0 is fitted on: "subset" (θ0 has seen only the prompts the arms train on) or "pool" (θ0 has
    # seen all of it, as SPIN's zephyr-7b-sft-full saw all of UltraChat before SPIN used 50k of it).
    theta0_data: str = "subset"
    iterations: int = 3
    arms: list[str] = field(default_factory=lambda: [a for a in ARMS if a != "spin_nll"])  # the variant: opt in
    presets: dict[str, str] = field(default_factory=lambda: {m: f"configs/{m}/tiny.yaml" for m in METHODS})
    lr_grid: dict[str, list[float]] = field(default_factory=lambda: {a: [1e-5, 1e-4] for a in ARMS})
    spin_nll_coef: float = 1.0  # arm spin_nll: SPIN + this · per-token NLL of y (RPO-style, not the paper's)
    epochs: int = 2
    batch_size: int = 32
    max_new_tokens: int = 24
    eval_k: int = 8
    eval_temperature: float = 1.0


def load(path: str | Path, overrides: list[str] | None = None) -> PlateauConfig:
    cfg = read_config(PlateauConfig, path, overrides, name="plateau", arms=ARMS, default="plateau")
    if cfg.theta0_data not in ("subset", "pool"):
        raise ConfigError(f"theta0_data must be 'subset' or 'pool', not {cfg.theta0_data!r}")
    return cfg


# 1. data ------------------------------------------------------------------------------------------


def write_data(cfg: PlateauConfig, root: Path) -> dict[str, Path]:
    from sparring.state import write_jsonl
    from sparring.tasks.problems import make_rows

    paths = {name: root / "data" / f"{name}.jsonl" for name in ("pool", "subset", "validation", "test")}
    if not all(p.exists() for p in paths.values()):
        rows = make_rows(cfg.pool + cfg.validation + cfg.test, cfg.data_seed, tuple(cfg.families))
        pool = rows[: cfg.pool]
        write_jsonl(paths["validation"], rows[cfg.pool : cfg.pool + cfg.validation])
        write_jsonl(paths["test"], rows[cfg.pool + cfg.validation :])
        write_jsonl(paths["subset"], pool[: cfg.subset])
        write_jsonl(paths["pool"], pool)
    return paths


def load_set(path: Path, tokenizer, max_length: int = 256):
    from sparring.config import EvalConfig
    from sparring.evaluation import load_eval_set

    return load_eval_set(EvalConfig(source=str(path), split="train"), tokenizer, max_length)


def check(example, answer: str) -> bool:
    from sparring.tasks import check as task_check

    return bool(task_check(example.prompt[-1]["content"], answer))


# 2. θ0 ---------------------------------------------------------------------------------------------


def build_theta0(cfg: PlateauConfig, paths: dict[str, Path], root: Path) -> Path:
    """SFT from scratch on ``theta0_data``, early-stopped on validation greedy exact match."""
    from sparring.evaluation.sampled import score_prompts

    def fit(tokenizer, model) -> dict:
        subset, validation = load_set(paths["subset"], tokenizer), load_set(paths["validation"], tokenizer)
        fitted = subset if cfg.theta0_data == "subset" else load_set(paths["pool"], tokenizer)

        def val_accuracy(m) -> float:
            return score_prompts(m, tokenizer, validation, check, k=0, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.eval_batch_size).summary()["exact_match"]

        history = tiny_sft(cfg, model, tokenizer, list(zip(fitted.prompt_ids, fitted.response_ids)), val_accuracy,
                           patience=cfg.sft_patience)
        best = max(history, key=lambda h: h["score"])
        # θ0 must still often be wrong on its own training prompts (sampled), or self-play has nothing to fix.
        on_train = score_prompts(model, tokenizer, subset, check, k=4, max_new_tokens=cfg.max_new_tokens,
                                 batch_size=cfg.eval_batch_size).summary()
        print(f"θ0: best validation exact match {best['score']:.3f} at step {best['step']}", flush=True)
        return {"history": history, "best": best, "train": on_train}

    return fit_theta0(cfg, root, THETA0_FIELDS, fit)


# 3–4. runs -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    arm: str
    lr: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}/lr{self.lr:g}/seed{self.seed}"


def spin_steps(cfg: PlateauConfig, t: int) -> int:
    """SPIN's optimizer steps at iteration t: its own pairs plus the previous iteration's (mix 1)."""
    pairs = cfg.subset * min(t + 1, 2)
    return cfg.epochs * math.ceil(pairs / cfg.batch_size)


def method_args(cfg: PlateauConfig, job: Job, root: Path, paths: dict[str, Path], theta0: Path) -> list[str]:
    seed, method = job.seed, arm_method(job.arm)
    return [
        "run", cfg.presets[method], f"output_dir={root / 'runs' / job.name}", f"model.name_or_path={theta0}",
        "model.build_proving_ground=false", f"data.source={paths['subset']}", "data.num_prompts=null",
        f"eval.source={paths['validation']}", "eval.split=train", "eval.num_examples=null",
        f"eval.max_new_tokens={cfg.max_new_tokens}", f"generation.max_new_tokens={cfg.max_new_tokens}",
        f"{method}.iterations={cfg.iterations}", f"train.lr={job.lr}", f"train.epochs={cfg.epochs}",
        f"train.batch_size={cfg.batch_size}", f"train.seed={seed}", f"generation.seed={seed}",
        "train.save_steps=1000000", *cfg.overrides, *arm_overrides(cfg, job.arm),
    ]


def run_sft_arm(cfg: PlateauConfig, job: Job, root: Path, paths: dict[str, Path], theta0: Path) -> None:
    """Continued SFT from θ0 on the shared training loop, with SPIN's step count at every iteration."""
    import random

    from sparring.config import EvalConfig, ModelConfig, RunConfig, TrainConfig
    from sparring.evaluation import evaluate, load_eval_set
    from sparring.logprobs import collate
    from sparring.modeling import load_model, load_tokenizer, make_accelerator
    from sparring.state import atomic_write_json
    from sparring.training import MetricsLogger, train
    from sparring.training.trackers import Trackers

    out = root / "runs" / job.name
    model_cfg = ModelConfig(name_or_path=str(theta0), dtype="float32")
    tokenizer = load_tokenizer(model_cfg)
    data = load_set(paths["subset" if job.arm == "sft" else "pool"], tokenizer)
    pairs = list(zip(data.prompt_ids, data.response_ids))
    order = list(range(len(pairs)))
    random.Random(job.seed).shuffle(order)
    eval_cfg = EvalConfig(source=str(paths["validation"]), split="train", verifier="proving_ground", max_new_tokens=cfg.max_new_tokens)
    validation = load_eval_set(eval_cfg, tokenizer, 256)
    accelerator = make_accelerator(RunConfig(output_dir=str(out)))  # TensorBoard in out/tb
    logger = MetricsLogger(out / "metrics.jsonl", Trackers(accelerator, run_name=job.name))
    (out / "eval").mkdir(parents=True, exist_ok=True)
    if not (out / "eval" / "initial.json").exists():
        atomic_write_json(out / "eval" / "initial.json", {"label": "initial", **evaluate(load_model(model_cfg), tokenizer, validation, eval_cfg)})
    seen = 0
    for t in range(cfg.iterations):
        steps = spin_steps(cfg, t)
        count = steps * cfg.batch_size  # one epoch over `count` examples = `steps` optimizer steps
        records = [pairs[order[(seen + i) % len(order)]] for i in range(count)]
        seen += count
        target = out / f"iter_{t:03d}" / "model"
        if (target / "config.json").exists():
            continue
        model = load_model(model_cfg, None if t == 0 else out / f"iter_{t - 1:03d}" / "model")
        train_cfg = TrainConfig(optimizer="adamw", lr=job.lr, epochs=1, batch_size=cfg.batch_size, seed=job.seed,
                                save_steps=1000000, warmup_ratio=0.1)
        result = train(model, records, collate=lambda rs: collate(rs, tokenizer.pad_token_id), loss_step=nll_step,
                       cfg=train_cfg, accelerator=accelerator, folder=out / f"iter_{t:03d}", logger=logger,
                       log_fields={"iteration": t}, desc=f"{job.name} iter {t}")
        model = accelerator.unwrap_model(result.model)
        scores = evaluate(model, tokenizer, validation, eval_cfg)
        tmp = target.with_name("model.tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(out / "eval" / f"iter{t}.json", {"label": f"iter{t}", **scores, "steps": result.steps})
        tmp.replace(target)
        accelerator.free_memory()


def nll_step(model, batch):
    """Per-example mean negative log-likelihood of the response tokens (the SFT loss)."""
    from sparring.logprobs import sequence_logps
    from sparring.losses import LossOutput

    logps = sequence_logps(model, batch, average=True)  # (B,)
    return LossOutput(-logps, {"logps/real": logps.detach().mean()})


def run_job(cfg_dict: dict, job: Job, root: str, paths: dict[str, str], theta0: str, config_cls: type | None = None) -> str:
    """One (arm, lr, seed) run, in a worker process with one torch thread. ``config_cls``: the dataclass
    ``cfg_dict`` is read into (default ``PlateauConfig``; another experiment's config with the fields
    ``method_args`` and ``run_sft_arm`` read)."""
    import torch

    torch.set_num_threads(1)
    cfg = from_dict(config_cls or PlateauConfig, cfg_dict)
    root_p, paths_p, theta0_p = Path(root), {k: Path(v) for k, v in paths.items()}, Path(theta0)
    if job.arm in METHOD_ARMS:
        from sparring.cli import main

        code = main(method_args(cfg, job, root_p, paths_p, theta0_p))
        if code != 0:
            raise RuntimeError(f"{job.name} exited with {code}")
    else:
        run_sft_arm(cfg, job, root_p, paths_p, theta0_p)
    return job.name


def run_dir(root: Path, job: Job) -> Path:
    return root / "runs" / job.name


def validation_score(root: Path, job: Job, iterations: int) -> float | None:
    path = run_dir(root, job) / "eval" / f"iter{iterations - 1}.json"
    return json.loads(path.read_text())["exact_match"] if path.exists() else None


def parallel(fn, args_list: list[tuple], workers: int) -> list:
    if not args_list:
        return []
    if workers <= 1:
        return [fn(*a) for a in args_list]
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, *zip(*args_list)))


# 5. test scores ------------------------------------------------------------------------------------


def score_job(cfg_dict: dict, model_dir: str, test_path: str, out: str) -> str:
    """Per-prompt test scores of one checkpoint, cached in ``out``."""
    from sparring.evaluation.sampled import score_prompts
    from sparring.state import atomic_write_json

    if Path(out).exists():
        return out
    cfg = from_dict(PlateauConfig, cfg_dict)
    tokenizer, model = open_model(model_dir)
    scores = score_prompts(model, tokenizer, load_set(Path(test_path), tokenizer), check,
                           k=cfg.eval_k, temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.eval_batch_size, seed=1234)
    atomic_write_json(Path(out), scores.to_dict())
    return out


def checkpoints(root: Path, job: Job, iterations: int) -> list[tuple[int, Path]]:
    return [(t + 1, run_dir(root, job) / f"iter_{t:03d}" / "model") for t in range(iterations)]


def finished(root: Path, job: Job, iterations: int) -> bool:
    """A run whose final iterate is saved is done and not even reopened (so an experiment directory that
    was moved or reached through another path, whose runs name the old paths, still reports)."""
    return (checkpoints(root, job, iterations)[-1][1] / "config.json").exists()


# the command ---------------------------------------------------------------------------------------


def run(cfg: PlateauConfig, *, command: str = "sparring experiment configs/experiments/plateau.yaml") -> Path:
    started, root, paths, theta0 = open_experiment(cfg, write_data, build_theta0)
    cfg_dict = asdict(cfg)
    common = (cfg_dict, str(root), {k: str(v) for k, v in paths.items()}, str(theta0))

    grid = [Job(a, lr, cfg.seeds[0]) for a in cfg.arms for lr in cfg.lr_grid[a]]
    parallel(run_job, [(common[0], j, *common[1:]) for j in grid if not finished(root, j, cfg.iterations)], cfg.workers)
    chosen = {}
    for arm in cfg.arms:
        scores = {lr: validation_score(root, Job(arm, lr, cfg.seeds[0]), cfg.iterations) for lr in cfg.lr_grid[arm]}
        chosen[arm] = max(sorted(scores), key=lambda lr: scores[lr])  # ties: the smaller rate
    final = [Job(a, chosen[a], s) for a in cfg.arms for s in cfg.seeds]
    parallel(run_job, [(common[0], j, *common[1:]) for j in final
                       if j.seed != cfg.seeds[0] and not finished(root, j, cfg.iterations)], cfg.workers)

    tests = [(cfg_dict, str(theta0), str(paths["test"]), str(root / "test" / "theta0.json"))]
    for job in final:
        for t, model_dir in checkpoints(root, job, cfg.iterations):
            tests.append((cfg_dict, str(model_dir), str(paths["test"]), str(run_dir(root, job) / "test" / f"theta{t}.json")))
    parallel(score_job, tests, cfg.workers)

    from sparring.experiments.report import write_plateau_report

    return write_plateau_report(cfg, root, theta0, chosen, final, wall_seconds=add_wall_time(root, started),
                                command=command)
