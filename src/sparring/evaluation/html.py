"""``report.html``: the page of one run, a single static file (inline SVG charts, inline CSS, no script).

Sections, each shown when the run directory has its data:

- the held-out table (the rows of ``results.md``);
- the fixed sample prompts answered by every model: prompt, real response, then θ0's, θ1's, …
  answers (or the policy's after each evaluated LSP step), from ``eval/<label>.answers.jsonl``;
- the real and generated log-prob curves of training (``logps/real`` vs ``logps/generated``: the
  likelihood displacement plot) beside the held-out real log-prob per token of each model;
- every training curve logged under TRL's names against the global step, with the iteration
  boundaries; for LSP the ``lsp/*`` curves against the step, and the sampled challenger queries
  with the solver's answers and their rewards (``samples.jsonl``).

Every text of the run is escaped (``html.escape``).
"""

from __future__ import annotations

import math
from html import escape

from sparring.config import RunConfig
from sparring.evaluation import report
from sparring.state import RunDir, atomic_write_text, read_jsonl

# Training curves under TRL's names, in this order, when the run logged them.
TRAIN_CURVES = ["loss", "rewards/margins", "rewards/accuracies", "rewards/real", "rewards/generated",
                "logps/real", "logps/generated", "grad_norm", "lr"]
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
TEXT_CHARS = 600  # each text in a table is cut to this many characters
LSP_STEPS_SHOWN = 10  # sampled LSP steps shown, the newest first
LSP_QUERIES_SHOWN = 8  # challenger queries shown per sampled step
WIDTH, HEIGHT = 400, 230  # one chart
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 58, 12, 28, 38

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222;
       background: #fff; max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
p.note { color: #666; font-size: 13px; margin-top: 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #f3f3f3; }
td.text { white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; max-width: 320px; }
td.ok { background: #e6f4e6; } td.bad { background: #fbeaea; }
span.score { color: #666; font-size: 11px; font-family: sans-serif; }
div.charts { display: flex; flex-wrap: wrap; gap: 8px; }
svg { background: #fff; border: 1px solid #e3e3e3; }
svg text { font-family: sans-serif; font-size: 11px; fill: #333; }
svg text.title { font-size: 13px; font-weight: bold; }
"""


def write_page(run_dir: RunDir, cfg: RunConfig, rows: list[dict], columns: list[tuple[str, str, str]],
               title: str = "") -> None:
    """Write ``run_dir.report_page`` from the report's table ``rows`` (and their ``columns``) and the run's files."""
    lsp = cfg.method == "lsp"
    models = [(row_label(run_dir, r, lsp), model_name(r, lsp)) for r in rows]
    curves, marks = lsp_points(run_dir) if lsp else train_points(run_dir, rows)
    sections = [
        table_section(rows, columns),
        answers_section(run_dir, models),
        lsp_samples_section(run_dir) if lsp else "",
        logps_section(curves, marks, rows, lsp),
        curves_section("Training curves", [k for k in TRAIN_CURVES if has(curves, k)], curves, marks,
                       "global step" if not lsp else "LSP step"),
    ]
    if lsp:
        keys = sorted({k for _, r in curves for k, v in r.items() if k.startswith("lsp/") and number(v) is not None})
        sections.append(curves_section("LSP curves", keys, curves, marks, "LSP step"))
    body = "\n".join(s for s in sections if s)
    heading = f"<h1>{escape(title or cfg.method)}</h1>\n<p class=note>{escape(str(run_dir.root))}</p>"
    atomic_write_text(run_dir.report_page, page(title or cfg.method, heading + "\n" + body))


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n<title>{escape(title)}</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


# -- models and points ------------------------------------------------------------------------------
def row_label(run_dir: RunDir, row: dict, lsp: bool) -> str:
    """The eval label of a table row's model (its eval/<label>.json)."""
    if lsp:
        return run_dir.lsp_step_label(row["step"])
    return run_dir.INITIAL if row["iteration"] is None else run_dir.stage_iteration(row["iteration"])


def model_name(row: dict, lsp: bool) -> str:
    if lsp:
        return f"step {row['step']}"
    return "θ0" if row["iteration"] is None else f"θ{row['iteration'] + 1}"


def train_points(run_dir: RunDir, rows: list[dict]) -> tuple[list[tuple[float, dict]], list[tuple[float, str]]]:
    """(global step, row) of every training row, and (step, name) of each iteration's start after the first.

    An iteration's steps follow those of the iterations before it: its recorded step count
    (state.json), else its last logged step."""
    train = [r for r in report._metrics(run_dir) if r.get("kind") == "train" and "step" in r]
    iterations = sorted({r.get("iteration") or 0 for r in train})
    points, marks, offset = [], [], 0
    for t in iterations:
        mine = [r for r in train if (r.get("iteration") or 0) == t]
        if t != iterations[0]:
            marks.append((offset + 0.5, f"iter {t}"))  # between the last step of t − 1 and the first of t
        points += [(offset + r["step"], r) for r in mine]
        done = (run_dir.stage_info(run_dir.stage_iteration(t)) or {}).get("steps")
        offset += done or max(r["step"] for r in mine)
    return points, marks


def lsp_points(run_dir: RunDir) -> tuple[list[tuple[float, dict]], list[tuple[float, str]]]:
    """(step, row) of every LSP step; no boundaries."""
    return [(r["step"], r) for r in report._metrics(run_dir) if r.get("kind") == "lsp" and "step" in r], []


def number(value) -> float | None:
    """``value`` as a finite float, else None (lists, text, NaN, ∞)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def has(points: list[tuple[float, dict]], key: str) -> bool:
    return any(number(r.get(key)) is not None for _, r in points)


def series(points: list[tuple[float, dict]], key: str) -> list[tuple[float, float]]:
    return [(x, number(r[key])) for x, r in points if number(r.get(key)) is not None]


# -- sections ---------------------------------------------------------------------------------------
def table_section(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    if not rows:
        return "<h2>Held-out evaluation</h2>\n<p class=note>No model has been evaluated yet (eval.source).</p>"
    headers, body = report.cells(rows, columns)
    return "<h2>Held-out evaluation</h2>\n" + html_table(headers, [[(escape(c), "") for c in line] for line in body])


def html_table(headers: list[str], body: list[list[tuple[str, str]]]) -> str:
    """A table of cells, each (html, css class): the cells come escaped, the headers are escaped here."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    lines = ["".join(f"<td class='{cls}'>{text}</td>" if cls else f"<td>{text}</td>" for text, cls in line)
             for line in body]
    return f"<table>\n<tr>{head}</tr>\n" + "\n".join(f"<tr>{line}</tr>" for line in lines) + "\n</table>"


def answers_section(run_dir: RunDir, models: list[tuple[str, str]]) -> str:
    """The fixed sample prompts with the real response and every model's answer, side by side."""
    answers = {name: {a["row"]: a for a in read_jsonl(run_dir.eval_answers(label))}
               for label, name in models if run_dir.eval_answers(label).exists()}
    if not answers:
        return ""
    prompts: dict[int, dict] = {}
    for by_row in answers.values():
        for row, a in by_row.items():
            prompts.setdefault(row, a)
    body = [[(text_cell(conversation(a["prompt"])), "text"), (text_cell(a["real"]), "text")]
            + [answer_cell(answers[name].get(row)) for name in answers] for row, a in sorted(prompts.items())]
    scored = any("score" in a for by_row in answers.values() for a in by_row.values())
    note = ("<p class=note>The first held-out prompts (eval.sample_prompts), answered greedily by every evaluated "
            f"model{'; green: the verifier scored the answer 1, red: below 1' if scored else ''}.</p>")
    return "<h2>Sample prompts, every model</h2>\n" + note + "\n" + html_table(["prompt", "real response", *answers], body)


def answer_cell(answer: dict | None) -> tuple[str, str]:
    if answer is None:
        return "–", ""
    if "score" not in answer:
        return text_cell(answer["answer"]), "text"
    score = answer["score"]
    return (f"{text_cell(answer['answer'])}\n<span class=score>score {score:.2f}</span>",
            "text ok" if score >= 1 else "text bad")


def conversation(prompt) -> str:
    """A prompt's text: a plain string, or a conversation's turns (the last user turn alone when it is the only one)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


def text_cell(text) -> str:
    text = str(text)
    return escape(text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…")


def logps_section(points: list[tuple[float, dict]], marks: list[tuple[float, str]], rows: list[dict],
                  lsp: bool) -> str:
    """logps/real vs logps/generated during training, and the held-out real log-prob per token of each model."""
    charts = []
    pairs = {k: series(points, k) for k in ("logps/real", "logps/generated") if has(points, k)}
    if pairs:
        charts.append(chart(pairs, "train log-probs", "global step", marks))
    xs = [r["step"] if lsp else (0 if r["iteration"] is None else r["iteration"] + 1) for r in rows]
    held = [(x, number(r.get("logps_real_per_token"))) for x, r in zip(xs, rows)
            if number(r.get("logps_real_per_token")) is not None]
    if held:
        ticks = None if lsp else [(x, f"θ{x}") for x in xs]
        charts.append(chart({"held-out logps_real_per_token": held}, "held-out real log-prob per token",
                            "LSP step" if lsp else "model", xticks=ticks))
    if not charts:
        return ""
    note = ("<p class=note>Real responses losing likelihood while the gap to generated ones grows is "
            "likelihood displacement: the margin rises by pushing both down.</p>\n") if pairs else ""
    return "<h2>Real and generated log-probs</h2>\n" + note + "<div class=charts>" + "\n".join(charts) + "</div>"


def curves_section(heading: str, keys: list[str], points: list[tuple[float, dict]], marks: list[tuple[float, str]],
                   xlabel: str) -> str:
    if not keys:
        return ""
    charts = [chart({key: series(points, key)}, key, xlabel, marks) for key in keys]
    note = "<p class=note>Dashed lines: the start of each iteration.</p>\n" if marks else ""
    return f"<h2>{escape(heading)}</h2>\n{note}<div class=charts>" + "\n".join(charts) + "</div>"


def lsp_samples_section(run_dir: RunDir) -> str:
    """The newest sampled LSP steps: each challenger query with the solver's answers and their rewards."""
    rows = read_jsonl(run_dir.samples) if run_dir.samples.exists() else []
    steps = sorted({r["step"] for r in rows}, reverse=True)[:LSP_STEPS_SHOWN]
    if not steps:
        return ""
    parts = ["<h2>LSP samples</h2>", f"<p class=note>The newest {len(steps)} sampled steps; each challenger "
             "query with the solver's answers and their rewards.</p>"]
    for k, step in enumerate(steps):
        mine = [r for r in rows if r["step"] == step]
        body = [[(text_cell(r["query"]), "text"), (answers_list(r), "text")] for r in mine[:LSP_QUERIES_SHOWN]]
        summary = f"step {step}: {len(mine)} queries"
        parts.append(f"<details{' open' if k == 0 else ''}><summary>{escape(summary)}</summary>\n"
                     + html_table(["challenger query", "solver answers (reward)"], body) + "\n</details>")
    return "\n".join(parts)


def answers_list(row: dict) -> str:
    return "\n".join(f"[{reward:.3f}] {text_cell(answer)}" for answer, reward in zip(row["answers"], row["rewards"]))


# -- SVG charts -------------------------------------------------------------------------------------
def chart(lines: dict[str, list[tuple[float, float]]], title: str, xlabel: str,
          marks: list[tuple[float, str]] = (), xticks: list[tuple[float, str]] | None = None) -> str:
    """An inline SVG line chart of named series of (x, y) points, with dashed vertical ``marks``."""
    points = [p for pts in lines.values() for p in pts]
    x0, x1 = span([x for x, _ in points] + [x for x, _ in marks])
    y0, y1 = span([y for _, y in points])

    def sx(x: float) -> float:
        return PAD_LEFT + (x - x0) / (x1 - x0) * (WIDTH - PAD_LEFT - PAD_RIGHT)

    def sy(y: float) -> float:
        return HEIGHT - PAD_BOTTOM - (y - y0) / (y1 - y0) * (HEIGHT - PAD_TOP - PAD_BOTTOM)

    out = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' viewBox='0 0 {WIDTH} {HEIGHT}' "
           f"role='img' aria-label='{escape(title)}'>",
           f"<text class='title' x='{PAD_LEFT}' y='16'>{escape(title)}</text>"]
    bottom, right = HEIGHT - PAD_BOTTOM, WIDTH - PAD_RIGHT
    ys = ticks(y0, y1)
    for y, label in zip(ys, labels(ys)):
        out.append(f"<line x1='{PAD_LEFT}' x2='{right}' y1='{sy(y):.1f}' y2='{sy(y):.1f}' stroke='#eee'/>"
                   f"<text x='{PAD_LEFT - 4}' y='{sy(y) + 4:.1f}' text-anchor='end'>{escape(label)}</text>")
    if xticks is None:
        xs = ticks(x0, x1, 6, integer=True)
        xticks = list(zip(xs, labels(xs)))
    for x, label in xticks:
        out.append(f"<line x1='{sx(x):.1f}' x2='{sx(x):.1f}' y1='{bottom}' y2='{bottom + 4}' stroke='#888'/>"
                   f"<text x='{sx(x):.1f}' y='{bottom + 15}' text-anchor='middle'>{escape(label)}</text>")
    out.append(f"<rect x='{PAD_LEFT}' y='{PAD_TOP}' width='{right - PAD_LEFT}' height='{bottom - PAD_TOP}' "
               "fill='none' stroke='#888'/>")
    out.append(f"<text x='{(PAD_LEFT + right) / 2:.1f}' y='{HEIGHT - 6}' text-anchor='middle'>{escape(xlabel)}</text>")
    for x, label in marks:
        out.append(f"<line x1='{sx(x):.1f}' x2='{sx(x):.1f}' y1='{PAD_TOP}' y2='{bottom}' stroke='#999' "
                   f"stroke-dasharray='4 3'/><text x='{sx(x) + 3:.1f}' y='{PAD_TOP + 11}'>{escape(label)}</text>")
    for k, pts in enumerate(lines.values()):
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='1.6'/>")
        if len(pts) <= 30:
            out += [f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='2.5' fill='{color}'/>" for x, y in pts]
    if len(lines) > 1:
        out += legend(list(lines), right)
    out.append("</svg>")
    return "\n".join(out)


def legend(names: list[str], right: float) -> list[str]:
    """One colour swatch and name per series, right-aligned in the title row."""
    out, x = [], right
    for k in reversed(range(len(names))):
        x -= 16 + 6.2 * len(names[k])  # about the width of 11px text
        out.append(f"<rect x='{x:.1f}' y='10' width='10' height='3' fill='{COLORS[k % len(COLORS)]}'/>"
                   f"<text x='{x + 14:.1f}' y='15'>{escape(names[k])}</text>")
        x -= 10
    return out


def span(values: list[float]) -> tuple[float, float]:
    """(low, high) of ``values``, widened when they are all equal."""
    low, high = min(values), max(values)
    if high - low < 1e-12 * max(1.0, abs(high)):
        pad = abs(high) * 0.05 or 0.5
        return low - pad, high + pad
    return low, high


def ticks(low: float, high: float, count: int = 5, *, integer: bool = False) -> list[float]:
    """Round values between ``low`` and ``high``, about ``count`` of them (whole numbers with ``integer``)."""
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    steps = [m * magnitude for m in (1, 2, 2.5, 5, 10)]
    fits = [m for m in steps if m >= raw and (not integer or m >= 1 and m == int(m))]
    step = fits[0] if fits else max(1, math.ceil(raw))  # whole numbers over a span shorter than count
    first = math.ceil(low / step) * step
    return [first + k * step for k in range(int((high - first) / step + 1e-9) + 1)]


def labels(values: list[float]) -> list[str]:
    """Tick labels with the fewest significant digits (3 at least) that tell every value apart."""
    for digits in range(3, 10):
        text = [f"{v:.{digits}g}" if abs(v) > 1e-12 * max(map(abs, values)) else "0" for v in values]
        if len(set(text)) == len(text):
            return text
    return text
