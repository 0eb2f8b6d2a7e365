"""LSP at the edge of competence: does RL on challenger-written tasks raise held-out accuracy?

RL with a 0/1 verifier learns only from groups whose G answers disagree: with success rate p a group
carries signal with probability 1 − p^G − (1 − p)^G, so LSP-Zero from a model that solves ~5% of its
tasks stays flat. This experiment starts where the signal is: θ0 is SFT'd until its sampled pass@1
on validation reaches ``target_pass1`` (the 0.2–0.6 band) and its challenger writes parseable queries
of the asked difficulty at least ``min_validity`` of the time.

Questions, fixed before running:

1. does solver-only GRPO on challenger-written prompts (``grpo_gen``: lsp.challenger_coef = 0) raise
   held-out TEST exact match over θ0?
2. do LSP-Zero (``lsp_zero``, challenger trained too) and LSP (``lsp``, the self-reward variant, if the
   tiny judge can grade at all) do better or worse than GRPO on the DATA prompts (``grpo_data``, the
   paper's baseline) and continued SFT (``sft``), all at equal optimizer steps?

Stages, each resumable (files under ``output_dir``):

1. data: train (SFT rows; also the GRPO-data prompts) / validation / test per difficulty, disjoint;
2. θ0: SFT from scratch on solver rows + challenger rows (the challenger prompt with the row's
   difficulty filled in → the row's query), stopped at the edge of competence (``stop_at``);
   a probe of the self-reward judge on θ0 (does any grade parse?);
3. learning rates: every arm at every rate of the shared grid with the first seed, scored on
   VALIDATION (greedy exact match of the last step); the best rate per arm is kept;
4. seeds: every arm at its rate with the other seeds;
5. test: θ0 and every evaluation step of those runs scored per prompt on TEST (greedy, sampled
   pass@1 from k samples), and the challenger's query validity per difficulty;
6. report: a section of ``report`` between <!-- lsp:start --> and <!-- lsp:end --> and a plot.

    sparring experiment configs/experiments/lsp.yaml
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
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
from sparring.experiments.plateau import Job, check, load_set, parallel, run_dir
from sparring.state import RunDir

ARMS = ("grpo_gen", "lsp_zero", "lsp", "grpo_data", "sft")
# The fields θ0 and its data are built from: a θ0 on disk built from other values is refused.
THETA0_FIELDS = ("family", "difficulties", "train_per_difficulty", "validation_per_difficulty", "test_per_difficulty", "data_seed", "challenger_prompt", "hidden_size", "layers", "heads", "sft_lr", "sft_batch_size", "sft_max_steps", "sft_eval_every", "sft_eval_k", "target_pass1", "min_validity", "validity_samples", "judge_prompt", "judge_rows_per_difficulty", "max_new_tokens", "query_max_new_tokens")
# What difficulty d sets in each family (tasks.problems.make_problem).
DIFFICULTY_MEANS = {"add": "operand digits", "add_lsd": "operand digits", "sort": "digits to sort", "reverse": "word length"}
START, END = "<!-- lsp:start -->", "<!-- lsp:end -->"
# The LSP settings that make each RL arm (on top of the shared ones of ``lsp_overrides``).
ARM_SETTINGS = {
    "grpo_gen": {"lsp.challenger_coef": 0.0},
    "lsp_zero": {"lsp.challenger_coef": 1.0},
    "lsp": {"lsp.challenger_coef": 1.0, "lsp.variant": "self_reward"},
    "grpo_data": {"lsp.challenger_coef": 0.0, "lsp.query_source": "data"},
}
NAMES = {"grpo_gen": "GRPO on generated prompts", "lsp_zero": "LSP-Zero", "lsp": "LSP (self-reward)",
         "grpo_data": "GRPO on data prompts", "sft": "continued SFT"}


@dataclass
class LspGroundConfig(TinyGround):
    experiment: str = "lsp"  # the key `sparring experiment` dispatches on
    output_dir: str = "runs/experiments/lsp"
    plot: str = "docs/results/lsp.png"
    family: str = "add"
    difficulties: list[int] = field(default_factory=lambda: [2, 3])  # operand digits (tasks.problems)
    train_per_difficulty: int = 2000
    validation_per_difficulty: int = 100
    test_per_difficulty: int = 200
    challenger_prompt: str = "Ask one new question: add two {difficulty}-digit numbers."
    sft_eval_k: int = 4
    target_pass1: float = 0.4  # θ0 stops at the first evaluation with validation pass@1 ≥ this …
    min_validity: float = 0.9  # … and challenger validity (parseable, at the asked difficulty) ≥ this
    validity_samples: int = 32  # challenger queries per difficulty in each validity measurement
    judge_probe: int = 4  # θ0 answers graded by the self-reward judge in the feasibility probe
    # The self-reward judge. A character-level model trained from scratch has no judging ability of its own
    # (the built-in rubric prompt alone is longer than its context), so θ0's SFT also teaches it to grade:
    # judge_rows_per_difficulty rows of (judge_prompt filled with a query and an answer → "<Score>k</Score>"),
    # k = rubric(...) over the paper's seven criteria made concrete for the task; 0 rows: not taught.
    judge_prompt: str = "Grade 0-7. Q: {instruction} A: {response}"
    judge_rows_per_difficulty: int = 0
    judge_max_new_tokens: int = 16
    preset: str = "configs/lsp/tiny.yaml"
    arms: list[str] = field(default_factory=lambda: ["grpo_gen", "lsp_zero", "grpo_data", "sft"])
    lr_grid: list[float] = field(default_factory=lambda: [1.0e-4, 3.0e-4])  # one grid shared by every arm
    steps: int = 60  # optimizer steps of every arm
    eval_every: int = 20
    num_queries: int = 16  # N
    answers_per_query: int = 16  # G
    kl_coef: float = 0.05
    temperature: float = 1.0
    query_max_new_tokens: int = 24
    sft_arm_batch_size: int = 64
    eval_k: int = 4
    eval_temperature: float = 1.0


def load(path: str | Path, overrides: list[str] | None = None) -> LspGroundConfig:
    """The experiment config from YAML plus dotted overrides, checked."""
    cfg = read_config(LspGroundConfig, path, overrides, name="lsp", arms=ARMS, default="lsp")
    if not cfg.lr_grid or not cfg.seeds or not cfg.difficulties:
        raise ConfigError("lr_grid, seeds and difficulties must be non-empty")
    if "{difficulty}" not in cfg.challenger_prompt:
        raise ConfigError("challenger_prompt needs a {difficulty} slot (the difficulty knob)")
    if cfg.steps % cfg.eval_every:
        raise ConfigError(f"steps ({cfg.steps}) must be a multiple of eval_every ({cfg.eval_every})")
    return cfg


def eval_steps(cfg: LspGroundConfig) -> list[int]:
    """The evaluated steps of every arm: eval_every, 2·eval_every, …, steps."""
    return list(range(cfg.eval_every, cfg.steps + 1, cfg.eval_every))


# 1. data ------------------------------------------------------------------------------------------


def write_data(cfg: LspGroundConfig, root: Path) -> dict[str, Path]:
    """train / validation / test jsonl (messages rows); per difficulty one make_rows draw, split in
    that order, so the splits are disjoint (and difficulties differ in their operands' digits)."""
    from sparring.state import write_jsonl
    from sparring.tasks.problems import make_rows

    paths = {name: root / "data" / f"{name}.jsonl" for name in ("train", "validation", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    sizes = {"train": cfg.train_per_difficulty, "validation": cfg.validation_per_difficulty,
             "test": cfg.test_per_difficulty}
    splits: dict[str, list[dict]] = {name: [] for name in sizes}
    for d in cfg.difficulties:
        rows = make_rows(sum(sizes.values()), cfg.data_seed + 1000 * d, (cfg.family,), difficulty=d)
        start = 0
        for name, size in sizes.items():
            splits[name] += rows[start : start + size]
            start += size
    for name in ("validation", "test", "train"):  # train last: its presence marks the stage done
        write_jsonl(paths[name], splits[name])
    return paths


def fill(cfg: LspGroundConfig, difficulty: int) -> str:
    """The challenger prompt asking for ``difficulty`` (the same text in SFT and in the LSP runs)."""
    return cfg.challenger_prompt.replace("{difficulty}", str(difficulty))


def difficulty(example) -> int | None:
    from sparring.tasks.problems import difficulty_of

    return difficulty_of(example.prompt[-1]["content"])


# 2. θ0 and the measurements on it -------------------------------------------------------------------


def challenger_validity(model, tokenizer, cfg: LspGroundConfig, *, seed: int = 0) -> dict[str, dict[int, float]]:
    """Per difficulty d, over ``validity_samples`` queries sampled at T = 1 from the challenger prompt
    asking for d: ``parseable`` (tasks.solve knows the query) and ``on_difficulty`` (parseable and of
    difficulty d, tasks.difficulty_of)."""
    from sparring.data import encode
    from sparring.generation import HFGenerator, SamplingParams, batch_seed
    from sparring.tasks.problems import difficulty_of, solve

    generator = HFGenerator(model, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.query_max_new_tokens)
    out: dict[str, dict[int, float]] = {"parseable": {}, "on_difficulty": {}}
    for d in cfg.difficulties:
        prompt = encode(tokenizer, [{"role": "user", "content": fill(cfg, d)}])[0]
        texts = [c.text for c in generator.generate([prompt] * cfg.validity_samples, params, batch_seed(seed, "validity", d))]
        out["parseable"][d] = sum(solve(t) is not None for t in texts) / len(texts)
        out["on_difficulty"][d] = sum(difficulty_of(t) == d for t in texts) / len(texts)
    return out


def by_difficulty(data, values: list[float]) -> dict[int, float]:
    """Mean of per-prompt ``values`` over the prompts of each difficulty."""
    groups: dict[int, list[float]] = {}
    for example, v in zip(data.examples, values):
        groups.setdefault(difficulty(example), []).append(v)
    return {d: sum(v) / len(v) for d, v in sorted(groups.items())}


def sft_encoded(cfg: LspGroundConfig, tokenizer, train) -> list[tuple[list[int], list[int]]]:
    """θ0's SFT mix: every training row as a solver row and as a challenger row (the challenger
    prompt asking for the row's difficulty → the row's query), the difficulty knob being taught."""
    from sparring.tasks.sft import challenger_pairs

    solver = list(zip(train.prompt_ids, train.response_ids))
    pairs = [(fill(cfg, difficulty(e)), e.prompt[-1]["content"]) for e in train.examples]
    return solver + challenger_pairs(tokenizer, pairs + judge_rows(cfg, train))


def rubric(cfg: LspGroundConfig, query: str, answer: str) -> int:
    """The paper's additive 0–7 self-reward rubric (spec B.5), each criterion made checkable here:
    1. the instruction is a task the verifier knows; 2. it asks for one of the experiment's difficulties;
    3. the response is one non-empty line of at most 2·|y*| + 2 characters (y* the right answer; 16 when
    the instruction is not a task); 4. it uses only y*'s characters; 5. it has y*'s length; 6. it is a
    rearrangement of y*'s characters; 7. it is y*. Criteria 4–7 need y*: 0 for a non-task instruction."""
    from sparring.tasks.problems import difficulty_of, solve

    expected, a = solve(query), answer.strip()
    score = int(expected is not None) + int(difficulty_of(query) in cfg.difficulties)
    score += int(0 < len(a) <= (2 * len(expected) + 2 if expected else 16) and "\n" not in a)
    if expected is not None:
        score += int(bool(a) and set(a) <= set(expected)) + int(len(a) == len(expected))
        score += int(sorted(a) == sorted(expected)) + int(a == expected)
    return score


def judge_rows(cfg: LspGroundConfig, train) -> list[tuple[str, str]]:
    """θ0's grading lessons: (judge_prompt filled with (q, a), "<Score>rubric(q, a)</Score>") for the first
    ``judge_rows_per_difficulty`` training queries of each difficulty. q: the query (80%), one of another
    difficulty (10%) or its first half (10%); a: the right answer, one character changed, shuffled,
    truncated or a random string of the task's alphabet (1/5 each). Seeded by data_seed."""
    import random

    from sparring.tasks.problems import make_problem, solve

    rng = random.Random(cfg.data_seed + 17)
    alphabet = "abcdefghijklmnopqrstuvwxyz" if cfg.family == "reverse" else "0123456789"
    others = [d for d in range(1, max(cfg.difficulties) + 2) if d not in cfg.difficulties]
    taken: dict[int, int] = {}
    rows = []
    for example in train.examples:
        d = difficulty(example)
        if taken.get(d, 0) >= cfg.judge_rows_per_difficulty:
            continue
        taken[d] = taken.get(d, 0) + 1
        query = example.prompt[-1]["content"]
        right = solve(query)
        roll = rng.random()
        if roll < 0.1 and others:
            query = make_problem(rng, cfg.family, rng.choice(others))[0]
            right = solve(query)
        elif roll < 0.2:
            query = query[: len(query) // 2]
        kind = rng.randrange(5)
        if kind == 0:
            answer = right
        elif kind == 1:
            i = rng.randrange(len(right))
            answer = right[:i] + rng.choice(alphabet) + right[i + 1 :]
        elif kind == 2:
            answer = "".join(rng.sample(right, len(right)))
        elif kind == 3:
            answer = right[: max(1, len(right) - 1 - rng.randrange(len(right) // 2 + 1))]
        else:
            answer = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, len(right) + 2)))
        text = cfg.judge_prompt.replace("{instruction}", query).replace("{response}", answer)
        rows.append((text, f"<Score>{rubric(cfg, query, answer)}</Score>"))
    return rows


def edge_score(pass1: float, validity: float, min_validity: float) -> float:
    """θ0's stopping score: validation sampled pass@1, or 0 while challenger validity < min_validity."""
    return pass1 if validity >= min_validity else 0.0


def build_theta0(cfg: LspGroundConfig, paths: dict[str, Path], root: Path) -> Path:
    """SFT from scratch until validation sampled pass@1 ≥ target_pass1 with challenger validity ≥
    min_validity (the first such evaluation's weights), else the best by ``edge_score``."""
    from sparring.evaluation.sampled import score_prompts

    def fit(tokenizer, model) -> dict:
        train, validation = load_set(paths["train"], tokenizer), load_set(paths["validation"], tokenizer)
        records: list[dict] = []

        def evaluate(m) -> float:
            s = score_prompts(m, tokenizer, validation, check, k=cfg.sft_eval_k, max_new_tokens=cfg.max_new_tokens,
                              batch_size=cfg.eval_batch_size)
            validity = challenger_validity(m, tokenizer, cfg)
            on_d = min(validity["on_difficulty"].values())
            record = {"step": (len(records) + 1) * cfg.sft_eval_every, **s.summary(), "validity": on_d,
                      "pass@1_by_difficulty": by_difficulty(validation, s.per_prompt("pass@1")),
                      "on_difficulty": validity["on_difficulty"], "parseable": validity["parseable"]}
            records.append(record)
            print(f"θ0 step {record['step']}: validation pass@1 {record['pass@1']:.3f}, validity {on_d:.2f}", flush=True)
            return edge_score(record["pass@1"], on_d, cfg.min_validity)

        history = tiny_sft(cfg, model, tokenizer, sft_encoded(cfg, tokenizer, train), evaluate, stop_at=cfg.target_pass1)
        reached = [i for i, h in enumerate(history) if h["score"] >= cfg.target_pass1]
        chosen = reached[0] if reached else max(range(len(history)), key=lambda i: history[i]["score"])
        return {"history": records, "chosen": records[chosen], "reached": bool(reached)}

    return fit_theta0(cfg, root, THETA0_FIELDS, fit)


def probe_judge(cfg: LspGroundConfig, paths: dict[str, Path], theta0: Path, root: Path) -> dict:
    """Can θ0 grade with the self-reward prompt (spec B.5)? ``judge_probe`` θ0 answers to validation
    prompts graded by θ0 (LSP's π_Ref); the share of grades that parse, and the seconds per grade."""
    from sparring.algorithms.lsp.rollouts import Reference, judge_generate
    from sparring.config import LspConfig, ModelConfig
    from sparring.generation import HFGenerator, SamplingParams
    from sparring.modeling import load_model, load_tokenizer
    from sparring.rewards import SelfJudge
    from sparring.rewards.self_judge import SELF_REWARD_PROMPT

    out = root / "judge_probe.json"
    if out.exists():
        return json.loads(out.read_text())
    model_cfg = ModelConfig(name_or_path=str(theta0), dtype="float32")
    tokenizer, model = load_tokenizer(model_cfg), load_model(model_cfg)
    data = load_set(paths["validation"], tokenizer)
    idx = list(range(min(cfg.judge_probe, len(data.examples))))
    answers = HFGenerator(model, tokenizer).generate([data.prompt_ids[i] for i in idx],
                                                     SamplingParams.greedy(cfg.max_new_tokens), 0)
    lsp = LspConfig(judge_max_new_tokens=cfg.judge_max_new_tokens)
    prompt = cfg.judge_prompt if cfg.judge_rows_per_difficulty else SELF_REWARD_PROMPT
    judge = SelfJudge(judge_generate(Reference(copy=model), tokenizer, lsp, batch_size=cfg.judge_probe), prompt=prompt)
    start = time.time()
    queries, texts = [data.examples[i].prompt[-1]["content"] for i in idx], [a.text for a in answers]
    graded = judge(queries, texts)
    truth = [rubric(cfg, q, a) for q, a in zip(queries, texts)]
    parsed = [(s, r) for s, r, ok in zip(graded.scores, truth, graded.valid) if ok]
    result = {"graded": len(idx), "parsed_frac": 1 - graded.num_fallbacks / len(idx),
              "seconds_per_grade": (time.time() - start) / len(idx), "scores": list(graded.scores),
              "rubric": truth, "taught": cfg.judge_rows_per_difficulty > 0,
              # of the parsed grades: mean |grade − rubric| and the share exactly right
              "abs_error": sum(abs(s - r) for s, r in parsed) / len(parsed) if parsed else None,
              "exact": sum(s == r for s, r in parsed) / len(parsed) if parsed else None}
    from sparring.state import atomic_write_json

    atomic_write_json(out, result)
    return result


# 3–4. runs -----------------------------------------------------------------------------------------


def lsp_overrides(cfg: LspGroundConfig, job: Job, out: Path, paths: dict[str, Path], theta0: Path) -> dict:
    """Dotted settings of one RL run (Python values, applied after the preset and ``cfg.overrides``)."""
    settings = {
        "output_dir": str(out), "model.name_or_path": str(theta0), "model.build_proving_ground": False,
        "eval.source": str(paths["validation"]), "eval.split": "train", "eval.num_examples": None,
        "eval.max_new_tokens": cfg.max_new_tokens, "train.lr": job.lr, "train.seed": job.seed,
        "train.warmup_ratio": 0.0, "generation.seed": job.seed, "lsp.steps": cfg.steps,
        "lsp.num_queries": cfg.num_queries, "lsp.answers_per_query": cfg.answers_per_query,
        "lsp.kl_coef": cfg.kl_coef, "lsp.temperature": cfg.temperature, "lsp.eval_every": cfg.eval_every,
        "lsp.save_every": cfg.eval_every, "lsp.sample_every": cfg.eval_every, "lsp.keep_models": True,
        "lsp.query_max_new_tokens": cfg.query_max_new_tokens, "lsp.answer_max_new_tokens": cfg.max_new_tokens,
        "lsp.challenger_prompt": cfg.challenger_prompt, "lsp.difficulties": [str(d) for d in cfg.difficulties],
        "lsp.query_source": "challenger", "lsp.prompts": None, "lsp.variant": "zero",
        "lsp.self_reward_prompt": cfg.judge_prompt if cfg.judge_rows_per_difficulty else None,
        "lsp.judge_max_new_tokens": cfg.judge_max_new_tokens,
        **ARM_SETTINGS[job.arm],
    }
    if job.arm == "grpo_data":
        settings.update({"lsp.prompts": str(paths["train"]), "lsp.difficulties": []})
    return settings


def lsp_run_config(cfg: LspGroundConfig, job: Job, out: Path, paths: dict[str, Path], theta0: Path):
    from sparring.config import RunConfig, _set_dotted, load_config, to_dict, validate

    data = to_dict(load_config(cfg.preset, cfg.overrides))
    for key, value in lsp_overrides(cfg, job, out, paths, theta0).items():
        _set_dotted(data, key, value)
    run_cfg = from_dict(RunConfig, data)
    validate(run_cfg)
    return run_cfg


def run_sft_arm(cfg: LspGroundConfig, job: Job, out: Path, paths: dict[str, Path], theta0: Path) -> None:
    """Continued SFT from θ0 on θ0's SFT mix, ``steps`` optimizer steps of ``sft_arm_batch_size`` rows,
    saving models/step{K} and the validation scores eval/step{K}.json as the LSP runs do."""
    from sparring.config import EvalConfig, ModelConfig
    from sparring.evaluation import evaluate
    from sparring.modeling import load_model, load_tokenizer
    from sparring.state import atomic_write_json
    from sparring.tasks.sft import sft_steps

    if all((out / "eval" / f"step{k}.json").exists() for k in eval_steps(cfg)):
        return
    model_cfg = ModelConfig(name_or_path=str(theta0), dtype="float32")
    tokenizer, model = load_tokenizer(model_cfg), load_model(model_cfg)
    eval_cfg = EvalConfig(source=str(paths["validation"]), split="train", verifier="proving_ground", max_new_tokens=cfg.max_new_tokens)
    validation = load_set(paths["validation"], tokenizer)
    done: list[int] = []

    def checkpoint(m) -> float:
        step = (len(done) + 1) * cfg.eval_every
        done.append(step)
        folder = out / "models" / f"step{step}"
        tmp = folder.with_name(folder.name + ".tmp")
        m.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)  # a killed earlier attempt's snapshot
        tmp.replace(folder)
        scores = {"label": f"step{step}", **evaluate(m, tokenizer, validation, eval_cfg)}
        atomic_write_json(out / "eval" / f"step{step}.json", scores)
        return scores["exact_match"]

    (out / "models").mkdir(parents=True, exist_ok=True)
    train = load_set(paths["train"], tokenizer)
    sft_steps(model, tokenizer, sft_encoded(cfg, tokenizer, train), steps=cfg.steps, lr=job.lr,
              batch_size=cfg.sft_arm_batch_size, seed=job.seed, evaluate=checkpoint, eval_every=cfg.eval_every)


def run_job(cfg_dict: dict, job: Job, root: str, paths: dict[str, str], theta0: str) -> str:
    """One (arm, lr, seed) run, in a worker process with one torch thread."""
    import torch

    torch.set_num_threads(1)
    cfg = from_dict(LspGroundConfig, cfg_dict)
    out, paths_p, theta0_p = run_dir(Path(root), job), {k: Path(v) for k, v in paths.items()}, Path(theta0)
    if job.arm == "sft":
        run_sft_arm(cfg, job, out, paths_p, theta0_p)
    elif not RunDir(out).is_done("final"):  # a finished run is not reopened (its report rewritten)
        from sparring.algorithms.lsp import run

        run(lsp_run_config(cfg, job, out, paths_p, theta0_p))
    return job.name


def validation_score(root: Path, job: Job, steps: int) -> float | None:
    path = run_dir(root, job) / "eval" / f"step{steps}.json"
    return json.loads(path.read_text())["exact_match"] if path.exists() else None


def choose_rate(scores: dict[float, float | None]) -> float:
    """The rate with the best validation score; ties (and missing scores last) go to the smaller rate."""
    return max(sorted(scores), key=lambda lr: -1.0 if scores[lr] is None else scores[lr])


# 5. test scores ------------------------------------------------------------------------------------


def score_job(cfg_dict: dict, model_dir: str, test_path: str, out: str) -> str:
    """Per-prompt test scores and challenger validity of one model, cached in ``out``."""
    from sparring.evaluation.sampled import score_prompts
    from sparring.state import atomic_write_json

    if Path(out).exists():
        return out
    cfg = from_dict(LspGroundConfig, cfg_dict)
    tokenizer, model = open_model(model_dir)
    scores = score_prompts(model, tokenizer, load_set(Path(test_path), tokenizer), check, k=cfg.eval_k,
                           temperature=cfg.eval_temperature, max_new_tokens=cfg.max_new_tokens,
                           batch_size=cfg.eval_batch_size, seed=1234)
    validity = challenger_validity(model, tokenizer, cfg, seed=1234)
    atomic_write_json(Path(out), {"scores": scores.to_dict(), **validity})
    return out


def test_file(root: Path, job: Job, step: int) -> Path:
    return run_dir(root, job) / "test" / f"step{step}.json"


# the command ---------------------------------------------------------------------------------------


def run(cfg: LspGroundConfig, *, command: str = "sparring experiment configs/experiments/lsp.yaml") -> Path:
    """Every stage (each skipped when its files exist), then the report section; returns the report."""
    started, root, paths, theta0 = open_experiment(cfg, write_data, build_theta0)
    probe = probe_judge(cfg, paths, theta0, root)
    arms = [a for a in cfg.arms if a != "lsp" or probe["parsed_frac"] > 0]  # LSP needs grades that parse
    cfg_dict = asdict(cfg)
    common = (str(root), {k: str(v) for k, v in paths.items()}, str(theta0))

    grid = [Job(a, lr, cfg.seeds[0]) for a in arms for lr in cfg.lr_grid]
    parallel(run_job, [(cfg_dict, j, *common) for j in grid], cfg.workers)
    chosen = {a: choose_rate({lr: validation_score(root, Job(a, lr, cfg.seeds[0]), cfg.steps) for lr in cfg.lr_grid})
              for a in arms}
    final = [Job(a, chosen[a], s) for a in arms for s in cfg.seeds]
    parallel(run_job, [(cfg_dict, j, *common) for j in final if j.seed != cfg.seeds[0]], cfg.workers)

    tests = [(cfg_dict, str(theta0), str(paths["test"]), str(root / "test" / "theta0.json"))]
    tests += [(cfg_dict, str(run_dir(root, j) / "models" / f"step{k}"), str(paths["test"]), str(test_file(root, j, k)))
              for j in final for k in eval_steps(cfg)]
    parallel(score_job, tests, cfg.workers)

    return write_report(cfg, root, theta0, probe, chosen, final, wall_seconds=add_wall_time(root, started),
                        command=command)


# 6. report -----------------------------------------------------------------------------------------


def load_test(path: Path) -> dict:
    from sparring.evaluation.sampled import PromptScores

    data = json.loads(path.read_text())
    data["scores"] = PromptScores(**data["scores"])
    return data


def training_rows(root: Path, job: Job) -> list[dict]:
    path = run_dir(root, job) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if r.get("kind") == "lsp"]


def value_histogram(values: list[float], bins: int = 5) -> list[float]:
    """Shares of V(q) in [0, 0], (0, 1/(b−2)], …, (·, 1), [1, 1]: exactly 0, b − 2 equal bins of
    the open interval (0, 1), exactly 1 (V = 0 or 1: a group without signal under a 0/1 verifier)."""
    counts = [0] * bins
    for v in values:
        counts[0 if v <= 0 else bins - 1 if v >= 1 else 1 + min(int(v * (bins - 2)), bins - 3)] += 1
    return [c / max(len(values), 1) for c in counts]


def expected_signal(correct: list[int], k: int, g: int) -> float:
    """Plug-in share of groups with signal, mean over prompts of 1 − p^G − (1 − p)^G with p = c/k."""
    return sum(1 - (c / k) ** g - (1 - c / k) ** g for c in correct) / len(correct)


def replace_section(text: str, section: str, start: str = START, end: str = END) -> str:
    """``text`` with the part between the markers replaced by ``section`` (appended when absent)."""
    if start in text and end in text:
        return text[: text.index(start)] + section + text[text.index(end) + len(end):]
    return text.rstrip() + "\n\n" + section + "\n"


def write_report(cfg: LspGroundConfig, root: Path, theta0: Path, probe: dict, chosen: dict, final: list[Job], *,
                 wall_seconds: float, command: str) -> Path:
    from sparring.evaluation.metrics import paired_bootstrap, seed_spread
    from sparring.experiments.report import fmt, mean_over_seeds, over_seeds

    def spread(values: list[float]) -> tuple[float, float | None]:  # no ± for a single seed
        mean, std = seed_spread(values)
        return mean, (std if len(values) > 1 else None)

    base = load_test(root / "test" / "theta0.json")
    arms = list(chosen)
    jobs = {a: [j for j in final if j.arm == a] for a in arms}
    steps = eval_steps(cfg)
    per = {a: {k: [load_test(test_file(root, j, k)) for j in jobs[a]] for k in steps} for a in arms}
    from sparring.config import ModelConfig
    from sparring.modeling import load_tokenizer

    test = load_set(root / "data" / "test.jsonl", load_tokenizer(ModelConfig(name_or_path=str(theta0))))
    history = json.loads((theta0 / "sft_history.json").read_text())
    c = history["chosen"]
    g, last = cfg.answers_per_query, steps[-1]
    k = cfg.eval_k
    n_test = len(test.examples)

    def cell(runs: list[dict], metric: str) -> str:
        return fmt(*spread([r["scores"].summary()[metric] for r in runs]))

    lines = [START, "## LSP at the edge of competence (GRPO, LSP-Zero vs GRPO on data and continued SFT)", ""]
    lines += [
        "**Question (fixed before running).** From θ0 at the edge of competence (validation sampled pass@1 "
        f"≥ {cfg.target_pass1:g}, challenger validity ≥ {cfg.min_validity:g}), does solver-only GRPO on "
        "challenger-written prompts raise held-out test exact match? Do LSP-Zero (challenger trained too) and "
        "LSP (self-reward) beat GRPO on the data prompts (the paper's baseline) and continued SFT at equal "
        "optimizer steps?", "",
        f"**Setup.** Task `{cfg.family}` at difficulties {cfg.difficulties} ({DIFFICULTY_MEANS[cfg.family]}); per difficulty "
        f"{cfg.train_per_difficulty} train / {cfg.validation_per_difficulty} validation / "
        f"{cfg.test_per_difficulty} test prompts, disjoint. Challenger prompt: \"{cfg.challenger_prompt}\" "
        "(the difficulty knob), taught in θ0's SFT (each train row also as a challenger row). Model: the proving "
        f"ground's character-level Llama (hidden {cfg.hidden_size}, {cfg.layers} layers), SFT from scratch "
        f"(AdamW lr {cfg.sft_lr:g}, batch {cfg.sft_batch_size}), stopped at the first evaluation (every "
        f"{cfg.sft_eval_every} steps) meeting both targets. Arms from θ0, {cfg.steps} optimizer steps each: "
        f"RL arms N = {cfg.num_queries} queries × G = {g} answers per step at T = {cfg.temperature:g}, verifier "
        f"reward, β = {cfg.kl_coef:g} (k3), no std scaling, AdamW, linear decay; continued SFT batch "
        f"{cfg.sft_arm_batch_size} of the θ0 mix. Learning rate per arm from the shared grid {cfg.lr_grid} "
        f"picked on VALIDATION greedy exact match at step {cfg.steps} (seed {cfg.seeds[0]}); seeds {cfg.seeds}. "
        f"Test: greedy exact match, sampled pass@1 from k = {k} samples at T = {cfg.eval_temperature:g}; "
        f"challenger validity from {cfg.validity_samples} queries per difficulty. Intervals: 95% paired "
        "bootstrap over test prompts of the seed-averaged per-prompt score.", "",
    ]
    curve = ", ".join(f"{h['step']}: {h['pass@1']:.2f}/{h['validity']:.2f}" for h in history["history"])
    lines += [f"**θ0.** {'Reached' if history['reached'] else 'Did NOT reach'} the edge-of-competence targets: "
              f"step {c['step']}, validation greedy {c['exact_match']:.3f}, sampled pass@1 {c['pass@1']:.3f} ("
              + ", ".join(f"d={d}: {v:.2f}" for d, v in c["pass@1_by_difficulty"].items())
              + "), challenger validity (parseable and of the asked difficulty) "
              + ", ".join(f"d={d}: {v:.2f}" for d, v in c["on_difficulty"].items())
              + f". SFT curve (step: pass@1/validity): {curve}. Plug-in share of groups with signal at "
              f"G = {g} from θ0's test pass rates: {expected_signal(base['scores'].correct, k, g):.2f}.", ""]
    taught = probe.get("taught", False)
    how = (f"the short grading prompt \"{cfg.judge_prompt}\", taught in its SFT on "
           f"{cfg.judge_rows_per_difficulty} rubric-graded rows per difficulty (a model trained from scratch has no "
           "judging ability of its own; `rubric` makes the paper's seven criteria checkable: a known task, of an "
           "asked difficulty, a one-line answer, of the answer's characters, length and multiset, and right)"
           if taught else "the built-in rubric prompt (spec B.5)")
    agreement = (f"; of the parsed grades {probe['exact']:.0%} equal the rubric's, mean |grade − rubric| "
                 f"{probe['abs_error']:.2f}" if probe.get("exact") is not None else "")
    lines += [f"**Self-reward (LSP) feasibility.** θ0 graded {probe['graded']} of its own greedy answers to "
              f"validation prompts with {how}: {probe['parsed_frac']:.0%} of the grades parsed{agreement} "
              f"({probe['seconds_per_grade']:.2f} s per grade). "
              + ("The LSP arm ran." if "lsp" in arms else
                 "With no grade parsing R_Q ≡ 0 and LSP would be LSP-Zero at a judge pass's cost: the arm is "
                 "not run (the tiny judge cannot grade: its 256-position, character-level context is shorter than "
                 "the grading prompt)." if "lsp" in cfg.arms or probe["parsed_frac"] == 0 else
                 "The LSP arm is not in this configuration."), ""]
    lines += ["**Learning rates (validation greedy exact match at the last step, seed "
              f"{cfg.seeds[0]}).**", "", "| arm | lr: validation exact match | chosen |", "|---|---|---|"]
    for a in arms:
        cells = ", ".join(f"{lr:g}: {validation_score(root, Job(a, lr, cfg.seeds[0]), cfg.steps):.3f}" for lr in cfg.lr_grid)
        lines.append(f"| {a} | {cells} | {chosen[a]:g} |")
    b = base["scores"].summary()
    lines += ["", f"**Test ({n_test} prompts), {over_seeds(cfg.seeds)}.** θ0: greedy exact match "
              f"{b['exact_match']:.3f}, sampled pass@1 {b['pass@1']:.3f}.", "",
              "| arm | step | greedy exact match | sampled pass@1 | challenger validity |", "|---|---|---|---|---|"]
    for a in arms:
        for s in steps:
            validity = fmt(*spread([min(r["on_difficulty"].values()) for r in per[a][s]]))
            lines.append(f"| {a} (lr {chosen[a]:g}) | {s} | {cell(per[a][s], 'exact_match')} | "
                         f"{cell(per[a][s], 'pass@1')} | {validity} |")
    lines += ["", f"**Per difficulty at step {last}** (greedy exact match / sampled pass@1, mean over seeds).", "",
              "| arm | " + " | ".join(f"d={d}" for d in cfg.difficulties) + " |", "|---|" + "---|" * len(cfg.difficulties)]
    rows = [("θ0", [base])] + [(a, per[a][last]) for a in arms]
    for name, runs in rows:
        em = [by_difficulty(test, r["scores"].per_prompt("exact_match")) for r in runs]
        p1 = [by_difficulty(test, r["scores"].per_prompt("pass@1")) for r in runs]
        lines.append(f"| {name} | " + " | ".join(
            f"{sum(e[d] for e in em) / len(em):.3f} / {sum(p[d] for p in p1) / len(p1):.3f}" for d in cfg.difficulties) + " |")
    lines += ["", f"**Step {last} vs θ0 and vs GRPO on data prompts, paired over test prompts.** Difference of "
              "means [95% CI].", "", "| arm | metric | vs θ0 | vs grpo_data | verdict |", "|---|---|---|---|---|"]
    for a in arms:
        for m in ("exact_match", "pass@1"):
            mine = mean_over_seeds([r["scores"] for r in per[a][last]], m)
            d0 = paired_bootstrap(mine, base["scores"].per_prompt(m))
            dd = (paired_bootstrap(mine, mean_over_seeds([r["scores"] for r in per["grpo_data"][last]], m))
                  if "grpo_data" in per and a != "grpo_data" else None)
            verdict = "better than θ0" if d0[1] > 0 else "worse than θ0" if d0[2] < 0 else "no difference from θ0"
            if dd is not None:
                verdict += "; " + ("better than" if dd[1] > 0 else "worse than" if dd[2] < 0 else "no difference from") + " grpo_data"
            vs_d = f"{dd[0]:+.3f} [{dd[1]:+.3f}, {dd[2]:+.3f}]" if dd else "–"
            lines.append(f"| {a} | {m} | {d0[0]:+.3f} [{d0[1]:+.3f}, {d0[2]:+.3f}] | {vs_d} | {verdict} |")
    hist_labels = ["0", "(0, ⅓]", "(⅓, ⅔]", "(⅔, 1)", "1"]
    lines += ["", "**Training diagnostics (RL arms, all seeds, every step).** Query validity: share of the step's "
              "queries the verifier could parse; signal: share of groups whose G rewards are not all equal; "
              "V(q) = mean reward of a query's G answers, histogram over every query.", "",
              "| arm | query validity | signal (first → last eval window) | mean reward | V(q): "
              + " / ".join(hist_labels) + " |", "|---|---|---|---|---|"]
    hists = {}
    for a in arms:
        if a == "sft":
            continue
        train = [training_rows(root, j) for j in jobs[a]]
        flat = [r for rows_ in train for r in rows_]
        if not flat:
            continue
        window = [[r["lsp/signal_frac"] for r in flat if lo < r["step"] <= lo + cfg.eval_every] for lo in (0, last - cfg.eval_every)]
        hists[a] = value_histogram([v for r in flat for v in r.get("lsp/query_values", [])])
        validity = 1 - sum(r["lsp/invalid_query_frac"] for r in flat) / len(flat)
        reward = sum(r["lsp/reward"] for r in flat) / len(flat)
        lines.append(f"| {a} | {validity:.3f} | {sum(window[0]) / len(window[0]):.2f} → {sum(window[1]) / len(window[1]):.2f} | "
                     f"{reward:.3f} | " + " / ".join(f"{h:.2f}" for h in hists[a]) + " |")
    plot_path = Path(cfg.plot)
    plot(cfg, base, per, chosen, hists, hist_labels, plot_path)
    lines += ["", f"![lsp]({os.path.relpath(plot_path, Path(cfg.report).parent)})", "",
              f"Command: `{command}`; machine: {platform.machine()} CPU, {os.cpu_count()} cores, 1 torch thread per "
              f"worker, {cfg.workers} workers; date {datetime.date.today().isoformat()}; wall time "
              f"{wall_seconds / 60:.1f} min. Every run is kept under `{cfg.output_dir}`.", END]
    report = Path(cfg.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    text = report.read_text() if report.exists() else "# Results\n"
    section = "\n".join(lines)
    report.write_text(replace_section(text, section))
    (root / "summary.json").write_text(json.dumps(
        {a: {s: {m: seed_spread([r["scores"].summary()[m] for r in runs]) for m in ("exact_match", "pass@1")}
             for s, runs in by_s.items()} for a, by_s in per.items()}, indent=1))
    print(section)
    return report


def plot(cfg: LspGroundConfig, base: dict, per: dict, chosen: dict, hists: dict, labels: list[str], path: Path) -> None:
    """Test greedy exact match and sampled pass@1 vs step (mean ± std over seeds), and V(q) histograms."""
    from sparring.experiments.report import new_figure, over_seeds, save_figure, seed_curve

    fig, axes = new_figure(3, (15, 4))
    for ax, m in zip(axes, ("exact_match", "pass@1")):
        for a, by_s in per.items():
            by_step = {step: [r["scores"].summary()[m] for r in runs] for step, runs in by_s.items()}
            seed_curve(ax, base["scores"].summary()[m], by_step, f"{a} (lr {chosen[a]:g})")
        ax.set(title=f"test {'greedy exact match' if m == 'exact_match' else 'sampled pass@1'}", xlabel="optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    width = 0.8 / max(len(hists), 1)
    for i, (a, h) in enumerate(hists.items()):
        axes[2].bar([x + i * width for x in range(len(h))], h, width=width, label=a)
    axes[2].set(title="V(q) over training (share of queries)", xticks=[x + 0.4 - width / 2 for x in range(len(labels))])
    axes[2].set_xticklabels(labels)
    axes[2].legend(fontsize=8)
    save_figure(fig, path, f"LSP at the edge of competence: test split, {over_seeds(cfg.seeds)}")
