"""The report page of a finished tiny SPIN run: the sample answers every evaluation writes (greedy, the
same prompts for every model, cached with the scores), report.html, and a screenshot of it taken by a
real headless browser (skipped where none is installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from tests.conftest import REPO, tiny_overrides

from sparring.cli import main

pytestmark = pytest.mark.slow
CONFIG = str(REPO / "configs" / "spin" / "tiny.yaml")
SMALL = ["data.num_prompts=16", "generation.batch_size=8", "train.logprob_batch_size=8", "eval.num_examples=8",
         "eval.sample_prompts=3", "eval.batch_size=2"]
LABELS = ["initial", "iter0", "iter1"]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
SIZE = (1280, 2400)


@pytest.fixture(scope="module")
def finished_run(tiny_ground, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-page") / "run"
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, out), *SMALL]) == 0
    return out


def answers(run: Path, label: str) -> list[dict]:
    return [json.loads(line) for line in (run / "eval" / f"{label}.answers.jsonl").read_text().splitlines()]


def test_every_model_answers_the_same_first_prompts_greedily(finished_run: Path, tiny_ground):
    from sparring.config import ModelConfig
    from sparring.data import encode
    from sparring.generation import HFGenerator, SamplingParams
    from sparring.modeling import load_model, load_tokenizer

    held_out = [json.loads(line) for line in Path(tiny_ground["eval"]).read_text().splitlines()][:3]
    for label in LABELS:
        rows = answers(finished_run, label)
        assert [r["row"] for r in rows] == [0, 1, 2], label
        assert [r["prompt"] for r in rows] == [h["messages"][:-1] for h in held_out]
        assert [r["real"] for r in rows] == [h["messages"][-1]["content"] for h in held_out]
        assert all(set(r) == {"row", "prompt", "real", "answer", "score"} and r["score"] in (0.0, 1.0) for r in rows)
    # θ1's answers are its greedy completions (eval.max_new_tokens), as generated one prompt at a time.
    tok = load_tokenizer(ModelConfig(name_or_path=tiny_ground["model"]))
    theta1 = load_model(ModelConfig(), finished_run / "iter_000" / "model")
    prompt_ids = [encode(tok, r["prompt"])[0] for r in answers(finished_run, "iter0")]
    direct = [HFGenerator(theta1, tok).generate([p], SamplingParams.greedy(16), seed=0)[0].text for p in prompt_ids]
    assert [r["answer"] for r in answers(finished_run, "iter0")] == direct


def screenshot(page: Path, png: Path, size: tuple[int, int] = SIZE) -> None:
    """``page`` rendered by the installed headless browser into ``png``; the test skips without one."""
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip("no chromium / chrome installed (CI installs Debian's chromium)")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--user-data-dir={png.parent / 'profile'}", f"--screenshot={png}",
                    f"--window-size={size[0]},{size[1]}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)


def test_a_headless_browser_renders_the_page(finished_run: Path, tmp_path):
    from PIL import Image

    png = tmp_path / "report.png"
    screenshot(finished_run / "report.html", png)
    with Image.open(png) as image:
        assert image.size == SIZE
        rgb = image.convert("RGB")
        colours = rgb.getcolors(maxcolors=SIZE[0] * SIZE[1])
    assert len(colours) > 100  # text, tables and charts in several colours, not a blank page
    white = max(count for count, colour in colours if colour == (255, 255, 255))
    assert white < 0.97 * SIZE[0] * SIZE[1]
    assert any(r > 150 and g < 90 and b < 90 for _, (r, g, b) in colours)  # the red logps/generated line


def test_the_page_shows_every_model_and_a_rerun_does_not_evaluate_again(finished_run: Path, tiny_ground):
    """The module's last test: it deletes an answers file."""
    page = (finished_run / "report.html").read_text()
    assert "<th>prompt</th><th>real response</th><th>θ0</th><th>θ1</th><th>θ2</th>" in page
    assert "aria-label='logps/generated'" in page and ">iter 1</text>" in page
    (finished_run / "eval" / "iter1.answers.jsonl").unlink()
    assert main(["run", CONFIG, *tiny_overrides(tiny_ground, finished_run), *SMALL]) == 0
    assert not (finished_run / "eval" / "iter1.answers.jsonl").exists()  # eval/iter1.json is the cache
    assert main(["report", str(finished_run)]) == 0
    page = (finished_run / "report.html").read_text()
    assert "<td>θ2 (after iteration 1)</td>" in page and "<th>θ2</th>" not in page  # scores kept, answers gone
