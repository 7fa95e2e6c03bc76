"""MMCode's judge as it runs inside the sandbox: one process judges one program on all its tests.

This file is not imported by the project: ``mmcode.py`` hands its text to ``sandbox.run_python`` as the
program, with ``task.json`` beside it (``code``: the extracted program, ``input_output``: the record's
JSON text, ``per_test_seconds``, ``global_seconds``, ``nonce``). It writes the nonce and the per-test
verdicts to ``verdicts.json``: ``true``/``false``, ``-1`` (runtime error or timeout), or ``[-2]`` (the
program did not load); the nonce shows the file is the judge's and not the program's. No file
means what the official ``check_correctness`` reports when its worker returns nothing: every test -1.

The semantics are those of APPS ``run_test`` in MMCode's ``testing_utils.py``
(github.com/likaixin2000/MMCode @ 8b9ac10), written anew; the odd behaviours kept on purpose are listed
in ``mmcode.py``'s docstring. Standard library and numpy only, since the sandbox has nothing else.
"""

import builtins
import contextlib
import faulthandler
import importlib.util
import io
import json
import os
import signal
import sys
import threading
from unittest import mock

os.environ["OMP_NUM_THREADS"] = "1"  # before numpy: one BLAS thread keeps the sandbox's process count low
os.environ["OPENBLAS_NUM_THREADS"] = "1"
import numpy as np  # noqa: E402  (the prelude imports it too; loaded here so its cost is outside the timers)

# The fixed import lines every program runs after (testing_utils.py, run_test: ``sol = "import sys\n..."``).
PRELUDE = (
    "import sys\nimport time\nimport itertools\nfrom itertools import accumulate, product, permutations, "
    "combinations\nimport collections\nfrom collections import Counter, OrderedDict, deque, defaultdict, "
    "ChainMap\nfrom functools import lru_cache\nimport math\nfrom math import sqrt, sin, cos, tan, ceil, fabs, "
    "floor, gcd, exp, log, log2\nimport fractions\nfrom typing import List, Tuple\nimport numpy as np\n"
    "import random\nimport heapq\nfrom heapq import *\n"
)
MODULE_NAME = "tmp_sol"


# Frames the official evaluator has below the program and we do not (its multiprocessing worker, forked
# inside ``main -> evaluate_generations -> check_correctness``, and ``call_method``'s mock wrappers),
# measured with a recursion probe under both on Python 3.11.7: a program recursing to within a few frames
# of the default limit of 1000 then fails, or passes, as it does officially.
BASE_FRAMES = 6
STDIN_EXTRA_FRAMES = 2


def deeper(frames: int, fn, *args):
    """``fn(*args)`` with ``frames`` (>= 1) frames of this function between the caller and ``fn``."""
    if frames <= 1:
        return fn(*args)
    return deeper(frames - 1, fn, *args)


class TestTimeout(Exception):
    """Raised by the per-test alarm; an ``Exception``, so the program's own handlers can swallow it."""


def _on_alarm(signum, frame):
    raise TestTimeout()


def wrap_standard_input(code: str) -> str:
    """Leading import lines stay at module level; everything from the first other line (a blank line
    included) goes, tab-indented, into ``def code():``, preceded by module-level ``stdin``/``stdout``."""
    out, started = [], False
    for line in code.split("\n"):
        if not started and (line.startswith("from ") or line.startswith("import ")):
            out.append(line + "\n")
            continue
        if not started:
            out.append("stdin = sys.stdin\nstdout = sys.stdout\ndef code():\n")
            started = True
        out.append("\t" + line + "\n")
    return "".join(out)


def load_module(source: str):
    """Executes ``source`` as a fresh module that is not registered in ``sys.modules``."""
    spec = importlib.util.spec_from_loader(MODULE_NAME, loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(source, module.__dict__)
    return module


def guard() -> None:
    """The effects of ``reliability_guard``: programs that touch these fail as they do officially."""
    faulthandler.disable()
    builtins.exit = None
    builtins.quit = None
    builtins.help = None
    os.environ["OMP_NUM_THREADS"] = "1"
    for name in ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
                 "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
                 "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"):
        setattr(os, name, None)
    import shutil
    import subprocess

    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
        sys.modules[name] = None


def run_with_stdin(method, text: str) -> None:
    """Calls ``method()`` with ``text`` as its input, the way the official ``call_method`` patches it.

    The three ``sys.stdin.*`` patches are entered before ``sys.stdin`` itself is replaced, so they land on the
    process's real stdin object (reached through the module-level ``stdin`` name), while ``sys.stdin`` is a
    plain ``StringIO`` (no ``.buffer``); ``open`` returns the input whatever it is asked to open.
    """
    lines = iter(text.split("\n"))
    patches = (
        mock.patch("sys.stdin.read", lambda *a: text),
        mock.patch("sys.stdin.readlines", lambda *a: text.split("\n")),
        mock.patch("sys.stdin.readline", lambda *a: next(lines)),
        mock.patch("sys.stdin", io.StringIO(text)),
        mock.patch("builtins.open", mock.mock_open(read_data=text)),
    )
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        try:
            deeper(STDIN_EXTRA_FRAMES, method)
        except SystemExit:
            pass


def _floats_close(got: list, want: list) -> bool:
    try:
        a, b = [float(x) for x in got], [float(x) for x in want]
        return len(a) == len(b) and bool(np.allclose(a, b))
    except Exception:
        return False


def compare_stdout(lines: list, expected: str):
    """The official cascade for a standard-input test: ``lines`` is the captured stdout split by
    ``str.splitlines``, ``expected`` the expected text. Returns the verdict (a bool)."""
    want = expected.strip()
    if "\n".join(lines).strip() == want or "\n".join(x.strip() for x in lines).strip() == want:
        return True
    want_lines = [x.strip() for x in expected.split("\n") if len(x)]  # drop empty lines, then strip
    if lines == want_lines:
        return True
    got_lines = [x for x in lines if len(x)]
    if got_lines == want_lines or _floats_close(got_lines, want_lines):
        return True
    want_sets = [set(x.split()) for x in want_lines]
    got_sets = [set(t) for t in (x.split() for x in got_lines) if len(t)]
    verdict = {frozenset(s) for s in got_sets} == {frozenset(s) for s in want_sets}
    try:
        verdict = verdict or ({frozenset(round(float(t), 3) for t in s) for s in got_sets}
                              == {frozenset(round(float(t), 3) for t in s) for s in want_sets})
    except Exception:
        pass
    return verdict


def _int_keys(d: dict) -> dict:
    return {int(k): v for k, v in d.items()}


def judge(code: str, in_outs: dict, per_test_seconds: int) -> list:
    fn_name = in_outs.get("fn_name")
    call_based = fn_name is not None
    if call_based:
        source, method_name = PRELUDE + code, fn_name
    else:
        source, method_name = PRELUDE + wrap_standard_input(code), "code"
    source = source.replace("__main__", MODULE_NAME)
    signal.alarm(per_test_seconds)
    try:
        module = load_module(source)
        target = module.Solution() if call_based and "class Solution" in code else module
        signal.alarm(0)
    except Exception:
        signal.alarm(0)
        return [-2]
    try:
        method = getattr(target, method_name)
    except BaseException:  # noqa: B036  (the official bare ``except:``)
        signal.alarm(0)
        return [-2]

    verdicts = []
    outputs = in_outs["outputs"]
    for index, inputs in enumerate(in_outs["inputs"]):
        # JSON object keys are strings; the official code turns them into ints (singleton-list convention)
        try:
            if isinstance(inputs[0], dict):
                inputs = [_int_keys(inputs[0])]
        except BaseException:  # noqa: B036
            pass
        try:
            if isinstance(outputs[index], dict):
                outputs[index] = [_int_keys(outputs[index])]
        except BaseException:  # noqa: B036
            pass
        try:
            if isinstance(outputs[index][0], dict):
                outputs[index] = [_int_keys(outputs[index][0])]
        except BaseException:  # noqa: B036
            pass

        if call_based:
            signal.alarm(per_test_seconds)
            try:
                got = method(*inputs)
                if isinstance(got, tuple):
                    got = list(got)
                want = outputs[index]
                ok = got == want
                if isinstance(want, list) and want:
                    ok = ok or (got == want[0])
                try:
                    if isinstance(got[0], tuple):
                        ok = ok or ([list(x) for x in got] == want[0])
                except BaseException:  # noqa: B036
                    pass
                verdicts.append(ok)
                signal.alarm(0)
            except Exception:
                signal.alarm(0)
                verdicts.append(-1)
            continue

        signal.alarm(per_test_seconds)
        if isinstance(inputs, list):
            inputs = "\n".join(inputs)
        if isinstance(outputs[index], list):
            outputs[index] = "\n".join(outputs[index])
        captured = io.StringIO()
        captured.close = lambda x: 1  # as the official Capturing: close() without an argument is a TypeError
        real_stdout, sys.stdout = sys.stdout, captured
        ran = False
        try:
            try:
                run_with_stdin(method, inputs)
                signal.alarm(0)
                ran = True
            except Exception:
                signal.alarm(0)
                verdicts.append(-1)
            signal.alarm(0)
        finally:
            lines = captured.getvalue().splitlines()
            sys.stdout = real_stdout
        if ran:
            verdicts.append(compare_stdout(lines, outputs[index]))
    return verdicts


def _plain(v):
    """Verdicts as ``evaluate_generations`` leaves them (numpy scalars and arrays to Python values)."""
    if isinstance(v, np.ndarray):
        v = v.item(0) if v.size else False
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, (bool, int, float)):
        return v
    return bool(v)


def main() -> None:
    with open("judge_ready", "w"):  # tells the caller the judge itself started (imports worked)
        pass
    with open("task.json") as f:
        task = json.load(f)
    os.unlink("task.json")  # the expected outputs are not left where the program could open them
    verdict_path = os.path.abspath("verdicts.json")
    finish, real_open = os._exit, builtins.open
    # The official worker is killed global_seconds after it starts; its result is then "every test -1".
    watchdog = threading.Timer(task["global_seconds"], finish, args=(3,))
    watchdog.daemon = True
    watchdog.start()
    try:
        # What a program prints outside the capture (or to stderr) is not judged, and must not reach the
        # sandbox's file-size limit as it never would officially: discard it.
        devnull = open(os.devnull, "w")
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        sys.stdout = sys.stderr = devnull
    except OSError:
        pass
    signal.signal(signal.SIGALRM, _on_alarm)
    in_outs = json.loads(task["input_output"])
    guard()
    nonce = task.pop("nonce")  # a program that writes verdicts.json itself does not know it
    got = deeper(BASE_FRAMES, judge, task.pop("code"), in_outs, int(task["per_test_seconds"]))
    verdicts = [_plain(v) for v in got]
    with real_open(verdict_path, "w") as f:
        json.dump({"nonce": nonce, "verdicts": verdicts}, f)
    finish(0)  # skip the program's atexit hooks and non-daemon threads


main()
