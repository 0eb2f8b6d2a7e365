"""Data: sources (files, save_to_disk folders, Hub ids), row formats, chat rendering, batching."""

from sparring.data.chat import NotAPrefixError, encode, render_prompt, stop_token_ids, tokenize
from sparring.data.records import DataError, Example, load_examples, parse_row
from sparring.data.sources import load_rows

__all__ = [
    "DataError",
    "NotAPrefixError",
    "Example",
    "encode",
    "load_examples",
    "load_rows",
    "parse_row",
    "render_prompt",
    "stop_token_ids",
    "tokenize",
]
