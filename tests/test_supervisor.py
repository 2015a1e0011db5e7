"""`make run` (scripts/run.sh, then scripts/supervise.py) keeps its programs up and its data private:
a killed worker or Redis is started again while the web server keeps answering, SIGTERM stops
everything with nothing left behind, and DATA_DIR ends 0700 with its files 0600."""
from __future__ import annotations

import logging
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from redis import Redis

from conftest import BACKEND, ROOT, free_port, signed_in_client, wait_for

# our own loopback server: never through an http_proxy from the environment
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def processes() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (parent pid, command line)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fields[0] != b"Z":
            found[int(entry)] = (int(fields[1]), cmdline)
    return found


def descendants(pid: int) -> dict[int, str]:
    table, found, frontier = processes(), {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, cmdline) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmdline
                frontier.append(child)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a supervisor and everything below it that is still there (a test's last word)."""
    left = descendants(proc.pid)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def child(supervisor: int, needle: str) -> int | None:
    """The supervisor's direct child whose command line contains ``needle``."""
    return next((pid for pid, (ppid, cmd) in processes().items() if ppid == supervisor and needle in cmd), None)


def answers(url: str) -> int | None:
    try:
        with DIRECT.open(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def started(tmp_path, empty_database_url):
    """`make run`'s script on free ports with a DATA_DIR that starts out world-readable."""
    data = tmp_path / "data"
    (data / "sources").mkdir(parents=True)
    data.chmod(0o755)
    (data / "sources" / "old.npy").write_bytes(b"x")
    (data / "sources" / "old.npy").chmod(0o644)
    proc, port, redis_port = start_run_sh(tmp_path, data, empty_database_url, SAE_DEVICE="cpu")
    state = {"proc": proc, "data": data, "port": port, "redis_port": redis_port, "out": tmp_path / "run.out"}
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health") == 200 or proc.poll() is not None, timeout=180,
                 message="the web server")
        assert proc.poll() is None, state["out"].read_text()
        yield state
    finally:
        kill_tree(proc)


def start_run_sh(tmp_path, data, database_url, **env_changes) -> tuple[subprocess.Popen, int, int]:
    """`make run`'s script on free ports, in a session of its own, with short back-offs; its output
    goes to ``tmp_path/run.out``. ``env_changes`` override the environment (a REDIS_URL among them)."""
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "QUEUE_NAME", "SECRET_KEY", "DATABASE_URL",
                                                            "CUDA_VISIBLE_DEVICES", "GPUS", "WORKERS_PER_GPU")}
    env.update({"DATA_DIR": str(data), "PORT": str(port), "REDIS_PORT": str(redis_port), "PY": sys.executable,
                "WEB_WORKERS": "1", "PYTHONPATH": str(ROOT), "SWEEP_INTERVAL_S": "0.5",
                "SUPERVISOR_BACKOFF_S": "0.2", "SUPERVISOR_BACKOFF_MAX_S": "1", "SUPERVISOR_STOP_GRACE_S": "30",
                **env_changes})
    if BACKEND == "postgresql":
        env["DATABASE_URL"] = database_url
    out = open(tmp_path / "run.out", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["bash", str(ROOT / "scripts" / "run.sh")], cwd=ROOT, env=env, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    out.close()
    return proc, port, redis_port


def test_make_run_restarts_what_dies_keeps_serving_without_redis_and_stops_everything(started):
    proc, data, port = started["proc"], started["data"], started["port"]
    supervisor_log = data / "logs" / "supervisor.log"
    password = (data / "redis-password").read_text().strip()
    redis = Redis(port=started["redis_port"], password=password, socket_connect_timeout=1, socket_timeout=2)

    # a killed worker is started again, and the supervisor says so
    worker = wait_for(lambda: child(proc.pid, "worker.py"), timeout=60, message="the worker")
    os.kill(worker, signal.SIGKILL)
    new_worker = wait_for(lambda: (w := child(proc.pid, "worker.py")) and w != worker and w, timeout=60,
                          message="a new worker")
    assert f"worker (pid {worker}) was killed by signal 9; restarting it in 0.2s" in supervisor_log.read_text()
    os.kill(new_worker, signal.SIGKILL)  # again, soon after: the back-off doubles
    worker, new_worker = new_worker, wait_for(lambda: (w := child(proc.pid, "worker.py")) and w != new_worker and w,
                                              timeout=60, message="another new worker")
    assert f"worker (pid {worker}) was killed by signal 9; restarting it in 0.4s" in supervisor_log.read_text()

    def listening() -> bool:  # the new worker is past its start-up (where it needs Redis to register)
        log = (data / "logs" / "worker.log").read_text()
        return "Listening on" in log.partition(f"started with PID {new_worker}")[2]

    wait_for(listening, timeout=60, message="the new worker to listen")

    # Redis killed: the web server keeps answering, and Redis is started again with its password
    redis_pid = wait_for(lambda: child(proc.pid, "redis-server"), timeout=30, message="Redis")
    os.kill(redis_pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{redis_pid}").exists() or child(proc.pid, "redis-server") != redis_pid,
             timeout=10, message="Redis to die")
    assert answers(f"http://127.0.0.1:{port}/health") == 200
    assert answers(f"http://127.0.0.1:{port}/login") == 200
    wait_for(lambda: (r := child(proc.pid, "redis-server")) and r != redis_pid, timeout=30, message="a new Redis")

    def pong():
        try:
            return redis.ping()
        except Exception:  # noqa: BLE001 - not up yet
            return False

    wait_for(pong, timeout=30, message="the new Redis to answer with the password")
    assert f"Redis (pid {redis_pid}) was killed by signal 9" in supervisor_log.read_text()
    assert child(proc.pid, "worker.py") == new_worker  # the worker rode it out
    assert answers(f"http://127.0.0.1:{port}/health") == 200

    # everything under DATA_DIR is private
    assert mode(data) == 0o700
    assert mode(data / "sources" / "old.npy") == 0o600  # an existing file, fixed
    files = [data / "secret_key", data / "redis-password", data / "initial-admin-password",
             *(data / "logs").glob("*.log")] + ([data / "sae_studio.db"] if BACKEND == "sqlite" else [])
    assert {p.name for p in (data / "logs").glob("*.log")} >= {"supervisor.log", "worker.log", "web.log", "redis.log"}
    assert {str(p.relative_to(data)): oct(mode(p)) for p in files if mode(p) != 0o600} == {}
    assert {str(p.relative_to(data)) for p in data.rglob("*") if p.is_dir() and mode(p) != 0o700} == set()

    # SIGTERM (what Ctrl-C sends as SIGINT) stops everything: no process of it is left
    def with_maintenance():
        family = descendants(proc.pid)
        return any("app.work.maintenance" in c for c in family.values()) and family

    family = wait_for(with_maintenance, timeout=60, message="the new worker's maintenance process")
    assert any("gunicorn" in c for c in family.values())
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    left = {pid: cmd for pid, cmd in family.items() if pid in processes()}
    assert left == {}, left
    assert "stopped" in supervisor_log.read_text().splitlines()[-1]


def test_ctrl_c_stops_everything_once_it_is_up(started):
    proc = started["proc"]

    def with_maintenance():
        family = descendants(proc.pid)
        return any("app.work.maintenance" in c for c in family.values()) and family

    family = wait_for(with_maintenance, timeout=60, message="the worker's maintenance process")
    assert any("redis-server" in c for c in family.values()) and any("gunicorn" in c for c in family.values())
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=90) == 0
    assert {pid: cmd for pid, cmd in family.items() if pid in processes()} == {}


# --- the check at start -----------------------------------------------------------------------

@pytest.fixture
def exposed_data_dir():
    """A DATA_DIR that every account can reach: 0755, under /tmp (itself open to all)."""
    base = Path(tempfile.mkdtemp(prefix="sae-exposed-"))
    base.chmod(0o755)
    data = base / "data"
    data.mkdir()
    data.chmod(0o755)
    yield data
    shutil.rmtree(base, ignore_errors=True)


def test_the_check_tells_a_readable_data_dir_from_a_private_one(exposed_data_dir, tmp_path):
    from app.config import data_dir_exposure

    assert "every account" in data_dir_exposure(exposed_data_dir) and "0755" in data_dir_exposure(exposed_data_dir)
    exposed_data_dir.chmod(0o750)
    assert "its group" in data_dir_exposure(exposed_data_dir)
    exposed_data_dir.chmod(0o700)
    assert data_dir_exposure(exposed_data_dir) is None
    inside_a_private_folder = tmp_path / "private" / "data"
    inside_a_private_folder.mkdir(parents=True)
    (tmp_path / "private").chmod(0o700)
    inside_a_private_folder.chmod(0o755)
    assert data_dir_exposure(inside_a_private_folder) is None  # nobody else can get through its parent


def test_the_app_and_the_worker_warn_loudly_about_a_readable_data_dir(env, exposed_data_dir, caplog):
    from app import create_app
    from conftest import worker_env

    Path(env["DATA_DIR"]).mkdir(parents=True, exist_ok=True)  # the database (SQLite) stays in the test's folder
    with caplog.at_level(logging.WARNING):
        app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "SERVER_NAME": "localhost",
                          "DATA_DIR": str(exposed_data_dir)})
    assert "DATA_DIR is mode 0755: its group and every account on this machine can read" in caplog.text
    with app.app_context():
        admin = signed_in_client(app, "admin")
        user = signed_in_client(app, "user", is_admin=False)
        assert 'id="data-dir-banner"' in admin.get("/").get_data(as_text=True)
        assert 'id="data-dir-banner"' not in user.get("/").get_data(as_text=True)
        assert str(exposed_data_dir) not in admin.get("/").get_data(as_text=True)
    done = subprocess.run([sys.executable, str(ROOT / "worker.py"), "--burst"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**worker_env(env), "DATA_DIR": str(exposed_data_dir)})
    assert done.returncode == 0 and "WARNING: DATA_DIR is mode 0755" in done.stderr
