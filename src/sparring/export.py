"""``sparring export RUN_DIR PROMPTS``: every model of a run answers a benchmark's prompts, written in the
answer file that benchmark reads.

Models: θ0 (the config's ``model.name_or_path``), then θ1 … θT (``run_dir.model(t)``) of SPIN, T-SPIN,
TPAW and SFT, or LSP's kept policies (``models/step<k>``) and its final one (``model/``);
``iterations="last"`` takes the newest alone. Each is named ``<run folder>-theta<t>`` (LSP:
``-step<k>``, ``-final``), the ``generator`` / ``model_id`` of its answers.

Formats:

- ``alpaca_eval``: prompts are AlpacaEval's eval set (a JSON list or JSON lines of rows with
  "instruction"); answers are ``<model>.json``, a JSON list of {"instruction", "output", "generator"};
- ``mt_bench``: prompts are MT-Bench's question.jsonl (rows with "question_id" and "turns"); answers
  are FastChat's ``model_answer/<model>.jsonl``: {"question_id", "answer_id", "model_id",
  "choices": [{"index": 0, "turns": [...]}], "tstamp"}, every turn answered with the conversation so far.

Answers are greedy by default (``temperature`` > 0 samples), at most ``max_new_tokens`` each, rendered
with the run's chat template (``data.chat``) and generated in length-sorted batches
(``evaluation.heldout.completions``).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sparring.config import RunConfig
from sparring.data import DataError, load_rows
from sparring.data.chat import encode
from sparring.evaluation.heldout import completions
from sparring.generation import HFGenerator, SamplingParams
from sparring.state import RunDir, atomic_write_json, atomic_write_text

FORMATS = ("alpaca_eval", "mt_bench")


@dataclass
class Question:
    key: int | str  # AlpacaEval: the row number; MT-Bench: question_id
    turns: list[str]  # the user turns, answered one after the other
    row: dict  # the prompt file's row


def models_of(run_dir: RunDir, cfg: RunConfig, iterations: str = "all") -> list[tuple[str, Path | None]]:
    """(name, saved model) of every model of the run in order (None: the base model, θ0); with
    ``iterations="last"`` the newest alone."""
    found: list[tuple[str, Path | None]] = [("theta0", None)]
    if cfg.method == "lsp":
        found += [(run_dir.lsp_step_label(k), path) for k, path in run_dir.step_models()]
        found += [("final", run_dir.final_model)] if saved(run_dir.final_model) else []
    else:
        count = getattr(getattr(cfg, cfg.method, None), "iterations", 1)
        found += [(f"theta{t + 1}", run_dir.model(t)) for t in range(count) if saved(run_dir.model(t))]
    return found[-1:] if iterations == "last" else found


def saved(folder: Path) -> bool:
    return (folder / "config.json").exists()


def load_questions(path: str | Path, fmt: str) -> list[Question]:
    """The prompt file's questions; a row without the format's fields is a DataError naming it."""
    rows = load_rows(str(path))
    questions = []
    for k, row in enumerate(rows):
        if fmt == "alpaca_eval" and isinstance(row.get("instruction"), str):
            questions.append(Question(k, [row["instruction"]], row))
        elif (fmt == "mt_bench" and "question_id" in row and isinstance(row.get("turns"), list) and row["turns"]
              and all(isinstance(t, str) for t in row["turns"])):
            questions.append(Question(row["question_id"], row["turns"], row))
        else:
            need = '"instruction" (text)' if fmt == "alpaca_eval" else '"question_id" and "turns" (a list of texts)'
            raise DataError(f"{path}: row {k} is no {fmt} question: it needs {need}")
    return questions


def answer(model, tokenizer, questions: list[Question], params: SamplingParams, batch_size: int,
           system_prompt: str | None = None, seed: int = 0) -> list[list[str]]:
    """Each question's answers, one per turn: turn k of every question that has one in one batched pass,
    each asked with the conversation so far (its earlier turns and this model's answers)."""
    generator = HFGenerator(model, tokenizer)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    replies: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(q.turns) for q in questions)):
        asked = [i for i, q in enumerate(questions) if len(q.turns) > turn]
        prompt_ids = [encode(tokenizer, system + conversation(questions[i], replies[i], turn))[0] for i in asked]
        texts = dict(completions(generator, prompt_ids, range(len(asked)), batch_size, params, seed=seed + turn))
        for j, i in enumerate(asked):
            replies[i].append(texts[j].text.strip())
    return replies


def conversation(question: Question, replies: list[str], turn: int) -> list[dict]:
    """The messages up to user turn ``turn``: the earlier turns with their answers, then the turn."""
    messages = []
    for k in range(turn):
        messages += [{"role": "user", "content": question.turns[k]}, {"role": "assistant", "content": replies[k]}]
    return messages + [{"role": "user", "content": question.turns[turn]}]


def write_answers(out: Path, fmt: str, model_id: str, questions: list[Question], replies: list[list[str]]) -> Path:
    """The answer file of one model in the benchmark's format."""
    if fmt == "alpaca_eval":
        path = out / f"{model_id}.json"
        atomic_write_json(path, [{"instruction": q.row["instruction"], "output": r[0], "generator": model_id}
                                 for q, r in zip(questions, replies, strict=True)])
        return path
    path = out / f"{model_id}.jsonl"
    lines = [{"question_id": q.key, "answer_id": uuid.uuid4().hex, "model_id": model_id,
              "choices": [{"index": 0, "turns": r}], "tstamp": time.time()} for q, r in zip(questions, replies, strict=True)]
    atomic_write_text(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return path


def export(run_dir: RunDir, cfg: RunConfig, prompts: str | Path, fmt: str, *, iterations: str = "all",
           out: Path | None = None, max_new_tokens: int = 1024, temperature: float = 0.0, batch_size: int = 8,
           seed: int = 0) -> list[Path]:
    """Every model's answer file (``out`` default ``run_dir.export(fmt)``), one model loaded at a time."""
    import torch

    from sparring.modeling import load_model, load_tokenizer

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; formats: {', '.join(FORMATS)}")
    questions = load_questions(prompts, fmt)
    params = (SamplingParams(do_sample=True, temperature=temperature, max_new_tokens=max_new_tokens) if temperature > 0
              else SamplingParams.greedy(max_new_tokens))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(cfg.model)
    out = Path(out) if out is not None else run_dir.export(fmt)
    written = []
    for name, path in models_of(run_dir, cfg, iterations):
        model = load_model(cfg.model, path, device=device)
        replies = answer(model, tokenizer, questions, params, batch_size, cfg.data.system_prompt, seed)
        del model
        written.append(write_answers(out, fmt, f"{run_dir.root.name}-{name}", questions, replies))
        print(f"{name}: {written[-1]}", flush=True)
    return written
