"""eval.lm_eval without running lm-evaluation-harness: the flattening of its results, the config checks,
the refusal with sharded weights, and the report's columns."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparring.config import ConfigError, load_config
from sparring.evaluation import lm_eval
from sparring.evaluation.report import SPIN_COLUMNS, columns, table

# The layout of simple_evaluate's results (lm_eval 0.4): a group (mmlu) that aggregates its subtasks,
# one with a filter of its own (gsm8k), bookkeeping beside the metrics.
RESULTS = {
    "results": {
        "gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.01,
                  "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": 0.02, "sample_len": 8},
        "arc_challenge": {"alias": "arc_challenge", "acc,none": 0.4, "acc_stderr,none": "N/A",
                          "acc_norm,none": 0.45, "acc_norm_stderr,none": 0.03},
        "mmlu": {"alias": "mmlu", "acc,none": 0.3, "acc_stderr,none": 0.01},
        "mmlu_humanities": {"alias": " - humanities", "acc,none": 0.31},
        "mmlu_anatomy": {"alias": "  - anatomy", "acc,none": 0.2},
    },
    "groups": {"mmlu": {"acc,none": 0.3}, "mmlu_humanities": {"acc,none": 0.31}},
    "group_subtasks": {"mmlu": ["mmlu_humanities"], "mmlu_humanities": ["mmlu_anatomy"]},
    "configs": {}, "versions": {}, "n-shot": {"gsm8k": 5},
}


def test_flat_scores_keep_named_tasks_numeric_metrics_and_filter_names():
    assert lm_eval.flat_scores(RESULTS) == {
        "lm_eval/gsm8k/exact_match_strict-match": 0.25,
        "lm_eval/gsm8k/exact_match_flexible-extract": 0.5,
        "lm_eval/arc_challenge/acc": 0.4,
        "lm_eval/arc_challenge/acc_norm": 0.45,
        "lm_eval/mmlu/acc": 0.3,  # its subtasks (aggregated into it) are left out
    }


def test_a_group_without_aggregation_keeps_its_subtasks():
    results = {"results": {"tag": {"alias": "tag"}, "a": {"acc,none": 1.0}}, "group_subtasks": {"tag": ["a"]}}
    assert lm_eval.flat_scores(results) == {"lm_eval/a/acc": 1.0}


@pytest.mark.parametrize("override, message", [
    ("eval.lm_eval.limit=-1", r"eval.lm_eval.limit must be > 0"),
    ("eval.lm_eval.limit=0", r"eval.lm_eval.limit must be > 0"),
    ("eval.lm_eval.num_fewshot=-1", r"eval.lm_eval.num_fewshot must be >= 0"),
    ("eval.lm_eval.batch_size=0", r"eval.lm_eval.batch_size must be >= 1"),
    ("eval.lm_eval.include_path=/nonexistent/tasks", r"include_path: /nonexistent/tasks is not a folder"),
    ("eval.lm_eval.tasks=arc", r"'eval.lm_eval.tasks': expected a list"),
    ("eval.sample_prompts=-1", r"eval.sample_prompts must be >= 0"),
])
def test_bad_values_are_config_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_limit_takes_a_count_or_a_fraction(tmp_path):
    cfg = load_config(None, ["eval.lm_eval.tasks=[arc_easy]", "eval.lm_eval.limit=0.5",
                             f"eval.lm_eval.include_path={tmp_path}"])
    assert cfg.eval.lm_eval.limit == 0.5 and cfg.eval.lm_eval.tasks == ["arc_easy"]
    assert load_config(None, ["eval.lm_eval.limit=20"]).eval.lm_eval.limit == 20


def test_tasks_without_lm_eval_installed_are_refused(monkeypatch):
    monkeypatch.setattr(lm_eval, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'sparring\[eval\]'"):
        load_config(None, ["eval.lm_eval.tasks=[arc_easy]"])
    load_config(None)  # no tasks: lm_eval is not needed


@pytest.mark.parametrize("distributed, zero_stage, refused", [
    ("FSDP", 0, True), ("DEEPSPEED", 3, True), ("DEEPSPEED", 2, False), ("MULTI_GPU", 0, False),
])
def test_lm_eval_is_refused_with_sharded_weights(distributed, zero_stage, refused):
    from sparring import stages

    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(name=distributed),
                                  state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)))
    cfg = load_config(None, ["eval.lm_eval.tasks=[arc_easy]"])
    if refused:
        with pytest.raises(ConfigError, match="FSDP and DeepSpeed ZeRO-3"):
            stages.check_lm_eval(cfg, accelerator)
    else:
        stages.check_lm_eval(cfg, accelerator)
    stages.check_lm_eval(load_config(None), SimpleNamespace(distributed_type=SimpleNamespace(name="FSDP")))


def test_report_has_a_column_per_lm_eval_score_after_the_held_out_metric():
    rows = [{"model": "θ0 (initial)", "exact_match": 0.5, "lm_eval/arc_easy/acc": 0.25},
            {"model": "θ1 (after iteration 0)", "exact_match": 0.75, "lm_eval/arc_easy/acc": 0.5,
             "lm_eval/gsm8k/exact_match_strict-match": 0.125}]
    cols = columns(SPIN_COLUMNS, "exact_match", rows)
    assert [c[1] for c in cols[:4]] == ["model", "held-out exact match", "lm-eval arc_easy acc",
                                        "lm-eval gsm8k exact_match_strict-match"]
    text = table(rows, cols)
    assert "| θ0 (initial) | 0.500 | 0.250 | – |" in text and "| 0.750 | 0.500 | 0.125 |" in text
