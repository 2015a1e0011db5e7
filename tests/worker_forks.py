"""Real worker processes for the tests, started without paying for torch's import every time.

A worker that trains on the CPU imports torch, the part of torch its optimizers load, scipy and the
web stack before its first job: about four seconds of CPU, and the suite starts a worker process
in some hundred tests per pass. ``python tests/worker_forks.py SOCKET`` is a fork server: it imports
those libraries once (never the app's own modules, which read their settings when the worker starts)
and forks a worker for each request. The forked child sets the test's environment, working directory
and output files, then runs ``worker.py`` as ``python worker.py`` would: its own Redis and database
connections, its maintenance process, its forked work-horses and its signal handling are the real
worker's. So is its pid: a test signals it, and finds its horses by it, as it would a process it
started. What differs is only how the interpreter began, as RQ's horses are forked from their worker.

Only CPU workers are forked: a GPU worker's parent must never have imported torch (worker.py refuses
to start then). Tests of how a worker starts (its imports, its refusals, ``make run``) start theirs
with ``python worker.py`` (``start_worker(..., fork=False)``).

Exit statuses: the server reaps its children and writes each one's status to ``<pid>.exit`` in its
folder, as ``subprocess`` reports it (the exit code, or minus the signal that ended it).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOADED = ("torch", "torch._dynamo", "safetensors.torch", "scipy.optimize", "numpy", "flask", "flask_wtf",
             "wtforms", "peewee", "playhouse.db_url", "rq", "redis", "argon2")


# --- the server (its own process) ---------------------------------------------------------

def _reap(folder: Path) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        tmp = folder / f"{pid}.exit.tmp"
        tmp.write_text(str(code))
        tmp.rename(folder / f"{pid}.exit")


def _become_worker(request: dict) -> None:
    """In the forked child: the test's worker, as ``python worker.py ARGS`` would run it. Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the worker reaps its own horses, not the server's way
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if request["stderr"] else out
        os.dup2(out, 1)
        os.dup2(err, 2)
        threads = request["env"].get("OMP_NUM_THREADS")
        if threads:  # torch read it when the server imported it: the test's value holds in its worker
            import torch

            torch.set_num_threads(int(threads))
        import runpy

        sys.argv = [str(ROOT / "worker.py"), *request["args"]]
        try:
            runpy.run_path(str(ROOT / "worker.py"), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed to the worker's output, as an interpreter would
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()  # what the worker registered runs, as at an interpreter's exit
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # never back into the server's loop


def serve(path: str) -> None:
    parent = os.getppid()
    for name in PRELOADED:
        __import__(name)
    folder = Path(path).parent
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    listener.settimeout(1.0)
    signal.signal(signal.SIGCHLD, lambda *_: _reap(folder))
    (folder / "ready").write_text(str(os.getpid()))
    while os.getppid() == parent:  # the test process is gone: so is the server (its workers are stopped by then)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        with conn:
            conn.settimeout(None)
            request = json.loads(conn.makefile("r").readline())
            sys.stdout.flush()
            sys.stderr.flush()
            # a child that ends at once is reaped only after a status left by an earlier child of the same
            # pid (pids are reused) is gone: SIGCHLD waits until then
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
            pid = os.fork()
            if pid == 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
                listener.close()
                conn.close()
                _become_worker(request)
            (folder / f"{pid}.exit").unlink(missing_ok=True)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
            conn.sendall(f"{pid}\n".encode())


# --- the tests' side ----------------------------------------------------------------------

class ForkedWorker:
    """A worker the fork server started: the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, pid: int, folder: Path, args: list[str]) -> None:
        self.pid, self.args, self._folder, self.returncode = pid, args, folder, None

    def poll(self) -> int | None:
        if self.returncode is None:
            done = self._folder / f"{self.pid}.exit"
            if done.exists():
                self.returncode = int(done.read_text())
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.01
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The fork server of this test process, started on first use."""

    def __init__(self) -> None:
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="sae-studio-forks-"))
        self.path = str(self.folder / "socket")
        with open(self.folder / "server.log", "ab") as log:  # not the output pytest captures for a test
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), self.path], cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (self.folder / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.folder / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the tests' worker fork server did not start (exit status {self.proc.poll()}):\n{log}")
            time.sleep(0.05)

    def start(self, args: list[str], env: dict, cwd: Path, stdout: Path, stderr: Path | None = None) -> ForkedWorker:
        request = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(stdout),
                   "stderr": str(stderr) if stderr else None}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            conn.sendall((json.dumps(request) + "\n").encode())
            pid = int(conn.makefile("r").readline())
        return ForkedWorker(pid, self.folder, ["worker.py", *args])

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    serve(sys.argv[1])
