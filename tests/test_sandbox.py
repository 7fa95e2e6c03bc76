"""The sandbox: ordinary programs and resource limits, then hostile programs, one per known way
out (issue 13), run as root the way CI runs.

Each hostile test asserts what the program observed (EPERM, ESRCH, a missing path, a kill by the
seccomp filter) AND that the host is unchanged (the ``host`` fixture): a canary file intact,
a decoy process alive with its rlimits intact, no new SysV IPC object, no new file in /dev,
no leaked sandbox dir, no surviving process started by the run.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

from viscodex_jax.eval.sandbox import Limits, SandboxUnavailable, run_python
from viscodex_jax.eval.sandbox import bwrap as sandbox_bwrap

QUICK = Limits(wall_seconds=20, cpu_seconds=5, memory_bytes=1 << 30)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DECOY_NOFILE = (77, 77)
x86_64_only = pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 syscall ABIs")


def run(code: str, **kw):
    return run_python(textwrap.dedent(code), limits=kw.pop("limits", QUICK), **kw)


def observed(r) -> dict:
    """The JSON the program printed last (what it saw)."""
    assert r.status == "ok", (r.status, r.limit, r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def _sysvipc() -> dict[str, set[str]]:
    out = {}
    for kind in ("shm", "msg", "sem"):
        with open(f"/proc/sysvipc/{kind}") as f:
            out[kind] = {" ".join(line.split()[:2]) for line in f.readlines()[1:]}
    return out


_KEEP: set[int] = set()  # children the tests wait for themselves


def _descendants() -> set[int]:
    """Processes whose parent chain reaches this test process (orphans come back to it: subreaper)."""
    parents, me = {}, os.getpid()
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
            except (OSError, IndexError, ValueError):
                continue
            if state == "Z" and int(ppid) == me and int(p) not in _KEEP:
                os.waitpid(int(p), os.WNOHANG)  # exited bwrap helpers handed to this subreaper
                continue
            parents[int(p)] = int(ppid)
    out = set()
    for pid in parents:
        seen, q = set(), pid
        while q in parents and q not in seen and q > 1:
            seen.add(q)
            q = parents[q]
            if q == me:
                out.add(pid)
                break
    return out


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat_line = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return stat_line[:60] + " " + f.read()[:200].decode("utf-8", "replace")
    except OSError as e:
        return f"{pid}: {e}"


def _own_cgroups() -> list[str]:
    """cgroups of this process's sandbox runs (named after the run dir, which carries our pid)."""
    return glob.glob(f"/sys/fs/cgroup/**/viscodex-sandbox-{os.getpid()}.*", recursive=True)


@pytest.fixture(scope="module")
def decoy():
    """A host process the program must not be able to signal or re-limit, and a canary file."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: a sandbox process that escaped its tree stays visible
    base = tempfile.mkdtemp(prefix="viscodex-sandbox-test-")
    os.chmod(base, 0o711)  # the sandbox's uid must reach its run dirs in here
    canary = os.path.join(base, "canary.txt")
    with open(canary, "w") as f:
        f.write("keep me")
    proc = subprocess.Popen(["sleep", "600"])
    _KEEP.add(proc.pid)
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, _DECOY_NOFILE)
    yield {"pid": proc.pid, "proc": proc, "canary": canary, "base": base}
    proc.kill()
    proc.wait()
    libc.prctl(36, 0, 0, 0, 0)
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def host(decoy, monkeypatch):
    """Snapshot of the host before the test; asserts after it that nothing changed."""
    runs = tempfile.mkdtemp(dir=decoy["base"], prefix="runs-")
    os.chmod(runs, 0o711)  # reachable by the sandbox uid, so the sandbox puts its run dirs here
    monkeypatch.setattr(tempfile, "tempdir", runs)  # the sandbox's dirs go here: none may be left
    before = {"ipc": _sysvipc(), "dev": set(os.listdir("/dev")), "procs": _descendants(),
              "tmp": set(os.listdir("/tmp"))}
    yield decoy
    time.sleep(0.05)
    with open(decoy["canary"]) as f:
        assert f.read() == "keep me"
    assert decoy["proc"].poll() is None, "the decoy process was killed"
    assert resource.prlimit(decoy["pid"], resource.RLIMIT_NOFILE) == _DECOY_NOFILE
    assert _sysvipc() == before["ipc"], "a SysV IPC object was left behind"
    assert set(os.listdir("/dev")) - before["dev"] == set()
    assert not [n for n in set(os.listdir("/tmp")) - before["tmp"] if "escape" in n]
    assert os.listdir(runs) == [], "the sandbox's dir was not removed"
    assert _own_cgroups() == [], "a run's cgroup was left behind"
    left = _descendants() - before["procs"] - {decoy["pid"]}
    assert not left, f"sandbox processes survived: {[_describe(p) for p in left]}"


# -- ordinary programs and resource limits ---------------------------------------------------------

def test_normal_program_stdin_stdout_and_files(host):
    r = run_python("import sys\nprint(sys.stdin.read().strip()[::-1])\nopen('out.txt','w').write('made')",
                   stdin="abc", collect=("out.txt",))
    assert r.status == "ok" and r.stdout == "cba\n" and r.files == {"out.txt": b"made"} and r.mode == "bwrap"


def test_input_files_are_readable_and_results_collected_from_subdirs(host):
    r = run("""
        import os
        os.makedirs("out", exist_ok=True)
        with open("data/in.txt") as f, open("out/res.txt", "w") as g:
            g.write(f.read().upper())
        """, files={"data/in.txt": "hello"}, collect=("out/res.txt",))
    assert r.status == "ok" and r.files == {"out/res.txt": b"HELLO"}


def test_error_text_is_returned(host):
    r = run_python("raise ValueError('boom')")
    assert r.status == "error" and r.returncode == 1 and "ValueError: boom" in r.stderr


def test_infinite_loop_hits_cpu_limit(host):
    # 1 s of CPU within a generous wall limit: the machine may be shared and slow.
    r = run_python("while True:\n    pass", limits=Limits(wall_seconds=30, cpu_seconds=1))
    assert r.status == "killed" and r.limit == "cpu" and r.returncode == -signal.SIGXCPU


def test_sleeping_forever_hits_wall_limit(host):
    r = run_python("import time\ntime.sleep(100)", limits=Limits(wall_seconds=2, cpu_seconds=5))
    assert r.status == "timeout" and r.limit == "wall" and r.returncode is None and r.wall_seconds < 8


def test_fork_bomb_is_contained(host):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    r = run_python(code, limits=Limits(wall_seconds=3, cpu_seconds=1))
    assert r.status in ("timeout", "killed")
    # the host can still start processes right after
    assert subprocess.run(["true"]).returncode == 0


def test_thread_count_is_limited(host):
    r = run("""
        import threading, time
        n = 0
        try:
            for _ in range(200):
                threading.Thread(target=time.sleep, args=(5,), daemon=True).start()
                n += 1
        except RuntimeError:
            pass
        print(n)
        """, limits=Limits(wall_seconds=20, cpu_seconds=5, max_processes=16))
    assert r.status == "ok" and 0 < int(r.stdout) < 16  # RLIMIT_NPROC counts its threads


def test_run_gets_its_own_cgroup_with_limits_where_the_host_allows(host):
    from viscodex_jax.eval.sandbox import cgroup as sandbox_cgroup

    probe = sandbox_cgroup.create("viscodex-sandbox-probe", 1, 1 << 20)
    if probe is None:
        pytest.skip("this host lets root make no pids/memory cgroup")  # the rlimits stay the only layer
    probe.remove()
    limits = Limits(wall_seconds=30, cpu_seconds=5, memory_bytes=1 << 30, max_processes=20)
    result = []
    runner = threading.Thread(target=lambda: result.append(run("import time\ntime.sleep(3)", limits=limits)))
    runner.start()
    seen, t0 = {}, time.monotonic()
    while runner.is_alive() and time.monotonic() - t0 < 30:
        for d in _own_cgroups():
            try:
                procs = open(os.path.join(d, "cgroup.procs")).read().split()
                name = "pids.max" if os.path.exists(os.path.join(d, "pids.max")) else "memory.limit_in_bytes"
                limit = open(os.path.join(d, name)).read().strip()
            except OSError:
                continue
            if len(procs) >= 3:  # bwrap's monitor and init, and the program
                seen[d] = limit
        time.sleep(0.05)
    runner.join()
    assert result[0].status == "ok"
    values = set(seen.values())
    assert str(20 + 4) in values  # pids.max: its threads plus bwrap's processes
    assert values <= {"24", str((1 << 30) + (256 << 20))}  # memory limit: RLIMIT_AS plus a margin


def test_memory_hog_is_killed(host):
    r = run_python("x = bytearray(8 * 2**30)\nprint('allocated')", limits=QUICK)
    assert r.status == "killed" and r.limit == "memory" and "allocated" not in r.stdout


def test_writing_outside_its_dir_fails(host):
    target = os.path.join(host["base"], "pwned.txt")
    r = run_python(f"open({target!r}, 'w').write('x')", limits=QUICK)
    assert r.status == "error" and not os.path.exists(target)


def test_environment_secrets_are_not_visible(host, monkeypatch):
    monkeypatch.setenv("VISCODEX_TEST_SECRET", "hunter2")
    r = run_python("import os\nprint(sorted(os.environ))\nprint(os.environ.get('VISCODEX_TEST_SECRET'))")
    assert r.status == "ok" and "hunter2" not in r.stdout and "VISCODEX_TEST_SECRET" not in r.stdout


def test_huge_stdout_is_capped(host):
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 100000)", limits=QUICK)
    assert r.status == "killed" and r.limit == "file_size"
    assert r.truncated and len(r.stdout) == QUICK.max_output_bytes


def test_huge_file_hits_the_file_size_limit(host):
    r = run_python("open('big', 'wb').write(b'x' * (64 << 20))", limits=QUICK)
    assert r.status == "killed" and r.limit == "file_size"


def test_matplotlib_style_env_is_headless(host):
    r = run_python("import os\nprint(os.environ['MPLBACKEND'])")
    assert r.stdout.strip() == "Agg"


def test_input_file_names_cannot_escape(host):
    with pytest.raises(ValueError, match="inside the dir"):
        run_python("pass", files={"../evil.py": b""})


# -- 1. foreign syscall ABIs ----------------------------------------------------------------

@x86_64_only
def test_fork_through_32bit_int80_abi_is_killed(host):
    r = run("""
        import ctypes, mmap
        code = bytes([0xb8, 2, 0, 0, 0, 0xcd, 0x80, 0xc3])  # mov eax, 2 (i386 fork); int 0x80; ret
        m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        m.write(code)
        fork32 = ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
        print("before", flush=True)
        print("forked", fork32(), flush=True)
        """)
    assert (r.status, r.limit, r.returncode) == ("killed", "seccomp", -signal.SIGSYS)
    assert r.stdout == "before\n"


@x86_64_only
def test_x32_abi_syscall_is_killed(host):
    r = run("""
        import ctypes
        print("before", flush=True)
        print("forked", ctypes.CDLL(None).syscall(0x40000000 | 57), flush=True)  # x32 fork
        """)
    assert (r.status, r.limit) == ("killed", "seccomp") and r.stdout == "before\n"


# -- 2. other processes -------------------------------------------------------------------------

def test_host_processes_cannot_be_killed_or_relimited(host):
    r = run(f"""
        import json, os, resource
        seen = {{}}
        for name, pid in (("decoy", {host['pid']}), ("harness", {os.getpid()})):
            for what, call in (("kill", lambda: os.kill(pid, 9)),
                               ("prlimit", lambda: resource.prlimit(pid, resource.RLIMIT_NOFILE, (3, 3)))):
                try:
                    call()
                    seen[name + "." + what] = "done"
                except OSError as e:
                    seen[name + "." + what] = e.errno
        print(json.dumps(seen))
        """)
    assert set(observed(r).values()) == {3}  # ESRCH: no such process in its PID namespace


def test_kill_minus_one_reaches_nothing(host):
    r = run("""
        import json, os
        try:
            os.kill(-1, 9)
            seen = "sent"
        except OSError as e:
            seen = e.errno
        print(json.dumps({"kill-1": seen, "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit())}))
        """)
    seen = observed(r)
    assert seen["kill-1"] == 3 and seen["pids"] == [1, 2]  # only bwrap's init and itself exist


def test_wall_limit_ends_the_whole_namespace(host):
    r = run("""
        import threading, time
        for _ in range(8):
            threading.Thread(target=time.sleep, args=(600,)).start()
        time.sleep(600)
        """, limits=Limits(wall_seconds=1.5, cpu_seconds=5))
    assert r.status == "timeout" and r.wall_seconds < 8  # the host fixture checks nothing survived


def test_killing_the_harness_ends_the_sandbox_and_the_next_run_cleans_up(host):
    harness = subprocess.Popen(
        [sys.executable, "-c", "import sys, tempfile; tempfile.tempdir = sys.argv[1]\n"
         "from viscodex_jax.eval.sandbox import Limits, run_python\n"
         "run_python('import time\\nprint(1, flush=True)\\ntime.sleep(600)', limits=Limits(wall_seconds=600))",
         tempfile.tempdir], cwd=CHECKOUT)
    t0 = time.monotonic()
    while not _sandboxed_descendants(programs_only=True) and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    assert _sandboxed_descendants(programs_only=True), "the sandboxed program never started"
    harness.kill()  # SIGKILL: no cleanup runs in the harness
    harness.wait()
    t0 = time.monotonic()
    while _sandboxed_descendants() and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert not _sandboxed_descendants(), f"the sandbox outlived its harness: {[_describe(p) for p in _sandboxed_descendants()]}"
    assert len(os.listdir(tempfile.tempdir)) == 1  # its run dir: nobody could remove it yet
    assert run_python("print('next')").stdout == "next\n"  # the next run removes it (host fixture checks)
    assert glob.glob(f"/sys/fs/cgroup/**/viscodex-sandbox-{harness.pid}.*", recursive=True) == []


def _sandboxed_descendants(programs_only: bool = False) -> list[int]:
    """Live descendants that are part of a sandbox run (bwrap's argv carries the bootstrap too)."""
    out = []
    for pid in _descendants():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f, open(f"/proc/{pid}/comm") as c:
                cmd = f.read()
                if b"runpy.run_path" in cmd and not (programs_only and (c.read().strip() == "bwrap"
                                                                        or b"_sandbox_stage0" in cmd)):
                    out.append(pid)
        except OSError:
            pass
    return out


def test_new_processes_are_refused_threads_work(host):
    r = run("""
        import json, os, subprocess, threading
        seen = {}
        for name, call in (("fork", os.fork), ("subprocess", lambda: subprocess.run(["/bin/true"]))):
            try:
                call()
                seen[name] = "ran"
            except OSError as e:
                seen[name] = e.errno
        t = threading.Thread(target=lambda: seen.setdefault("thread", "ran"))
        t.start(); t.join()
        print(json.dumps(seen))
        """)
    assert observed(r) == {"fork": 1, "subprocess": 1, "thread": "ran"}


# -- 3. AF_UNIX sockets -----------------------------------------------------------------------

def test_unix_sockets_cannot_reach_the_host(host):
    path = os.path.join(host["base"], "host.sock")
    servers = []
    for addr in (path, "\0viscodex-escape-abstract"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(addr)
        s.listen(1)
        s.settimeout(0.1)
        servers.append(s)
    try:
        r = run(f"""
            import json, socket
            seen = {{}}
            for addr in ({path!r}, "\\0viscodex-escape-abstract"):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(addr)
                    seen[repr(addr)] = "connected"
                except OSError as e:
                    seen[repr(addr)] = e.errno
            print(json.dumps(seen))
            """)
        assert sorted(observed(r).values()) == [2, 111]  # ENOENT (no such path), ECONNREFUSED (own net ns)
        for s in servers:
            with pytest.raises(socket.timeout):
                s.accept()
    finally:
        for s in servers:
            s.close()
        os.unlink(path)


def test_socket_families_outside_the_network_namespace_are_refused(host):
    r = run("""
        import json, socket
        seen = {}
        for family in (1, 2, 10, 16, 17, 38, 40, 15):  # UNIX INET INET6 NETLINK | PACKET ALG VSOCK KEY
            try:
                socket.socket(family, socket.SOCK_STREAM if family == 1 else socket.SOCK_DGRAM).close()
                seen[family] = "opened"
            except OSError as e:
                seen[family] = e.errno
        print(json.dumps(seen))
        """)
    assert observed(r) == {"1": "opened", "2": "opened", "10": "opened", "16": "opened",
                           "17": 1, "38": 1, "40": 1, "15": 1}


def test_network_opt_in_shares_the_host_network(host):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    r = run(f"""
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=5).close()
        print("connected")
        """, limits=Limits(wall_seconds=20, cpu_seconds=5, allow_network=True))
    server.close()
    assert r.status == "ok" and r.stdout == "connected\n"


def test_network_is_unreachable(host):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.1)
    port = server.getsockname()[1]
    r = run(f"""
        import json, socket
        try:
            socket.create_connection(("127.0.0.1", {port}), timeout=2)
            seen = "connected"
        except OSError as e:
            seen = e.errno
        print(json.dumps(seen))
        """)
    assert observed(r) in (101, 111)  # ENETUNREACH / ECONNREFUSED: loopback of its own, down
    with pytest.raises(socket.timeout):
        server.accept()
    server.close()


# -- 4. writable paths outside its dir ------------------------------------------------------------

_HOST_WRITES = {
    "/dev/viscodex-escape": "w", "/proc/sys/kernel/hostname": "w", "/proc/sys/kernel/core_pattern": "w",
    "/proc/sys/vm/drop_caches": "w", "/proc/sys/kernel/pid_max": "w", "/proc/sysrq-trigger": "w",
    "/sys/fs/cgroup/cgroup.procs": "w", "/tmp/../viscodex-escape": "w", "/usr/viscodex-escape": "w",
}


def test_writes_outside_its_dir_all_fail(host):
    sysctls = ("/proc/sys/kernel/core_pattern", "/proc/sys/kernel/pid_max", "/proc/sys/kernel/hostname")
    before = [open(p).read() for p in sysctls]
    r = run(f"""
        import json, os
        seen = {{}}
        for path in {sorted(_HOST_WRITES)!r}:
            try:
                with open(path, "w") as f:
                    f.write("1")
                seen[path] = "written"
            except OSError as e:
                seen[path] = e.errno
        for d in ("/sys/fs/cgroup/viscodex-escape", "/dev/viscodex-escape-dir", "/viscodex-escape"):
            try:
                os.mkdir(d)
                seen[d] = "made"
            except OSError as e:
                seen[d] = e.errno
        print(json.dumps(seen))
        """)
    seen = observed(r)
    assert all(isinstance(v, int) for v in seen.values()), seen
    assert [open(p).read() for p in sysctls] == before
    assert not os.path.exists("/sys/fs/cgroup/viscodex-escape") and not os.path.exists("/viscodex-escape")


def test_files_outside_cannot_be_changed(host):
    r = run(f"""
        import json, os
        seen = {{}}
        for name, call in (("write", lambda: open({host['canary']!r}, "w")),
                           ("remove", lambda: os.remove({host['canary']!r}))):
            try:
                call()
                seen[name] = "done"
            except OSError as e:
                seen[name] = e.errno
        print(json.dumps(seen))
        """)
    assert observed(r) == {"write": 2, "remove": 2}  # the host path does not exist in its view


# -- 5. readable secrets -------------------------------------------------------------------------

def test_secrets_are_invisible(host):
    other_run = tempfile.mkdtemp(prefix="viscodex-sandbox-", dir="/tmp")  # as another run's dir looks
    with open(os.path.join(other_run, "main.py"), "w") as f:
        f.write("SECRET = 'other run'")
    git_config = os.path.join(CHECKOUT, ".git", "config")
    try:
        r = run(f"""
            import json, os
            seen = {{}}
            for path in ("/etc/shadow", {git_config!r}, {os.path.join(other_run, 'main.py')!r}):
                try:
                    seen[path] = open(path).read()
                except OSError as e:
                    seen[path] = e.errno
            for d in ("/root", "/tmp", "/etc", {CHECKOUT!r}):
                try:
                    seen[d] = sorted(os.listdir(d))
                except OSError as e:
                    seen[d] = e.errno
            print(json.dumps(seen))
            """)
        seen = observed(r)
    finally:
        shutil.rmtree(other_run)
    assert seen["/etc/shadow"] == 2 and seen[git_config] == 2 and seen[os.path.join(other_run, "main.py")] == 2
    # Only what leads to the bound interpreter can show in /root; nothing of the host's /tmp or /etc.
    bound = sandbox_bwrap.read_only_paths(sys.executable)
    on_paths = {p.split("/")[2] for p in bound if p.startswith("/root/")}
    assert seen["/root"] == 2 or set(seen["/root"]) <= on_paths
    tmp_names = {p.split("/")[2] for p in bound if p.startswith("/tmp/")}
    assert seen["/tmp"] == 2 or set(seen["/tmp"]) <= tmp_names
    assert set(seen["/etc"]) <= {"localtime", "ld.so.cache"}
    assert seen[CHECKOUT] == 2 or ".git" not in seen[CHECKOUT]


# -- 6. the harness does not trust the program's files ------------------------------------------------

def test_output_and_collected_file_tricks_are_harmless(host):
    limits = Limits(wall_seconds=20, cpu_seconds=5, memory_bytes=1 << 30, file_size_bytes=1 << 20)
    r = run("""
        import os
        os.symlink("/etc/shadow", ".stdout")            # the old harness read these paths as root
        os.mkfifo(".stderr")
        os.mkdir(".stdin")
        os.symlink("/etc/shadow", "link.txt")
        os.symlink("/sandbox/good.txt", "link2.txt")
        os.mkfifo("fifo.txt")
        os.mkdir("dir.txt")
        os.mkdir("real")
        os.symlink("/etc", "sub")
        with open("good.txt", "w") as f:
            f.write("fine")
        with open("real/inner.txt", "w") as f:
            f.write("inner")
        with open("big.bin", "wb") as f:
            try:
                f.truncate(10 * 2**30)                     # past the file-size limit: refused
            except OSError:
                f.write(b"x" * 2**20)
        os.chmod("good.txt", 0)
        print("done")
        """, limits=limits, collect=("link.txt", "link2.txt", "fifo.txt", "dir.txt", "good.txt", "big.bin",
                                     "real/inner.txt", "sub/shadow", ".stdout", ".stderr", "missing.txt"))
    assert r.status == "ok" and r.stdout == "done\n" and r.wall_seconds < 10
    assert r.files == {"good.txt": b"fine", "big.bin": b"x" * 2**20, "real/inner.txt": b"inner"}


def test_odd_output_never_raises(host):
    r = run("""
        import os, sys
        os.write(1, b"\\xff\\xfe not utf-8 \\x00")
        os.close(1); os.close(2); os.close(0)
        """)
    assert r.status == "ok" and r.stdout.startswith("\ufffd\ufffd not utf-8")


# -- 7. SysV IPC --------------------------------------------------------------------------------------

def test_sysv_ipc_is_refused_and_nothing_is_left(host):
    r = run("""
        import ctypes, json
        libc = ctypes.CDLL(None, use_errno=True)
        seen = {}
        for name, call in (("shmget", lambda: libc.shmget(0, 800 << 20, 0o1600)),
                           ("msgget", lambda: libc.msgget(0, 0o1600)),
                           ("semget", lambda: libc.semget(0, 1, 0o1600))):
            seen[name] = (call(), ctypes.get_errno())
        print(json.dumps(seen))
        """)
    assert observed(r) == {k: [-1, 1] for k in ("shmget", "msgget", "semget")}  # EPERM; fixture: ipcs unchanged


# -- 8. user namespaces, mounts and the dangerous syscalls ----------------------------------------------

def _nr(name: str) -> int:
    import pyseccomp

    return pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)


# name -> arguments (zeros suffice: the filter answers before the kernel checks them)
_DANGEROUS = {
    "unshare": (0x10000000,), "setns": (0, 0), "ptrace": (16, 1, 0, 0), "keyctl": (0, 0, 0),
    "add_key": (0, 0, 0, 0, 0), "io_uring_setup": (8, 0), "bpf": (0, 0, 0), "perf_event_open": (0, 0, -1, -1, 0),
    "userfaultfd": (0,), "mount": (0, 0, 0, 0, 0), "umount2": (0, 0), "pivot_root": (0, 0), "chroot": (0,),
    "kexec_load": (0, 0, 0, 0), "init_module": (0, 0, 0), "process_vm_readv": (1, 0, 0, 0, 0, 0),
    "memfd_create": (0, 0), "open_by_handle_at": (0, 0, 0), "reboot": (0, 0, 0, 0),
}


@pytest.mark.parametrize("name", sorted(_DANGEROUS))
def test_dangerous_syscall_gets_eperm(host, name):
    r = run(f"""
        import ctypes, json
        libc = ctypes.CDLL(None, use_errno=True)
        args = [ctypes.c_long(a) for a in {list(_DANGEROUS[name])!r}]
        ret = libc.syscall(ctypes.c_long({_nr(name)}), *args)
        print(json.dumps([ret, ctypes.get_errno()]))
        """)
    assert observed(r) == [-1, 1]


def test_user_namespace_then_mount_is_refused(host):
    r = run("""
        import ctypes, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        seen = {"unshare": (libc.unshare(0x10000000), ctypes.get_errno())}   # CLONE_NEWUSER
        seen["mount"] = (libc.mount(b"none", b"/sandbox", b"tmpfs", 0, None), ctypes.get_errno())
        seen["clone_newuser"] = (libc.syscall(56, 0x10000000 | 17, 0, 0, 0, 0), ctypes.get_errno())
        print(json.dumps(seen))
        """)
    assert observed(r) == {"unshare": [-1, 1], "mount": [-1, 1], "clone_newuser": [-1, 1]}


def test_proc_shows_only_its_namespace_whose_init_is_as_confined(host):
    r = run(f"""
        import json, os
        seen = {{"harness": os.path.exists("/proc/{os.getpid()}")}}
        with open("/proc/self/mem", "r+b"):   # its own memory: allowed, and harmless
            seen["self"] = "opened"
        with open("/proc/1/status") as f:      # bwrap's init, the one other process it can see
            seen["init"] = dict(line.split(":", 1) for line in f if line.startswith(("Uid", "CapEff", "NoNewPrivs", "Seccomp:")))
        print(json.dumps(seen))
        """)
    seen = observed(r)
    init = {k: v.split() for k, v in seen.pop("init").items()}
    assert seen == {"harness": False, "self": "opened"}
    # the init runs under the same seccomp filter, without privileges or capabilities, as the sandbox uid
    assert init == {"Uid": ["65534"] * 4, "CapEff": ["0000000000000000"], "NoNewPrivs": ["1"], "Seccomp": ["2"]}


# -- refusal without bubblewrap, the weak mode, and the interpreter argument ------------------------------

@pytest.fixture
def no_bwrap(monkeypatch):
    monkeypatch.setenv("VISCODEX_BWRAP", "/nonexistent/bwrap")
    monkeypatch.delenv("VISCODEX_SANDBOX_ALLOW_WEAK", raising=False)
    sandbox_bwrap.check_bwrap.cache_clear()
    yield
    monkeypatch.undo()
    sandbox_bwrap.check_bwrap.cache_clear()


def test_without_bubblewrap_untrusted_code_is_refused(host, no_bwrap, monkeypatch):
    with pytest.raises(SandboxUnavailable, match=r"bubblewrap at /nonexistent/bwrap could not be started.*"
                                                 r"Refusing.*VISCODEX_SANDBOX_ALLOW_WEAK=1"):
        run_python("print('ran')")
    monkeypatch.delenv("VISCODEX_BWRAP")
    monkeypatch.setenv("PATH", host["base"])  # no bwrap on the PATH
    sandbox_bwrap.check_bwrap.cache_clear()
    with pytest.raises(SandboxUnavailable, match=r"'bwrap'\) is not installed.*Debian's 'bubblewrap'"):
        run_python("print('ran')")
    assert os.listdir(tempfile.tempdir) == []


def test_without_libseccomp_binding_untrusted_code_is_refused(host, monkeypatch):
    from viscodex_jax.eval.sandbox import seccomp as sandbox_seccomp

    sandbox_seccomp.filter_bpf.cache_clear()
    try:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "pyseccomp", None)  # import fails as if not installed
            with pytest.raises(SandboxUnavailable, match=r"'pyseccomp'.*libseccomp\.so\.2"):
                run_python("print('ran')", allow_weak=True)
    finally:
        sandbox_seccomp.filter_bpf.cache_clear()
    assert os.listdir(tempfile.tempdir) == []


def test_weak_mode_only_when_accepted_and_still_filtered(host, no_bwrap, monkeypatch):
    monkeypatch.setenv("VISCODEX_SANDBOX_ALLOW_WEAK", "1")
    r = run("""
        import ctypes, json, os, socket
        libc = ctypes.CDLL(None, use_errno=True)
        seen = {"unshare": [libc.unshare(0x10000000), ctypes.get_errno()]}   # CLONE_NEWUSER
        for name, call in (("fork", os.fork), ("inet", lambda: socket.socket(socket.AF_INET))):
            try:
                call()
                seen[name] = "ran"
            except OSError as e:
                seen[name] = e.errno
        print(json.dumps(seen))
        """)
    assert r.mode == "weak"
    assert observed(r) == {"unshare": [-1, 1], "fork": 1, "inet": 1}


def test_other_interpreter_gets_only_its_own_prefix(host):
    venv = os.path.join(host["base"], "score-venv")
    subprocess.run([os.path.realpath(sys.executable), "-m", "venv", "--without-pip", str(venv)], check=True)
    py = os.path.join(venv, "bin", "python")
    r = run("""
        import importlib.util, json, sys
        print(json.dumps([sys.prefix, importlib.util.find_spec("numpy") is None]))
        """, python=py)
    assert observed(r) == [venv, True]  # the project's venv (with numpy) is not in its view
    with pytest.raises(ValueError, match="absolute path"):
        run_python("pass", python="python3")
