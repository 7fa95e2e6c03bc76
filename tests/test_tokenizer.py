"""Tests of viscodex_jax.data.tokenizer (the offline-built Qwen2.5-VL tokenizer).

Known ids come from the released Qwen2/2.5 tokenizer; the tiktoken parity test
checks the rebuilt merges against tiktoken's own BPE on the same ranks, which is
how the real Qwen tokenizer was converted too.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from transformers import AutoTokenizer

from viscodex_jax.data.tokenizer import (
    QWEN2_NUM_RANKS,
    QWEN2_PRETOKENIZE_REGEX,
    QWEN2_VL_CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    build_qwen2_tokenizer,
    qwen_tiktoken_path,
    save_tokenizer,
    special_token_ids,
)

SMALL_N = 4096

# The real ids from Qwen2.5-VL-7B-Instruct's tokenizer_config.json.
REAL_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646,
    "<|object_ref_end|>": 151647,
    "<|box_start|>": 151648,
    "<|box_end|>": 151649,
    "<|quad_start|>": 151650,
    "<|quad_end|>": 151651,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
    "<tool_call>": 151657,
    "</tool_call>": 151658,
    "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660,
    "<|fim_suffix|>": 151661,
    "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663,
    "<|file_sep|>": 151664,
}

# All NFC already, so decode(encode(x)) must give x back byte for byte.
ROUND_TRIP_TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 3.14159; }",
    "<div class=\"x\">&nbsp;</div>\r\n<!-- comment -->",
    "中文测试：你好，世界！日本語のテキスト。한국어 텍스트.",
    "emoji 😀🎉 family 👨‍👩‍👧‍👦 flag 🇯🇵 skin 👍🏽 keycap 1️⃣",
    "multiple   spaces     and\n\n\n\nnewlines\t\ttabs   \n  trailing   ",
    "   leading spaces",
    "Ünïcödé façade naïve café Ελληνικά русский العربية हिन्दी",
    "numbers 1234567890 and 3.14e-10 and 0x1F",
    "",
    " ",
    "\n",
]


@pytest.fixture(scope="module")
def tok():
    return build_qwen2_tokenizer()


@pytest.fixture(scope="module")
def small():
    return build_qwen2_tokenizer(SMALL_N)


@pytest.fixture(scope="module")
def saved_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen_tok")
    save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def reloaded(saved_dir):
    return AutoTokenizer.from_pretrained(str(saved_dir))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- full tokenizer -------------------------------------------------------------


def test_known_ids(tok):
    assert _ids(tok, "Hello, world!") == [9707, 11, 1879, 0]
    # Qwen2 splits digits one by one (\p{N}); GPT-4's regex would group "123".
    assert _ids(tok, "12345") == [16, 17, 18, 19, 20]
    assert tok.vocab_size == QWEN2_NUM_RANKS
    assert len(tok) == QWEN2_NUM_RANKS + len(SPECIAL_TOKENS) == 151665


def test_no_bos_or_eos_added(tok):
    # Qwen adds nothing around the text; the chat template supplies the markers.
    assert tok("Hello")["input_ids"] == _ids(tok, "Hello")
    assert tok.bos_token is None


def test_nfc_normalisation(tok):
    decomposed = "cafe\u0301"  # e + combining acute accent
    composed = "caf\u00e9"
    assert decomposed != composed
    assert _ids(tok, decomposed) == _ids(tok, composed)
    assert tok.decode(_ids(tok, decomposed)) == composed


def test_special_token_ids_are_real(tok):
    assert {content: tok.convert_tokens_to_ids(content) for content in REAL_SPECIAL_IDS} == REAL_SPECIAL_IDS
    ids = special_token_ids(tok)
    assert ids["image_pad"] == 151655
    assert ids["video_pad"] == 151656
    assert ids["vision_start"] == 151652
    assert ids["vision_end"] == 151653
    assert ids["im_start"] == 151644
    assert ids["im_end"] == 151645
    assert ids["endoftext"] == 151643
    assert ids["tool_call"] == 151657 and ids["tool_call_end"] == 151658
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643


@pytest.mark.parametrize("content", list(REAL_SPECIAL_IDS))
def test_special_tokens_not_split(tok, content):
    assert _ids(tok, content) == [REAL_SPECIAL_IDS[content]]
    ids = _ids(tok, f"ab{content}cd")
    assert ids.count(REAL_SPECIAL_IDS[content]) == 1
    assert tok.decode(ids) == f"ab{content}cd"


def test_skip_special_tokens_matches_qwen(tok):
    # Tool-call / FIM markers are added but not "special" in Qwen's config, so
    # skip_special_tokens must keep them while dropping the chat markers.
    ids = _ids(tok, "<|im_start|>hi<tool_call>x</tool_call><|fim_pad|><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "hi<tool_call>x</tool_call><|fim_pad|>"


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tok, text):
    assert unicodedata.normalize("NFC", text) == text
    ids = _ids(tok, text)
    assert all(0 <= i < QWEN2_NUM_RANKS for i in ids)
    assert tok.decode(ids) == text


def test_matches_tiktoken(tok):
    tiktoken = pytest.importorskip("tiktoken")
    from tiktoken.load import load_tiktoken_bpe

    enc = tiktoken.Encoding(
        "qwen",
        pat_str=QWEN2_PRETOKENIZE_REGEX,
        mergeable_ranks=load_tiktoken_bpe(str(qwen_tiktoken_path())),
        special_tokens={},
    )
    source = open(__file__, encoding="utf-8").read()
    for content in REAL_SPECIAL_IDS:  # tiktoken's encode_ordinary knows no added tokens
        source = source.replace(content, "")
    texts = ROUND_TRIP_TEXTS + [source, "The quick brown fox's jumps weren't THAT'LL high 😀" * 3]
    for text in texts:
        assert _ids(tok, text) == enc.encode_ordinary(text), text[:60]


def test_chat_template_with_image(tok):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = _ids(tok, prompt)
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> "system" "\n"
    assert ids.count(151655) == 1


def test_chat_template_string_content_and_system(tok):
    messages = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    prompt = tok.apply_chat_template(messages, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )


def test_builds_are_independent(tok):
    other = build_qwen2_tokenizer()
    assert other is not tok
    other.add_tokens(["<my_new_token>"])
    assert len(other) == len(tok) + 1
    assert len(build_qwen2_tokenizer()) == len(tok)


@pytest.mark.parametrize("bad", [0, 255, QWEN2_NUM_RANKS + 1])
def test_rejects_bad_num_ranks(bad):
    with pytest.raises(ValueError):
        build_qwen2_tokenizer(bad)


# --- save / reload --------------------------------------------------------------


def test_saved_files(saved_dir, tok):
    names = {p.name for p in saved_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt"} <= names

    config = json.loads((saved_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["chat_template"] == QWEN2_VL_CHAT_TEMPLATE
    assert (saved_dir / "chat_template.jinja").read_text(encoding="utf-8") == QWEN2_VL_CHAT_TEMPLATE
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["bos_token"] is None
    assert config["model_max_length"] == 131072
    assert config["clean_up_tokenization_spaces"] is False
    assert config["split_special_tokens"] is False
    assert config["errors"] == "replace"
    decoder = config["added_tokens_decoder"]
    assert {v["content"]: int(k) for k, v in decoder.items()} == REAL_SPECIAL_IDS
    assert decoder["151655"]["special"] is True and decoder["151657"]["special"] is False
    assert config["additional_special_tokens"][0] == "<|im_start|>"
    assert "<tool_call>" not in config["additional_special_tokens"]

    tj = json.loads((saved_dir / "tokenizer.json").read_text(encoding="utf-8"))
    assert tj["normalizer"] == {"type": "NFC"}
    assert tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == QWEN2_PRETOKENIZE_REGEX
    assert tj["post_processor"]["type"] == "ByteLevel"
    assert len(tj["model"]["vocab"]) == QWEN2_NUM_RANKS
    # One merge per non-byte token, like Qwen's merges.txt.
    assert len(tj["model"]["merges"]) == QWEN2_NUM_RANKS - 256
    assert {t["content"]: t["id"] for t in tj["added_tokens"]} == REAL_SPECIAL_IDS

    merges = (saved_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0] == "#version: 0.2"
    assert merges[1:4] == ["Ġ Ġ", "ĠĠ ĠĠ", "i n"]
    assert len(merges) == 1 + QWEN2_NUM_RANKS - 256
    vocab = json.loads((saved_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["Hello"] == 9707 and len(vocab) == QWEN2_NUM_RANKS


def test_reload_gives_same_ids(reloaded, tok):
    assert len(reloaded) == len(tok)
    assert special_token_ids(reloaded) == special_token_ids(tok)
    assert reloaded.eos_token_id == 151645 and reloaded.pad_token_id == 151643
    texts = ROUND_TRIP_TEXTS + ["<|vision_start|><|image_pad|><|vision_end|>Describe<tool_call>"]
    for text in texts:
        assert reloaded(text)["input_ids"] == tok(text)["input_ids"], text
        assert reloaded.decode(_ids(reloaded, text)) == text


def test_reload_chat_template(reloaded, tok):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe"}]}
    ]
    a = reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    b = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert a == b
    assert "<|vision_start|><|image_pad|><|vision_end|>Describe" in a


# --- small-vocab variant ----------------------------------------------------------


def test_small_vocab_sizes_and_specials(small):
    assert small.vocab_size == SMALL_N
    assert len(small) == SMALL_N + len(SPECIAL_TOKENS)
    ids = special_token_ids(small)
    assert list(ids.values()) == list(range(SMALL_N, SMALL_N + len(SPECIAL_TOKENS)))
    assert [name for name, _, _ in SPECIAL_TOKENS] == list(ids)
    assert ids["image_pad"] == SMALL_N + 12
    assert small.eos_token_id == ids["im_end"] and small.pad_token_id == ids["endoftext"]
    assert _ids(small, "<|image_pad|>") == [ids["image_pad"]]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_small_vocab_round_trip(small, text):
    ids = _ids(small, text)
    assert all(0 <= i < SMALL_N for i in ids)
    assert small.decode(ids) == text


def test_small_vocab_is_prefix_of_full(small, tok):
    # Same token strings at the same ids, so a tiny model's ids mean the same thing.
    full_vocab = tok.get_vocab()
    small_vocab = {k: v for k, v in small.get_vocab().items() if v < SMALL_N}
    assert len(small_vocab) == SMALL_N
    assert all(full_vocab[k] == v for k, v in small_vocab.items())
    # Common short words stay single tokens; rarer ones are split further.
    assert _ids(small, "Hello, world!")[-3:] == [11, 1879, 0]  # ",", " world", "!"
    assert len(_ids(small, "Hello")) > 1  # "Hello" is rank 9707 >= SMALL_N
    assert len(_ids(small, "tokenization internationalisation")) > len(
        _ids(tok, "tokenization internationalisation")
    )


def test_small_vocab_is_valid_bpe(small):
    model = json.loads(small.backend_tokenizer.to_str())["model"]
    vocab, merges = model["vocab"], model["merges"]
    assert len(merges) == SMALL_N - 256
    for i, merge in enumerate(merges):
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        rank = 256 + i
        assert vocab[left + right] == rank
        assert vocab[left] < rank and vocab[right] < rank


def test_small_vocab_save_reload(small, tmp_path):
    save_tokenizer(small, tmp_path)
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(reloaded) == len(small)
    assert special_token_ids(reloaded) == special_token_ids(small)
    for text in ROUND_TRIP_TEXTS + ["<|im_start|>user\n<|image_pad|>hi<|im_end|>"]:
        assert reloaded(text)["input_ids"] == small(text)["input_ids"], text
