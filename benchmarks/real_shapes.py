"""SPIN at the shapes of real runs, next to TRL: one training pass, generation throughput and scaling.

``spin_vs_trl_dpo.py`` compares the two on the proving ground (a character tokenizer, 96-token rows).
This script measures the same things at the shapes a real SPIN run has, in one run:

1. one training pass (opponent log-probs + one epoch) on identical pairs, five ways:
   - ``sparring``: ``score_sequences`` (the opponent pass) then ``train`` with ``spin_step``, from ids, at a
     run's defaults: ``train.group_by_length`` and ``train.share_prompt`` (each prompt once for its real
     and generated response); ``sparring-unshared``: without ``share_prompt`` (one sequence per response);
     ``sparring-plain``: without either (batches in seeded random order);
   - ``trl-default``: TRL's ``DPOTrainer`` as documented for this use (``precompute_ref_log_probs=True``,
     ``loss_type=["sigmoid"]``), everything else at TRL's defaults but ``bf16=False`` (fp32 on both sides);
   - ``trl-best``: the same plus every ``DPOConfig`` option that cuts work and runs on a CPU (``TRL_BEST``:
     no gradient checkpointing, length-grouped batches); ``TRL_NOT_USED`` lists the others and why not.
   Wall seconds (model load to end of training) and peak RSS of each side's own process, with the
   ratios sparring/trl-default and sparring/trl-best.
2. generation throughput: the loop of the original SPIN ``generate.py`` (HF ``model.generate``, batches
   of ``--gen-batch`` 8 in data order, left padding to a multiple of 8, no sorting) vs. sparring's HF
   backend (``HFGenerator`` through ``generate_responses``: prompts sorted by length, sparring's decoding
   loop ``sparring.generation.decode``) at a run's default ``generation.batch_size`` (16), at the loop's
   batch (8) and at 32, and the same backend through ``model.generate`` (``loop="generate"``, batch 16:
   what sorting alone gives); same prompts, max_new_tokens and sampling (temperature 1, top-p 1, top-k 50,
   which is what HF's generate does when no top-k is set). Tokens counted are the ones each side actually
   produced (up to and including the stop id), so sampled lengths may differ; with a random-init model
   and a 32,000-token vocabulary a stop id is rare, so nearly every row runs to max_new_tokens on every
   side (the rows-at-max column says how many), and the dropping of finished rows is not exercised.
   ``--gen-prompts`` (128): a generation stage runs over every training prompt, and length sorting makes
   batches of prompts of near-equal length only when there are many (32 prompts in one batch of 32 span
   the whole length range). ``--stop-every K`` makes the model end its turns as a trained one does, at varied lengths (after about
   one sampled token in K, the same rule on every side: ``stop_after_marker``).
3. the sparring training pass (opponent pass + train, model load excluded) on N, 2N and 4N pairs:
   seconds and seconds per pair, which should stay flat if the cost grows linearly.
4. every measurement is repeated ``--repeats`` times (the sides interleaved); medians are printed.

Shapes. Vocabulary 32,000 (Llama-2 / Mistral / Zephyr size): a ``PreTrainedTokenizerFast`` with a
WordLevel vocabulary of 32,000 tokens (6 special ones, words ``w6`` … ``w31999``) and a chat template
``<|user|> … <|end|> <|assistant|> … <|end|>``; token ids are drawn uniformly from the words. A randomly
initialised ``LlamaForCausalLM``, hidden 512, 8 layers, 8 heads of 64, MLP 2.75 × hidden (TinyLlama's
ratio), untied embeddings (58.5M parameters, 56% of them in the embedding and the LM head, as in a
small real model), fp32, sdpa attention.

Lengths (tokens, chat template included) are log-normal, as UltraChat-200k's are (SPIN trains on its
first turns): prompt median 150, σ 0.9 (p90 ≈ 475, p99 ≈ 1,200: a median in the 100–200 range with a
tail past 1,500); response median 275, σ 0.6 (p90 ≈ 590, p99 ≈ 1,100), for the real y and, drawn
independently, for the generated y′ (SPIN's y′ come from the SFT model trained on those responses).
Draws are clipped, as a truncating data pipeline does: a prompt to ``--max-prompt`` (512: about 9% of
prompts reach it), a response to ``--max-length`` (768) minus its prompt. ``--length-scale`` multiplies
the medians, the caps and ``--max-new-tokens`` (256, SPIN's value) alike, keeping the shape of the
distribution: 1 is the real shapes; the default 0.25 (medians 38 / 69, caps 128 / 192, 64 new tokens)
keeps a 2-core CPU run to minutes. Lengths never exceed the caps, so TRL truncates nothing.

Same for every training side: the pairs, the saved model (one init), AdamW (TRL's default optimizer,
``adamw_torch_fused``, is the same update as torch's AdamW that sparring uses), lr 1e-5, weight decay 0,
linear schedule with 10% warm-up, gradient clipping at 1.0, β 0.1, 32 pairs in batches of 4 (8 steps),
one epoch, seed 42.
The opponent/reference pass runs at sparring's default ``logprob_batch_size`` (16, sorted by length)
and at TRL's default ``precompute_ref_batch_size`` (the training batch, in data order).

Each measurement runs in its own process, forked from a server that imported torch, transformers, TRL
and sparring once (multiprocessing's forkserver, which has run no torch op, so forking is safe): a
process start costs no import, which keeps ``--quick`` short. A process prints its ``RESULT {json}`` line
into its log; its peak RSS is its own ``ru_maxrss`` (which starts at the server's, the imports: the
same baseline for every side; the "above start" column leaves it out).

    python benchmarks/real_shapes.py                      # defaults: ~5-8 min on 2 idle cores (estimate)
    python benchmarks/real_shapes.py --length-scale 1     # the real lengths (much longer on a CPU)
    python benchmarks/real_shapes.py --quick              # toy sizes, to check that it runs (< 1 min)
    python benchmarks/real_shapes.py --only generation    # one part (training, generation, scaling)
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<unk>", "<|user|>", "<|assistant|>"]
PAD, BOS, END, UNK, USER, ASSISTANT = range(len(SPECIAL_TOKENS))
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' }} {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
# UltraChat-like log-normal lengths, in tokens at --length-scale 1 (see the docstring).
PROMPT_MEDIAN, PROMPT_SIGMA = 150, 0.9
RESPONSE_MEDIAN, RESPONSE_SIGMA = 275, 0.6
SEED = 42

# DPOConfig options on top of the defaults for the trl-best side: all that cut work and run on a CPU.
TRL_BEST = {
    # TRL's default is gradient_checkpointing=True (about a third more forward compute, for less memory);
    # transformers 5 renamed it activation_checkpointing (the old name still works, with a FutureWarning).
    "activation_checkpointing": False,
    # Batches of similar lengths (less padding): Trainer's LengthGroupedSampler. It reads a "length"
    # column, which the column pruning would drop before the sampler sees it, hence the second option.
    "train_sampling_strategy": "group_by_length",
    "remove_unused_columns": False,
}
TRL_NOT_USED = {
    "padding_free": "disabled in TRL 1.16 (it warns and falls back to padding); FlashAttention only anyway",
    "use_logits_to_keep": "no such option in TRL 1.16: its fused LM head already scores completion positions only",
    "truncation_mode": "only keep_start is supported (keep_end is deprecated); nothing is truncated here anyway",
    "pad_to_multiple_of": "'auto' is already no padding on a CPU",
    "torch_compile": "compiling takes longer than this whole run on a CPU",
    "use_liger_kernel": "Triton kernels, GPU only (and deprecated)",
    "activation_offloading": "offloads activations to CPU memory: nothing to gain on a CPU",
    "precompute_ref_batch_size": "left at the training batch: a larger one pads more (data order, no sorting)",
    "dataloader_num_workers": "collation is a sliver of a step, and workers would take cores from the model",
    "optim": "already adamw_torch_fused, TRL's default and the fastest AdamW on a CPU",
}
# The sparring sides: (train.group_by_length, train.share_prompt); "sparring" is the defaults of a run.
SPARRING_SIDES = {"sparring": (True, True), "sparring-unshared": (True, False), "sparring-plain": (False, False)}
PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "accelerate", "datasets",
           "trl", "trl.trainer.dpo_trainer", "sparring.training", "sparring.algorithms.spin",
           "sparring.generation", "sparring.modeling"]


# --------------------------------------------------------------------------- data and model


def scaled(args) -> dict:
    s = args.length_scale
    return {"max_prompt": max(4, round(args.max_prompt * s)), "max_length": max(6, round(args.max_length * s)),
            "max_new_tokens": max(1, round(args.max_new_tokens * s)),
            "prompt_median": PROMPT_MEDIAN * s, "response_median": RESPONSE_MEDIAN * s}


def draw_length(rng: random.Random, median: float, sigma: float, low: int, cap: int) -> int:
    return max(low, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def make_pairs(count: int, args) -> list[dict]:
    """(prompt, real, generated) ids: prompt = <|user|> words <|end|> <|assistant|>, responses = words <|end|>."""
    sc, rng = scaled(args), random.Random(SEED)

    def words(n: int) -> list[int]:
        return [rng.randrange(len(SPECIAL_TOKENS), args.vocab) for _ in range(n)]

    pairs = []
    for _ in range(count):
        p = draw_length(rng, sc["prompt_median"], PROMPT_SIGMA, 4, sc["max_prompt"])
        y, g = (draw_length(rng, sc["response_median"], RESPONSE_SIGMA, 2, sc["max_length"] - p) for _ in range(2))
        pairs.append({"prompt_ids": [USER, *words(p - 3), END, ASSISTANT], "real_ids": [*words(y - 1), END],
                      "generated_ids": [*words(g - 1), END]})
    return pairs


def build_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {t: i for i, t in enumerate(SPECIAL_TOKENS)} | {f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab)}
    core = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="<|end|>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def make_data(folder: Path, args) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sc = scaled(args)
    tok = build_tokenizer(args.vocab)
    heads = max(1, args.hidden // 64)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=16 * round(args.hidden * 2.75 / 16),
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max(2048, sc["max_length"] + sc["max_new_tokens"]), tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=END)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = PAD, END
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    pool = max(args.pairs, 4 * args.scaling_base, args.gen_prompts)
    pairs = make_pairs(pool, args)
    (folder / "pairs.json").write_text(json.dumps(pairs))
    used = pairs[: args.pairs]
    mean = {k: statistics.fmean(len(p[k]) for p in used) for k in ("prompt_ids", "real_ids", "generated_ids")}
    return {"params": sum(p.numel() for p in model.parameters()), "heads": heads,
            "intermediate": config.intermediate_size, "mean": mean,
            "max_prompt_seen": max(len(p["prompt_ids"]) for p in used),
            "max_total_seen": max(len(p["prompt_ids"]) + max(len(p["real_ids"]), len(p["generated_ids"]))
                                  for p in used)}


def load_pairs(folder: Path) -> list[dict]:
    return json.loads((folder / "pairs.json").read_text())


def words_text(ids: list[int]) -> str:
    return " ".join(f"w{i}" for i in ids)


# --------------------------------------------------------------------------- the sides (child processes)


class CountingCollate:
    """A collate function that also counts the token positions (padding included) it hands the model."""

    def __init__(self, collate, field):
        self.collate, self.field, self.positions = collate, field, 0

    def __call__(self, examples):
        batch = self.collate(examples)
        self.positions += self.field(batch).numel()
        return batch


def run_sparring(folder: Path, opts: dict, pairs_count: int, group_by_length: bool = True,
                 share_prompt: bool = True) -> dict:
    from functools import partial

    from accelerate import Accelerator

    from sparring.algorithms.spin import PairRecord, collate_pairs, spin_step
    from sparring.config import ModelConfig, TrainConfig
    from sparring.modeling import load_model, load_tokenizer
    from sparring.training import MetricsLogger, score_sequences, train

    start = time.perf_counter()
    tok = load_tokenizer(ModelConfig(name_or_path=str(folder / "model")))
    model = load_model(ModelConfig(name_or_path=str(folder / "model"), dtype="float32"))
    pairs = load_pairs(folder)[:pairs_count]
    loaded = time.perf_counter()
    cfg = TrainConfig(optimizer="adamw", lr=opts["lr"], weight_decay=0.0, warmup_ratio=0.1, epochs=1,
                      batch_size=opts["batch"], grad_accum=1, max_grad_norm=1.0, mixed_precision="no", seed=SEED,
                      save_steps=10**9, logging_steps=10**9, group_by_length=group_by_length)
    items = [(p["prompt_ids"], p["real_ids"]) for p in pairs] + [(p["prompt_ids"], p["generated_ids"]) for p in pairs]
    work = Path(tempfile.mkdtemp(dir=folder))
    logps = score_sequences(model, items, pad_id=tok.pad_token_id, batch_size=cfg.logprob_batch_size,
                            folder=work / "opponent")
    n = len(pairs)
    records = [PairRecord(p["prompt_ids"], p["real_ids"], p["generated_ids"], logps[i], logps[n + i])
               for i, p in enumerate(pairs)]
    scored = time.perf_counter()
    collate = CountingCollate(partial(collate_pairs, pad_id=tok.pad_token_id, share_prompt=share_prompt),
                              lambda b: b.sequences.input_ids)
    result = train(model, records, collate=collate, loss_step=partial(spin_step, scale=opts["beta"], kind="sigmoid"),
                   cfg=cfg, accelerator=Accelerator(cpu=True), folder=work, logger=MetricsLogger(work / "m.jsonl"),
                   log_fields={"iteration": 0})
    end = time.perf_counter()
    return {"seconds": end - start, "load": loaded - start, "reference": scored - loaded, "train": end - scored,
            "pass": end - loaded, "pairs": n, "steps": result.steps, "train_positions": collate.positions,
            "tokens": sum(len(a) + len(b) for a, b in items), "checkpointing": cfg.gradient_checkpointing,
            "sampler": ("length-grouped" if group_by_length else "randperm") + (", prompt shared" if share_prompt else "")}


def run_trl(folder: Path, opts: dict, best: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32)
    pairs = load_pairs(folder)[: opts["pairs"]]
    loaded = time.perf_counter()
    # Conversational rows, as SPIN data comes; TRL renders them with the chat template and tokenizes them,
    # and gets exactly the ids the sparring side trains on (checked below).
    rows = [{"prompt": [{"role": "user", "content": words_text(p["prompt_ids"][1:-2])}],
             "chosen": [{"role": "assistant", "content": words_text(p["real_ids"][:-1])}],
             "rejected": [{"role": "assistant", "content": words_text(p["generated_ids"][:-1])}]} for p in pairs]
    if best:  # the padded width of the pair's two rows in TRL's batches, for group_by_length
        for row, p in zip(rows, pairs):
            row["length"] = len(p["prompt_ids"]) + max(len(p["real_ids"]), len(p["generated_ids"]))
    args = DPOConfig(
        output_dir=str(folder / "trl-out"), per_device_train_batch_size=opts["batch"], num_train_epochs=1,
        learning_rate=opts["lr"], weight_decay=0.0, lr_scheduler_type="linear", warmup_steps=0.1, max_grad_norm=1.0,
        beta=opts["beta"], loss_type=["sigmoid"], precompute_ref_log_probs=True, max_length=opts["max_length"],
        bf16=False, use_cpu=True, seed=SEED, report_to="none", save_strategy="no", disable_tqdm=True,
        **(TRL_BEST if best else {}))
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    prepared = time.perf_counter()
    collate = CountingCollate(trainer.data_collator, lambda b: b["input_ids"])
    trainer.data_collator = collate
    trainer.train()
    end = time.perf_counter()
    ds = trainer.train_dataset
    for key, ours in (("prompt_ids", "prompt_ids"), ("chosen_ids", "real_ids"), ("rejected_ids", "generated_ids")):
        if ds[key] != [p[ours] for p in pairs]:
            raise AssertionError(f"TRL's {key} differ from the ids the sparring side trains on")
    return {"seconds": end - start, "load": loaded - start, "reference": prepared - loaded, "train": end - prepared,
            "pass": end - loaded, "pairs": len(pairs), "steps": trainer.state.global_step,
            "train_positions": collate.positions, "checkpointing": bool(trainer.args.activation_checkpointing),
            "sampler": type(trainer._get_train_sampler()).__name__}


def run_generate(folder: Path, opts: dict, side: str, batch: int) -> dict:
    import torch

    from sparring.config import ModelConfig
    from sparring.modeling import load_model, load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path=str(folder / "model")))
    model = load_model(ModelConfig(name_or_path=str(folder / "model"), dtype="float32"))
    prompts = [p["prompt_ids"] for p in load_pairs(folder)[: opts["gen_prompts"]]]
    new = opts["max_new_tokens"]
    if opts["stop_every"]:
        stop_after_marker(model, opts["stop_every"])
    start = time.perf_counter()
    if side in ("gen-sparring", "gen-generate"):
        from sparring.generation import HFGenerator, SamplingParams, generate_responses

        params = SamplingParams(do_sample=True, temperature=1.0, top_p=1.0, top_k=50, max_new_tokens=new)
        generator = HFGenerator(model, tok, loop="sparring" if side == "gen-sparring" else "generate")
        rows = generate_responses(generator, prompts, params, folder=Path(tempfile.mkdtemp(dir=folder)), seed=SEED,
                                  batch_size=batch)
        lengths = [r["num_tokens"] for r in rows]
    else:  # the original SPIN generate.py loop: data order, left padding to a multiple of 8, model.generate
        tok.padding_side = "left"
        torch.manual_seed(SEED)
        lengths = []
        for i in range(0, len(prompts), batch):
            enc = tok.pad({"input_ids": prompts[i : i + batch]}, padding="longest", pad_to_multiple_of=8,
                          return_tensors="pt")
            out = model.generate(**enc, max_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0, top_k=50,
                                 pad_token_id=tok.pad_token_id, eos_token_id=END)
            for row in out[:, enc["input_ids"].shape[1] :].tolist():
                lengths.append(row.index(END) + 1 if END in row else len(row))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": sum(lengths), "tokens_per_s": sum(lengths) / seconds,
            "rows_at_max": sum(n == new for n in lengths), "rows": len(lengths), "batch": batch}


def stop_after_marker(model, every: int) -> None:
    """Make a random model end its turn as a trained one does, at varied lengths: after a token whose id is
    ``every - 1`` modulo ``every`` (about one sampled token in ``every``: a geometric length of mean ≈
    ``every``), the end id gets a logit of +1e4, so it is the next token. A forward hook on the model, so
    that ``model.generate`` and sparring's loop see the same model; special ids (0–5) are never markers."""
    import torch

    def hook(module, args, kwargs, output):
        ids = kwargs.get("input_ids")
        if ids is None or output.logits is None:
            return output
        last = ids[:, -output.logits.shape[1] :]
        marked = (last % every) == every - 1
        output.logits[..., END] = torch.where(marked, torch.full_like(output.logits[..., END], 1e4),
                                              output.logits[..., END])
        return output

    model.register_forward_hook(hook, with_kwargs=True)


def generation_jobs(gen_batch: int) -> list[str]:
    """The generation measurements: the SPIN loop at its batch; sparring's HF backend at a run's default
    ``generation.batch_size``, at the loop's batch and at 32; the same backend through ``model.generate``."""
    from sparring.config import GenerationConfig

    default = GenerationConfig().batch_size
    ours = [f"gen-sparring:{b}" for b in dict.fromkeys((default, gen_batch, 32))]
    return [f"gen-loop:{gen_batch}", *ours, f"gen-generate:{default}"]


def rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def child(job: str, folder: str, opts: dict, log: str) -> None:
    """One measurement in this process; its RESULT line goes to ``log`` with everything else it prints."""
    import resource

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    folder_path = Path(folder)
    tempfile.tempdir = tempfile.mkdtemp(dir=folder_path)  # datasets' and TRL's temporary files: removed with it
    start_rss = rss_now_mib()
    kind, _, size = job.partition(":")
    if kind in SPARRING_SIDES:
        group_by_length, share_prompt = SPARRING_SIDES[kind]
        result = run_sparring(folder_path, opts, int(size or opts["pairs"]), group_by_length=group_by_length,
                              share_prompt=share_prompt)
    elif kind in ("trl-default", "trl-best"):
        result = run_trl(folder_path, opts, best=kind == "trl-best")
    else:
        result = run_generate(folder_path, opts, kind, int(size))
    import torch

    result["threads"] = torch.get_num_threads()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["start_rss_mib"] = start_rss
    print("RESULT " + json.dumps(result), flush=True)
    sys.stderr.flush()


def run_job(ctx, job: str, folder: Path, opts: dict, repeat: int) -> dict:
    log = folder / f"{job.replace(':', '-')}-{repeat}.log"
    proc = ctx.Process(target=child, args=(job, str(folder), opts, str(log)))
    began = time.perf_counter()
    proc.start()
    proc.join()
    text = log.read_text() if log.exists() else ""
    if proc.exitcode:
        sys.exit(f"{job} failed (exit {proc.exitcode}); the end of its log {log}:\n{text[-4000:]}")
    print(f"  {job} (repeat {repeat + 1}): {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    return json.loads(next(line for line in text.splitlines() if line.startswith("RESULT "))[7:])


# --------------------------------------------------------------------------- the report


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=32, help="training pairs (default 32)")
    parser.add_argument("--batch", type=int, default=4, help="pairs per optimizer step (default 4)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-prompt", type=int, default=512, help="prompt cap before --length-scale")
    parser.add_argument("--max-length", type=int, default=768, help="prompt + response cap before --length-scale")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="generation length before --length-scale")
    parser.add_argument("--length-scale", type=float, default=0.25,
                        help="multiplies the length medians, caps and max-new-tokens (1: real shapes)")
    parser.add_argument("--gen-prompts", type=int, default=128,
                        help="generation prompts (default 128: enough for length-sorted batches of near-equal prompts)")
    parser.add_argument("--gen-batch", type=int, default=8)
    parser.add_argument("--stop-every", type=int, default=0,
                        help="generation: end a turn after about one token in K (mean length ~K; 0: a random "
                             "model's own rare stops, so rows run to the limit)")
    parser.add_argument("--scaling-base", type=int, help="N of the N/2N/4N scaling runs (default pairs/4)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("training", "generation", "scaling"), action="append",
                        help="run only this part (repeatable; default: all three)")
    parser.add_argument("--quick", action="store_true", help="toy sizes, only to check that the script runs")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (model, pairs, logs)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.hidden, args.layers, args.length_scale = 8, 64, 2, 0.05
        args.gen_prompts, args.repeats = 8, 1
    args.scaling_base = args.scaling_base or max(1, args.pairs // 4)
    sc = scaled(args)
    if sc["max_length"] - sc["max_prompt"] < 2:
        parser.error("--max-length must leave at least 2 tokens of response after --max-prompt")

    os.environ.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1",
                      TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    folder = Path(tempfile.mkdtemp(prefix="real-shapes-"))
    began = time.perf_counter()
    info = make_data(folder, args)
    opts = {"pairs": args.pairs, "batch": args.batch, "lr": args.lr, "beta": args.beta,
            "max_length": sc["max_length"], "max_new_tokens": sc["max_new_tokens"],
            "gen_prompts": args.gen_prompts, "gen_batch": args.gen_batch, "stop_every": args.stop_every}
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    scaling = [args.scaling_base * k for k in (1, 2, 4)]
    gen_jobs = generation_jobs(args.gen_batch)
    parts = set(args.only or ("training", "generation", "scaling"))
    jobs = [*SPARRING_SIDES, "trl-default", "trl-best"] if "training" in parts else []
    jobs += gen_jobs if "generation" in parts else []
    if "scaling" in parts:
        jobs += [f"sparring:{n}" for n in scaling if n != args.pairs or "training" not in parts]
    runs: dict[str, list[dict]] = {job: [] for job in jobs}
    for repeat in range(args.repeats):
        for job in jobs:
            runs[job].append(run_job(ctx, job, folder, opts, repeat))
    for n in scaling:
        if "scaling" in parts and "training" in parts:
            runs.setdefault(f"sparring:{n}", runs["sparring"] if n == args.pairs else [])

    import torch
    import transformers
    import trl

    first = runs[jobs[0]][0]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {first['threads']} torch threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, TRL {trl.__version__}; "
          f"{args.repeats} repeat(s), medians; whole run {time.perf_counter() - began:.0f} s"
          + ("; --quick: toy sizes, the numbers mean nothing" if args.quick else ""))
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {info['heads']} heads, MLP {info['intermediate']}, "
          f"vocab {args.vocab}, {info['params'] / 1e6:.1f}M parameters, fp32")
    m = info["mean"]
    print(f"pairs: {args.pairs}, lengths x{args.length_scale:g} of UltraChat-like log-normals: prompt median "
          f"{sc['prompt_median']:.0f} (cap {sc['max_prompt']}), response median {sc['response_median']:.0f} (prompt + "
          f"response cap {sc['max_length']}); means prompt {m['prompt_ids']:.0f}, real {m['real_ids']:.0f}, generated "
          f"{m['generated_ids']:.0f}; longest prompt {info['max_prompt_seen']}, longest pair {info['max_total_seen']}")
    print(f"training: batch {args.batch} pairs, 1 epoch, AdamW lr {args.lr:g}, linear schedule, 10% warm-up, beta {args.beta:g}")
    print()
    if "training" in parts:
        report_training(runs)
    if "generation" in parts:
        report_generation(runs, gen_jobs, args.gen_prompts, sc["max_new_tokens"], args.stop_every)
    if "scaling" in parts:
        report_scaling(runs, scaling)
    if args.keep:
        print(f"\nwork folder kept: {folder}")
    else:
        shutil.rmtree(folder, ignore_errors=True)


def report_training(runs: dict) -> None:
    print("1. one training pass (model load + opponent/reference log-probs + one epoch)")
    print(f"{'':17} {'seconds':>8} {'load':>6} {'ref':>7} {'train':>7} {'steps':>5} {'positions':>10} "
          f"{'peak RSS MiB':>13} {'above start':>12}  checkpointing, batches")
    for side in (*SPARRING_SIDES, "trl-default", "trl-best"):
        r = runs[side]
        print(f"{side:17} {median(r, 'seconds'):8.1f} {median(r, 'load'):6.1f} {median(r, 'reference'):7.1f} "
              f"{median(r, 'train'):7.1f} {r[0]['steps']:5d} {r[0]['train_positions']:10d} "
              f"{median(r, 'peak_rss_mib'):13.0f} {median(r, 'peak_rss_mib') - median(r, 'start_rss_mib'):12.0f}  "
              f"{'yes' if r[0]['checkpointing'] else 'no'}, {r[0]['sampler']}")
    s = runs["sparring"]
    for side in (*list(SPARRING_SIDES)[1:], "trl-default", "trl-best"):
        t = runs[side]
        print(f"ratio sparring/{side}: time {median(s, 'seconds') / median(t, 'seconds'):.2f} "
              f"(pass without load {median(s, 'pass') / median(t, 'pass'):.2f}), peak memory "
              f"{median(s, 'peak_rss_mib') / median(t, 'peak_rss_mib'):.2f} "
              f"(above start {(median(s, 'peak_rss_mib') - median(s, 'start_rss_mib')) / (median(t, 'peak_rss_mib') - median(t, 'start_rss_mib')):.2f})")
    print("(positions: token positions of the training batches, padding included; ref: sparring's opponent pass, "
          "TRL's dataset preparation + reference pass)")
    print("trl-best = the defaults + " + ", ".join(f"{k}={v!r}" for k, v in TRL_BEST.items())
          + " (with a 'length' column)")
    print("not used: " + "; ".join(f"{k}: {v}" for k, v in TRL_NOT_USED.items()))
    print()


def report_generation(runs: dict, gen_jobs: list[str], prompts: int, new_tokens: int, stop_every: int) -> None:
    stops = f"a turn ends after about one token in {stop_every}" if stop_every else "the model's own rare stops"
    print(f"2. generation: {prompts} prompts, {new_tokens} new tokens, sampling (T 1, top-p 1, "
          f"top-k 50), {stops}; tokens = tokens each side produced, stop id included")
    print(f"{'':30} {'batch':>5} {'seconds':>8} {'tokens':>7} {'rows at max':>12} {'tokens/s':>9} {'vs loop':>8}")
    labels = {"gen-loop": "SPIN generate.py loop", "gen-sparring": "sparring HF backend",
              "gen-generate": "sparring via model.generate"}
    loop = median(runs[gen_jobs[0]], "tokens_per_s")
    for job in gen_jobs:
        r, kind = runs[job], job.partition(":")[0]
        default = " (default)" if kind != "gen-loop" and r[0]["batch"] == int(gen_jobs[1].partition(":")[2]) else ""
        print(f"{labels[kind]:30} {r[0]['batch']:5d} {median(r, 'seconds'):8.1f} {r[0]['tokens']:7d} "
              f"{r[0]['rows_at_max']:5d}/{r[0]['rows']:<6d} {median(r, 'tokens_per_s'):9.1f} "
              f"{median(r, 'tokens_per_s') / loop:7.2f}x{default}")
    print(f"ratio tokens/s sparring (defaults)/SPIN loop: {median(runs[gen_jobs[1]], 'tokens_per_s') / loop:.2f}")
    print()


def report_scaling(runs: dict, scaling: list[int]) -> None:
    print("3. sparring training pass (opponent pass + train, load excluded) vs. pairs")
    print(f"{'pairs':>6} {'tokens':>7} {'seconds':>8} {'s/pair':>7} {'ms/token':>9}")
    for n in scaling:
        r = runs[f"sparring:{n}"]
        print(f"{n:6d} {r[0]['tokens']:7d} {median(r, 'pass'):8.2f} {median(r, 'pass') / n:7.3f} "
              f"{1000 * median(r, 'pass') / r[0]['tokens']:9.3f}")


if __name__ == "__main__":
    main()
