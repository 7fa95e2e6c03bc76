"""Design2Code (Si et al., 2024): a web page screenshot -> the HTML/CSS that reproduces it.

Layout read (as Design2Code publishes its test set, e.g. ``testset_final/``): one directory with
``<id>.html`` + ``<id>.png`` pairs (the reference page and its screenshot), plus any placeholder
images the pages use (``rick.jpg``). ``root`` may also be the parent of ``testset_final/``.

Scoring renders the reference and the generated page in headless Chromium (``eval.render``: JS
on, every network request blocked), takes each page's visible text blocks and follows
Design2Code's fine-grained evaluation:

1. blocks of the two pages are paired with the Hungarian algorithm
   (``scipy.optimize.linear_sum_assignment``) maximising the summed text similarity
   (``difflib.SequenceMatcher.ratio``, i.e. 2*matches/total characters); pairs below 0.5 are
   dropped (unmatched);
2. before the final matching, consecutive blocks of either page are merged greedily while
   that raises the matched similarity (Design2Code's fix for a paragraph split differently
   on the two pages);
3. the low-level metrics, each in [0, 1]:

   * **block_match** - the area of matched blocks over the area of all blocks, both pages:
     ``sum_matched (S(r) + S(g)) / (sum_all S(r) + sum_all S(g))`` (areas normalised by page size);
   * **text** - mean text similarity of the matched pairs;
   * **position** - mean of ``1 - max(|dx|, |dy|)`` between matched block centres
     (coordinates normalised by each page's size);
   * **color** - mean CIEDE2000 color similarity ``max(0, 1 - dE00/100)`` of matched text colors
     (``eval.colors``);

   ``low_level`` is their mean and ``score`` = 100 * ``low_level`` (the scale of the VisCodex
   table's "Design2Code low" column, like the other benchmarks' ``score``).
4. optional high-level **clip**: with a local CLIP checkpoint (``clip_path``; never downloaded),
   the cosine similarity of the CLIP image embeddings of the reference screenshot (the published
   PNG) and the generated page's screenshot, text regions of both painted over first.

Simplifications, compared with the official ``visual_score.py`` (from memory of the paper and code):

* blocks come from the DOM (each block-level element's own visible text, its line boxes'
  union as bbox, its computed CSS ``color``) instead of Design2Code's OCR-free detection by
  re-coloring text and diffing screenshots; text color is the CSS color, not the sampled pixels;
* the matching has no "consecutive bonus" for order-preserving pairs; ties between equally
  similar pairs are broken by a tiny centre-distance term instead; the 0.5 threshold also
  applies inside the assignment (sub-threshold similarities count as 0);
* merging is greedy (first improving merge of neighbours, repeated until none improves), and
  skipped for pages with more than ``max_merge_blocks`` blocks;
* the text masking before CLIP fills each text box with the median color of its border
  instead of OpenCV inpainting, and the CLIP image preprocessing is the checkpoint's own
  (resize + centre crop, as Design2Code's);
* a page with no text block, or a generation that does not render (timeout, crash), gets 0 on
  every metric (``render_error`` = 1 marks the latter).
"""

from __future__ import annotations

import collections
import difflib
import glob
import hashlib
import logging
import os
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image

from viscodex_jax.eval.base import Benchmark, Item, extract_code
from viscodex_jax.eval.colors import color_similarity
from viscodex_jax.eval.render import BrowserUnavailable, RenderError, Renderer, TextBlock, get_renderer

log = logging.getLogger(__name__)

PROMPT = (
    "This is a screenshot of a web page. Write the HTML/CSS code that reproduces this web page screenshot "
    "as faithfully as possible: the same text, layout, element sizes, positions and colors. Write one "
    "self-contained HTML file with all CSS inside it; do not load external files or scripts. Use \"rick.jpg\" "
    "as the source of every image. Reply with the complete HTML file in one ```html code block."
)
METRICS = ("block_match", "text", "position", "color")
MIN_SIMILARITY = 0.5
_TIE_EPS = 1e-3


# -- generation -> HTML ------------------------------------------------------------------------------

def extract_html(generation: str) -> str:
    """The HTML of a generation: the last ```html block (else the last fenced block), else the
    ``<!DOCTYPE``/``<html>`` ... ``</html>`` span of the raw text, else the raw text."""
    text = generation or ""
    if "```" in text:
        return extract_code(text, languages=("html", "htm", "xhtml"))
    m = re.search(r"<!doctype html|<html[\s>]", text, re.I)
    if m:
        end = text.lower().rfind("</html>")
        return text[m.start():end + len("</html>")] if end > m.start() else text[m.start():]
    return text


# -- matching and metrics ------------------------------------------------------------------------------

def text_similarity(a: str, b: str) -> float:
    """Character-level similarity ``2*M/T`` (``difflib.SequenceMatcher.ratio``), 0 when either is empty."""
    if not a or not b:
        return 0.0
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


def _sim_row(block: TextBlock, others: Sequence[TextBlock], floor: float) -> np.ndarray:
    out = np.zeros(len(others))
    for j, o in enumerate(others):
        sm = difflib.SequenceMatcher(None, block.text, o.text, autojunk=False)
        if block.text and o.text and sm.real_quick_ratio() >= floor and sm.quick_ratio() >= floor:
            r = sm.ratio()
            out[j] = r if r >= floor else 0.0
    return out


def _similarities(ref: Sequence[TextBlock], cand: Sequence[TextBlock], floor: float) -> np.ndarray:
    """Thresholded text similarity matrix (entries below ``floor`` are 0)."""
    S = np.zeros((len(ref), len(cand)))
    for i, r in enumerate(ref):
        S[i] = _sim_row(r, cand, floor)
    return S


def _assign(S: np.ndarray, ref: Sequence[TextBlock], cand: Sequence[TextBlock]) -> list[tuple[int, int]]:
    """Hungarian matching maximising summed similarity; pairs with similarity 0 are left out."""
    from scipy.optimize import linear_sum_assignment

    if S.size == 0 or not S.any():
        return []
    rc = np.array([b.center for b in ref]).reshape(-1, 2)
    cc = np.array([b.center for b in cand]).reshape(-1, 2)
    dist = np.abs(rc[:, None, :] - cc[None, :, :]).max(-1)
    cost = -S + _TIE_EPS * dist * (S > 0)
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if S[i, j] > 0]


def _value(S: np.ndarray, pairs: list[tuple[int, int]]) -> float:
    return float(sum(S[i, j] for i, j in pairs))


def _merge(a: TextBlock, b: TextBlock) -> TextBlock:
    x0, y0 = min(a.bbox[0], b.bbox[0]), min(a.bbox[1], b.bbox[1])
    x1 = max(a.bbox[0] + a.bbox[2], b.bbox[0] + b.bbox[2])
    y1 = max(a.bbox[1] + a.bbox[3], b.bbox[1] + b.bbox[3])
    color = a.color if len(a.text) >= len(b.text) else b.color
    return TextBlock(text=(a.text + " " + b.text).strip(), bbox=(x0, y0, x1 - x0, y1 - y0), color=color, tag=a.tag)


def merge_and_match(ref: Sequence[TextBlock], cand: Sequence[TextBlock], min_similarity: float = MIN_SIMILARITY,
                    merge: bool = True, max_merge_blocks: int = 200
                    ) -> tuple[list[TextBlock], list[TextBlock], list[tuple[int, int, float]]]:
    """Greedily merges consecutive blocks of either page while that raises the matched similarity,
    then returns (ref blocks, candidate blocks, matched ``(i, j, similarity)``) of the final matching."""
    ref, cand = list(ref), list(cand)
    S = _similarities(ref, cand, min_similarity)
    pairs = _assign(S, ref, cand)
    best = _value(S, pairs)
    if merge and 0 < len(ref) <= max_merge_blocks and 0 < len(cand) <= max_merge_blocks:
        improved = True
        while improved:
            improved = False
            for side in (0, 1):
                blocks, other = (ref, cand) if side == 0 else (cand, ref)
                i = 0
                while i < len(blocks) - 1:
                    merged = _merge(blocks[i], blocks[i + 1])
                    row = _sim_row(merged, other, min_similarity)
                    if not row.any():
                        i += 1
                        continue
                    new_blocks = blocks[:i] + [merged] + blocks[i + 2:]
                    if side == 0:
                        S2 = np.concatenate([S[:i], row[None], S[i + 2:]], 0)
                        p2 = _assign(S2, new_blocks, cand)
                    else:
                        S2 = np.concatenate([S[:, :i], row[:, None], S[:, i + 2:]], 1)
                        p2 = _assign(S2, ref, new_blocks)
                    v = _value(S2, p2)
                    if v > best + 1e-9:
                        blocks[:] = new_blocks
                        S, pairs, best, improved = S2, p2, v, True
                    else:
                        i += 1
    return ref, cand, [(i, j, float(S[i, j])) for i, j in pairs]


def low_level_scores(ref: Sequence[TextBlock], cand: Sequence[TextBlock], min_similarity: float = MIN_SIMILARITY,
                     merge: bool = True) -> dict[str, float]:
    """Design2Code's block_match, text, position and color (each in [0, 1]) and their mean ``low_level``.

    Pages with no text block on either side (nothing to match) get 0 everywhere.
    """
    ref, cand, matched = merge_and_match(ref, cand, min_similarity, merge)
    zeros = {k: 0.0 for k in METRICS} | {"low_level": 0.0}
    if not ref or not cand or not matched:
        return zeros
    total = sum(b.area for b in ref) + sum(b.area for b in cand)
    matched_area = sum(ref[i].area + cand[j].area for i, j, _ in matched)
    text = [s for _, _, s in matched]
    position = []
    color = []
    for i, j, _ in matched:
        (x1, y1), (x2, y2) = ref[i].center, cand[j].center
        position.append(max(0.0, 1.0 - max(abs(x1 - x2), abs(y1 - y2))))
        color.append(color_similarity(tuple(int(v) for v in ref[i].color), tuple(int(v) for v in cand[j].color)))
    out = {
        "block_match": float(matched_area / total) if total > 0 else 0.0,
        "text": float(np.mean(text)),
        "position": float(np.mean(position)),
        "color": float(np.mean(color)),
    }
    out["low_level"] = float(np.mean([out[k] for k in METRICS]))
    return out


# -- CLIP ---------------------------------------------------------------------------------------------

def mask_text(img: Image.Image, blocks: Sequence[TextBlock], pad: int = 2) -> Image.Image:
    """Paints each text block's box (normalised bbox scaled to the image) with its border's median color."""
    arr = np.asarray(img.convert("RGB")).copy()
    H, W = arr.shape[:2]
    for b in blocks:
        x0 = max(int(b.bbox[0] * W) - pad, 0)
        y0 = max(int(b.bbox[1] * H) - pad, 0)
        x1 = min(int(np.ceil((b.bbox[0] + b.bbox[2]) * W)) + pad, W)
        y1 = min(int(np.ceil((b.bbox[1] + b.bbox[3]) * H)) + pad, H)
        if x1 <= x0 or y1 <= y0:
            continue
        ring = [arr[y0, x0:x1], arr[y1 - 1, x0:x1], arr[y0:y1, x0], arr[y0:y1, x1 - 1]]
        arr[y0:y1, x0:x1] = np.median(np.concatenate(ring, 0), axis=0).astype(arr.dtype)
    return Image.fromarray(arr)


class _Clip:
    """CLIP image embeddings from a local checkpoint (``local_files_only``: never downloads)."""

    def __init__(self, path: str):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"clip_path {path!r} is not a local checkpoint directory")
        import torch
        from transformers import CLIPImageProcessor, CLIPModel

        self.torch = torch
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)

    def similarity(self, a: Image.Image, b: Image.Image) -> float:
        torch = self.torch
        inputs = self.processor(images=[a.convert("RGB"), b.convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            f = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        if not isinstance(f, torch.Tensor):  # transformers >= 5 returns an output object
            f = f.pooler_output
        f = f / f.norm(dim=-1, keepdim=True)
        return float((f[0] * f[1]).sum())


# -- the benchmark ------------------------------------------------------------------------------------

class Design2Code(Benchmark):
    """Screenshot -> HTML; see the module docstring for the metrics.

    ``clip_path``: a local CLIP checkpoint directory for the high-level ``clip`` metric (off when
    None). ``renderer``: a ``render.Renderer`` (default: the process's shared one).
    """

    name = "design2code"

    def __init__(self, clip_path: str | None = None, renderer: Renderer | None = None,
                 min_similarity: float = MIN_SIMILARITY, merge: bool = True, clip_mask_text: bool = True,
                 cache_size: int = 256):
        self.clip_path = clip_path
        self.renderer = renderer
        self.min_similarity = min_similarity
        self.merge = merge
        self.clip_mask_text = clip_mask_text
        self._clip: _Clip | None = None
        self._assets: dict[str, str] = {}  # item id -> the directory its page's images are served from
        self._ref_cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._cache_size = cache_size

    # -- layout ----------------------------------------------------------------------------------------

    @staticmethod
    def _pairs(root: str) -> list[tuple[str, str, str]]:
        def scan(d: str) -> list[tuple[str, str, str]]:
            out = []
            for html_path in glob.glob(os.path.join(d, "*.html")):
                stem = os.path.splitext(os.path.basename(html_path))[0]
                png = os.path.join(d, stem + ".png")
                if os.path.isfile(png):
                    out.append((stem, html_path, png))
            return out

        found = scan(root)
        if not found:
            for sub in ("testset_final", "testset"):
                if os.path.isdir(os.path.join(root, sub)):
                    found = scan(os.path.join(root, sub))
                    if found:
                        break
        return sorted(found, key=lambda t: (0, int(t[0]), "") if t[0].isdigit() else (1, 0, t[0]))

    def load(self, root: str, limit: int | None = None) -> list[Item]:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: not a directory (Design2Code's <id>.html + <id>.png test set)")
        pairs = self._pairs(root)
        if not pairs:
            raise FileNotFoundError(f"{root}: no <id>.html + <id>.png pairs (Design2Code's test set layout)")
        items = []
        for stem, html_path, png_path in pairs[:limit] if limit is not None else pairs:
            with open(html_path, encoding="utf-8", errors="replace") as f:
                ref = f.read()
            with Image.open(png_path) as im:
                img = im.convert("RGB")
            content = [{"type": "image"}, {"type": "text", "text": PROMPT}]
            items.append(Item(stem, [{"role": "user", "content": content}], [img], ref))
            self._assets[stem] = os.path.dirname(os.path.abspath(html_path))
        return items

    # -- scoring ---------------------------------------------------------------------------------------

    def _renderer(self) -> Renderer:
        return self.renderer.start() if self.renderer is not None else get_renderer()

    def _render_reference(self, item: Item, assets: str | None):
        key = hashlib.sha256(f"{assets}\0{item.reference}".encode("utf-8", "replace")).hexdigest()
        if key in self._ref_cache:
            self._ref_cache.move_to_end(key)
            return self._ref_cache[key]
        try:
            res = self._renderer().render(item.reference, screenshot=self.clip_path is not None and not item.images,
                                          blocks=True, assets_dir=assets)
        except BrowserUnavailable:
            raise
        except RenderError as e:  # the data, not the model: stop rather than score against nothing
            raise RenderError(f"design2code item {item.id}: the reference page did not render: {e}") from e
        self._ref_cache[key] = res
        while len(self._ref_cache) > self._cache_size:
            self._ref_cache.popitem(last=False)
        return res

    def _clip_model(self) -> _Clip:
        if self._clip is None:
            self._clip = _Clip(self.clip_path)  # type: ignore[arg-type]
        return self._clip

    def score(self, item: Item, generation: str) -> dict[str, float]:
        assets = self._assets.get(item.id)
        ref = self._render_reference(item, assets)  # a reference that cannot render is a real error
        html = extract_html(generation)
        out: dict[str, float] = {k: 0.0 for k in METRICS} | {"low_level": 0.0}
        cand = None
        render_error = 0.0
        if html.strip():
            try:
                cand = self._renderer().render(html, screenshot=self.clip_path is not None, blocks=True,
                                               assets_dir=assets)
            except BrowserUnavailable:
                raise
            except RenderError as e:
                log.info("design2code %s: generated page did not render: %s", item.id, e)
                render_error = 1.0
        if cand is not None:
            out.update(low_level_scores(ref.blocks, cand.blocks, self.min_similarity, self.merge))
        if self.clip_path is not None:
            out["clip"] = 0.0
            if cand is not None and cand.png is not None:
                ref_img = item.images[0] if item.images else ref.image()
                cand_img = cand.image()
                if self.clip_mask_text:
                    ref_img = mask_text(ref_img, ref.blocks)
                    cand_img = mask_text(cand_img, cand.blocks)
                out["clip"] = self._clip_model().similarity(ref_img, cand_img)
        out["render_error"] = render_error
        out["score"] = 100.0 * out["low_level"]
        return out

    # -- sample data -----------------------------------------------------------------------------------

    @staticmethod
    def make_sample(out_dir: str) -> str:
        """Four small pages of our own (headings, paragraphs, buttons, colored boxes) and their
        screenshots, as ``<id>.html`` + ``<id>.png`` (needs Chromium, like scoring)."""
        os.makedirs(out_dir, exist_ok=True)
        r = get_renderer()
        for stem, html in SAMPLE_PAGES.items():
            with open(os.path.join(out_dir, f"{stem}.html"), "w", encoding="utf-8") as f:
                f.write(html)
            png = r.render(html, screenshot=True, blocks=False).png
            with open(os.path.join(out_dir, f"{stem}.png"), "wb") as f:
                f.write(png)  # type: ignore[arg-type]
        return out_dir


_STYLE = "body{font-family:'DejaVu Sans',Arial,sans-serif;margin:0;padding:24px;background:#fff;color:#222}"

SAMPLE_PAGES: dict[str, str] = {
    "1": f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Bakery</title><style>{_STYLE}
header{{background:#1f4e79;color:#fff;padding:16px 24px}} h1{{margin:0;font-size:32px}}
.lead{{font-size:18px;color:#444;margin:24px 0}} .btn{{background:#e67e22;color:#fff;border:none;padding:12px 24px;
font-size:16px;border-radius:6px}}</style></head>
<body><header><h1>Sunrise Bakery</h1></header>
<p class="lead">Fresh bread and pastries baked every morning since 1987.</p>
<button class="btn">Order now</button>
<p>Open daily from 7am to 6pm.</p></body></html>
""",
    "2": f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Features</title><style>{_STYLE}
h2{{color:#2c3e50}} .row{{display:flex;gap:16px}} .box{{flex:1;padding:16px;border-radius:8px;color:#fff}}
.a{{background:#c0392b}} .b{{background:#27ae60}} .c{{background:#2980b9}}</style></head>
<body><h2>Why choose us</h2>
<div class="row"><div class="box a"><h3>Fast</h3><p>Delivery within two days.</p></div>
<div class="box b"><h3>Fresh</h3><p>Local farms, seasonal produce.</p></div>
<div class="box c"><h3>Fair</h3><p>Honest prices, no hidden fees.</p></div></div>
<p style="color:#7f8c8d">Prices include taxes.</p></body></html>
""",
    "3": f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Sign in</title><style>{_STYLE}
.card{{width:360px;margin:40px auto;padding:24px;border:1px solid #ddd;border-radius:10px}}
h1{{font-size:24px;color:#8e44ad}} label{{display:block;margin-top:12px;color:#555}}
.go{{margin-top:20px;width:100%;padding:10px;background:#8e44ad;color:#fff;border:none;border-radius:5px}}
</style></head>
<body><div class="card"><h1>Sign in to your account</h1>
<label>Email address</label><label>Password</label>
<button class="go">Continue</button>
<p style="font-size:13px;color:#999">Forgot your password?</p></div></body></html>
""",
    "4": f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Blog</title><style>{_STYLE}
nav{{display:flex;gap:24px;border-bottom:2px solid #eee;padding-bottom:8px}} nav a{{color:#16a085;text-decoration:none}}
article{{margin-top:24px;max-width:720px}} h1{{font-size:28px}} .meta{{color:#95a5a6;font-size:14px}}
blockquote{{border-left:4px solid #f1c40f;margin:16px 0;padding:8px 16px;background:#fdf6e3}}</style></head>
<body><nav><a href="#">Home</a><a href="#">Archive</a><a href="#">About</a></nav>
<article><h1>Notes on building small websites</h1><p class="meta">March 3, 2024 - 4 min read</p>
<p>Small sites load quickly and are easy to maintain.</p>
<blockquote>Simplicity is prerequisite for reliability.</blockquote>
<p>Start with plain HTML, then add style where it helps the reader.</p></article></body></html>
""",
}
