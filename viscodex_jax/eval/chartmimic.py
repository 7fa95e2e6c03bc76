"""ChartMimic "direct mimic": chart image -> matplotlib code, scored by ChartMimic's low-level metrics.

Layout read (the published one): a folder of pairs ``<name>.png`` (the chart) and
``<name>.py`` (the reference matplotlib code), e.g. ``dataset/direct_600/``; ``root``
may be that folder or its parent holding a ``direct*/`` folder.

Scoring. The generated code (the last fenced block, ``extract_code``) and the
reference code each run in the sandbox (``eval.sandbox.run_python``) under a small
harness (``_HARNESS``, the sandbox's ``main.py``) that execs the program from
``program.py`` with ``plt.show`` made a no-op, ``savefig`` kept inside the sandbox
dir, and then walks every figure and writes ``chart_info.json``:

* texts: every visible non-empty Text (titles, suptitle, axis labels, tick labels,
  offset texts, legend texts and titles, texts and annotations, table cells);
* layout: per Axes, its subplotspec geometry ``(nrows, ncols, row0, row1, col0, col1)``,
  or its figure-normalised bbox rounded to 0.1 when it has no subplotspec;
* chart types: the plotting calls made on each Axes (outermost call only, so
  ``hist`` is not also ``bar`` and ``boxplot`` not also ``line``), plus artists the
  program added directly (``add_patch``/``add_collection``/``add_line``/``add_image``),
  classified by artist class; decorations (``axhline``, ``axvspan``, colorbars,
  legends, inset indicators) do not count;
* colors: the distinct hex colors of data-carrying artists (lines, patches such as
  bars and wedges, collections such as scatter/area/heatmap cells, images), at most
  ``_MAX_COLORS`` of them, most frequent first.

Metrics, each an F1 x100: text (multiset of normalised strings), layout (multiset of
layout tuples), type (set of chart types), color (soft: Hungarian assignment on the
CIEDE2000 similarity of ``eval.colors``; precision = matched similarity / #generated
colors, recall = matched similarity / #reference colors). ``score`` is their mean
(ChartMimic's low-level score). Both sides empty counts as a perfect match. Code that
does not run, or runs without making a figure, scores 0 with ``exec_ok`` 0.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import re
from typing import Any, Sequence

from PIL import Image

from viscodex_jax.eval.base import Benchmark, Item, extract_code
from viscodex_jax.eval.colors import similarity_matrix
from viscodex_jax.eval.sandbox import Limits, SandboxResult, run_python

INSTRUCTION = (
    "You are an expert Python developer who specializes in writing matplotlib code based on a given picture. "
    "The picture below is a chart taken from a scientific paper, and its source code is not available. "
    "Please write Python code that reproduces this chart as faithfully as possible: the same chart type(s), "
    "the same data, the same texts (title, axis labels, tick labels, legend), the same colors and the same "
    "subplot layout.\n"
    "Note that you should use figsize={figsize} to make the figure the same size as the original.\n"
    "Now, please give me the matplotlib code that reproduces the picture below. "
    "Answer with the complete program in a single ```python code block."
)

_INFO_FILE = "chart_info.json"
_PROGRAM_FILE = "program.py"
_SETTINGS_FILE = "harness.json"
_MAX_COLORS = 128

# Runs inside the sandbox as main.py: hooks matplotlib, execs program.py, dumps the chart info.
_HARNESS = r'''
import json, os, sys, collections
import numpy as np
import matplotlib
matplotlib.use("Agg")
matplotlib.use = lambda *a, **k: None  # the program cannot switch to an interactive backend
import matplotlib.pyplot as plt
from matplotlib._pylab_helpers import Gcf
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib import colors as mcolors, collections as mcoll, patches as mpatches, lines as mlines, image as mimage

with open("harness.json") as _f:
    _SETTINGS = json.load(_f)

_KEPT = {}  # id -> figure, for figures the program saved or closed
_WARNINGS = []  # extraction problems, reported in the info


def _keep(fig):
    if isinstance(fig, Figure):
        _KEPT.setdefault(id(fig), fig)


plt.show = lambda *a, **k: None
Figure.show = lambda self, *a, **k: None
plt.switch_backend("Agg")  # resolve the backend now, then keep it
plt.switch_backend = lambda *a, **k: None
plt.pause = lambda *a, **k: None
_orig_savefig = Figure.savefig


def _savefig(self, fname, *args, **kwargs):
    _keep(self)
    if isinstance(fname, (str, os.PathLike)):  # keep it inside the sandbox dir
        fname = os.path.basename(os.fspath(fname)) or "figure.png"
    return _orig_savefig(self, fname, *args, **kwargs)


Figure.savefig = _savefig
_orig_close = plt.close


def _close(fig=None):
    try:
        if fig is None:
            m = Gcf.get_active()
            figs = [m.canvas.figure] if m else []
        elif isinstance(fig, str) and fig == "all":
            figs = [m.canvas.figure for m in Gcf.get_all_fig_managers()]
        elif isinstance(fig, Figure):
            figs = [fig]
        elif isinstance(fig, str):
            figs = [m.canvas.figure for m in Gcf.get_all_fig_managers() if m.canvas.figure.get_label() == fig]
        else:
            m = Gcf.get_fig_manager(fig)
            figs = [m.canvas.figure] if m else []
        for f in figs:
            _keep(f)
    except Exception:
        pass
    return _orig_close(fig)


plt.close = _close

# -- chart types: plotting calls, outermost only ------------------------------------------------
_TYPES = {
    "plot": "line", "step": "line", "loglog": "line", "semilogx": "line", "semilogy": "line", "plot_date": "line",
    "stairs": "line", "ecdf": "line", "hlines": "line", "vlines": "line", "eventplot": "line", "triplot": "line",
    "bar": "bar", "barh": "bar", "broken_barh": "bar",
    "scatter": "scatter", "pie": "pie", "hist": "hist", "hexbin": "hexbin",
    "boxplot": "box", "bxp": "box", "violinplot": "violin", "violin": "violin",
    "errorbar": "errorbar", "stem": "stem",
    "fill_between": "area", "fill_betweenx": "area", "stackplot": "area", "fill": "area",
    "imshow": "heatmap", "matshow": "heatmap", "pcolor": "heatmap", "pcolormesh": "heatmap", "pcolorfast": "heatmap",
    "hist2d": "heatmap", "tripcolor": "heatmap", "specgram": "heatmap", "spy": "heatmap",
    "contour": "contour", "contourf": "contour", "tricontour": "contour", "tricontourf": "contour",
    "quiver": "quiver", "barbs": "quiver", "streamplot": "stream",
    # 3D axes
    "plot_surface": "surface", "plot_trisurf": "surface", "plot_wireframe": "wireframe", "bar3d": "bar3d",
    "plot3D": "line", "scatter3D": "scatter", "contour3D": "contour", "contourf3D": "contour",
    # decorations and helpers: they only hide the calls they make
    "axhline": None, "axvline": None, "axline": None, "axhspan": None, "axvspan": None,
    "indicate_inset": None, "indicate_inset_zoom": None, "legend": None, "annotate": None, "text": None,
    "table": None, "bar_label": None, "grid": None, "arrow": None,
}
_ADDERS = ("add_patch", "add_collection", "add_line", "add_image")
_DEPTH = [0]


def _record(ax, kind):
    if kind:
        ax.__dict__.setdefault("_vx_types", []).append(kind)


def _artist_kind(art):
    if isinstance(art, mpatches.Wedge):
        return "pie"
    if isinstance(art, mpatches.Rectangle):
        return "bar"
    if isinstance(art, mpatches.Polygon):
        return "area"
    if isinstance(art, mcoll.QuadMesh) or isinstance(art, mimage.AxesImage):
        return "heatmap"
    if isinstance(art, mcoll.PathCollection):
        return "scatter"
    if isinstance(art, mcoll.PolyCollection):
        return "area"
    if isinstance(art, mcoll.LineCollection) or isinstance(art, mlines.Line2D):
        return "line"
    return None


def _wrap(cls, name, kind):
    orig = cls.__dict__.get(name)
    if orig is None or not callable(orig):
        return

    def wrapper(self, *args, **kwargs):
        outer = _DEPTH[0] == 0
        _DEPTH[0] += 1
        try:
            result = orig(self, *args, **kwargs)
        finally:
            _DEPTH[0] -= 1
        if outer:
            try:
                _record(self, _artist_kind(args[0]) if name in _ADDERS and args else kind)
            except Exception:
                pass
        return result

    wrapper.__name__, wrapper.__doc__, wrapper.__wrapped__ = name, orig.__doc__, orig
    setattr(cls, name, wrapper)


_classes = [Axes]
try:
    from mpl_toolkits.mplot3d import Axes3D
    _classes.append(Axes3D)
except Exception:
    pass
from matplotlib.axes import _base as _axes_base
_classes.append(_axes_base._AxesBase)
for _cls in _classes:
    for _name, _kind in _TYPES.items():
        _wrap(_cls, _name, _kind)
    for _name in _ADDERS:
        _wrap(_cls, _name, None)
try:  # a colorbar draws its own mesh and patches: not chart content
    import matplotlib.colorbar as _mcb
    _wrap(_mcb.Colorbar, "__init__", None)
except Exception:
    pass


# -- extraction ---------------------------------------------------------------------------------
def _norm(s):
    return " ".join(s.replace("\u2212", "-").split())


def _texts(fig):
    out, seen = [], set()

    def add(t):
        try:
            if t is None or id(t) in seen or not t.get_visible():
                return
            seen.add(id(t))
            s = _norm(t.get_text())
        except Exception:
            return
        if s:
            out.append(s)

    def add_legend(lg):
        if lg is not None and lg.get_visible():
            add(lg.get_title())
            for t in lg.get_texts():
                add(t)

    for attr in ("_suptitle", "_supxlabel", "_supylabel"):
        add(getattr(fig, attr, None))
    for t in fig.texts:
        add(t)
    for lg in fig.legends:
        add_legend(lg)
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for attr in ("title", "_left_title", "_right_title"):
            add(getattr(ax, attr, None))
        if getattr(ax, "_axis3don", ax.axison):  # 3D axes keep their own switch
            axes = list(getattr(ax, "_axis_map", {}).values()) or [ax.xaxis, ax.yaxis]
            for axis in axes:
                if not axis.get_visible():
                    continue
                add(axis.label)
                try:  # only the ticks inside the view interval are drawn
                    for tick in axis._update_ticks():
                        add(tick.label1)
                        add(tick.label2)
                except Exception:
                    for t in axis.get_ticklabels(which="both"):
                        add(t)
                add(axis.get_offset_text())
        for t in ax.texts:
            add(t)
        add_legend(ax.get_legend())
        for tb in getattr(ax, "tables", []):
            for cell in tb.get_celld().values():
                add(cell.get_text())
    return out


def _layout(ax):
    spec = ax.get_subplotspec()
    if spec is not None:
        spec = spec.get_topmost_subplotspec()  # a colorbar nests the parent's slot: keep the slot
        nr, nc = spec.get_gridspec().get_geometry()
        return ["grid", nr, nc, spec.rowspan.start, spec.rowspan.stop, spec.colspan.start, spec.colspan.stop]
    b = ax.get_position()
    return ["box"] + [round(float(v), 1) + 0.0 for v in (b.x0, b.y0, b.x1, b.y1)]


def _hex(rgba):
    r, g, b = (int(round(float(v) * 255)) for v in rgba[:3])
    return "#%02x%02x%02x" % (r, g, b)


def _add_colors(counter, arr):
    arr = mcolors.to_rgba_array(arr) if not isinstance(arr, str) else mcolors.to_rgba_array([arr])
    arr = arr.reshape(-1, 4)
    for rgba in arr[arr[:, 3] > 0]:
        counter[_hex(rgba)] += 1


def _colors(ax, counter):
    for ln in ax.lines:
        if ln.get_visible():
            if ln.get_linestyle() in ("None", "none", "", " ") and ln.get_marker() not in (None, "None", "none", ""):
                fc = ln.get_markerfacecolor()
                _add_colors(counter, fc if mcolors.to_rgba(fc)[3] > 0 else ln.get_markeredgecolor())
            else:
                _add_colors(counter, ln.get_color())
    for p in ax.patches:
        if p.get_visible():
            fc = p.get_facecolor()
            if p.get_fill() and fc[3] > 0:
                _add_colors(counter, fc)
            elif p.get_linewidth() > 0:
                _add_colors(counter, p.get_edgecolor())
    for c in ax.collections:
        if not c.get_visible():
            continue
        fc = np.asarray(c.get_facecolor()).reshape(-1, 4)
        if len(fc) and (fc[:, 3] > 0).any():
            _add_colors(counter, fc)
        else:
            ec = np.asarray(c.get_edgecolor()).reshape(-1, 4)
            if len(ec):
                _add_colors(counter, ec)
    for im in ax.images:
        try:
            a = im.get_array()
            if a is None or a.size > 4_000_000:
                continue
            rgba = im.to_rgba(a, norm=a.ndim == 2) if a.ndim == 2 else a
            rgba = np.asarray(rgba, dtype=float).reshape(-1, rgba.shape[-1])
            if rgba.max() > 1.0:
                rgba = rgba / 255.0
            if rgba.shape[1] == 3:
                rgba = np.concatenate([rgba, np.ones((len(rgba), 1))], 1)
            uniq, counts = np.unique(np.round(rgba * 255).astype(int), axis=0, return_counts=True)
            for u, n in zip(uniq, counts):
                if u[3] > 0:
                    counter["#%02x%02x%02x" % tuple(int(v) for v in u[:3])] += int(n)
        except Exception as e:
            _WARNINGS.append("image colors: %r" % (e,))


def _info(figs):
    texts, layout, types, colors = [], [], set(), collections.Counter()
    for fig in figs:
        try:
            fig.canvas.draw()  # tick labels and mapped colors exist only after a draw
        except Exception as e:
            _WARNINGS.append("draw: %r" % (e,))
        texts += _texts(fig)
        for ax in fig.axes:
            if not ax.get_visible():
                continue
            if getattr(ax, "_colorbar", None) is not None:
                continue  # a colorbar is not a panel: its texts count, not its layout, types or colors
            layout.append(_layout(ax))
            types.update(ax.__dict__.get("_vx_types", []))
            try:
                _colors(ax, colors)
            except Exception as e:
                _WARNINGS.append("colors: %r" % (e,))
    return {"n_figures": len(figs), "texts": texts, "layout": layout, "types": sorted(types),
            "colors": [c for c, _ in colors.most_common(_SETTINGS.get("max_colors", 128))], "warnings": _WARNINGS}


def _figures():
    figs = dict(_KEPT)
    for m in Gcf.get_all_fig_managers():
        figs.setdefault(id(m.canvas.figure), m.canvas.figure)
    return list(figs.values())


with open("program.py", encoding="utf-8") as _f:
    _src = _f.read()
_globals = {"__name__": "__main__", "__file__": os.path.abspath("program.py"), "__builtins__": __builtins__}
sys.argv = ["program.py"]
try:
    exec(compile(_src, "program.py", "exec"), _globals)
except SystemExit as _e:
    if _e.code not in (None, 0):
        raise
_figs = _figures()
if _SETTINGS.get("render"):
    _m = Gcf.get_active()
    _fig = _m.canvas.figure if _m else (_figs[-1] if _figs else None)
    if _fig is not None:
        _orig_savefig(_fig, _SETTINGS["render"], dpi=_SETTINGS.get("dpi", 100))
with open("chart_info.json", "w") as _f:
    json.dump(_info(_figs), _f)
'''


_FONT_CACHE: dict[str, bytes] | None = None


def _font_cache() -> dict[str, bytes]:
    """matplotlib's font list, built once by a trusted sandbox run and handed to every later run.

    Each sandbox starts with an empty MPLCONFIGDIR, so matplotlib would rebuild the list on
    every import (~0.2 s). Never taken from a run of untrusted code, so it cannot be tampered with.
    """
    global _FONT_CACHE
    if _FONT_CACHE is None:
        _FONT_CACHE = {}
        probe = ("import glob, os\nimport matplotlib.pyplot\n"
                 "for p in glob.glob('.mpl/fontlist-*.json'):\n    os.replace(p, 'fontlist.json')\n"
                 "    print(os.path.basename(p))\n")
        try:
            res = run_python(probe, collect=("fontlist.json",))
            name = res.stdout.strip().splitlines()[-1] if res.ok and res.stdout.strip() else ""
            data = res.files.get("fontlist.json")
            if name.startswith("fontlist-") and name.endswith(".json") and "/" not in name and data:
                json.loads(data)
                _FONT_CACHE = {f".mpl/{name}": data}
        except Exception:  # no cache: every run builds its own
            _FONT_CACHE = {}
    return _FONT_CACHE


def run_chart(code: str, limits: Limits = Limits(), render: str | None = None,
              dpi: int = 100) -> tuple[SandboxResult, dict[str, Any] | None, bytes | None]:
    """Runs chart code in the sandbox under the harness.

    Returns the sandbox result, the extracted chart info (None when the program failed
    or wrote none) and, when ``render`` names a file (e.g. "chart.png"), the image of the
    program's current figure saved there (None when there was no figure).
    """
    settings = {"render": render, "dpi": dpi, "max_colors": _MAX_COLORS}
    files = {**_font_cache(), _PROGRAM_FILE: code, _SETTINGS_FILE: json.dumps(settings)}
    res = run_python(_HARNESS, limits=limits, files=files,
                     collect=(_INFO_FILE,) + ((render,) if render else ()))
    info = None
    if res.ok and _INFO_FILE in res.files:
        try:
            info = json.loads(res.files[_INFO_FILE].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            info = None
    return res, info, res.files.get(render) if render else None


def f1(gen: Sequence[Any], ref: Sequence[Any]) -> float:
    """Multiset F1 x100 (items must be hashable); both empty -> 100."""
    if not gen and not ref:
        return 100.0
    if not gen or not ref:
        return 0.0
    hit = sum((collections.Counter(gen) & collections.Counter(ref)).values())
    if hit == 0:
        return 0.0
    p, r = hit / len(gen), hit / len(ref)
    return 100.0 * 2 * p * r / (p + r)


def color_f1(gen: Sequence[str], ref: Sequence[str]) -> float:
    """Soft color F1 x100: Hungarian assignment maximising CIEDE2000 similarity; both empty -> 100."""
    from scipy.optimize import linear_sum_assignment

    if not gen and not ref:
        return 100.0
    if not gen or not ref:
        return 0.0
    sim = similarity_matrix(list(gen), list(ref))
    rows, cols = linear_sum_assignment(sim, maximize=True)
    matched = float(sim[rows, cols].sum())
    if matched <= 0:
        return 0.0
    p, r = matched / len(gen), matched / len(ref)
    return 100.0 * 2 * p * r / (p + r)


def compare(gen: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """The four low-level metrics (x100) and their mean, from two chart-info dicts."""
    m = {
        "text_f1": f1(gen["texts"], ref["texts"]),
        "layout_f1": f1([tuple(x) for x in gen["layout"]], [tuple(x) for x in ref["layout"]]),
        "type_f1": f1(sorted(set(gen["types"])), sorted(set(ref["types"]))),
        "color_f1": color_f1(gen["colors"], ref["colors"]),
    }
    m["score"] = sum(m.values()) / 4
    return m


_FIGSIZE = re.compile(r"figsize\s*=\s*[(\[]\s*([0-9]*\.?[0-9]+)\s*,\s*([0-9]*\.?[0-9]+)\s*[)\]]")


def _figsize_hint(reference: str, image_size: tuple[int, int]) -> str:
    """The figsize for the prompt: the reference code's own (as ChartMimic's per-item dimensions are),
    else the image size at 100 dpi."""
    m = _FIGSIZE.search(reference)
    w, h = (float(m.group(1)), float(m.group(2))) if m else (image_size[0] / 100, image_size[1] / 100)
    return f"({w:.1f}, {h:.1f})"


def direct_mimic_prompt(reference: str, image_size: tuple[int, int]) -> str:
    """The instruction an item is asked with (training data can use the same wording)."""
    return INSTRUCTION.format(figsize=_figsize_hint(reference, image_size))


_ZERO = {"text_f1": 0.0, "layout_f1": 0.0, "type_f1": 0.0, "color_f1": 0.0, "score": 0.0}


class ChartMimic(Benchmark):
    name = "chartmimic"

    def __init__(self, limits: Limits = Limits(wall_seconds=30, cpu_seconds=20), subset: str | None = None):
        """``subset``: which ``direct*`` folder to read when ``root`` is the dataset folder (default: the
        first in sorted order)."""
        self.limits = limits
        self.subset = subset
        self._ref_cache: dict[str, dict[str, Any]] = {}

    # -- layout -------------------------------------------------------------------------------------
    def _folder(self, root: str) -> str:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such ChartMimic folder")
        if self.subset:
            if os.path.isdir(os.path.join(root, self.subset)):
                return os.path.join(root, self.subset)
            if os.path.basename(os.path.normpath(root)) == self.subset:
                return root
            raise FileNotFoundError(f"{root}: no ChartMimic subset folder {self.subset!r}")
        if glob.glob(os.path.join(root, "*.py")) and glob.glob(os.path.join(root, "*.png")):
            return root
        subs = sorted(d for d in glob.glob(os.path.join(root, "direct*")) if os.path.isdir(d))
        if not subs:
            raise FileNotFoundError(f"{root}: neither <name>.png/<name>.py pairs nor a direct*/ folder")
        return subs[0]

    def load(self, root: str, limit: int | None = None) -> list[Item]:
        folder = self._folder(root)
        items = []
        for png in sorted(glob.glob(os.path.join(folder, "*.png"))):
            name = os.path.splitext(os.path.basename(png))[0]
            py = os.path.join(folder, name + ".py")
            if not os.path.isfile(py):
                continue  # a chart without reference code cannot be scored
            with open(py, encoding="utf-8") as f:
                reference = f.read()
            with Image.open(png) as im:
                image = im.convert("RGB")
            text = direct_mimic_prompt(reference, image.size)
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
            items.append(Item(name, messages, [image], reference))
            if limit is not None and len(items) >= limit:
                break
        if not items:
            raise FileNotFoundError(f"{folder}: no <name>.png with a matching <name>.py")
        return items

    # -- scoring ------------------------------------------------------------------------------------
    def reference_info(self, item: Item) -> dict[str, Any]:
        """Chart info of the item's reference code (cached); raises if the reference does not run."""
        key = hashlib.sha256(item.reference.encode("utf-8")).hexdigest()
        if key not in self._ref_cache:
            res, info, _ = run_chart(item.reference, self.limits)
            if info is None:
                raise RuntimeError(f"ChartMimic item {item.id!r}: the reference code failed in the sandbox "
                                   f"(status {res.status}, limit {res.limit}):\n{res.stderr[-2000:]}")
            if not info.get("n_figures"):
                raise RuntimeError(f"ChartMimic item {item.id!r}: the reference code ran but made no figure")
            self._ref_cache[key] = info
        return self._ref_cache[key]

    def score(self, item: Item, generation: str) -> dict[str, float]:
        ref = self.reference_info(item)
        code = extract_code(generation)
        res, info, _ = run_chart(code, self.limits)
        if info is None or not info.get("n_figures"):  # failed, or ran without drawing a chart
            return {"exec_ok": 0.0, **_ZERO}
        return {"exec_ok": 1.0, **compare(info, ref)}

    def aggregate(self, rows: Sequence[dict[str, float]]) -> dict[str, float]:
        out = super().aggregate(rows)
        if "exec_ok" in out:
            out["exec_rate"] = 100.0 * out["exec_ok"]
        return out

    # -- sample -------------------------------------------------------------------------------------
    @staticmethod
    def make_sample(out_dir: str) -> str:
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


SAMPLE_CHARTS = {
    "bar_1": '''import matplotlib.pyplot as plt
import numpy as np

# Data
models = ["Base", "+ SFT", "+ Merge", "Ours"]
accuracy = [52.1, 61.4, 66.0, 71.3]
latency = [40.2, 41.0, 41.5, 39.8]

x = np.arange(len(models))
width = 0.38
fig, ax = plt.subplots(figsize=(6, 4))
ax.bar(x - width / 2, accuracy, width, label="Accuracy", color="#4C72B0")
ax.bar(x + width / 2, latency, width, label="Latency (ms)", color="#DD8452")
ax.set_title("Accuracy and latency by model")
ax.set_xlabel("Model")
ax.set_ylabel("Value")
ax.set_xticks(x)
ax.set_xticklabels(models)
ax.set_ylim(0, 80)
ax.legend(loc="upper left")

plt.tight_layout()
plt.savefig("bar_1.pdf", bbox_inches="tight")
''',
    "line_1": '''import matplotlib.pyplot as plt
import numpy as np

steps = np.arange(0, 11)
train = 2.5 * np.exp(-steps / 4) + 0.3
valid = 2.6 * np.exp(-steps / 5) + 0.45

plt.figure(figsize=(6, 4))
plt.plot(steps, train, marker="o", color="#2ca02c", label="train")
plt.plot(steps, valid, marker="s", linestyle="--", color="#9467bd", label="validation")
plt.title("Loss curves")
plt.xlabel("Epoch")
plt.ylabel("Loss")
plt.grid(True, alpha=0.3)
plt.legend()
plt.tight_layout()
plt.show()
''',
    "pie_1": '''import matplotlib.pyplot as plt

labels = ["Python", "HTML", "CSS", "Other"]
sizes = [45, 25, 20, 10]
colors = ["#66c2a5", "#fc8d62", "#8da0cb", "#e78ac3"]

fig, ax = plt.subplots(figsize=(5, 5))
ax.pie(sizes, labels=labels, colors=colors, autopct="%1.0f%%", startangle=90)
ax.set_title("Share of training code")
plt.savefig("pie_1.png")
''',
    "subplots_1": '''import matplotlib.pyplot as plt
import numpy as np

rng = np.random.default_rng(0)
x = rng.normal(size=40)
y = 0.8 * x + rng.normal(scale=0.4, size=40)
t = np.linspace(0, 10, 50)

fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 7))
ax1.scatter(x, y, color="#e41a1c", s=20, label="samples")
ax1.set_title("Correlation")
ax1.set_xlabel("x")
ax1.set_ylabel("y")
ax1.legend()
ax2.fill_between(t, np.sin(t) + 1.5, color="#377eb8", alpha=0.6)
ax2.plot(t, np.sin(t) + 1.5, color="#084081")
ax2.set_title("Signal")
ax2.set_xlabel("time (s)")
ax2.set_ylabel("amplitude")
fig.suptitle("Two panels")
plt.tight_layout()
plt.savefig("subplots_1.pdf")
''',
}
