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

Programs run in the sandbox (``eval.sandbox.run_python``) under ``eval/chartmimic_harness.py``, with the
interpreter of the scoring venv: ``$VISCODEX_SCORING_PYTHON`` when set, else ``<checkout>/.venv-score``
(``launch/setup_scoring_env.sh`` installs the official pins there: matplotlib 3.8.4, numpy 1.26,
pandas, seaborn, squarify, matplotlib-venn, networkx, scipy), else the current interpreter (whose newer
matplotlib lacks e.g. ``cm.get_cmap``, so some references fail and scores can drift from the official;
functions it no longer has go untraced and are listed in the logged ``missing_hooks``).
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
import threading
from typing import Any, Sequence

import numpy as np
from PIL import Image

from viscodex_jax.eval.base import Benchmark, Item
from viscodex_jax.eval.colors import similarity_matrix
from viscodex_jax.eval.sandbox import Limits, SandboxResult, run_python

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
SCORING_PYTHON_ENV = "VISCODEX_SCORING_PYTHON"
METRICS = ("text_f1", "layout_f1", "type_f1", "color_f1")

_HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "chartmimic_harness.py")
_INFO_FILE = "chart_info.json"
_PROGRAM_FILE = "program.py"
_FALLBACK_FILE = "program_no_ticks.py"
_SETTINGS_FILE = "harness.json"
_OUT_PDF = "generated.pdf"
_TICKS_STATEMENT = "\n__vx_clear_ticks__()\n"  # stands for the official tick-clearing lines (same syntax role)
_FENCE = re.compile(r"```python(.*?)```", re.DOTALL)
_COLOR_FILTER_MIN = 10  # more logged colours than this go through the official similarity filter


# -- interpreter -------------------------------------------------------------------------------------
def scoring_python() -> str | None:
    """The interpreter chart programs run with: ``$VISCODEX_SCORING_PYTHON``, else ``<checkout>/.venv-score``,
    else None (the current interpreter)."""
    env = os.environ.get(SCORING_PYTHON_ENV)
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise FileNotFoundError(f"${SCORING_PYTHON_ENV}={env}: not an executable Python interpreter")
        return os.path.abspath(env)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    venv = os.path.join(repo, ".venv-score", "bin", "python")
    return venv if os.path.isfile(venv) and os.access(venv, os.X_OK) else None


_FONT_CACHE: dict[str | None, dict[str, bytes]] = {}
_FONT_LOCK = threading.Lock()


def _font_cache(python: str | None) -> dict[str, bytes]:
    """matplotlib's font list, built once per interpreter by a trusted sandbox run and handed to later runs.

    Each sandbox starts with an empty MPLCONFIGDIR, so matplotlib would rebuild the list on every import
    (~0.2 s). Never taken from a run of untrusted code, so it cannot be tampered with.
    """
    with _FONT_LOCK:
        if python not in _FONT_CACHE:
            cache: dict[str, bytes] = {}
            probe = ("import glob, os\nimport matplotlib.pyplot\n"
                     "for p in glob.glob('.mpl/fontlist-*.json'):\n    os.replace(p, 'fontlist.json')\n"
                     "    print(os.path.basename(p))\n")
            try:
                res = run_python(probe, collect=("fontlist.json",), python=python)
                name = res.stdout.strip().splitlines()[-1] if res.ok and res.stdout.strip() else ""
                data = res.files.get("fontlist.json")
                if name.startswith("fontlist-") and name.endswith(".json") and "/" not in name and data:
                    json.loads(data)
                    cache = {f".mpl/{name}": data}
            except Exception:  # no cache: every run builds its own
                cache = {}
            _FONT_CACHE[python] = cache
        return _FONT_CACHE[python]


# -- programs ----------------------------------------------------------------------------------------
def official_code(response: str) -> str | None:
    """The first ```` ```python ```` block (what follows the fence word up to the closing fence), or None."""
    blocks = _FENCE.findall(response)
    return blocks[0] if blocks else None


def _cut(code: str) -> str:
    code = re.sub(r"plt\.savefig\(.*\n*", "", code, flags=re.S)
    return re.sub(r"plt.show\(.*\n*", "", code, flags=re.S)


def _with_ticks_cleared(code: str) -> str:
    """The official text evaluator's insertion point: before the first ``plt.savefig`` (or the last char)."""
    i = code.find("plt.savefig")
    return code[:i] + _TICKS_STATEMENT + code[i:]


def generation_program(response: str) -> str | None:
    """The official interpreter's program for a response (None when it has no ```python block), with the
    except branch reporting to the harness instead of ``pass``."""
    code = official_code(response)
    if code is None:
        return None
    code = _cut(code.replace("\n", "\n    "))
    return ("try:\n    " + code.strip() + "\nexcept Exception as e:\n    __vx_failed__()\n"
            f'plt.savefig("{_OUT_PDF}")')


def run_chart(code: str, limits: Limits = Limits(), render: str | None = None, dpi: int = 100,
              role: str = "golden", graph: bool = False, python: str | None = None
              ) -> tuple[SandboxResult, dict[str, Any] | None, bytes | None]:
    """Runs a chart program in the sandbox under the harness.

    ``role="golden"``: ``code`` runs as it is (a reference program); ``"generation"``: ``code`` is already
    the program of ``generation_program``. Returns the sandbox result, the logged chart info (None when the
    harness wrote none) and, when ``render`` names a file (e.g. "chart.png"), the current figure saved there.
    ``python``: default ``scoring_python()``.
    """
    python = scoring_python() if python is None else python
    with open(_HARNESS_PATH, encoding="utf-8") as f:
        harness = f.read()
    settings = {"program": _PROGRAM_FILE, "fallback": _FALLBACK_FILE, "role": role, "graph": graph,
                "out_pdf": _OUT_PDF if role == "generation" else None, "render": render, "dpi": dpi}
    files = {**_font_cache(python), _PROGRAM_FILE: _with_ticks_cleared(code), _FALLBACK_FILE: code,
             _SETTINGS_FILE: json.dumps(settings)}
    res = run_python(harness, limits=limits, files=files, python=python,
                     collect=(_INFO_FILE,) + ((render,) if render else ()))
    info = None
    if _INFO_FILE in res.files:
        try:
            info = json.loads(res.files[_INFO_FILE].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            info = None
    return res, info, res.files.get(render) if render else None


# -- metrics -----------------------------------------------------------------------------------------
def f1(gen: Sequence[Any], ref: Sequence[Any]) -> float:
    """Official multiset F1 x100 (items hashable); 0 when either side is empty."""
    if not gen or not ref:
        return 0.0
    hit = sum((collections.Counter(gen) & collections.Counter(ref)).values())
    if hit == 0:
        return 0.0
    p, r = hit / len(gen), hit / len(ref)
    return 100.0 * 2 * p * r / (p + r)


def type_f1(gen: dict[str, int], ref: dict[str, int]) -> float:
    """Official chart-type F1 x100 over call counts (fresh evaluator: 0 when either side logged none)."""
    if not gen or not ref:
        return 0.0
    hit = sum(min(n, ref[k]) for k, n in gen.items() if k in ref)
    p, r = hit / sum(gen.values()), hit / sum(ref.values())
    return 0.0 if p + r == 0 else 100.0 * 2 * p * r / (p + r)


def _similarity(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """Official pairwise similarity: CIEDE2000 for two hex colours, equality for two colormap names, else 0."""
    sim = np.zeros((len(a), len(b)))
    ha = [i for i, c in enumerate(a) if c.startswith("#")]
    hb = [j for j, c in enumerate(b) if c.startswith("#")]
    if ha and hb:
        sim[np.ix_(ha, hb)] = similarity_matrix([a[i] for i in ha], [b[j] for j in hb])
    for i, c in enumerate(a):
        if not c.startswith("#"):
            for j, d in enumerate(b):
                sim[i, j] = float(c == d)
    return sim


def filter_colors(logged: Sequence[str]) -> list[str]:
    """Official ``filter_color`` for more than 10 logged colours: keep one that is at most 0.7 similar to
    every colour kept before it, in the logged (set iteration) order."""
    if len(logged) <= _COLOR_FILTER_MIN:
        return list(logged)
    kept: list[str] = []
    for entry in logged:
        c = entry.split("--", 1)[1]
        if not kept or all(_similarity([c], [k.split("--", 1)[1]])[0, 0] <= 0.7 for k in kept):
            kept.append(entry)
    return kept


class ColorlessReference(Exception):
    """The reference logged no colour: the official colour evaluator divides by zero on it."""


def color_f1(gen: Sequence[str], ref: Sequence[str], guarded: bool = False) -> float:
    """Official colour F1 x100 over ``"<call>--<colour>"`` entries: optimal matching within each call group.

    Raises ``ColorlessReference`` when ``ref`` is empty, unless ``guarded`` (the official guard for "box").
    """
    from scipy.optimize import linear_sum_assignment

    groups: dict[str, tuple[list[str], list[str]]] = {}
    for side, entries in enumerate((gen, ref)):
        for e in entries:
            call, color = e.split("--", 1)
            groups.setdefault(call, ([], []))[side].append(color)
    total = 0.0
    for g, r in groups.values():
        if g and r:
            sim = _similarity(g, r)
            rows, cols = linear_sum_assignment(sim, maximize=True)
            total += float(sim[rows, cols].sum())
    p = total / len(gen) if gen else 0.0
    if not ref and not guarded:
        raise ColorlessReference("the reference logged no colour (official ZeroDivisionError)")
    r = total / len(ref) if ref else 0.0
    return 0.0 if p + r == 0 else 100.0 * 2 * p * r / (p + r)


def compare(gen: dict[str, Any], ref: dict[str, Any], name: str = "") -> dict[str, float]:
    """The four low-level metrics (x100), their mean, and ``colorless_reference``, from two harness infos.

    ``name`` is the item's name: "box" in it guards the colour recall, as the official path test does.
    """
    m = {
        "text_f1": f1(gen["texts"], ref["texts"]),
        "layout_f1": f1([tuple(x) for x in gen["layout"]], [tuple(x) for x in ref["layout"]]),
        "type_f1": type_f1(gen["types"], ref["types"]),
    }
    try:
        m["color_f1"] = color_f1(filter_colors(gen["colors"]), filter_colors(ref["colors"]), "box" in name)
    except ColorlessReference:  # the official run writes no result for the item: 0 on every metric
        return {**_ZERO, "colorless_reference": 1.0}
    m["score"] = sum(m[k] for k in METRICS) / 4
    m["colorless_reference"] = 0.0
    return m


_ZERO = {"text_f1": 0.0, "layout_f1": 0.0, "type_f1": 0.0, "color_f1": 0.0, "score": 0.0}


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
        from viscodex_jax.eval.runner import UnreadableItem

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
            return {"exec_ok": 0.0, **_ZERO, "why": "no ```python block"}
        res, info, _ = run_chart(program, self.limits, role="generation", graph=item.id.startswith("graph"),
                                 python=self._python())
        exec_ok = bool(info and not info.get("died") and not info.get("program_failed") and info.get("pdf_written"))
        if not exec_ok:
            why = (info or {}).get("died") or (info or {}).get("program_failed") or f"sandbox status {res.status}"
            return {"exec_ok": 0.0, **_ZERO, "why": why}
        return {"exec_ok": 1.0, **compare(info, ref, item.id), "logged": info, "logged_reference": ref}

    def score(self, item: Item, generation: str) -> dict[str, float]:
        return {k: v for k, v in self.observe(item, generation).items() if isinstance(v, float)}

    def aggregate(self, rows: Sequence[dict[str, float]]) -> dict[str, float]:
        out = super().aggregate(rows)
        if "exec_ok" in out:
            out["exec_rate"] = 100.0 * out["exec_ok"]
        return out

    def check_adapter(self):
        from viscodex_jax.eval.chartmimic_check import ChartMimicCheck

        return ChartMimicCheck(self)

    # -- sample -------------------------------------------------------------------------------------
    @staticmethod
    def make_sample(out_dir: str) -> str:
        """Four charts in the ``<name>.py`` + ``<name>.png`` layout under ``out_dir/direct_sample``."""
        from viscodex_jax.eval.chartmimic_samples import SAMPLE_CHARTS

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

