"""ChartMimic direct-mimic scoring (sandboxed chart extraction, four low-level F1s) and CIEDE2000.

Expectations changed for the official semantics (issue 11; the parity itself is tests/test_chartmimic_official.py):
both sides empty scores 0, colours are grouped by the call that drew them (bar -> plot loses the colours),
a response needs a ```python fence, a program that runs but draws nothing still executes (an empty figure
is saved), and ``sys.exit`` in the program fails it.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from viscodex_jax.eval.base import Item  # noqa: E402
from viscodex_jax.eval.chartmimic.benchmark import ChartMimic  # noqa: E402
from viscodex_jax.eval.chartmimic.metrics import ColorlessReference, color_f1, f1  # noqa: E402
from viscodex_jax.eval.chartmimic.programs import SCORING_PYTHON_ENV, scoring_python  # noqa: E402
from viscodex_jax.eval.colors import ciede2000, color_similarity, hex_or_rgb_to_lab, similarity_matrix  # noqa: E402

# Sharma, Wu & Dalal (2005), "The CIEDE2000 color-difference formula", Table 1: pairs 1, 4, 9, 13, 17, 25, 34.
SHARMA = [
    ((50.0000, 2.6772, -79.7751), (50.0000, 0.0000, -82.7485), 2.0425),
    ((50.0000, -1.3802, -84.2814), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, 0.0000, 0.0000), (50.0000, -1.0000, 2.0000), 2.3669),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0011), 7.2195),
    ((50.0000, 2.5000, 0.0000), (73.0000, 25.0000, -18.0000), 27.1492),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


@pytest.mark.parametrize("lab1,lab2,expected", SHARMA)
def test_ciede2000_sharma_reference_values(lab1, lab2, expected):
    assert abs(ciede2000(lab1, lab2) - expected) < 1e-4
    assert abs(ciede2000(lab2, lab1) - expected) < 1e-4  # symmetric


def test_ciede2000_vectorised_and_color_api():
    a = np.array([p[0] for p in SHARMA])
    b = np.array([p[1] for p in SHARMA])
    out = ciede2000(a, b)
    assert out.shape == (len(SHARMA),)
    np.testing.assert_allclose(out, [p[2] for p in SHARMA], atol=1e-4)
    np.testing.assert_allclose(hex_or_rgb_to_lab("#ffffff"), [100.0, 0.0, 0.0], atol=1e-3)
    np.testing.assert_allclose(hex_or_rgb_to_lab("#f00"), [53.2408, 80.0925, 67.2032], atol=1e-3)
    np.testing.assert_allclose(hex_or_rgb_to_lab((255, 0, 0)), hex_or_rgb_to_lab((1.0, 0.0, 0.0)), atol=1e-9)
    assert hex_or_rgb_to_lab(["#000000", (0, 0, 255), "#00ff0080"]).shape == (3, 3)
    assert color_similarity("#1f77b4", "#1F77B4") == 1.0
    assert color_similarity("#000000", "#ffffff") == 0.0  # dE00 = 100
    near, far = color_similarity("#1f77b4", "#2077b5"), color_similarity("#1f77b4", "#ff7f0e")
    assert 0.99 < near < 1.0 and far < 0.6
    np.testing.assert_allclose(similarity_matrix(["#1f77b4", "#000"], ["#ff7f0e"]),
                               [[far], [color_similarity("#000", "#ff7f0e")]], atol=1e-12)


def test_f1_helpers():
    assert f1(["a", "a", "b"], ["a", "b", "b"]) == pytest.approx(100 * 2 / 3)  # multiset, not set
    assert f1([], []) == 0.0 and f1(["a"], []) == 0.0  # official: an empty side scores 0
    assert color_f1(["bar--#ff0000", "bar--#0000ff"], ["bar--#0000ff", "bar--#ff0000"]) == pytest.approx(100.0)
    # one of two reference colors reproduced exactly: P = 1, R = 1/2 (+ the soft part of nothing)
    assert color_f1(["bar--#ff0000"], ["bar--#ff0000", "bar--#0000ff"]) == pytest.approx(100 * 2 * 0.5 / 1.5)
    assert 0 < color_f1(["bar--#fe0000"], ["bar--#00ff00"]) < 50
    assert color_f1(["plot--#ff0000"], ["bar--#ff0000"]) == 0.0  # matched only within the same call
    assert color_f1(["imshow--viridis"], ["imshow--viridis", "imshow--magma"]) == pytest.approx(100 * 2 / 3)
    with pytest.raises(ColorlessReference):  # the official evaluator divides by zero here
        color_f1(["bar--#ff0000"], [])
    assert color_f1(["bar--#ff0000"], [], guarded=True) == 0.0  # its "box" guard


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = ChartMimic.make_sample(str(tmp_path_factory.mktemp("chartmimic")))
    bench = ChartMimic()
    return bench, bench.load(root), root


def _item(items, name):
    return next(it for it in items if it.id == name)


def _fenced(code):
    return "Here is the code:\n```python\n" + code + "```\nIt draws the chart."


def test_load_sample_layout(sample):
    bench, items, root = sample
    assert [it.id for it in items] == ["bar_1", "line_1", "pie_1", "subplots_1"]
    for it in items:
        assert len(it.images) == 1 and it.images[0].mode == "RGB" and min(it.images[0].size) > 100
        # a rendered chart is not blank
        assert np.asarray(it.images[0]).std() > 5
        assert "import matplotlib" in it.reference
        content = it.messages[0]["content"]  # the official order: instruction, then the chart
        assert it.messages[0]["role"] == "user" and content[1] == {"type": "image"}
        assert "matplotlib code" in content[0]["text"] and "figsize=" in content[0]["text"]
    # root may be the parent (with direct*/) or the folder itself; limit is honoured
    folder_items = ChartMimic().load(root + "/direct_sample", limit=2)
    assert [it.id for it in folder_items] == ["bar_1", "line_1"]
    assert folder_items[0].reference == items[0].reference


def test_identical_code_scores_100(sample):
    bench, items, _ = sample
    for name in ("bar_1", "subplots_1"):
        it = _item(items, name)
        m = bench.score(it, _fenced(it.reference))
        assert m == {"exec_ok": 1.0, "text_f1": 100.0, "layout_f1": 100.0, "type_f1": 100.0, "color_f1": 100.0,
                     "score": 100.0, "colorless_reference": 0.0}, name
    info = bench.reference_info(_item(items, "subplots_1"))
    assert {k.rsplit("-", 1)[1] for k in info["types"]} == {"scatter", "fill_between", "plot"}
    assert [2, 1, 1, 1, 0, 0] in info["layout"] and "Two panels" in info["texts"]
    assert {"#E41A1C", "#377EB8", "#084081"} <= {c.split("--")[1] for c in info["colors"]}
    assert not any(t in info["texts"] for t in ("0", "2", "4"))  # tick labels are cleared before saving


def test_other_colors_drop_color_only(sample):
    bench, items, _ = sample
    it = _item(items, "bar_1")
    code = it.reference.replace("#4C72B0", "#FFD700").replace("#DD8452", "#2CA02C")
    assert code != it.reference
    m = bench.score(it, _fenced(code))
    assert m["exec_ok"] == 1.0
    assert m["text_f1"] == 100.0 and m["type_f1"] == 100.0 and m["layout_f1"] == 100.0
    assert m["color_f1"] < 75.0
    assert m["score"] < 95.0


def test_other_texts_drop_text(sample):
    bench, items, _ = sample
    it = _item(items, "bar_1")
    code = (it.reference.replace("Accuracy and latency by model", "Results")
            .replace('set_xlabel("Model")', 'set_xlabel("Method")').replace('"Ours"', '"Proposed"'))
    m = bench.score(it, _fenced(code))
    assert m["exec_ok"] == 1.0 and m["color_f1"] == 100.0 and m["type_f1"] == 100.0
    assert 50.0 < m["text_f1"] < 90.0  # 3 of 18 strings differ


def test_bar_vs_line_drops_type(sample):
    bench, items, _ = sample
    it = _item(items, "bar_1")
    code = it.reference.replace("ax.bar(x - width / 2, accuracy, width,", "ax.plot(x, accuracy,") \
                       .replace("ax.bar(x + width / 2, latency, width,", "ax.plot(x, latency,")
    assert code.count("ax.plot(") == 2
    m = bench.score(it, _fenced(code))
    assert m["exec_ok"] == 1.0
    assert m["type_f1"] == 0.0
    assert m["text_f1"] == 100.0  # same texts, other chart type
    assert m["color_f1"] == 0.0  # colours match only within the same call (bar vs line)


def test_fence_savefig_elsewhere_and_exit(sample):
    bench, items, _ = sample
    it = _item(items, "bar_1")
    assert bench.score(it, it.reference)["exec_ok"] == 0.0  # no ```python fence: no code
    assert bench.score(it, "```py\n" + it.reference + "```")["exec_ok"] == 0.0
    # a save to a path outside the sandbox mid-program stays inside it; the run goes on
    code = it.reference.replace('ax.set_title(', 'fig.savefig("/nonexistent/out/bar.png")\nax.set_title(')
    assert code != it.reference
    m = bench.score(it, _fenced(code))
    assert m["exec_ok"] == 1.0 and m["score"] == 100.0
    # everything from plt.savefig( on is cut, so an exit after it is never reached; before it, it fails the program
    assert bench.score(it, _fenced(it.reference + "import sys\nsys.exit(3)\n"))["score"] == 100.0
    died = bench.score(it, _fenced("import sys\n" + it.reference.replace("plt.tight_layout()", "sys.exit(0)")))
    assert died["exec_ok"] == 0.0 and died["score"] == 0.0
    # a reference that never saves a PDF (line_1 ends in plt.show()) logs no text, as officially
    line = _item(items, "line_1")
    m = bench.score(line, _fenced(line.reference))
    assert m["text_f1"] == 0.0 and m["layout_f1"] == m["type_f1"] == m["color_f1"] == 100.0


def test_failing_or_empty_program_scores_zero(sample):
    bench, items, _ = sample
    it = _item(items, "pie_1")
    bad = it.reference.replace("ax.pie(", "ax.pie(undefined_name, ")
    for gen in (_fenced(bad), _fenced("print('no chart here')\n")):  # the second has no plt for the final save
        m = bench.score(it, gen)
        assert m == {"exec_ok": 0.0, "text_f1": 0.0, "layout_f1": 0.0, "type_f1": 0.0, "color_f1": 0.0,
                     "score": 0.0}
    # officially a program that draws nothing still runs: an empty figure is saved, every metric is 0
    m = bench.score(it, _fenced("import matplotlib.pyplot as plt\nprint('no chart here')\n"))
    assert m == {"exec_ok": 1.0, "text_f1": 0.0, "layout_f1": 0.0, "type_f1": 0.0, "color_f1": 0.0, "score": 0.0,
                 "colorless_reference": 0.0}


def test_broken_reference_raises_naming_item():
    item = Item("broken_ref_7", [], [], "import matplotlib.pyplot as plt\nplt.plot([1, 2])\n1 / 0\n")
    with pytest.raises(RuntimeError, match="broken_ref_7"):
        ChartMimic().score(item, "```python\nimport matplotlib.pyplot as plt\nplt.plot([1])\n```")


def test_aggregate_means():
    rows = [{"exec_ok": 1.0, "text_f1": 80.0, "layout_f1": 100.0, "type_f1": 50.0, "color_f1": 70.0, "score": 75.0},
            {"exec_ok": 0.0, "text_f1": 0.0, "layout_f1": 0.0, "type_f1": 0.0, "color_f1": 0.0, "score": 0.0}]
    agg = ChartMimic().aggregate(rows)
    assert agg["score"] == 37.5 and agg["text_f1"] == 40.0 and agg["exec_rate"] == 50.0


def test_scoring_python_defaults_to_the_checkouts_scoring_venv(monkeypatch):
    """Without $VISCODEX_SCORING_PYTHON the chart programs run with <checkout>/.venv-score (found from the
    package's own location, which the eval/chartmimic/ layout must keep right), else the current interpreter."""
    monkeypatch.delenv(SCORING_PYTHON_ENV, raising=False)
    venv = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv-score", "bin", "python")
    assert scoring_python() == (venv if os.access(venv, os.X_OK) else None)
    monkeypatch.setenv(SCORING_PYTHON_ENV, "/nonexistent/python")
    with pytest.raises(FileNotFoundError, match="VISCODEX_SCORING_PYTHON=/nonexistent/python"):
        scoring_python()
