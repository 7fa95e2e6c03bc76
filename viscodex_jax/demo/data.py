"""Data for the paper-in-miniature demo, all generated here and seeded (the toy world: ``demo.toy``).

* ``base_train.json``: the shared corpus the base is trained on first (text only): chart programs,
  stdin programs, chart descriptions and problem statements, each on its own. The VLM's and the
  coder's fine-tunes then only learn to connect them (image -> description, statement -> program),
  so their task vectors are small next to the base, as with real models.
* ``describe_train.json``: chart images (and a few HTML pages) with short descriptions for the VLM: a
  general VLM sees images but cannot code them.
* ``coder_train.json``: programming problems (stdin -> stdout) with solutions, in MMCode's prompt.
* ``mcd/mcd_train.json``: the MCD-format SFT data: chart image -> matplotlib code (ChartMimic's
  direct-mimic wording, the answer fenced as ChartMimic extracts it), plus the HTML, code-QA and
  algorithm records of ``testing.mcd_sample`` (MCD's other categories; its algorithm problems are
  function-style, not the coder's stdin families).
* Held-out: charts in ChartMimic's layout (``<name>.py`` + ``<name>.png``, specs in
  ``heldout_charts.json``) and problems in MMCode's layout; new values, and for problems a wording
  never used in training. No held-out chart program or problem statement occurs in the training data.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from viscodex_jax.demo import toy
from viscodex_jax.eval.chartmimic.benchmark import direct_mimic_prompt
from viscodex_jax.eval.mmcode.benchmark import SYSTEM_PROMPT as MMCODE_SYSTEM_PROMPT
from viscodex_jax.eval.mmcode.benchmark import prompt_text as mmcode_prompt_text
from viscodex_jax.testing.mcd_sample import make_mcd_sample

DESCRIBE_PROMPT = "<image>\nDescribe this image."


def _write(path: str, records: Any) -> str:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
    return path


def _charts(rng: np.random.Generator, n: int, avoid: set[str]) -> list[toy.ChartSpec]:
    out: list[toy.ChartSpec] = []
    while len(out) < n:
        s = toy.random_chart(rng)
        code = toy.chart_code(s)
        if code not in avoid:
            avoid.add(code)
            out.append(s)
    return out


def _draw(specs: list[toy.ChartSpec], img_dir: str, tag: str) -> list[str]:
    from viscodex_jax.testing.mcd_sample import draw_chart

    os.makedirs(img_dir, exist_ok=True)
    paths = []
    for i, s in enumerate(specs):
        p = os.path.join(img_dir, f"{tag}_{i}.png")
        with open(p, "wb") as f:  # draw_chart runs the program here: not its savefig into the cwd
            f.write(draw_chart(toy.chart_code(s).replace(toy.SAVEFIG, "")))
        paths.append(p)
    return paths


def chart_record(code: str, image: str) -> dict[str, Any]:
    """As ChartMimic asks: instruction then image, the answer in a ```python fence (official extraction
    scores an unfenced answer 0)."""
    return {"images": [image], "category": "chart", "messages": [
        {"role": "user", "content": direct_mimic_prompt(code, (224, 224)) + "<image>"},
        {"role": "assistant", "content": f"```python\n{code}```"}]}


def coder_record(p: dict[str, Any]) -> dict[str, Any]:
    return {"images": [], "category": "algorithm", "messages": [
        {"role": "system", "content": MMCODE_SYSTEM_PROMPT},
        {"role": "user", "content": mmcode_prompt_text(p["question"])},
        {"role": "assistant", "content": f"```python\n{p['solution']}```"}]}


def _text(user: str, answer: str) -> dict[str, Any]:
    return {"images": [], "category": "text", "messages": [{"role": "user", "content": user},
                                                           {"role": "assistant", "content": answer}]}


def _fenced(code: str) -> str:
    return f"```python\n{code}```"


def base_corpus(rng: np.random.Generator, n: int, seed: int, avoid: set[str]) -> list[dict[str, Any]]:
    """The shared corpus: each kind of text the later tasks use, never paired with its task's input."""
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(_text("Write a matplotlib program.", _fenced(toy.chart_code(_charts(rng, 1, set(avoid))[0]))))
        elif kind == 1:
            fam = list(toy.FAMILIES)[int(rng.integers(len(toy.FAMILIES)))]
            out.append(_text("Write a Python program.", _fenced(toy.FAMILIES[fam][2])))
        elif kind == 2:
            out.append(_text("Describe a chart.", toy.describe_chart(toy.random_chart(rng))))
        else:
            out.append(_text("Write a programming exercise.", toy.statement_sentence(rng, seed)))
    return out


def make_demo_data(out_dir: str, c) -> dict[str, str]:
    """Writes every dataset of the demo under ``out_dir`` from the demo config ``c``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    seed = c.seed
    rng = np.random.default_rng([seed, 2000])
    img_dir = os.path.join(out_dir, "images")
    seen: set[str] = set()
    held_specs = _charts(rng, c.n_heldout_charts, seen)
    train_specs = _charts(rng, c.n_train_charts, seen)
    held_imgs = _draw(held_specs, img_dir, "heldout")
    train_imgs = _draw(train_specs, img_dir, "train")
    held_codes = {toy.chart_code(s) for s in held_specs}

    base = base_corpus(rng, c.n_base_corpus, seed, set(held_codes))
    base_path = _write(os.path.join(out_dir, "base_train.json"), base)

    mcd = make_mcd_sample(os.path.join(out_dir, "mcd"), n_per_category=c.n_mcd_per_category, seed=seed,
                          heldout_fraction=0.0)
    with open(mcd["train"]) as f:
        others = [r for r in json.load(f) if r["category"] != "chart"]
    mcd_dir = os.path.dirname(mcd["train"])
    for r in others:  # absolute image paths: the records are read from another folder too
        r["images"] = [os.path.join(mcd_dir, p) for p in r["images"]]

    describe = [{"images": [p], "category": "chart", "messages": [
        {"role": "user", "content": DESCRIBE_PROMPT}, {"role": "assistant", "content": toy.describe_chart(s)}]}
        for s, p in zip(train_specs, train_imgs)]
    for r in others:
        if r["category"] == "html":
            import re

            labels = re.findall(r">([^<>]+)</div>", r["messages"][-1]["content"])
            describe.append({"images": r["images"], "category": "html", "messages": [
                {"role": "user", "content": DESCRIBE_PROMPT},
                {"role": "assistant", "content": "A web page with boxes labelled "
                                                 + ", ".join(f"'{x}'" for x in labels[:4]) + "."}]})
    order = np.random.default_rng([seed, 2001]).permutation(len(describe))
    describe_path = _write(os.path.join(out_dir, "describe_train.json"), [describe[i] for i in order])

    sft = [chart_record(toy.chart_code(s), p) for s, p in zip(train_specs, train_imgs)] + others
    order = np.random.default_rng([seed, 2002]).permutation(len(sft))
    sft_path = _write(os.path.join(out_dir, "sft_train.json"), [sft[i] for i in order])

    prng = np.random.default_rng([seed, 1000])
    train_problems = toy.problems(prng, c.n_programs, "train", seed)
    held_problems = toy.problems(prng, c.n_heldout_programs, "heldout", seed)
    train_questions = {p["question"] for p in train_problems} | {r["messages"][-1]["content"] for r in base}
    clash = [p["question"] for p in held_problems if p["question"] in train_questions]
    if clash:
        raise RuntimeError(f"demo data: held-out statement also in training: {clash[0]!r}")
    coder_path = _write(os.path.join(out_dir, "coder_train.json"), [coder_record(p) for p in train_problems])

    mm_dir = os.path.join(out_dir, "heldout_mmcode")
    os.makedirs(mm_dir, exist_ok=True)
    with open(os.path.join(mm_dir, "mmcode_test.jsonl"), "w") as f:
        for i, p in enumerate(held_problems):
            f.write(json.dumps({"problem_id": f"demo-{i}", "question": p["question"], "images": [],
                                "input_output": p["input_output"], "family": p["family"]}) + "\n")

    cm_dir = os.path.join(out_dir, "heldout_chartmimic", "direct_demo")
    os.makedirs(cm_dir, exist_ok=True)
    for i, (s, p) in enumerate(zip(held_specs, held_imgs)):
        with open(os.path.join(cm_dir, f"chart_{i}.py"), "w") as f:
            f.write(toy.chart_code(s))
        with open(p, "rb") as src, open(os.path.join(cm_dir, f"chart_{i}.png"), "wb") as dst:
            dst.write(src.read())
    held_json = _write(os.path.join(out_dir, "heldout_charts.json"),
                       [{"id": f"chart_{i}", "image": os.path.join(cm_dir, f"chart_{i}.png"), **dataclasses.asdict(s)}
                        for i, s in enumerate(held_specs)])
    return {"base_train": base_path, "describe_train": describe_path, "coder_train": coder_path,
            "mcd_train": sft_path, "heldout_charts": held_json, "heldout_mmcode": mm_dir,
            "heldout_chartmimic": os.path.dirname(cm_dir)}
