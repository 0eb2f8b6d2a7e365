"""Progress bars: tqdm, silent off the main process, and otherwise left to tqdm's own TQDM_* settings."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress(iterable=None, *, enabled: bool = True, **kwargs) -> tqdm:
    # Passing disable=False would override TQDM_DISABLE, so it is passed only to silence a bar.
    if not enabled:
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)
