"""Offline stand-ins for three real tokenizer families, each with a tiny random Llama model beside it.

The project's own proving ground uses a character tokenizer whose chat template makes every turn a
clean concatenation. Real checkpoints are less polite, and these fixtures copy the parts that bite:

``sentencepiece_llama`` (Llama-2 / Mistral / Zephyr; loads as transformers' ``LlamaTokenizer``)
    SentencePiece-style BPE (Metaspace "▁", prepend_scheme "first", byte fallback to <0x00>..<0xFF>, so
    "\n" is <0x0A> and emoji are bytes), <unk>=0 <s>=1 </s>=2, BOS added by the post-processor
    ("<s> $A"), no pad token, padding_side "left" (LlamaTokenizer's class default in transformers 5), and
    the Zephyr template: role markers such as "<|assistant|>" are plain text, "</s>" ends a turn, no BOS
    in the text. "Hello" alone encodes as "▁Hello" but after "<|assistant|>\n" it does not: a response
    tokenized on its own is not the response's tokens in context. Decoding drops the dummy prefix's
    space, so a text that starts with a space comes back with one fewer.
``chatml_bpe`` (Qwen2 / Qwen2.5; loads as ``Qwen2Tokenizer``)
    Byte-level BPE with Qwen2's pre-tokenizer regex (one digit per token) and NFC normalizer;
    <|endoftext|> is EOS and pad, <|im_start|>/<|im_end|> are special, no BOS; ChatML with Qwen's
    default system prompt; the generation config stops on [<|im_end|>, <|endoftext|>]. "\n\n" is one
    token, so a response starting with "\n" merges with the prompt's final "\n".
``llama3`` (Llama-3 / 3.1; tokenizer_class "PreTrainedTokenizerFast", loads as ``TokenizersBackend``)
    Byte-level BPE with Llama-3's regex (digits in groups of up to three), <|begin_of_text|> as BOS both
    in the template text and from the post-processor (so tokenizing the rendered text with
    add_special_tokens=True doubles it), <|end_of_text|> as the tokenizer's EOS, <|eot_id|> ending a
    turn (special, but not in ``all_special_tokens``), no pad; the generation config stops on
    [<|end_of_text|>, <|eot_id|>].

In transformers 5 a tokenizer loaded from a folder with a tokenizer.json takes BOS/EOS insertion from
that file's post-processor alone, and ``tokenizer.add_bos_token`` then reads False for all three even
where BOS is added: ask the tokenizer (encode something) rather than the flag.

Vocabularies are trained in code (milliseconds) on ``CORPUS``; nothing touches the Hub.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

FAMILIES = ("sentencepiece_llama", "chatml_bpe", "llama3")
END_OF_TURN = {"sentencepiece_llama": "</s>", "chatml_bpe": "<|im_end|>", "llama3": "<|eot_id|>"}

ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2's and Llama-3's pre-tokenizer regexes, as in their tokenizer.json files.
QWEN2_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
LLAMA3_SPLIT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
# Llama-3's first ten special tokens, in its order (<|eot_id|> is the tenth).
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
]

CONVERSATIONS: list[list[dict[str, str]]] = [
    [
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "12 + 7 = 19."},
    ],
    [
        {"role": "system", "content": "You are a careful calculator. Answer with digits."},
        {"role": "user", "content": "What is 345 * 2?"},
        {"role": "assistant", "content": "690"},
    ],
    [
        {"role": "user", "content": "Hello! Can you count to five?"},
        {"role": "assistant", "content": "1, 2, 3, 4, 5."},
        {"role": "user", "content": "Now backwards, one per line."},
        {"role": "assistant", "content": "5\n4\n3\n2\n1"},
    ],
    [
        {"role": "system", "content": "Réponds en français, s'il te plaît."},
        {"role": "user", "content": "Is a café naïve? 日本 🙂"},
        {"role": "assistant", "content": "Un café n'est pas naïf. 日本は島国です。 🎉"},
    ],
    [
        {"role": "user", "content": "  Indented question with trailing spaces?  "},
        {"role": "assistant", "content": " Leading space, trailing newline.\n"},
    ],
    [
        {"role": "user", "content": "List two colours, one per line."},
        {"role": "assistant", "content": "\n- red\n- blue"},
    ],
    [
        {"role": "user", "content": "\nStarts with a newline\n\nand has a blank line."},
        {"role": "assistant", "content": "\n\nTwo newlines first, then text; ends with spaces   "},
        {"role": "user", "content": "What is 1000 - 1?"},
        {"role": "assistant", "content": "999"},
    ],
]


def _corpus() -> list[str]:
    """A few hundred short lines: arithmetic, prose, punctuation, newlines, a little unicode."""
    rng = random.Random(0)
    words = (
        "the a an is are was be to of and in that it for on with as at by this from or one two three "
        "answer question number sum total result hello world please thanks sure yes no maybe think step "
        "first then next finally because so therefore count add subtract multiply divide plus minus times "
        "equals value apple orange book river mountain city friend teacher student small large quick "
        "brown fox jumps over lazy dog assistant user system helpful careful calculator line text"
    ).split()
    lines = []
    for _ in range(120):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op, value = rng.choice([("+", a + b), ("-", a - b), ("*", a * b)])
        lines.append(f"What is {a} {op} {b}?")
        lines.append(rng.choice([f"{a} {op} {b} = {value}.", f"The answer is {value}.", f"{value}"]))
    for _ in range(120):
        n = rng.randint(3, 10)
        sentence = " ".join(rng.choice(words) for _ in range(n))
        lines.append(sentence.capitalize() + rng.choice([".", "!", "?", ",", ";", ":", "..."]))
    for _ in range(30):  # paragraphs, so that byte-level vocabularies learn "\n\n" as one token (as real ones do)
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"Question: what is {a} + {b}?\n\nAnswer: {a + b}.\n\n- checked\n- done")
    lines += [
        "Hello! How are you today?",
        "Hello, world.\nThis is a new line.\n\nAnd a blank one.",
        "Let's think step by step:\n1. First, add.\n2. Then, check.",
        "I'm sure it's fine; they're here, we've seen it, you'll see, he'd know.",
        '"Quoted" text, (parentheses), [brackets], {braces}, #hash, @at, $5, 50%, a & b, x/y, a_b.',
        "Un café, s'il vous plaît. C'est naïve, façade, déjà vu, Ångström, Straße.",
        "日本語のテキストです。東京は日本の首都です。",
        "Emoji: 🙂 🎉 👍 and a smile 😀.",
        "Tabs\tand  double  spaces   here.",
        "<|user|> and <|assistant|> look like markers here.",
    ]
    return lines


CORPUS = _corpus()


def _trained_bpe(core, vocab_size: int, *, special_tokens=(), initial_alphabet=()):
    """Train ``core`` (a tokenizers.Tokenizer with a BPE model) on CORPUS; (vocab dict, merges list)."""
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=list(initial_alphabet),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer=trainer)
    model = json.loads(core.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def _in_llama2_vocab(piece: str) -> bool:
    """Like Llama-2, leave newlines and characters outside the BMP (emoji) out of the vocabulary: they
    come back through byte fallback (<0x0A>, <0xF0><0x9F>...)."""
    return "\n" not in piece and all(ord(ch) < 0x10000 for ch in piece)


def _sentencepiece_llama():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaTokenizer

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # SentencePiece never merges across words: train with the split on "▁" (the tokenizer itself, like
    # transformers' LlamaTokenizer, runs Metaspace with split=False, which gives the same pieces).
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trained, merges = _trained_bpe(core, 700, special_tokens=["<unk>", "<s>", "</s>"])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for piece, _ in sorted(trained.items(), key=lambda item: item[1]):
        if piece not in vocab and _in_llama2_vocab(piece):
            vocab[piece] = len(vocab)
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    return LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        chat_template=ZEPHYR_TEMPLATE,
    )


def _byte_level_core(split_regex: str, *, nfc: bool, trim_offsets: bool = False):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    core = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    if nfc:
        core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=trim_offsets, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    return core


def _chatml_bpe():
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    core = _byte_level_core(QWEN2_SPLIT, nfc=True)
    vocab, merges = _trained_bpe(core, 600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=CHATML_TEMPLATE,
    )


def _llama3():
    from tokenizers import AddedToken, processors
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    core = _byte_level_core(LLAMA3_SPLIT, nfc=False, trim_offsets=True)
    _trained_bpe(core, 600, initial_alphabet=pre.ByteLevel.alphabet())
    core.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in LLAMA3_SPECIALS])
    bos = "<|begin_of_text|>"
    bos_id = core.token_to_id(bos)
    core.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        chat_template=LLAMA3_TEMPLATE,
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,  # the Hub's says True, which transformers 5 ignores (with a warning) for BPE
    )


_CONSTRUCTORS = {"sentencepiece_llama": _sentencepiece_llama, "chatml_bpe": _chatml_bpe, "llama3": _llama3}
# What generation stops on, as each family's generation_config.json lists it (Llama-2/Zephyr: a bare id).
GENERATION_EOS = {
    "sentencepiece_llama": ["</s>"],
    "chatml_bpe": ["<|im_end|>", "<|endoftext|>"],
    "llama3": ["<|end_of_text|>", "<|eot_id|>"],
}


def construct_tokenizer(family: str):
    """The family's tokenizer as constructed in memory, before any save/load round trip."""
    if family not in _CONSTRUCTORS:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {FAMILIES}")
    return _CONSTRUCTORS[family]()


def save_tokenizer(tokenizer, family: str, folder: Path) -> Path:
    """save_pretrained, then make tokenizer_config.json read like the family's Hub files."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if family == "sentencepiece_llama":
        # As Llama-2/Mistral write it. transformers 5 ignores add_bos_token/add_eos_token here whenever a
        # tokenizer.json exists (its post-processor decides), so this only documents.
        config.update(add_bos_token=True, add_eos_token=False, legacy=False)
    if family == "llama3":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"  # as on the Hub; loads as TokenizersBackend
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(family: str):
    """The family's ``PreTrainedTokenizerFast`` exactly as ``AutoTokenizer.from_pretrained`` gives it back.

    It is constructed, saved and reloaded (about 50 ms), so that it has the quirks a checkpoint on disk
    has (in transformers 5, e.g., ``add_bos_token`` reads False after loading, whatever BOS the
    post-processor adds).
    """
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        save_tokenizer(construct_tokenizer(family), family, Path(folder))
        return AutoTokenizer.from_pretrained(folder)


def generation_eos_ids(family: str, tokenizer) -> list[int]:
    """Ids of GENERATION_EOS[family] in ``tokenizer``."""
    return [tokenizer.convert_tokens_to_ids(token) for token in GENERATION_EOS[family]]


def build_family(
    family: str, folder: Path, *, hidden_size: int = 32, layers: int = 2, heads: int = 4, seed: int = 0
) -> Path:
    """Write the family's tokenizer and a tiny random LlamaForCausalLM to ``folder``; return ``folder``.

    ``folder`` then loads with AutoTokenizer / AutoModelForCausalLM.from_pretrained. Its
    generation_config.json stops on GENERATION_EOS[family] (a list for chatml_bpe and llama3, a bare id
    for sentencepiece_llama) and pads with the tokenizer's pad token or, where the family has none (the
    tokenizer's pad_token stays None), with the first end-of-sequence id.
    """
    from transformers import GenerationConfig

    from sparring.tasks.tiny import build_tiny_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = construct_tokenizer(family)
    eos_ids = generation_eos_ids(family, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    model = build_tiny_model(tokenizer, hidden_size=hidden_size, layers=layers, heads=heads, seed=seed,
                             max_positions=1024, pad_token_id=pad_id)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
        pad_token_id=pad_id,
    )
    save_tokenizer(tokenizer, family, folder)
    model.save_pretrained(folder)
    return folder


def teach_turns(folder: Path, conversations=None, *, steps: int = 60, lr: float = 1e-2) -> None:
    """A few steps of SFT on ``conversations`` (tokenized as sparring does), saved in place, so that the
    family's tiny model ends its turns with the template's end-of-turn token now and then."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparring.data import encode

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    seqs = []
    for conv in conversations or CONVERSATIONS:
        try:
            p, r = encode(tok, conv[:-1], conv[-1]["content"])
        except ValueError:  # not a token prefix in this family (e.g. ChatML and a leading newline)
            continue
        seqs.append(torch.tensor([p + r]))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for step in range(steps):
        x = seqs[step % len(seqs)]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(folder)
