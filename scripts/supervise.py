"""Keep SAE Studio's processes up: Redis (when this run started it), the RQ workers, the web server.

``scripts/run.sh`` (``make run``) prepares DATA_DIR, the Redis password and the database, then
execs this. It starts each program in a session of its own and watches them:

- A program that exits (or is killed) is restarted after a back-off that doubles from
  ``SUPERVISOR_BACKOFF_S`` (1 s) up to ``SUPERVISOR_BACKOFF_MAX_S`` (60 s), and is reset once
  it has stayed up ``SUPERVISOR_STEADY_S`` (60 s). Each exit and restart is logged, here and
  in ``DATA_DIR/logs/supervisor.log``. What a dead program leaves in its session (a worker's
  work-horse and maintenance process, gunicorn's workers) gets SIGTERM at once — a horse saves
  its checkpoint and ends its run ``interrupted`` — and SIGKILL if it is still there
  ``SUPERVISOR_STOP_GRACE_S`` later; the other programs are watched meanwhile.
- One worker per GPU that ``nvidia-smi`` lists (``WORKERS_PER_GPU`` of them per GPU; ``GPUS=0,2``
  chooses the GPUs), each pinned with ``CUDA_VISIBLE_DEVICES`` and named ``<host>.gpu<index>``
  (``<host>.gpu<index>.<n>`` when there are several per GPU); one worker, ``<host>.cpu``, on a
  machine without ``nvidia-smi`` (or where it fails) or with ``SAE_DEVICE=cpu``. The GPUs are found
  without importing torch (``app/devices.py``, loaded on its own).
- ``--workers-only`` (a further box): only this machine's workers, on the shared database
  (``DATABASE_URL``), queue (``REDIS_URL``) and ``DATA_DIR``; its logs go to ``DATA_DIR/logs/<host>/``.
- Redis going away takes nothing else down: the web server keeps answering (pages render with
  the banner) and the worker waits for it, while Redis is started again.
- SIGINT (Ctrl-C) or SIGTERM stops everything: the web server and the worker first (the
  worker's warm shutdown checkpoints a running training; ``SUPERVISOR_STOP_GRACE_S``, 60 s),
  Redis last, then whatever is left in their sessions. A second signal kills at once. Each
  program also gets SIGTERM if this process dies without cleaning up (Linux).

Why Python and not the shell: restarting with back-off, killing a whole session and reaping
children on signals are a few lines here and fragile in bash (``wait -n``, traps and
subshells); it uses the standard library only.
"""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# our own loopback server: never through an http_proxy from the environment
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))

ROOT = Path(__file__).resolve().parent.parent


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


BACKOFF_S = _float("SUPERVISOR_BACKOFF_S", 1.0)
BACKOFF_MAX_S = _float("SUPERVISOR_BACKOFF_MAX_S", 60.0)
STEADY_S = _float("SUPERVISOR_STEADY_S", 60.0)
STOP_GRACE_S = _float("SUPERVISOR_STOP_GRACE_S", 60.0)
POLL_S = 0.2

_log_file = None


def log(message: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {message}"
    print(line, flush=True)
    if _log_file is not None:
        _log_file.write(line + "\n")
        _log_file.flush()


def _parent_death_signal() -> None:
    """In a child, before exec: get SIGTERM when the supervisor dies (Linux; elsewhere a no-op)."""
    os.setsid()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def session_members(sid: int) -> list[int]:
    """Every live (not zombie) process in session ``sid``; without /proc, the process group ``sid``."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(sid, 0)
            return [sid]
        except OSError:
            return []
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != b"Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            members.append(int(entry))
    return members


def signal_session(sid: int, sig: int) -> None:
    if not os.path.isdir("/proc"):
        try:
            os.killpg(sid, sig)
        except OSError:
            pass
        return
    for pid in session_members(sid):
        try:
            os.kill(pid, sig)
        except OSError:
            pass


class Program:
    """One supervised program: how to start it, its process, and its back-off."""

    def __init__(self, name: str, argv: list[str], logfile: Path | None, stdin_text: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv, self.logfile, self.stdin_text = name, argv, logfile, stdin_text
        self.env = env  # None: this process's environment
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.backoff = BACKOFF_S
        self.restart_at: float | None = 0.0  # start at once
        self.restarts = 0
        self.leftovers: list[tuple[int, float]] = []  # (session of a dead run of it, when to SIGKILL what is left)

    def start(self) -> None:
        out = subprocess.DEVNULL
        if self.logfile is not None:
            fd = os.open(self.logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            out = os.fdopen(fd, "ab")
        try:
            self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.PIPE if self.stdin_text is not None else subprocess.DEVNULL,
                                         env=self.env, preexec_fn=_parent_death_signal)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        if self.stdin_text is not None:  # a secret goes in on stdin, never on the command line
            self.proc.stdin.write(self.stdin_text.encode())
            self.proc.stdin.close()
        self.started_at = time.monotonic()
        self.restart_at = None
        log(f"started {self.name} (pid {self.proc.pid})" + (f", restart {self.restarts}" if self.restarts else ""))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        """Notice an exit and schedule the restart; start it when its time has come."""
        now = time.monotonic()
        if self.proc is not None and self.restart_at is None and self.proc.poll() is not None:
            code = self.proc.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
            if now - self.started_at >= STEADY_S:
                self.backoff = BACKOFF_S
            log(f"{self.name} (pid {self.proc.pid}) {how}; restarting it in {self.backoff:g}s")
            if session_members(self.proc.pid):  # e.g. a work-horse: SIGTERM makes it checkpoint and end
                signal_session(self.proc.pid, signal.SIGTERM)
                self.leftovers.append((self.proc.pid, now + STOP_GRACE_S))
            self.restart_at = now + self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)
            self.restarts += 1
        for sid, deadline in list(self.leftovers):
            if not session_members(sid):
                self.leftovers.remove((sid, deadline))
            elif now >= deadline:
                log(f"{self.name}: killing what its earlier run left behind (session {sid})")
                signal_session(sid, signal.SIGKILL)
                self.leftovers.remove((sid, deadline))
        if self.restart_at is not None and now >= self.restart_at:
            try:
                self.start()
            except OSError as exc:
                log(f"could not start {self.name}: {exc}; trying again in {self.backoff:g}s")
                self.restart_at = now + self.backoff
                self.backoff = min(self.backoff * 2, BACKOFF_MAX_S)

    def sessions(self) -> list[int]:
        return ([self.proc.pid] if self.proc is not None else []) + [sid for sid, _ in self.leftovers]

    def stop_leftovers(self, grace: float = 10.0) -> None:
        """What the program (and its earlier runs) left in their sessions: SIGTERM, then SIGKILL after ``grace``."""
        for sid in self.sessions():
            signal_session(sid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(session_members(sid) for sid in self.sessions()) and time.monotonic() < deadline:
            if self.proc is not None:
                self.proc.poll()  # our own child is reaped here, so it leaves the list
            time.sleep(0.1)
        for sid in self.sessions():
            if session_members(sid):
                log(f"{self.name}: killing what is left of it (session {sid})")
                signal_session(sid, signal.SIGKILL)
        self.leftovers.clear()

    def terminate(self) -> None:
        if self.alive():
            self.proc.terminate()

    def kill(self) -> None:
        for sid in self.sessions():
            signal_session(sid, signal.SIGKILL)


class Supervisor:
    def __init__(self, programs: list[Program], redis: Program | None, ready_url: str | None, ready_text: str) -> None:
        self.programs, self.redis = programs, redis
        self.ready_url, self.ready_text = ready_url, ready_text
        self.signals = 0

    def _on_signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals > 1:
            log("second signal: killing everything now")
            for program in self.programs:
                program.kill()

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        if self.redis is not None:
            self.redis.check()
            if not self._wait_for_redis():
                log("Redis did not start; see logs/redis.log")
                self.shutdown()
                return 1
        announced = False
        while not self.signals:
            for program in self.programs:
                program.check()
            if not announced and self._ready():
                print(self.ready_text, flush=True)
                announced = True
            time.sleep(POLL_S)
        self.shutdown()
        return 0

    def _wait_for_redis(self, timeout: float = 15.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.signals:
            if redis_answers():
                return True
            if not self.redis.alive():
                return False
            time.sleep(0.1)
        return False

    def _ready(self) -> bool:
        """Whether the web server answers at all (a 400 for an untrusted Host is an answer); no web server: at once."""
        if self.ready_url is None:
            return True
        try:
            with DIRECT.open(self.ready_url, timeout=0.5):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def shutdown(self) -> None:
        log("stopping the web server and the worker (the worker checkpoints a running training)")
        first = [p for p in self.programs if p is not self.redis]
        for program in first:
            program.restart_at = None
            program.terminate()
        self._wait(first, STOP_GRACE_S)
        if self.redis is not None:
            log("stopping Redis")
            self.redis.terminate()
            self._wait([self.redis], 15.0)
        for program in self.programs:
            if program.alive():
                log(f"{program.name} did not stop in time: killing it")
                program.kill()
            program.stop_leftovers(grace=0.0 if self.signals > 1 else 5.0)
            if program.proc is not None:
                try:
                    program.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        log("stopped")

    def _wait(self, programs: list[Program], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(p.alive() for p in programs) and time.monotonic() < deadline and self.signals <= 1:
            time.sleep(0.1)


def _devices():
    """app/devices.py on its own (standard library only): importing the app package would pull in Flask."""
    name = "sae_studio_devices"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "app" / "devices.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    return sys.modules[name]


class PlanError(ValueError):
    """GPUS or WORKERS_PER_GPU cannot be followed; the message says why."""


def plan_workers(environ, host: str) -> list[tuple[str, dict[str, str]]]:
    """The workers to start: (name, environment changes) for each.

    One per GPU nvidia-smi lists (``WORKERS_PER_GPU`` per GPU), pinned with CUDA_VISIBLE_DEVICES
    (nvidia-smi's index, in PCI bus order as CUDA_DEVICE_ORDER then also counts); ``GPUS`` (indices
    or UUIDs, comma-separated) keeps only those. One CPU worker when there is no GPU to use.
    """
    try:
        per_gpu = int(environ.get("WORKERS_PER_GPU", "1") or "1")
    except ValueError:
        raise PlanError(f"WORKERS_PER_GPU={environ['WORKERS_PER_GPU']!r} is not a whole number.") from None
    if not 1 <= per_gpu <= 64:
        raise PlanError(f"WORKERS_PER_GPU={per_gpu} must be between 1 and 64.")
    cpu = [(f"{host}.cpu", {})]
    if environ.get("SAE_DEVICE", "auto") == "cpu":
        return cpu
    devices = _devices()
    gpus = devices.list_gpus(fresh=True)
    chosen = environ.get("GPUS", "").strip()
    if not gpus:
        if chosen:
            log(f"GPUS={chosen} is set but nvidia-smi lists no GPU: starting one CPU worker")
        return cpu
    if chosen:
        picked = []
        for entry in (e.strip() for e in chosen.split(",")):
            gpu = devices.find_gpu(gpus, entry) if entry else None
            if gpu is None:
                raise PlanError(f"GPUS={chosen}: {entry!r} is not a GPU of this machine; nvidia-smi lists "
                                + ", ".join(f"{g.index} ({g.uuid})" for g in gpus) + ".")
            if gpu not in picked:
                picked.append(gpu)
        gpus = picked
    plan = []
    for gpu in gpus:
        for n in range(per_gpu):
            name = f"{host}.gpu{gpu.index}" + (f".{n}" if per_gpu > 1 else "")
            plan.append((name, {"CUDA_VISIBLE_DEVICES": str(gpu.index), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}))
    return plan


def redis_answers() -> bool:
    """Whether our Redis answers PING with our password (a raw RESP exchange, no client library)."""
    password = os.environ["REDIS_PASSWORD"]
    try:
        with socket.create_connection(("127.0.0.1", int(os.environ["REDIS_PORT"])), timeout=1) as s:
            s.sendall(f"*2\r\n$4\r\nAUTH\r\n${len(password)}\r\n{password}\r\n*1\r\n$4\r\nPING\r\n".encode())
            reply = b""
            while b"PONG" not in reply and len(reply) < 512:
                chunk = s.recv(512)
                if not chunk:
                    break
                reply += chunk
            return reply.startswith(b"+OK") and b"+PONG" in reply
    except OSError:
        return False


def worker_programs(env, py: str, logs: Path) -> tuple[list[Program], list[str]]:
    """The worker programs of this machine's plan (``PlanError`` when GPUS or WORKERS_PER_GPU is wrong)."""
    plan = plan_workers(env, socket.gethostname().split(".")[0])
    workers = []
    for name, changes in plan:
        logfile = logs / ("worker.log" if len(plan) == 1 else f"worker-{name}.log")
        pinned = f" on GPU {changes['CUDA_VISIBLE_DEVICES']}" if changes else ""
        workers.append(Program("worker" if len(plan) == 1 and not changes else f"worker {name}{pinned}",
                               [py, "worker.py", "--name", name], logfile,
                               env={**env, **changes} if changes else None))
    return workers, [name for name, _ in plan]


def main(argv: list[str] | None = None) -> int:
    global _log_file
    argv = sys.argv[1:] if argv is None else argv
    workers_only = "--workers-only" in argv
    os.umask(0o077)  # everything written under DATA_DIR: files 0600, folders 0700
    env = os.environ
    data, py = Path(env["DATA_DIR"]), env.get("PY", sys.executable)
    # another box's workers log beside the first box's, each machine in a folder of its own
    logs = data / "logs" / socket.gethostname().split(".")[0] if workers_only else data / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _log_file = os.fdopen(os.open(logs / "supervisor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a")
    try:
        workers, names = worker_programs(env, py, logs)
    except PlanError as exc:
        log(f"cannot start the workers: {exc}")
        return 1
    if workers_only:  # a further box: its workers only, on the shared database, Redis and DATA_DIR
        missing = [name for name in ("REDIS_URL", "DATABASE_URL") if not env.get(name)]
        if missing:
            log(f"--workers-only needs {' and '.join(missing)}: the first box's queue and database")
            return 1
        ready_text = (f"\nSAE Studio workers are running: {', '.join(names)}\n"
                      f"  data: {data}   logs: {logs}\n"
                      "  A worker that stops is started again; Ctrl-C stops them (a running training checkpoints).")
        return Supervisor(workers, None, None, ready_text).run()
    host, port = env.get("HOST", "127.0.0.1"), env["PORT"]
    redis = None
    if env.get("SUPERVISE_REDIS", "1") == "1":
        redis = Program("Redis", ["redis-server", "-", "--port", env["REDIS_PORT"], "--bind", "127.0.0.1",
                                  "--dir", str(data / "redis"), "--save", "60 1", "--daemonize", "no",
                                  "--logfile", str(logs / "redis.log")], None,
                        stdin_text=f"requirepass {env['REDIS_PASSWORD']}\n")
    web = Program("web server", [py, "-m", "gunicorn", "--bind", f"{host}:{port}", "--workers",
                                 env.get("WEB_WORKERS", "2"), "--threads", "4", "--access-logfile",
                                 str(logs / "access.log"), "app:create_app()"], logs / "web.log")
    programs = ([redis] if redis else []) + workers + [web]
    ready_text = (f"\nSAE Studio is running at http://{host}:{port}/\n"
                  f"  data: {data}   logs: {logs}   Redis: port {env['REDIS_PORT']} "
                  f"(password in {data / 'redis-password'})\n"
                  f"  workers: {', '.join(names)}\n"
                  "  A program that stops is started again (see logs/supervisor.log); "
                  "Ctrl-C stops the web server, the worker and Redis.")
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host.strip("[]")
    local = f"[{local}]" if ":" in local else local
    return Supervisor(programs, redis, f"http://{local}:{port}/health", ready_text).run()


if __name__ == "__main__":
    sys.exit(main())
