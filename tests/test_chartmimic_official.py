"""ChartMimic against the official evaluator: parity over the shared pairs, the ori_500 loader, the scoring runtime.

The shared set (``shared/benchmarks/chartmimic``: 21 reference programs in the ``ori_500`` layout, 67
responses, and the official per-pair scores) is read through the fixture below; it is not copied in.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from viscodex_jax.eval.base import Item, UnreadableItem
from viscodex_jax.eval.chartmimic.benchmark import INSTRUCTION, ChartMimic
from viscodex_jax.eval.chartmimic.check import MEAN_TOLERANCE, TOLERANCE
from viscodex_jax.eval.chartmimic.programs import scoring_python
from viscodex_jax.eval.check import run_check

METRICS = (("text_f1", "text"), ("layout_f1", "layout"), ("type_f1", "type"), ("color_f1", "color"),
           ("score", "score"))


@pytest.fixture(scope="module")
def chartmimic_dir() -> Path:
    d = Path(__file__).parents[2] / "shared" / "benchmarks" / "chartmimic"
    if not (d / "expected.jsonl").is_file():
        pytest.fail(f"{d}: the shared ChartMimic reference set (ori_500/, candidates/, expected.jsonl) is missing")
    return d


@pytest.fixture(scope="module")
def scoring_runtime() -> str:
    py = scoring_python()
    if py is None:
        pytest.fail("no scoring venv (.venv-score or $VISCODEX_SCORING_PYTHON): run launch/setup_scoring_env.sh")
    return py


def test_parity_with_official_scores(chartmimic_dir, scoring_runtime):
    report = run_check(ChartMimic(), str(chartmimic_dir), max_workers=2)
    rows = []
    for r in report.results:
        e = r.triple.expected
        diffs = {ours: abs(float(r.observed.get(ours, float("nan"))) - float(e[off])) for ours, off in METRICS}
        rows.append((r.triple.item_id, r.triple.candidate, r.error, diffs, r.observed, e))
    n = len(rows)
    assert n == 67
    problems = []
    exec_agree = sum(float(r.observed.get("exec_ok", -1)) == float(r.triple.expected["exec_ok"])
                     for r in report.results)
    if exec_agree < 0.97 * n:
        problems.append(f"exec_ok agrees on {exec_agree}/{n}")
    for ours, off in METRICS:
        within = sum(d[ours] <= TOLERANCE for *_, d, _, _ in rows)
        mean_ours = sum(float(o.get(ours, 0.0)) for *_, o, _ in rows) / n
        mean_off = sum(float(e[off]) for *_, e in rows) / n
        if within < 0.97 * n or abs(mean_ours - mean_off) > MEAN_TOLERANCE:
            problems.append(f"{off}: {within}/{n} within {TOLERANCE}, mean ours {mean_ours:.3f} vs official "
                            f"{mean_off:.3f}")
    if problems:
        worst = sorted(rows, key=lambda x: -max((v for v in x[3].values() if v == v), default=float("inf")))[:15]
        lines = [f"  {ref}/{cand}: error={err} " + ", ".join(
            f"{off} ours {o.get(ours)} official {e[off]:.2f}" for ours, off in METRICS) for ref, cand, err, _, o, e in worst]
        pytest.fail("ChartMimic parity outside the band:\n" + "\n".join(problems) + "\nworst pairs:\n" + "\n".join(lines))


def _ori_500_folder(src: Path, dst: Path, names) -> Path:
    """An ``ori_500``-style copy (``.py`` + ``.pdf``, no PNG) of some shared references, in a temp dir."""
    folder = dst / "dataset" / "ori_500"
    folder.mkdir(parents=True)
    for n in names:
        shutil.copy(src / "ori_500" / f"{n}.py", folder / f"{n}.py")
        shutil.copy(src / "ori_500" / f"{n}.pdf", folder / f"{n}.pdf")
    return folder


def test_ori_500_loader_renders_pdf_at_120_dpi(chartmimic_dir, tmp_path):
    folder = _ori_500_folder(chartmimic_dir, tmp_path, ["bar_1", "pie_1"])
    (folder / "orphan.py").write_text("print('no chart for this one')\n")  # no image: not an item
    items = ChartMimic().load(str(tmp_path / "dataset"))  # the dataset folder: ori_500/ is found in it
    assert [it.id for it in items] == ["bar_1", "pie_1"]
    for it in items:
        shipped = np.asarray(Image.open(chartmimic_dir / "ori_500" / f"{it.id}.png").convert("RGB"), dtype=float)
        ours = np.asarray(it.images[0], dtype=float)
        assert ours.shape == shipped.shape, it.id  # same pixel size as pdf2image at 120 dpi
        assert np.abs(ours - shipped).mean() < 8.0, it.id  # rasterisers differ only in anti-aliasing
        text = it.messages[0]["content"][0]["text"]
        assert it.messages[0]["content"][1] == {"type": "image"}
        assert text.startswith(INSTRUCTION.split("{")[0]) and it.reference.startswith("# ===")
    assert "figsize=(7.0, 4.5)" in items[0].messages[0]["content"][0]["text"]  # the reference's own figsize
    # dimentions_info.jsonl (the official source of the prompt's figsize) wins where it lists the item
    (tmp_path / "dimentions_info.jsonl").write_text(json.dumps({"idx": "bar_1", "width": 9.0, "height": 3.0}) + "\n")
    pie_before = items[1].messages[0]["content"][0]["text"]
    items = ChartMimic().load(str(folder))
    assert "figsize=(9.0, 3.0)" in items[0].messages[0]["content"][0]["text"]
    assert items[1].messages[0]["content"][0]["text"] == pie_before  # not listed: its own figsize


def test_unreadable_pdf_is_a_failed_item_or_a_clear_error(chartmimic_dir, tmp_path):
    folder = _ori_500_folder(chartmimic_dir, tmp_path, ["bar_1"])
    (folder / "broken.py").write_text("import matplotlib.pyplot as plt\n")
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a pdf")
    with pytest.raises(ValueError, match="broken.pdf"):
        ChartMimic().load(str(folder))
    items = ChartMimic(on_error="skip").load(str(folder))
    assert [it.id for it in items] == ["bar_1", "broken"]
    assert isinstance(items[1].reference, UnreadableItem) and "broken.pdf" in items[1].reference.reason


def test_failing_reference_fails_its_item_only(scoring_runtime):
    bench = ChartMimic()
    bad = Item("bad_ref", [], [], "import matplotlib.pyplot as plt\nplt.plot([1, 2])\nraise ValueError('boom')\n")
    good = Item("good_ref", [], [], "import matplotlib.pyplot as plt\nplt.plot([1, 2], color='red')\n"
                                    "plt.title('t')\nplt.savefig('good_ref.pdf')\n")
    with pytest.raises(RuntimeError, match="bad_ref.*boom"):
        bench.score(bad, "```python\nimport matplotlib.pyplot as plt\nplt.plot([1])\n```")
    assert bench.score(good, "```python\n" + good.reference + "```")["score"] == 100.0


PANDAS_SQUARIFY = '''# ===================
# Part 1: Importing Libraries
# ===================
import matplotlib.pyplot as plt
import pandas as pd
import squarify
from matplotlib import cm

# ===================
# Part 2: Data Preparation
# ===================
df = pd.DataFrame({"team": ["Vision", "Language", "Speech", "Robotics"], "gpus": [48, 32, 12, 8]})
colors = [cm.get_cmap("Pastel1")(i) for i in range(len(df))]

# ===================
# Part 3: Plot Configuration and Rendering
# ===================
fig, ax = plt.subplots(figsize=(6, 4))
squarify.plot(sizes=df["gpus"], label=df["team"], color=colors, alpha=0.9, ax=ax)
ax.set_title("GPU allocation by team")
ax.axis("off")

# ===================
# Part 4: Saving Output
# ===================
plt.tight_layout()
plt.savefig("treemap_1.pdf", bbox_inches="tight")
'''


def test_pandas_squarify_reference_scores_100_against_itself(scoring_runtime):
    bench = ChartMimic()
    item = Item("treemap_1", [], [], PANDAS_SQUARIFY)
    ref = bench.reference_info(item)
    assert ref["types"] == {"squarify/__init__.py-plot": 1}  # squarify is a traced chart type
    assert len(ref["colors"]) == 4 and "GPU allocation by team" in ref["texts"] and "Vision" in ref["texts"]
    m = bench.score(item, "Here it is:\n```python\n" + PANDAS_SQUARIFY + "```\n")
    assert m == {"exec_ok": 1.0, "text_f1": 100.0, "layout_f1": 100.0, "type_f1": 100.0, "color_f1": 100.0,
                 "score": 100.0, "colorless_reference": 0.0}


def test_scoring_runtime_has_official_pins(scoring_runtime):
    from viscodex_jax.eval.sandbox import run_python

    res = run_python("import matplotlib, numpy, pandas, seaborn, squarify, networkx, matplotlib_venn, scipy\n"
                     "print(matplotlib.__version__, numpy.__version__)\n", python=scoring_runtime)
    assert res.ok, res.stderr
    assert res.stdout.split() == ["3.8.4", "1.26.1"]
    assert os.path.isabs(scoring_runtime)
