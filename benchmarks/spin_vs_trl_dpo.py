"""One SPIN training pass (precomputed opponent log-probs + the shared loop) next to TRL's DPOTrainer
on the same pairs, model and settings: wall time and peak memory, with their ratios.

SPIN's loss is DPO's sigmoid loss with chosen = real, rejected = generated and reference = the
opponent θ_t, so TRL's DPOTrainer (precompute_ref_log_probs=True) is the natural peer. Each side runs
in its own subprocess so peak RSS is its own.

Two kinds of data:
- ``--vocab N`` (default 32000): the real shapes of ``real_shapes.py`` (its tokenizer of N tokens, its
  Llama, its UltraChat-like lengths scaled by ``--length-scale``, its sides: sparring with
  ``train.group_by_length`` and TRL at its defaults); defaults 32 pairs, hidden 512, 8 layers, batch 4;
- ``--vocab 0``: the proving ground (a character tokenizer, rows of at most 96 tokens); defaults
  512 pairs, hidden 256, 4 layers, batch 16 — the benchmark as first recorded.

    python benchmarks/spin_vs_trl_dpo.py [--pairs 32] [--hidden 512] [--layers 8] [--vocab 32000]
    python benchmarks/spin_vs_trl_dpo.py --vocab 0 --pairs 512 --hidden 256 --layers 4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = dict(lr=1e-5, batch_size=16, epochs=1, beta=0.1, max_length=96)


def make_data(folder: Path, pairs: int, hidden: int, layers: int) -> None:
    import random

    from sparring.tasks import build_tiny_model, build_tokenizer, make_rows

    tok = build_tokenizer()
    build_tiny_model(tok, hidden_size=hidden, layers=layers, heads=4, seed=0).save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    rng = random.Random(0)
    rows = []
    for r in make_rows(pairs, seed=1):
        prompt, real = r["messages"][:-1], r["messages"][-1]["content"]
        fake = "".join(rng.sample(real, len(real))) + "0"
        rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": real}],
                     "rejected": [{"role": "assistant", "content": fake}]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_sparring(folder: Path) -> dict:
    from functools import partial

    from accelerate import Accelerator

    from sparring.algorithms.spin import PairRecord, collate_pairs, spin_step
    from sparring.config import ModelConfig, TrainConfig
    from sparring.data import encode
    from sparring.modeling import load_model, load_tokenizer
    from sparring.training import MetricsLogger, score_sequences, train

    start = time.perf_counter()
    tok = load_tokenizer(ModelConfig(name_or_path=str(folder / "model")))
    model = load_model(ModelConfig(name_or_path=str(folder / "model")))
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    enc = [(encode(tok, r["prompt"], r["chosen"][0]["content"], max_length=COMMON["max_length"]),
            encode(tok, r["prompt"], r["rejected"][0]["content"], max_length=COMMON["max_length"])) for r in rows]
    items = [(p, y) for (p, y), _ in enc] + [(p, g) for _, (p, g) in enc]
    work = Path(tempfile.mkdtemp())
    logps = score_sequences(model, items, pad_id=tok.pad_token_id, batch_size=64, folder=work / "ref")
    n = len(rows)
    records = [PairRecord(p, y, g, logps[i], logps[n + i]) for i, ((p, y), (_, g)) in enumerate(enc)]
    cfg = TrainConfig(optimizer="adamw", lr=COMMON["lr"], epochs=COMMON["epochs"], batch_size=COMMON["batch_size"],
                      save_steps=10**9, logging_steps=10**9)
    train(model, records, collate=partial(collate_pairs, pad_id=tok.pad_token_id),
          loss_step=partial(spin_step, scale=COMMON["beta"], kind="sigmoid"), cfg=cfg,
          accelerator=Accelerator(cpu=True), folder=work, logger=MetricsLogger(work / "m.jsonl", None),
          log_fields={"iteration": 0})
    return {"seconds": time.perf_counter() - start}


def run_trl(folder: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model")
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    args = DPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=COMMON["batch_size"],
                     num_train_epochs=COMMON["epochs"], learning_rate=COMMON["lr"], beta=COMMON["beta"],
                     loss_type=["sigmoid"], max_length=COMMON["max_length"], precompute_ref_log_probs=True,
                     precompute_ref_batch_size=64, report_to="none", save_strategy="no", logging_steps=10**9,
                     use_cpu=True, bf16=False, optim="adamw_torch", lr_scheduler_type="linear", warmup_steps=0.1,
                     disable_tqdm=True, dataloader_num_workers=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    return {"seconds": time.perf_counter() - start}


def real_shapes_args(args) -> argparse.Namespace:
    """The settings of ``real_shapes.py`` for this run (its defaults, with this script's sizes)."""
    return argparse.Namespace(pairs=args.pairs, batch=4, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                              lr=1e-5, beta=0.1, max_prompt=512, max_length=768, max_new_tokens=256,
                              length_scale=args.length_scale, gen_prompts=0, scaling_base=0)


def real_shapes_opts(args) -> dict:
    import real_shapes

    rs = real_shapes_args(args)
    return {"pairs": rs.pairs, "batch": rs.batch, "lr": rs.lr, "beta": rs.beta,
            "max_length": real_shapes.scaled(rs)["max_length"]}


def child(side: str, folder: Path, args) -> None:
    """One side in this process. The libraries both sides use are imported before the clock starts, so
    that neither side's time holds imports the other made before it (transformers loads lazily)."""
    import importlib
    import resource

    import real_shapes

    for module in real_shapes.PRELOAD:
        importlib.import_module(module)

    if args.vocab:
        opts = real_shapes_opts(args)
        result = (real_shapes.run_sparring(folder, opts, opts["pairs"]) if side == "sparring"
                  else real_shapes.run_trl(folder, opts, best=False))
    else:
        result = (run_sparring if side == "sparring" else run_trl)(folder)
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, help="default 32 (512 with --vocab 0)")
    parser.add_argument("--hidden", type=int, help="default 512 (256 with --vocab 0)")
    parser.add_argument("--layers", type=int, help="default 8 (4 with --vocab 0)")
    parser.add_argument("--vocab", type=int, default=32000, help="0: the proving ground's character tokenizer")
    parser.add_argument("--length-scale", type=float, default=0.25, help="real_shapes.py's --length-scale")
    parser.add_argument("--child", choices=["sparring", "trl"])
    parser.add_argument("--folder")
    args = parser.parse_args()
    real = args.vocab > 0
    args.pairs = args.pairs or (32 if real else 512)
    args.hidden = args.hidden or (512 if real else 256)
    args.layers = args.layers or (8 if real else 4)
    if args.child:
        return child(args.child, Path(args.folder), args)
    folder = Path(tempfile.mkdtemp())
    if real:
        import real_shapes

        real_shapes.make_data(folder, real_shapes_args(args))
    else:
        make_data(folder, args.pairs, args.hidden, args.layers)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    results = {}
    for side in ("sparring", "trl"):
        proc = subprocess.run([sys.executable, __file__, "--child", side, "--folder", str(folder),
                               *sys.argv[1:]], capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
        out = proc.stdout
        results[side] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    s, t = results["sparring"], results["trl"]
    shape = (f"vocab={args.vocab} length-scale={args.length_scale:g} batch=4" if real
             else f"proving ground (characters) batch={COMMON['batch_size']}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; pairs={args.pairs} hidden={args.hidden} "
          f"layers={args.layers} {shape} epochs=1")
    print(f"{'':10} {'seconds':>9} {'peak RSS MiB':>13}")
    for name, r in results.items():
        print(f"{name:10} {r['seconds']:9.1f} {r['peak_rss_mib']:13.0f}")
    print(f"ratio sparring/trl: time {s['seconds'] / t['seconds']:.2f}, peak memory {s['peak_rss_mib'] / t['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
