"""Read raw rows from a local file, a ``save_to_disk`` folder or a Hub dataset id."""

from __future__ import annotations

import json
from pathlib import Path

from sparring.data.records import DataError


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Rows as plain dicts, in file order (row numbers in errors refer to this order, from 0).

    - ``*.jsonl`` / ``*.json`` (JSON lines, or one JSON array) and ``*.parquet`` files;
    - a folder written by ``datasets``' ``save_to_disk`` (a DatasetDict folder takes ``split``);
    - anything else is taken as a Hugging Face Hub dataset id, loaded with ``split``.
    """
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _read_json(path)
        if suffix == ".parquet":
            import datasets

            return list(datasets.load_dataset("parquet", data_files=str(path), split="train"))
        raise DataError(f"{source}: unsupported file type {suffix!r}; use .jsonl, .json or .parquet")
    if path.is_dir():
        import datasets

        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(f"{source}: folder is not a datasets save_to_disk folder") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise DataError(f"{source}: no split {split!r}; splits: {', '.join(loaded)}")
            loaded = loaded[split]
        return list(loaded)
    if source.startswith((".", "/")) or source.endswith((".jsonl", ".json", ".parquet")):
        raise DataError(f"data source {source} does not exist")
    import datasets

    try:
        return list(datasets.load_dataset(source, split=split))
    except Exception as err:  # the Hub client raises many types; say which source failed
        raise DataError(f"could not load dataset {source!r} (split {split!r}) from the Hub: {err}") from err


def _read_json(path: Path) -> list[dict]:
    text = path.read_text()
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        rows = json.loads(text)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON array of objects")
        return rows
    rows = []
    for number, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {number + 1} is not valid JSON: {err}") from None
    return rows
