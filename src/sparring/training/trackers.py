"""Experiment trackers through accelerate (the ``logging:`` section): TensorBoard, wandb, mlflow, trackio, …

``make_accelerator`` gives the Accelerator ``log_with`` (``log_with``) and the run directory as its
project; ``Trackers`` starts them once, at the first logged training step of a session (``start``:
TensorBoard purges the events an interrupted run wrote past its checkpoint), logs each training or
LSP row at its global step, and ends them (``accelerator.end_training``) when the run finishes. Only
the main process logs (accelerate's ``init_trackers`` and ``log`` run there only).

TensorBoard writes into RUN/tb itself: ``RunTensorBoard`` is accelerate's tracker without the
project subfolder it would add. Every other tracker is accelerate's own, under its own name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparring.config import ConfigError, LoggingConfig, RunConfig, flat_reads

TENSORBOARD = "sparring_tensorboard"  # the name RunTensorBoard is registered under
# The init_trackers keyword that names the run, per tracker (TensorBoard's run is the RUN/tb folder).
RUN_NAME_KWARG = {"wandb": "name", "mlflow": "run_name", "trackio": "name"}


def run_tensorboard_class():
    """accelerate's TensorBoardTracker, writing into the logging dir (RUN/tb) instead of a subfolder
    named after the project; registered under ``TENSORBOARD`` (once)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, TensorBoardTracker, register_tracker_class

    if TENSORBOARD not in LOGGER_TYPE_TO_CLASS:

        class RunTensorBoard(TensorBoardTracker):
            name = TENSORBOARD

            def __init__(self, run_name: str, logging_dir, **kwargs):
                super().__init__("", logging_dir, **kwargs)

        register_tracker_class(RunTensorBoard)
    return LOGGER_TYPE_TO_CLASS[TENSORBOARD]


def log_with(logging: LoggingConfig) -> list[str]:
    """accelerate's ``log_with`` for ``logging.report_to``; a tracker that is not installed is an error
    (accelerate would leave it out silently)."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = {str(t) for t in get_available_trackers()}
    missing = [name for name in logging.report_to if name not in installed]
    if missing:
        raise ConfigError(f"logging.report_to: {missing[0]} is not installed: pip install 'sparring[trackers]' "
                          f"(wandb, mlflow, trackio) or the tracker's own package; installed: "
                          f"{', '.join(sorted(installed - {str(LoggerType.ALL)})) or 'none'}")
    if "tensorboard" in logging.report_to:
        run_tensorboard_class()
    return [TENSORBOARD if name == "tensorboard" else name for name in dict.fromkeys(logging.report_to)]


def tracker_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with every value a tracker takes as a hyperparameter (lists and mappings as JSON)."""
    plain = (bool, int, float, str, type(None))
    return {k: v if isinstance(v, plain) else json.dumps(v, sort_keys=True) for k, v in config.items()}


def scalars(row: dict, prefix: str) -> dict[str, float]:
    """The numbers of a metrics row, as ``prefix/key`` (the step and iteration are the x-axis, not values)."""
    return {f"{prefix}/{k}": v for k, v in row.items()
            if isinstance(v, (int, float)) and k not in ("step", "global_step", "iteration")}


@dataclass
class Trackers:
    """The run's trackers on ``accelerator`` (its ``log_with``): started once, ended at the run's end."""

    accelerator: Any
    project: str = "sparring"
    run_name: str | None = None
    config: dict[str, Any] | None = None  # recorded as the run's hyperparameters (flat, dotted keys)
    started: bool = False

    def start(self, purge_step: int | None = None) -> None:
        """``init_trackers`` (main process), at the first call only: later phases of the same session
        have no stale steps to purge."""
        if self.started or not self.accelerator.log_with:
            return
        self.accelerator.init_trackers(self.project, config=tracker_config(self.config) if self.config else None,
                                       init_kwargs=self.init_kwargs(purge_step))
        self.started = True

    def init_kwargs(self, purge_step: int | None) -> dict[str, dict]:
        kwargs: dict[str, dict] = {TENSORBOARD: {"purge_step": purge_step}}
        if self.run_name:
            kwargs.update({name: {key: self.run_name} for name, key in RUN_NAME_KWARG.items()})
        return kwargs

    def log(self, values: dict[str, float], step: int) -> None:
        if self.started and values:
            self.accelerator.log(values, step=step)

    def flush(self) -> None:
        """Write what TensorBoard holds (after every training phase: a kill later loses nothing logged)."""
        for tracker in self.accelerator.trackers if self.started else []:
            if tracker.name == TENSORBOARD:
                tracker.tracker.flush()

    def end(self) -> None:
        """``accelerator.end_training``: every tracker finished (every process calls this, at the run's end)."""
        self.accelerator.end_training()
        self.started = False


def run_trackers(accelerator, cfg: RunConfig) -> Trackers:
    """The trackers of run ``cfg``: its logging: section, its output_dir's name as the default run
    name, and the fields the run reads as the recorded config."""
    logging = cfg.logging
    return Trackers(accelerator, project=logging.project, run_name=logging.run_name or Path(cfg.output_dir).name,
                    config=flat_reads(cfg))
