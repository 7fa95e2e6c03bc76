"""Hostile programs run in the sandbox: each contained with the right result; the host is untouched."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import pytest

from viscodex_jax.eval.sandbox import Limits, run_python

FAST = Limits(wall_seconds=6, cpu_seconds=3, memory_bytes=1 << 30, max_processes=16)


def _procs() -> set[int]:
    return {int(p) for p in os.listdir("/proc") if p.isdigit()}


@pytest.fixture
def host_files(tmp_path):
    """A file outside the sandbox that must survive, and a snapshot of the host's processes."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    before = _procs()
    yield victim
    assert victim.read_text() == "keep me"
    time.sleep(0.2)
    leftover = [p for p in _procs() - before if _is_sandbox_child(p)]
    assert not leftover, f"sandbox processes survived: {leftover}"


def _is_sandbox_child(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"main.py" in f.read()
    except OSError:
        return False


def test_normal_program_stdin_stdout_and_files():
    r = run_python("import sys\nprint(sys.stdin.read().strip()[::-1])\nopen('out.txt','w').write('made')",
                   stdin="abc", collect=("out.txt",))
    assert r.status == "ok" and r.stdout == "cba\n" and r.files == {"out.txt": b"made"}


def test_error_text_is_returned():
    r = run_python("raise ValueError('boom')")
    assert r.status == "error" and r.returncode == 1 and "ValueError: boom" in r.stderr


def test_infinite_loop_hits_cpu_limit(host_files):
    r = run_python("while True:\n    pass", limits=FAST)
    assert r.status == "killed" and r.limit == "cpu"


def test_sleeping_forever_hits_wall_limit(host_files):
    r = run_python("import time\ntime.sleep(100)", limits=FAST)
    assert r.status == "timeout" and r.wall_seconds < 10


def test_fork_bomb_is_contained(host_files):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_python(code, limits=FAST)
    assert r.status in ("timeout", "killed")
    # the host can still start processes right after
    assert subprocess.run(["true"]).returncode == 0


def test_memory_hog_is_killed(host_files):
    r = run_python("x = bytearray(8 * 2**30)\nprint('allocated')", limits=FAST)
    assert r.status == "killed" and r.limit == "memory" and "allocated" not in r.stdout


def test_writing_outside_its_dir_fails(host_files):
    target = host_files.parent / "pwned.txt"
    r = run_python(f"open({str(target)!r}, 'w').write('x')", limits=FAST)
    assert r.status == "error" and not target.exists()


def test_deleting_files_outside_fails(host_files):
    r = run_python(f"import os\nos.remove({str(host_files)!r})", limits=FAST)
    assert r.status == "error"  # the fixture checks the file is still there


def test_environment_secrets_are_not_visible(monkeypatch):
    monkeypatch.setenv("VISCODEX_TEST_SECRET", "hunter2")
    r = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('VISCODEX_TEST_SECRET'))")
    assert r.status == "ok" and "hunter2" not in r.stdout and "VISCODEX_TEST_SECRET" not in r.stdout


def test_network_socket_cannot_reach_the_host():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    r = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')",
                   limits=FAST)
    server.close()
    assert r.status == "error" and "connected" not in r.stdout and not accepted


def test_huge_stdout_is_capped(host_files):
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)", limits=FAST)
    assert r.status == "killed" and r.limit == "file_size"
    assert r.truncated and len(r.stdout) == FAST.max_output_bytes


def test_matplotlib_style_env_is_headless():
    r = run_python("import os\nprint(os.environ['MPLBACKEND'])")
    assert r.stdout.strip() == "Agg"


def test_input_file_names_cannot_escape():
    with pytest.raises(ValueError, match="inside the dir"):
        run_python("pass", files={"../evil.py": b""})
