"""Design2Code's official low-level metrics, step by step as ``metrics/visual_score.py`` computes them.

Reference: github.com/NoviScl/Design2Code (scored through the fork JackLingjie/Design2Code at
84bb5f1, whose ``visual_eval_v3_multi`` imports); files ``prompting/gpt4v_utils.py``
(``cleanup_response``), ``data_utils/dedup_post_gen.py`` (the repetition check),
``metrics/ocr_free_utils.py`` (text blocks) and ``metrics/visual_score.py`` (pre-processing,
matching, scores). Re-written here from reading them; the behaviours kept on purpose, odd ones
included, because the published numbers include them:

* ``cleanup_response``: a leading/trailing triple backtick and a leading ``html`` are stripped,
  then everything before the first ``<!DOCTYPE`` and after the first ``</html>``. Prose before
  an ``<html>`` without a doctype stays in the page as text.
* Only the prediction is pre-processed. ``check_repetitive_content`` removes tags with
  ``<.*?>`` (one line at a time, so CSS and multi-line tags stay) and cuts the file where a
  100-character chunk is >= 0.8 similar to an earlier one for the 5th time. A large inline
  stylesheet counts as repetition: the cut then lands inside ``<style>``, the page has no body
  and no block, and scores 0 on every metric (kept: the official numbers are 0 there).
  The cut position mixes text-without-tags and file offsets as the official code does.
* A prediction without an ``<html...>`` tag is wrapped into ``<html><body><p>...</p></body></html>``;
  BeautifulSoup (``html.parser``) re-serialises it and drops every element whose serialisation
  occurs more than 50 times.
* Text blocks (OCR-free): the page is re-styled twice (every element's background transparent;
  each of ``p h1-h6 div span a b li table td th button footer header figcaption`` gets its own
  text colour from a 16-level colour grid, the second copy offset by 50); the pixels whose
  colour moved by 50 (+-8 per channel) are text. Each text node of ``<body>`` (stripped, lower-cased,
  ``<script>``/``<style>`` contents included) takes the colour of its nearest ancestor whose
  ``style`` attribute names a colour; its block is the bounding box of the text pixels within
  +-4 of that colour, and its colour the mean (truncated to integers) of those pixels in the
  page's plain screenshot. Text nodes of one element share one box; blocks with equal boxes
  are merged (texts joined with a space, colours averaged). Colours a channel of which is < 4
  or > 251 find no pixel (the official ``uint8`` bounds wrap around).
* Matching: cost = -``SequenceMatcher(None, pred, ref).ratio()`` (default ``autojunk``, prediction
  first); consecutive blocks of either page are merged while a merge raises the
  "difference of means" of the matched costs by more than 0.05 (all improving merges of a pass
  at once, best first, non-overlapping); the final Hungarian matching adds a context bonus
  (0.1 x the two best neighbouring costs in a 3x3 window, for costs below -0.5); pairs under
  0.5 text similarity are dropped.
* Scores: block_match = matched area of both pages over all blocks' area; text, position
  (``1 - max(|dx|, |dy|)`` of the centres) and color (CIEDE2000, ``max(0, 1 - dE/100)``) are
  means over the matched pairs; 0 everywhere when a page has no block or nothing matches.
* A page that does not render is a blank white 1280x960 image (official ``screenshot_single.py``):
  no block, so 0, and CLIP is taken on that blank image.
* Where the official code would crash on one pair (a ``style`` colour declaration without ``:``,
  an empty colour value) we read "no colour" instead; more than 4096 text elements raise
  ``ValueError`` as the official colour pool does. The reference page is never pre-processed.
* CLIP: text boxes are inpainted (OpenCV Telea, radius 3) on each screenshot, the image is
  resized to a square of its shorter side (Lanczos), then the CLIP image pre-processing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import difflib
import re
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "cleanup_response", "repetition_cut", "pre_process", "restyle", "text_items", "blocks_from_renders",
    "merge_by_bbox", "Block", "official_scores", "TEXT_TAGS", "BLANK_SIZE", "page_blocks",
]

TEXT_TAGS = ("p", "h1", "h2", "h3", "h4", "h5", "h6", "div", "span", "a", "b", "li", "table", "td", "th",
             "button", "footer", "header", "figcaption")
BLANK_SIZE = (1280, 960)  # the white image official screenshot_single.py saves when a page fails
METRICS = ("block_match", "text", "position", "color")


@dataclasses.dataclass
class Block:
    text: str
    bbox: tuple[float, float, float, float]  # x, y, w, h as fractions of the page's width/height
    color: tuple  # RGB 0..255 (ints from pixels; floats once averaged)


# -- response and pre-processing ---------------------------------------------------------------------

def cleanup_response(response: str) -> str:
    """``gpt4v_utils.cleanup_response``: fences, a leading ``html``, text before ``<!DOCTYPE``/after ``</html>``."""
    r = response or ""
    if r[:3] == "```":
        r = r[3:].strip()
    if r[-3:] == "```":
        r = r[:-3].strip()
    if r[:4] == "html":
        r = r[4:].strip()
    if "<!DOCTYPE" in r:
        r = "<!DOCTYPE" + r.split("<!DOCTYPE", 1)[1]
    if "</html>" in r:
        r = r.split("</html>")[0] + "</html>"
    return r


def _char_hist(chunks: Sequence[str]) -> np.ndarray:
    alphabet = {c: k for k, c in enumerate(sorted(set("".join(chunks))))}
    h = np.zeros((len(chunks), max(len(alphabet), 1)), np.int32)
    for i, ch in enumerate(chunks):
        for c, n in collections.Counter(ch).items():
            h[i, alphabet[c]] = n
    return h


def repetition_cut(content: str, chunk_size: int = 100, repeats: int = 5, threshold: float = 0.8) -> int | None:
    """Where ``check_repetitive_content`` cuts ``content`` (None: not cut).

    Exactly the official rule (first similar earlier chunk in insertion order, >= ``threshold``);
    the character-count bound ``quick_ratio`` only skips chunks that cannot reach it.
    """
    clean = re.sub("<.*?>", "", content)
    pos_map = []
    k = 0
    for c in clean:  # each kept character's offset in the file
        while content[k] != c:
            k += 1
        pos_map.append(k)
        k += 1
    chunks = [clean[i:i + chunk_size] for i in range(0, len(clean), chunk_size)]
    if not chunks:
        return None
    hist = _char_hist(chunks)
    lens = np.array([len(c) for c in chunks])
    seen: list[int] = []  # chunk indices that opened a group, in insertion order
    groups: list[list[int]] = []
    start = len(clean)
    for i, chunk in enumerate(chunks):
        if seen:
            s = np.array(seen)
            common = np.minimum(hist[s], hist[i]).sum(1)
            bound = 2.0 * common / (lens[s] + lens[i])
            hit = None
            for g in np.nonzero(bound >= threshold - 1e-12)[0]:
                if difflib.SequenceMatcher(None, chunk, chunks[seen[g]]).ratio() >= threshold:
                    hit = g
                    break
            if hit is not None:
                idx = groups[hit]
                idx.append(i)
                if len(idx) >= repeats:
                    clean_start = min(start, idx[0] * chunk_size)
                    cut = pos_map[clean_start] if clean_start < len(pos_map) else len(content)
                    start = min(start, cut)
                continue
        seen.append(i)
        groups.append([i])
    # the official test compares the (file) cut with the length of the tag-less text
    return start if start != len(clean) else None


def _soup(html: str):
    from bs4 import BeautifulSoup

    return BeautifulSoup(html, "html.parser")


def _drop_repeated_elements(soup, max_count: int = 50) -> str:
    counts: dict[str, int] = {}
    for el in soup.find_all(True):
        try:
            key = str(el)
        except Exception:  # noqa: BLE001  (an element the serialiser cannot write is dropped, as officially)
            el.decompose()
            continue
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > max_count:
            el.decompose()
    return str(soup)


def pre_process(html: str) -> tuple[str, int | None]:
    """The prediction's official pre-processing: repetition cut, HTML wrapping, BeautifulSoup
    re-serialisation with elements repeated > 50 times dropped. Returns (html, cut position)."""
    cut = repetition_cut(html)
    if cut is not None:
        html = html[:cut]
    if not re.search(r"<html[^>]*>", html, re.IGNORECASE):
        html = f"<html><body><p>{html}</p></body></html>"
    return _drop_repeated_elements(_soup(html)), cut


# -- OCR-free text blocks ------------------------------------------------------------------------------

def _color_pool(offset: int) -> list[str]:
    levels = range(10, 251, 16)
    return ["{:02X}{:02X}{:02X}".format((r + offset) % 256, (g + offset) % 256, (b + offset) % 256)
            for r in levels for g in levels for b in levels]


def _set_style(el, prop: str, value: str) -> None:
    parts = [s for s in el.attrs.get("style", "").split(";") if not s.strip().startswith(prop) and s.strip()]
    parts.append(f"{prop}: {value} !important")
    el["style"] = "; ".join(parts).strip()


def restyle(html: str, offsets: Sequence[int] = (0,)) -> list[str]:
    """``process_html``: transparent backgrounds, one grid colour per text tag (grid shifted by each
    offset). One parse serves every offset: only the inserted colours differ between the copies."""
    soup = _soup(html)
    for el in soup.find_all(True):
        _set_style(el, "background-color", "rgba(255, 255, 255, 0.0)")
    tags = soup.find_all(list(TEXT_TAGS))
    if len(tags) > 16 ** 3:
        raise ValueError("more than 4096 text elements: the official colour pool runs out (the official "
                         "evaluator raises here too)")
    out = []
    for off in offsets:
        pool = _color_pool(off)
        for el in tags:
            _set_style(el, "color", "#" + pool.pop())
            _set_style(el, "opacity", "1.0")
        out.append(str(soup))
    return out


def _style_color(tag) -> str | None:
    style = tag.attrs.get("style") if hasattr(tag, "attrs") else None
    if not style:
        return None
    decls = [s for s in style.split(";") if "color" in s and "background-color" not in s]
    if not decls:
        return None
    parts = decls[-1].split(":")
    value = parts[1].strip().replace(" !important", "") if len(parts) > 1 else ""
    if not value:
        return None
    if value[0] == "#":
        return value
    try:
        if value.startswith("rgb"):
            rgb = tuple(map(int, value[4:-1].split(",")))
        else:
            from PIL import ImageColor

            rgb = ImageColor.getrgb(value)
        return "#{:02x}{:02x}{:02x}".format(*rgb)
    except (ValueError, TypeError, IndexError):
        return None


def text_items(html: str) -> list[tuple[str, str]]:
    """(stripped text, colour) of every text node under ``<body>``, in document order (``extract_text_with_color``)."""
    from bs4 import Comment, NavigableString, Tag

    body = _soup(html).body
    out: list[tuple[str, str]] = []
    if body is None:
        return out

    def walk(node, color):
        if isinstance(node, Comment):
            return
        if isinstance(node, NavigableString):
            t = node.strip()
            if t:
                out.append((t, color))
            return
        if isinstance(node, Tag):
            own = _style_color(node) or color
            for child in node.children:
                walk(child, own)

    walk(body, "#000000")
    return out


def _hex_rgb(color: str) -> tuple[int, int, int] | None:
    h = color.lstrip("#")
    try:
        return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    except ValueError:
        return None


def blocks_from_renders(shot: np.ndarray, p0: np.ndarray, p1: np.ndarray,
                        items: Sequence[tuple[str, str]]) -> list[Block]:
    """Blocks from the plain screenshot and the two re-styled ones (RGB uint8 arrays, H x W x 3)."""
    if p0.shape != p1.shape:
        return []
    # only pixels that differ at all can have moved by 50; the exact test runs on those alone
    ys, xs = np.nonzero((p0 != p1).any(-1))
    a = p0[ys, xs].astype(np.int16)
    moved = (np.abs((a + 50) % 256 - p1[ys, xs].astype(np.int16)) <= 8).all(-1)
    ys, xs, cols = ys[moved], xs[moved], a[moved]
    if ys.size == 0:
        return []
    H, W = p0.shape[:2]
    by_color: dict[tuple[int, int, int], np.ndarray] = {}
    blocks = []
    for text, color in items:
        rgb = _hex_rgb(color)
        if rgb is None:
            continue
        if rgb not in by_color:
            lo, hi = np.array(rgb) - 4, np.array(rgb) + 4
            if (lo < 0).any() or (hi > 255).any():  # the official uint8 bounds wrap: an empty range
                by_color[rgb] = np.zeros(0, np.int64)
            else:
                by_color[rgb] = np.nonzero(((cols >= lo) & (cols <= hi)).all(-1))[0]
        sel = by_color[rgb]
        if sel.size == 0:
            continue
        y, x = ys[sel], xs[sel]
        if y.max() >= shot.shape[0] or x.max() >= shot.shape[1]:
            return []  # official: IndexError in average_color, caught, no block at all
        mean = shot[y, x].astype(np.float64).mean(0).astype(np.int64)
        x0, x1, y0, y1 = int(x.min()), int(x.max()), int(y.min()), int(y.max())
        blocks.append(Block(text.lower(), (x0 / W, y0 / H, (x1 - x0 + 1) / W, (y1 - y0 + 1) / H),
                            tuple(int(v) for v in mean)))
    return blocks


def merge_by_bbox(blocks: Sequence[Block]) -> list[Block]:
    out: dict[tuple, Block] = {}
    for blk in blocks:
        key = tuple(blk.bbox)
        if key in out:
            e = out[key]
            e.text += " " + blk.text
            e.color = tuple((c1 + c2) / 2 for c1, c2 in zip(e.color, blk.color))
        else:
            out[key] = Block(blk.text, blk.bbox, blk.color)
    return list(out.values())


def page_blocks(html: str, render: Callable[[str], np.ndarray], need_shot: bool = False
                ) -> tuple[list[Block], np.ndarray | None]:
    """``get_blocks_ocr_free`` on ``html`` with ``render`` (HTML -> RGB array; ``RenderError`` on failure).

    Returns (blocks, plain screenshot). The three pages are rendered concurrently; a page without
    any text node is not rendered at all unless ``need_shot`` (for CLIP).
    """
    p0_html, p1_html = restyle(html, (0, 50))
    items = text_items(p0_html)
    if not items:
        return [], (_render_or_blank(render, html) if need_shot else None)
    shot, p0, p1 = _POOL.map(lambda h: _render_or_blank(render, h), (html, p0_html, p1_html))
    return blocks_from_renders(shot, p0, p1, items), shot


_POOL = concurrent.futures.ThreadPoolExecutor(6, thread_name_prefix="d2c-render")


def _render_or_blank(render: Callable[[str], np.ndarray], html: str) -> np.ndarray:
    from viscodex_jax.eval.design2code.render import BrowserUnavailable, RenderError

    try:
        return render(html)
    except BrowserUnavailable:
        raise
    except RenderError:
        return blank_page()


def blank_page() -> np.ndarray:
    return np.full((BLANK_SIZE[1], BLANK_SIZE[0], 3), 255, np.uint8)


# -- matching ----------------------------------------------------------------------------------------

_SIM_CACHE: dict[tuple[str, str], float] = {}
_SIM_CACHE_MAX = 500_000


class _Sim:
    """``SequenceMatcher(None, a, b).ratio()`` memoised across pairs: candidates of one page share most
    of their (prediction text, reference text) pairs, and the merge search asks for each many times."""

    def __call__(self, a: str, b: str) -> float:
        if a == b:
            return 1.0  # what difflib returns for equal strings, empty ones included
        key = (a, b)
        v = _SIM_CACHE.get(key)
        if v is None:
            if len(_SIM_CACHE) >= _SIM_CACHE_MAX:
                _SIM_CACHE.clear()
            v = _SIM_CACHE[key] = difflib.SequenceMatcher(None, a, b).ratio()
        return v

    def row(self, a: Block, bs: Sequence[Block]) -> np.ndarray:
        return -np.array([self(a.text, b.text) for b in bs], dtype=np.float64)

    def col(self, as_: Sequence[Block], b: Block) -> np.ndarray:
        return -np.array([self(a.text, b.text) for a in as_], dtype=np.float64)

    def matrix(self, A: Sequence[Block], B: Sequence[Block]) -> np.ndarray:
        C = np.zeros((len(A), len(B)))
        for i, a in enumerate(A):
            C[i] = self.row(a, B)
        return C


def _match(C: np.ndarray) -> tuple[list[tuple[int, int]], list[float]]:
    from scipy.optimize import linear_sum_assignment

    r, c = linear_sum_assignment(C)
    return list(zip(r.tolist(), c.tolist())), C[r, c].tolist()


def _context_bonus(C: np.ndarray, bonus: float = 0.1, window: int = 1) -> np.ndarray:
    n, m = C.shape
    out = C.copy()
    for i in range(n):
        for j in range(m):
            if out[i, j] >= -0.5:
                continue
            near = np.sort(C[max(0, i - window):i + window + 1, max(0, j - window):j + window + 1].ravel())[::-1]
            near = np.delete(near, np.nonzero(near == C[i, j])[0][0])
            out[i, j] += bonus * near[-window * 2:].sum()
    return out


def _mean_gain(old: list[float], new: list[float]) -> float:
    """Official ``difference_of_means``: means of the two multisets after removing common values."""
    c1, c2 = collections.Counter(old), collections.Counter(new)
    for v in set(old) & set(new):
        k = min(c1[v], c2[v])
        c1[v] -= k
        c2[v] -= k
    u1, u2 = list(c1.elements()), list(c2.elements())
    m1 = sum(u1) / len(u1) if u1 else 0
    m2 = sum(u2) / len(u2) if u2 else 0
    if m1 - m2 > 0:
        return m1 - m2 if min(u1) > min(u2) else 0.0
    return m1 - m2


def _merge2(a: Block, b: Block) -> Block:
    x0, y0 = min(a.bbox[0], b.bbox[0]), min(a.bbox[1], b.bbox[1])
    x1 = max(a.bbox[0] + a.bbox[2], b.bbox[0] + b.bbox[2])
    y1 = max(a.bbox[1] + a.bbox[3], b.bbox[1] + b.bbox[3])
    return Block(a.text + " " + b.text, (x0, y0, x1 - x0, y1 - y0),
                 tuple((c1 + c2) // 2 for c1, c2 in zip(a.color, b.color)))


def _apply_merges(blocks: list[Block], merges: list[list]) -> list[Block]:
    blocks = list(blocks)
    drop = []
    todo = list(merges)
    while todo:
        i, j = todo[0][0], todo[0][1]
        blocks[i] = _merge2(blocks[i], blocks[j])
        drop.append(j)
        todo = [t for t in todo[1:] if t[0] not in (i, j) and t[1] not in (i, j)]
    for k in sorted(drop, reverse=True):
        if k < len(blocks):
            blocks.pop(k)
    return blocks


def merge_and_match(A: list[Block], B: list[Block], sim: _Sim | None = None
                    ) -> tuple[list[Block], list[Block], list[tuple[int, int]]]:
    """Official ``find_possible_merge`` (A: prediction, B: reference) and the final context-bonus matching."""
    sim = sim or _Sim()
    while True:
        changed = False
        C = sim.matrix(A, B)
        _, cur = _match(C)
        if len(A) >= 2:
            merges = []
            for i in range(len(A) - 1):
                row = sim.row(_merge2(A[i], A[i + 1]), B)
                _, new = _match(np.concatenate([C[:i], row[None], C[i + 2:]], 0))
                d = _mean_gain(cur, new)
                if d > 0.05:
                    merges.append([i, i + 1, d])
            merges.sort(key=lambda t: t[2], reverse=True)
            if merges:
                changed = True
                A = _apply_merges(A, merges)
                C = sim.matrix(A, B)
                _, cur = _match(C)
        if len(B) >= 2:
            merges = []
            for j in range(len(B) - 1):
                col = sim.col(A, _merge2(B[j], B[j + 1]))
                _, new = _match(np.concatenate([C[:, :j], col[:, None], C[:, j + 2:]], 1))
                d = _mean_gain(cur, new)
                if d > 0.05:
                    merges.append([j, j + 1, d])
            merges.sort(key=lambda t: t[2], reverse=True)
            if merges:
                changed = True
                B = _apply_merges(B, merges)
        if not changed:
            break
    pairs, _ = _match(_context_bonus(sim.matrix(A, B)))
    return A, B, pairs


def _color_sim(c1: tuple, c2: tuple) -> float:
    from viscodex_jax.eval.colors import ciede2000, rgb_to_lab

    lab1 = rgb_to_lab(np.asarray(c1, np.float64) / 255.0)
    lab2 = rgb_to_lab(np.asarray(c2, np.float64) / 255.0)
    return max(0.0, 1.0 - float(ciede2000(lab1, lab2)) / 100.0)


def official_scores(pred: Sequence[Block], ref: Sequence[Block]) -> tuple[dict[str, float], list[Block]]:
    """block_match, text, position, color and their mean ``low_level`` (each in [0, 1]) of the
    prediction's blocks against the reference's (both as ``blocks_from_renders`` returns them).
    Also returns the prediction's blocks after merging (the official CLIP masks those)."""
    zeros = {k: 0.0 for k in METRICS} | {"low_level": 0.0}
    ref = merge_by_bbox(ref)
    if not pred or not ref:
        return zeros, list(pred)
    pred = merge_by_bbox(pred)
    sim = _Sim()
    A, B, pairs = merge_and_match(pred, [Block(b.text, b.bbox, b.color) for b in ref], sim)
    matched = [(i, j, s) for i, j in pairs if (s := sim(A[i].text, B[j].text)) >= 0.5]
    if not matched:
        return zeros, A
    mi, mj = {i for i, _, _ in matched}, {j for _, j, _ in matched}
    area = lambda b: b.bbox[2] * b.bbox[3]  # noqa: E731
    unmatched = sum(area(a) for i, a in enumerate(A) if i not in mi) + sum(area(b) for j, b in enumerate(B) if j not in mj)
    m_areas, texts, pos, col = [], [], [], []
    for i, j, s in matched:
        a, b = A[i], B[j]
        m_areas.append(area(a) + area(b))
        texts.append(s)
        pos.append(1 - max(abs((a.bbox[0] + a.bbox[2] / 2) - (b.bbox[0] + b.bbox[2] / 2)),
                           abs((a.bbox[1] + a.bbox[3] / 2) - (b.bbox[1] + b.bbox[3] / 2))))
        col.append(_color_sim(a.color, b.color))
    out = {"block_match": float(np.sum(m_areas) / (np.sum(m_areas) + unmatched)), "text": float(np.mean(texts)),
           "position": float(np.mean(pos)), "color": float(np.mean(col))}
    out["low_level"] = float(np.mean([out[k] for k in METRICS]))
    return out, A
