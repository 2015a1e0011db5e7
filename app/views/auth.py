"""Sign-in, sign-out, the health check, personal API tokens, and (for admins) the team's accounts."""
from __future__ import annotations

from flask import Blueprint, g, redirect, render_template, request, url_for

from .. import auth
from ..forms import LoginForm, TokenForm, UserForm
from ..models import ApiToken, User
from .records import get_or_404

bp = Blueprint("auth", __name__)


@bp.get("/health")
def health():
    """For load balancers and monitors: the web process answers (no sign-in, no details)."""
    return {"status": "ok"}


@bp.route("/login", methods=["GET", "POST"])
def login():
    form = LoginForm()
    if form.validate_on_submit():
        user = auth.authenticate(form.username.data, form.password.data)
        if user is not None:
            auth.sign_in(user)
            return redirect(auth.safe_next(request.args.get("next")), code=303)
        form.password.errors.append("Unknown username or wrong password.")
    return render_template("login.html", form=form), 200 if request.method == "GET" else 401


@bp.post("/logout")
def logout():
    from flask import session

    session.clear()
    return redirect(url_for("auth.login"), code=303)


def render_tokens(form=None, new_token: str | None = None, status: int = 200):
    tokens = list(ApiToken.select().where(ApiToken.user == g.user.id).order_by(ApiToken.id.desc()))
    return render_template("tokens.html", form=form or TokenForm(formdata=None), tokens=tokens,
                           new_token=new_token), status


@bp.get("/account/tokens")
def tokens():
    return render_tokens()


@bp.post("/account/tokens")
def create_token():
    form = TokenForm()
    if not form.validate_on_submit():
        return render_tokens(form, status=422)
    _, plain = auth.create_token(g.user, form.name.data)
    return render_tokens(new_token=plain)


@bp.post("/account/tokens/<int:token_id>/revoke")
def revoke_token(token_id: int):
    token = get_or_404(ApiToken, token_id, "token")
    if token.user_id != g.user.id and not g.user.is_admin:
        return render_tokens(status=403)
    auth.revoke_token(token)
    return redirect(url_for("auth.tokens"), code=303)


def render_users(form=None, created: tuple[str, str] | None = None, status: int = 200):
    users = list(User.select().order_by(User.username))
    return render_template("users.html", form=form or UserForm(formdata=None), users=users, created=created), status


@bp.get("/users/")
def users():
    auth.require_admin()
    return render_users()


@bp.post("/users/")
def create_user():
    auth.require_admin()
    form = UserForm()
    if not form.validate_on_submit():
        return render_users(form, status=422)
    try:
        user, password = auth.create_user(form.username.data, form.password.data or None, is_admin=form.is_admin.data)
    except auth.AccountError as exc:
        form.username.errors.append(str(exc))
        return render_users(form, status=422)
    return render_users(created=(user.username, password))
