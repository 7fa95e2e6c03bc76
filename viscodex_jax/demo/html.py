"""The report as a list of blocks, written once as a self-contained HTML page and once as Markdown.

One list of blocks feeds both formats, so report.md and report.html cannot say different things.
HTML embeds every image as a ``data:`` URI: the page is one file that opens anywhere (mailed,
copied off the run machine, attached to an issue) without a folder of images next to it. The
Markdown, which cannot embed images portably, links the same PNGs by their path relative to the
report (they are kept under ``report_files/``).
"""

from __future__ import annotations

import base64
import dataclasses
import html
import os
import re
from typing import Sequence, Union

Cell = Union[str, int, float, None]


@dataclasses.dataclass
class Heading:
    text: str
    level: int = 2


@dataclasses.dataclass
class Para:
    text: str
    strong: bool = False  # a finding the reader should not miss


@dataclasses.dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    caption: str = ""
    numeric: Sequence[bool] = ()  # per column: right-aligned (default: guessed from the first row)


@dataclasses.dataclass
class Image:
    path: str  # a PNG on disk
    alt: str
    width: int = 0  # CSS pixels; 0: natural size (capped to the page)


@dataclasses.dataclass
class Tile:
    """One picture of a side-by-side row: a caption and a PNG, or a note when there is no picture."""

    caption: str
    path: str | None = None
    note: str = ""


@dataclasses.dataclass
class SideBySide:
    title: str
    tiles: Sequence[Tile]
    code: Sequence[tuple[str, str]] = ()  # (summary, code) shown folded


@dataclasses.dataclass
class Details:
    summary: str
    blocks: Sequence["Block"]


Block = Union[Heading, Para, Table, Image, SideBySide, Details]

CSS = """
body{font-family:system-ui,sans-serif;max-width:1200px;margin:24px auto;padding:0 16px;color:#222;line-height:1.45}
h1{margin-bottom:4px} h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:10px 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top} th{background:#f2f4f7;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums} caption{caption-side:bottom;font-size:12px;color:#666}
.card{border:1px solid #ddd;border-radius:6px;padding:10px;margin:12px 0}
.tiles{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0;text-align:center}
figure img{border:1px solid #eee;max-width:300px} figcaption{font-size:13px;color:#444}
.note{width:224px;height:224px;display:flex;align-items:center;justify-content:center;background:#f6f6f6;
 color:#888;font-size:13px;border:1px dashed #ccc}
img.wide{max-width:100%} p.strong{background:#fff8e1;border-left:4px solid #f0b400;padding:8px 12px}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:360px;font-size:12px}
"""


def data_uri(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def fmt(v: Cell, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _numeric(t: Table) -> list[bool]:
    if t.numeric:
        return list(t.numeric)
    first = t.rows[0] if t.rows else []
    return [isinstance(v, (int, float)) and not isinstance(v, bool) for v in first] + [False] * len(t.header)


# ------------------------------------------------------------------------------------------------ HTML

def _e(s: str) -> str:
    return html.escape(str(s), quote=True)


def _html_table(t: Table) -> str:
    num = _numeric(t)
    head = "".join(f"<th>{_e(h)}</th>" for h in t.header)
    body = "".join("<tr>" + "".join(f"<td class='num'>{_e(fmt(v))}</td>" if num[i] else f"<td>{_e(fmt(v))}</td>"
                                    for i, v in enumerate(r)) + "</tr>" for r in t.rows)
    cap = f"<caption>{_e(t.caption)}</caption>" if t.caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_tile(t: Tile) -> str:
    inner = (f"<img src='{data_uri(t.path)}' alt='{_e(t.caption)}' width='224'>" if t.path
             else f"<div class='note'>{_e(t.note or 'no image')}</div>")
    return f"<figure>{inner}<figcaption>{_e(t.caption)}</figcaption></figure>"


def _html(b: Block) -> str:
    if isinstance(b, Heading):
        return f"<h{b.level}>{_e(b.text)}</h{b.level}>"
    if isinstance(b, Para):
        return f"<p class='strong'>{_e(b.text)}</p>" if b.strong else f"<p>{_e(b.text)}</p>"
    if isinstance(b, Table):
        return _html_table(b)
    if isinstance(b, Image):
        w = f" width='{b.width}'" if b.width else ""
        return f"<p><img class='wide' src='{data_uri(b.path)}' alt='{_e(b.alt)}'{w}></p>"
    if isinstance(b, SideBySide):
        code = "".join(f"<details><summary>{_e(s)}</summary><pre>{_e(c)}</pre></details>" for s, c in b.code)
        tiles = "".join(_html_tile(t) for t in b.tiles)
        return f"<div class='card'><b>{_e(b.title)}</b><div class='tiles'>{tiles}</div>{code}</div>"
    if isinstance(b, Details):
        return f"<details><summary>{_e(b.summary)}</summary>" + "".join(_html(x) for x in b.blocks) + "</details>"
    raise TypeError(f"not a report block: {type(b).__name__}")


def to_html(title: str, blocks: Sequence[Block]) -> str:
    body = "\n".join(_html(b) for b in blocks)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>\n<h1>{_e(title)}</h1>\n{body}\n</body></html>\n")


# ------------------------------------------------------------------------------------------------ Markdown

def _md_cell(v: Cell) -> str:
    return fmt(v).replace("|", "\\|").replace("\n", " ")


def _md_table(t: Table) -> str:
    num = _numeric(t)
    lines = ["| " + " | ".join(_md_cell(h) for h in t.header) + " |",
             "|" + "|".join("---:" if num[i] else "---" for i in range(len(t.header))) + "|"]
    lines += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in t.rows]
    return "\n".join(lines) + (f"\n\n*{t.caption}*" if t.caption else "")


def fence(text: str) -> str:
    """A code fence longer than any backtick run in ``text`` (model answers carry their own fences)."""
    return "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))


def _md(b: Block, root: str) -> str:
    rel = lambda p: os.path.relpath(p, root).replace(os.sep, "/")  # noqa: E731
    if isinstance(b, Heading):
        return "#" * b.level + " " + b.text
    if isinstance(b, Para):
        return f"**{b.text}**" if b.strong else b.text
    if isinstance(b, Table):
        return _md_table(b)
    if isinstance(b, Image):
        return f"![{b.alt}]({rel(b.path)})"
    if isinstance(b, SideBySide):
        out = [f"**{b.title}**", ""]
        out += [f"- {t.caption}: " + (f"![{t.caption}]({rel(t.path)})" if t.path else t.note or "no image")
                for t in b.tiles]
        for s, c in b.code:
            out += ["", f"<details><summary>{s}</summary>", "", fence(c), c.strip(), fence(c), "", "</details>"]
        return "\n".join(out)
    if isinstance(b, Details):
        inner = "\n\n".join(_md(x, root) for x in b.blocks)
        return f"<details><summary>{b.summary}</summary>\n\n{inner}\n\n</details>"
    raise TypeError(f"not a report block: {type(b).__name__}")


def to_markdown(title: str, blocks: Sequence[Block], root: str) -> str:
    """``root``: the folder the Markdown file lives in (image links are relative to it)."""
    return "\n\n".join([f"# {title}"] + [_md(b, root) for b in blocks]) + "\n"


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
