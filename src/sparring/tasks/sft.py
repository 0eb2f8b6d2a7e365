"""`sparring sft`: the proving ground's data and a tiny SFT model, trained from scratch on CPU.

Writes  {sft.output_dir}/data/train.jsonl, data/eval.jsonl  (messages format) and the model
(safetensors + character tokenizer + chat template) to ``model_dir``.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

from sparring.config import EvalConfig, SftConfig
from sparring.data import encode, parse_row
from sparring.logprobs import collate, sequence_logps
from sparring.progress import progress
from sparring.state import atomic_write_json, write_jsonl
from sparring.tasks.problems import make_rows
from sparring.tasks.tiny import build_tiny_model, build_tokenizer


def write_data(cfg: SftConfig) -> tuple[Path, Path]:
    data_dir = Path(cfg.output_dir) / "data"
    train_path, eval_path = data_dir / "train.jsonl", data_dir / "eval.jsonl"
    if not (train_path.exists() and eval_path.exists()):
        rows = make_rows(cfg.num_train + cfg.num_eval, cfg.seed, tuple(cfg.families))
        write_jsonl(eval_path, rows[cfg.num_train :])
        write_jsonl(train_path, rows[: cfg.num_train])
    return train_path, eval_path


def sft_steps(model, tokenizer, encoded: list[tuple[list[int], list[int]]], *, steps: int, lr: float,
              batch_size: int, seed: int, evaluate=None, eval_every: int = 0, patience: int = 0,
              stop_at: float | None = None) -> list[dict]:
    """Masked next-token loss on the responses, AdamW with warm-up and cosine decay over ``steps``.

    With ``evaluate(model) -> float`` every ``eval_every`` steps, training stops once ``patience``
    evaluations in a row did not beat the best, and the best weights are put back (early stopping on
    a validation split). With ``stop_at``, training also stops at the first evaluation scoring
    ≥ stop_at, keeping those weights (a target reached, e.g. the edge of competence). Returns the
    evaluation history [{"step", "score", "loss"}].
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)),
    )
    rng = random.Random(seed)
    torch.manual_seed(seed)
    history, best, best_state, waited = [], -math.inf, None, 0
    model.train()
    bar = progress(range(steps), desc="sft", unit="step")
    for step in bar:
        batch = collate(rng.sample(encoded, min(batch_size, len(encoded))), tokenizer.pad_token_id)
        logps = sequence_logps(model, batch)  # (B,) summed over response tokens
        loss = -logps.sum() / batch.response_mask[:, 1:].sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
            score = evaluate(model)
            model.train()
            history.append({"step": step + 1, "score": score, "loss": loss.item()})
            if score > best or (stop_at is not None and score >= stop_at):
                best, waited = score, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if stop_at is not None and score >= stop_at:
                    break
            else:
                waited += 1
                if patience and waited >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def challenger_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Challenger rows, encoded: (challenger prompt as a user turn, a query as the reply) per pair,
    so the model learns to write queries when prompted with that (slot-filled) prompt."""
    return [encode(tokenizer, [{"role": "user", "content": prompt}], query) for prompt, query in pairs]


def build_proving_ground(cfg: SftConfig, model_dir: str | Path | None = None) -> Path:
    """Data + tiny model trained with masked next-token loss on the responses; returns the model dir."""
    model_dir = Path(model_dir or Path(cfg.output_dir) / "sft")
    train_path, eval_path = write_data(cfg)
    if (model_dir / "config.json").exists():
        return model_dir
    tokenizer = build_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=cfg.hidden_size, layers=cfg.layers, heads=cfg.heads, seed=cfg.seed)
    examples = [parse_row(json.loads(line)) for line in train_path.read_text().splitlines()]
    encoded = [encode(tokenizer, e.prompt, e.real) for e in examples]
    if cfg.challenger_prompt:  # challenger rows: the prompt in, one of the training queries out
        encoded += challenger_pairs(tokenizer, [(cfg.challenger_prompt, e.prompt[-1]["content"]) for e in examples])
    start = time.time()
    sft_steps(model, tokenizer, encoded, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
    model.eval()
    from sparring.evaluation import evaluate, load_eval_set

    eval_cfg = EvalConfig(source=str(eval_path))
    scores = evaluate(model, tokenizer, load_eval_set(eval_cfg, tokenizer, 256), eval_cfg)
    tmp = model_dir.with_name(model_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "sft_summary.json", {**scores, "seconds": round(time.time() - start, 1), "steps": cfg.steps})
    tmp.replace(model_dir)
    print(f"proving-ground SFT model: {model_dir}  held-out exact match {scores['exact_match']:.3f}")
    return model_dir
