"""Pure loss functions of summed log-prob tensors (torch only): one module per method."""

from sparring.losses.common import LossOutput, add_real_nll, pair_loss
from sparring.losses.lsp import KL_ESTIMATORS, LSPAdvantages, kl_k3, lsp_advantages, lsp_loss, reinforce_loss
from sparring.losses.spin import spin_loss
from sparring.losses.tpaw import tpaw_loss
from sparring.losses.tspin import tspin_loss

__all__ = [
    "KL_ESTIMATORS",
    "LSPAdvantages",
    "LossOutput",
    "add_real_nll",
    "kl_k3",
    "lsp_advantages",
    "lsp_loss",
    "pair_loss",
    "reinforce_loss",
    "spin_loss",
    "tpaw_loss",
    "tspin_loss",
]
