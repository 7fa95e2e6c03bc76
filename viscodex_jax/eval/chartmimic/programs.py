"""ChartMimic chart programs: the scoring interpreter, the official program of a response, sandboxed runs.

Programs run in the sandbox (``eval.sandbox.run_python``) under ``harness.py`` (this folder), with the
interpreter of ``scoring_python()``; see ``benchmark.py`` for the official semantics they follow.
"""

from __future__ import annotations

import json
import os
import re
import threading
from typing import Any

from viscodex_jax.eval.sandbox import Limits, SandboxResult, run_python

SCORING_PYTHON_ENV = "VISCODEX_SCORING_PYTHON"

_HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "harness.py")
_INFO_FILE = "chart_info.json"
_PROGRAM_FILE = "program.py"
_FALLBACK_FILE = "program_no_ticks.py"
_SETTINGS_FILE = "harness.json"
_OUT_PDF = "generated.pdf"
_TICKS_STATEMENT = "\n__vx_clear_ticks__()\n"  # stands for the official tick-clearing lines (same syntax role)
_FENCE = re.compile(r"```python(.*?)```", re.DOTALL)


# -- interpreter -------------------------------------------------------------------------------------
def scoring_python() -> str | None:
    """The interpreter chart programs run with: ``$VISCODEX_SCORING_PYTHON``, else ``<checkout>/.venv-score``,
    else None (the current interpreter)."""
    env = os.environ.get(SCORING_PYTHON_ENV)
    if env:
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise FileNotFoundError(f"${SCORING_PYTHON_ENV}={env}: not an executable Python interpreter")
        return os.path.abspath(env)
    # this file is <checkout>/viscodex_jax/eval/chartmimic/programs.py
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
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
