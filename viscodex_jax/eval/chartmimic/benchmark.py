"""ChartMimic "direct mimic": chart image -> matplotlib code, scored like the official low-level evaluator.

Layouts read: ``dataset/ori_500/`` (``<name>.py`` + ``<name>.pdf``; the PDF's first page is rendered
to PNG at 120 dpi, as the official loader does with pdf2image, here with pypdfium2) and any folder of
``<name>.py`` + ``<name>.png`` pairs such as ``direct_600/`` (a PNG, when present, is used as it is).
``root`` may be that folder or its parent holding an ``ori_500/`` or ``direct*/`` folder. The prompt
is the official direct-mimic instruction with ``figsize=(width, height)`` from ``dimentions_info.jsonl``
(looked up in ``root`` and its two parents) when it lists the item, else from the reference's own
``figsize=``, else the image size at 100 dpi.

Scoring follows github ChartMimic/ChartMimic at c9e149c (``code_checker.py``, ``code_interpreter.py``,
the four evaluators and ``get_results.ipynb``), checked pair by pair against the official scores in
``tests/test_chartmimic_official.py``:

* code: the first block fenced exactly ```` ```python ````; none (a ```` ```py ```` fence, bare code)
  scores 0 everywhere. Everything from the first ``plt.savefig(`` / ``plt.show(`` on is cut, the rest is
  indented into ``try: ... except Exception: pass`` and ``plt.savefig("<out>.pdf")`` is appended;
  ``exec_ok`` is whether the code ran without an exception and that savefig wrote the PDF (officially a
  second run of the unwrapped code; one run here). A program that fails scores 0 on every metric.
* text: strings the PDF backend draws during the run, after ``set_xticks([])``/``set_yticks([])`` on every
  axes of the current figure just before the first ``plt.savefig`` (tick labels never count); multiset F1.
  A reference that never saves a PDF (e.g. ends in ``plt.show()``) therefore logs no text.
* layout: gridspec geometry and spans of each axes of the final current figure that has a subplotspec;
  for a ``graph*`` item every axes counts as one fixed tuple. Multiset F1.
* type: counts of the outermost call among the official patched functions (``bar`` and ``barh`` differ,
  ``matshow`` counts as ``imshow``, ``pcolormesh`` is not logged); F1 of the count overlap.
* color: per patched call a hex colour or, for colormapped artists, the colormap name; de-duplicated,
  cut by the official >10-colour filter, matched within each call group by CIEDE2000 similarity
  (``1 - dE/100``; names match exactly) with an optimal assignment.
* Official oddities kept, because the official scores include them: a reference that logs no colour
  (and whose name lacks "box") crashes the official colour evaluator, and the item counts 0 on all four
  metrics (``colorless_reference`` 1); both sides empty gives 0, not 100. Not kept, because it makes a
  score depend on the order of items: the official type evaluator carrying the previous item's type
  metrics when a program logs no chart type (fresh evaluators, i.e. 0, as the shared expected scores).

Programs run in the sandbox (``eval.sandbox.run_python``) under ``eval/chartmimic/harness.py``, with the
interpreter of the scoring venv: ``$VISCODEX_SCORING_PYTHON`` when set, else ``<checkout>/.venv-score``
(``launch/setup_scoring_env.sh`` installs the official pins there: matplotlib 3.8.4, numpy 1.26,
pandas, seaborn, squarify, matplotlib-venn, networkx, scipy), else the current interpreter (whose newer
matplotlib lacks e.g. ``cm.get_cmap``, so some references fail and scores can drift from the official;
functions it no longer has go untraced and are listed in the logged ``missing_hooks``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import threading
from typing import Any, Sequence

from PIL import Image

from viscodex_jax.eval.base import Benchmark, Column, Item, UnreadableItem
from viscodex_jax.eval.chartmimic.metrics import ZERO_SCORES, compare
from viscodex_jax.eval.chartmimic.programs import generation_program, run_chart, scoring_python
from viscodex_jax.eval.sandbox import Limits

# chart2code/prompts/DirectAgent/gpt-4-vision-preview.json (ChartMimic/ChartMimic @ c9e149c, Apache-2.0);
# the official conversation puts this text before the image.
INSTRUCTION = (
    "You are an expert Python developer who specializes in writing matplotlib code based on a given picture. "
    "I found a very nice picture in a STEM paper, but there is no corresponding source code available. I need "
    "your help to generate the Python code that can reproduce the picture based on the picture I provide.\n"
    "Note that it is necessary to use figsize=({width}, {height}) to set the image size to match the original "
    "size.\nNow, please give me the matplotlib code that reproduces the picture below."
)
PDF_DPI = 120  # chart2code/data/data_utils.py renders a PDF without PNG at this dpi


# -- prompt and loader --------------------------------------------------------------------------------
_FIGSIZE = re.compile(r"figsize\s*=\s*[(\[]\s*([0-9]*\.?[0-9]+)\s*,\s*([0-9]*\.?[0-9]+)\s*[)\]]")


def direct_mimic_prompt(reference: str, image_size: tuple[int, int],
                        dimensions: tuple[float, float] | None = None) -> str:
    """The official instruction. figsize: ``dimensions`` (from ``dimentions_info.jsonl``), else the
    reference's own ``figsize=``, else the image size at 100 dpi."""
    if dimensions is None:
        m = _FIGSIZE.search(reference)
        dimensions = ((float(m.group(1)), float(m.group(2))) if m
                      else (round(image_size[0] / 100, 1), round(image_size[1] / 100, 1)))
    return INSTRUCTION.format(width=dimensions[0], height=dimensions[1])


def render_pdf(path: str, dpi: int = PDF_DPI) -> Image.Image:
    """First page of a PDF as an RGB image at ``dpi``."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument(path)
    try:
        if len(doc) == 0:
            raise ValueError(f"{path}: the PDF has no page")
        return doc[0].render(scale=dpi / 72).to_pil().convert("RGB")
    finally:
        doc.close()


def read_dimensions(root: str) -> dict[str, tuple[float, float]]:
    """``idx -> (width, height)`` from the first ``dimentions_info.jsonl`` in ``root`` or its two parents."""
    d = os.path.abspath(root)
    for _ in range(3):
        path = os.path.join(d, "dimentions_info.jsonl")
        if os.path.isfile(path):
            out = {}
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                        out[str(rec["idx"])] = (float(rec["width"]), float(rec["height"]))
                    except (ValueError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{lineno}: expected a JSON object with idx, width and height "
                                         f"({type(e).__name__}: {e})") from e
            return out
        d = os.path.dirname(d)
    return {}


class ChartMimic(Benchmark):
    name = "chartmimic"
    # the paper's high-level score is GPT-4o-judged: its column holds the paper's numbers only
    columns = (Column("chartmimic", "ChartMimic low"), Column("chartmimic_high", "ChartMimic high", None))

    def __init__(self, limits: Limits = Limits(wall_seconds=60, cpu_seconds=40), subset: str | None = None,
                 on_error: str = "raise", python: str | None = None):
        """``subset``: which ``ori_500``/``direct*`` folder to read when ``root`` is the dataset folder (default:
        ``ori_500``, else the first ``direct*``). ``on_error="skip"``: an item whose image cannot be read is
        kept as unreadable (scored 0 with the reason) instead of stopping the load. ``python``: interpreter
        for chart programs (default ``scoring_python()``)."""
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.limits = limits
        self.subset = subset
        self.on_error = on_error
        self.python = python
        self._ref_cache: dict[str, dict[str, Any]] = {}
        self._ref_lock = threading.Lock()

    # -- layout -------------------------------------------------------------------------------------
    @staticmethod
    def _is_item_folder(d: str) -> bool:
        return bool(glob.glob(os.path.join(d, "*.py"))) and bool(
            glob.glob(os.path.join(d, "*.png")) or glob.glob(os.path.join(d, "*.pdf")))

    def _folder(self, root: str) -> str:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such ChartMimic folder")
        if self.subset:
            if os.path.isdir(os.path.join(root, self.subset)):
                return os.path.join(root, self.subset)
            if os.path.basename(os.path.normpath(root)) == self.subset:
                return root
            raise FileNotFoundError(f"{root}: no ChartMimic subset folder {self.subset!r}")
        if self._is_item_folder(root):
            return root
        subs = [os.path.join(root, "ori_500")] if os.path.isdir(os.path.join(root, "ori_500")) else []
        subs += sorted(d for d in glob.glob(os.path.join(root, "direct*")) if os.path.isdir(d))
        if not subs:
            raise FileNotFoundError(f"{root}: neither <name>.py with <name>.pdf/.png nor an ori_500/ or direct*/ "
                                    "folder")
        return subs[0]

    def load(self, root: str, limit: int | None = None) -> list[Item]:
        folder = self._folder(root)
        dims = read_dimensions(folder)
        items = []
        for py in sorted(glob.glob(os.path.join(folder, "*.py"))):
            name = os.path.splitext(os.path.basename(py))[0]
            png, pdf = os.path.join(folder, name + ".png"), os.path.join(folder, name + ".pdf")
            if not (os.path.isfile(png) or os.path.isfile(pdf)):
                continue  # a program without its chart cannot be asked
            with open(py, encoding="utf-8") as f:
                reference = f.read()
            try:
                if os.path.isfile(png):
                    with Image.open(png) as im:
                        image = im.convert("RGB")
                else:
                    image = render_pdf(pdf)
            except Exception as e:
                reason = f"{png if os.path.isfile(png) else pdf}: cannot read the chart ({type(e).__name__}: {e})"
                if self.on_error == "raise":
                    raise ValueError(reason) from e
                items.append(Item(name, [], [], UnreadableItem(reason)))
            else:
                text = direct_mimic_prompt(reference, image.size, dims.get(name))
                content = [{"type": "text", "text": text}, {"type": "image"}]
                items.append(Item(name, [{"role": "user", "content": content}], [image], reference))
            if limit is not None and len(items) >= limit:
                break
        if not items:
            raise FileNotFoundError(f"{folder}: no <name>.py with a matching <name>.pdf or <name>.png")
        return items

    # -- scoring ------------------------------------------------------------------------------------
    def _python(self) -> str | None:
        return self.python if self.python is not None else scoring_python()

    def reference_info(self, item: Item) -> dict[str, Any]:
        """What the harness logs for the item's reference program (cached); raises, naming the item and the
        reason, when the reference does not run."""
        graph = item.id.startswith("graph")
        key = hashlib.sha256(f"{graph}\0{item.reference}".encode("utf-8")).hexdigest()
        with self._ref_lock:
            if key in self._ref_cache:
                return self._ref_cache[key]
        res, info, _ = run_chart(item.reference, self.limits, role="golden", graph=graph, python=self._python())
        if info is None or info.get("died"):
            why = info["died"] if info else f"sandbox status {res.status}, limit {res.limit}"
            raise RuntimeError(f"ChartMimic item {item.id!r}: the reference program failed ({why}):\n"
                               f"{res.stderr[-2000:]}")
        with self._ref_lock:
            self._ref_cache[key] = info
        return info

    def observe(self, item: Item, generation: str) -> dict[str, Any]:
        """Scores plus what was logged for the generation (for debugging a disagreement)."""
        ref = self.reference_info(item)
        program = generation_program(generation)
        if program is None:
            return {"exec_ok": 0.0, **ZERO_SCORES, "why": "no ```python block"}
        res, info, _ = run_chart(program, self.limits, role="generation", graph=item.id.startswith("graph"),
                                 python=self._python())
        exec_ok = bool(info and not info.get("died") and not info.get("program_failed") and info.get("pdf_written"))
        if not exec_ok:
            why = (info or {}).get("died") or (info or {}).get("program_failed") or f"sandbox status {res.status}"
            return {"exec_ok": 0.0, **ZERO_SCORES, "why": why}
        return {"exec_ok": 1.0, **compare(info, ref, item.id), "logged": info, "logged_reference": ref}

    def score(self, item: Item, generation: str) -> dict[str, float]:
        return {k: v for k, v in self.observe(item, generation).items() if isinstance(v, float)}

    def aggregate(self, rows: Sequence[dict[str, float]], num_samples: int = 1) -> dict[str, float]:
        out = super().aggregate(rows, num_samples)
        if "exec_ok" in out:
            out["exec_rate"] = 100.0 * out["exec_ok"]
        return out

    def check_adapter(self):
        from viscodex_jax.eval.chartmimic.check import ChartMimicCheck

        return ChartMimicCheck(self)

    # -- sample -------------------------------------------------------------------------------------
    @staticmethod
    def make_sample(out_dir: str) -> str:
        """Four charts in the ``<name>.py`` + ``<name>.png`` layout under ``out_dir/direct_sample``."""
        from viscodex_jax.eval.chartmimic.samples import SAMPLE_CHARTS

        folder = os.path.join(out_dir, "direct_sample")
        os.makedirs(folder, exist_ok=True)
        for name, code in SAMPLE_CHARTS.items():
            res, _, png = run_chart(code, Limits(wall_seconds=60, cpu_seconds=30), render="chart.png")
            if png is None:
                raise RuntimeError(f"sample chart {name!r} did not render: {res.status}\n{res.stderr[-2000:]}")
            with open(os.path.join(folder, name + ".py"), "w", encoding="utf-8") as f:
                f.write(code)
            with open(os.path.join(folder, name + ".png"), "wb") as f:
                f.write(png)
        return out_dir
