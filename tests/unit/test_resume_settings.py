"""Settings allowed to change on resume really are safe: the log-prob chunk layout follows the batch size."""

from __future__ import annotations

from tests.unit.table_lm import TableModel

from sparring.state import ChunkStore, read_jsonl, write_jsonl
from sparring.training.precompute import score_sequences


def items(n: int = 20, shift: int = 0) -> list[tuple[list[int], list[int]]]:
    return [([1 + (i + shift) % 5] * (1 + i % 3), [2 + (i * 3 + shift) % 5] * (1 + i % 4)) for i in range(n)]


def score(folder, batch_size: int, pairs=None) -> list[float]:
    return score_sequences(TableModel(vocab=7), pairs or items(), pad_id=0, batch_size=batch_size, folder=folder)


def test_a_changed_logprob_batch_size_recomputes_the_chunks(tmp_path, capsys):
    fresh = score(tmp_path / "fresh", 8)
    folder = tmp_path / "resumed"
    score(folder, 4)
    for chunk in sorted(folder.glob("chunk-*.jsonl"))[2:]:  # killed after two batches of four
        chunk.unlink()
    capsys.readouterr()
    assert score(folder, 8) == fresh
    assert "batch_size" in capsys.readouterr().out  # one line says why the chunks were recomputed
    assert len(list(folder.glob("chunk-*.jsonl"))) == 3  # 20 items in batches of 8
    # a complete store of another layout is never reused either (batches of 2 would mix in batches of 4)
    score(folder, 4)
    assert score(folder, 2) == score(tmp_path / "fresh2", 2)


def test_the_same_layout_reuses_its_chunks_and_other_items_do_not(tmp_path, capsys):
    folder = tmp_path / "store"
    first = score(folder, 4)
    capsys.readouterr()
    chunk = folder / "chunk-000000.jsonl"
    rows = read_jsonl(chunk)
    write_jsonl(chunk, [{**r, "logp": r["logp"] + 100.0} for r in rows])  # marks the chunk as reused
    again = score(folder, 4)
    assert sum(a != b for a, b in zip(again, first)) == len(rows) and capsys.readouterr().out == ""
    other = items(shift=1)
    assert score(folder, 4, other) == score(tmp_path / "other", 4, other)


def test_chunk_store_layout_manifest(tmp_path, capsys):
    store = ChunkStore(tmp_path / "s")
    assert store.claim({"batch_size": 4, "count": 8}) is False  # nothing to discard in a new store
    store.write(0, [{"index": 0}])
    assert store.claim({"batch_size": 4, "count": 8}) is False and store.has(0)
    assert store.claim({"batch_size": 8, "count": 8}) is True and not store.has(0)
    assert "batch_size" in capsys.readouterr().out
    legacy = ChunkStore(tmp_path / "legacy")  # chunks from before manifests: their layout is unknown
    legacy.write(0, [{"index": 0}])
    assert legacy.claim({"batch_size": 4}) is True and not legacy.has(0)


def test_a_path_setting_naming_the_same_place_by_another_path_is_unchanged(tmp_path, monkeypatch):
    from sparring.state import changed_settings

    real = tmp_path / "exp" / "data.jsonl"
    real.parent.mkdir()
    real.write_text("{}\n")
    (tmp_path / "link").symlink_to(tmp_path / "exp")  # the experiment folder reached through a link
    monkeypatch.chdir(tmp_path)
    old = {"data.source": str(real), "model.name_or_path": "exp", "train.lr": 1e-4}
    same = {"data.source": "link/data.jsonl", "model.name_or_path": str(tmp_path / "exp"), "train.lr": 1e-4}
    assert changed_settings(old, same) == []
    other = tmp_path / "other.jsonl"
    other.write_text("{}\n")
    moved = {**same, "data.source": str(other), "train.lr": 2e-4}
    assert changed_settings(old, moved) == ["data.source", "train.lr"]
    hub = {**same, "model.name_or_path": "org/model"}  # not a local path: compared as text
    assert changed_settings(old, hub) == ["model.name_or_path"]
