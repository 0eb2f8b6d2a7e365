"""The tokenizer-family fixtures behave like the real families they stand in for."""

from __future__ import annotations

import pytest
from tests.tokenizer_families import (
    CONVERSATIONS,
    CORPUS,
    END_OF_TURN,
    FAMILIES,
    GENERATION_EOS,
    build_family,
    build_tokenizer,
    construct_tokenizer,
)

ADDS_BOS = {"sentencepiece_llama": True, "chatml_bpe": False, "llama3": True}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: build_family(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def tokenizers(folders):
    from transformers import AutoTokenizer

    return {family: AutoTokenizer.from_pretrained(folder) for family, folder in folders.items()}


def _texts(tokenizer):
    rendered = [tokenizer.apply_chat_template(c, tokenize=False) for c in CONVERSATIONS]
    prompts = [tokenizer.apply_chat_template(c[:-1], tokenize=False, add_generation_prompt=True) for c in CONVERSATIONS]
    contents = [m["content"] for c in CONVERSATIONS for m in c]
    return CORPUS + rendered + prompts + contents


@pytest.mark.parametrize("family", FAMILIES)
def test_reloaded_from_disk_equals_built(family, tokenizers):
    from transformers import PreTrainedTokenizerFast

    built, loaded = construct_tokenizer(family), tokenizers[family]
    assert isinstance(loaded, PreTrainedTokenizerFast)
    assert type(loaded).__name__ == {"sentencepiece_llama": "LlamaTokenizer", "chatml_bpe": "Qwen2Tokenizer"}.get(
        family, "TokenizersBackend"
    )
    assert loaded.get_vocab() == built.get_vocab() and len(loaded) == len(built)
    assert loaded.special_tokens_map == built.special_tokens_map
    assert loaded.chat_template == built.chat_template
    assert (loaded.pad_token is None) == (family != "chatml_bpe")
    for text in _texts(built):
        for add_special_tokens in (True, False):
            ids = built(text, add_special_tokens=add_special_tokens)["input_ids"]
            assert loaded(text, add_special_tokens=add_special_tokens)["input_ids"] == ids, text
            assert loaded.decode(ids) == built.decode(ids)
    # build_tokenizer is the same save/load round trip, without a model.
    assert build_tokenizer(family).get_vocab() == loaded.get_vocab()


def test_vocabulary_layouts(tokenizers):
    llama = tokenizers["sentencepiece_llama"]
    assert (llama.unk_token_id, llama.bos_token_id, llama.eos_token_id) == (0, 1, 2)
    assert llama.convert_tokens_to_ids(["<0x00>", "<0x0A>", "<0xFF>"]) == [3, 13, 258]
    qwen = tokenizers["chatml_bpe"]
    assert qwen.bos_token is None and qwen.eos_token == qwen.pad_token == "<|endoftext|>"
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        qwen.vocab_size + i for i in range(3)
    ]
    llama3 = tokenizers["llama3"]
    assert (llama3.bos_token, llama3.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
    assert llama3.convert_tokens_to_ids("<|eot_id|>") == llama3.bos_token_id + 9 == llama3.vocab_size + 9


def test_sentencepiece_dummy_prefix_differs_in_context(tokenizers):
    tokenizer = tokenizers["sentencepiece_llama"]
    alone = tokenizer("Hello", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone) == ["▁Hello"]
    in_context = tokenizer("<|assistant|>\nHello", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(in_context)
    after_newline = pieces[pieces.index("<0x0A>") + 1 :]
    assert "".join(after_newline) == "Hello" and not after_newline[0].startswith("▁")
    # So a response tokenized on its own is not the tokens it has after the prompt.
    assert in_context[-len(alone) :] != alone
    # The newline is byte fallback and the role marker is plain text, as in Llama-2 / Zephyr.
    assert len(tokenizer.tokenize("<|assistant|>")) > 1


@pytest.mark.parametrize("family", FAMILIES)
def test_bos_from_add_special_tokens(family, tokenizers):
    tokenizer = tokenizers[family]
    plain = tokenizer("What is 12 + 7?", add_special_tokens=False)["input_ids"]
    special = tokenizer("What is 12 + 7?")["input_ids"]
    if ADDS_BOS[family]:
        assert special == [tokenizer.bos_token_id] + plain
    else:
        assert special == plain
    # transformers 5: add_bos_token is not saved, and loading ignores it anyway when tokenizer.json exists;
    # the post-processor decides. The property says False even where BOS is added.
    assert tokenizer.add_bos_token is False
    assert tokenizer("What is 12 + 7?")["input_ids"][-1] not in GENERATION_EOS[family]  # never an EOS


def test_chat_templates(tokenizers):
    zephyr = tokenizers["sentencepiece_llama"]
    text = zephyr.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    assert text == "<|user|>\nWhat is 12 + 7?</s>\n<|assistant|>\n12 + 7 = 19.</s>\n"
    prompt = zephyr.apply_chat_template(CONVERSATIONS[0][:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|user|>\nWhat is 12 + 7?</s>\n<|assistant|>\n"
    ids = zephyr.apply_chat_template(CONVERSATIONS[0])["input_ids"]  # v5: a BatchEncoding by default
    assert ids[0] != zephyr.bos_token_id  # no BOS in the text, and apply_chat_template adds no special tokens

    qwen = tokenizers["chatml_bpe"]
    assert qwen.apply_chat_template(CONVERSATIONS[0][:1], tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert qwen.apply_chat_template(CONVERSATIONS[1], tokenize=False).startswith(
        "<|im_start|>system\nYou are a careful calculator."
    )

    llama3 = tokenizers["llama3"]
    text = llama3.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    bos = llama3.bos_token_id
    ids = llama3.apply_chat_template(CONVERSATIONS[0])["input_ids"]
    assert ids[0] == bos and ids.count(bos) == 1
    assert llama3(text)["input_ids"][:2] == [bos, bos]  # tokenizing the rendered text with specials doubles BOS
    assert llama3.convert_ids_to_tokens(llama3("<|end_header_id|>\n\n", add_special_tokens=False)["input_ids"]) == [
        "<|end_header_id|>",
        "ĊĊ",
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_is_a_prefix_of_the_conversation(family, tokenizers):
    tokenizer = tokenizers[family]
    prefix_breaks = []
    for conversation in CONVERSATIONS:
        prompt = tokenizer.apply_chat_template(conversation[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert full.startswith(prompt)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            prefix_breaks.append(conversation[-1]["content"])
    # ChatML's prompt ends in "\n", and a response starting with "\n" merges with it into "ĊĊ".
    assert prefix_breaks == (["\n- red\n- blue"] if family == "chatml_bpe" else [])


@pytest.mark.parametrize("family", FAMILIES)
def test_unicode_round_trips(family, tokenizers):
    tokenizer = tokenizers[family]
    for text in ["café naïve déjà vu", "日本語 日本", "emoji 🙂🎉👍 ok", "Ω≈ç√ ∑ — “quotes”", "What is 12 + 7?\n19"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    for conversation in CONVERSATIONS:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    if family == "sentencepiece_llama":  # emoji come back through byte fallback
        assert tokenizer.tokenize("🙂") == ["▁", "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
        # Decoding strips the dummy prefix's space, so a text that starts with a space loses one.
        ids = tokenizer(" Leading space", add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == "Leading space"


@pytest.mark.parametrize("family", FAMILIES)
def test_end_of_turn_is_one_special_token(family, tokenizers):
    tokenizer = tokenizers[family]
    token = END_OF_TURN[family]
    (token_id,) = tokenizer(token, add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(token_id) == token
    assert tokenizer.added_tokens_decoder[token_id].special
    assert tokenizer.decode([token_id], skip_special_tokens=True) == ""
    text = tokenizer.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    turns = len(CONVERSATIONS[2]) + (family == "chatml_bpe")  # + Qwen's default system prompt
    assert ids.count(token_id) == text.count(token) == turns


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_config(family, folders, tokenizers):
    from transformers import GenerationConfig

    tokenizer = tokenizers[family]
    config = GenerationConfig.from_pretrained(folders[family])
    expected = [tokenizer.convert_tokens_to_ids(t) for t in GENERATION_EOS[family]]
    assert config.eos_token_id == (expected if len(expected) > 1 else expected[0])
    spelled_out = {
        "sentencepiece_llama": 2,
        "chatml_bpe": [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id],
        "llama3": [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")],
    }
    assert config.eos_token_id == spelled_out[family]
    assert config.pad_token_id == (tokenizer.pad_token_id if tokenizer.pad_token is not None else expected[0])
    assert config.bos_token_id == tokenizer.bos_token_id


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_runs(family, folders, tokenizers):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizers[family]
    model = AutoModelForCausalLM.from_pretrained(folders[family]).eval()
    assert model.config.vocab_size == len(tokenizer)
    if tokenizer.pad_token is not None:
        batch = tokenizer.apply_chat_template(CONVERSATIONS[:2], padding=True, return_tensors="pt")
    else:  # no pad token: one conversation
        batch = tokenizer.apply_chat_template(CONVERSATIONS[0], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (*batch["input_ids"].shape, len(tokenizer)) and torch.isfinite(logits).all()
    prompt = tokenizer.apply_chat_template(CONVERSATIONS[0][:1], add_generation_prompt=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and prompt["input_ids"].shape[1] < out.shape[1] <= prompt["input_ids"].shape[1] + 4


def test_conversations_cover_the_cases():
    assert len(CONVERSATIONS) >= 5
    assert all(c[-1]["role"] == "assistant" for c in CONVERSATIONS)
    contents = [m["content"] for c in CONVERSATIONS for m in c]
    assert any(c[0]["role"] == "system" for c in CONVERSATIONS) and any(c[0]["role"] != "system" for c in CONVERSATIONS)
    assert any(sum(m["role"] == "assistant" for m in c) > 1 for c in CONVERSATIONS)
    assert any(text != text.strip() for text in contents) and any("\n" in text for text in contents)
    assert any(any(ord(ch) > 127 for ch in text) for text in contents)
    assert any(ch.isdigit() for text in contents for ch in text)
