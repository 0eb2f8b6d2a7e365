"""Idempotent stages shared by the iterative methods: set-up, generate, save, evaluate (the report is
``evaluation.report``).

Each stage checks state.json first and records itself when finished, so rerunning a command skips
whatever was done and redoes only what a kill interrupted.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from sparring.config import ConfigError, RunConfig
from sparring.data.dataset import TrainingSet, load_training_set
from sparring.evaluation import evaluate_with_answers, load_eval_set
from sparring.evaluation.report import write_report
from sparring.generation import HFGenerator, SamplingParams, batch_seed, generate_responses
from sparring.hub import check_can_push
from sparring.modeling import (
    add_adapters,
    check_peft,
    is_peft_model,
    load_model,
    load_tokenizer,
    make_accelerator,
    merge_adapters,
    resolve_dtype,
)
from sparring.state import RunDir, RunLocked, atomic_write_json, read_jsonl, write_jsonl
from sparring.training import MetricsLogger, train
from sparring.training.trackers import run_trackers


@dataclass
class Session:
    """What every stage of one run needs."""

    cfg: RunConfig
    run_dir: RunDir
    accelerator: object
    tokenizer: object
    data: TrainingSet | None  # None for methods that train on no data set (LSP)
    logger: MetricsLogger

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process


def open_session(cfg: RunConfig, *, force: bool = False, load_data: bool = True) -> Session:
    """Hold the run directory (main process), create or reopen the run, load tokenizer and data."""
    from accelerate.utils import broadcast_object_list

    check_can_push(cfg)  # a push that would fail at the end is refused before the run starts
    accelerator = make_accelerator(cfg)
    check_lm_eval(cfg, accelerator)
    run_dir = RunDir(cfg.output_dir)
    refused = None
    if accelerator.is_main_process:
        try:
            run_dir.lock()  # before anything is written: the lock stays held until the process ends
            resumed = run_dir.start(cfg, force=force)
            print(f"{'resuming' if resumed else 'starting'} {cfg.method} run in {run_dir.root}")
        except (RunLocked, ConfigError) as err:
            refused = err
    # Every process raises the main one's refusal, instead of waiting for it at the next barrier.
    refused = broadcast_object_list([refused])[0]
    if refused is not None:
        raise refused
    tokenizer = load_tokenizer(cfg.model)
    data = load_training_set(cfg.data, tokenizer) if load_data else None
    if data is not None and data.report.skipped and accelerator.is_main_process:
        print(f"skipped {sum(data.report.skipped.values())} bad rows: {dict(data.report.skipped)}")
    logger = MetricsLogger(run_dir.metrics_path, run_trackers(accelerator, cfg), enabled=accelerator.is_main_process)
    return Session(cfg, run_dir, accelerator, tokenizer, data, logger)


def logp_settings(s: Session, t: int, cfg: RunConfig) -> dict:
    """What θ_t's log-probs depend on beside the scored sequences (part of every log-prob cache key):
    which model (the base, or the checkpoint by its place in the run directory) and how it is loaded."""
    path = model_path(s, t)
    return {"model": cfg.model.name_or_path if path is None else str(path.relative_to(s.run_dir.root)),
            "revision": cfg.model.revision, "dtype": str(resolve_dtype(cfg.model.dtype)),
            "attn_implementation": cfg.model.attn_implementation, "load_in_4bit": cfg.peft.load_in_4bit,
            "max_length": cfg.data.max_length}


def model_path(s: Session, t: int) -> str | Path | None:
    """θ_t: the base model for t = 0, else the checkpoint iteration t−1 saved (None = base)."""
    return None if t == 0 else s.run_dir.model(t - 1)


def load_iterate(s: Session, t: int, *, trainable: bool = True):
    """θ_t on this process's device (in 4 bits with peft.load_in_4bit).

    With LoRA and ``trainable``: θ_t with fresh adapters, the only weights that train. Their B is 0,
    so the model computes exactly θ_t: generation and the opponent pass see θ_t, and training starts
    at policy = opponent. save_model merges the adapters into θ_{t+1}, a full model again."""
    peft = s.cfg.peft
    model = load_model(s.cfg.model, model_path(s, t), device=s.accelerator.device, load_in_4bit=peft.load_in_4bit)
    if not (peft.on and trainable):
        return model
    check_unsharded(s)
    return add_adapters(model, peft, seed=s.cfg.train.seed + t, gradient_checkpointing=s.cfg.train.gradient_checkpointing)


def sharded(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP or DeepSpeed ZeRO-3)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return accelerator.distributed_type.name == "FSDP" or getattr(plugin, "zero_stage", 0) == 3


def check_unsharded(s: Session) -> None:
    """Merging adapters into θ_{t+1} needs whole weights on each process: no FSDP, no ZeRO-3."""
    if sharded(s.accelerator):
        raise ConfigError("the peft: section (LoRA) does not run under FSDP or DeepSpeed ZeRO-3 (the adapters are "
                          "merged into whole weights); use DDP or ZeRO-1/2, or train without peft")


def release(s: Session | None = None) -> None:
    """Free memory once the caller has dropped its references to a model: accelerate's references to
    prepared objects (with ``s``), Python garbage, the CUDA cache."""
    if s is not None:
        s.accelerator.free_memory()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def generate(s: Session, model, t: int, name: str, cfg: RunConfig | None = None) -> list[dict]:
    """One sampled response per training prompt from ``model``, stored as ``run_dir.generated(t, name)``.

    Rows in prompt order: {"text", "token_ids" (what the model sampled, stop id included), "finished"}.
    """
    cfg = cfg or s.cfg
    out = s.run_dir.generated(t, name)
    stage = s.run_dir.stage_generate(t, name)
    if not s.run_dir.is_done(stage):
        if cfg.generation.backend == "vllm":
            from sparring.generation.vllm import VLLMGenerator

            generator = VLLMGenerator.for_model(cfg.model, model_path(s, t), s.tokenizer,  # vLLM loads θ_t from disk
                                                gpu_memory_utilization=cfg.generation.vllm_gpu_memory_utilization)
        else:
            generator = HFGenerator(model, s.tokenizer)
        rows = generate_responses(
            generator,
            s.data.prompt_ids,
            SamplingParams.from_config(cfg.generation),
            folder=s.run_dir.generation_chunks(t, name),
            seed=batch_seed(cfg.generation.seed, name, t),
            batch_size=cfg.generation.batch_size,
            accelerator=s.accelerator,
            desc=f"iter {t}: generate {name}",
        )
        if hasattr(generator, "close"):
            generator.close()
        if s.main:
            write_jsonl(out, [
                {"row": e.row, "prompt": e.prompt, "real": e.real, **r} for e, r in zip(s.data.examples, rows)
            ])
            truncated = sum(not r["finished"] for r in rows)
            s.run_dir.mark_done(stage, {"finished": len(rows) - truncated, "truncated": truncated, "rows": len(rows)})
            s.logger.log({"kind": "generation", "iteration": t, "name": name, "rows": len(rows),
                          "truncated": truncated, "truncated_frac": truncated / len(rows),
                          "on_truncated": cfg.generation.on_truncated})
            shutil.rmtree(s.run_dir.generation_chunks(t, name), ignore_errors=True)
        s.accelerator.wait_for_everyone()
    return read_generated(out)


def generated_set(s: Session, t: int, name: str = "generated") -> list[dict]:
    """Set ``name`` as iteration t sampled it, read back (never regenerated); an error if it is not there."""
    path = s.run_dir.generated(t, name)
    if not s.run_dir.is_done(s.run_dir.stage_generate(t, name)):
        raise RuntimeError(f"iteration {t} has no {name} responses yet ({path}); rerun from iteration {t}")
    return read_generated(path)


def read_generated(path: Path) -> list[dict]:
    rows = read_jsonl(path)
    if rows and "token_ids" not in rows[0]:
        raise RuntimeError(
            f"{path} holds no sampled token ids (written by an older sparring, which re-encoded text); "
            f"delete {path.parent} to sample this iteration again"
        )
    return rows


def response_ids(s: Session, i: int, sample: dict, max_length: int) -> list[int]:
    """The ids a model sampled for training prompt i, cut so that prompt + response fit ``max_length``."""
    return sample["token_ids"][: max(max_length - len(s.data.prompt_ids[i]), 0)]


def kept(samples: list[dict], cfg: RunConfig) -> bool:
    """Whether a row whose responses are ``samples`` trains (generation.on_truncated=drop leaves out rows
    with a truncated one)."""
    return cfg.generation.on_truncated != "drop" or all(r["finished"] for r in samples)


def cleanup_iteration(s: Session, t: int) -> None:
    """Drop what only a resume of iteration t needed (training checkpoints, log-prob chunks)."""
    shutil.rmtree(s.run_dir.checkpoints(t), ignore_errors=True)
    for chunks in s.run_dir.chunk_folders(t):
        shutil.rmtree(chunks, ignore_errors=True)


def run_iterations(cfg: RunConfig, iterations: int, iteration, *, force: bool = False) -> list[dict]:
    """The outer loop of the iterative methods (SPIN, T-SPIN, TPAW): open the run, evaluate θ0, then
    for every iteration t not done yet: load θ_t, ``iteration(s, t, icfg, model)`` — generate, score,
    train — returns (the training result, info for state.json), save θ_{t+1}, evaluate it, mark t done.
    ``icfg`` is the config with iteration t's ``per_iteration`` values. Returns the run's report rows."""
    check_peft(cfg.peft)  # e.g. QLoRA on a CPU: refused before anything runs
    s = open_session(cfg, force=force)
    evaluate_stage(s, s.run_dir.INITIAL, path=None)
    for t in range(iterations):
        if s.run_dir.is_done(s.run_dir.stage_iteration(t)):
            push_iteration(s, t)  # a push that failed or was turned on after the iteration
            continue
        model = load_iterate(s, t)  # θ_t
        result, info = iteration(s, t, cfg.for_iteration(t), model)
        finish_iteration(s, t, result, info)
        del model, result  # both hold θ_{t+1}: gone before the next iteration loads it again
        release(s)  # then free accelerate's references, collect, empty the cache
    return end_run(s, s.run_dir.model(iterations - 1))


def end_run(s: Session, final_model: Path) -> list[dict]:
    """The run's end: the report (results.md, plot.png), then (main process, with hub.push) the final
    model pushed to the Hub with its model card, then the trackers end. Returns the report rows."""
    rows = write_report(s.run_dir, s.cfg, main=s.main)
    if s.main and s.cfg.hub.push:
        from sparring.hub import push_run

        push_run(s.run_dir, s.cfg, final_model)
    s.logger.finish()
    return rows


def train_iteration(s: Session, t: int, icfg: RunConfig, model, records: list, *, collate, loss_step, weight=None,
                    desc: str | None = None):
    """Iteration t's training of θ from θ_t on ``records`` (``training.loop.train``, ``weight`` per record
    as there): resumable in ``run_dir.iteration(t)``, logged with the iteration and the run's global step."""
    return train(model, records, collate=collate, loss_step=loss_step, cfg=icfg.train, accelerator=s.accelerator,
                 folder=s.run_dir.iteration(t), logger=s.logger, log_fields={"iteration": t},
                 global_step_offset=steps_before(s, t), desc=desc or f"iter {t}: train", weight=weight)


def shares_prompt(s: Session, icfg: RunConfig, model) -> bool:
    """Whether iteration batches put each prompt once for all its responses (``train.share_prompt``): on
    unless it is off or the model's attention takes no 4D mask (then said, and the batches hold one
    sequence per response)."""
    from sparring.logprobs import attention_of, takes_attention_bias

    if not icfg.train.share_prompt:
        return False
    if takes_attention_bias(model):
        return True
    if s.main:
        print(f"train.share_prompt is off for this model: its attention ({attention_of(model)}) takes no 4D mask",
              flush=True)
    return False


def inert_rows(records: list) -> dict:
    """How many rows have y′ = y (their margin terms cancel: no gradient), and their share."""
    same = sum(r.generated_ids == r.real_ids for r in records)
    return {"pairs_generated_equals_real": same, "pairs_generated_equals_real_frac": same / len(records)}


def steps_before(s: Session, t: int) -> int:
    """Optimizer steps of iterations 0 … t−1 (the TensorBoard step offset of iteration t)."""
    return sum((s.run_dir.stage_info(s.run_dir.stage_iteration(k)) or {}).get("steps", 0) for k in range(t))


def finish_iteration(s: Session, t: int, result, info: dict) -> None:
    """Save θ_{t+1} from the accelerate-prepared model, evaluate it, mark iteration t done, and drop
    what only a resume of it needed."""
    save_model(s, result.model, t)
    evaluate_stage(s, s.run_dir.stage_iteration(t), model=result.model)
    if s.main:
        s.run_dir.mark_done(s.run_dir.stage_iteration(t), {"steps": result.steps, **info, **result.last_metrics})
        cleanup_iteration(s, t)
    push_iteration(s, t)
    s.accelerator.wait_for_everyone()


def push_iteration(s: Session, t: int) -> None:
    """With hub.push_iterations, the main process pushes θ_{t+1} to its branch once (a stage of state.json,
    per repo): a rerun pushes only what is missing."""
    if not (s.main and s.cfg.hub.push_iterations):
        return
    from sparring import hub

    stage = f"hub/{s.cfg.hub.repo_id}@{hub.iteration_revision(t)}"
    if not s.run_dir.is_done(stage):
        s.run_dir.mark_done(stage, {"url": hub.push_iteration(s.run_dir, s.cfg, t)})


def save_model(s: Session, model, t: int) -> None:
    """θ_{t+1} with save_pretrained (safetensors) and the tokenizer, renamed into place.

    Under LoRA θ_{t+1} is θ_t with the iteration's adapters merged in: a full model like any iterate."""
    save_pretrained(s, model, s.run_dir.model(t), base=model_path(s, t))


def save_pretrained(s: Session, model, target: Path, base: str | Path | None = None) -> Path:
    """``model`` with save_pretrained (safetensors) and the tokenizer to ``target``, written to a .tmp
    sibling and renamed into place; FSDP / ZeRO-3 shards are gathered first (every process calls this).

    A LoRA model is saved with its adapters merged (in place, into full-precision weights; into a copy
    of ``base``, default ``model.name_or_path``, under a 4-bit base): a full model, never adapters alone."""
    tmp = target.with_name(target.name + ".tmp")
    unwrapped = s.accelerator.unwrap_model(model)
    if is_peft_model(unwrapped):  # whole weights on every process (check_unsharded): nothing to gather
        unwrapped, state_dict = merge_adapters(unwrapped, s.cfg.model, base), None
    else:
        state_dict = s.accelerator.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards
    if s.main:
        shutil.rmtree(tmp, ignore_errors=True)
    s.accelerator.wait_for_everyone()
    unwrapped.save_pretrained(tmp, is_main_process=s.main, save_function=s.accelerator.save, state_dict=state_dict)
    # Every process is done with tmp (save_pretrained lists the folder on every rank) before it is renamed.
    s.accelerator.wait_for_everyone()
    if s.main:
        s.tokenizer.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.replace(target)
    s.accelerator.wait_for_everyone()
    return target


def evaluate_stage(s: Session, label: str, model=None, path: str | Path | None = None) -> dict | None:
    """Held-out evaluation (``eval.source``) and lm-evaluation-harness tasks (``eval.lm_eval.tasks``) of a
    model, once: cached in ``run_dir.eval_file(label)`` and logged, its answers to the first
    ``eval.sample_prompts`` held-out prompts in ``run_dir.eval_answers(label)``.

    Every process evaluates a share of the held-out rows (a ZeRO-3 / FSDP model needs all of them in each
    forward) and of lm_eval's requests (lm_eval needs whole weights on each process: ``check_lm_eval``).
    The main one writes the answers, then the scores (whose file marks the evaluation done)."""
    out = s.run_dir.eval_file(label)
    if out.exists():
        return json.loads(out.read_text())
    if not (s.cfg.eval.source or s.cfg.eval.lm_eval.tasks):
        return None
    own = model is None
    model = load_model(s.cfg.model, path, device=s.accelerator.device) if own else s.accelerator.unwrap_model(model)
    scores, answers = held_out(s, model)
    scores = {"label": label, **scores, **lm_eval_scores(s, model)}
    if s.main:
        if answers:
            write_jsonl(s.run_dir.eval_answers(label), answers)
        atomic_write_json(out, scores)
        s.logger.log({"kind": "eval", **scores})
    if own:
        del model
        release()
    s.accelerator.wait_for_everyone()
    return json.loads(out.read_text())


def held_out(s: Session, model) -> tuple[dict, list[dict]]:
    """(scores, sampled answers) of ``model`` on the held-out rows; none without ``eval.source``."""
    if not s.cfg.eval.source:
        return {}, []
    data = load_eval_set(s.cfg.eval, s.tokenizer, s.cfg.data.max_length)
    return evaluate_with_answers(model, s.tokenizer, data, s.cfg.eval, accelerator=s.accelerator,
                                 samples=s.cfg.eval.sample_prompts)


def lm_eval_scores(s: Session, model) -> dict[str, float]:
    """``eval.lm_eval.tasks`` on ``model``, every process scoring a share (the main one gets the scores)."""
    if not s.cfg.eval.lm_eval.tasks:
        return {}
    from sparring.evaluation.lm_eval import run_lm_eval

    return run_lm_eval(model, s.tokenizer, s.cfg.eval.lm_eval, accelerator=s.accelerator)


def check_lm_eval(cfg: RunConfig, accelerator) -> None:
    """lm_eval runs the whole model on each process: refuse it with sharded weights."""
    if cfg.eval.lm_eval.tasks and sharded(accelerator):
        raise ConfigError("eval.lm_eval.tasks runs lm-evaluation-harness on the whole model in each process, which "
                          "FSDP and DeepSpeed ZeRO-3 shard across processes: use DDP or ZeRO-1/2, or remove "
                          "eval.lm_eval.tasks")
