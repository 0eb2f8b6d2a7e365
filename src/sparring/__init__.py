"""sparring: self-play fine-tuning of language models (SPIN, T-SPIN, TPAW, LSP)."""

__version__ = "0.1.0"
