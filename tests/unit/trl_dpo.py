"""A DPOTrainer without its __init__: only the attributes its loss path reads, standard DPO settings
(reverse KL, no label smoothing, no WPO weighting), single process. TRL's own code computes the loss."""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch


def _identity(x):
    return x


def bare_dpo_trainer(*, beta: float, loss_type: str, **fields):
    dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    trainer = object.__new__(dpo.DPOTrainer)
    attributes = {
        "accelerator": types.SimpleNamespace(  # single process: gathering is the identity
            device=torch.device("cpu"), gather=_identity, gather_for_metrics=_identity, unwrap_model=_identity
        ),
        "model": types.SimpleNamespace(training=True),
        "beta": beta,
        "loss_types": [loss_type],
        "loss_weights": [1.0],
        "ld_alpha": None,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 1.0,
        "label_smoothing": 0.0,
        "use_weighting": False,
        "aux_loss_enabled": False,
        "precompute_ref_logps": True,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
        **fields,
    }
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def last_metrics(trainer) -> dict[str, float]:
    return {name: values[-1] for name, values in trainer._metrics["train"].items()}
