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
to start then), and a worker whose environment differs from the server's in what an interpreter or a
library reads as it starts (``PYTHON*`` but PYTHONPATH, which the child applies, ``OMP_*``,
``OPENBLAS_*``, ``MKL_*``, ``TORCH_*``, ``CUDA_*``) is started with ``python worker.py`` too. Tests of how a worker
starts (what it imports, what it refuses, ``make run``) exec ``python worker.py`` themselves, or ask for
it (``run_worker(fork=False)``, ``start_worker(..., fork=False)``).

Exit statuses: the server reaps its children and writes each one's status to ``<serial>.exit`` in its
folder (the request's number: pids are reused), as ``subprocess`` reports it (the exit code, or minus
the signal that ended it).
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
# what an interpreter or a library reads as it starts: a worker whose values differ from the server's is
# exec'd. The thread counts among them: setting torch's in the child would create its thread pool in the
# worker's parent, which a worker started as `python worker.py` never does (its horses then found the pool
# invalid: "Invalid thread pool!" while loading a model, in one CI run)
STARTUP_PREFIXES = ("PYTHON", "OMP_", "OPENBLAS_", "MKL_", "TORCH_", "CUDA_")
PRELOADED = ("torch", "torch._dynamo", "safetensors.torch", "scipy.optimize", "numpy", "flask", "flask_wtf",
             "wtforms", "peewee", "playhouse.db_url", "rq", "redis", "argon2")


# --- the server (its own process) ---------------------------------------------------------

def _reap(folder: Path, serials: dict[int, int]) -> None:
    """Write the status of every child that ended to ``<serial>.exit`` (named by the request, not the
    pid, which is reused: pid_max is 32,768 here)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        serial = serials.pop(pid, None)
        if serial is not None:
            tmp = folder / f"{serial}.exit.tmp"
            tmp.write_text(str(code))
            tmp.rename(folder / f"{serial}.exit")


def _python_path(environ: dict) -> list[str]:
    return [entry for entry in environ.get("PYTHONPATH", "").split(os.pathsep) if entry]


def _become_worker(request: dict, server_path: list[str]) -> None:
    """In the forked child: the test's worker, as ``python worker.py ARGS`` would run it. Never returns."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores Ctrl-C; a worker does not
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        # sys.path as `python worker.py` builds it: the script's folder, then PYTHONPATH, then the rest
        rest = sys.path[1:]
        for entry in server_path:
            if rest and rest[0] == entry:
                rest.pop(0)
        sys.path[:] = [str(ROOT), *_python_path(request["env"]), *rest]
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600) if request["stderr"] else out
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(err, 2)
        for fd in {null, out, err}:
            os.close(fd)
        import runpy

        sys.argv = [str(ROOT / "worker.py"), *request["args"]]
        try:
            runpy.run_path(str(ROOT / "worker.py"), run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:  # sys.exit("message"): printed, status 1, as the interpreter does
                print(exc.code, file=sys.stderr)
                code = 1
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
    import select

    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the test process, which stops its workers
    for name in PRELOADED:
        __import__(name)
    folder = Path(path).parent
    server_path = _python_path(os.environ)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    # a child's end wakes the loop (whichever thread the signal reaches), which reaps it: only this loop
    # ever reaps, so a status and the request it belongs to are always recorded in that order
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    serials: dict[int, int] = {}
    serial = 0
    (folder / "ready").write_text(str(os.getpid()))
    while os.getppid() == parent:  # the test process is gone: so is the server (its workers are stopped by then)
        readable, _, _ = select.select([listener, wake_r], [], [], 1.0)
        if wake_r in readable:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
        _reap(folder, serials)
        if listener not in readable:
            continue
        conn, _ = listener.accept()
        with conn:
            request = json.loads(conn.makefile("r").readline())
            serial += 1
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                listener.close()
                conn.close()
                os.close(wake_r)
                os.close(wake_w)
                _become_worker(request, server_path)
            serials[pid] = serial
            conn.sendall(f"{pid} {serial}\n".encode())


# --- the tests' side ----------------------------------------------------------------------

class ForkedWorker:
    """A worker the fork server started: the parts of ``subprocess.Popen`` the tests use."""

    def __init__(self, pid: int, serial: int, server: ForkServer, args: list[str]) -> None:
        self.pid, self.args, self.returncode = pid, args, None
        self._serial, self._server = serial, server

    def poll(self) -> int | None:
        if self.returncode is None:
            done = self._server.folder / f"{self._serial}.exit"
            if done.exists():
                self.returncode = int(done.read_text())
            elif self._server.proc.poll() is not None and not Path(f"/proc/{self.pid}").exists():
                self.returncode = -255  # ended after the server that would have told its status
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
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:  # ended, and its status is on its way (as Popen.send_signal ignores)
                pass

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
        self.environ = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.folder / "server.log", "ab") as log:  # not the output pytest captures for a test
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), self.path], cwd=ROOT,
                                         env=self.environ, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not (self.folder / "ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = (self.folder / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the tests' worker fork server did not start (exit status {self.proc.poll()}):\n{log}")
            time.sleep(0.05)

    def serves(self, environ: dict) -> bool:
        """Whether a worker with this environment starts as it would from ``python worker.py``."""
        return all(environ.get(key) == self.environ.get(key) for key in {*environ, *self.environ}
                   if key.startswith(STARTUP_PREFIXES) and key != "PYTHONPATH")

    def start(self, args: list[str], env: dict, cwd: Path, stdout: Path, stderr: Path | None = None) -> ForkedWorker:
        request = {"args": args, "env": env, "cwd": str(cwd), "stdout": str(stdout),
                   "stderr": str(stderr) if stderr else None}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(self.path)
            conn.sendall((json.dumps(request) + "\n").encode())
            pid, serial = map(int, conn.makefile("r").readline().split())
        return ForkedWorker(pid, serial, self, ["worker.py", *args])

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
