"""The peft: section (LoRA / QLoRA): config errors, fresh adapters = θ_t, merging, checkpoints."""

from __future__ import annotations

import pytest
import torch

from sparring.config import ConfigError, ModelConfig, PeftConfig, load_config
from sparring.modeling import add_adapters, check_peft, is_peft_model, load_model, merge_adapters
from sparring.tasks import build_tiny_model

LSP, SPIN = "configs/lsp/tiny.yaml", "configs/spin/tiny.yaml"
PEFT = PeftConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def base_dir(tok, tmp_path):
    """A tiny model saved as a run's θ_t would be."""
    build_tiny_model(tok, hidden_size=32, layers=1, heads=2).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def logits(model, tok) -> torch.Tensor:
    ids = torch.tensor([tok.encode("12+34=46")])
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained(model) -> None:
    """Stand-in for training: every adapter weight moves (B off zero)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("override, new", [("lsp.lora_r=4", "peft.r"), ("lsp.lora_alpha=8", "peft.alpha"),
                                           ("lsp.lora_target_modules=[q_proj]", "peft.target_modules")])
def test_an_old_lsp_lora_override_says_where_it_moved(override, new):
    with pytest.raises(ConfigError, match=f"'{override.split('=')[0]}' is now '{new}'"):
        load_config(LSP, [override])


def test_an_old_lsp_lora_key_in_a_file_or_per_iteration_names_peft_r(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("method: lsp\nlsp:\n  lora_r: 4\n  lora_alpha: 8\n")
    with pytest.raises(ConfigError, match=r"'lsp.lora_r' is now 'peft.r'") as err:
        load_config(old)
    assert "'lsp.lora_alpha' is now 'peft.alpha'" in str(err.value)
    per_iteration = tmp_path / "per.yaml"
    per_iteration.write_text("per_iteration:\n  1: {lsp.lora_r: 4}\n")
    with pytest.raises(ConfigError, match=r"peft\.r"):
        load_config(per_iteration)


def test_the_peft_section_is_checked():
    assert not load_config(SPIN).peft.on
    assert load_config(SPIN, ["peft.r=8"]).peft.on and load_config(SPIN, ["peft.enabled=true", "peft.r=8"]).peft.on
    for bad, message in [(["peft.enabled=true"], "set peft.r"), (["peft.r=-1"], "peft.r must be >= 0"),
                         (["peft.load_in_4bit=true"], "set peft.r too"),
                         (["peft.r=4", "peft.dropout=1.0"], "peft.dropout"),
                         (["peft.r=4", "peft.target_modules=[]"], "target_modules"),
                         (["peft.rank=4"], "valid keys here: alpha, dropout, enabled")]:
        with pytest.raises(ConfigError, match=message):
            load_config(SPIN, bad)


def test_the_lora_example_config_turns_lora_on():
    cfg = load_config("configs/spin/lora-example.yaml")
    assert cfg.peft.on and cfg.peft.r == 8 and not cfg.peft.load_in_4bit


def test_peft_cannot_change_per_iteration(tmp_path):
    path = tmp_path / "per.yaml"
    path.write_text("per_iteration:\n  1: {peft.r: 8}\n")
    with pytest.raises(ConfigError, match="'peft.r' is not per iteration"):
        load_config(path)


def test_load_in_4bit_is_refused_on_a_cpu(monkeypatch, tmp_path, base_dir):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    qlora = PeftConfig(r=4, load_in_4bit=True)
    with pytest.raises(ConfigError, match="peft.load_in_4bit .*needs a CUDA GPU"):
        check_peft(qlora)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        load_model(ModelConfig(name_or_path=str(base_dir)), load_in_4bit=True)
    # a run refuses before it writes anything
    from sparring.algorithms import spin

    cfg = load_config(SPIN, [f"output_dir={tmp_path / 'run'}", "peft.r=4", "peft.load_in_4bit=true"])
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        spin.run(cfg)
    assert not (tmp_path / "run").exists()
    check_peft(PeftConfig(r=4))  # plain LoRA is fine on a CPU


# ---------------------------------------------------------------- adapters


def test_fresh_adapters_compute_exactly_the_model_and_only_they_train(tok):
    model = build_tiny_model(tok, hidden_size=32, layers=1, heads=2)
    before = logits(model, tok)
    adapted = add_adapters(model, PEFT, seed=3)
    assert torch.equal(logits(adapted, tok), before)  # B = 0: θ_t with fresh adapters is θ_t
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    again = add_adapters(build_tiny_model(tok, hidden_size=32, layers=1, heads=2), PEFT, seed=3)
    state, state_again = adapted.state_dict(), again.state_dict()
    assert all(torch.equal(state[k], state_again[k]) for k in state)  # the seed fixes A


def test_merged_model_computes_what_the_adapters_did_and_loads_as_a_plain_model(tok, base_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    adapted = add_adapters(load_model(ModelConfig(name_or_path=str(base_dir))), PEFT, seed=0)
    trained(adapted)
    expected = logits(adapted, tok)
    merged = merge_adapters(adapted, ModelConfig(name_or_path=str(base_dir)))
    assert not is_peft_model(merged)
    torch.testing.assert_close(logits(merged, tok), expected, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "next")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "next")
    assert set(reloaded.state_dict()) == set(AutoModelForCausalLM.from_pretrained(base_dir).state_dict())
    torch.testing.assert_close(logits(reloaded, tok), expected, rtol=0, atol=1e-5)


def test_a_4bit_base_is_merged_into_a_full_precision_copy(tok, base_dir):
    """QLoRA's merge path, on a CPU: the adapters move onto θ_t reloaded from disk; the live model stays."""
    cfg = ModelConfig(name_or_path=str(base_dir))
    adapted = add_adapters(load_model(cfg), PEFT, seed=0)
    trained(adapted)
    expected = logits(adapted, tok)
    adapted.get_base_model().is_loaded_in_4bit = True  # what transformers sets on a bitsandbytes model
    merged = merge_adapters(adapted, cfg, base_dir)
    assert merged is not adapted.get_base_model() and is_peft_model(adapted)
    torch.testing.assert_close(logits(merged, tok), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(adapted, tok), expected, rtol=0, atol=0)  # untouched


def test_merging_keeps_the_model_own_generation_config(tok, base_dir):
    from sparring.generation import HFGenerator, SamplingParams

    adapted = add_adapters(load_model(ModelConfig(name_or_path=str(base_dir))), PEFT, seed=0)
    own = adapted.generation_config.to_dict()
    HFGenerator(adapted, tok).generate([tok.encode("1+2=")], SamplingParams(max_new_tokens=3, temperature=0.7), 0)
    # peft's generate copies the sampling config onto the base model; it must not be saved as θ_{t+1}'s
    assert merge_adapters(adapted, ModelConfig()).generation_config.to_dict() == own


def test_a_training_checkpoint_restores_the_adapters(tok, tmp_path):
    """A resumed iteration rebuilds θ_t + fresh adapters, then accelerate's state brings back the trained ones."""
    from accelerate import Accelerator

    from sparring.config import TrainConfig
    from sparring.training.engine import load_latest_checkpoint, save_checkpoint
    from sparring.training.optim import linear_schedule, make_optimizer

    def prepared(accelerator):
        model = add_adapters(build_tiny_model(tok, hidden_size=32, layers=1, heads=2), PEFT, seed=0)
        optimizer = make_optimizer(model.parameters(), TrainConfig(optimizer="adamw"))
        scheduler = linear_schedule(optimizer, 10, 0.0)
        return (*accelerator.prepare(model, optimizer), scheduler)

    accelerator = Accelerator(mixed_precision="no", cpu=True)
    model, _, scheduler = prepared(accelerator)
    trained(model)
    save_checkpoint(accelerator, scheduler, tmp_path, 3)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    accelerator.free_memory()
    model, _, scheduler = prepared(accelerator)
    assert load_latest_checkpoint(accelerator, scheduler, tmp_path) == 3
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
