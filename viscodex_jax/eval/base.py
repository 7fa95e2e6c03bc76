"""What every benchmark module provides, so ``launch/eval.py`` can run any subset.

A benchmark reads its own published layout (so a user can point at the real
download), turns each item into a chat prompt with images, and scores a
generation. Generated code is executed only through ``eval.sandbox``. Its class
also declares what the launcher, the reports and the paper table need from it
(``flags``, ``columns``, ``folder_aliases``); ``eval.registry`` names the classes.
"""

from __future__ import annotations

import abc
import dataclasses
import re
from typing import Any, Mapping, Sequence


@dataclasses.dataclass
class Item:
    """One benchmark item: the prompt (chat messages, images in order) and what scoring needs."""

    id: str
    messages: list[dict[str, Any]]
    images: list[Any]  # PIL images, in the order of the {"type": "image"} entries
    reference: Any


@dataclasses.dataclass(frozen=True)
class UnreadableItem:
    """``Item.reference`` of an item its loader could not read (``on_error="skip"``): never generated,
    scored 0 with ``reason`` (which names the file and record)."""

    reason: str


@dataclasses.dataclass(frozen=True)
class Flag:
    """A ``launch/eval.py --<name>`` flag a benchmark reads besides its data root; ``kind`` is absl's
    ``DEFINE_<kind>`` (string, integer, float, bool)."""

    name: str
    default: Any
    help: str
    kind: str = "string"


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of the paper-style table: ``key`` as in ``paper.RESULTS``, the header ``label``, and the
    aggregate ``metric`` our row shows there times ``scale`` (None: a column only the paper fills, e.g. a
    GPT-4o-judged score we do not compute)."""

    key: str
    label: str
    metric: str | None = "score"
    scale: float = 1.0


class Benchmark(abc.ABC):
    """A benchmark: ``load`` items from its published layout, ``score`` one generation, ``aggregate``.

    Declared per class, read by ``eval.registry``: ``flags`` (launch flags besides ``--<name>_root``, handed
    to the constructor by ``options``), ``columns`` (its paper-table columns; default one, its ``score``
    under its name), ``root_help`` (what ``--<name>_root`` points at), ``folder_aliases`` (other folder
    names ``--check_against`` recognises it by).
    """

    name: str = ""
    flags: tuple[Flag, ...] = ()
    columns: tuple[Column, ...] = ()
    root_help: str = "its published layout"
    folder_aliases: tuple[str, ...] = ()

    @classmethod
    def table_columns(cls) -> tuple[Column, ...]:
        return cls.columns or (Column(cls.name, cls.name),)

    @classmethod
    def options(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor keywords from the launch flags' values: each declared flag that is set, by its name."""
        return {f.name: values[f.name] for f in cls.flags if values.get(f.name) is not None}

    @abc.abstractmethod
    def load(self, root: str, limit: int | None = None) -> list[Item]:
        """Reads items from ``root`` (the benchmark's own layout)."""

    @abc.abstractmethod
    def score(self, item: Item, generation: str) -> dict[str, float]:
        """Per-item metrics; always includes ``"score"`` on the benchmark's reported scale."""

    def aggregate(self, rows: Sequence[dict[str, float]], num_samples: int = 1) -> dict[str, float]:
        """Mean of every metric over items (benchmarks with other rules override). ``num_samples``: samples
        generated per item (rows of one item share its ``id``), for rules such as pass@k."""
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
