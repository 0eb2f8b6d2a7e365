"""LSP: Language Self-Play For Data-Free Training (Kuba et al., 2025, arXiv 2509.07414).

One model θ plays both roles; π_Ref is the frozen initial model. For step t = 1 … T (Algorithm 1):

1. challenger: sample N queries q_i ~ π_θ(·|⟨cp⟩), the challenger prompt as a user turn;
2. solver: sample G answers a_i^j ~ π_θ(·|q_i), q_i alone as a user turn;
3. rewards: R(q_i, a_i^j) from ``lsp.reward`` (verifier, reward model or function); LSP
   (``variant: self_reward``) adds R_Q ∈ {0..7} graded by π_Ref; advantages A_Sol (group baseline),
   A_Ch (batch baseline) with ``lsp_advantages``;
4. loss: L_Sol + α_Ch·L_Ch, sequence-level REINFORCE with a KL penalty to π_Ref (``reinforce_loss``);
5. one optimizer step; every K steps: samples.jsonl, a resumable checkpoint, held-out evaluation.

The run needs no training data. Rerunning the command resumes from the newest checkpoint; rollouts
are seeded by (seed, step, role), so a resumed run repeats the uninterrupted one.
As in the shared loop (``training.loop``), SIGTERM/SIGUSR1 ends the current step with a checkpoint
and ``Preempted``, and a non-finite loss or gradient norm stops the run or skips the update
(``train.on_nonfinite``).

On several data-parallel processes (torchrun or ``accelerate launch``: DDP, gloo on a CPU; FSDP and
DeepSpeed are refused) a step is shared out and gives the one-process result: the generation of
queries and answers, the task reward and π_Ref's grades run in fixed batches of
``generation.batch_size``, batch k on process k mod world with a seed fixed by k, and are gathered so
that every process holds the whole step in one process's order; advantages are computed on every
process from the whole (N, G) rewards; each micro-batch of ``train.batch_size`` × world sequences of
the update is split across the processes (gradients all-reduced once per step, the loss scaled by
the world size), and the roles' metrics come from the step engine's all-reduce. Only the main
process writes logs, samples and stage markers.

``lsp.query_source: data`` replaces step 1 by N prompts of the ``lsp.prompts`` file (a seeded,
resumable order, ``prompt_indices``) and trains the solver only (α_Ch = 0): the paper's GRPO baseline
with LSP's reward, KL and group baseline (docs/algorithms.md maps it onto TRL's GRPOTrainer).

    sparring run configs/lsp/tiny.yaml lsp.steps=20
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from sparring import stages
from sparring.algorithms.lsp.prompts import load_prompts, prompt_indices, query_difficulties
from sparring.algorithms.lsp.rollouts import (
    Reference,
    RolloutRewards,
    Rollouts,
    gather_nonfinite,
    judge_generate,
    make_reward,
    nonfinite_what,
    policy_gradient,
    reduced_roles,
    role_sums,
    sample_rollouts,
    score_rewards,
)
from sparring.config import ConfigError, LspConfig, RunConfig
from sparring.losses import lsp_advantages
from sparring.losses.lsp import group_signal
from sparring.modeling import add_adapters, check_peft, load_model, resolve_dtype
from sparring.rewards import SelfJudge
from sparring.rewards.self_judge import SELF_REWARD_PROMPT
from sparring.state import read_jsonl, write_jsonl
from sparring.training.engine import Engine, Work
from sparring.training.signals import NonFiniteLoss, Preempted, StopRequest

# + config.COMMON_FIELDS. No data set (data.max_length cuts the held-out rows only), no epochs: lsp.steps.
READS = ("lsp", "data.max_length", "generation.seed", "generation.batch_size", "generation.on_truncated",
         "train.optimizer", "train.lr", "train.weight_decay", "train.warmup_ratio", "train.lr_scheduler",
         "train.batch_size", "train.max_grad_norm", "train.mixed_precision", "train.gradient_checkpointing",
         "train.logging_steps", "train.seed", "train.on_nonfinite")


def run(cfg: RunConfig, *, force: bool = False) -> list[dict]:
    check_peft(cfg.peft)  # e.g. QLoRA on a CPU: refused before anything runs
    if cfg.lsp.keep_models and cfg.peft.on:
        raise ConfigError("lsp.keep_models saves whole models mid-run; under LoRA (peft:) that would merge the "
                          "adapters being trained: turn one of them off")
    s = stages.open_session(cfg, force=force, load_data=False)
    check_data_parallel(s.accelerator)
    if s.run_dir.is_done(s.run_dir.FINAL):
        return stages.end_run(s, s.run_dir.final_model)
    lsp, tok, acc = cfg.lsp, s.tokenizer, s.accelerator

    torch.manual_seed(cfg.train.seed)
    model, reference = build_policy_and_reference(cfg, acc.device)
    reward_fn = make_reward(lsp, device=acc.device, dtype=resolve_dtype(cfg.model.dtype))
    judge = (SelfJudge(judge_generate(reference, tok, lsp, cfg.generation.batch_size, accelerator=acc),
                       prompt=lsp.self_reward_prompt or SELF_REWARD_PROMPT)
             if lsp.variant == "self_reward" else None)
    prompts = load_prompts(lsp.prompts) if lsp.query_source == "data" else None
    # One optimizer step per LSP step; the engine resumes from the newest checkpoint.
    engine = Engine(model, cfg.train, acc, total_steps=lsp.steps, checkpoints=s.run_dir.checkpoints(), where="LSP")
    model = engine.model
    engine.open_logs(s.logger, drop=lambda r: r.get("kind") == "lsp")
    samples_path = s.run_dir.samples
    samples = [r for r in read_jsonl(samples_path) if r["step"] <= engine.start] if samples_path.exists() else []
    evaluate(s, model, engine.start)

    try:
        with StopRequest() as stop:
            for step in range(engine.start + 1, lsp.steps + 1):
                lsp_step(s, step, engine, reference, reward_fn, judge, prompts, samples, stop)
    except (Preempted, NonFiniteLoss):
        s.logger.close()
        raise

    save_final(s, model, cfg)
    if s.main:
        s.run_dir.mark_done(s.run_dir.FINAL, {"steps": lsp.steps})
        shutil.rmtree(s.run_dir.checkpoints(), ignore_errors=True)
    s.logger.close()
    del model, engine  # both hold the prepared policy
    stages.release(s)
    return stages.end_run(s, s.run_dir.final_model)


def check_data_parallel(accelerator) -> None:
    """LSP shards its steps over data-parallel processes (DDP, or one process): the rollouts are
    generated by each process on its own batches, which FSDP and DeepSpeed cannot do (every
    process would be needed in each forward of generate)."""
    kind = accelerator.distributed_type.name
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise ConfigError(f"LSP runs on one process or on data-parallel (DDP) processes, not under {kind}: "
                          "launch it with torchrun or accelerate launch without an FSDP or DeepSpeed profile")


def lsp_step(s: stages.Session, step: int, engine: Engine, reference, reward_fn, judge, prompts,
             samples: list[dict], stop: StopRequest) -> None:
    """One LSP step (Algorithm 1's loop body): rollouts, rewards, one update, logs, checkpoint, evaluation.

    A non-finite loss or gradient norm raises ``NonFiniteLoss`` before the update, or skips it
    (``train.on_nonfinite``); after a stop signal the step ends with a checkpoint and ``Preempted``
    (both decided by the step engine). On several processes each process generates, scores and
    back-propagates its share; every process then holds the whole step (rollouts, rewards,
    advantages), and the engine's all-reduce gives the roles' metrics over every process."""
    cfg, tok, acc = s.cfg, s.tokenizer, s.accelerator
    lsp, g = cfg.lsp, cfg.lsp.answers_per_query
    out: dict = {}

    def work(model) -> Work:
        # 1–2. N challenger queries, G solver answers each, from the current θ
        r = sample_rollouts(acc.unwrap_model(model), tok, lsp, seed=cfg.generation.seed, step=step,
                            batch_size=cfg.generation.batch_size, prompts=prompts, accelerator=acc)
        # 3. rewards R (+ R_Q from π_Ref) and advantages; invalid and truncated rollouts by score_rewards
        scored = score_rewards(reward_fn, r, lsp.reward, cfg.generation.on_truncated,
                               batch_size=cfg.generation.batch_size, accelerator=acc)  # (N, G)
        quality, fallbacks = None, 0
        if judge is not None:
            graded = judge([q for q in r.queries for _ in range(g)], r.answers)
            quality = torch.tensor(graded.scores, dtype=torch.float64).view(lsp.num_queries, g)  # (N, G) R_Q
            fallbacks = graded.num_fallbacks  # unparseable grades count as R_Q = 0
        adv = lsp_advantages(scored.rewards, quality, scale_std=lsp.scale_std, keep=scored.keep)
        # 4. ∇(L_Sol + α_Ch·L_Ch), accumulated in micro-batches; the engine takes the optimizer step
        sol, ch = policy_gradient(model, reference, r, adv, lsp, pad_id=tok.pad_token_id, batch_size=cfg.train.batch_size,
                                  accelerator=acc, solver_keep=scored.keep, loss_scale=engine.loss_scale)
        out.update(r=r, scored=scored, adv=adv, quality=quality, fallbacks=fallbacks, sol=sol, ch=ch)
        # tokens this process ran through the policy's forward and backward (the engine sums them)
        return Work(*role_sums(sol, ch), bad=sol["nonfinite"] + (ch["nonfinite"] if ch else []),
                    tokens=sol["tokens"] + (ch["tokens"] if ch else 0),
                    describe_bad=lambda bad, norm: nonfinite_what(*gather_nonfinite(acc, sol, ch), g, norm,
                                                                  prompt_rows(prompts, lsp, cfg, step)))

    # 5. one optimizer step (tokens/s over the whole step, rollouts included)
    end = engine.step(work, stop, done=step)
    r, scored, adv, quality = (out[k] for k in ("r", "scored", "adv", "quality"))
    sol, ch = reduced_roles(end.metrics, out["sol"], out["ch"])  # means over every process's rows
    row = step_metrics(r, scored, adv, quality, out["fallbacks"], sol, ch, query_difficulties(lsp))
    row.update({k: end.metrics[k] for k in ("grad_norm", "lr", "skipped_steps", "perf/tokens_per_second",
                                             "perf/peak_memory_gib")})
    row["loss"] = sol["loss"] + (lsp.challenger_coef * ch["loss"] if ch else 0.0)
    if s.main and (step % cfg.train.logging_steps == 0 or step == lsp.steps or end.stopping):
        s.logger.log({"kind": "lsp", "step": step, **row}, step=step)
    if s.main and step % lsp.sample_every == 0:
        samples.extend(sample_rows(step, r, scored.rewards, quality, adv))
        write_jsonl(s.run_dir.samples, samples)  # rewritten whole, so a resume never duplicates rows
    def saved() -> None:  # the stage names the step the checkpoint holds
        if s.main:
            s.run_dir.mark_done(s.run_dir.lsp_step_label(step), {k: row[k] for k in ("lsp/reward", "lsp/kl_solver", "loss")})

    # a checkpoint every lsp.save_every steps; Preempted after a stop signal (the rerun evaluates this step)
    engine.finish(step, end, save=step % lsp.save_every == 0 and step < lsp.steps, after_save=saved)
    evaluate(s, engine.model, step)


def prompt_rows(prompts, lsp: LspConfig, cfg: RunConfig, step: int) -> list[int] | None:
    """The lsp.prompts rows of a step's queries (query_source=data), for the non-finite message only."""
    return prompt_indices(len(prompts), lsp.num_queries, seed=cfg.generation.seed, step=step) if prompts else None


def build_policy_and_reference(cfg: RunConfig, device):
    """The trained policy and π_Ref: a frozen second copy, or with LoRA (the peft: section, one set of
    adapters for the whole run) the base with its adapters disabled, so no second copy is held."""
    model = load_model(cfg.model, device=device, load_in_4bit=cfg.peft.load_in_4bit)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if not cfg.peft.on:
        return model, Reference(copy=load_model(cfg.model, device=device))
    model = add_adapters(model, cfg.peft, seed=cfg.train.seed, gradient_checkpointing=cfg.train.gradient_checkpointing)
    return model, Reference(peft_policy=model)


def step_metrics(r: Rollouts, scored: RolloutRewards, adv, quality, fallbacks, sol: dict, ch: dict | None,
                 difficulties: list[str | None] | None = None) -> dict:
    """TRL-like names with the lsp/ prefix (reward = the task reward R, before R_Q and KL).

    Beside the scalars: ``lsp/signal_frac``, the share of groups whose rewards are not all equal
    (``group_signal``); ``lsp/query_values``, the N values V(q_i) = mean_j R_ij (a list, for
    histograms); with lsp.difficulties, ``lsp/reward/difficulty=d``, the mean R of the queries asking for d."""
    rewards = scored.rewards
    n, g = rewards.shape
    signal = group_signal(rewards, scored.keep)
    unjudged = ~torch.tensor(scored.batch.valid).view(n, g) & ~scored.invalid[:, None]  # (N, G)
    row = {
        "lsp/reward": rewards.mean().item(),
        "lsp/reward_std": rewards.std().item(),
        "lsp/solver_reward": adv.solver_reward.mean().item(),
        "lsp/challenger_reward": adv.challenger_reward.mean().item(),
        "lsp/solver_advantage_abs": adv.solver.abs().mean().item(),
        "lsp/challenger_advantage_abs": adv.challenger.abs().mean().item(),
        "lsp/invalid_query_frac": scored.invalid.float().mean().item(),
        "lsp/unjudged_answer_frac": unjudged.float().mean().item(),
        "lsp/query_length": sum(map(len, r.query_ids)) / n,
        "lsp/answer_length": sum(map(len, r.answer_ids)) / (n * g),
        "lsp/query_truncated_frac": 1.0 - sum(r.queries_finished) / n,
        "lsp/answer_truncated_frac": 1.0 - sum(r.answers_finished) / (n * g),
        "lsp/kl_solver": sol["kl"],
        "lsp/solver_logps": sol["logps"],
        "lsp/solver_loss": sol["loss"],
        "lsp/signal_frac": signal.float().mean().item(),
        "lsp/query_values": adv.query_value.tolist(),
    }
    for d in sorted({d for d in difficulties or [] if d is not None}):
        rows = [i for i, di in enumerate(difficulties) if di == d]
        row[f"lsp/reward/difficulty={d}"] = rewards[rows].mean().item()
    if ch is not None:
        row.update({"lsp/kl_challenger": ch["kl"], "lsp/challenger_logps": ch["logps"], "lsp/challenger_loss": ch["loss"]})
    if quality is not None:
        row["lsp/quality_reward"] = quality.mean().item()
        row["lsp/quality_fallback_frac"] = fallbacks / (n * g)
    return row


def sample_rows(step: int, r: Rollouts, rewards, quality, adv) -> list[dict]:
    """One row per query: what the challenger asked, the solver's answers and their rewards."""
    g = r.group_size
    return [
        {
            "step": step, "query": q, "query_value": adv.query_value[i].item(),
            "challenger_advantage": adv.challenger[i].item(), "answers": r.answers[i * g : (i + 1) * g],
            "rewards": rewards[i].tolist(), **({"quality": quality[i].tolist()} if quality is not None else {}),
        }
        for i, q in enumerate(r.queries)
    ]


def evaluate(s: stages.Session, model, step: int) -> None:
    """Held-out evaluation every ``lsp.eval_every`` steps, at step 0 and at the last step (cached);
    with ``lsp.keep_models`` the policy of each evaluated step > 0 is saved too (``snapshot``)."""
    lsp: LspConfig = s.cfg.lsp
    if step % lsp.eval_every and step != lsp.steps:
        return
    if lsp.keep_models and step > 0:
        snapshot(s, model, step)
    was_training = model.training
    scores = stages.evaluate_stage(s, s.run_dir.lsp_step_label(step), model=model)
    model.train(was_training)  # evaluation leaves the model in eval mode; the live policy goes on training
    if scores and s.main and "exact_match" in scores:
        print(f"step {step}: held-out exact match {scores['exact_match']:.3f}", flush=True)


def snapshot(s: stages.Session, model, step: int) -> Path:
    """``run_dir.step_model(step)``: the policy (LoRA merged) and tokenizer, written once and renamed into place."""
    target = s.run_dir.step_model(step)
    if not (target / "config.json").exists():
        stages.save_pretrained(s, model, target)
    return target


def save_final(s: stages.Session, model, cfg: RunConfig) -> Path:
    """``run_dir.final_model``: save_pretrained + tokenizer (LoRA adapters merged into the base), renamed into place."""
    return stages.save_pretrained(s, model, s.run_dir.final_model)

