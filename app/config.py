"""Settings, read from the environment once at start-up."""
from __future__ import annotations

import os
import secrets
from pathlib import Path

from .db import BUSY_TIMEOUT_MS

ROOT = Path(__file__).resolve().parent.parent


def _int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def _float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def load_settings(overrides: dict | None = None) -> dict:
    """Return the app's settings: environment first, then ``overrides`` on top.

    DATA_DIR       where the database, uploads, Redis data and checkpoints live (./data)
    DATABASE_URL   a Peewee db_url (sqlite:///DATA_DIR/sae_studio.db)
    SQLITE_BUSY_TIMEOUT_MS  on SQLite, how long a write waits for another process's before it fails
                   and a worker retries it (10000)
    REDIS_URL      the queue's Redis (redis://127.0.0.1:6390/0)
    QUEUE_NAME     RQ queue name (sae-studio)
    SECRET_KEY     session/CSRF key (generated once and kept in DATA_DIR/secret_key)
    MAX_UPLOAD_MB  largest activation upload accepted (4096)
    SAE_DEVICE     "auto" (CUDA when available), "cpu" or "cuda[:n]"
    SWEEP_MAX_MEMBERS  the most members one sweep may have (16)
    FEATURES_AFTER_TRAINING  1: queue feature statistics when a run completes (1)
    FEATURE_SAMPLE_TOKENS    tokens the feature statistics are computed on (50000)
    DOWNSTREAM_TOKENS  held-out tokens a downstream evaluation splices the SAE into (8192); one
                       is queued when a run on an extraction completes (with FEATURES_AFTER_TRAINING)
    HEARTBEAT_S        how often a running job stamps its row (5)
    HEARTBEAT_STALE_S  a running job silent this long is marked interrupted (60)
    SWEEP_INTERVAL_S   how often each worker's maintenance process sweeps and beats (5)
    JANITOR_INTERVAL_S how often it removes orphaned files (600); JANITOR_MIN_AGE_S: only
                       files at least this old (3600)
    MAINTENANCE_FAILURES_SHOWN  admins see a maintenance part (sweep, re-queue, beat, janitor)
                       in the banner once it has failed this many rounds in a row (3)
    REDIS_CONNECT_TIMEOUT_S, REDIS_SOCKET_TIMEOUT_S   every Redis call's limits (2, 5)
    TRUSTED_HOSTS  comma-separated Host names the app answers to (localhost, 127.0.0.1, ::1, and
                   EXTERNAL_URL's host); any other Host header gets a 400 (DNS rebinding)
    EXTERNAL_URL   the app's URL as the team reaches it (https://sae.example.org); used in the
                   API's links and, when https, for Secure cookies
    TRUST_PROXY    1: trust one reverse proxy's X-Forwarded-For/Proto/Host (only behind one)
    MAX_BODY_KB    largest request body except uploads (1024)
    MODEL_ROOTS, DATASET_ROOTS   colon-separated folders local models and datasets may be read
                   from (DATA_DIR/models and DATA_DIR/datasets; the Hugging Face cache is always allowed)
    MAX_MODEL_GB   largest model an extraction may load (40)
    SESSION_IDLE_MINUTES  a signed-in browser unused this long is signed out (480: a working day)
    SESSION_MAX_HOURS     every session ends this long after sign-in, however busy (168: a week)
    LOGIN_FAILURES_PER_ACCOUNT, LOGIN_FAILURES_PER_ADDRESS   failed sign-ins before a lock (5, 20)
    LOGIN_LOCKOUT_S       the first lock's length; each further failure doubles it, up to 15 min (30)
    """
    env = os.environ
    settings = {
        "DATA_DIR": env.get("DATA_DIR", str(ROOT / "data")),
        "DATABASE_URL": env.get("DATABASE_URL"),
        "SQLITE_BUSY_TIMEOUT_MS": _int("SQLITE_BUSY_TIMEOUT_MS", BUSY_TIMEOUT_MS),
        "REDIS_URL": env.get("REDIS_URL", "redis://127.0.0.1:6390/0"),
        "QUEUE_NAME": env.get("QUEUE_NAME", "sae-studio"),
        "SECRET_KEY": env.get("SECRET_KEY"),
        "MAX_UPLOAD_MB": _int("MAX_UPLOAD_MB", 4096),
        "SAE_DEVICE": env.get("SAE_DEVICE", "auto"),
        "JOB_TIMEOUT_S": _int("JOB_TIMEOUT_S", 7 * 24 * 3600),
        "SWEEP_MAX_MEMBERS": _int("SWEEP_MAX_MEMBERS", 16),
        "FEATURES_AFTER_TRAINING": env.get("FEATURES_AFTER_TRAINING", "1").strip().lower() not in ("0", "false", "no"),
        "FEATURE_SAMPLE_TOKENS": _int("FEATURE_SAMPLE_TOKENS", 50_000),
        "DOWNSTREAM_TOKENS": _int("DOWNSTREAM_TOKENS", 8192),
        "HEARTBEAT_S": _float("HEARTBEAT_S", 5.0),
        "HEARTBEAT_STALE_S": _float("HEARTBEAT_STALE_S", 60.0),
        "SWEEP_INTERVAL_S": _float("SWEEP_INTERVAL_S", 5.0),
        "JANITOR_INTERVAL_S": _float("JANITOR_INTERVAL_S", 600.0),
        "JANITOR_MIN_AGE_S": _float("JANITOR_MIN_AGE_S", 3600.0),
        "MAINTENANCE_FAILURES_SHOWN": _int("MAINTENANCE_FAILURES_SHOWN", 3),
        "REDIS_CONNECT_TIMEOUT_S": _float("REDIS_CONNECT_TIMEOUT_S", 2.0),
        "REDIS_SOCKET_TIMEOUT_S": _float("REDIS_SOCKET_TIMEOUT_S", 5.0),
        "TRUSTED_HOSTS": [h.strip() for h in env.get("TRUSTED_HOSTS", "").split(",") if h.strip()],
        "EXTERNAL_URL": env.get("EXTERNAL_URL", "").rstrip("/"),
        "TRUST_PROXY": env.get("TRUST_PROXY", "0").strip().lower() in ("1", "true", "yes"),
        "MAX_BODY_KB": _int("MAX_BODY_KB", 1024),
        "MODEL_ROOTS": [p for p in env.get("MODEL_ROOTS", "").split(":") if p],
        "DATASET_ROOTS": [p for p in env.get("DATASET_ROOTS", "").split(":") if p],
        "MAX_MODEL_GB": _float("MAX_MODEL_GB", 40.0),
        "SESSION_IDLE_MINUTES": _float("SESSION_IDLE_MINUTES", 480.0),
        "SESSION_MAX_HOURS": _float("SESSION_MAX_HOURS", 168.0),
        "LOGIN_FAILURES_PER_ACCOUNT": _int("LOGIN_FAILURES_PER_ACCOUNT", 5),
        "LOGIN_FAILURES_PER_ADDRESS": _int("LOGIN_FAILURES_PER_ADDRESS", 20),
        "LOGIN_LOCKOUT_S": _float("LOGIN_LOCKOUT_S", 30.0),
    }
    settings.update(overrides or {})
    data_dir = Path(settings["DATA_DIR"])
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # a new one is private; see data_dir_exposure
    if not settings["DATABASE_URL"]:
        settings["DATABASE_URL"] = f"sqlite:///{data_dir / 'sae_studio.db'}"
        _private_file(data_dir / "sae_studio.db")  # SQLite gives its -wal and -shm files the same mode
    if not settings["SECRET_KEY"]:
        settings["SECRET_KEY"] = _persistent_secret(data_dir / "secret_key")
    settings["MODEL_ROOTS"] = settings["MODEL_ROOTS"] or [str(data_dir / "models")]
    settings["DATASET_ROOTS"] = settings["DATASET_ROOTS"] or [str(data_dir / "datasets")]
    if not settings["TRUSTED_HOSTS"]:
        from urllib.parse import urlsplit

        external = urlsplit(settings["EXTERNAL_URL"]).hostname if settings["EXTERNAL_URL"] else None
        settings["TRUSTED_HOSTS"] = ["localhost", "127.0.0.1", "::1", "[::1]"] + ([external] if external else [])
    return settings


def _private_file(path: Path) -> None:
    """Create ``path`` empty and readable by its owner only (0600), unless it is there."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


def _persistent_secret(path: Path) -> str:
    """A random key kept on disk (mode 0600), so sessions survive restarts without configuration."""
    if not path.exists() or not path.read_text().strip():
        _private_file(path)
        path.write_text(secrets.token_hex(32))
    return path.read_text().strip()


def data_dir_exposure(data_dir: str | Path) -> str | None:
    """Why other accounts on this machine can reach DATA_DIR's files (the database, password
    hashes, uploads, the secret key), or None when they cannot.

    DATA_DIR is exposed to its group or to everyone when its mode lets them in and every folder
    above it lets them through (a private parent folder, like a 0700 home, keeps it private).
    ``make run`` sets DATA_DIR to 0700 and its files to 0600; the app and the worker only warn
    (they never change modes themselves: a deliberate group setup stays possible).
    """
    path = Path(data_dir).resolve()
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    exposed = []
    for who, bits, search in (("its group", 0o070, 0o010), ("every account", 0o007, 0o001)):
        if mode & bits & 0o055 and all(p.stat().st_mode & search for p in path.parents):
            exposed.append(who)
    if not exposed:
        return None
    return (f"DATA_DIR is mode {mode:04o}: {' and '.join(exposed)} on this machine can read the database, "
            "uploads and keys. Run `chmod -R go-rwx` on it (`make run` does this), or keep it under a private folder.")
