"""The demo's report in a browser: a synthetic run directory (written by the real eval runner, metric writer and
ChartMimic loader layouts), ``write_report``, then report.html opened in headless Chromium.

Needs Chromium and playwright like the Design2Code tests (a browser that cannot start is a failure, not a
skip) and the sandbox (the report draws the models' chart code in it, as the scorer runs it).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from viscodex_jax.demo.recipe_table import TableError, read_compile_check
from viscodex_jax.demo.report import write_report
from viscodex_jax.eval.design2code.render import CHROMIUM_ARGS, Renderer

pytestmark = pytest.mark.sandbox

CHARTS = [("bar", "#1f77b4", "Sales", [3, 7, 5]), ("plot", "#2ca02c", "Growth", [2, 6, 1, 4]),
          ("bar", "#d62728", "Orders", [5, 1, 4, 2]), ("plot", "#ff7f0e", "Users", [1, 3, 9])]
PROBLEMS = [("1 2\n", "3\n"), ("5 5\n", "10\n"), ("-1 4\n", "3\n"), ("0 0\n", "0\n")]
SUM = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
WRONG = "```python\nprint(0)\n```"
FULL_SECTIONS = ["Scores on held-out items, next to the paper's", "Did merging transfer coding ability?",
                 "What the VLM sees", "Does the model look at the image?", "Merge weight sweep",
                 "Held-out charts: the best and worst of tiny VisCodex (merge + SFT)", "Training loss", "Pipeline",
                 "What the real recipe needs"]
SECONDS = {"checkpoints": 1.5, "data": 2.0, "train_vlm": 30.0, "eval_merged_sft": 9.25}
PARITY = {"max_abs_logit_diff": 1.2e-6, "roundtrip_bit_identical": True, "prompt_tokens": 68,
          "top5_ours": ["a", "b"], "top5_transformers": ["a", "b"]}


# the model's answer to chart_3 tries to leave the sandbox: the report must draw it there, never in-process
ESCAPE = ("```python\nimport os\nimport matplotlib.pyplot as plt\nos.system('touch /tmp/escaped')\n"
          "plt.plot([1, 2], [2, 1])\n```")
CHART_SCORES: dict[str, float] = {}
TRAIN_RUNS = ("zz_extra", "vlm_sft", "merged_sft", "coder", "vlm", "base")


def _chart_code(kind, color, title, values):
    call = (f"plt.bar({list('ABCDE'[:len(values)])}, {values}, color='{color}')" if kind == "bar"
            else f"plt.plot({list(range(1, len(values) + 1))}, {values}, color='{color}')")
    return ("import matplotlib.pyplot as plt\n\nplt.figure(figsize=(2.24, 2.24), dpi=100)\n"
            f"{call}\nplt.title('{title}')\nplt.show()\n")


def _fence(code):
    return f"```python\n{code}```"


def _benchmarks():
    """The real loaders and aggregates with a fixed score per answer: what the report reads is the runner's
    layout, not the scorer's verdicts, and scoring in the sandbox would triple this test's time."""
    from viscodex_jax.eval.chartmimic.benchmark import ChartMimic
    from viscodex_jax.eval.mmcode.benchmark import MMCode

    class FixedChartMimic(ChartMimic):
        def score(self, item, generation):
            s = CHART_SCORES.get(generation, 0.0)
            return {"exec_ok": float(s > 0), "text_f1": s, "layout_f1": s, "type_f1": s, "color_f1": s, "score": s}

    class FixedMMCode(MMCode):
        def score(self, item, generation):
            ok = generation == SUM
            return {"score": 100.0 * ok, "passed": float(ok), "tests_passed": float(ok)}

    return {"chartmimic": FixedChartMimic(), "mmcode": FixedMMCode()}


def _eval(wd, model, roots, gens):
    """The eval runner's real outputs (summary.json, <bench>_items.jsonl) for fixed generations."""
    from viscodex_jax.eval.runner import EvalSettings, run_eval

    run_eval(os.path.join(wd, "models", model), roots, os.path.join(wd, "eval", model), EvalSettings(max_new_tokens=8),
             generate_fn=lambda items, s: [gens[it.id] for it in items], benchmarks=_benchmarks(),
             model_fingerprint=f"fake-{model}", model_name=model)


def _png(path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2), dpi=60)
    ax.plot([0, 0.5, 1], [1, 3, 2])
    ax.set_title(title)
    fig.savefig(path)
    plt.close(fig)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from viscodex_jax.testing.mcd_sample import draw_chart
    from viscodex_jax.train.metrics import MetricWriter

    wd = str(tmp_path_factory.mktemp("demo_report") / "run")
    cm = os.path.join(wd, "data", "heldout_chartmimic", "direct_demo")  # demo.data's held-out chart layout
    mm = os.path.join(wd, "data", "heldout_mmcode")
    os.makedirs(cm)
    os.makedirs(mm)
    codes = [_chart_code(*c) for c in CHARTS]
    for i, code in enumerate(codes):
        with open(os.path.join(cm, f"chart_{i}.py"), "w") as f:
            f.write(code)
        with open(os.path.join(cm, f"chart_{i}.png"), "wb") as f:
            f.write(draw_chart(code))
    with open(os.path.join(mm, "mmcode_test.jsonl"), "w") as f:
        for i, (x, y) in enumerate(PROBLEMS):
            f.write(json.dumps({"problem_id": f"demo-{i}", "question": "Read a and b; print a + b.\n", "images": [],
                                "input_output": {"inputs": [x], "outputs": [y]}}) + "\n")
    roots = {"chartmimic": os.path.dirname(cm), "mmcode": mm}
    CHART_SCORES.update({_fence(codes[0]): 75.0, _fence(codes[2]): 60.0, ESCAPE: 40.0, _fence(codes[1]): 25.0})
    merged = {"chart_0": _fence(codes[0]), "chart_1": _fence(codes[1]), "chart_2": "a bar chart, I think",
              "chart_3": ESCAPE, "demo-0": SUM, "demo-1": SUM, "demo-2": SUM, "demo-3": WRONG}
    vlm_sft = {**merged, "chart_0": _fence(codes[2]), "demo-1": WRONG, "demo-2": WRONG}
    _eval(wd, "merged_sft", roots, merged)
    _eval(wd, "vlm_sft", roots, vlm_sft)
    _eval(wd, "vlm", roots, {k: "no idea" for k in merged})
    _eval(wd, "coder", {"mmcode": mm}, {f"demo-{i}": SUM for i in range(4)})
    _eval(wd, "mystery", {"mmcode": mm}, {f"demo-{i}": WRONG for i in range(4)})
    _eval(wd, "vlm_sft_shuffled", {"chartmimic": os.path.dirname(cm)}, vlm_sft)  # the ablation's own run
    for k, name in enumerate(TRAIN_RUNS):
        w = MetricWriter(os.path.join(wd, "train", name))
        for step in range(1, 6):
            w.write(step, {"loss": 4.0 / (step + k), "lr": 1e-3})
        w.close()
    with open(os.path.join(wd, "ablation.json"), "w") as f:
        json.dump({"benchmark": "chartmimic", "rows": [
            {"model": "vlm_sft", "n_items": 4, "score": 55.0, "score_shuffled": 15.0, "drop": 40.0},
            {"model": "merged_sft", "n_items": 4, "score": 50.0, "score_shuffled": 45.5, "drop": 4.5},
            {"model": "vlm", "n_items": 4, "score": 10, "score_shuffled": 12, "drop": -2}],
            "shuffle": "a seeded derangement"}, f)
    with open(os.path.join(wd, "eval", "vlm", "describe.json"), "w") as f:
        json.dump({"n_items": 4, "accuracy": {"kind": 75.0, "color": 50.0, "count": 25, "title": 100.0},
                   "items": [{"id": "chart_0", "reference": "A blue bar chart with 3 bars, titled 'Sales'.",
                              "generation": "A blue bar chart with 4 bars, titled 'Sales'."}]}, f)
    with open(os.path.join(wd, "scores.json"), "w") as f:
        json.dump({"task_vectors": {"base_norm": 50.0, "tau_vlm_norm": 2.0, "tau_vlm_relative": 0.04,
                                    "tau_coder_norm": 1.5, "tau_coder_relative": 0.03}}, f)
    os.makedirs(os.path.join(wd, "sweep"))
    _png(os.path.join(wd, "sweep", "sweep.png"), "sweep")  # stands for merge.sweep.lambda_sweep's plot
    with open(os.path.join(wd, "sweep", "sweep.json"), "w") as f:
        json.dump({"rows": [], "best_lam": 0.5, "higher_is_better": True, "metric": "score"}, f)
    with open(os.path.join(wd, "sweep", "per_benchmark.json"), "w") as f:
        json.dump({"paper_lam": 0.7, "scored_model": "merged, before SFT", "sweep_score": "the mean of both", "rows": [
            {"lam": lam, "chartmimic": 40 + 20 * lam, "mmcode": 50 * (1 - lam), "n_chartmimic": 4, "n_mmcode": 4}
            for lam in (0, 0.3, 0.5, 0.7, 0.85, 1)]}, f)
    config = {"seed": 0, "lam": 0.7, "train": {"steps": 10}}
    summary = write_report(wd, SECONDS, PARITY, config)
    assert not os.path.exists("/tmp/escaped")
    return wd, summary


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium as the Design2Code renderer starts it (same binary, same flags: no network)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"playwright is needed to open the report: {e}", pytrace=False)
    exe = Renderer().executable_path
    if not os.path.exists(exe):
        pytest.fail(f"Chromium not found at {exe}: apt-get install -y chromium", pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=list(CHROMIUM_ARGS))
        yield b
        b.close()


PAGE_JS = """() => ({
  images: Array.from(document.images).map(i => ({alt: i.alt, complete: i.complete, w: i.naturalWidth,
                                                 src: i.getAttribute('src').slice(0, 22)})),
  tables: Array.from(document.querySelectorAll('table')).map(t => ({
    head: Array.from(t.querySelectorAll('thead tr th')).map(th => th.textContent),
    rows: Array.from(t.querySelectorAll('tbody tr')).map(r => Array.from(r.cells).map(c => c.textContent)),
    stray: t.querySelectorAll('pre').length})),
  h2: Array.from(document.querySelectorAll('h2')).map(h => h.innerText),
  text: document.body.innerText,
  pres: Array.from(document.querySelectorAll('pre')).map(p => p.innerText),
})"""


def _open(browser, wd):
    page = browser.new_page()
    failed = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.goto("file://" + os.path.join(wd, "report.html"), wait_until="load")
    info = page.evaluate(PAGE_JS)
    page.close()
    assert failed == []
    return info


def _check_page(info):
    """Every image decoded, every table a real table, no Markdown table left in the visible text."""
    assert info["images"], "no image in the report"
    for im in info["images"]:
        assert im["complete"] and im["w"] > 0, im
        assert im["src"] == "data:image/png;base64,", im  # self-contained: nothing next to it is needed
    assert info["tables"]
    for t in info["tables"]:
        assert t["head"] and t["rows"] and t["stray"] == 0, t
        assert all(len(r) == len(t["head"]) for r in t["rows"]), t
    assert not re.search(r"\|\s*:?-{3}", info["text"]), "raw Markdown table syntax in the page"
    for pre in info["pres"]:
        assert "|---" not in pre


def _table(info, *header):
    """The one table whose header starts with ``header``."""
    (t,) = [t for t in info["tables"] if t["head"][:len(header)] == list(header)]
    return t


def test_report_in_browser(run_dir, browser):
    wd, summary = run_dir
    info = _open(browser, wd)
    _check_page(info)
    assert info["h2"] == FULL_SECTIONS
    assert summary["sections"] == FULL_SECTIONS[:-1] + ["Parity with transformers", FULL_SECTIONS[-1]]
    # 4 charts (3 best, 1 worst) by score, each a reference and two drawings; loss, sweep (ours and the command's)
    alts = [im["alt"] for im in info["images"]]
    assert alts.count("reference") == 4 and "training loss" in alts and "the sweep command's plot" in alts
    assert summary["examples"] == ["chart_0", "chart_3", "chart_1", "chart_2"]
    # chart_2's answer has no code block; chart_3's draws its line in the sandbox (and touches nothing here)
    assert [a for a in alts if a.startswith("tiny VisCodex (merge + SFT): ")] == [
        "tiny VisCodex (merge + SFT): 75.0", "tiny VisCodex (merge + SFT): 40.0", "tiny VisCodex (merge + SFT): 25.0"]
    assert "no ```python block (scored 0)" in info["text"]

    ours = _table(info, "model (ours)")
    assert [r[0] for r in ours["rows"]] == ["tiny VLM (no SFT)", "tiny VLM + SFT (no merge)",
                                            "tiny VisCodex (merge + SFT)", "tiny coder (no merge, no SFT)", "mystery"]
    assert ours["rows"][2][1:] == ["35.0", "75.0", "4", "4", "VisCodex-8B", "74.8", "11.0"]
    assert ours["rows"][3][2] == "100.0" and ours["rows"][4][1:] == ["-", "0.0", "-", "4", "-", "-", "-"]
    assert ["VisCodex-8B (paper)", "74.8", "11.0"] in _table(info, "model (paper)")["rows"]

    assert summary["merge_transfer"]["verdict"] == "not shown"
    assert summary["merge_transfer"]["merged_sft"] == [3, 4] and summary["merge_transfer"]["vlm_sft"] == [1, 4]
    assert "Not shown: merged + SFT passes 3 of 4 held-out problems (75.0%), VLM + SFT (no merge) 1 of 4" in info["text"]
    assert "The coder alone passes 4 of 4" in info["text"]
    assert ("In the sweep (merged, before SFT), MMCode pass@1 is 0.0 at lam = 1 (the VLM alone), 50.0 at best "
            "(lam = 0), 15.0 at the paper's lam = 0.7, on 4 problems.") in info["text"]

    assert "tiny VLM + SFT (no merge): shuffling the images drops its score by 40.0 points (55.0 -> 15.0 on 4 items)" \
        in info["text"]
    assert ("tiny VLM (no SFT): shuffling the images does not lower its score (10.0 -> 12.0 on 4 items): no sign that "
            "it uses the image.") in info["text"]
    assert _table(info, "model", "items")["rows"][2] == ["tiny VLM (no SFT)", "4", "10.0", "12.0", "-2.0"]
    assert _table(info, "model", "problems passed")["rows"][0][:2] == ["tiny VisCodex (merge + SFT)", "3"]
    sweep = _table(info, "lam")
    assert [r[0] for r in sweep["rows"]] == ["0", "0.3", "0.5", "0.7 (paper)", "0.85", "1"]
    assert sweep["rows"][0][3] == "50.0" and "picks lam = 0.5 by the mean of both (higher is better)." in info["text"]

    assert summary["loss_curves"] == ["base", "vlm", "coder", "merged_sft", "vlm_sft", "zz_extra"]
    assert _table(info, "property", "% right")["rows"] == [["kind", "75.0"], ["color", "50.0"], ["count", "25.0"],
                                                          ["title", "100.0"]]
    assert ["chart_0", "A blue bar chart with 3 bars, titled 'Sales'.", "A blue bar chart with 4 bars, titled 'Sales'."] \
        in _table(info, "chart", "true description")["rows"]
    assert "|VLM - base| / |base| = 0.040, |coder - base| / |base| = 0.030" in info["text"]
    assert "Shuffle: a seeded derangement." in info["text"]
    stages = _table(info, "stage")["rows"]
    assert stages[-1] == ["total", "42.8", "100.0"] and stages[2] == ["train_vlm", "30.0", "70.2"]
    recipe = _table(info, "model", "preset", "slice")
    assert {r[0] for r in recipe["rows"]} == {"8B", "33B"} and summary["recipe_rows"] == len(recipe["rows"])
    assert "Settings of this run" in info["text"] and ["train.steps", "10"] in _table(info, "setting")["rows"]


def test_markdown_report_links_existing_images(run_dir):
    wd, _ = run_dir
    md = open(os.path.join(wd, "report.md")).read()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 4 + 1 + 2 and all(os.path.isfile(os.path.join(wd, p)) for p in links), links
    assert "| tiny VisCodex (merge + SFT) | 35.0 | 75.0 | 4 | 4 | VisCodex-8B | 74.8 | 11.0 |" in md and "| VisCodex-8B (paper) | 74.8 | 11.0 |" in md
    # a generation carries its own ``` fence: the Markdown wraps it in a longer one
    assert "````\n```python\nimport matplotlib.pyplot as plt" in md


def test_report_without_optional_inputs(run_dir, browser, tmp_path):
    """No ablation, sweep, descriptions, training logs or no-merge model: those sections are left out, the page is
    still whole; an empty run directory still gives a page (pipeline and recipe sections only)."""
    src, _ = run_dir
    wd = str(tmp_path / "run")
    for rel in ("eval/vlm", "eval/coder", "data"):  # vlm's answers have no code: nothing to draw
        shutil.copytree(os.path.join(src, rel), os.path.join(wd, rel))
    os.remove(os.path.join(wd, "eval", "vlm", "describe.json"))
    summary = write_report(wd, SECONDS, {}, {})
    info = _open(browser, wd)
    _check_page(info)
    assert info["h2"] == ["Scores on held-out items, next to the paper's",
                          "Held-out charts: the best and worst of tiny VLM (no SFT)", "Pipeline",
                          "What the real recipe needs"]
    assert summary["merge_transfer"] == {} and summary["ablation"] == [] and summary["loss_curves"] == []
    assert [im["alt"] for im in info["images"]] == ["reference"] * 4  # the answers drew nothing: notes instead
    assert info["text"].count("no ```python block (scored 0)") == 4
    assert [r[0] for r in _table(info, "model (ours)")["rows"]] == ["tiny VLM (no SFT)", "tiny coder (no merge, no SFT)"]
    assert not os.path.exists(os.path.join(wd, "report_files", "loss.png"))

    empty = str(tmp_path / "empty")
    os.makedirs(empty)
    summary = write_report(empty, {"checkpoints": 1.0}, {}, {})
    info = _open(browser, empty)
    assert info["h2"] == ["Pipeline", "What the real recipe needs"] and info["images"] == []
    assert summary["scores"] == {} and summary["examples"] == []


def test_malformed_input_names_the_file(run_dir, tmp_path):
    src, _ = run_dir
    wd = str(tmp_path / "run")
    shutil.copytree(os.path.join(src, "eval", "vlm"), os.path.join(wd, "eval", "vlm"))
    with open(os.path.join(wd, "ablation.json"), "w") as f:
        json.dump({"rows": [{"model": "vlm_sft", "score": 1.0}]}, f)
    with pytest.raises(ValueError, match=r"ablation\.json: ablation row 0 lacks \['n_items', 'score_shuffled', 'drop'\]"):
        write_report(wd, SECONDS, {}, {})
    assert not os.path.exists(os.path.join(wd, "report.html")) and not os.path.exists(os.path.join(wd, "report.md"))
    os.remove(os.path.join(wd, "ablation.json"))
    os.makedirs(os.path.join(wd, "sweep"))
    with open(os.path.join(wd, "sweep", "per_benchmark.json"), "w") as f:
        json.dump({"rows": [], "paper_lam": 0.7}, f)
    with pytest.raises(ValueError, match=r"sweep/per_benchmark\.json: the sweep's per-benchmark scores have no rows"):
        write_report(wd, SECONDS, {}, {})
    assert not os.path.exists(os.path.join(wd, "report.html"))


def test_compile_check_table_from_results_md(tmp_path):
    t = read_compile_check()  # the committed benchmarks/RESULTS.md
    assert t["source"] == os.path.join("benchmarks", "RESULTS.md")
    by = {}
    for r in t["rows"]:
        by.setdefault(r[0], []).append(r)
    assert set(by) == {"8B", "33B"}
    peak = t["header"].index("peak GiB/chip")
    assert all(0 < float(r[peak]) < 200 for r in t["rows"])
    bad = tmp_path / "RESULTS.md"
    bad.write_text("# results\n\n## compile_check\n\nnote\n\n| program | config | slice |\n|---|---|---|\n"
                   "| train | configs/viscodex_8b.py:v5p-8 | v5p:2x2x1 |\n")
    with pytest.raises(TableError, match=r"RESULTS\.md: the '## compile_check' table lacks column\(s\) \['chips'"):
        read_compile_check(str(bad))
    bad.write_text("# results\n")
    with pytest.raises(TableError, match="no '## compile_check' section"):
        read_compile_check(str(bad))
