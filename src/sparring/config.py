"""Typed, strict run configuration: nested dataclasses, YAML files and dotted overrides.

    cfg = load_config("configs/spin/tiny.yaml", ["train.lr=1e-6", "spin.iterations=2"])

Every field has the papers' default in one place. An unknown key is an error that names the key and
lists the valid ones. ``per_iteration`` maps an iteration index to dotted overrides applied only in
that iteration (SPIN lowers the learning rate at iteration 2 and raises the scale at iteration 3):

    per_iteration:
      2: {train.lr: 1.0e-7}
      3: {train.lr: 1.0e-7, spin.scale: 5.0}

Only the fields in ``PER_ITERATION_FIELDS`` (the ones an iteration reads from its own config) may be
overridden there; any other key is refused, since the run would silently ignore it.

Each method reads only part of the config: the shared fields (``COMMON_FIELDS``) and its module's
``READS`` (``algorithms.reads``). A field a config file or an override sets that the method does not
read is refused for the same reason, and the resume fingerprint covers only what the method reads.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config that cannot be used, with a message that says what to change."""


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # Hub id or local directory (required)
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    attn_implementation: str | None = None
    # If name_or_path has no model yet, the CLI builds the built-in proving ground there first, from the
    # sft: section (`sparring sft`); only then may the config set sft: fields.
    build_proving_ground: bool = False


@dataclass
class DataConfig:
    source: str | None = None  # jsonl/json/parquet file, save_to_disk dir, Hub id (required by methods that train on data)
    split: str = "train"
    format: Literal["auto", "messages", "prompt_completion", "spin"] = "auto"
    num_prompts: int | None = None  # take the first N rows after shuffling (None: all)
    shuffle_seed: int = 42
    max_prompt_length: int = 512  # tokens; a longer prompt is a bad row
    max_length: int = 1024  # tokens of prompt + response; responses are cut to fit
    on_bad_row: Literal["error", "skip"] = "error"
    system_prompt: str | None = None  # prepended as a system turn when a row has none


@dataclass
class GenerationConfig:
    backend: Literal["hf", "vllm"] = "hf"
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off (the model's generation_config is never consulted)
    max_new_tokens: int = 256
    batch_size: int = 16
    seed: int = 42
    vllm_gpu_memory_utilization: float = 0.5  # the HF model of the iterate stays loaded beside vLLM
    # Generation stops at every end id the model declares (its generation_config EOS list, the chat
    # template's end-of-turn token, the tokenizer's EOS) and at these extra ids.
    stop_token_ids: list[int] = field(default_factory=list)
    # A response cut at max_new_tokens is never given an end of turn it did not generate. keep: train
    # on the tokens sampled; drop: leave its pair/row out of training (counted); penalize: LSP only,
    # the lowest reward (lsp.reward.truncated_reward). The papers do not say what they did.
    on_truncated: Literal["keep", "drop", "penalize"] = "keep"


@dataclass
class TrainConfig:
    optimizer: Literal["rmsprop", "adamw"] = "rmsprop"
    lr: float = 5.0e-7
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    # After the linear warm-up: linear decay to 0 (HF's "linear", the papers') or half a cosine to 0.
    lr_scheduler: Literal["linear", "cosine"] = "linear"
    epochs: int = 2
    batch_size: int = 8  # per device
    grad_accum: int = 1
    # Length-grouped micro-batches (less padding): each epoch's seeded permutation is cut into windows of
    # LENGTH_WINDOW micro-batches, each window sorted by record length and cut into micro-batches, and
    # the micro-batches shuffled (seeded). Every record once per epoch, as without it; resumable.
    group_by_length: bool = False
    # SPIN, T-SPIN, TPAW: each prompt runs through the model once for all its responses ([x, y, ·, y′]
    # with an attention bias, logprobs.SharedPrompt), not once per response; the same log-probs. Off by
    # itself for a model whose attention takes no 4D mask (FlashAttention-2).
    share_prompt: bool = True
    max_grad_norm: float = 1.0
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, none on CPU
    gradient_checkpointing: bool = False
    logprob_batch_size: int = 16  # batch size of the inference-mode log-prob passes
    save_steps: int = 50  # optimizer steps between resumable training checkpoints
    logging_steps: int = 1
    seed: int = 42
    # A step whose loss (or gradient norm) is NaN/inf. error: stop with its records, keeping the last
    # good checkpoint; skip_step: no optimizer or schedule step for it, counted (skipped_steps in train rows).
    on_nonfinite: Literal["error", "skip_step"] = "error"


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks run on every evaluated model (evaluation.lm_eval; needs sparring[eval])."""

    tasks: list[str] = field(default_factory=list)  # task, group or tag names of lm_eval; empty: off
    include_path: str | None = None  # a folder of task YAMLs of your own, beside lm_eval's
    num_fewshot: int | None = None  # None: each task's own count (0 where it sets none)
    limit: int | float | None = None  # examples per task (a fraction below 1): for smoke runs; None: all
    batch_size: int = 8
    apply_chat_template: bool = False  # prompts through the tokenizer's chat template


@dataclass
class EvalConfig:
    source: str | None = None  # held-out rows, any supported format (None: no held-out evaluation)
    split: str = "test"
    num_examples: int | None = None
    # Scores each greedy answer to a held-out prompt's last user turn: a verifier of the rewards registry
    # (proving_ground: the built-in task's exact match) or a user function "package.module:function"
    # taking (query, answer) -> float | None. None (or "none"): only real-response log-probs.
    verifier: str | None = None
    max_new_tokens: int = 32
    batch_size: int = 64
    # The first K held-out prompts' greedy answers of every evaluated model, in eval/<label>.answers.jsonl
    # (report.html shows them side by side); 0: none.
    sample_prompts: int = 8
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class SpinConfig:
    iterations: int = 3
    scale: float = 0.1  # λ in the paper, `beta` in the official code
    loss: Literal["sigmoid", "hinge"] = "sigmoid"
    mix_previous: int = 1  # synthetic sets of this many earlier iterations are added to the new one
    # Iteration 0 takes y′ from the data when rows carry one (the released SPIN_iter0 format).
    use_dataset_generated: bool = True
    # Extension, not the paper's method: + nll_coef · per-token NLL of the real y (RPO; TRL's rpo_alpha).
    nll_coef: float = 0.0


@dataclass
class TSpinConfig:
    """T-SPIN (Wang et al., NeurIPS 2025): reference-free triplet loss with a historical term."""

    iterations: int = 5
    scale: float = 1.0  # α, the scale of both pairwise terms
    # β per iteration, the last value repeating: 0 at iteration 0 (y′ and y₀ both come from θ_0), then 0.1.
    history_weight: list[float] = field(default_factory=lambda: [0.0, 0.1])
    loss: Literal["sigmoid", "hinge"] = "sigmoid"


@dataclass
class TpawConfig:
    """TPAW (Li et al., ACL 2026): a team of recent checkpoints with dual adaptive weights."""

    iterations: int = 4
    scale: float = 0.1  # λ in P_j(z) = λ·[L_θ(z) − L_θj(z)]
    target_weight_eta: float = 6.0  # η: α_j = η where P_j(y) ≤ 0, else 1 (1 turns target weighting off)
    player_temperature_gamma: float = 0.5  # γ: β = softmax_j(−γ·m_j) (0 gives uniform player weights)
    max_team_size: int = 3  # N_max: θ_t, θ_{t−1}, θ_{t−2}; also how many rounds' generations are reused
    detach_player_weights: bool = True
    every_player_scores_every_row: bool = True  # False: a row is scored only by the player that generated it
    logprob_reduction: Literal["sum", "mean"] = "sum"  # L_φ(z) summed (SPIN/DPO convention) or averaged
    # Extension, not the paper's method: + nll_coef · per-token NLL of the real y (as spin.nll_coef).
    nll_coef: float = 0.0


@dataclass
class LspRewardConfig:
    kind: Literal["verifier", "reward_model", "function"] = "verifier"
    verifier: str = "proving_ground"  # kind verifier: a name of rewards.registry (a verifier you register too)
    reward_model: str | None = None  # Hub id or local directory of a sequence-classification model
    function: str | None = None  # "package.module:function" taking (query, answer) -> float
    # Answers to a query the verifier cannot parse all get this reward: the solver learns nothing from
    # them (zero advantage) and the challenger sees the query as fully solved (its worst case).
    invalid_query_reward: float = 1.0
    # An answer the reward could not judge (a user function's None) beside judged answers of its query:
    # the lowest reward, so an unjudgeable answer is never the best one.
    unjudged_answer_reward: float = 0.0
    # With generation.on_truncated=penalize, an answer cut at lsp.answer_max_new_tokens gets this reward.
    truncated_reward: float = 0.0


@dataclass
class LspConfig:
    """LSP (Kuba et al., 2025): one model as challenger and solver, trained by REINFORCE."""

    variant: Literal["zero", "self_reward"] = "zero"
    steps: int = 1500
    num_queries: int = 8  # N
    answers_per_query: int = 4  # G
    challenger_coef: float = 1.0  # α_Ch
    kl_coef: float = 0.05  # β of the paper
    kl_estimator: Literal["k3", "reward"] = "k3"
    scale_std: bool = False  # LSP uses no standard-deviation scaling of advantages
    task: str | None = None  # {task} slot of the challenger prompt
    template: str | None = None  # {template} slot
    challenger_prompt: str | None = None  # replaces the built-in challenger prompt (keep {task}, {template})
    query_max_new_tokens: int = 64
    answer_max_new_tokens: int = 64
    judge_max_new_tokens: int = 256
    # variant self_reward: the grading prompt π_Ref answers, with {instruction} and {response} slots; None:
    # the built-in additive 0–7 rubric (rewards.self_judge.SELF_REWARD_PROMPT, spec B.5). The reply is
    # parsed the same way either way (<Score>…</Score>, else <Calculation>…</Calculation>, else 0).
    self_reward_prompt: str | None = None
    temperature: float = 1.0
    eval_every: int = 50  # K: held-out evaluation
    save_every: int = 50  # K: checkpoint for resume
    sample_every: int = 10  # K: queries and answers written to samples.jsonl
    reward: LspRewardConfig = field(default_factory=LspRewardConfig)
    # Where the N queries of a step come from. challenger: sampled from π_θ(·|⟨cp⟩) (LSP); data: N
    # prompts of the lsp.prompts file per step, in a seeded order (the paper's GRPO baseline, solver
    # loss only: needs lsp.challenger_coef = 0).
    query_source: Literal["challenger", "data"] = "challenger"
    prompts: str | None = None  # query_source=data: a jsonl/json/parquet file of messages or prompt rows
    # Fills the {difficulty} slot of the challenger prompt, cycled over the N queries (query i asks
    # for difficulties[i mod len]); empty: the prompt is used as it is.
    difficulties: list[str] = field(default_factory=list)
    keep_models: bool = False  # save θ at every evaluation step to RUN/models/step{K} (for later scoring)


@dataclass
class PeftConfig:
    """LoRA / QLoRA adapters, one section for every method (needs peft: pip install 'sparring[peft]').

    SPIN, T-SPIN, TPAW: each iteration trains fresh adapters on θ_t and merges them into θ_{t+1}, saved
    as a full model. LSP: one set of adapters for the whole run; π_Ref is the base with them disabled.
    """

    enabled: bool = False  # LoRA is on when enabled or r > 0
    r: int = 0  # rank
    alpha: float = 16.0  # the adapters' output is scaled by alpha / r
    dropout: float = 0.0  # on the adapters' input while training (0: every method's dropout is off)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # QLoRA: θ_t held in 4 bits (NF4, bitsandbytes, CUDA only), adapters in full precision; θ_{t+1}
    # is merged into a full-precision copy of θ_t, never into the rounded weights.
    load_in_4bit: bool = False

    @property
    def on(self) -> bool:
        return self.enabled or self.r > 0


@dataclass
class SftConfig:
    """`sparring sft`: trains the proving ground's tiny model from scratch."""

    output_dir: str = "runs/proving-ground"
    num_train: int = 3000
    num_eval: int = 300
    families: list[str] = field(default_factory=lambda: ["add", "sort", "reverse"])
    hidden_size: int = 128
    layers: int = 2
    heads: int = 4
    steps: int = 600
    batch_size: int = 64
    lr: float = 3.0e-3
    seed: int = 0
    # LSP's challenger role: when set, every training query is also a reply to this user prompt, so the
    # tiny model can write queries when LSP prompts it with the same (slot-filled) challenger prompt.
    challenger_prompt: str | None = None


@dataclass
class LoggingConfig:
    """Experiment trackers, through accelerate (metrics.jsonl, the source of reports, is always written)."""

    # accelerate's tracker names (tensorboard, wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive,
    # swanlab); tensorboard writes RUN/tb. [] logs to metrics.jsonl only. Others: pip install 'sparring[trackers]'.
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    project: str = "sparring"  # the trackers' project (wandb, trackio: project; mlflow: experiment)
    run_name: str | None = None  # the tracker run's name (None: the output_dir's folder name)


@dataclass
class HubConfig:
    """Pushing the final model to the Hugging Face Hub at the end of a run (``sparring.hub``). The token
    comes from HF_TOKEN or `hf auth login`, never from the config."""

    push: bool = False
    repo_id: str | None = None  # "user/name" (needed by push)
    private: bool = True  # a repo that does not exist yet is created private
    revision: str | None = None  # the branch of the final model (None: main)
    # SPIN, T-SPIN, TPAW: also push θ_{t+1} after every iteration t, to branch "iter-<t+1>".
    push_iterations: bool = False


@dataclass
class RunConfig:
    method: str = "spin"  # a name of sparring.algorithms.names(), checked at load time
    output_dir: str = "runs/spin"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    spin: SpinConfig = field(default_factory=SpinConfig)
    tspin: TSpinConfig = field(default_factory=TSpinConfig)
    tpaw: TpawConfig = field(default_factory=TpawConfig)
    lsp: LspConfig = field(default_factory=LspConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    sft: SftConfig = field(default_factory=SftConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hub: HubConfig = field(default_factory=HubConfig)
    per_iteration: dict[int, dict[str, Any]] = field(default_factory=dict)

    def for_iteration(self, iteration: int) -> RunConfig:
        """This config with the overrides for ``iteration`` applied (a new object)."""
        overrides = self.per_iteration.get(iteration, {})
        if not overrides:
            return self
        data = to_dict(self)
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return from_dict(RunConfig, data)


# Fields that do not change what a run computes: they may differ when a run is resumed.
RESUMABLE_FIELDS = (
    "output_dir",
    "spin.iterations",
    "tspin.iterations",
    "tpaw.iterations",
    "lsp.eval_every",
    "lsp.save_every",
    "lsp.sample_every",
    "train.logging_steps",
    "train.save_steps",
    "train.logprob_batch_size",
    "generation.vllm_gpu_memory_utilization",
    "eval",
    "model.build_proving_ground",
    "logging",
    "hub",
)


# What every method reads beside its module's READS: the shared set-up (stages.open_session: the run
# directory, the model and tokenizer, the accelerator's precision), LoRA (peft:, one section for every
# method), the held-out evaluation (eval:, and data.max_length, which cuts the held-out rows), the
# trackers (logging:) and the push of the final model (hub:).
COMMON_FIELDS = ("method", "output_dir", "model", "eval", "peft", "train.mixed_precision", "data.max_length",
                 "logging", "hub")
# Read by the CLI, which builds the proving ground from it, only with model.build_proving_ground: true.
PROVING_GROUND_SECTION = "sft"


def method_reads(method: str) -> tuple[str, ...]:
    """The dotted prefixes of RunConfig fields ``method`` reads: COMMON_FIELDS, then its READS."""
    from sparring import algorithms

    fields = tuple(dict.fromkeys((*COMMON_FIELDS, *algorithms.reads(method))))
    return tuple(f for f in fields if _is_under(f, [g for g in fields if g != f]) is None)  # data.max_length ⊂ data


def reads(cfg: RunConfig) -> tuple[str, ...]:
    """What a run of ``cfg`` reads: its method's fields, and the sft: section when the CLI builds the
    proving ground (model.build_proving_ground)."""
    extra = (PROVING_GROUND_SECTION,) if cfg.model.build_proving_ground else ()
    return method_reads(cfg.method) + extra


def _reads_text(cfg: RunConfig) -> str:
    fields = [f if "." in f or f in ("method", "output_dir", "per_iteration") else f + ".*" for f in reads(cfg)]
    if not cfg.model.build_proving_ground:
        fields.append(f"{PROVING_GROUND_SECTION}.* (with model.build_proving_ground: true)")
    return f"{cfg.method} reads: {', '.join(fields)}"


def check_set_fields(cfg: RunConfig, keys) -> None:
    """Refuse a field the user set (``keys``: dotted, from the file and the overrides) that the run
    does not read: it would be silently ignored."""
    readable = reads(cfg)
    for key in keys:  # per_iteration: validate says why a method without iterations does not read it
        if key != "per_iteration" and not _is_under(key, readable):
            raise ConfigError(f"'{key}' is set, but method {cfg.method} does not read it (remove it); "
                              f"{_reads_text(cfg)}")


def fields_set(data: dict[str, Any], cls: type | None = None, prefix: str = "") -> list[str]:
    """The dotted leaf fields a (validated) config mapping sets, e.g. ["train.lr", "spin.scale"]."""
    cls = cls or RunConfig
    hints = typing.get_type_hints(cls)
    out: list[str] = []
    for key, value in data.items():
        if dataclasses.is_dataclass(hints.get(key)) and isinstance(value, dict):
            out += fields_set(value, hints[key], f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def _override_fields(key: str, value: Any) -> list[str]:
    """The leaf fields an override sets: itself, or the fields of a section it sets to a mapping."""
    tp: Any = RunConfig
    for part in key.split("."):
        tp = typing.get_type_hints(tp).get(part) if dataclasses.is_dataclass(tp) else None
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return fields_set(value, tp, key + ".")
    return [key]


# The fields an iteration of SPIN, T-SPIN or TPAW reads from ``cfg.for_iteration(t)``: the only ones
# ``per_iteration`` may set (``validate`` refuses the rest). A method section counts for its method only.
PER_ITERATION_FIELDS = (
    # stages.generate builds the generator (hf or vllm), its SamplingParams, seed and batch size on every
    # call; stages.kept (on_truncated) picks the rows that train
    "generation",
    # training/loop.py train() and training/optim.py, given icfg.train
    "train.optimizer", "train.lr", "train.weight_decay", "train.warmup_ratio", "train.lr_scheduler", "train.epochs",
    "train.batch_size", "train.grad_accum", "train.group_by_length", "train.share_prompt", "train.max_grad_norm", "train.save_steps", "train.logging_steps",
    "train.on_nonfinite",
    # score_sequences: SPIN's opponent and TPAW's team log-prob passes
    "train.logprob_batch_size",
    # algorithms/spin.py: build_pairs (mix_previous) and spin_step
    "spin.scale", "spin.loss", "spin.mix_previous", "spin.nll_coef",
    # algorithms/tspin.py: β_t (history_weight) and tspin_step
    "tspin.scale", "tspin.loss", "tspin.history_weight",
    # algorithms/tpaw.py: team (max_team_size), team_logps and tpaw_step
    "tpaw.scale", "tpaw.target_weight_eta", "tpaw.player_temperature_gamma", "tpaw.max_team_size",
    "tpaw.detach_player_weights", "tpaw.every_player_scores_every_row", "tpaw.logprob_reduction", "tpaw.nll_coef",
)
ITERATIVE_METHODS = ("spin", "tspin", "tpaw")

# Why some fields that an iteration may seem to read are not per-iteration: the run reads them from its
# own config (a per-iteration value would apply in part, or not at all). The rest are read once at the start.
NOT_PER_ITERATION = {
    "model": "every iteration loads θ_t and the tokenizer with the run's model: settings",
    "eval": "every evaluation uses the run's eval: settings",
    "peft": "every iteration's adapters are set up from the run's peft: section (and TPAW loads the team as θ_t is)",
    "lsp": "only method lsp reads the lsp: section",
    "data.max_length": "it also cuts every real y and the held-out rows once, when the data loads, so a per-iteration "
                       "value would cut y′ and y differently",
    "spin.use_dataset_generated": "it decides where iteration 0's y′ come from, and every later iteration that mixes "
                                  "iteration 0 in reads it again with its own config: set it for the whole run",
    "train.seed": "LoRA adapters are drawn from the run's train.seed (stages.load_iterate)",
    "train.gradient_checkpointing": "LoRA adapters are set up for it from the run's config (stages.load_iterate)",
}


def _is_under(key: str, prefixes) -> str | None:
    """The entry of ``prefixes`` that ``key`` is, or lies under."""
    return next((p for p in prefixes if key == p or key.startswith(p + ".")), None)


def _check_per_iteration_key(cfg: RunConfig, key: str, iteration: int) -> None:
    fields = f"per-iteration fields are: {', '.join(_per_iteration_fields(cfg.method))}"
    section = key.split(".")[0]
    readable = method_reads(cfg.method)
    if section in ITERATIVE_METHODS and not _is_under(key, readable):
        raise ConfigError(f"per_iteration.{iteration}: '{key}' is a {section} setting and this run's method is "
                          f"{cfg.method}; {fields}")
    if _is_under(key, PER_ITERATION_FIELDS):
        if _is_under(key, readable):
            return
        raise ConfigError(f"per_iteration.{iteration}: '{key}': method {cfg.method} does not read it; {fields}")
    special = _is_under(key, NOT_PER_ITERATION)
    why = f"is not per iteration: {NOT_PER_ITERATION[special]}" if special else \
        "is read once at the start of a run, not per iteration"
    raise ConfigError(f"per_iteration.{iteration}: '{key}' {why}; {fields}")


def _per_iteration_fields(method: str) -> list[str]:
    """The whitelist as a user of ``method`` may write it (generation.* for the section prefix): the
    whitelisted fields the method reads."""
    mine = [f for f in PER_ITERATION_FIELDS if _is_under(f, method_reads(method))]
    return [f if "." in f else f + ".*" for f in mine]


# Keys that moved to another section: a config that still uses one is told where it went.
MOVED_KEYS = {
    "lsp.lora_r": "peft.r",
    "lsp.lora_alpha": "peft.alpha",
    "lsp.lora_target_modules": "peft.target_modules",
}


def _moved_error(keys: list[str]) -> ConfigError:
    moves = ", ".join(f"'{k}' is now '{MOVED_KEYS[k]}'" for k in keys)
    return ConfigError(f"config key moved: {moves} (LoRA is one peft: section for every method, see docs/algorithms.md)")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a dict, strictly: unknown keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"'{prefix.rstrip('.') or 'config'}' must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    moved = [prefix + k for k in unknown if prefix + k in MOVED_KEYS]
    if moved:
        raise _moved_error(moved)
    if unknown:
        where = f" in '{prefix.rstrip('.')}'" if prefix else ""
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'{where}; valid keys: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in data.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError:
                continue
        raise ConfigError(f"'{key}': {value!r} is not a valid {tp}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"'{key}': {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"'{key}': expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"'{key}': expected a mapping, got {value!r}")
        return {_coerce(key_tp, k, key): (v if value_tp is Any else _coerce(value_tp, v, key)) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"'{key}': expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"'{key}': expected a number, got {value!r}")
        try:
            number = tp(value) if isinstance(value, str) else value
        except ValueError:
            raise ConfigError(f"'{key}': expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(number, float) and number.is_integer():
            number = int(number)
        if tp is float and isinstance(number, int):
            number = float(number)
        if not isinstance(number, tp):
            raise ConfigError(f"'{key}': expected {tp.__name__}, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{key}': expected a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"'{key}': unsupported field type {tp}")


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    if key in MOVED_KEYS:
        raise _moved_error([key])
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
            valid = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise ConfigError(f"unknown config key '{'.'.join(parts[: i + 1])}' in override '{key}'; valid: {valid}")
        node = node[part]
    if parts[-1] not in node and parts[0] != "per_iteration":
        raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(node))}")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-6", "spin.iterations=2"]`` -> [(key, value)], values parsed as YAML scalars."""
    parsed = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        parsed.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return parsed


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, check_reads: bool = True) -> RunConfig:
    """Read a YAML file (or the embedded quickstart config when ``path`` is None) and apply overrides.

    ``check_reads=False`` skips the check that the method reads every field set: for a run directory's
    own config.yaml, which earlier versions wrote with every section."""
    if path is None:
        from importlib.resources import files

        text = (files("sparring") / "presets" / "quickstart.yaml").read_text()
    else:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path or 'quickstart'} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError("a config file must be a mapping of sections")
    # Validate the file alone first so an error names the file's key, then fill defaults.
    from_dict(RunConfig, data)
    full = to_dict(from_dict(RunConfig, data))
    given = fields_set(data)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(full, key, value)
        given += _override_fields(key, value)
    cfg = from_dict(RunConfig, full)
    validate(cfg, set_fields=dict.fromkeys(given) if check_reads else None)
    return cfg


def validate(cfg: RunConfig, *, set_fields=None) -> None:
    """Checks across fields, that every per-iteration override names a real field, and (given
    ``set_fields``, the dotted fields the user set) that the method reads every field set."""
    from sparring import algorithms

    if cfg.method not in algorithms.names():
        raise ConfigError(f"'method': {cfg.method!r} is not a method; methods: {', '.join(algorithms.names())} "
                          "(a method of your own joins with sparring.algorithms.register)")
    if set_fields is not None:
        check_set_fields(cfg, set_fields)
    readable = method_reads(cfg.method)
    base = to_dict(cfg)
    if cfg.per_iteration and "per_iteration" not in readable:
        loop = f" (one online loop of {cfg.method}.steps steps)" if cfg.method == "lsp" else ""
        raise ConfigError(f"per_iteration: method {cfg.method} has no iterations{loop} and never reads "
                          "per_iteration; remove it")
    for iteration, overrides in cfg.per_iteration.items():
        if iteration < 0:
            raise ConfigError(f"per_iteration: iteration {iteration} must be >= 0")
        for key in overrides:
            _check_key(base, key, iteration)
            _check_per_iteration_key(cfg, key, iteration)
        _check_iteration_fields(cfg.for_iteration(iteration), f"per_iteration.{iteration}: ")  # also type-checks
    if _is_under("data.max_prompt_length", readable) and cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError("data.max_prompt_length must be smaller than data.max_length")
    if cfg.spin.iterations < 1:
        raise ConfigError("spin.iterations must be >= 1")
    _check_iteration_fields(cfg)
    _validate_lsp(cfg.lsp)
    _validate_peft(cfg.peft)
    _check_verifier(cfg.eval)
    if cfg.eval.sample_prompts < 0:
        raise ConfigError(f"eval.sample_prompts must be >= 0 (held-out prompts whose answers are shown; 0: none), "
                          f"got {cfg.eval.sample_prompts}")
    _validate_lm_eval(cfg.eval.lm_eval)
    _validate_logging(cfg.logging)
    _validate_hub(cfg)
    if not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path is required: a Hub id or a local model directory")
    if _is_under("data.source", readable) and not cfg.data.source:
        raise ConfigError(f"data.source is required by method {cfg.method}: a jsonl/json/parquet file, a "
                          "save_to_disk folder or a Hub dataset id")


def _check_verifier(ev: EvalConfig) -> None:
    """eval.verifier: a verifier of the rewards registry or a "package.module:function" spec (imported
    when the evaluation runs), and only with held-out data to score."""
    if ev.verifier in (None, "none"):
        return
    from sparring.rewards.registry import names

    if ":" not in ev.verifier and ev.verifier not in names():
        raise ConfigError(f"eval.verifier: {ev.verifier!r} is not a verifier; verifiers: {', '.join(names())}, "
                          "or a function of your own as 'package.module:function' taking (query, answer)")
    if not ev.source:
        raise ConfigError(f"eval.verifier={ev.verifier} scores held-out answers, but eval.source is not set: "
                          "set eval.source (held-out rows), or remove eval.verifier")


def _validate_lm_eval(lm: LmEvalConfig) -> None:
    """eval.lm_eval: sizes in range, a folder that exists, and lm-evaluation-harness installed when tasks are set."""
    if lm.num_fewshot is not None and lm.num_fewshot < 0:
        raise ConfigError(f"eval.lm_eval.num_fewshot must be >= 0 (None: each task's own), got {lm.num_fewshot}")
    if lm.limit is not None and not lm.limit > 0:
        raise ConfigError(f"eval.lm_eval.limit must be > 0 (examples per task, or a fraction below 1; None: all), "
                          f"got {lm.limit}")
    if lm.batch_size < 1:
        raise ConfigError(f"eval.lm_eval.batch_size must be >= 1, got {lm.batch_size}")
    if lm.include_path is not None and not Path(lm.include_path).is_dir():
        raise ConfigError(f"eval.lm_eval.include_path: {lm.include_path} is not a folder (of task YAMLs)")
    if lm.tasks:
        from sparring.evaluation.lm_eval import check_installed

        check_installed()


def _validate_logging(logging: LoggingConfig) -> None:
    from accelerate.utils import LoggerType

    known = [str(t) for t in LoggerType if str(t) != "all"]
    unknown = [name for name in logging.report_to if name not in known]
    if unknown:
        raise ConfigError(f"logging.report_to: {unknown[0]!r} is not a tracker; trackers: {', '.join(known)} "
                          "([] for metrics.jsonl only)")
    if not logging.project:
        raise ConfigError("logging.project must not be empty")


def _validate_hub(cfg: RunConfig) -> None:
    hub = cfg.hub
    if (hub.push or hub.push_iterations) and not hub.repo_id:
        raise ConfigError("hub.push needs hub.repo_id: the Hub repository to push to, as 'user/name'")
    if hub.push_iterations and not hub.push:
        raise ConfigError("hub.push_iterations pushes every iteration's model beside the final one: set hub.push too")
    if hub.push_iterations and cfg.method not in ITERATIVE_METHODS:
        raise ConfigError(f"hub.push_iterations: method {cfg.method} has no iterations to push (its final model "
                          "is pushed with hub.push); remove hub.push_iterations")


def _check_iteration_fields(cfg: RunConfig, where: str = "") -> None:
    """Checks of fields that ``per_iteration`` may set: run on the config and on each iteration's."""
    if cfg.train.epochs < 1 or cfg.train.batch_size < 1 or cfg.train.grad_accum < 1:
        raise ConfigError(f"{where}train.epochs, train.batch_size and train.grad_accum must be >= 1")
    if not 0.0 <= cfg.train.warmup_ratio < 1.0:
        raise ConfigError(f"{where}train.warmup_ratio must be in [0, 1)")
    if cfg.spin.mix_previous < 0:
        raise ConfigError(f"{where}spin.mix_previous must be >= 0")
    if cfg.tpaw.max_team_size < 1:  # 0 would leave a TPAW round without players
        raise ConfigError(f"{where}tpaw.max_team_size must be >= 1")
    _check_nll_coefs(cfg, where)
    if cfg.generation.on_truncated == "penalize" and cfg.method != "lsp":
        raise ConfigError(
            f"{where}generation.on_truncated=penalize gives truncated answers the lowest reward, which only a rewarded "
            f"method (lsp) has; {cfg.method} already pushes every y′ down: use keep or drop"
        )


def _check_nll_coefs(cfg: RunConfig, where: str = "") -> None:
    for name, coef in (("spin.nll_coef", cfg.spin.nll_coef), ("tpaw.nll_coef", cfg.tpaw.nll_coef)):
        if not coef >= 0:  # NaN is refused too
            raise ConfigError(f"{where}{name} must be >= 0 (0 turns the NLL term off), got {coef}")


def _validate_lsp(lsp: LspConfig) -> None:
    if lsp.num_queries < 2 or lsp.answers_per_query < 2:
        raise ConfigError(
            f"LSP needs lsp.num_queries >= 2 and lsp.answers_per_query >= 2 (got N={lsp.num_queries}, "
            f"G={lsp.answers_per_query}): with G = 1 every solver advantage and with N = 1 every "
            "challenger advantage is identically zero"
        )
    if min(lsp.steps, lsp.eval_every, lsp.save_every, lsp.sample_every) < 1:
        raise ConfigError("lsp.steps, lsp.eval_every, lsp.save_every and lsp.sample_every must be >= 1")
    if min(lsp.query_max_new_tokens, lsp.answer_max_new_tokens, lsp.judge_max_new_tokens) < 1:
        raise ConfigError("lsp.query_max_new_tokens, answer_max_new_tokens and judge_max_new_tokens must be >= 1")
    if lsp.kl_coef < 0 or lsp.challenger_coef < 0 or lsp.temperature <= 0:
        raise ConfigError("lsp.kl_coef and lsp.challenger_coef must be >= 0 and lsp.temperature > 0")
    if lsp.query_source == "data":
        if not lsp.prompts:
            raise ConfigError("lsp.query_source=data needs lsp.prompts (a file of messages or prompt rows)")
        if lsp.challenger_coef != 0:
            raise ConfigError(
                "lsp.query_source=data trains the solver only (GRPO on data prompts): there is no challenger to "
                f"train, so set lsp.challenger_coef=0 (got {lsp.challenger_coef:g})"
            )
        if lsp.difficulties:
            raise ConfigError("lsp.difficulties fills the challenger prompt, which lsp.query_source=data does not use")
    elif lsp.prompts:
        raise ConfigError("lsp.prompts is read only with lsp.query_source=data; set it, or remove lsp.prompts")
    if lsp.difficulties and "{difficulty}" not in (lsp.challenger_prompt or ""):
        raise ConfigError("lsp.difficulties needs a {difficulty} slot in lsp.challenger_prompt")
    if lsp.self_reward_prompt is not None and not all(s in lsp.self_reward_prompt for s in ("{instruction}", "{response}")):
        raise ConfigError("lsp.self_reward_prompt needs an {instruction} and a {response} slot")
    if lsp.reward.kind == "reward_model" and not lsp.reward.reward_model:
        raise ConfigError("lsp.reward.kind=reward_model needs lsp.reward.reward_model (a Hub id or local directory)")
    if lsp.reward.kind == "verifier":
        from sparring.rewards import registry

        if lsp.reward.verifier not in registry.names():
            raise ConfigError(f"lsp.reward.verifier={lsp.reward.verifier!r} is not a registered verifier; verifiers: "
                              f"{', '.join(registry.names())} (a function of yours: lsp.reward.kind=function)")
    if lsp.reward.kind == "function" and not lsp.reward.function:
        raise ConfigError("lsp.reward.kind=function needs lsp.reward.function ('package.module:function')")


def _validate_peft(peft: PeftConfig) -> None:
    if peft.r < 0:
        raise ConfigError("peft.r must be >= 0 (0 with peft.enabled=false turns LoRA off)")
    if peft.enabled and peft.r == 0:
        raise ConfigError("peft.enabled=true needs the adapters' rank: set peft.r (e.g. 16)")
    if peft.load_in_4bit and not peft.on:
        raise ConfigError("peft.load_in_4bit (QLoRA) trains adapters on a 4-bit model: set peft.r too")
    if peft.on and (peft.alpha <= 0 or not 0.0 <= peft.dropout < 1.0 or not peft.target_modules):
        raise ConfigError("peft.alpha must be > 0, peft.dropout in [0, 1) and peft.target_modules non-empty")


def _check_key(base: dict[str, Any], key: str, iteration: int) -> None:
    if key in MOVED_KEYS:
        raise _moved_error([key])
    node: Any = base
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"per_iteration.{iteration}: unknown config key '{key}'")
        node = node[part]


def fingerprint(cfg: RunConfig) -> dict[str, Any]:
    """The settings that change results, flattened to dotted keys (compared on resume): the fields
    the method reads (``method_reads``), less the RESUMABLE_FIELDS."""
    readable = method_reads(cfg.method)
    return {k: v for k, v in flat_settings(cfg).items() if _is_under(k, readable) and not _is_under(k, RESUMABLE_FIELDS)}


def flat_reads(cfg: RunConfig) -> dict[str, Any]:
    """The fields the run reads (``reads``), flattened to dotted keys: the config trackers record."""
    readable = reads(cfg)
    return {k: v for k, v in flat_settings(cfg).items() if _is_under(k, readable)}


def flat_settings(cfg: RunConfig) -> dict[str, Any]:
    """Every field of ``cfg``, flattened to dotted keys (per_iteration as one value)."""
    return _flatten(to_dict(cfg))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "per_iteration" and value and all(isinstance(k, str) for k in value):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, sort_keys=True, default=str))
    return out


def dump_yaml(cfg: RunConfig) -> str:
    """The fields the run reads (``reads``), as YAML: the file loads back as the same run."""
    return yaml.safe_dump(_readable_dict(cfg, cfg, reads(cfg)), sort_keys=False)


def _readable_dict(obj: Any, cfg: RunConfig, readable: tuple[str, ...], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            section = _readable_dict(value, cfg, readable, key + ".")
            if section:
                out[f.name] = section
        elif _is_under(key, readable):
            out[f.name] = copy.deepcopy(value)
    return out
