"""What the real recipe needs: the per-chip memory of the 8B and 33B SFT steps, as compile_check measured it.

The demo never compiles for TPU (minutes per program). It reads the table that
``benchmarks/compile_check.py`` produced and that is committed in ``benchmarks/RESULTS.md`` under
``## compile_check`` (the JSON it writes goes to ``runs/``, which is not committed).
"""

from __future__ import annotations

import os
from typing import Any

RESULTS_MD = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "benchmarks", "RESULTS.md")
HEADING = "## compile_check"
PRESETS = {"viscodex_8b": "8B", "viscodex_33b": "33B"}
# (column in RESULTS.md, column in the report)
COLUMNS = (("slice", "slice"), ("chips", "chips"), ("rows/chip", "rows/chip"), ("tokens/chip", "tokens/chip"),
           ("accum", "grad accum"), ("remat", "remat"), ("peak GiB per chip", "peak GiB/chip"),
           ("HBM GiB", "HBM GiB/chip"), ("fits 90%", "fits in 90% of HBM"))
HOW_TO_MAKE = ("benchmarks/compile_check.py (needs .venv-tpu with libtpu; CPU only, ~1-6 min per program): "
               "its Markdown table goes under '## compile_check' in benchmarks/RESULTS.md")


class TableError(ValueError):
    pass


def _cells(line: str) -> list[str]:
    return [c.strip().replace("**", "") for c in line.strip().strip("|").split("|")]


def read_compile_check(path: str = RESULTS_MD) -> dict[str, Any]:
    """{"source", "note", "header", "rows"}: the train-step rows of the 8B and 33B presets, in the file's order.

    Raises ``FileNotFoundError`` without the file and ``TableError`` naming the file when the section or
    one of the expected columns is missing (a format drift the report must not hide).
    """
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    try:
        start = next(i for i, ln in enumerate(lines) if ln.strip() == HEADING)
    except StopIteration:
        raise TableError(f"{path}: no '{HEADING}' section") from None
    note, table = "", []
    for ln in lines[start + 1:]:
        if ln.startswith("#"):
            break
        if ln.startswith("|"):
            table.append(ln)
        elif table:
            break  # the first table of the section only
        elif ln.strip() and not note:
            note = ln.strip()
    if len(table) < 3:
        raise TableError(f"{path}: '{HEADING}' has no table with rows")
    header = _cells(table[0])
    need = ("program", "config") + tuple(c for c, _ in COLUMNS)
    missing = [c for c in need if c not in header]
    if missing:
        raise TableError(f"{path}: the '{HEADING}' table lacks column(s) {missing}; it has {header}")
    idx = {c: header.index(c) for c in need}
    rows = []
    for ln in table[2:]:
        cells = _cells(ln)
        if len(cells) != len(header) or cells[idx["program"]] != "train":
            continue
        config = cells[idx["config"]]
        preset = next((label for key, label in PRESETS.items() if key in config), None)
        if preset is None:
            continue
        rows.append([preset, config.split(":")[-1]] + [cells[idx[c]] for c, _ in COLUMNS])
    return {"source": os.path.relpath(path, os.path.dirname(os.path.dirname(path))), "note": note,
            "header": ["model", "preset"] + [label for _, label in COLUMNS], "rows": rows}
