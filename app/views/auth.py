"""Sign-in, sign-out, the health check, password changes, personal API tokens, and (for admins)
the team's accounts."""
from __future__ import annotations

from flask import Blueprint, abort, g, redirect, render_template, request, url_for

from .. import auth
from ..forms import LoginForm, PasswordChangeForm, TokenForm, UserForm
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
        username, address = form.username.data, request.remote_addr
        wait = auth.sign_in_wait(username, address)  # before Argon2: a locked key costs no hashing
        if wait:
            form.password.errors.append(auth.wait_message(wait))
            return render_template("login.html", form=form), 429, {"Retry-After": str(wait)}
        user = auth.authenticate(username, form.password.data)
        if user is None:
            auth.record_sign_in_failure(username, address)
            form.password.errors.append("Unknown username or wrong password.")
        elif user.is_disabled:
            form.username.errors.append("This account is disabled; an admin can enable it under Users.")
            return render_template("login.html", form=form), 403
        else:
            auth.clear_sign_in_failures(username)
            auth.sign_in(user)
            auth.forget_initial_password(user.password_hash)
            return redirect(auth.safe_next(request.args.get("next")), code=303)
    return render_template("login.html", form=form), 200 if request.method == "GET" else 401


@bp.post("/logout")
def logout():
    auth.sign_out()
    return redirect(url_for("auth.login"), code=303)


@bp.route("/account/password", methods=["GET", "POST"])
def change_password():
    form = PasswordChangeForm()
    if request.method == "GET":
        return render_template("password.html", form=form)
    if not form.validate_on_submit():
        return render_template("password.html", form=form), 422
    user = g.user
    wait = auth.sign_in_wait(user.username, request.remote_addr)
    if wait:
        form.current_password.errors.append(auth.wait_message(wait))
        return render_template("password.html", form=form), 429, {"Retry-After": str(wait)}
    if not auth.verify_password(user.password_hash, form.current_password.data):
        auth.record_sign_in_failure(user.username, request.remote_addr)
        form.current_password.errors.append("That is not your current password; nothing was changed.")
        return render_template("password.html", form=form), 422
    if form.new_password.data == form.current_password.data:
        form.new_password.errors.append("The new password is the current one; choose another.")
        return render_template("password.html", form=form), 422
    try:
        auth.set_password(user, form.new_password.data)  # ends every session of this user
    except auth.AccountError as exc:
        form.new_password.errors.append(str(exc))
        return render_template("password.html", form=form), 422
    auth.sign_in(user)  # this browser goes on with a fresh session; the others are signed out
    return render_template("password.html", form=PasswordChangeForm(formdata=None), changed=True)


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


def render_users(form=None, created: tuple[str, str] | None = None, status: int = 200, *,
                 reset: tuple[str, str] | None = None, errors: dict[int, str] | None = None):
    users = list(User.select().order_by(User.username))
    return render_template("users.html", form=form or UserForm(formdata=None), users=users, created=created,
                           reset=reset, errors=errors or {}), status


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


# What an admin does to an account: each ends the user's sessions where it takes something away.
ACCOUNT_ACTIONS = {
    "disable": lambda user: auth.set_disabled(user, True),
    "enable": lambda user: auth.set_disabled(user, False),
    "promote": lambda user: auth.set_admin(user, True),
    "demote": lambda user: auth.set_admin(user, False),
}


@bp.post("/users/<int:user_id>/<action>")
def change_user(user_id: int, action: str):
    auth.require_admin()
    if action not in ACCOUNT_ACTIONS and action != "reset-password":
        abort(404, description="There is no such change to an account.")
    user = get_or_404(User, user_id, "user")
    me = user.id == g.user.id
    if me and action == "reset-password":  # the new password would be shown to a session it just ended
        return render_users(status=409, errors={user.id: "To change your own password, use the Password page "
                                                         "(it asks for your current one)."})
    try:
        if action == "reset-password":
            password = auth.reset_password(user)
        else:
            ACCOUNT_ACTIONS[action](user)
    except auth.AccountError as exc:
        return render_users(status=409, errors={user.id: str(exc)})
    if me and action in ("disable", "demote"):
        return redirect(url_for("auth.login"), code=303)  # the admin's own sessions just ended
    if action == "reset-password":
        return render_users(reset=(user.username, password))
    return redirect(url_for("auth.users"), code=303)
