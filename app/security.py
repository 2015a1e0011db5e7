"""The web app's guards, installed by ``init_app``: sign-in on every route, body limits that fit
each route, trusted hosts, a reverse proxy only when told, security headers, Secure cookies
behind TLS, clear 4xx pages instead of 5xx for bad input, and the ``users`` CLI."""
from __future__ import annotations

import io
import os
from pathlib import Path

import click
from flask import Response, current_app, g, render_template, request, session
from werkzeug.exceptions import BadRequest, HTTPException, RequestEntityTooLarge
from werkzeug.routing import IntegerConverter

from . import auth

# Routes that take a file: they keep the upload limit; every other body is small.
UPLOAD_ENDPOINTS = {"sources.upload", "extractions.start", "features.import_sae", "templates.import_templates"}
TEMPLATE_IMPORT_LIMIT = 2**20

def body_limit(settings, endpoint: str | None) -> int:
    """The largest body ``endpoint`` reads, in bytes: a file route's own limit, else MAX_BODY_KB."""
    if endpoint == "templates.import_templates":
        return TEMPLATE_IMPORT_LIMIT
    if endpoint in UPLOAD_ENDPOINTS:
        return settings["MAX_UPLOAD_MB"] * 2**20 + 2**20  # the file and the form around it
    return settings["MAX_BODY_KB"] * 1024


def install_body_limits(app) -> None:
    """Cap every request body before anything reads it; call before ``CSRFProtect`` is set up.

    The app-wide default is the small limit, so a reader that runs first still meets it; this
    hook, the first to run, sets the route's own limit and refuses a Content-Length over it at
    once, without reading a byte. A body sent without a Content-Length (chunked) is read through
    a stream that stops with a 413 at the limit (Werkzeug's ``LimitedStream``).
    """
    settings = app.config
    app.config["MAX_CONTENT_LENGTH"] = settings["MAX_BODY_KB"] * 1024

    @app.before_request
    def _limit_body():
        limit = body_limit(settings, request.endpoint)
        if limit > settings["MAX_BODY_KB"] * 1024 and not _signed_in():
            limit = settings["MAX_BODY_KB"] * 1024  # a file route's large limit is for users, not strangers
        g.body_limit = limit
        request.max_content_length = limit
        if request.content_length is not None:
            if request.content_length > limit:
                raise RequestEntityTooLarge()
        elif request.environ.get("wsgi.input_terminated") and "stream" not in request.__dict__:
            # Werkzeug stops a chunked body at the limit without a word (its ``readall`` truncates):
            # this one refuses it once a byte past the limit arrives.
            request.environ["wsgi.input"] = CappedStream(request.environ["wsgi.input"], limit)


def held_to_small_limit() -> bool:
    """Whether this request met the small limit on a file route because it is not signed in (its
    answer is then the plain 413: a page with its form would show a stranger what signed-in users see)."""
    return g.get("body_limit", 0) < body_limit(current_app.config, request.endpoint) and "body_limit" in g


def _signed_in() -> bool:
    """Whether the request carries a live session or a valid API token (read before anything parses
    the body: the CSRF check, which runs before sign-in is checked, reads a form in full)."""
    if request.path.startswith("/api/"):
        scheme, _, plain = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and bool(plain.strip()) and auth.user_for_token(plain.strip()) is not None
    return auth.session_user(session.get("sid")) is not None


class CappedStream(io.RawIOBase):
    """A body without a Content-Length, read up to ``limit`` bytes: one byte more is a 413."""

    def __init__(self, stream, limit: int) -> None:
        self._stream, self._limit, self._pos = stream, limit, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        want = min(len(buffer), self._limit - self._pos)
        if want <= 0:
            if self._stream.read(1):
                raise RequestEntityTooLarge()
            return 0
        data = self._stream.read(want)
        buffer[:len(data)] = data
        self._pos += len(data)
        if data and self._pos >= self._limit and self._stream.read(1):
            raise RequestEntityTooLarge()
        return len(data)


def too_large(error=None):
    """The 413 answer: what was too large, the limit, and that nothing was kept."""
    settings = current_app.config
    if held_to_small_limit():
        return _error(413, "Too large", f"The request is larger than the limit of {g.body_limit / 2**20:,.1f} MB "
                                        "for a client that is not signed in: sign in first. Nothing was kept.")
    upload = request.endpoint in UPLOAD_ENDPOINTS and request.endpoint != "templates.import_templates"
    limit = settings["MAX_UPLOAD_MB"] * 2**20 if upload else body_limit(settings, request.endpoint)
    what = "The file" if request.endpoint in UPLOAD_ENDPOINTS else "The request"
    message = f"{what} is larger than the limit of {limit / 2**20:,.1f} MB. Nothing was kept."
    return _error(413, "Too large", message)


class BoundedInt(IntegerConverter):
    """Route ids fit a database integer: a longer number is simply no page (404), never an overflow."""

    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(url_map, *args, **kwargs)


CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'self'; object-src 'none'")


NUL_MESSAGE = "Text may not contain the NUL character (\\x00)."
NUL_CHECKED_AT_THE_FIELD = {"auth.login"}  # its form says so at the field itself


def refuse_nul():
    """A NUL in any text a request carries is refused at once: PostgreSQL cannot store it (the
    driver raises, which would be a 500), and no name, query or setting needs one."""
    from flask import abort, request

    if request.endpoint in NUL_CHECKED_AT_THE_FIELD:
        return
    values = [*request.args.values(), *(request.form.values() if request.method in ("POST", "PUT", "PATCH")
                                         else ())]
    if any("\x00" in value for value in values) or (request.is_json and b"\\u0000" in request.get_data()):
        abort(400, description=NUL_MESSAGE)


def init_app(app) -> None:
    """Install the guards; call before the blueprints are registered (the id converter is bounded)."""
    settings = app.config
    app.url_map.converters["int"] = BoundedInt
    app.config["TRUSTED_HOSTS"] = settings["TRUSTED_HOSTS"]
    app.config["SESSION_COOKIE_HTTPONLY"] = True
    app.config["SESSION_COOKIE_SAMESITE"] = "Lax"
    # The cookie only carries a session id; the server ends sessions (app/auth.py). The browser's
    # copy expires with the absolute lifetime and is not pushed further on every request.
    import datetime as dt

    app.config["PERMANENT_SESSION_LIFETIME"] = dt.timedelta(hours=min(float(settings["SESSION_MAX_HOURS"]),
                                                                      auth.TEN_YEARS_H))
    app.config["SESSION_REFRESH_EACH_REQUEST"] = False
    app.config["SESSION_COOKIE_SECURE"] = settings["EXTERNAL_URL"].startswith("https://")
    if settings["EXTERNAL_URL"]:
        from urllib.parse import urlsplit

        parts = urlsplit(settings["EXTERNAL_URL"])
        app.config.setdefault("PREFERRED_URL_SCHEME", parts.scheme)
    if settings["TRUST_PROXY"]:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)

    app.before_request(auth.check_request)
    app.before_request(refuse_nul)

    @app.after_request
    def _headers(response):
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("X-Frame-Options", "DENY")
        if request.is_secure:
            response.headers.setdefault("Strict-Transport-Security", "max-age=31536000")
        return response

    app.register_error_handler(RequestEntityTooLarge, too_large)

    @app.errorhandler(RecursionError)
    def _too_deep(error):
        return _error(400, "Bad request", "The data is nested too deeply to read.")

    for code, title in ((400, "Bad request"), (401, "Sign in first"), (403, "Not allowed"), (404, "Not found"),
                        (405, "Not allowed here"), (409, "Conflict"), (422, "Not valid")):
        app.register_error_handler(code, lambda error, c=code, t=title: _error(c, t, _describe(error)))

    @app.cli.group("users")
    def users():
        """Team accounts: create users, list them."""

    @users.command("create")
    @click.argument("username")
    @click.option("--admin", is_flag=True, help="may change anyone's records and add users")
    @click.option("--password-stdin", is_flag=True, help="read the password from standard input (else generated)")
    def create_user(username, admin, password_stdin):
        """Create a user; a generated password is printed once."""
        from .db import database

        password = click.get_text_stream("stdin").readline().rstrip("\n") if password_stdin else None
        with database.connection_context():
            try:
                user, password = auth.create_user(username, password, is_admin=admin)
            except auth.AccountError as exc:
                raise click.ClickException(str(exc)) from exc
        click.echo(f"Created {'admin ' if user.is_admin else ''}{user.username}; password: {password}")

    @users.command("list")
    def list_users():
        from .db import database
        from .models import User

        with database.connection_context():
            for user in User.select().order_by(User.username):
                click.echo(f"{user.username}{' (admin)' if user.is_admin else ''}"
                           f"{' (disabled)' if user.is_disabled else ''}")

    @users.command("ensure-admin")
    def ensure_admin():
        """If there is no user yet, create "admin" with a one-time password, print it and keep it
        (mode 0600) in DATA_DIR/initial-admin-password until it is used or changed."""
        from .db import database
        from .models import User

        path = Path(current_app.config["DATA_DIR"]) / "initial-admin-password"
        with database.connection_context():
            if User.select().exists():
                if path.exists():
                    click.echo(f"Sign in as admin with the password in {path}")
                return
            _, password = auth.create_user("admin", is_admin=True)
        path.write_text(password + "\n")
        os.chmod(path, 0o600)
        click.echo(f"First sign-in: user admin, password {password} (also in {path}; add your team under Users)")

    @users.command("count")
    def count_users():
        from .db import database
        from .models import User

        with database.connection_context():
            click.echo(str(User.select().count()))


def _describe(error) -> str:
    if isinstance(error, HTTPException) and error.description and error.description != type(error).description:
        return error.description
    if isinstance(error, BadRequest):
        return "The request could not be read."
    return getattr(error, "description", None) or "The request was refused."


def _error(code: int, title: str, message: str):
    if request.path.startswith("/api/"):
        return {"error": message}, code
    if request.url_rule is None and code == 400:  # e.g. an untrusted Host: no page links can be built
        return Response(f"{title}: {message}\n", code, mimetype="text/plain")
    return render_template("error.html", title=title, message=message), code
