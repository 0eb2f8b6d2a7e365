"""Data: sources (files, save_to_disk folders, Hub ids), row formats, chat rendering, batching."""

from sparring.data.chat import encode, render_prompt, render_response
from sparring.data.records import DataError, Example, load_examples, parse_row
from sparring.data.sources import load_rows

__all__ = [
    "DataError",
    "Example",
    "encode",
    "load_examples",
    "load_rows",
    "parse_row",
    "render_prompt",
    "render_response",
]
