"""The known-distribution proving ground: task families, exact and sampled distribution metrics on a
model whose probabilities are known by construction, the frontier rule and the report's plumbing."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from sparring.evaluation.distribution import exact_metrics, score_distribution, support_probs, tv_floor
from sparring.evaluation.metrics import distribution_metrics
from sparring.tasks.distributions import DISTRIBUTION_FAMILIES, family, is_valid, make_query, make_rows, support

# families --------------------------------------------------------------------------------------------


def test_support_of_each_family_by_hand():
    assert support("Write a number between 23 and 26.") == ["23", "24", "25", "26"]
    assert support("Write a number between 98 and 101.") == ["98", "99", "100", "101"]
    assert support("Write a letter from c to d, then a digit from 2 to 4.") == ["c2", "c3", "c4", "d2", "d3", "d4"]
    assert support("Shuffle the letters of abc.") == ["abc", "acb", "bac", "bca", "cab", "cba"]
    assert len(support("Shuffle the letters of plum.")) == 24 and len(support("Shuffle the letters of aab.")) == 3
    assert support("Write a number between 9 and 3.") is None and support("What is 2 + 2?") is None
    assert family("Shuffle the letters of abc.") == "shuffle" and family("What is 2 + 2?") is None


def test_validity_is_an_exact_string_match():
    query = "Write a number between 23 and 41."
    assert is_valid(query, "23") and is_valid(query, "41") and is_valid(query, "30")
    assert not any(is_valid(query, a) for a in ("22", "42", " 30", "30\n", "030", ""))
    assert not is_valid("What is 2 + 2?", "4")


@pytest.mark.parametrize("name", DISTRIBUTION_FAMILIES)
def test_every_query_of_a_family_parses_with_its_stated_size(name):
    rng = random.Random(3)
    for _ in range(200):
        query = make_query(rng, name)
        valid = support(query)
        assert family(query) == name and valid and len(set(valid)) == len(valid)
        if name == "number_range":
            assert 4 <= len(valid) <= 20
        elif name == "letter_digit":
            assert 4 <= len(valid) <= 20
        else:
            assert len(valid) in (6, 24)
    with pytest.raises(ValueError):
        make_query(rng, "poem")


def test_rows_are_deterministic_distinct_valid_and_uniform_draws():
    rows = make_rows(3000, seed=5, families=("number_range", "letter_digit"))
    assert rows == make_rows(3000, seed=5, families=("number_range", "letter_digit"))
    assert rows != make_rows(3000, seed=6, families=("number_range", "letter_digit"))
    queries = [r["messages"][0]["content"] for r in rows]
    assert len(set(queries)) == 3000 and family(queries[0]) == "number_range" and family(queries[1]) == "letter_digit"
    ranks = []
    for r in rows:
        query, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        assert is_valid(query, answer)
        valid = support(query)
        ranks.append((valid.index(answer) + 0.5) / len(valid))  # uniform on S -> mean 0.5, variance ≈ 1/12
    mean = sum(ranks) / len(ranks)
    assert abs(mean - 0.5) < 4 * math.sqrt(1 / 12 / len(ranks))
    assert sum(x < 0.5 for x in ranks) / len(ranks) == pytest.approx(0.5, abs=0.03)


def test_experiment_splits_are_disjoint_and_sized(tmp_path):
    from sparring.experiments.distribution import DistributionConfig, write_data
    from sparring.state import read_jsonl

    cfg = DistributionConfig(subset=60, validation=20, test=30)
    paths = write_data(cfg, tmp_path)
    splits = {name: [r["messages"][0]["content"] for r in read_jsonl(p)] for name, p in paths.items()}
    assert {k: len(v) for k, v in splits.items()} == {"subset": 60, "validation": 20, "test": 30}
    assert len(set().union(*splits.values())) == 110


# exact metrics -----------------------------------------------------------------------------------------


def test_exact_metrics_by_hand():
    uniform = exact_metrics([0.25] * 4)
    assert uniform["tv"] == pytest.approx(0) and uniform["tv_on_support"] == pytest.approx(0)
    assert uniform["entropy"] == pytest.approx(math.log(4)) and uniform["entropy_ratio"] == pytest.approx(1)
    m = exact_metrics([0.32, 0.24, 0.16, 0.0])  # 0.28 of the mass off S
    assert m["valid_mass"] == pytest.approx(0.72)
    assert m["tv"] == pytest.approx(0.5 * (0.07 + 0.01 + 0.09 + 0.25 + 0.28))  # 0.35
    shape = [0.32 / 0.72, 0.24 / 0.72, 0.16 / 0.72, 0.0]
    assert m["tv_on_support"] == pytest.approx(0.5 * sum(abs(p - 0.25) for p in shape))
    assert m["entropy"] == pytest.approx(-sum(p * math.log(p) for p in shape if p))
    point = exact_metrics([1.0, 0.0, 0.0])
    assert point["tv"] == pytest.approx(2 / 3) and point["entropy"] == 0.0 and point["entropy_ratio"] == 0.0
    nothing = exact_metrics([0.0, 0.0])
    assert nothing["tv"] == 1.0 and nothing["tv_on_support"] == 0.5


def test_exact_tv_equals_sampled_tv_of_the_exact_distribution_in_the_limit():
    probs = [0.32, 0.24, 0.16, 0.0]  # + 0.28 invalid
    target = {y: 0.25 for y in "abcd"}
    rng = random.Random(0)
    draw = lambda n: rng.choices(["a", "b", "c", "d", None], weights=[*probs, 0.28], k=n)  # noqa: E731
    exact = exact_metrics(probs)
    errors = {n: abs(distribution_metrics(draw(n), target)["tv"] - exact["tv"]) for n in (16, 200_000)}
    assert errors[200_000] < 0.005 < errors[16]
    assert distribution_metrics(draw(200_000), target)["validity"] == pytest.approx(0.72, abs=0.005)


def test_tv_floor_exact_formula_matches_simulation():
    assert tv_floor(64, 1) == 0.0
    assert tv_floor(1, 4) == pytest.approx(0.75)  # one draw: ½(3/4 + 3 · 1/4)
    rng = random.Random(1)
    for k in (4, 20):
        target = {i: 1 / k for i in range(k)}
        sims = [distribution_metrics(rng.choices(range(k), k=64), target)["tv"] for _ in range(4000)]
        assert tv_floor(64, k) == pytest.approx(sum(sims) / len(sims), abs=0.004)
    assert tv_floor(64, 20) > tv_floor(64, 4) > tv_floor(1024, 4) > 0


# a model whose probabilities are known ---------------------------------------------------------------

QUERY = "Write a number between 3 and 6."
# π(next | current) of the bigram model below: after the generation prompt '3' .4, '4' .3, '5' .2,
# '7' .1; after a digit end-of-turn .8, '0' .2; after '0' end-of-turn. So p("3") = .32, p("4") = .24,
# p("5") = .16, p("6") = 0; the rest ("7", "30", …) is off the support.
TRANSITIONS = {"<|assistant|>": {"3": 0.4, "4": 0.3, "5": 0.2, "7": 0.1},
               **{d: {"<|end|>": 0.8, "0": 0.2} for d in "34567"}, "0": {"<|end|>": 1.0}}


def bigram_llama(tokenizer):
    """A LlamaForCausalLM that is exactly the bigram table TRANSITIONS: scaled one-hot embeddings, attention
    and MLP outputs zeroed (the residual stream is the current token's embedding), RMSNorm makes it
    √d · e_token, and the LM head holds log π(next | current) / √d."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, d = len(tokenizer), 128
    config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, :vocab] = 100 * torch.eye(vocab)  # RMSNorm's ε negligible
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(vocab, d)
        for current, nxt in TRANSITIONS.items():
            i = tokenizer.convert_tokens_to_ids(current)
            head[:, i] = -1e4
            for token, p in nxt.items():
                head[tokenizer.convert_tokens_to_ids(token), i] = math.log(p)
        model.lm_head.weight.copy_(head / math.sqrt(d))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


@pytest.fixture(scope="module")
def known():
    from sparring.data import encode, parse_row
    from sparring.evaluation.heldout import EvalSet
    from sparring.tasks.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    example = parse_row({"messages": [{"role": "user", "content": QUERY}, {"role": "assistant", "content": "4"}]})
    prompt_ids, response_ids = encode(tokenizer, example.prompt, example.real)
    return tokenizer, bigram_llama(tokenizer), EvalSet([example], [prompt_ids], [response_ids])


def test_enumeration_scores_answer_plus_end_of_turn_at_every_temperature(known):
    from sparring.evaluation.distribution import support_ids

    tokenizer, model, data = known
    ids = support_ids(tokenizer, data, [support(QUERY)])
    assert [tokenizer.convert_ids_to_tokens(i) for i in ids[0]][0] == ["3", "<|end|>"]
    probs = support_probs(model, tokenizer, data, ids, [1.0, 0.5])
    assert probs[1.0][0] == pytest.approx([0.32, 0.24, 0.16, 0.0], abs=1e-5)
    # At T = 0.5 every row of the table is squared and renormalised.
    first = {t: p**2 / sum(q**2 for q in TRANSITIONS["<|assistant|>"].values()) for t, p in TRANSITIONS["<|assistant|>"].items()}
    end = 0.8**2 / (0.8**2 + 0.2**2)
    assert probs[0.5][0] == pytest.approx([first["3"] * end, first["4"] * end, first["5"] * end, 0.0], abs=1e-5)


def test_sampled_metrics_converge_to_the_exact_ones(known):
    tokenizer, model, data = known
    few = score_distribution(model, tokenizer, data, temperatures=[1.0], n=16, max_new_tokens=4, seed=3)[1.0]
    many = score_distribution(model, tokenizer, data, temperatures=[1.0, 0.5], n=2000, max_new_tokens=4, seed=3)
    exact = many[1.0]
    assert exact.tv[0] == pytest.approx(0.35, abs=1e-5) and exact.valid_mass[0] == pytest.approx(0.72, abs=1e-5)
    for scores in many.values():  # sampling sd ≈ 0.01 at n = 2000
        assert scores.sampled_tv[0] == pytest.approx(scores.tv[0], abs=0.03)
        assert scores.validity[0] == pytest.approx(scores.valid_mass[0], abs=0.03)
        assert scores.coverage[0] == 0.75  # "6" has probability 0
    assert abs(few.sampled_tv[0] - few.tv[0]) > abs(exact.sampled_tv[0] - exact.tv[0])
    assert exact.floor[0] == pytest.approx(tv_floor(2000, 4)) and exact.summary()["floor"] < 0.02
    assert set(few.summary()) >= {"tv", "sampled_tv", "floor"} and "sampled_tv" not in score_distribution(
        model, tokenizer, data, temperatures=[1.0], n=0, max_new_tokens=4)[1.0].summary()
    unsampled = score_distribution(model, tokenizer, data, temperatures=[1.0], n=8, max_new_tokens=4,
                                   sample_prompts=0)[1.0]  # exact on every prompt, sampled on none
    assert unsampled.tv == exact.tv and math.isnan(unsampled.sampled_tv[0]) and math.isnan(unsampled.summary()["coverage"])


def test_samples_are_matched_by_token_ids_not_text(known):
    from sparring.evaluation.distribution import sample_answers, support_ids

    tokenizer, model, data = known
    answers = sample_answers(model, tokenizer, data, support_ids(tokenizer, data, [support(QUERY)]), [support(QUERY)],
                             n=1000, temperature=1.0, max_new_tokens=4)
    counts = Counter(answers[0])
    assert set(counts) <= {"3", "4", "5", None} and counts["3"] / 1000 == pytest.approx(0.32, abs=0.05)
    # With room for one token only, "3" is never closed by its end of turn: no sample is valid.
    assert set(sample_answers(model, tokenizer, data, support_ids(tokenizer, data, [support(QUERY)]),
                              [support(QUERY)], n=50, temperature=1.0, max_new_tokens=1)[0]) == {None}


# frontier rule and report plumbing --------------------------------------------------------------------


def scores_of(tv: list[float], valid: list[float]):
    from sparring.evaluation.distribution import DistributionScores

    k = len(tv)
    return DistributionScores(temperature=1.0, n=0, support_size=[4] * k, tv=tv, tv_on_support=tv, valid_mass=valid,
                              entropy=[0.0] * k, entropy_ratio=[0.0] * k, sampled_tv=[math.nan] * k,
                              validity=[math.nan] * k, coverage=[math.nan] * k, floor=[math.nan] * k)


def test_frontier_weights_interpolate_on_validity_and_clamp_outside():
    from sparring.experiments.distribution import frontier_weights

    validities = [0.9, 0.5, 0.7]  # any order: sorted by validity inside
    assert frontier_weights(validities, 0.6) == ({1: pytest.approx(0.5), 2: pytest.approx(0.5)}, False)
    assert frontier_weights(validities, 0.85) == ({2: pytest.approx(0.25), 0: pytest.approx(0.75)}, False)
    assert frontier_weights(validities, 0.95) == ({0: 1.0}, True)
    assert frontier_weights(validities, 0.2) == ({1: 1.0}, True)
    assert frontier_weights(validities, 0.5) == ({1: 1.0}, False)


def test_frontier_comparison_verdicts():
    from sparring.experiments.distribution import frontier_comparison

    rng = random.Random(0)
    prompts = 200
    # The frontier: TV 0.6 at validity 0.5, TV 0.4 at validity 0.7 (per prompt, with noise).
    frontier = [scores_of([0.6 + rng.gauss(0, 0.05) for _ in range(prompts)], [0.5] * prompts),
                scores_of([0.4 + rng.gauss(0, 0.05) for _ in range(prompts)], [0.7] * prompts)]
    curve = [(a + b) / 2 for a, b in zip(frontier[0].tv, frontier[1].tv)]  # at validity 0.6
    better = [scores_of([c - 0.05 + rng.gauss(0, 0.01) for c in curve], [0.6] * prompts) for _ in range(3)]
    same = [scores_of([c + rng.gauss(0, 0.02) for c in curve], [0.6] * prompts) for _ in range(3)]
    worse = [scores_of([c + 0.05 for c in curve], [0.6] * prompts) for _ in range(3)]
    result = frontier_comparison(frontier, better)
    assert result["verdict"] == "beyond" and result["gap"] == pytest.approx(0.05, abs=0.01)
    assert result["validity"] == pytest.approx(0.6) and not result["outside_range"]
    assert frontier_comparison(frontier, same)["verdict"] == "on"
    assert frontier_comparison(frontier, worse)["verdict"] == "inside"
    assert frontier_comparison(frontier, [scores_of(curve, [0.8] * prompts)])["outside_range"]


def test_tv_verdicts():
    from sparring.experiments.distribution import tv_verdict

    assert tv_verdict((-0.1, -0.2, -0.05), (-0.1, -0.2, -0.01)) == "closer to the target than θ0 and the control"
    assert tv_verdict((-0.1, -0.2, -0.05), (-0.1, -0.2, 0.01)) == "closer than θ0"
    assert tv_verdict((-0.1, -0.2, -0.05), None) == "closer than θ0"
    assert tv_verdict((0.1, 0.05, 0.2), None) == "farther than θ0"
    assert tv_verdict((0.0, -0.1, 0.1), (-0.1, -0.2, -0.01)) == "no difference from θ0"


def test_write_section_replaces_between_markers_and_keeps_the_rest(tmp_path):
    from sparring.experiments.distribution import END, START, write_section

    path = tmp_path / "RESULTS.md"
    path.write_text(f"# Results\n\nhand-written\n\n{START}\nold\n{END}\n\ntail\n")
    write_section(path, START, END, f"{START}\nnew\n{END}")
    assert path.read_text() == f"# Results\n\nhand-written\n\n{START}\nnew\n{END}\n\ntail\n"
    fresh = tmp_path / "sub" / "NEW.md"
    write_section(fresh, START, END, f"{START}\nx\n{END}")
    write_section(fresh, START, END, f"{START}\ny\n{END}")
    assert fresh.read_text().count(START) == 1 and f"{START}\ny\n{END}" in fresh.read_text()


def test_experiment_key_picks_the_module_and_loaders_check_it(tmp_path, capsys):
    from tests.conftest import REPO

    from sparring.cli import main
    from sparring.config import ConfigError
    from sparring.experiments import distribution, plateau

    cfg = distribution.load(REPO / "configs" / "experiments" / "distribution.yaml")
    assert cfg.experiment == "distribution" and cfg.samples >= 64 and 1.0 in cfg.temperatures
    plain = tmp_path / "plateau.yaml"
    plain.write_text("experiment: plateau\npool: 40\n")
    assert plateau.load(plain).pool == 40  # the key is accepted (and dropped) by the plateau loader
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("experiment: plateau\n")
    with pytest.raises(ConfigError):
        distribution.load(wrong)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("experiment: poetry\n")
    assert main(["experiment", str(unknown)]) == 2
    assert "unknown experiment 'poetry'" in capsys.readouterr().err


def test_spin_nll_arm_is_spin_preset_plus_the_nll_term_run_by_the_shipped_configs_only(tmp_path):
    import yaml
    from tests.conftest import REPO

    from sparring.config import ConfigError, load_config
    from sparring.experiments import distribution, plateau

    for module, name in ((plateau, "plateau"), (distribution, "distribution")):
        (tmp_path / "bare.yaml").write_text(f"experiment: {name}\n")  # the dataclass's own arms
        shipped = module.load(REPO / "configs" / "experiments" / f"{name}.yaml")
        # the shipped experiments run the extension beside SPIN, on SPIN's grid; the dataclass default does not
        assert "spin_nll" in module.ARMS and "spin_nll" in shipped.arms
        assert shipped.lr_grid["spin_nll"] == shipped.lr_grid["spin"]
        assert "spin_nll" not in module.load(tmp_path / "bare.yaml").arms
        # a user's own arm list and rates, and (optionally) its coefficient
        data = yaml.safe_load((REPO / "configs" / "experiments" / f"{name}.yaml").read_text())
        data["lr_grid"]["spin_nll"] = [1.0e-4, 1.0e-3]
        data["spin_nll_coef"] = 0.5
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(data))
        cfg = module.load(tmp_path / f"{name}.yaml")
        assert cfg.lr_grid["spin_nll"] == [1.0e-4, 1.0e-3]
        paths = {"subset": tmp_path / "subset.jsonl", "validation": tmp_path / "validation.jsonl"}
        job, spin_job = plateau.Job("spin_nll", 1.0e-4, 0), plateau.Job("spin", 1.0e-4, 0)
        args = plateau.method_args(cfg, job, tmp_path, paths, tmp_path / "theta0")
        spin_args = plateau.method_args(cfg, spin_job, tmp_path, paths, tmp_path / "theta0")
        assert args[1] == cfg.presets["spin"] and args[-1] == "spin.nll_coef=0.5"
        assert f"output_dir={tmp_path / 'runs' / 'spin_nll' / 'lr0.0001' / 'seed0'}" in args
        # the same run as the spin arm's but for the output folder and the one added override
        assert [a for a in args if not a.startswith("output_dir=")][:-1] == \
            [a for a in spin_args if not a.startswith("output_dir=")]
        run = load_config(str(REPO / args[1]), args[2:])
        assert run.method == "spin" and run.spin.nll_coef == 0.5 and run.spin.iterations == cfg.iterations
        assert load_config(str(REPO / spin_args[1]), spin_args[2:]).spin.nll_coef == 0.0
        del data["lr_grid"]["spin_nll"]
        (tmp_path / "no_rates.yaml").write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match="lr_grid has no rates for arm 'spin_nll'"):
            module.load(tmp_path / "no_rates.yaml")
        assert module.load(REPO / "configs" / "experiments" / f"{name}.yaml").spin_nll_coef == 1.0  # the default


def test_diagnosis_columns_gain_nll_real_only_with_the_spin_nll_arm():
    import types

    from sparring.experiments.report import curve_keys, variant_arms_note

    plain = types.SimpleNamespace(arms=["sft", "spin"], spin_nll_coef=1.0)
    with_nll = types.SimpleNamespace(arms=["sft", "spin", "spin_nll"], spin_nll_coef=1.0)
    assert "nll/real" not in curve_keys(plain) and variant_arms_note(plain) == []
    assert curve_keys(with_nll)[-1] == "nll/real" and "not SPIN's method" in variant_arms_note(with_nll)[0]
