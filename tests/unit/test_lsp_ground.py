"""The LSP edge-of-competence experiment's pure pieces: config checks, data splits, per-arm run settings,
rate choice, the θ0 stopping score, V(q) histograms, the expected signal and the report section."""

from __future__ import annotations

import json

import pytest
from tests.conftest import REPO

from sparring.config import ConfigError
from sparring.experiments import lsp_ground as g
from sparring.experiments.plateau import Job
from sparring.tasks.problems import difficulty_of

CONFIG = REPO / "configs" / "experiments" / "lsp.yaml"


def small(tmp_path, *extra):
    return g.load(CONFIG, [f"output_dir={tmp_path}", "train_per_difficulty=20", "validation_per_difficulty=5",
                           "test_per_difficulty=6", f"preset={REPO / 'configs/lsp/tiny.yaml'}", *extra])


def test_the_default_config_loads_and_bad_ones_are_refused(tmp_path):
    cfg = g.load(CONFIG)
    assert cfg.experiment == "lsp" and cfg.answers_per_query == 16 and len(cfg.seeds) >= 3
    assert g.eval_steps(cfg)[-1] == cfg.steps
    for override, message in [("arms=[grpo_gen, ppo]", "unknown arm 'ppo'"), ("challenger_prompt=Ask.", "{difficulty}"),
                              ("steps=50", "multiple of eval_every"), ("lr_grid=[]", "non-empty")]:
        with pytest.raises(ConfigError, match=message):
            g.load(CONFIG, [override])


def test_data_splits_are_disjoint_and_of_the_asked_difficulties(tmp_path):
    cfg = small(tmp_path)
    paths = g.write_data(cfg, tmp_path)
    queries = {}
    for name, path in paths.items():
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        queries[name] = {r["messages"][0]["content"] for r in rows}
        sizes = {"train": 20, "validation": 5, "test": 6}[name]
        assert len(rows) == sizes * len(cfg.difficulties)
        assert {difficulty_of(q) for q in queries[name]} == set(cfg.difficulties)
    assert not (queries["train"] & queries["test"]) and not (queries["validation"] & queries["test"])
    assert not (queries["train"] & queries["validation"])


@pytest.mark.parametrize("arm", ["grpo_gen", "lsp_zero", "lsp", "grpo_data"])
def test_every_rl_arm_is_a_valid_lsp_run_with_its_own_settings(tmp_path, arm):
    cfg = small(tmp_path)
    paths = g.write_data(cfg, tmp_path)
    run = g.lsp_run_config(cfg, Job(arm, 3e-4, 2), tmp_path / "run", paths, tmp_path / "theta0")
    lsp = run.lsp
    assert (lsp.num_queries, lsp.answers_per_query, lsp.steps) == (cfg.num_queries, cfg.answers_per_query, cfg.steps)
    assert run.train.lr == 3e-4 and run.train.seed == run.generation.seed == 2 and lsp.keep_models
    assert run.eval.source == str(paths["validation"])  # learning rates are picked on validation
    assert lsp.challenger_coef == (0.0 if arm in ("grpo_gen", "grpo_data") else 1.0)
    assert lsp.variant == ("self_reward" if arm == "lsp" else "zero")
    if arm == "grpo_data":
        assert lsp.query_source == "data" and lsp.prompts == str(paths["train"]) and lsp.difficulties == []
    else:
        assert lsp.query_source == "challenger" and lsp.difficulties == [str(d) for d in cfg.difficulties]
        assert lsp.challenger_prompt == cfg.challenger_prompt


def test_the_challenger_prompt_is_filled_alike_in_sft_and_in_the_runs(tmp_path):
    from sparring.algorithms.lsp.prompts import challenger_prompt

    cfg = small(tmp_path)
    run = g.lsp_run_config(cfg, Job("lsp_zero", 1e-4, 0), tmp_path / "run", g.write_data(cfg, tmp_path), tmp_path)
    assert g.fill(cfg, 4) == challenger_prompt(run.lsp, "4") and "{difficulty}" not in g.fill(cfg, 4)


def test_rate_choice_prefers_the_best_then_the_smaller_rate():
    assert g.choose_rate({1e-4: 0.2, 3e-4: 0.3}) == 3e-4
    assert g.choose_rate({1e-4: 0.3, 3e-4: 0.3}) == 1e-4
    assert g.choose_rate({1e-4: None, 3e-4: 0.0}) == 3e-4


def test_edge_score_needs_a_valid_challenger():
    assert g.edge_score(0.45, 0.95, 0.9) == 0.45
    assert g.edge_score(0.45, 0.85, 0.9) == 0.0


def test_value_histogram_separates_the_no_signal_ends():
    h = g.value_histogram([0.0, 0.0, 0.1, 0.5, 0.9, 1.0, 1.0, 1.0])
    assert h == [2 / 8, 1 / 8, 1 / 8, 1 / 8, 3 / 8]
    assert g.value_histogram([]) == [0.0] * 5


def test_expected_signal_is_one_minus_p_g_minus_q_g():
    assert g.expected_signal([0, 4], k=4, g=16) == 0.0  # always wrong or always right: no signal
    assert g.expected_signal([2], k=4, g=2) == pytest.approx(1 - 0.25 - 0.25)


def test_replace_section_keeps_the_rest_and_appends_when_absent():
    text = "# R\n\n<!-- lsp:start -->\nold\n<!-- lsp:end -->\nafter\n"
    new = g.replace_section(text, "<!-- lsp:start -->\nnew\n<!-- lsp:end -->")
    assert new == "# R\n\n<!-- lsp:start -->\nnew\n<!-- lsp:end -->\nafter\n"
    assert g.replace_section("# R\n", "S") == "# R\n\nS\n"


def test_the_quickstart_is_the_full_experiment_cut_to_one_seed_one_rate_and_fewer_steps():
    full = g.load(REPO / "configs" / "experiments" / "lsp.yaml")
    quick = g.load(REPO / "configs" / "experiments" / "lsp-quick.yaml")
    assert quick.arms == ["lsp_zero", "grpo_data", "sft"] and quick.seeds == [0] and len(quick.lr_grid) == 1
    assert quick.lr_grid[0] in full.lr_grid and quick.steps < full.steps
    assert not quick.report.startswith("docs/")  # the demo never rewrites docs/RESULTS.md
    cut = {"arms", "seeds", "lr_grid", "steps", "output_dir", "report", "plot", "judge_probe", "judge_rows_per_difficulty"}
    assert quick.judge_rows_per_difficulty == 0  # no lsp arm: θ0 is not taught to grade (faster SFT)
    assert {k: v for k, v in vars(quick).items() if k not in cut} == {k: v for k, v in vars(full).items() if k not in cut}


def test_rubric_scores_the_seven_criteria_of_the_self_reward_prompt():
    cfg = g.load(CONFIG)  # reverse, difficulties 3–5
    q = "Reverse the word abcd."
    assert g.rubric(cfg, q, "dcba") == 7
    assert g.rubric(cfg, q, "dcbb") == 5  # its letters and length, not its multiset, not right
    assert g.rubric(cfg, q, "abcd") == 6  # a rearrangement, not the answer
    assert g.rubric(cfg, q, "dcbz") == 4  # a letter the answer does not have: criteria 4, 6, 7 fail
    assert g.rubric(cfg, q, "") == 2  # empty: only the instruction's two points
    assert g.rubric(cfg, "Reverse the word ab.", "ba") == 6  # difficulty 2 was not asked for
    assert g.rubric(cfg, "Reverse the wo", "dcba") == 1  # not a task: only a one-line answer counts


def test_judge_rows_teach_the_prompt_format_with_rubric_scores():
    from sparring.rewards.self_judge import parse_quality_score

    class Example:
        def __init__(self, q):
            self.prompt = [{"role": "user", "content": q}]

    cfg = g.load(CONFIG, ["judge_rows_per_difficulty=5"])
    train = type("T", (), {"examples": [Example(f"Reverse the word {w}.") for w in
                                        ["abc", "abd", "abcd", "abce", "abcde", "bcdef"] * 4]})()
    rows = g.judge_rows(cfg, train)
    assert len(rows) == 15  # 5 per difficulty 3, 4, 5
    for prompt, reply in rows:
        assert prompt.startswith("Grade 0-7. Q: ") and " A: " in prompt
        score = parse_quality_score(reply)
        assert score.source == "score" and 0 <= score.score <= 7
    assert g.judge_rows(cfg, train) == rows  # seeded
    assert g.judge_rows(g.load(CONFIG, ["judge_rows_per_difficulty=0"]), train) == []


def test_a_theta0_built_from_other_settings_is_refused_not_reused(tmp_path):
    from sparring.experiments.common import built_theta0, theta0_settings

    cfg = g.load(CONFIG)
    settings = theta0_settings(cfg, g.THETA0_FIELDS)
    target = tmp_path / "theta0"
    assert not built_theta0(target, settings)  # nothing there yet
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "sft_history.json").write_text(json.dumps({"settings": settings}))
    assert built_theta0(target, settings)
    changed = theta0_settings(g.load(CONFIG, ["judge_rows_per_difficulty=0"]), g.THETA0_FIELDS)
    with pytest.raises(ConfigError, match=r"judge_rows_per_difficulty: 1000 -> 0"):
        built_theta0(target, changed)
    assert theta0_settings(g.load(CONFIG, ["seeds=[5]", "steps=20"]), g.THETA0_FIELDS) == settings  # arms' settings
