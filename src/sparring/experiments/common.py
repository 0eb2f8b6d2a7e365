"""What the experiments share: reading their config, the tiny θ0 each fits first, the wall clock.

Every experiment module has ``load(path, overrides)`` (via ``read_config``) and ``run(cfg, *, command)``;
``sparring experiment CONFIG`` picks the module from the config's top-level ``experiment:`` key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

from sparring.config import ConfigError, from_dict


@dataclasses.dataclass
class TinyGround:
    """The fields every experiment shares: where it reports, the tiny θ0 it fits first (``new_tiny_model``)
    and its SFT, the seeds, the overrides of every run and the scoring / worker settings. Each experiment's
    config adds its own fields and changes these defaults where it needs to."""

    report: str = "docs/RESULTS.md"  # the section between the experiment's markers is (re)written in this file
    data_seed: int = 7
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    sft_lr: float = 3.0e-3
    sft_batch_size: int = 64
    sft_max_steps: int = 3000
    sft_eval_every: int = 100
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    overrides: list[str] = dataclasses.field(default_factory=list)  # dotted overrides for every run
    max_new_tokens: int = 8  # answers (generation and evaluation)
    eval_batch_size: int = 256
    workers: int = 2


def read_config(cls, path: str | Path, overrides: list[str] | None, *, name: str, arms: tuple[str, ...],
                default: str | None = None):
    """``cls`` from the YAML at ``path`` plus dotted ``overrides``; refuses a config of another experiment
    (its ``experiment:`` key, ``default`` when absent), unknown arms and, where ``lr_grid`` is a mapping,
    an arm without rates."""
    import yaml

    from sparring.config import _set_dotted, parse_overrides

    given = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{path}: expected a mapping of experiment settings")
    # every field can be overridden, also one the file leaves at its default (an unknown one is refused)
    data = {**dataclasses.asdict(cls()), **given}
    for key, value in parse_overrides(overrides or []):
        _set_dotted(data, key, value)
    has_field = "experiment" in {f.name for f in dataclasses.fields(cls)}
    kind = data.get("experiment", default) if has_field else data.pop("experiment", default)
    if kind != name:
        raise ConfigError(f"{path} is not a {name} experiment config (experiment: {kind!r})")
    cfg = from_dict(cls, data)
    unknown = sorted(set(cfg.arms) - set(arms))
    if unknown:
        raise ConfigError(f"unknown arm {unknown[0]!r}; arms are {', '.join(arms)}")
    grid = getattr(cfg, "lr_grid", None)
    missing = [a for a in cfg.arms if a not in grid] if isinstance(grid, dict) else []
    if missing:
        raise ConfigError(f"lr_grid has no rates for arm {missing[0]!r}")
    return cfg


def new_tiny_model(cfg):
    """(tokenizer, model): the proving ground's character tokenizer and a fresh tiny Llama of the config's
    ``hidden_size`` / ``layers`` / ``heads``, initialised from ``data_seed``."""
    from sparring.tasks.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer()
    return tokenizer, build_tiny_model(tokenizer, hidden_size=cfg.hidden_size, layers=cfg.layers, heads=cfg.heads,
                                       seed=cfg.data_seed)


def open_model(model_dir: str | Path):
    """(tokenizer, model) of a saved checkpoint in fp32, in a worker with one torch thread (scoring jobs)."""
    import torch

    from sparring.config import ModelConfig
    from sparring.modeling import load_model, load_tokenizer

    torch.set_num_threads(1)
    model_cfg = ModelConfig(name_or_path=str(model_dir), dtype="float32")
    return load_tokenizer(model_cfg), load_model(model_cfg)


def theta0_settings(cfg, names: tuple[str, ...]) -> dict:
    """The config fields θ0 and its data are built from (JSON-normalised, as they are stored)."""
    return json.loads(json.dumps({name: getattr(cfg, name) for name in names}))


def built_theta0(target: Path, settings: dict) -> bool:
    """Whether ``target`` already holds θ0; a θ0 built from other ``settings`` is an error naming them
    (never a silent reuse: every arm would start from the wrong model)."""
    if not (target / "config.json").exists():
        return False
    saved = json.loads((target / "sft_history.json").read_text()).get("settings")
    if saved is not None and saved != settings:
        changed = ", ".join(f"{k}: {saved.get(k)!r} -> {settings.get(k)!r}"
                            for k in sorted(set(saved) | set(settings)) if saved.get(k) != settings.get(k))
        raise ConfigError(f"{target} was built with other settings ({changed}); use a new output_dir, restore "
                          "the settings, or delete that directory (its data and runs were built from it too)")
    return True


def save_theta0(model, tokenizer, target: Path, history: dict, started: float, settings: dict) -> Path:
    """θ0 (save_pretrained + tokenizer + ``sft_history.json`` with its SFT seconds and the ``settings``
    it was built from) written beside ``target`` and renamed into place, so a directory with
    config.json is always complete."""
    from sparring.state import atomic_write_json

    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / "sft_history.json", {**history, "seconds": round(time.time() - started, 1),
                                                  "settings": settings})
    tmp.replace(target)
    return target


def fit_theta0(cfg, root: Path, fields: tuple[str, ...], fit) -> Path:
    """θ0 at ``root/theta0``: the one on disk when it was built from the same config ``fields``
    (``built_theta0``), else a fresh tiny model (``new_tiny_model``) fitted by ``fit(tokenizer, model)``,
    which returns the history to keep, and saved with it (``save_theta0``)."""
    target, settings = root / "theta0", theta0_settings(cfg, fields)
    if built_theta0(target, settings):
        return target
    tokenizer, model = new_tiny_model(cfg)
    started = time.time()
    return save_theta0(model, tokenizer, target, fit(tokenizer, model), started, settings)


def tiny_sft(cfg, model, tokenizer, encoded, evaluate, **stopping) -> list[dict]:
    """``tasks.sft.sft_steps`` on ``encoded`` (prompt ids, response ids) with the config's SFT settings
    (sft_max_steps, sft_lr, sft_batch_size, data_seed, sft_eval_every) and ``stopping`` (patience / stop_at)."""
    from sparring.tasks.sft import sft_steps

    return sft_steps(model, tokenizer, encoded, steps=cfg.sft_max_steps, lr=cfg.sft_lr, batch_size=cfg.sft_batch_size,
                     seed=cfg.data_seed, evaluate=evaluate, eval_every=cfg.sft_eval_every, **stopping)


def open_experiment(cfg, write_data, build_theta0) -> tuple[float, Path, dict[str, Path], Path]:
    """How every experiment's ``run`` starts: progress bars off, ``cfg.output_dir`` made, its data written
    (``write_data(cfg, root)``) and θ0 fitted (``build_theta0(cfg, paths, root)``), each reused when on disk.
    Returns (start time, root, data paths, θ0)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    started = time.time()
    root = Path(cfg.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    paths = write_data(cfg, root)
    return started, root, paths, build_theta0(cfg, paths, root)


def add_wall_time(root: Path, started: float) -> float:
    """Seconds spent on this experiment over every invocation (a resumed one adds to it): kept in
    ``root/wall_seconds.json``."""
    wall = root / "wall_seconds.json"
    total = (json.loads(wall.read_text()) if wall.exists() else 0.0) + time.time() - started
    wall.write_text(json.dumps(total))
    return total
