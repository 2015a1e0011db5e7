"""Who is asking: accounts, sign-in, API tokens, and the checks every request passes.

- Pages use a signed session cookie after sign-in; every state change also carries a CSRF
  token (Flask-WTF) and, when the browser sends one, an Origin that is this app's own.
- The JSON API takes ``Authorization: Bearer <token>`` and never a cookie, so a cross-site
  form cannot act through it. Tokens are shown once; only their SHA-256 is stored.
- Every route needs a signed-in user except sign-in itself, the health check and static
  files. Everyone sees everything; cancelling, resuming and deleting are for a record's
  creator or an admin.
- Passwords are hashed with Argon2id (argon2-cffi).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from urllib.parse import urlsplit

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from flask import abort, g, redirect, request, session, url_for

from .models import ApiToken, User, utcnow

HASHER = PasswordHasher()
OPEN_ENDPOINTS = {"auth.login", "auth.health", "static"}
TOKEN_PREFIX = "sae_"
# a hash to verify against when the user does not exist, so timing does not tell names apart
_DUMMY_HASH = HASHER.hash(secrets.token_hex(16))


class AccountError(ValueError):
    """A user mistake with an account (name taken, password too short); safe to show."""


def hash_password(password: str) -> str:
    return HASHER.hash(password)


def create_user(username: str, password: str | None = None, *, is_admin: bool = False) -> tuple[User, str]:
    """Create a user; return it and its password (generated when none is given)."""
    username = (username or "").strip()
    if not username or len(username) > 64 or not all(c.isalnum() or c in "._-@" for c in username):
        raise AccountError("A username is 1 to 64 letters, digits or . _ - @.")
    if User.select().where(User.username == username).exists():
        raise AccountError(f"There is already a user named {username!r}.")
    if password is None:
        password = secrets.token_urlsafe(12)
    if len(password) < 10:
        raise AccountError("A password needs at least 10 characters.")
    return User.create(username=username, password_hash=hash_password(password), is_admin=is_admin), password


def authenticate(username: str, password: str) -> User | None:
    user = User.get_or_none(User.username == (username or "").strip())
    try:
        HASHER.verify(user.password_hash if user else _DUMMY_HASH, password or "")
    except (VerificationError, InvalidHashError):
        return None
    return user


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
    """The token's user. "Last used" is kept to ten minutes, so reads do not turn into a write each."""
    token = ApiToken.get_or_none((ApiToken.token_hash == _digest(plain)) & ApiToken.revoked_at.is_null())
    if token is None:
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
    user_id = session.get("user_id")
    user = User.get_or_none(User.id == user_id) if isinstance(user_id, int) else None
    if user is None or session.get("password_hash") != user.password_hash[-16:]:
        session.clear()
        if request.method in ("GET", "HEAD"):
            return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))
        abort(401, description="Sign in first.")
    g.user = user
    return None


def sign_in(user: User) -> None:
    session.clear()
    session["user_id"] = user.id
    # a password change signs every session of the user out
    session["password_hash"] = user.password_hash[-16:]
    session.permanent = True


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a path on this site only."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("pages.index")
    return target
