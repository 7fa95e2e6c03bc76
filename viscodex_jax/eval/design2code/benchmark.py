"""Design2Code (Si et al., 2024): a web page screenshot -> the HTML/CSS that reproduces it.

Layouts read:

* ``testset_final/`` as Design2Code publishes it: ``<id>.html`` + ``<id>.png`` pairs (the reference
  page and its screenshot) plus the placeholder image the pages use (``rick.jpg``). ``root`` may
  be that folder, its parent, or a folder whose sub-folders hold such pairs (the layout of
  ``shared/benchmarks/design2code``); ids must be unique over all of them.
* the Hugging Face parquet form (``SALT-NLP/Design2Code-hf``: ``data/train-*.parquet`` with an
  ``image`` column, ``{"bytes", "path"}``, and the page's HTML in ``text``): ``root`` is a
  ``.parquet`` file or a folder holding some. Item ids are the image paths' stems, else the row
  numbers. The pages' ``rick.jpg`` is served from ``assets_dir`` when given (without it the
  placeholder image does not load and the layout can differ from the official screenshots).

An item that cannot be read is a ``ValueError`` naming the file (and row); with
``on_error="skip"`` it is kept as unreadable and scored 0 with that reason (``base.UnreadableItem``).

Prompt: the official direct prompt (``PROMPT``), text then the screenshot, as ``prompting/gpt4v.py``
sends it.

Scoring follows the official ``metrics/visual_score.py`` (``visual_eval_v3_multi``) step by step;
the details, including the official oddities we keep on purpose, are in ``official``.
In short:

* the response goes through the official ``cleanup_response`` (so a fenced answer with prose
  around it and no ``<!DOCTYPE`` keeps the prose as page text, as officially), then the
  prediction-only pre-processing (repetition cut, wrapping of non-HTML text in ``<p>``, elements
  repeated more than 50 times dropped). We keep the repetition check's known misfire on large
  inline stylesheets (the page is cut inside ``<style>`` and scores 0): the published numbers
  include it;
* text blocks are found without OCR by re-colouring the text elements and diffing two
  screenshots; block texts are lower-cased (upper-casing a page costs nothing in ``text``);
* blocks are matched with the official merge search and context bonus; metrics are
  block_match, text, position, color (each in [0, 1]), ``low_level`` is their mean and
  ``score`` = 100 * ``low_level`` (the VisCodex table's "Design2Code low" column);
* a page that does not render is scored as the official blank 1280x960 white image
  (``render_error`` = 1 marks it): no block, so 0 on the four metrics; CLIP is taken on the blank;
* optional high-level ``clip`` (``clip_path``: a local CLIP checkpoint, never downloaded): text
  boxes inpainted (OpenCV Telea), each screenshot resized to a square of its shorter side, then the
  checkpoint's image pre-processing and the cosine of the image embeddings; with it, ``overall``
  is the official 0.2 x (block_match + text + position + color + clip). Needs ``opencv-python-headless``.

Rendering: headless Chromium (``render``, network blocked, the page's own folder serving
its images); the reference's screenshots are rendered once per (page, assets) and cached.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import io
import logging
import os
import threading
from typing import Any

import numpy as np
from PIL import Image

from viscodex_jax.eval.base import Benchmark, Column, Flag, Item, UnreadableItem
from viscodex_jax.eval.check import CheckAdapter, Metric
from viscodex_jax.eval.design2code import official
from viscodex_jax.eval.design2code.render import BrowserUnavailable, Renderer, RenderError, get_renderer

log = logging.getLogger(__name__)

# The official direct prompt, from NoviScl/Design2Code prompting/gpt4v.py (direct_prompting).
PROMPT = (
    "You are an expert web developer who specializes in HTML and CSS.\n"
    "A user will provide you with a screenshot of a webpage.\n"
    "You need to return a single html file that uses HTML and CSS to reproduce the given website.\n"
    "Include all CSS code in the HTML file itself.\n"
    "If it involves any images, use \"rick.jpg\" as the placeholder.\n"
    "Some images on the webpage are replaced with a blue rectangle as the placeholder, use \"rick.jpg\" "
    "for those as well.\n"
    "Do not hallucinate any dependencies to external files. You do not need to include JavaScript scripts "
    "for dynamic interactions.\n"
    "Pay attention to things like size, text, position, and color of all the elements, as well as the "
    "overall layout.\n"
    "Respond with the content of the HTML+CSS file:\n"
)
METRICS = official.METRICS
cleanup_response = official.cleanup_response


def extract_html(generation: str) -> str:
    """The page the official evaluator renders for a response: ``cleanup_response``, then the
    prediction pre-processing (repetition cut, non-HTML wrapping, repeated elements dropped)."""
    return official.pre_process(official.cleanup_response(generation or ""))[0]


def _png_array(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as im:
        return np.asarray(im.convert("RGB"))


# -- CLIP ---------------------------------------------------------------------------------------------

def clip_image(shot: np.ndarray, blocks: list[official.Block]) -> Image.Image:
    """The official CLIP input: text boxes inpainted (Telea, radius 3), then resized (Lanczos) to a
    square of the shorter side."""
    img = np.ascontiguousarray(shot[..., :3])
    if blocks:
        try:
            import cv2
        except ImportError as e:
            raise ImportError("Design2Code's CLIP score inpaints text boxes with OpenCV: "
                              "pip install opencv-python-headless") from e
        H, W = img.shape[:2]
        mask = np.zeros((H, W), np.uint8)
        for b in blocks:
            x, y, w, h = (int(b.bbox[0] * W), int(b.bbox[1] * H), int(b.bbox[2] * W), int(b.bbox[3] * H))
            mask[y:y + h, x:x + w] = 255
        bgr = cv2.inpaint(np.ascontiguousarray(img[..., ::-1]), mask, 3, cv2.INPAINT_TELEA)
        img = np.ascontiguousarray(bgr[..., ::-1])
    pil = Image.fromarray(img)
    side = min(pil.size)
    return pil.resize((side, side), Image.LANCZOS)


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
    """Screenshot -> HTML; see the module docstring for layouts and metrics.

    ``clip_path``: a local CLIP checkpoint directory for the high-level ``clip`` metric (off when
    None). ``renderer``: a ``render.Renderer`` (default: the process's shared one). ``on_error``:
    ``"raise"`` (an unreadable item stops the load with the file named) or ``"skip"`` (it is kept
    and scored 0 with the reason). ``assets_dir``: where parquet items' placeholder images are served from.
    """

    name = "design2code"
    flags = (Flag("clip_path", None, "Local CLIP checkpoint for Design2Code's high-level score."),)
    columns = (Column("design2code", "D2C low"), Column("design2code_high", "D2C high (CLIP)", "clip", 100.0))

    def __init__(self, clip_path: str | None = None, renderer: Renderer | None = None, on_error: str = "raise",
                 assets_dir: str | None = None, cache_size: int = 256):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.clip_path = clip_path
        self.renderer = renderer
        self.on_error = on_error
        self.assets_dir = assets_dir
        self.skipped: list[str] = []
        self._clip: _Clip | None = None
        self._assets: dict[str, str | None] = {}  # item id -> the directory its page's images are served from
        self._ref_cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._ref_lock = threading.Lock()
        self._cache_size = cache_size
        # recent screenshots by page: a re-serialised candidate often re-styles to the reference's exact
        # pages, and the same response may be scored twice; small, as each is a full-page image
        self._shots: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._shot_cache_size = 12

    # -- layouts ---------------------------------------------------------------------------------------

    @staticmethod
    def _scan(d: str) -> list[tuple[str, str, str]]:
        out = []
        for html_path in glob.glob(os.path.join(d, "*.html")):
            stem = os.path.splitext(os.path.basename(html_path))[0]
            png = os.path.join(d, stem + ".png")
            if os.path.isfile(png):
                out.append((stem, html_path, png))
        return out

    @classmethod
    def _pairs(cls, root: str) -> list[tuple[str, str, str]]:
        found = cls._scan(root)
        if not found:
            for sub in ("testset_final", "testset"):
                if os.path.isdir(os.path.join(root, sub)):
                    found = cls._scan(os.path.join(root, sub))
                    if found:
                        break
        if not found:  # a folder of such folders (e.g. shared/benchmarks/design2code)
            for sub in sorted(os.listdir(root)):
                if os.path.isdir(os.path.join(root, sub)):
                    found += cls._scan(os.path.join(root, sub))
        ids = [t[0] for t in found]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"{root}: page ids occur in more than one folder: {dup[:5]}")
        return sorted(found, key=lambda t: (0, int(t[0]), "") if t[0].isdigit() else (1, 0, t[0]))

    @staticmethod
    def _parquet_files(root: str) -> list[str]:
        if os.path.isfile(root):
            return [root] if root.endswith(".parquet") else []
        return sorted(glob.glob(os.path.join(root, "**", "*.parquet"), recursive=True))

    def _item(self, stem: str, html: str, img: Image.Image, assets: str | None) -> Item:
        content = [{"type": "text", "text": PROMPT}, {"type": "image"}]
        self._assets[stem] = assets
        return Item(stem, [{"role": "user", "content": content}], [img], html)

    def _unreadable(self, stem: str, reason: str, cause: Exception) -> Item:
        if self.on_error == "raise":
            raise ValueError(reason) from cause
        log.warning("skipping (counted as failed): %s", reason)
        self.skipped.append(reason)
        return Item(stem, [], [], UnreadableItem(reason))

    def _load_pairs(self, pairs, limit):
        items = []
        for stem, html_path, png_path in pairs:
            where = html_path
            try:
                with open(html_path, encoding="utf-8", errors="replace") as f:
                    ref = f.read()
                where = png_path
                with Image.open(png_path) as im:
                    img = im.convert("RGB")
                items.append(self._item(stem, ref, img, os.path.dirname(os.path.abspath(html_path))))
            except OSError as e:
                items.append(self._unreadable(stem, f"{where}: not a readable Design2Code page "
                                                    f"({type(e).__name__}: {e})", e))
            if limit is not None and len(items) >= limit:
                break
        return items

    def _load_parquet(self, files, limit):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("reading Design2Code's parquet form needs pyarrow: pip install pyarrow") from e
        items: list[Item] = []
        for path in files:
            try:
                rows = pq.read_table(path).to_pylist()
            except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a bad file)
                items.append(self._unreadable(os.path.basename(path), f"{path}: not a readable parquet file "
                                                                      f"({type(e).__name__}: {e})", e))
                continue
            for k, row in enumerate(rows):
                where = f"{path}: row {k}"
                stem = str(k)
                try:
                    img_field = row["image"]
                    html = row["text"] if "text" in row else row["html"]
                    if isinstance(img_field, dict):
                        if img_field.get("path"):
                            stem = os.path.splitext(os.path.basename(img_field["path"]))[0]
                        data = img_field.get("bytes")
                    else:
                        data = img_field
                    stem = str(row.get("id", stem))
                    if not isinstance(data, (bytes, bytearray)) or not isinstance(html, str):
                        raise TypeError("expected image bytes and the page's HTML as a string")
                    with Image.open(io.BytesIO(data)) as im:
                        img = im.convert("RGB")
                    items.append(self._item(stem, html, img, self.assets_dir))
                except (KeyError, TypeError, OSError, ValueError) as e:
                    what = "missing column" if isinstance(e, KeyError) else type(e).__name__
                    items.append(self._unreadable(stem, f"{where}: not a readable Design2Code record "
                                                        f"({what}: {e}; expected columns 'image' and 'text')", e))
                if limit is not None and len(items) >= limit:
                    return items
        return items

    def load(self, root: str, limit: int | None = None) -> list[Item]:
        self.skipped = []
        parquet = self._parquet_files(root) if os.path.exists(root) else []
        if parquet and (os.path.isfile(root) or not self._scan(root)):
            items = self._load_parquet(parquet, limit)
        else:
            if not os.path.isdir(root):
                raise FileNotFoundError(f"{root}: not a directory (Design2Code's <id>.html + <id>.png test set) "
                                        "nor a parquet file")
            pairs = self._pairs(root)
            if not pairs:
                raise FileNotFoundError(f"{root}: no <id>.html + <id>.png pairs (Design2Code's testset_final "
                                        "layout) and no .parquet file")
            items = self._load_pairs(pairs, limit)
        ids = [it.id for it in items]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"{root}: item ids occur more than once: {dup[:5]}")
        return items

    # -- scoring ---------------------------------------------------------------------------------------

    def _renderer(self) -> Renderer:
        return self.renderer.start() if self.renderer is not None else get_renderer()

    def _render_fn(self, assets: str | None, failures: list[str] | None = None):
        def render(html: str) -> np.ndarray:
            key = hashlib.sha256(f"{assets}\0{html}".encode("utf-8", "replace")).hexdigest()
            with self._ref_lock:
                if key in self._shots:
                    self._shots.move_to_end(key)
                    return self._shots[key]
            try:
                res = self._renderer().render(html, screenshot=True, blocks=False, assets_dir=assets)
            except BrowserUnavailable:
                raise
            except RenderError as e:
                if failures is not None:
                    failures.append(str(e))
                raise
            arr = _png_array(res.png)
            with self._ref_lock:
                self._shots[key] = arr
                while len(self._shots) > self._shot_cache_size:
                    self._shots.popitem(last=False)
            return arr
        return render

    def _reference(self, item: Item, assets: str | None):
        key = hashlib.sha256(f"{assets}\0{item.reference}".encode("utf-8", "replace")).hexdigest()
        with self._ref_lock:
            if key in self._ref_cache:
                self._ref_cache.move_to_end(key)
                return self._ref_cache[key]
        failures: list[str] = []
        blocks, shot = official.page_blocks(item.reference, self._render_fn(assets, failures), need_shot=True)
        if failures:  # the data, not the model: stop rather than score against a blank page
            raise RenderError(f"design2code item {item.id}: the reference page did not render: {failures[0]}")
        with self._ref_lock:
            self._ref_cache[key] = (blocks, shot)
            while len(self._ref_cache) > self._cache_size:
                self._ref_cache.popitem(last=False)
        return blocks, shot

    def _clip_model(self) -> _Clip:
        if self._clip is None:
            self._clip = _Clip(self.clip_path)  # type: ignore[arg-type]
        return self._clip

    def score_details(self, item: Item, generation: str) -> dict[str, Any]:
        """``score`` plus what the official pre-processing did: ``prediction_cut_at`` (None: not cut)
        and ``no_blocks_detected_in_prediction``."""
        if isinstance(item.reference, UnreadableItem):
            raise ValueError(item.reference.reason)
        assets = self._assets.get(item.id)
        ref_blocks, ref_shot = self._reference(item, assets)
        html, cut = official.pre_process(official.cleanup_response(generation or ""))
        failures: list[str] = []
        pred_blocks, shot = official.page_blocks(html, self._render_fn(assets, failures),
                                                 need_shot=self.clip_path is not None)
        if failures:
            log.info("design2code %s: generated page did not render (scored as a blank page): %s", item.id,
                     failures[0])
        out: dict[str, Any] = {}
        scores, pred_masked = official.official_scores(pred_blocks, ref_blocks)
        out.update(scores)
        if self.clip_path is not None:
            ref_masked = official.merge_by_bbox(ref_blocks)
            a = clip_image(shot if shot is not None else official.blank_page(), pred_masked)
            b = clip_image(ref_shot, ref_masked)
            out["clip"] = self._clip_model().similarity(a, b)
            out["overall"] = 0.2 * (sum(out[k] for k in METRICS) + out["clip"])
        out["render_error"] = 1.0 if failures else 0.0
        out["score"] = 100.0 * out["low_level"]
        out["prediction_cut_at"] = cut
        out["no_blocks_detected_in_prediction"] = not pred_blocks
        return out

    def score(self, item: Item, generation: str) -> dict[str, float]:
        d = self.score_details(item, generation)
        d.pop("prediction_cut_at")
        d.pop("no_blocks_detected_in_prediction")
        return d

    def check_adapter(self) -> CheckAdapter:
        return Design2CodeCheck(self)

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


class Design2CodeCheck(CheckAdapter):
    """``shared/benchmarks/design2code`` layout: page folders, ``candidates/<ref>/<candidate>.txt`` and
    ``expected.jsonl`` lines naming ``ref`` and ``candidate_file`` with the official metrics in [0, 1]
    (agreement: within 0.005, i.e. 0.5 points), the cut position and whether no block was found."""

    item_field = "ref"
    metrics = tuple(Metric(k, tolerance=0.005) for k in METRICS) + (
        Metric("prediction_cut_at"), Metric("no_blocks_detected_in_prediction"))
    max_workers = 2  # renders overlap with the Python side; more only contends for the CPU

    def observe(self, item: Item, response: str) -> dict[str, Any]:
        return self.bench.score_details(item, response)  # type: ignore[attr-defined]


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
