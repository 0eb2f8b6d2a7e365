"""The proving ground's data and its tiny SFT model, trained from scratch on CPU by the SFT method.

Writes  {sft.output_dir}/data/train.jsonl, data/eval.jsonl  (messages format) and the model
(safetensors + character tokenizer + chat template) to ``model_dir``. ``sft_steps`` is the step-count
SFT with early stopping the experiments fit their θ0 with, on the same step engine.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch

from sparring.config import ConfigError, DataConfig, EvalConfig, ModelConfig, RunConfig, SftConfig, TrainConfig
from sparring.data import encode, parse_row
from sparring.logprobs import collate, sequence_logps
from sparring.progress import progress
from sparring.state import RunDir, atomic_write_json, write_jsonl
from sparring.tasks.problems import make_rows
from sparring.tasks.tiny import build_tiny_model, build_tokenizer
from sparring.training.engine import Engine, Work
from sparring.training.signals import StopRequest


def write_data(cfg: SftConfig) -> tuple[Path, Path]:
    data_dir = Path(cfg.output_dir) / "data"
    train_path, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    if not (train_path.exists() and eval_path.exists()):
        rows = make_rows(cfg.num_train + cfg.num_eval, cfg.seed, tuple(cfg.families))
        write_jsonl(eval_path, rows[cfg.num_train :])
        write_jsonl(train_path, rows[: cfg.num_train])
    return train_path, eval_path


def warmup_cosine(steps: int):
    """The proving ground's schedule: warm-up over steps // 20 (from 1/warm-up of the peak), then
    cosine decay to 0 at ``steps``; a ``make_schedule`` for the step engine."""
    warmup = max(1, steps // 20)

    def make(optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    return make


def sft_steps(model, tokenizer, encoded: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
              batch_size: int, seed: int, evaluate=None, eval_every: int = 0, patience: int = 0,
              stop_at: float | None = None, accelerator=None) -> list[dict]:
    """Masked next-token loss on the responses (mean over the batch's response tokens) for ``steps``
    steps of ``batch_size`` examples drawn without replacement per step (``random.Random(seed)``),
    AdamW with warm-up and cosine decay (``warmup_cosine``), on the shared step engine.

    With ``evaluate(model) -> float`` every ``eval_every`` steps, training stops once ``patience``
    evaluations in a row did not beat the best, and the best weights are put back (early stopping on
    a validation split). With ``stop_at``, training also stops at the first evaluation scoring
    ≥ stop_at, keeping those weights (a target reached, e.g. the edge of competence). Returns the
    evaluation history [{"step", "score", "loss"}].
    """
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=next(model.parameters()).device.type == "cpu")
    cfg = TrainConfig(optimizer="adamw", lr=lr, weight_decay=0.0, max_grad_norm=1.0, batch_size=batch_size, seed=seed)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    engine = Engine(model, cfg, accelerator, total_steps=steps, checkpoints=None, where="sft",
                    make_schedule=warmup_cosine(steps))
    model = engine.model
    history, best, best_state, waited = [], -math.inf, None, 0

    def work(model) -> Work:
        batch = collate(rng.sample(encoded, min(batch_size, len(encoded))), tokenizer.pad_token_id)
        batch = type(batch)(*(x.to(accelerator.device) for x in batch))
        tokens = batch.response_mask[:, 1:].sum()
        loss = -sequence_logps(model, batch).sum() / tokens  # summed over response tokens, per token
        accelerator.backward(loss)
        return Work({"loss": loss.item()}, {"loss": 1.0}, [] if torch.isfinite(loss) else [0],
                    int(batch.attention_mask.sum()))

    bar = progress(range(steps), desc="sft", unit="step")
    with StopRequest() as stop:
        for step in bar:
            end = engine.step(work, stop, done=step + 1)
            loss = end.metrics["loss"]
            bar.set_postfix(loss=f"{loss:.3f}")
            engine.finish(step + 1, end, save=False)
            if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
                score = evaluate(accelerator.unwrap_model(model))
                model.train()
                history.append({"step": step + 1, "score": score, "loss": loss})
                if score > best or (stop_at is not None and score >= stop_at):
                    best, waited = score, 0
                    best_state = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
                    if stop_at is not None and score >= stop_at:
                        break
                else:
                    waited += 1
                    if patience and waited >= patience:
                        break
    model = accelerator.unwrap_model(model)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    accelerator.free_memory()
    return history


def challenger_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Challenger rows, encoded: (challenger prompt as a user turn, a query as the reply) per pair,
    so the model learns to write queries when prompted with that (slot-filled) prompt."""
    return [encode(tokenizer, [{"role": "user", "content": prompt}], query) for prompt, query in pairs]


def build_proving_ground(cfg: SftConfig, model_dir: str | Path | None = None) -> Path:
    """Data, then the tiny model trained from scratch by the SFT method (``algorithms.sft``) with the
    proving ground's preset (``proving_ground_config``); returns the model directory.

    Writes {output_dir}/data/{train,eval,sft}.jsonl, the untrained model at {output_dir}/init, the SFT
    run at {output_dir}/sft-run (resumable like any run) and the model at ``model_dir`` (default
    {output_dir}/sft) with ``sft_summary.json`` (held-out scores, seconds, steps)."""
    from sparring import algorithms
    from sparring.modeling import launched_world_size

    root = Path(cfg.output_dir)
    model_dir = Path(model_dir or root / "sft")
    train_path, eval_path = write_data(cfg)
    if (model_dir / "config.json").exists():
        return model_dir
    if launched_world_size() > 1:
        raise ConfigError(f"the proving ground is missing at {model_dir}: build it first in one process "
                          "(`sparring sft` with the same config), then launch the multi-process run")
    start = time.time()
    base, data = root / "init", root / "data" / "sft.jsonl"
    if not (base / "config.json").exists():
        tokenizer = build_tokenizer()
        build_tiny_model(tokenizer, hidden_size=cfg.hidden_size, layers=cfg.layers, heads=cfg.heads,
                         seed=cfg.seed).save_pretrained(base)
        tokenizer.save_pretrained(base)
    if not data.exists():  # the training rows, plus the challenger rows when asked for
        rows = [json.loads(line) for line in train_path.read_text().splitlines()]
        if cfg.challenger_prompt:  # the challenger prompt in, one of the training queries out
            rows += [{"messages": [{"role": "user", "content": cfg.challenger_prompt},
                                   {"role": "assistant", "content": parse_row(r).prompt[-1]["content"]}]} for r in rows]
        write_jsonl(data, rows)
    run_cfg = proving_ground_config(cfg, base, data, eval_path, sum(1 for _ in data.open()))
    algorithms.get("sft")(run_cfg)
    run_dir = RunDir(run_cfg.output_dir)
    trained = run_dir.model(0)
    scores = json.loads(run_dir.eval_file(run_dir.stage_iteration(0)).read_text())
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(trained, tmp)
    steps = run_dir.stage_info(run_dir.stage_iteration(0))["steps"]
    atomic_write_json(tmp / "sft_summary.json", {**scores, "seconds": round(time.time() - start, 1), "steps": steps})
    tmp.replace(model_dir)
    print(f"proving-ground SFT model: {model_dir}  held-out exact match {scores['exact_match']:.3f}")
    return model_dir


def proving_ground_config(cfg: SftConfig, base: Path, data: Path, eval_path: Path, rows: int) -> RunConfig:
    """The SFT method's preset for the proving ground: AdamW at ``sft.lr``, batch ``sft.batch_size``,
    as many epochs as ``sft.steps`` steps need (rounded up), 5% warm-up then cosine decay, no sequence cut."""
    return RunConfig(
        method="sft", output_dir=str(Path(cfg.output_dir) / "sft-run"),
        model=ModelConfig(name_or_path=str(base), dtype="float32"),
        data=DataConfig(source=str(data), max_prompt_length=100_000, max_length=100_000),
        train=TrainConfig(optimizer="adamw", lr=cfg.lr, weight_decay=0.0, warmup_ratio=0.05, lr_scheduler="cosine",
                          epochs=max(1, math.ceil(cfg.steps * cfg.batch_size / rows)), batch_size=cfg.batch_size,
                          max_grad_norm=1.0, save_steps=100, seed=cfg.seed, mixed_precision="no"),
        eval=EvalConfig(source=str(eval_path), verifier="proving_ground"),
    )
