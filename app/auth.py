"""Who is asking: accounts, sign-in, sessions, API tokens, and the checks every request passes.

- Pages use a signed session cookie that carries only a random session id; the server keeps
  the session (its SHA-256, its user, when it began and was last used) in ``user_session``.
  Sign-out, a password change and an admin's disable, demote or reset delete the rows, so a
  replayed cookie is worth nothing. Sessions also end after ``SESSION_IDLE_MINUTES`` unused and
  ``SESSION_MAX_HOURS`` after sign-in, however busy.
- Every state change also carries a CSRF token (Flask-WTF) and, when the browser sends one, an
  Origin that is this app's own.
- The JSON API takes ``Authorization: Bearer <token>`` and never a cookie, so a cross-site
  form cannot act through it. Tokens are shown once; only their SHA-256 is stored. A disabled
  user's tokens answer 401.
- Sign-in is throttled per account and per address before the password is verified (below).
- Every route needs a signed-in user except sign-in itself, the health check and static
  files. Everyone sees everything; cancelling, resuming and deleting are for a record's
  creator or an admin.
- Passwords are hashed with Argon2id (argon2-cffi).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import math
import secrets
from pathlib import Path
from urllib.parse import unquote, urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import abort, current_app, g, redirect, request, session, url_for
from peewee import IntegrityError

from .db import database, is_sqlite
from .errors import UserError
from .models import ApiToken, LoginThrottle, User, UserSession, utcnow

HASHER = PasswordHasher()
OPEN_ENDPOINTS = {"auth.login", "auth.health", "static"}
TOKEN_PREFIX = "sae_"
# a hash to verify against when the user does not exist, so timing does not tell names apart
_DUMMY_HASH = HASHER.hash(secrets.token_hex(16))


class AccountError(UserError, ValueError):
    """A user mistake with an account (name taken, password too short); safe to show."""


def hash_password(password: str) -> str:
    return HASHER.hash(password)


MIN_PASSWORD = 10
MAX_PASSWORD = 1000


def check_new_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"A password needs at least {MIN_PASSWORD} characters.")
    if len(password) > MAX_PASSWORD:
        raise AccountError(f"A password has at most {MAX_PASSWORD} characters.")


def create_user(username: str, password: str | None = None, *, is_admin: bool = False) -> tuple[User, str]:
    """Create a user; return it and its password (generated when none is given)."""
    username = (username or "").strip()
    if not username or len(username) > 64 or not all(c.isalnum() or c in "._-@" for c in username):
        raise AccountError("A username is 1 to 64 letters, digits or . _ - @.")
    if User.select().where(User.username == username).exists():
        raise AccountError(f"There is already a user named {username!r}.")
    if password is None:
        password = secrets.token_urlsafe(12)
    check_new_password(password)
    return User.create(username=username, password_hash=hash_password(password), is_admin=is_admin), password


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return HASHER.verify(password_hash or _DUMMY_HASH, password or "") and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def authenticate(username: str, password: str) -> User | None:
    """The user whose password this is (disabled or not: the caller says which), else None."""
    user = User.get_or_none(User.username == (username or "").strip())
    return user if verify_password(user.password_hash if user else None, password) else None


# --- the initial admin password file ----------------------------------------------------------

def initial_password_path() -> Path:
    return Path(current_app.config["DATA_DIR"]) / "initial-admin-password"


def forget_initial_password(password_hash: str) -> None:
    """Delete DATA_DIR/initial-admin-password once the password in it has been used or replaced:
    called with the hash it would match (on sign-in the user's, on a change the old one)."""
    path = initial_password_path()
    try:
        kept = path.read_text().strip()
    except OSError:
        return
    if kept and verify_password(password_hash, kept):
        path.unlink(missing_ok=True)


# --- sessions ----------------------------------------------------------------------------------

SEEN_RESOLUTION = dt.timedelta(minutes=1)  # last_seen_at is written at most once a minute per session


TEN_YEARS_H = 24 * 3653  # a longer setting is taken as ten years (no date arithmetic overflows)


def _idle_limit() -> dt.timedelta:
    return dt.timedelta(hours=min(float(current_app.config["SESSION_IDLE_MINUTES"]) / 60, TEN_YEARS_H))


def _absolute_limit() -> dt.timedelta:
    return dt.timedelta(hours=min(float(current_app.config["SESSION_MAX_HOURS"]), TEN_YEARS_H))


def new_session(user: User) -> str:
    """Start a server-side session for ``user``; return the random id the cookie will carry."""
    plain = secrets.token_urlsafe(32)
    now = utcnow()
    UserSession.create(key_hash=_digest(plain), user=user, created_at=now, last_seen_at=now)
    # a user's ended or expired sessions are cleared out when they sign in again
    expired = (UserSession.created_at < now - _absolute_limit()) | (UserSession.last_seen_at < now - _idle_limit())
    UserSession.delete().where((UserSession.user == user.id) & expired).execute()
    return plain


def sign_in(user: User) -> None:
    """Put a fresh session (never the old cookie's: no fixation) in this browser's cookie."""
    old = session.get("sid")
    if isinstance(old, str) and old:
        UserSession.delete().where(UserSession.key_hash == _digest(old)).execute()
    session.clear()
    session["sid"] = new_session(user)
    session.permanent = True


def session_user(plain) -> User | None:
    """The signed-in user of the session whose id the cookie carries, or None when there is no such
    session, it ran past its idle or absolute lifetime (then it is deleted) or its user is disabled."""
    if not isinstance(plain, str) or not plain or len(plain) > 100:
        return None
    key = _digest(plain)
    row = (UserSession.select(UserSession, User).join(User).where(UserSession.key_hash == key).first())
    if row is None:
        return None
    now = utcnow()
    if (row.user.is_disabled or now - row.created_at > _absolute_limit()
            or now - row.last_seen_at > _idle_limit()):
        UserSession.delete().where(UserSession.id == row.id).execute()
        return None
    if now - row.last_seen_at > SEEN_RESOLUTION:
        UserSession.update(last_seen_at=now).where(UserSession.id == row.id).execute()
    g.session_key = key
    return row.user


def end_sessions(user_id: int) -> int:
    """End every session of a user; return how many there were."""
    return UserSession.delete().where(UserSession.user == user_id).execute()


def sign_out() -> None:
    """End this browser's session on the server, then forget the cookie."""
    if g.get("session_key"):
        UserSession.delete().where(UserSession.key_hash == g.session_key).execute()
    session.clear()


# --- password changes and what admins do to accounts ----------------------------------------

def set_password(user: User, password: str) -> None:
    """A new password for ``user``; every session of theirs ends (the caller signs this browser in
    again when it is their own change). The initial password file goes once it no longer works."""
    check_new_password(password)
    old_hash = user.password_hash
    user.password_hash = hash_password(password)
    User.update(password_hash=user.password_hash).where(User.id == user.id).execute()
    end_sessions(user.id)
    forget_initial_password(old_hash)


def _write_lock():
    """A transaction that holds the write lock from its first statement (SQLite) or locks the
    rows it reads FOR UPDATE (PostgreSQL), so two admins cannot both remove the last admin."""
    return database.atomic("IMMEDIATE") if is_sqlite() else database.atomic()


def _other_active_admins(user_id: int) -> int:
    # PostgreSQL: lock every active admin's row, the target's too, in one order, so a second
    # transaction waits here and then counts what the first one left (no deadlock, no race)
    query = (User.select(User.id).where((User.is_admin == True) & User.disabled_at.is_null())  # noqa: E712
             .order_by(User.id))
    if not is_sqlite():
        query = query.for_update()
    return sum(1 for row in query if row.id != user_id)


LAST_ADMIN = "{name} is the last active admin: make another user an admin first, or nobody could manage accounts."


def set_disabled(user: User, disabled: bool) -> None:
    """Disable (every session and API token stops working, sign-in is refused) or enable a user."""
    with _write_lock():
        others = _other_active_admins(user.id)
        user = User.get_by_id(user.id)  # as it is now, under the lock
        if disabled and user.is_admin and not others:
            raise AccountError(LAST_ADMIN.format(name=user.username))
        User.update(disabled_at=utcnow() if disabled else None).where(User.id == user.id).execute()
        if disabled:
            end_sessions(user.id)


def set_admin(user: User, is_admin: bool) -> None:
    """Promote or demote; a demoted admin's sessions end, so admin pages go at once."""
    with _write_lock():
        others = _other_active_admins(user.id)
        user = User.get_by_id(user.id)
        if not is_admin and user.is_admin and user.disabled_at is None and not others:
            raise AccountError(LAST_ADMIN.format(name=user.username))
        User.update(is_admin=is_admin).where(User.id == user.id).execute()
        if not is_admin:
            end_sessions(user.id)


def reset_password(user: User) -> str:
    """An admin's reset: a generated password (shown once), every session of the user ended."""
    password = secrets.token_urlsafe(12)
    set_password(user, password)
    return password


# --- the sign-in throttle ----------------------------------------------------------------------
#
# Our own, on the database, rather than Flask-Limiter on Redis: the README promises that pages
# (sign-in included) work while Redis is down, and Flask-Limiter's fallback then is a per-process
# memory store, which under gunicorn's several workers would multiply the limit and forget it on
# every restart. A table shared by every web process is correct on SQLite and PostgreSQL, needs no
# new dependency, and costs one indexed read per sign-in (a write only on a failure). It also
# counts what matters here, failed attempts, not requests. The lock is checked before Argon2
# runs, so a locked account or address costs the server no hashing at all.

LOCK_CAP = dt.timedelta(minutes=15)
FORGET_AFTER = dt.timedelta(hours=1)  # a key's count starts over after an hour without failures


def _throttle_keys(username: str, address: str | None) -> dict[str, int]:
    config = current_app.config
    address = "".join(c for c in (address or "unknown") if c.isprintable())[:100]
    keys = {"addr:" + address: int(config["LOGIN_FAILURES_PER_ADDRESS"])}
    name = (username or "").strip()[:100]
    if name:
        keys["user:" + name] = int(config["LOGIN_FAILURES_PER_ACCOUNT"])
    return keys


def sign_in_wait(username: str, address: str | None) -> int:
    """Seconds until this account and this address may try again (0: now)."""
    now = utcnow()
    locks = (LoginThrottle.select(LoginThrottle.locked_until)
             .where(LoginThrottle.key.in_(list(_throttle_keys(username, address)))
                    & (LoginThrottle.locked_until > now)))
    waits = [(row.locked_until - now).total_seconds() for row in locks]
    return max((math.ceil(w) for w in waits), default=0)


def _lock_for(failures: int, limit: int) -> dt.timedelta | None:
    if failures < limit:
        return None
    base = float(current_app.config["LOGIN_LOCKOUT_S"])
    return dt.timedelta(seconds=min(LOCK_CAP.total_seconds(), base * 2 ** min(failures - limit, 20)))


def record_sign_in_failure(username: str, address: str | None) -> None:
    """Count a failed attempt against the account and the address, and lock those that reached
    their limit (the first lock LOGIN_LOCKOUT_S, doubling with each further failure)."""
    now = utcnow()
    LoginThrottle.delete().where(LoginThrottle.last_failure_at < now - FORGET_AFTER).execute()
    for key, limit in _throttle_keys(username, address).items():
        with database.atomic():
            updated = (LoginThrottle.update(failures=LoginThrottle.failures + 1, last_failure_at=now)
                       .where(LoginThrottle.key == key).execute())
            if not updated:
                try:
                    with database.atomic():
                        LoginThrottle.create(key=key, failures=1, last_failure_at=now)
                except IntegrityError:  # another process counted this key's first failure just now
                    LoginThrottle.update(failures=LoginThrottle.failures + 1, last_failure_at=now).where(
                        LoginThrottle.key == key).execute()
            failures = LoginThrottle.get(LoginThrottle.key == key).failures
            lock = _lock_for(failures, limit)
            if lock is not None:
                LoginThrottle.update(locked_until=now + lock).where(LoginThrottle.key == key).execute()


def clear_sign_in_failures(username: str) -> None:
    """A correct password clears the account's count (not the address's: signing in to one's own
    account must not buy more guesses at others)."""
    LoginThrottle.delete().where(LoginThrottle.key == "user:" + (username or "").strip()[:100]).execute()


def wait_message(seconds: int) -> str:
    shown = f"{seconds} s" if seconds < 120 else f"{math.ceil(seconds / 60)} min"
    return f"Too many attempts; try again in {shown}."


# --- API tokens --------------------------------------------------------------------------------

def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(user: User, name: str) -> tuple[ApiToken, str]:
    """A new API token for ``user``; the plain token is returned once and never stored."""
    plain = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.create(user=user, name=(name or "").strip()[:100] or "token", token_hash=_digest(plain),
                            prefix=plain[:len(TOKEN_PREFIX) + 6])
    return token, plain


LAST_USED_RESOLUTION = dt.timedelta(minutes=10)


def user_for_token(plain: str) -> User | None:
    """The token's user (none when revoked or the user is disabled). "Last used" is kept to ten
    minutes, so reads do not turn into a write each."""
    token = (ApiToken.select(ApiToken, User).join(User)
             .where((ApiToken.token_hash == _digest(plain)) & ApiToken.revoked_at.is_null()).first())
    if token is None or token.user.is_disabled:
        return None
    now = utcnow()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.update(last_used_at=now).where(ApiToken.id == token.id).execute()
    return token.user


def revoke_token(token: ApiToken) -> None:
    ApiToken.update(revoked_at=utcnow()).where((ApiToken.id == token.id) & ApiToken.revoked_at.is_null()).execute()


def current_user() -> User | None:
    return g.get("user")


def require_change(record) -> None:
    """403 unless the signed-in user created ``record`` or is an admin."""
    if not record.may_change(current_user()):
        abort(403, description=f"Only {record.creator} (who created it) or an admin can change this.")


def require_admin() -> None:
    user = current_user()
    if user is None or not user.is_admin:
        abort(403, description="Only an admin can do this.")


def _same_origin(origin: str) -> bool:
    parts = urlsplit(origin)
    return bool(parts.netloc) and parts.netloc == request.host


def check_request():
    """Run before every request: find the user, or answer 401/redirect; refuse foreign origins."""
    g.user = None
    if request.routing_exception is not None:
        return None  # no such route (or an untrusted Host): Flask answers 404/400 next, naming nothing
    if request.method not in ("GET", "HEAD", "OPTIONS") and not request.path.startswith("/api/"):
        origin = request.headers.get("Origin")
        if origin is not None and not _same_origin(origin):
            abort(403, description="This request came from another site; nothing was changed.")
    if request.endpoint in OPEN_ENDPOINTS:
        return None
    if request.path.startswith("/api/"):
        header = request.headers.get("Authorization", "")
        scheme, _, plain = header.partition(" ")
        user = user_for_token(plain.strip()) if scheme.lower() == "bearer" and plain.strip() else None
        if user is None:
            return {"error": "Send a valid API token: Authorization: Bearer <token> (create one under "
                             "Account → API tokens)."}, 401
        g.user = user
        return None
    user = session_user(session.get("sid"))
    if user is None:
        session.clear()
        if request.method in ("GET", "HEAD"):
            return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))
        abort(401, description="Sign in first.")
    g.user = user
    return None


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a path on this site only, else the runs page.

    Browsers drop tabs and newlines inside a URL and read a backslash as a slash, so
    ``/\\t/evil.example`` or ``/\\\\evil.example`` would leave the site: any control character,
    whitespace or backslash, in the value or in its percent-decoding, sends it to ``/``. What is
    left must be a path (one leading slash, no scheme, no host) both as given and decoded."""
    home = url_for("pages.index")
    if not isinstance(target, str) or not target or len(target) > 2000:
        return home
    for form in (target, unquote(target)):
        if any(c == "\\" or c.isspace() or not c.isprintable() for c in form):
            return home
        if not form.startswith("/") or form.startswith("//"):
            return home
        parts = urlsplit(form)
        if parts.scheme or parts.netloc:
            return home
    return target
