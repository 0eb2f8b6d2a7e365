"""Config strictness, overrides, per-iteration overrides and resume refusal."""

from __future__ import annotations

import json

import pytest
import yaml

from sparring.config import ConfigError, RunConfig, fingerprint, load_config
from sparring.state import RunDir


def write(tmp_path, data) -> str:
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
    with pytest.raises(ConfigError, match="cannot change per iteration"):
        load_config(write(tmp_path, {"per_iteration": {1: {"output_dir": "x"}}}))


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="max_prompt_length"):
        load_config(None, ["data.max_prompt_length=100", "data.max_length=50"])
    with pytest.raises(ConfigError, match="warmup_ratio"):
        load_config(None, ["train.warmup_ratio=1.5"])


def test_nll_coefs_default_off_and_refuse_negative_values(tmp_path):
    cfg = load_config(None)
    assert cfg.spin.nll_coef == 0.0 and cfg.tpaw.nll_coef == 0.0  # the papers' losses unless asked
    assert load_config(None, ["spin.nll_coef=1.0", "tpaw.nll_coef=0.5"]).spin.nll_coef == 1.0
    for key in ("spin.nll_coef", "tpaw.nll_coef"):
        with pytest.raises(ConfigError, match=rf"{key} must be >= 0"):
            load_config(None, [f"{key}=-0.1"])
        with pytest.raises(ConfigError, match=rf"{key} must be >= 0"):
            load_config(None, [f"{key}=.nan"])
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
    assert run.start(load_config("configs/lsp/tiny.yaml", [*base, "lsp.eval_every=5", "train.logprob_batch_size=3"]))
    with pytest.raises(ConfigError, match=r"lsp\.steps: 40 -> 80"):
        run.start(load_config("configs/lsp/tiny.yaml", [f"output_dir={tmp_path}", "lsp.steps=80"]))
