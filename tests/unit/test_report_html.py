"""report.html of hand-made run directories: one self-contained page with the table, the sample prompts
answered by every model side by side, the training curves with iteration boundaries, LSP's samples;
every text of the run escaped."""

from __future__ import annotations

import re

from tests.unit.test_report import lsp_run, spin_run

from sparring.evaluation.html import chart, labels, ticks
from sparring.evaluation.report import write_report
from sparring.state import write_jsonl

HOSTILE = "<script>alert('x')</script> & \"quotes\""


def with_answers(rd, labels_and_answers: dict[str, list[str]], *, scored: bool = True) -> None:
    for label, answers in labels_and_answers.items():
        write_jsonl(rd.eval_answers(label), [
            {"row": k, "prompt": [{"role": "user", "content": f"{HOSTILE} q{k}"}], "real": f"real{k}", "answer": a,
             **({"score": float(a == f"real{k}")} if scored else {})}
            for k, a in enumerate(answers)
        ])


def train_rows(iterations: int = 2, steps: int = 3) -> list[dict]:
    return [{"kind": "train", "iteration": t, "step": k, "epoch": k / steps, "loss": 0.69 - 0.01 * k,
             "rewards/margins": 0.1 * k, "rewards/accuracies": 0.5, "logps/real": -10.0 - k, "logps/generated": -12.0 - 2 * k,
             "grad_norm": 1.0, "lr": 1e-4, "lsp/not_spin": 1.0}
            for t in range(iterations) for k in range(1, steps + 1)]


def external_references(page: str) -> list[str]:
    """Every src= / href= / url( / @import of the page (a self-contained page has none)."""
    return re.findall(r"(?:src|href)\s*=|url\(|@import", page)


def test_spin_page_holds_table_answers_side_by_side_and_curves(tmp_path):
    rd, cfg = spin_run(tmp_path)
    write_jsonl(rd.metrics_path, train_rows())
    rd.mark_done(rd.stage_iteration(0), {"steps": 3})
    with_answers(rd, {rd.INITIAL: ["no", "real1"], rd.stage_iteration(0): ["real0", "real1"]})
    write_report(rd, cfg)
    page = rd.report_page.read_text()
    assert page.startswith("<!DOCTYPE html>") and external_references(page) == [] and "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quotes&quot; q0" in page
    # The held-out table: the rows of results.md.
    assert "<td>θ1 (after iteration 0)</td><td>0.750</td><td>-1.0000</td>" in page
    # One row per sample prompt: prompt, real response, θ0's then θ1's answer, coloured by the verifier's score.
    answers = page[page.index("Sample prompts"):page.index("Real and generated")]
    assert "<th>prompt</th><th>real response</th><th>θ0</th><th>θ1</th>" in answers
    assert answers.count("<tr>") == 3 and "real0\n<span class=score>score 1.00</span>" in answers
    assert "<td class='text bad'>no\n" in answers and "<td class='text ok'>real0\n" in answers
    # Every TRL curve the run logged, one chart each; the displacement chart with both log-probs.
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/real", "logps/generated", "grad_norm", "lr"):
        assert f"aria-label='{key}'" in page, key
    assert "aria-label='rewards/real'" not in page and "lsp/not_spin" not in page  # not logged / not SPIN's
    assert "aria-label='train log-probs'" in page and ">logps/generated</text>" in page  # with a legend
    assert "aria-label='held-out real log-prob per token'" in page and ">θ1</text>" in page
    # Iteration 1 starts after iteration 0's 3 recorded steps: one boundary per chart of the global step.
    assert page.count(">iter 1</text>") == 8 and ">iter 0</text>" not in page


def test_answers_without_a_verifier_and_a_run_without_answers(tmp_path):
    rd, cfg = spin_run(tmp_path)
    write_report(rd, cfg)
    assert "Sample prompts" not in rd.report_page.read_text()  # a run from before eval.sample_prompts
    with_answers(rd, {rd.INITIAL: ["a0"]}, scored=False)
    write_report(rd, cfg)
    page = rd.report_page.read_text()
    assert "<td class='text'>a0</td>" in page and "score" not in page[page.index("Sample prompts"):]
    assert "<th>θ0</th>" in page and "<th>θ1</th>" not in page


def test_lsp_page_shows_samples_per_step_and_lsp_curves(tmp_path):
    rd, cfg = lsp_run(tmp_path)
    write_jsonl(rd.metrics_path, [{"kind": "lsp", "step": k, "lsp/reward": 0.1 * k, "lsp/query_values": [1.0],
                                   "loss": 0.5, "grad_norm": 1.0} for k in (1, 2)])
    write_jsonl(rd.samples, [{"step": s, "query": f"{HOSTILE} q{s}-{i}", "answers": ["a", "b"], "rewards": [1.0, 0.25]}
                             for s in (1, 2) for i in range(2)])
    with_answers(rd, {rd.lsp_step_label(0): ["x"], rd.lsp_step_label(2): ["real0"]})
    write_report(rd, cfg)
    page = rd.report_page.read_text()
    assert "<th>step 0</th><th>step 2</th>" in page
    samples = page[page.index("LSP samples"):]
    assert "<details open><summary>step 2: 2 queries</summary>" in samples and "<details><summary>step 1" in samples
    assert samples.index("step 2") < samples.index("step 1")  # newest first
    assert "&lt;script&gt;" in samples and "[1.000] a\n[0.250] b" in samples
    assert "aria-label='lsp/reward'" in page and "lsp/query_values" not in page  # lists are not curves
    assert "aria-label='loss'" in page and "aria-label='grad_norm'" in page
    assert "train log-probs" not in page and "iter 1" not in page


def test_chart_axes():
    assert ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]
    assert ticks(1, 12, 6, integer=True) == [2, 4, 6, 8, 10, 12]
    assert ticks(0.95, 1.05, 6, integer=True) == [1]  # a one-step run: one whole-number tick
    assert labels([-2.184, -2.182, -2.18]) == ["-2.184", "-2.182", "-2.18"]  # 3 digits would repeat -2.18
    svg = chart({"a": [(1, 5.0)], "b": [(2, 5.0)]}, "one value", "step", [(1.5, "iter 1")])  # a flat line
    assert svg.count("<circle") == 2 and "iter 1" in svg and ">a</text>" in svg and ">b</text>" in svg
