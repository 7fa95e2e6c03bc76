"""The harness side of one sandbox run's I/O: capped pipes, bwrap's status, ending the run,
and reading files the program left without trusting them."""

from __future__ import annotations

import json
import os
import selectors
import signal
import stat
import subprocess
import time


def read_program_file(workdir: str, name: str, cap: int) -> bytes | None:
    """A file the program wrote, or None: no link is followed, only a regular file is read
    (never a FIFO or device, so this cannot block), and at most ``cap`` bytes."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
    fds = []
    try:
        d = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(d)
        for p in parts[:-1]:
            d = os.open(p, flags | os.O_DIRECTORY, dir_fd=d)
            fds.append(d)
        fd = os.open(parts[-1], flags, dir_fd=d)
        fds.append(fd)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, left = [], cap
        while left > 0:
            c = os.read(fd, min(left, 1 << 20))
            if not c:
                break
            chunks.append(c)
            left -= len(c)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        for fd in fds:
            os.close(fd)


class Output:
    """One captured stream: the first ``keep`` bytes, and the total seen."""

    def __init__(self, keep: int):
        self.keep, self.data, self.total = keep, bytearray(), 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.keep - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    def text(self) -> str:
        return bytes(self.data).decode("utf-8", "replace")


class Run:
    """A started sandbox process: pumps its pipes until exit, a deadline or an output overflow."""

    def __init__(self, proc: subprocess.Popen, status_fd: int | None, keep_bytes: int, max_bytes: int):
        self.proc, self.max_bytes = proc, max_bytes
        self.out, self.err = Output(keep_bytes), Output(keep_bytes)
        self.status_buf = bytearray()
        self.status_fd = status_fd
        if status_fd is not None:
            os.set_blocking(status_fd, False)
        self.init_pidfd: int | None = None
        self.exit_code: int | None = None

    def _status_docs(self) -> list[dict]:
        """The JSON documents bwrap wrote so far (a partial last one is left for later)."""
        docs, text, i = [], bytes(self.status_buf).decode("utf-8", "replace"), 0
        dec = json.JSONDecoder()
        while True:
            while i < len(text) and text[i].isspace():
                i += 1
            if i >= len(text):
                return docs
            try:
                doc, i = dec.raw_decode(text, i)
            except json.JSONDecodeError:
                return docs
            if isinstance(doc, dict):
                docs.append(doc)

    def _grab_init(self) -> None:
        """A pidfd on the namespace's init, checked to be it (its PID namespace is the one bwrap made)."""
        if self.init_pidfd is not None:
            return
        docs = self._status_docs()
        start = next((d for d in docs if "child-pid" in d), None)
        if start is None:
            return
        pid = int(start["child-pid"])
        try:
            fd = os.pidfd_open(pid)
        except OSError:  # already gone, and with it the namespace
            return
        try:
            same = os.readlink(f"/proc/{pid}/ns/pid") == f"pid:[{start.get('pid-namespace')}]"
        except OSError:
            same = False
        if same:
            self.init_pidfd = fd
        else:
            os.close(fd)

    def pump(self, deadline: float) -> str | None:
        """Reads until both output pipes close; returns "wall" or "file_size" if it had to stop."""
        sel = selectors.DefaultSelector()
        streams = {self.proc.stdout.fileno(): self.out, self.proc.stderr.fileno(): self.err}
        for fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        if self.status_fd is not None:
            sel.register(self.status_fd, selectors.EVENT_READ)
        open_streams = set(streams)
        try:
            while open_streams:
                left = deadline - time.monotonic()
                if left <= 0:
                    return "wall"
                for key, _ in sel.select(timeout=min(left, 0.5)):
                    try:
                        chunk = os.read(key.fd, 1 << 16)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(key.fd)
                        open_streams.discard(key.fd)
                        continue
                    if key.fd == self.status_fd:
                        self.status_buf += chunk
                        self._grab_init()
                        continue
                    stream = streams[key.fd]
                    stream.add(chunk)
                    if stream.total > self.max_bytes:
                        return "file_size"
            return None
        finally:
            sel.close()

    def _drain_status(self) -> None:
        """Whatever bwrap has written so far (never blocks)."""
        while self.status_fd is not None:
            try:
                c = os.read(self.status_fd, 1 << 16)
            except BlockingIOError:
                return
            if not c:
                return
            self.status_buf += c

    def started(self) -> bool:
        return any("child-pid" in d for d in self._status_docs())

    def finish_status(self) -> None:
        if self.status_fd is None:
            return
        self._drain_status()  # bwrap and the namespace are gone: everything it wrote is there
        for doc in self._status_docs():
            if "exit-code" in doc:
                self.exit_code = int(doc["exit-code"])

    def end(self) -> None:
        """Ends everything the run started. bwrap: SIGKILL to the PID namespace's init, which takes
        every process in the namespace with it, then wait until the init has exited (only then is
        the namespace empty; bwrap itself may exit first). Weak mode: the process group."""
        if self.status_fd is not None and self.init_pidfd is None:
            self._drain_status()
            self._grab_init()
        if self.init_pidfd is not None:
            try:
                signal.pidfd_send_signal(self.init_pidfd, signal.SIGKILL)
            except OSError:
                pass
        elif self.status_fd is None:  # weak mode: the program leads its own session
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.init_pidfd is not None:
            with selectors.DefaultSelector() as sel:  # a pidfd turns readable when its process has exited
                sel.register(self.init_pidfd, selectors.EVENT_READ)
                if not sel.select(timeout=10):
                    raise RuntimeError("sandbox: the PID namespace's init did not exit after SIGKILL")

    def close(self) -> None:
        for fd in (self.init_pidfd, self.status_fd):
            if fd is not None:
                os.close(fd)
        self.init_pidfd = self.status_fd = None
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
