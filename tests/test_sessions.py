"""Sessions that can be ended: sign-out, password changes, an admin's disable, demote and reset,
idle and absolute lifetimes, the sign-in throttle, the initial password file, and where ``next``
may send a browser after sign-in. Real app, real database, real cookies."""
from __future__ import annotations

import datetime as dt
import re
from urllib.parse import urlsplit

import pytest

from app.auth import create_user
from app.models import LoginThrottle, User, UserSession, utcnow
from conftest import signed_in_client

PASSWORD = "correct horse battery"


def login(client, username: str, password: str = PASSWORD, **kwargs):
    return client.post("/login", data={"username": username, "password": password}, **kwargs)


def signed_in(app, username: str, password: str = PASSWORD, *, is_admin: bool = False, address: str = "127.0.0.1"):
    """A user and a test client signed in through the sign-in form itself."""
    user, _ = create_user(username, password, is_admin=is_admin)
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = address
    assert login(client, username, password).status_code == 303
    client.user = user
    return client


def session_cookie(client) -> str:
    cookie = client.get_cookie("session")
    assert cookie is not None
    return cookie.value


def goes_to_sign_in(response) -> bool:
    return response.status_code == 302 and urlsplit(response.headers["Location"]).path == "/login"


def test_a_replayed_cookie_after_sign_out_goes_to_sign_in(app):
    client = signed_in(app, "ada")
    assert client.get("/").status_code == 200
    stolen = session_cookie(client)
    assert client.post("/logout").status_code == 303
    replay = app.test_client()
    replay.set_cookie("session", stolen)
    assert goes_to_sign_in(replay.get("/"))
    assert replay.post("/account/tokens", data={"name": "x"}).status_code == 401
    assert UserSession.select().where(UserSession.user == client.user.id).count() == 0


def test_the_cookie_carries_a_session_id_and_no_part_of_the_hash(app):
    client = signed_in(app, "ada")
    client.get("/")  # the page adds its CSRF token to the session
    raw = session_cookie(client)
    content = app.session_interface.get_signing_serializer(app).loads(raw)
    assert set(content) <= {"sid", "_permanent", "csrf_token"}, content
    digest = User.get(User.username == "ada").password_hash.rsplit("$", 1)[-1]
    text = raw + repr(content)
    assert not any(digest[i:i + 6] in text for i in range(len(digest) - 5))
    # the id in the cookie is not what the server keeps: only its SHA-256 is stored
    assert not UserSession.select().where(UserSession.key_hash == content["sid"]).exists()


def test_signing_in_again_replaces_the_old_session(app):
    client = signed_in(app, "ada")
    first = session_cookie(client)
    assert login(client, "ada").status_code == 303
    assert session_cookie(client) != first
    assert UserSession.select().where(UserSession.user == client.user.id).count() == 1
    replay = app.test_client()
    replay.set_cookie("session", first)
    assert goes_to_sign_in(replay.get("/"))


def test_a_password_change_ends_the_other_sessions(app):
    laptop = signed_in(app, "ada")
    phone = app.test_client()
    assert login(phone, "ada").status_code == 303
    assert laptop.get("/account/password").status_code == 200
    assert 'id="nav-password"' in laptop.get("/").get_data(as_text=True)
    new = "a brand new passphrase"
    changed = laptop.post("/account/password", data={"current_password": PASSWORD, "new_password": new,
                                                     "confirm_password": new})
    assert changed.status_code == 200 and 'id="password-changed"' in changed.get_data(as_text=True)
    assert laptop.get("/").status_code == 200  # this browser stays signed in, on a fresh session
    assert goes_to_sign_in(phone.get("/"))
    assert login(app.test_client(), "ada").status_code == 401
    assert login(app.test_client(), "ada", new).status_code == 303


@pytest.mark.parametrize("data, field, message", [
    ({"current_password": "not my password", "new_password": "long enough pw", "confirm_password": "long enough pw"},
     "current_password", "not your current password"),
    ({"current_password": PASSWORD, "new_password": "short", "confirm_password": "short"},
     "new_password", "10 to 1000 characters"),
    ({"current_password": PASSWORD, "new_password": "long enough pw", "confirm_password": "long enough pX"},
     "confirm_password", "differ"),
    ({"current_password": PASSWORD, "new_password": PASSWORD, "confirm_password": PASSWORD},
     "new_password", "is the current one"),
    ({"current_password": "", "new_password": "", "confirm_password": ""}, "current_password", "current password"),
    ({"current_password": PASSWORD, "new_password": "x" * 5000, "confirm_password": "x" * 5000},
     "new_password", "10 to 1000 characters"),
])
def test_a_password_change_mistake_is_shown_at_its_field_and_changes_nothing(app, data, field, message):
    client = signed_in(app, "ada")
    other = app.test_client()
    assert login(other, "ada").status_code == 303
    before = User.get(User.username == "ada").password_hash
    response = client.post("/account/password", data=data)
    assert response.status_code == 422
    page = response.get_data(as_text=True)
    assert re.search(rf'data-field="{field}">[^<]*{re.escape(message)}', page), page
    assert User.get(User.username == "ada").password_hash == before
    assert other.get("/").status_code == 200 and client.get("/").status_code == 200


def test_an_admin_disable_ends_sessions_and_refuses_sign_in_and_tokens(app):
    admin = signed_in_client(app, "boss")
    user = signed_in(app, "ada")
    token = user.post("/account/tokens", data={"name": "script"}).get_data(as_text=True)
    plain = re.search(r"<code>(sae_[^<]+)</code>", token).group(1)
    bearer = {"Authorization": f"Bearer {plain}"}
    assert app.test_client().get("/api/trainings", headers=bearer).status_code == 200

    assert admin.post(f"/users/{user.user.id}/disable").status_code == 303
    assert goes_to_sign_in(user.get("/"))
    assert app.test_client().get("/api/trainings", headers=bearer).status_code == 401
    refused = login(app.test_client(), "ada")
    assert refused.status_code == 403 and "disabled" in refused.get_data(as_text=True)
    assert login(app.test_client(), "ada", "wrong password!").status_code == 401  # says nothing more without it
    assert 'data-status="disabled"' in admin.get("/users/").get_data(as_text=True)

    assert admin.post(f"/users/{user.user.id}/enable").status_code == 303
    assert login(app.test_client(), "ada").status_code == 303
    assert app.test_client().get("/api/trainings", headers=bearer).status_code == 200


def test_a_demote_takes_admin_pages_away_at_once(app):
    admin = signed_in_client(app, "boss")
    other = signed_in(app, "second", is_admin=True)
    assert other.get("/users/").status_code == 200
    assert admin.post(f"/users/{other.user.id}/demote").status_code == 303
    assert goes_to_sign_in(other.get("/users/"))  # the session ended with the rights
    assert login(other, "second").status_code == 303
    assert other.get("/users/").status_code == 403
    assert other.post(f"/users/{admin.user.id}/disable").status_code == 403
    assert not User.get_by_id(other.user.id).is_admin and User.get_by_id(admin.user.id).disabled_at is None
    assert admin.post(f"/users/{other.user.id}/promote").status_code == 303
    assert other.get("/users/").status_code == 200  # promotion takes nothing away: no new sign-in needed


def test_the_last_active_admin_cannot_be_locked_out(app):
    admin = signed_in_client(app, "boss")
    for action in ("disable", "demote"):
        response = admin.post(f"/users/{admin.user.id}/{action}")
        assert response.status_code == 409
        assert re.search(rf'id="user-error-{admin.user.id}"[^>]*>[^<]*last active admin',
                         response.get_data(as_text=True))
    assert User.get_by_id(admin.user.id).is_admin and User.get_by_id(admin.user.id).disabled_at is None
    assert admin.get("/users/").status_code == 200  # and still signed in
    # a disabled admin does not count as the other admin
    second, _ = create_user("second", PASSWORD, is_admin=True)
    assert admin.post(f"/users/{second.id}/disable").status_code == 303
    assert admin.post(f"/users/{admin.user.id}/demote").status_code == 409
    # with another active admin, an admin may step down (and is signed out)
    assert admin.post(f"/users/{second.id}/enable").status_code == 303
    stepped_down = admin.post(f"/users/{admin.user.id}/demote")
    assert goes_to_sign_in(admin.get("/")) and stepped_down.status_code == 303
    assert not User.get_by_id(admin.user.id).is_admin


def test_account_changes_on_unknown_users_and_actions_are_a_404(client):
    assert client.post("/users/999999/disable").status_code == 404
    assert client.post(f"/users/{client.user.id}/explode").status_code == 404
    assert client.post("/users/" + "9" * 30 + "/disable").status_code == 404


def test_an_admin_reset_shows_the_password_once_and_ends_sessions(app):
    admin = signed_in_client(app, "boss")
    user = signed_in(app, "ada")
    page = admin.post(f"/users/{user.user.id}/reset-password")
    assert page.status_code == 200
    password = re.search(r'id="reset-password">[^<]*<code>([^<]+)</code>', page.get_data(as_text=True)).group(1)
    assert 'id="reset-password"' not in admin.get("/users/").get_data(as_text=True)
    assert goes_to_sign_in(user.get("/"))
    assert login(app.test_client(), "ada").status_code == 401
    assert login(app.test_client(), "ada", password).status_code == 303


def test_an_admin_cannot_reset_their_own_password_and_lose_it(app):
    """A reset ends the user's sessions and shows the new password once: on one's own account that
    page would go to a session it just ended. It is refused at the row, pointing to the Password page."""
    admin = signed_in(app, "boss", is_admin=True)
    page = admin.post(f"/users/{admin.user.id}/reset-password")
    assert page.status_code == 409
    html = page.get_data(as_text=True)
    assert f'id="user-error-{admin.user.id}"' in html and "Password page" in html
    assert admin.get("/").status_code == 200  # still signed in
    assert login(app.test_client(), "boss").status_code == 303  # and the password still works
    users = admin.get("/users/").get_data(as_text=True)
    row = users[users.index(f'id="user-{admin.user.id}"'):]
    row = row[:row.index("</tr>")]
    assert "reset-password" not in row and "/account/password" in row


def test_the_initial_password_file_goes_on_first_sign_in(app, runner):
    result = runner.invoke(args=["users", "ensure-admin"])
    assert result.exit_code == 0, result.output
    path = app.config["DATA_DIR"] + "/initial-admin-password"
    with open(path) as f:
        password = f.read().strip()
    client = app.test_client()
    assert login(client, "admin", "not the password").status_code == 401
    assert open(path).read().strip() == password  # a failed attempt leaves it
    assert login(client, "admin", password).status_code == 303
    with pytest.raises(FileNotFoundError):
        open(path)


def test_the_initial_password_file_goes_when_the_password_is_reset(app, runner):
    assert runner.invoke(args=["users", "ensure-admin"]).exit_code == 0
    import os

    path = os.path.join(app.config["DATA_DIR"], "initial-admin-password")
    other = signed_in_client(app, "boss")  # a second admin, made on the server
    assert os.path.exists(path)
    admin = User.get(User.username == "admin")
    assert other.post(f"/users/{admin.id}/reset-password").status_code == 200
    assert not os.path.exists(path)


def test_an_unrelated_password_change_keeps_the_initial_password_file(app, runner):
    assert runner.invoke(args=["users", "ensure-admin"]).exit_code == 0
    import os

    path = os.path.join(app.config["DATA_DIR"], "initial-admin-password")
    client = signed_in(app, "ada")
    new = "a brand new passphrase"
    assert client.post("/account/password", data={"current_password": PASSWORD, "new_password": new,
                                                  "confirm_password": new}).status_code == 200
    assert os.path.exists(path)  # it is admin's, and admin has not used it yet


def wait_shown(response) -> int:
    page = response.get_data(as_text=True)
    match = re.search(r'data-field="password">Too many attempts; try again in (\d+) s\.', page)
    assert match, page
    assert int(response.headers["Retry-After"]) == int(match.group(1))
    return int(match.group(1))


def test_sign_in_is_throttled_per_account(app):
    create_user("ada", PASSWORD)
    for i in range(5):  # from five different addresses: the account's count is what locks it
        guesser = app.test_client()
        guesser.environ_base["REMOTE_ADDR"] = f"10.0.0.{i + 1}"
        assert login(guesser, "ada", f"guess number {i}").status_code == 401
    elsewhere = app.test_client()
    elsewhere.environ_base["REMOTE_ADDR"] = "10.9.9.9"
    locked = login(elsewhere, "ada")  # the right password, during the lock
    assert locked.status_code == 429 and 25 <= wait_shown(locked) <= 30
    assert goes_to_sign_in(elsewhere.get("/"))
    # other accounts are not locked
    create_user("bob", PASSWORD)
    assert login(app.test_client(), "bob").status_code == 303
    # the lock runs out: one more wrong guess locks it again, for twice as long
    LoginThrottle.update(locked_until=utcnow() - dt.timedelta(seconds=1)).where(
        LoginThrottle.key == "user:ada").execute()
    assert login(elsewhere, "ada", "guess number 6").status_code == 401
    again = login(elsewhere, "ada")
    assert again.status_code == 429 and 55 <= wait_shown(again) <= 60
    # once it has run out, the right password signs in and the count starts over
    LoginThrottle.update(locked_until=utcnow() - dt.timedelta(seconds=1)).where(
        LoginThrottle.key == "user:ada").execute()
    assert login(elsewhere, "ada").status_code == 303
    assert not LoginThrottle.select().where(LoginThrottle.key == "user:ada").exists()


def test_sign_in_is_throttled_per_address(app):
    create_user("ada", PASSWORD)
    sprayer = app.test_client()
    sprayer.environ_base["REMOTE_ADDR"] = "10.1.2.3"
    for i in range(20):  # one guess each at twenty names, no account reaches its own limit
        assert login(sprayer, f"name{i}", "password123").status_code == 401
    locked = login(sprayer, "ada")
    assert locked.status_code == 429 and 25 <= wait_shown(locked) <= 30
    # the same account from another address is fine
    neighbour = app.test_client()
    neighbour.environ_base["REMOTE_ADDR"] = "10.1.2.4"
    assert login(neighbour, "ada").status_code == 303


def test_passwords_are_hashed_with_argon2id_at_the_recommended_cost():
    """The app's own hasher, in a process of its own (the tests hash at a cheaper cost, tests/conftest.py):
    Argon2id at RFC 9106's low-memory profile, three passes over 64 MiB, four lanes."""
    import subprocess
    import sys

    from conftest import ROOT

    code = "from app.auth import hash_password, verify_password; h = hash_password('a long password'); " \
           "assert verify_password(h, 'a long password') and not verify_password(h, 'another one'); print(h)"
    hashed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.startswith("$argon2id$v=19$m=65536,t=3,p=4$"), hashed.stdout


def test_a_locked_sign_in_answers_without_hashing(app):
    """The lock is checked before Argon2 runs: an answer to a locked key takes less time than one
    password verification at the app's own cost (the fastest of several of each, to be fair to a busy
    machine)."""
    import time

    from conftest import APP_HASHER

    user, _ = create_user("ada", PASSWORD)
    user.password_hash = APP_HASHER.hash(PASSWORD)  # as the app stores it (the tests hash at a lower cost)
    user.save()
    client = app.test_client()
    for i in range(5):
        login(client, "ada", f"guess number {i}")

    def fastest(action) -> float:
        times = []
        for _ in range(7):
            started = time.perf_counter()
            action()
            times.append(time.perf_counter() - started)
        return min(times)

    verify = fastest(lambda: APP_HASHER.verify(user.password_hash, PASSWORD))
    locked = fastest(lambda: login(client, "ada"))
    assert login(client, "ada").status_code == 429
    assert locked < verify, (locked, verify)


def test_the_password_page_is_throttled_too(app):
    client = signed_in(app, "ada")
    for i in range(5):
        response = client.post("/account/password", data={"current_password": f"guess number {i}",
                                                           "new_password": "long enough pw",
                                                           "confirm_password": "long enough pw"})
        assert response.status_code == 422
    locked = client.post("/account/password", data={"current_password": PASSWORD, "new_password": "long enough pw",
                                                    "confirm_password": "long enough pw"})
    assert locked.status_code == 429 and "try again in" in locked.get_data(as_text=True)
    assert login(app.test_client(), "ada").status_code == 429  # the same account's lock
    assert login(app.test_client(), "ada", "long enough pw").status_code == 429


def age_sessions(user_id: int, **delta) -> None:
    for field in delta:
        UserSession.update({getattr(UserSession, field): utcnow() - delta[field]}).where(
            UserSession.user == user_id).execute()


def test_an_idle_session_ends(app):
    client = signed_in(app, "ada")
    idle = dt.timedelta(minutes=app.config["SESSION_IDLE_MINUTES"])
    age_sessions(client.user.id, last_seen_at=idle - dt.timedelta(minutes=5))
    assert client.get("/").status_code == 200  # not yet; and the visit counts as use
    seen = UserSession.get(UserSession.user == client.user.id).last_seen_at
    assert utcnow() - seen < dt.timedelta(minutes=1)
    age_sessions(client.user.id, last_seen_at=idle + dt.timedelta(minutes=1))
    assert goes_to_sign_in(client.get("/"))
    assert not UserSession.select().where(UserSession.user == client.user.id).exists()


def test_a_busy_session_still_ends_at_its_absolute_lifetime(app):
    client = signed_in(app, "ada")
    longest = dt.timedelta(hours=app.config["SESSION_MAX_HOURS"])
    age_sessions(client.user.id, created_at=longest - dt.timedelta(minutes=1))
    assert client.get("/").status_code == 200
    age_sessions(client.user.id, created_at=longest + dt.timedelta(minutes=1))
    assert goes_to_sign_in(client.get("/"))  # although it was used a moment ago


def test_the_lifetimes_are_settings(app):
    client = signed_in(app, "ada")
    age_sessions(client.user.id, last_seen_at=dt.timedelta(minutes=3))
    assert client.get("/").status_code == 200
    app.config["SESSION_IDLE_MINUTES"] = 2
    age_sessions(client.user.id, last_seen_at=dt.timedelta(minutes=3))
    assert goes_to_sign_in(client.get("/"))
    client = signed_in(app, "bob")
    app.config["SESSION_MAX_HOURS"] = 0.5
    age_sessions(client.user.id, created_at=dt.timedelta(minutes=31))
    assert goes_to_sign_in(client.get("/"))


def test_the_cookie_is_not_renewed_on_every_request(app):
    client = signed_in(app, "ada")
    client.get("/")  # the first page stores its CSRF token
    assert "Set-Cookie" not in client.get("/").headers
    assert app.permanent_session_lifetime == dt.timedelta(hours=app.config["SESSION_MAX_HOURS"])


OFF_SITE = [
    "//evil.example", "//evil.example/x", "/%09/evil.example", "/%0a/evil.example", "/%0d/evil.example",
    "%2F%2Fevil.example", "/%2F%2Fevil.example", "/%5Cevil.example", "/%5C%5Cevil.example", "%5C%5Cevil.example",
    "/%0d%0aLocation:%20https://evil.example", "/%0d%0a", "%0d%0a//evil.example", "https://evil.example",
    "http:evil.example", "https:/evil.example", "javascript:alert(1)", "evil.example", "%09//evil.example",
    "%20//evil.example", "/%252F%252Fevil.example", "/%00/evil.example", "/%E2%80%A8/evil.example",
    "/%C2%85/evil.example", "///evil.example", "/%20/evil.example", "." + "/" * 3 + "evil.example",
    pytest.param("/" + "a" * 5000, id="a-path-of-5000-characters"),
]


@pytest.mark.parametrize("next_value", OFF_SITE)
def test_next_never_leaves_the_site(app, next_value):
    create_user("ada", PASSWORD)
    client = app.test_client()
    shown = client.get("/login", query_string=f"next={next_value}")
    assert shown.status_code == 200
    response = login(client, "ada", query_string=f"next={next_value}")
    assert response.status_code == 303
    assert response.headers["Location"] == "/"


@pytest.mark.parametrize("next_value, expected", [
    ("/sources/", "/sources/"), ("/trainings/1", "/trainings/1"), ("/compare?ids=1%26ids%3D2", "/compare?ids=1&ids=2"),
])
def test_next_keeps_a_path_on_this_site(app, next_value, expected):
    create_user("ada", PASSWORD)
    response = login(app.test_client(), "ada", query_string=f"next={next_value}")
    assert response.status_code == 303 and response.headers["Location"] == expected


def test_the_way_back_after_sign_in(app):
    create_user("ada", PASSWORD)
    client = app.test_client()
    page = client.get("/trainings/new?template=1")
    assert goes_to_sign_in(page)
    back = client.post(page.headers["Location"], data={"username": "ada", "password": PASSWORD})
    assert back.status_code == 303 and back.headers["Location"] == "/trainings/new?template=1"


def test_a_database_from_before_sessions_is_upgraded(app):
    from playhouse.migrate import SchemaMigrator, migrate as run_migrations

    from app.db import MIGRATIONS, SchemaVersion, database, migrate

    db = database.obj
    db.execute_sql("DROP TABLE user_session")
    db.execute_sql("DROP TABLE login_throttle")
    run_migrations(SchemaMigrator.from_database(db).drop_column("app_user", "disabled_at"))
    before = [m.__name__ for m in MIGRATIONS].index("_migration_17_sessions")  # the migrations before it
    SchemaVersion.update(version=before).execute()
    assert migrate() == len(MIGRATIONS)
    assert {"user_session", "login_throttle"} <= set(db.get_tables())
    assert "disabled_at" in {c.name for c in db.get_columns("app_user")}
    client = signed_in(app, "ada")
    assert client.get("/").status_code == 200


@pytest.mark.parametrize("username, password", [
    ("ada\x00", PASSWORD), ("a\x00b", "x"), ("ada", "pass\x00word1234"), ("ünïcødé", PASSWORD), ("a" * 65, PASSWORD),
    pytest.param("ada", "p" * 1001, id="a-password-of-1001-characters"), ("", ""), ("ada\r\nX-Evil: 1", PASSWORD), ("'; DROP TABLE app_user; --", PASSWORD),
])
def test_odd_sign_in_input_is_a_4xx_at_its_field(app, username, password):
    create_user("ada", PASSWORD)
    response = login(app.test_client(), username, password)
    assert 400 <= response.status_code < 500
    assert 'class="error" data-field=' in response.get_data(as_text=True)
    assert User.select().count() == 1 and not UserSession.select().exists()


def test_a_flood_of_parallel_guesses_loses_no_count(app):
    """Eight threads guessing at once: every failure is counted (no lost update, no 5xx), and the
    account ends up locked."""
    from concurrent.futures import ThreadPoolExecutor

    create_user("ada", PASSWORD)

    def guess(i: int) -> int:
        with app.app_context():
            client = app.test_client()
            client.environ_base["REMOTE_ADDR"] = f"10.2.0.{i % 8}"
            return login(client, "ada", f"guess number {i}").status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(guess, range(40)))
    assert set(codes) <= {401, 429}, codes
    counted = LoginThrottle.get(LoginThrottle.key == "user:ada").failures
    assert counted == codes.count(401) >= 5
    addresses = LoginThrottle.select().where(LoginThrottle.key.startswith("addr:10.2.0."))
    assert sum(row.failures for row in addresses) == codes.count(401)
    assert login(app.test_client(), "ada").status_code == 429


def test_two_admins_demoting_each_other_at_once_leave_one(app):
    """The last-admin check and the change are one locked step: two admins removing each other
    at the same moment leave exactly one admin, and neither request is a 5xx."""
    import threading

    for round_ in range(3):
        first = signed_in_client(app, f"first{round_}")
        second = signed_in_client(app, f"second{round_}")
        User.update(is_admin=False).where(User.id.not_in([first.user.id, second.user.id])).execute()
        barrier = threading.Barrier(2)
        codes = {}

        def demote(actor, target):
            with app.app_context():
                barrier.wait()
                codes[actor.user.username] = actor.post(f"/users/{target.user.id}/demote").status_code

        threads = [threading.Thread(target=demote, args=(first, second)),
                   threading.Thread(target=demote, args=(second, first))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # the loser is refused as the last admin (409), or its session had already ended (401)
        assert sorted(codes.values())[0] == 303 and sorted(codes.values())[1] in (401, 409), codes
        assert User.select().where(User.is_admin == True).count() == 1  # noqa: E712
