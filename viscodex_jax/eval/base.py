"""What every benchmark module provides, so ``launch/eval.py`` can run any subset.

A benchmark reads its own published layout (so a user can point at the real
download), turns each item into a chat prompt with images, and scores a
generation. Generated code is executed only through ``eval.sandbox``.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, Sequence


@dataclasses.dataclass
class Item:
    """One benchmark item: the prompt (chat messages, images in order) and what scoring needs."""

    id: str
    messages: list[dict[str, Any]]
    images: list[Any]  # PIL images, in the order of the {"type": "image"} entries
    reference: Any


class Benchmark(abc.ABC):
    """A benchmark: ``load`` items from its published layout, ``score`` one generation, ``aggregate``."""

    name: str = ""

    @abc.abstractmethod
    def load(self, root: str, limit: int | None = None) -> list[Item]:
        """Reads items from ``root`` (the benchmark's own layout)."""

    @abc.abstractmethod
    def score(self, item: Item, generation: str) -> dict[str, float]:
        """Per-item metrics; always includes ``"score"`` on the benchmark's reported scale."""

    def aggregate(self, rows: Sequence[dict[str, float]]) -> dict[str, float]:
        """Mean of every metric over items (benchmarks with other rules override)."""
        keys = sorted({k for r in rows for k in r if isinstance(r[k], (int, float))})
        return {k: float(sum(r.get(k, 0.0) for r in rows) / max(len(rows), 1)) for k in keys}

    @staticmethod
    @abc.abstractmethod
    def make_sample(out_dir: str) -> str:
        """Writes a few items in the published layout (for tests and the demo); returns the root."""


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.S)


def extract_code(text: str, languages: Sequence[str] = ("python", "py", "")) -> str:
    """The last fenced code block in a wanted language, else the last block, else the whole text.

    Models often explain before the code; the final block is the answer.
    """
    blocks = _FENCE.findall(text)
    wanted = [code for lang, code in blocks if lang.lower() in languages]
    if wanted:
        return wanted[-1]
    if blocks:
        return blocks[-1][1]
    # an unterminated fence (generation cut by max_new_tokens): take what follows it
    m = re.search(r"```[ \t]*[A-Za-z0-9_+-]*[^\n]*\n(.*)$", text, re.S)
    return m.group(1) if m else text
