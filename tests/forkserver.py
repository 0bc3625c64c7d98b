"""Test servers forked from one process that has already imported the server.

A server started with `python wsgi.py` spends about 0.9 s of its 1.0 s start
importing gevent, Flask, SQLAlchemy, Alembic and the package; the suite starts
some 300. This process imports them once, monkey-patched first as `wsgi.py`
does, then forks one server per request: each child runs `wsgi.py`'s own
`main` with its own arguments, environment, working directory, output file
and open-files limit, and exits through the interpreter as `wsgi.py` does.

The test process reads the exit status itself: it marks itself a child
subreaper, and each server is forked twice (the middle process exits at
once), so that the server is re-parented to the test process, which can
`waitpid` it like any child. The tests that check how a process starts
(startup, the package, the process types) still run `python wsgi.py`.

Protocol, one JSON line each way on this process's stdin and stdout:
{"argv", "cwd", "env", "output", "open_files"} in, {"pid"} out.
"""

import ctypes
import gc
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_PR_SET_CHILD_SUBREAPER = 36


# --- in the test process --------------------------------------------------------------


class ForkedProcess:
    """What the tests use of `subprocess.Popen`, for a server forked by the fork server."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        # In a process monkey-patched by gevent (a bench) that also runs
        # subprocesses, gevent's SIGCHLD handler reaps every child, this one
        # included: a child watcher of the loop then holds its status.
        self._watcher = None
        if _gevent_reaps_children():
            from gevent import get_hub

            self._watcher = get_hub().loop.child(pid, False, False)
            self._watcher.start(self._reaped)

    def _reaped(self) -> None:
        self.returncode = os.waitstatus_to_exitcode(self._watcher.rstatus)
        self._watcher.stop()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                if self._watcher is None:
                    raise
                return None  # reaped by gevent: `_reaped` sets the code in the loop's turn
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _gevent_reaps_children() -> bool:
    """Whether gevent may reap this process's children (its `os` monkey-patched)."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and monkey.is_module_patched("os")


class ForkServer:
    """The fork server, started at the first request and stopped with the test process."""

    def __init__(self) -> None:
        self._process: subprocess.Popen | None = None
        self._lock = threading.Lock()

    def spawn(
        self, argv: list[str], *, cwd: Path, env: dict[str, str], output: Path,
        open_files: int | None = None,
    ) -> ForkedProcess:  # fmt: skip
        request = {
            "argv": argv, "cwd": str(cwd), "env": env, "output": str(output),
            "open_files": open_files,
        }  # fmt: skip
        with self._lock:
            process = self._started(env)
            process.stdin.write(json.dumps(request).encode() + b"\n")
            process.stdin.flush()
            answer = process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the fork server exited with {process.wait()}")
        return ForkedProcess(json.loads(answer)["pid"])

    def _started(self, env: dict[str, str]) -> subprocess.Popen:
        if self._process is None or self._process.poll() is not None:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
            self._process = subprocess.Popen(
                [sys.executable, "-m", "tests.forkserver"],
                cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            )  # fmt: skip
        return self._process

    def close(self) -> None:
        if self._process is not None:
            self._process.stdin.close()  # it exits at the end of its input
            self._process.wait(10)


# --- in the fork server ----------------------------------------------------------------


def _serve_requests() -> dict:
    """Fork a server for each request; return only in a forked server, with its request."""
    from gevent.monkey import get_original

    # Not gevent's: they would start a hub here, for a process that only blocks.
    fork, waitpid = get_original("os", ["fork", "waitpid"])
    for line in sys.stdin.buffer:
        request = json.loads(line)
        # Opened here, so that the file is there once the pid is answered.
        appending = os.O_WRONLY | os.O_APPEND | os.O_CREAT
        request["output"] = os.open(request["output"], appending, 0o644)
        read_end, write_end = os.pipe()
        middle = fork()
        if middle == 0:
            os.close(read_end)
            server = fork()
            if server == 0:
                os.close(write_end)
                return request
            os.write(write_end, str(server).encode())
            os._exit(0)
        os.close(write_end)
        os.close(request["output"])
        with os.fdopen(read_end, "rb") as told:
            server = int(told.read())
        # Once the middle process is gone, the server is the test process's child.
        waitpid(middle, 0)
        os.write(sys.stdout.fileno(), json.dumps({"pid": server}).encode() + b"\n")
    sys.exit(0)


def _become(request: dict) -> None:
    """Turn this forked child into the process `python wsgi.py ...` would have been."""
    os.setsid()  # its own session: a signal to the fork server's group misses it
    null = os.open(os.devnull, os.O_RDONLY)
    output = request["output"]
    os.dup2(null, 0)
    os.dup2(output, 1)
    os.dup2(output, 2)
    os.close(null)
    os.close(output)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if request["open_files"] is not None:
        limit = request["open_files"]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = request["argv"]


if __name__ == "__main__":
    from blynkota.patching import patch_for_gevent

    patch_for_gevent()  # before anything imports socket, as wsgi.py does
    # What a server imports only once it runs: its listeners, TLS and a dialect.
    import logging.config  # noqa: F401

    import cryptography.x509  # noqa: F401
    import sqlalchemy.dialects.mysql.pymysql  # noqa: F401
    import sqlalchemy.dialects.sqlite  # noqa: F401

    import blynkota.runner  # noqa: F401
    from blynkota.serving import main

    # What is imported now is never garbage: no server's collections walk it.
    gc.collect()
    gc.freeze()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pytest's ^C is the test process's to handle
    _become(_serve_requests())
    sys.exit(main(sys.argv[1:]))
