"""A character-level tokenizer in Hugging Face format and a tiny Llama-style model."""

from __future__ import annotations

import string

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHARACTERS = list(string.printable[:95]) + ["\n"]  # printable ASCII (digits, letters, punctuation, space)

# Every turn is <|role|>content<|end|>; the generation prompt is <|assistant|>. <|end|> is EOS, so
# generation stops where an assistant turn ends and the rendered prompt is a prefix of prompt+response.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` with a chat template; save it with save_pretrained."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="<|end|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, *, hidden_size: int = 128, layers: int = 2, heads: int = 4, seed: int = 0,
                     max_positions: int = 256, pad_token_id: int | None = None):
    """A randomly initialised LlamaForCausalLM sized for CPU tests (0.54M parameters by default);
    ``pad_token_id`` defaults to the tokenizer's."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id if pad_token_id is None else pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = model.config.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
