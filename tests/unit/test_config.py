"""Config strictness, overrides, per-iteration overrides and resume refusal."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from tests.conftest import REPO

from sparring.config import (
    NOT_PER_ITERATION,
    PER_ITERATION_FIELDS,
    ConfigError,
    GenerationConfig,
    RunConfig,
    fingerprint,
    load_config,
)
from sparring.state import RunDir


def write(tmp_path, data, *, required: bool = True) -> str:
    """``data`` as a config file, with the model and data source every run needs (``required``)."""
    if required:
        base = {"model": {"name_or_path": "some/model"}}
        base |= {} if data.get("method") == "lsp" else {"data": {"source": "train.jsonl"}}
        data = {**base, **data}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_quickstart_loads_with_typed_overrides():
    cfg = load_config(None, ["train.lr=1e-6", "spin.iterations=2", "train.gradient_checkpointing=true"])
    assert cfg.train.lr == 1e-6 and isinstance(cfg.train.lr, float)  # YAML reads "1e-6" as a string
    assert cfg.spin.iterations == 2 and cfg.train.gradient_checkpointing is True
    assert cfg.method == "spin"


@pytest.mark.parametrize(
    "overrides, names",
    [
        (["train.lrr=1"], ["train.lrr", "lr", "optimizer"]),
        (["trian.lr=1"], ["trian", "train", "model"]),
        (["spin.scale.x=1"], ["spin.scale"]),
    ],
)
def test_unknown_override_key_names_key_and_valid_ones(overrides, names):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    for name in names:
        assert name in str(err.value)


def test_unknown_key_in_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'generation.temprature'.*temperature"):
        load_config(write(tmp_path, {"generation": {"temprature": 0.7}}))
    with pytest.raises(ConfigError, match=r"unknown config key 'methd'.*method"):
        load_config(write(tmp_path, {"methd": "spin"}))


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochs=two", "expected int"),
        ("train.optimizer=sgd", "not one of"),
        ("spin.loss=logistic", "not one of"),
        ("train.gradient_checkpointing=maybe", "true or false"),
        ("train.lr=true", "expected a number"),
    ],
)
def test_wrong_types_are_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_per_iteration_overrides_apply_only_to_their_iteration(tmp_path):
    path = write(tmp_path, {"per_iteration": {2: {"train.lr": 1.0e-7}, 3: {"train.lr": 1.0e-7, "spin.scale": 5.0}}})
    cfg = load_config(path, ["train.lr=5e-7"])
    assert [cfg.for_iteration(t).train.lr for t in range(4)] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert [cfg.for_iteration(t).spin.scale for t in range(4)] == [0.1, 0.1, 0.1, 5.0]
    assert cfg.train.lr == 5e-7  # the base config is not modified


def test_per_iteration_unknown_key_and_bad_value(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.lrate'"):
        load_config(write(tmp_path, {"per_iteration": {1: {"train.lrate": 1.0}}}))
    with pytest.raises(ConfigError, match="expected float"):
        load_config(write(tmp_path, {"per_iteration": {1: {"train.lr": "fast"}}}))
    with pytest.raises(ConfigError, match="'output_dir' is read once at the start of a run, not per iteration"):
        load_config(write(tmp_path, {"per_iteration": {1: {"output_dir": "x"}}}))


@pytest.mark.parametrize("method, key, value", [
    ("spin", "spin.scale", 5.0), ("spin", "spin.mix_previous", 0),
    ("tspin", "tspin.history_weight", [0.5]), ("tpaw", "tpaw.target_weight_eta", 2.0),
    ("tpaw", "tpaw.max_team_size", 2), ("spin", "generation.temperature", 0.7), ("tpaw", "train.epochs", 3),
])
def test_a_per_iteration_field_changes_only_its_iteration(tmp_path, method, key, value):
    cfg = load_config(write(tmp_path, {"method": method, "per_iteration": {1: {key: value}}}))
    section, name = key.split(".")

    def read(t):
        return getattr(getattr(cfg.for_iteration(t), section), name)

    assert read(1) == value and read(0) == read(2) == getattr(getattr(cfg, section), name) != value


@pytest.mark.parametrize("key, value, why", [
    ("data.source", "other.jsonl", "is read once at the start of a run, not per iteration"),
    ("train.mixed_precision", "no", "is read once at the start of a run, not per iteration"),
    ("spin.iterations", 9, "is read once at the start of a run, not per iteration"),
    ("model.name_or_path", "other", "is not per iteration: every iteration loads θ_t"),
    ("eval.num_examples", 3, "is not per iteration: every evaluation"),
    ("data.max_length", 80, "is not per iteration: it also cuts every real y"),
    ("spin.use_dataset_generated", False, "is not per iteration: it decides where iteration 0's y′ come from"),
    ("train.seed", 1, "is not per iteration: LoRA adapters are drawn"),
    ("lsp.kl_coef", 0.1, "is not per iteration: only method lsp reads"),
])
def test_a_field_not_read_per_iteration_is_refused(tmp_path, key, value, why):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, {"per_iteration": {2: {key: value}}}))
    message = str(err.value)
    assert message.startswith(f"per_iteration.2: '{key}' {why}")
    assert message.endswith("per-iteration fields are: generation.*, train.optimizer, train.lr, train.weight_decay, "
                            "train.warmup_ratio, train.lr_scheduler, train.epochs, train.batch_size, train.grad_accum, "
                            "train.group_by_length, train.share_prompt, train.max_grad_norm, train.save_steps, train.logging_steps, train.on_nonfinite, "
                            "train.logprob_batch_size, spin.scale, spin.loss, spin.mix_previous, spin.nll_coef")


def test_another_method_section_is_refused_per_iteration(tmp_path):
    with pytest.raises(ConfigError, match=r"per_iteration\.1: 'spin\.scale' is a spin setting and this run's method "
                                          r"is tpaw; per-iteration fields are: .*tpaw\.scale"):
        load_config(write(tmp_path, {"method": "tpaw", "per_iteration": {1: {"spin.scale": 1.0}}}))


def test_per_iteration_values_are_checked_like_the_run_ones(tmp_path):
    for key, value, message in [("train.epochs", 0, "train.epochs, train.batch_size"),
                                ("generation.on_truncated", "penalize", "generation.on_truncated=penalize"),
                                ("tpaw.max_team_size", 0, "tpaw.max_team_size must be >= 1")]:
        with pytest.raises(ConfigError, match=rf"^per_iteration\.1: {message}"):
            load_config(write(tmp_path, {"method": "tpaw", "per_iteration": {1: {key: value}}}))


def test_lsp_has_no_iterations_so_per_iteration_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="method lsp has no iterations .* never reads per_iteration; remove it"):
        load_config(str(REPO / "configs" / "lsp" / "tiny.yaml"), ["per_iteration={1: {train.lr: 1.0e-7}}"])


def run_configs() -> list[Path]:
    """Every shipped run config (configs/experiments holds experiment specs, configs/accelerate launcher files)."""
    skip = {REPO / "configs" / "experiments", REPO / "configs" / "accelerate"}
    return sorted(p for p in (REPO / "configs").glob("**/*.yaml") if not skip & set(p.parents))


@pytest.mark.parametrize("path", run_configs(), ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_shipped_run_config_loads(path):
    assert load_config(path).method in ("spin", "tspin", "tpaw", "lsp", "sft")


class Recorder:
    """A config (or section) that notes every field read through it, as dotted keys."""

    __slots__ = ("_obj", "_prefix", "_seen")

    def __init__(self, obj, prefix: str, seen: set[str]):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_prefix", prefix)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name):
        value = getattr(self._obj, name)
        if dataclasses.is_dataclass(value):
            return Recorder(value, f"{self._prefix}{name}.", self._seen)
        self._seen.add(self._prefix + name)
        return value

    @property
    def __dict__(self):  # vars(section): every field is read
        self._seen.update(self._prefix + f.name for f in dataclasses.fields(self._obj))
        return vars(self._obj)


def _allowed(key: str, method: str) -> bool:
    section = key.split(".")[0]
    if section in ("spin", "tspin", "tpaw") and section != method:
        return False
    return any(key == f or key.startswith(f + ".") for f in (*PER_ITERATION_FIELDS, *NOT_PER_ITERATION))


def test_the_per_iteration_whitelist_is_what_an_iteration_reads(tmp_path, monkeypatch):
    """One tiny iteration of each method through a recording proxy of cfg.for_iteration(t): every field
    it reads is whitelisted (or listed with the reason it is not), and every whitelisted one is read."""
    from sparring.algorithms import get
    from sparring.config import SftConfig
    from sparring.tasks import build_tiny_model, build_tokenizer
    from sparring.tasks.sft import write_data

    train_path, _ = write_data(SftConfig(output_dir=str(tmp_path / "ground"), num_train=8, num_eval=4))
    tok = build_tokenizer()
    build_tiny_model(tok, hidden_size=32, layers=1, heads=2).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    original = RunConfig.for_iteration
    every_generation_field = [f"generation.{f.name}" for f in dataclasses.fields(GenerationConfig)]
    for method in ("spin", "tspin", "tpaw"):
        seen: set[str] = set()
        monkeypatch.setattr(RunConfig, "for_iteration", lambda self, t, seen=seen: Recorder(original(self, t), "", seen))
        cfg = load_config(str(REPO / "configs" / method / "tiny.yaml"), [
            f"output_dir={tmp_path / method}", f"model.name_or_path={tmp_path / 'base'}",
            f"data.source={train_path}", "data.num_prompts=4", "eval.source=null", "eval.verifier=none",
            "generation.max_new_tokens=4", "generation.batch_size=4", "train.batch_size=4", f"{method}.iterations=1",
        ])
        get(method)(cfg)
        assert sorted(k for k in seen if not _allowed(k, method)) == []
        whitelist = [k for f in PER_ITERATION_FIELDS for k in (every_generation_field if f == "generation" else [f])]
        # read only by the vllm backend / when a step is not finite; T-SPIN has no log-prob pass
        unread = {"generation.vllm_gpu_memory_utilization", "train.on_nonfinite"}
        unread |= {"train.logprob_batch_size"} if method == "tspin" else set()
        assert sorted(k for k in whitelist if _allowed(k, method) and k not in seen and k not in unread) == []


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(None, ["data.max_prompt_length=100", "data.max_length=50"])
    with pytest.raises(ConfigError, match="warmup_ratio"):
        load_config(None, ["train.warmup_ratio=1.5"])


def test_nll_coefs_default_off_and_refuse_negative_values(tmp_path):
    cfg = load_config(None)
    assert cfg.spin.nll_coef == 0.0 and cfg.tpaw.nll_coef == 0.0  # the papers' losses unless asked
    assert load_config(None, ["spin.nll_coef=1.0"]).spin.nll_coef == 1.0
    tpaw = str(REPO / "configs" / "tpaw" / "tiny.yaml")
    assert load_config(tpaw, ["tpaw.nll_coef=0.5"]).tpaw.nll_coef == 0.5
    for config, key in ((None, "spin.nll_coef"), (tpaw, "tpaw.nll_coef")):
        with pytest.raises(ConfigError, match=rf"{key} must be >= 0"):
            load_config(config, [f"{key}=-0.1"])
        with pytest.raises(ConfigError, match=rf"{key} must be >= 0"):
            load_config(config, [f"{key}=.nan"])
    with pytest.raises(ConfigError, match=r"per_iteration\.2: spin\.nll_coef must be >= 0"):
        load_config(write(tmp_path, {"per_iteration": {2: {"spin.nll_coef": -1.0}}}))


def test_paper_preset_encodes_the_spin_schedule():
    cfg = load_config("configs/spin/zephyr-7b.yaml")
    assert cfg.model.revision == "ac6e600eefcce74f5e8bae1035d4f66019e93190"
    assert cfg.train.optimizer == "rmsprop" and cfg.train.warmup_ratio == 0.1 and cfg.spin.iterations == 4
    assert [cfg.for_iteration(t).train.lr for t in range(4)] == [5e-7, 5e-7, 1e-7, 1e-7]
    assert [cfg.for_iteration(t).spin.scale for t in range(4)] == [0.1, 0.1, 0.1, 5.0]
    assert cfg.train.batch_size * 8 * cfg.train.grad_accum == 64


def test_resume_refuses_changed_results_setting_unless_forced(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}", "train.lr=5e-4"])
    run = RunDir(tmp_path)
    assert run.start(cfg) is False
    assert (tmp_path / "config.yaml").exists() and "fingerprint" in run.load_state()
    assert run.start(cfg) is True
    # Settings that do not change results may differ on resume.
    assert run.start(load_config(None, [f"output_dir={tmp_path}", "train.lr=5e-4", "spin.iterations=5", "train.save_steps=7"]))
    changed = load_config(None, [f"output_dir={tmp_path}", "train.lr=1e-3"])
    with pytest.raises(ConfigError, match=r"train\.lr: 0\.0005 -> 0\.001"):
        run.start(changed)
    assert run.start(changed, force=True) is True
    assert run.load_state()["forced_changes"] == [["train.lr"]]


def test_fingerprint_ignores_output_dir_but_sees_results_settings():
    a, b = RunConfig(), RunConfig()
    b.output_dir = "elsewhere"
    assert fingerprint(a) == fingerprint(b)
    b.generation.temperature = 0.7
    assert fingerprint(a) != fingerprint(b)


def test_a_field_added_after_the_run_started_does_not_block_resume(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    run = RunDir(tmp_path)
    run.start(cfg)
    state = run.load_state()
    del state["fingerprint"]["generation.top_k"]  # as if the run predates the field
    state["fingerprint"]["spin.retired_option"] = 3  # and had a field sparring no longer has
    (tmp_path / "state.json").write_text(json.dumps(state))
    assert run.start(cfg) is True
    state = run.load_state()
    del state["fingerprint"]["generation.top_k"]
    (tmp_path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ConfigError, match=r"generation.top_k: '\(not set\)' -> 5"):
        run.start(load_config(None, [f"output_dir={tmp_path}", "generation.top_k=5"]))


def test_resume_refuses_a_changed_lsp_steps(tmp_path):
    # lsp.steps is the length of the learning-rate schedule: another value changes every remaining step.
    base = [f"output_dir={tmp_path}", "lsp.steps=40"]
    run = RunDir(tmp_path)
    run.start(load_config("configs/lsp/tiny.yaml", base))
    assert run.start(load_config("configs/lsp/tiny.yaml", [*base, "lsp.eval_every=5", "train.logging_steps=3"]))
    with pytest.raises(ConfigError, match=r"lsp\.steps: 40 -> 80"):
        run.start(load_config("configs/lsp/tiny.yaml", [f"output_dir={tmp_path}", "lsp.steps=80"]))
