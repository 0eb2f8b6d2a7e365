"""lm-evaluation-harness tasks (``eval.lm_eval``) on an in-memory model: the benchmarks the papers report
(ARC, HellaSwag, TruthfulQA, MMLU, Winogrande, GSM8K), or tasks of your own (``eval.lm_eval.include_path``).

``lm_eval`` is an optional dependency (``pip install 'sparring[eval]'``), imported only when a run sets
``eval.lm_eval.tasks``. Scores come back flat, ``{"lm_eval/<task>/<metric>": float}``, beside the
held-out scores of the same model in its eval/<label>.json.
"""

from __future__ import annotations

import functools
import random
from contextlib import contextmanager
from importlib.util import find_spec
from typing import Any

import numpy as np
import torch

from sparring.config import ConfigError, LmEvalConfig

PREFIX = "lm_eval/"
INSTALL = "pip install 'sparring[eval]'"


def check_installed() -> None:
    """Refuse eval.lm_eval.tasks when lm-evaluation-harness is not installed."""
    if find_spec("lm_eval") is None:
        raise ConfigError(f"eval.lm_eval.tasks needs lm-evaluation-harness, which is not installed: {INSTALL}, "
                          "or remove eval.lm_eval.tasks")


def run_lm_eval(model, tokenizer, cfg: LmEvalConfig, accelerator=None) -> dict[str, float]:
    """``cfg.tasks`` on ``model``, as flat scores. With an ``accelerator`` of several processes every one of
    them calls this and scores a share of the requests (each holding the whole model); the main process
    gets the scores, the others ``{}``. The model comes back in its train/eval mode, and the random
    generators of Python, NumPy and torch in their state (lm_eval seeds them)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    try:
        with kept_rng():
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
            if accelerator is not None and accelerator.num_processes > 1:
                share(lm, accelerator)
            results = simple_evaluate(model=lm, tasks=list(cfg.tasks), task_manager=task_manager(cfg.include_path),
                                      num_fewshot=cfg.num_fewshot, limit=cfg.limit, log_samples=False,
                                      apply_chat_template=cfg.apply_chat_template, bootstrap_iters=0)
    finally:
        model.train(was_training)
    return flat_scores(results) if results is not None else {}


def share(lm, accelerator) -> None:
    """lm_eval's data parallelism for a model passed in memory (which it runs on one process otherwise):
    this process is rank ``process_index`` of ``num_processes``; lm_eval shares out the requests, pads
    the shares to one length and gathers the metrics on rank 0."""
    lm.accelerator = accelerator
    lm._rank = accelerator.process_index
    lm._world_size = accelerator.num_processes


@functools.cache
def task_manager(include_path: str | None):
    """lm_eval's index of its tasks and those under ``include_path``: built once per process (seconds)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def flat_scores(results: dict[str, Any]) -> dict[str, float]:
    """``simple_evaluate``'s results as ``{"lm_eval/<task>/<metric>": value}``: the tasks and groups the run
    named (a subtask of a group that aggregates it is left out), numeric metrics only, no ``*_stderr``; the
    default filter's ",none" suffix is dropped, another filter's name joins with "_" (exact_match_strict-match)."""
    aggregated = results.get("groups", {})
    hidden = {child for group, children in results.get("group_subtasks", {}).items() if group in aggregated
              for child in children}
    return {f"{PREFIX}{task}/{metric_name(key)}": float(value)
            for task, metrics in results["results"].items() if task not in hidden
            for key, value in metrics.items() if is_score(key, value)}


def is_score(key: str, value: Any) -> bool:
    """A metric is "<metric>,<filter>" (bookkeeping such as "alias" or "sample_len" has no filter), a number."""
    name, comma, _ = key.partition(",")
    return bool(comma) and not name.endswith("_stderr") and isinstance(value, (int, float)) and not isinstance(value, bool)


def metric_name(key: str) -> str:
    """"acc,none" -> "acc"; "exact_match,strict-match" -> "exact_match_strict-match"."""
    name, _, filter_name = key.partition(",")
    return name if filter_name in ("", "none") else f"{name}_{filter_name}"


@contextmanager
def kept_rng():
    """Restore the Python, NumPy and torch (CPU and CUDA) random states on exit."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
