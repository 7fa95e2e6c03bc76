"""Between token ids and text for the samplers: which ids end a row, which pads it, and a row's text."""

from __future__ import annotations

from typing import Any, Sequence


def eos_and_pad(tokenizer: Any) -> tuple[list[int], int]:
    """(EOS ids: the tokenizer's EOS and ``<|endoftext|>``, sorted; the pad id, the first EOS when unset)."""
    eos = sorted({i for i in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>"))
                  if i is not None})
    return eos, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]


def row_text(tokenizer: Any, row: Sequence[int], eos: Sequence[int]) -> str:
    """The text of one generated row, cut before its first EOS."""
    row = [int(t) for t in row]
    for i, t in enumerate(row):
        if t in eos:
            row = row[:i]
            break
    return tokenizer.decode(row, skip_special_tokens=True)
