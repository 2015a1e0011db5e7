"""Fixtures: a real Redis server on a free port, a real SQLite file, real worker processes.

Modelled on flaskr's conftest (app / client / runner) and RQ's own suite (a real Redis,
flushed around each test).
"""
from __future__ import annotations

import functools
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
# Nothing may be downloaded: models and data sets are built by the tests or ship in a package.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Passwords are hashed with Argon2id at a test's cost: one pass over 8 KiB, where the app's own
# parameters (argon2-cffi's defaults, RFC 9106's low-memory profile: three passes over 64 MiB) cost about
# 0.11 s to hash and 0.16 s to verify here, and a pass signs in, changes and guesses passwords some
# hundreds of times. It is still Argon2id, hashed and verified by argon2-cffi: what a test of accounts
# proves (sign-in, change, throttling, sessions ended) does not depend on the cost. Django's documentation
# advises the same for test suites. What depends on it is checked with the app's own hasher, kept here as
# APP_HASHER: tests/test_sessions.py asserts that a fresh process hashes at the app's parameters, and that
# a locked sign-in answers faster than one verification at them.
def _cheap_password_hashing():
    from argon2 import PasswordHasher

    import app.auth

    app_hasher = app.auth.HASHER
    app.auth.HASHER = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
    app.auth._DUMMY_HASH = app.auth.HASHER.hash("not a user's password")
    return app_hasher


APP_HASHER = _cheap_password_hashing()

# The suite runs once on SQLite and once on PostgreSQL (`make test` does both): TEST_DATABASE
# picks the backend for this run.
BACKEND = os.environ.get("TEST_DATABASE", "sqlite")

# A test that asks for one of these (directly or through env, app, client, run_worker, ...) opens
# the database: it gets the `db` mark. A test that opens a database some other way says so with
# @pytest.mark.db. On PostgreSQL only the `db` tests run: the others never open a database, so the
# SQLite pass has run them already. Every unmarked test runs with peewee's connections refused
# (`database_guard`), so a missing mark fails loudly instead of skipping PostgreSQL silently.
DATABASE_FIXTURES = frozenset({"database_url", "empty_database_url", "postgres_server"})
UNMARKED_DATABASE_URL = "refused://a-test-without-the-db-mark"
_LEFT_TO_SQLITE = pytest.StashKey[int]()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config):
    """SIGTERM ends the run as Ctrl-C does, fixtures' teardown included (their Redis, PostgreSQL cluster,
    workers and browsers stopped): `make test` stops a pass that way (scripts/test.sh)."""
    signal.signal(signal.SIGTERM, _interrupt)


# `make test` runs its two passes at once (scripts/test.sh) and gives both the same empty folder in
# TEST_SPLIT: the tests that open no database then run once between them, in whichever pass is free
# first. Each pass runs its `db` tests first and then the others (the SQLite pass from the first, the
# PostgreSQL pass from the last), and claims each of those before running it, by creating a file named
# for it in that folder; a test the other pass has claimed is reported skipped, "run in the other
# pass". So the passes end together, whichever is slower on a machine. Without TEST_SPLIT (a plain
# `pytest`), the SQLite pass runs every test and the PostgreSQL pass the `db` ones.
SPLIT_DIR = os.environ.get("TEST_SPLIT") or None
RUN_IN_THE_OTHER_PASS = "run in the other pass (TEST_SPLIT)"


@pytest.hookimpl(tryfirst=True)  # marked before `-m` selects by mark
def pytest_collection_modifyitems(config, items):
    for item in items:
        if DATABASE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.db)
    config.stash[_LEFT_TO_SQLITE] = 0
    pure = [item for item in items if item.get_closest_marker("db") is None]
    if SPLIT_DIR:
        database = [item for item in items if item.get_closest_marker("db") is not None]
        items[:] = database + (pure[::-1] if BACKEND == "postgresql" else pure)
    elif BACKEND == "postgresql" and pure:
        config.hook.pytest_deselected(items=pure)
        items[:] = [item for item in items if item.get_closest_marker("db") is not None]
        config.stash[_LEFT_TO_SQLITE] = len(pure)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """With TEST_SPLIT, a test that opens no database runs in the pass that claims it first."""
    if SPLIT_DIR and item.get_closest_marker("db") is None:
        import hashlib

        claim = Path(SPLIT_DIR) / hashlib.sha256(item.nodeid.encode()).hexdigest()
        try:
            os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            pytest.skip(RUN_IN_THE_OTHER_PASS)


def pytest_report_header(config):
    if SPLIT_DIR:
        return (f"database: {BACKEND}, the tests marked `db`, then those of the others that the other pass has not "
                f"taken (TEST_SPLIT={SPLIT_DIR})")
    if BACKEND == "postgresql":
        return "database: PostgreSQL, the tests marked `db` only (the others never open a database)"
    return f"database: {BACKEND}, every test"


def pytest_sessionfinish(session, exitstatus):
    """On PostgreSQL, a selection with no database test in it (`PYTEST_ARGS=tests/test_core.py`)
    leaves nothing to run, and that is right: not pytest's "no tests collected" error (5).
    Collecting nothing at all still is one."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and session.config.stash.get(_LEFT_TO_SQLITE, 0) > 0:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(autouse=True)
def database_guard(request, monkeypatch):
    """For a test without the `db` mark, any peewee connection or cursor fails the test, and
    DATABASE_URL names no database a child process could open.

    It raises ``pytest.fail``'s exception (a BaseException, so an ``except Exception`` in the app
    cannot swallow it) and fails the test at teardown as well, in case something swallowed even
    that. Yields the list of refused attempts (the guard's own test empties it)."""
    refused: list[str] = []
    if request.node.get_closest_marker("db") is not None:
        yield refused
        return
    import peewee

    def refusing(method: str):
        def refuse(db, *args, **kwargs):
            refused.append(f"{type(db).__name__}.{method}")
            pytest.fail(f"{request.node.nodeid} opened a database ({type(db).__name__}.{method}) but is not marked "
                        "`db`: ask for the `database_url` fixture (or env, app, client, ...) or add @pytest.mark.db")
        return refuse

    for method in ("connect", "cursor"):
        monkeypatch.setattr(peewee.Database, method, refusing(method))
    # and a process it starts (a worker, the app) finds no database to fall back on either
    monkeypatch.setenv("DATABASE_URL", UNMARKED_DATABASE_URL)
    yield refused
    if refused:
        pytest.fail(f"{request.node.nodeid} tried to open a database without the `db` mark: {refused}", pytrace=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A redis-server of our own on a free port, for the whole session. The two passes of `make test` run
    side by side, so a port found free may be taken by the other pass's server first: then another port."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed: run the tests through `make test`"
    workdir = tmp_path_factory.mktemp("redis")
    for _attempt in range(5):
        port = free_port()
        proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                                 "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"redis://127.0.0.1:{port}/0"
        client = Redis.from_url(url)
        ours = False
        for _ in range(100):
            try:
                ours = client.info("server")["process_id"] == proc.pid  # not a server another pass started
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if ours or proc.poll() is not None:
                break
            time.sleep(0.05)
        client.close()
        if ours:
            break
        proc.kill()
        proc.wait()
    else:
        raise RuntimeError("redis-server did not start on a free port in five tries")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url):
    client = Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()


def _pg_binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, f"{name} is not installed: run the tests through `make test` (it installs postgresql)"
    return found


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL cluster of our own in a temp dir on a free port, for the whole session.

    initdb refuses to run as root, so as root the cluster belongs to the ``postgres`` user
    that Debian's package creates.
    """
    if BACKEND != "postgresql":
        yield None
        return
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    base = tempfile.mkdtemp(prefix="sae-pg-")
    if as_user:
        shutil.chown(base, "postgres")
    data, port = os.path.join(base, "data"), free_port()
    subprocess.run([*as_user, _pg_binary("initdb"), "-D", data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, _pg_binary("pg_ctl"), "-D", data, "-w", "-l", os.path.join(base, "log"), "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                    "start"], check=True, capture_output=True)
    yield {"port": port, "base": base}
    subprocess.run([*as_user, _pg_binary("pg_ctl"), "-D", data, "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(base, ignore_errors=True)


def _migrate_in_child(url: str) -> None:
    """Apply every migration to ``url`` in a child process (this one keeps no connection to it)."""
    code = "import sys; from app.db import open_database, migrate; db = open_database(sys.argv[1]); migrate(); db.close()"
    subprocess.run([sys.executable, "-c", code, url], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   check=True, capture_output=True, timeout=300)


@pytest.fixture(scope="session")
def migrated_template(postgres_server, tmp_path_factory):
    """A database migrated once for the whole session; each test's database starts as a copy of it
    (a file copy on SQLite, ``CREATE DATABASE ... TEMPLATE`` on PostgreSQL) instead of running every
    migration again. The migrations themselves are still tested: tests/test_db.py and the upgrade
    tests run them on databases of their own, and ``empty_database_url`` is what `make run` sees."""
    if postgres_server is None:
        path = tmp_path_factory.mktemp("template") / "sae_studio.db"
        _migrate_in_child(f"sqlite:///{path}")
        yield path
        return
    from peewee import PostgresqlDatabase

    name = f"template_{os.getpid()}"
    admin = PostgresqlDatabase("postgres", host="127.0.0.1", port=postgres_server["port"], user="postgres")
    admin.connect()
    admin.execute_sql(f"CREATE DATABASE {name}")
    _migrate_in_child(f"postgresql://postgres@127.0.0.1:{postgres_server['port']}/{name}")
    yield name
    admin.execute_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def fresh_database_name() -> str:
    """A PostgreSQL database name no other test of either pass has."""
    return f"t_{os.getpid()}_{time.monotonic_ns()}"


def _new_database(tmp_path, postgres_server, template=None):
    """A database for one test: a SQLite file, or a new PostgreSQL database (a copy of ``template``
    when given, else empty). Yields its URL and drops it afterwards."""
    if postgres_server is None:
        path = tmp_path / "data" / "sae_studio.db"
        if template is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    from peewee import PostgresqlDatabase

    name = fresh_database_name()
    admin = PostgresqlDatabase("postgres", host="127.0.0.1", port=postgres_server["port"], user="postgres")
    admin.connect()
    admin.execute_sql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
    yield f"postgresql://postgres@127.0.0.1:{postgres_server['port']}/{name}"
    admin.execute_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


class DatabaseAhead:
    """PostgreSQL databases copied from the template ahead of the tests that take them, and dropped after
    their test, each on a thread of its own. A copy takes about 20 ms, but a drop waits for the dropped
    database's connections to end (PostgreSQL looks every 100 ms), and with both on one thread a test
    shorter than that waited behind the drop of the test before it: 0.2 s of every PostgreSQL test's
    setup. Two copies are kept ready, and no copy waits for a drop."""

    AHEAD = 2

    def __init__(self, port: int, template: str):
        import collections
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.port, self.template = port, template
        self.local, self.connections, self.lock = threading.local(), [], threading.Lock()
        self.copying = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-databases-copy")
        self.dropping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-databases-drop")
        self.ready = collections.deque(self.copying.submit(self._create) for _ in range(self.AHEAD))

    def _execute(self, sql: str) -> None:  # on the pools' threads: a connection each
        import psycopg2

        admin = getattr(self.local, "admin", None)
        if admin is None:
            admin = self.local.admin = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres",
                                                        dbname="postgres")
            admin.autocommit = True
            with self.lock:
                self.connections.append(admin)
        with admin.cursor() as cursor:
            cursor.execute(sql)

    def _create(self) -> str:
        name = fresh_database_name()
        self._execute(f"CREATE DATABASE {name} TEMPLATE {self.template}")
        return name

    def take(self) -> str:
        """A fresh copy of the template (made while the tests before ran); another one is started."""
        name = self.ready.popleft().result()
        self.ready.append(self.copying.submit(self._create))
        return name

    def drop(self, name: str) -> None:
        self.dropping.submit(self._execute, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        try:
            while self.ready:
                self.drop(self.ready.popleft().result())
        finally:
            self.copying.shutdown(wait=True)
            self.dropping.shutdown(wait=True)
            for admin in self.connections:
                admin.close()


@pytest.fixture(scope="session")
def databases_ahead(postgres_server, migrated_template):
    """On PostgreSQL, where each test's database comes from (``DatabaseAhead``); None on SQLite, where a
    file copy is all it takes. Closed before the template is dropped."""
    if postgres_server is None:
        yield None
        return
    ahead = DatabaseAhead(postgres_server["port"], migrated_template)
    yield ahead
    ahead.close()


@pytest.fixture
def database_url(tmp_path, postgres_server, migrated_template, databases_ahead):
    """A database for one test with the whole schema and its seeded rows, as a first start leaves it."""
    if databases_ahead is None:
        yield from _new_database(tmp_path, postgres_server, migrated_template)
        return
    name = databases_ahead.take()
    yield f"postgresql://postgres@127.0.0.1:{postgres_server['port']}/{name}"
    databases_ahead.drop(name)


@pytest.fixture
def empty_database_url(tmp_path, postgres_server):
    """A database with nothing in it: what `make run` finds on a fresh machine."""
    yield from _new_database(tmp_path, postgres_server)


@pytest.fixture
def env(tmp_path, redis_client, redis_url, database_url, monkeypatch):
    """The environment the web app and its worker processes share in one test."""
    values = {
        "DATA_DIR": str(tmp_path / "data"),
        "REDIS_URL": redis_url,
        "QUEUE_NAME": f"test-{os.getpid()}-{tmp_path.name}",
        "SECRET_KEY": "test-secret",
        "SAE_DEVICE": "cpu",
        "DATABASE_URL": "",
        # the tests' own models and datasets live in their temp folders: those are the allowed roots
        "MODEL_ROOTS": str(tmp_path.parent), "DATASET_ROOTS": str(tmp_path.parent),
        # fast heartbeats and sweeps, so the tests see a dead job within seconds
        "HEARTBEAT_S": "0.5",
        "HEARTBEAT_STALE_S": "4",
        "SWEEP_INTERVAL_S": "0.5",
    }
    values["DATABASE_URL"] = database_url
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def app(env):
    from app import create_app

    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False, "SERVER_NAME": "localhost"})
    with app.app_context():
        yield app


def sign_in(client, user) -> str:
    """Sign ``client`` in as ``user`` for pages (session) and the API (a bearer token); return the token."""
    from app.auth import create_token, new_session

    with client.session_transaction() as session:
        session["sid"] = new_session(user)
    _, token = create_token(user, "tests")
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    return token


TEST_PASSWORD = "correct horse battery"


@functools.cache
def cached_password_hash() -> str:
    """One Argon2id hash of TEST_PASSWORD per test process (some 500 tests sign a user in): a user made
    with it signs in with TEST_PASSWORD exactly as one made by ``create_user`` does. Only the salt is
    shared between them; the tests of accounts (tests/test_sessions.py) make theirs through ``create_user``."""
    from app.auth import hash_password

    return hash_password(TEST_PASSWORD)


def signed_in_client(app, username: str = "tester", *, is_admin: bool = True):
    """A test client signed in as a new user (an admin unless said otherwise), whose password is
    TEST_PASSWORD."""
    from app.models import User

    user = User.create(username=username, password_hash=cached_password_hash(), is_admin=is_admin)
    client = app.test_client()
    sign_in(client, user)
    client.user = user
    return client


@pytest.fixture
def client(app):
    return signed_in_client(app)


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


def worker_env(env: dict) -> dict:
    return {**os.environ, **env, "PYTHONPATH": str(ROOT)}


def forkable(environ: dict) -> bool:
    """A CPU worker starts from the tests' fork server (tests/worker_forks.py) when nothing in its
    environment would start an interpreter differently; any other the usual way."""
    return environ.get("SAE_DEVICE") == "cpu" and fork_server().serves(environ)


_FORKS = []


def fork_server():
    """This test process's fork server, started on first use (and stopped in pytest_unconfigure)."""
    if not _FORKS:
        from worker_forks import ForkServer

        _FORKS.append(ForkServer())
    return _FORKS[0]


def pytest_unconfigure(config):
    for server in _FORKS:
        server.close()
    _FORKS.clear()


@pytest.fixture
def run_worker(env, tmp_path):
    """Run a real RQ worker process in burst mode until the queue is empty (forked from the fork server
    unless ``fork=False``: then started as ``python worker.py --burst``)."""
    runs = iter(range(10**6))

    def run(timeout: float = 300, *, fork: bool = True) -> subprocess.CompletedProcess:
        environ = worker_env(env)
        args = ["--burst"]
        if not (fork and forkable(environ)):
            return subprocess.run([sys.executable, str(ROOT / "worker.py"), *args], cwd=ROOT, env=environ,
                                  capture_output=True, text=True, timeout=timeout)
        n = next(runs)
        out, err = tmp_path / f"burst-{n}.out", tmp_path / f"burst-{n}.err"
        worker = fork_server().start(args, environ, ROOT, out, err)
        try:
            code = worker.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            worker.kill()
            worker.wait(30)
            exc.output, exc.stderr = out.read_text(errors="replace"), err.read_text(errors="replace")
            raise
        return subprocess.CompletedProcess(worker.args, code, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))

    return run


def start_worker(env: dict, name: str | None = None, *, fork: bool = True):
    """A real worker process (with its maintenance process) in the background; its output goes to a
    log file in the data folder, so a long test never blocks it on a full pipe. A CPU worker is forked
    from the fork server (tests/worker_forks.py) unless ``fork=False``."""
    Path(env["DATA_DIR"]).mkdir(parents=True, exist_ok=True)
    log_path = Path(env["DATA_DIR"]) / f"worker-{name or time.monotonic_ns()}.log"
    args = ["--name", name] if name else []
    environ = worker_env(env)
    if fork and forkable(environ):
        return fork_server().start(args, environ, ROOT, log_path)
    log = open(log_path, "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(ROOT / "worker.py"), *args], cwd=ROOT, env=environ, stdout=log,
                            stderr=subprocess.STDOUT)
    log.close()  # the child holds its own descriptor
    return proc


def finished_run(client, run_worker, **changes):
    """A QUICK_CONFIG run (with ``changes``) posted through the API and trained to completion by a burst worker."""
    from app.models import Training

    response = client.post("/api/trainings", json={**QUICK_CONFIG, **changes})
    assert response.status_code == 201, response.json
    done = run_worker()
    assert done.returncode == 0, done.stderr[-3000:]
    run = Training.get_by_id(response.json["id"])
    assert run.status == "completed", run.reason
    return run


def worker_logs(env: dict, tail: int = 4000) -> str:
    """The end of every background worker's log in the data folder (for a failing test's message)."""
    logs = sorted(Path(env["DATA_DIR"]).glob("worker-*.log"))
    return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')[-tail:]}" for log in logs)


def stop_worker(proc) -> None:
    """A warm shutdown (SIGTERM), and SIGKILL if that takes too long."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def worker_process(env):
    """A real RQ worker process running in the background for the whole test."""
    proc = start_worker(env)
    yield proc
    stop_worker(proc)


def kill_work_horse(worker_process) -> None:
    """SIGKILL the worker's work-horse (the forked child running the job), as the OS might."""
    children = subprocess.run(["pgrep", "-P", str(worker_process.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the work-horse process was not found"
    for pid in children:
        os.kill(int(pid), signal.SIGKILL)


def wait_for(predicate, timeout: float = 120, interval: float = 0.1, message="condition"):
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``. ``message``
    may be a function: it is called then, so the failure says what the state was."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message() if callable(message) else message}")


CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium under Playwright, started once per test process (about 2 s each time);
    each test gets a context of its own (``browser_page``, or ``chromium.new_context()``): its own
    cookies, storage and cache, as a fresh browser would have."""
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium")
    assert executable, "chromium is not installed: run the tests through `make test`"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def browser_page(chromium, width: int, height: int):
    """A page in a new browser context of its own (close it with ``page.context.close()``)."""
    context = chromium.new_context(viewport={"width": width, "height": height})
    return context.new_page()


# Is an element matching the selector shown (a box of some size, not visibility:hidden, as Playwright's
# "visible"), with the text in its whitespace-collapsed text, where a text is given (Playwright's
# :has-text, case-insensitive)?
_SHOWN = """([selector, text]) => [...document.querySelectorAll(selector)].some(e => {
  const box = e.getBoundingClientRect();
  if (!(box.width > 0 && box.height > 0) || getComputedStyle(e).visibility === 'hidden') return false;
  return text === null || e.textContent.replace(/\\s+/g, ' ').toLowerCase().includes(text.toLowerCase());
})"""


def shown(page, selector: str, text: str | None = None, *, timeout: float | None = None):
    """Wait until an element matching the CSS selector is shown, with the text where one is given, and
    return its locator. Checked every 25 ms: Playwright's own waits (wait_for_selector, locator.wait_for)
    retry at 0, 20, 50, 100, 100 ms and then every 500 ms, so a hint that htmx swapped in 300 ms after the
    typing was seen up to half a second late, on each of the hundred or so waits in a pass."""
    page.wait_for_function(_SHOWN, arg=[selector, text], polling=25, timeout=timeout)
    return page.locator(selector)


# `make test` gives its two passes one folder for what both would build the same way (scripts/test.sh).
SHARED_BUILDS = os.environ.get("TEST_SHARED_BUILDS") or None


def built_once(name: str, build, tmp_path_factory):
    """``build(folder)``'s result (a path, or a dict of paths, in the folder), built once for both passes
    of `make test`: the first pass to ask builds it under a lock, the other waits for it; each then gets a
    copy in its own temporary folder, under its MODEL_ROOTS as a build of its own would be. The shared
    folder is named by the builder's source, so a changed builder never reads an older build. Without
    TEST_SHARED_BUILDS (a plain `pytest`), it is built in this pass's temporary folder."""
    if not SHARED_BUILDS:
        return build(tmp_path_factory.mktemp(name))
    import fcntl
    import hashlib
    import json

    key = hashlib.sha256((ROOT / "tests" / "tiny_models.py").read_bytes()).hexdigest()[:16]
    shared = Path(SHARED_BUILDS) / f"{name}-{key}"
    shared.mkdir(parents=True, exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        record = shared / "built.json"
        if not record.exists():
            shutil.rmtree(shared / "files", ignore_errors=True)  # a build that died half way
            result = build(shared / "files")
            paths = result if isinstance(result, dict) else {"": result}
            record.write_text(json.dumps({k: str(Path(v).relative_to(shared / "files")) for k, v in paths.items()}))
        built = json.loads(record.read_text())
    here = tmp_path_factory.mktemp(name)
    shutil.copytree(shared / "files", here, dirs_exist_ok=True)
    paths = {k: here / v for k, v in built.items()}
    return paths[""] if list(paths) == [""] else paths


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny randomly initialized GPT-2, GPT-NeoX, Llama and T5 models, saved and loaded back by path."""
    from tiny_models import build_all

    return built_once("models", build_all, tmp_path_factory)


@pytest.fixture(scope="session")
def trained_gpt2(tmp_path_factory):
    """A tiny GPT-2 trained briefly on docstrings (its loss depends on its activations)."""
    from tiny_models import build_trained_gpt2

    return built_once("trained", build_trained_gpt2, tmp_path_factory)


# A configuration that trains in a few seconds on two CPU cores.
QUICK_CONFIG = {
    "name": "quick", "source_id": 1, "architecture": "standard", "latent_dim": 256, "l1_alpha": 0.003, "k": 16,
    "learning_rate": 0.001, "batch_size": 256, "total_steps": 200, "lr_warmup_steps": 10, "l1_warmup_steps": 20,
    "target_l0": 0.02, "seed": 0, "log_every": 10, "dead_window_tokens": 20_000, "aux_window_tokens": 5_000,
    "early_stop": True, "early_stop_step": 1000, "early_stop_l0": 0.2, "steer_l1_alpha": False,
    "dead_latent_remedy": "none", "plateau_window": 2000, "checkpoint_every_steps": 2000,
    "checkpoint_every_minutes": 5.0, "precision": "auto", "keep_store": "no",
    # 256 latents on d_in 256 is not overcomplete (a validator warning): small on purpose, so
    # these tests start it anyway. The validator's own tests start from clean configs.
    "acknowledge_warnings": True,
}


def create_run(client, **changes):
    """A training queued through the API with QUICK_CONFIG and ``changes``."""
    from app.models import Training

    response = client.post("/api/trainings", json={**QUICK_CONFIG, **changes})
    assert response.status_code == 201, response.json
    return Training.get_by_id(response.json["id"])


def reload(record):
    """The record as the database holds it now."""
    return type(record).get_by_id(record.id)
