"""The built-in proving ground: verifiable text tasks, a character tokenizer and a tiny Llama.

Everything here is made locally, so the quickstart and the tests need no download.
"""

from sparring.tasks.problems import FAMILIES, check, make_problem, make_rows, solve
from sparring.tasks.tiny import build_tiny_model, build_tokenizer

__all__ = ["FAMILIES", "build_tiny_model", "build_tokenizer", "check", "make_problem", "make_rows", "solve"]
