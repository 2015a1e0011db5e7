"""No page breaks on any real run: one run of every kind, then every page in headless Chromium.

The runs are real (the API and a real worker): each architecture on a synthetic source, one on a
MiniLM extraction with its downstream evaluation, one interrupted (its work-horse killed) and
resumed, one stopped early (a too-weak l1_alpha), and a two-member sweep. The architectures are the
registry's, so a new one is crawled without a change here. Then every page, the comparison of all the
runs and of each beside the next (every other pair, and each run's progress fragment, are fetched
without the browser), the new-training
form with each architecture selected and from a template of each, the sweeps, the workers and the
delete confirmations are visited and measured at 1,024 and 1,360 px: no 5xx, no console error
(htmx's oob errors included) and no horizontal overflow at either width.
"""
from __future__ import annotations

import itertools
import sys
import threading
import time

import pytest
from werkzeug.serving import make_server

from app.sae import architectures
from conftest import QUICK_CONFIG, browser_page, kill_work_horse, shown, start_worker, stop_worker, wait_for
from conftest import sign_in as sign_in_client
from test_browser import PASSWORD, USER, sign_in

pytestmark = pytest.mark.browser

WIDTHS = (1024, 1360)
ARCHITECTURES = architectures.names()  # every registered one: a new architecture is crawled too
EXTRA = {"matryoshka": {"matryoshka_prefixes": "32, 64"}}  # an architecture's own settings, where it has some
SMALL = {"latent_dim": 256, "batch_size": 128, "total_steps": 200, "lr_warmup_steps": 10, "l1_warmup_steps": 20,
         "target_l0": 8 / 256, "k": 8, "log_every": 10, "acknowledge_warnings": True}


@pytest.fixture
def served(env):
    """The app over HTTP, an admin, and an API client of the same app."""
    from app import create_app
    from app.auth import create_token, create_user

    env["FEATURE_SAMPLE_TOKENS"] = "4000"
    env["DOWNSTREAM_TOKENS"] = "1024"
    app = create_app({"TESTING": True})
    with app.app_context():
        from app.db import database

        with database.connection_context():
            user, _ = create_user(USER, PASSWORD, is_admin=True)
            _, token = create_token(user, "crawl")
    server = make_server("127.0.0.1", 0, app, threaded=True)
    # shutdown() waits for the loop to look again: every 50 ms, not werkzeug's 500
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    api = app.test_client()
    api.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    yield f"http://127.0.0.1:{server.server_port}", api
    server.shutdown()


T0 = time.monotonic()


def note(what: str) -> None:
    print(f"[crawl {time.monotonic() - T0:6.1f}s] {what}", file=sys.stderr, flush=True)


def post(api, url, body=None, status=(200, 201, 202)):
    response = api.post(url, json=body if body is not None else {})
    assert response.status_code in status, (url, response.status_code, response.get_data(as_text=True)[:2000])
    return response.json


def ended(api, kind: str, record_id: int) -> dict:
    body = api.get(f"/api/{kind}/{record_id}").json
    return body if body["status"] not in ("queued", "running") else None


def make_every_kind_of_run(api, env, worker) -> dict:
    """Runs of every kind, each ended; returns {label: run id} and the worker process (it may be restarted)."""
    runs = {}
    for arch in ARCHITECTURES:
        extra = EXTRA.get(arch, {})
        runs[arch] = post(api, "/api/trainings", {**QUICK_CONFIG, **SMALL, "name": f"crawl {arch}",
                                                  "architecture": arch, **extra})["id"]
    # too weak a penalty: dense at the early-stop check
    runs["early-stopped"] = post(api, "/api/trainings", {
        **QUICK_CONFIG, **SMALL, "name": "crawl too weak", "l1_alpha": 2e-5, "l1_warmup_steps": 0,
        "early_stop": True, "early_stop_step": 60, "early_stop_l0": 0.2, "total_steps": 400})["id"]
    # a sweep of two short members: its page and the list of sweeps
    sweep = post(api, "/api/sweeps", {"name": "crawl sweep", "base": {
        **QUICK_CONFIG, **SMALL, "name": "crawl sweep", "architecture": "topk", "l1_alpha": None, "total_steps": 100},
        "axes": [{"param": "target_l0", "values": [8 / 256, 16 / 256]}]})["id"]
    extraction = post(api, "/api/extractions", {"model_name": "bundled:all-MiniLM-L6-v2", "layer": 3,
                                                "token_budget": 6000, "context_length": 64})["id"]
    for label, run_id in runs.items():
        wait_for(lambda r=run_id: ended(api, "trainings", r), timeout=180, message=f"run {label}")
        note(f"run {label} ended")
    done = wait_for(lambda: ended(api, "sweeps", sweep), timeout=180, message="the sweep")
    assert done["status"] == "completed", done
    note("sweep ended")
    done = wait_for(lambda: ended(api, "extractions", extraction), timeout=180, message="the extraction")
    assert done["status"] == "completed", done
    note("extraction ended")
    runs["extracted"] = post(api, "/api/trainings", {
        **QUICK_CONFIG, **SMALL, "name": "crawl on MiniLM", "source_id": done["source_id"], "architecture": "topk",
        "l1_alpha": None, "total_steps": 150})["id"]
    # interrupted: the work-horse is killed after a checkpoint; the sweeper marks it; then resumed
    runs["resumed"] = post(api, "/api/trainings", {
        **QUICK_CONFIG, **SMALL, "name": "crawl resumed", "total_steps": 600, "checkpoint_every_steps": 50})["id"]
    wait_for(lambda: ended(api, "trainings", runs["extracted"]), timeout=180, message="the run on MiniLM")
    wait_for(lambda: (api.get(f"/api/trainings/{runs['resumed']}").json["checkpoint_step"] or 0) >= 50,
             timeout=120, message="a checkpoint of the run to interrupt")
    note("checkpoint; killing the work-horse")
    kill_work_horse(worker)
    wait_for(lambda: api.get(f"/api/trainings/{runs['resumed']}").json["status"] == "interrupted", timeout=60,
             message="the killed run marked interrupted")
    note("interrupted; resuming")
    post(api, f"/api/trainings/{runs['resumed']}/resume")
    for label, run_id in runs.items():
        wait_for(lambda r=run_id: ended(api, "trainings", r), timeout=180, message=f"run {label}")
    statuses = {label: api.get(f"/api/trainings/{i}").json["status"] for label, i in runs.items()}
    assert statuses["early-stopped"] == "stopped_early", statuses
    assert all(s == "completed" for label, s in statuses.items() if label != "early-stopped"), statuses
    # the jobs the runs queued (feature statistics, the downstream evaluation) end too
    from app.models import DownstreamEval, FeatureJob

    def jobs_done():
        active = [j for m in (FeatureJob, DownstreamEval) for j in m.select() if j.is_active]
        return not active
    note("all runs ended")
    wait_for(jobs_done, timeout=240, message="the feature and downstream jobs")
    note("all jobs ended")
    evaluation = DownstreamEval.get(DownstreamEval.training == runs["extracted"])
    assert evaluation.status == "completed", evaluation.reason
    return runs


def every_page(runs: dict) -> list[str]:
    from app.models import ActivationSet, Extraction, FeatureJob, FeatureStat, Sweep, Template, Training, TuneJob

    pages = ["/", "/sources/", "/extractions/", "/imports/", "/templates/", "/users/", "/account/tokens",
             "/account/password", "/workers/", "/sweeps", "/trainings/new"]
    pages += [f"/trainings/new?architecture={a}" for a in ARCHITECTURES]
    first_template = {}  # the form from a template: one of each architecture's presets
    for t in Template.select().order_by(Template.id):
        first_template.setdefault(t.config.get("architecture"), t.id)
    pages += [f"/trainings/new?template={i}" for i in first_template.values()]
    for sweep in Sweep.select():
        pages.append(f"/sweeps/{sweep.id}")
        pages += [f"/trainings/{m.id}" for m in Training.select().where(Training.sweep == sweep.id).limit(1)]
    pages += [f"/sources/{s.id}/delete" for s in ActivationSet.select()]
    pages += [f"/extractions/{e.id}/delete" for e in Extraction.select()]
    for run_id in runs.values():
        # (its progress fragment, which this page includes and htmx polls, is fetched without the browser:
        # progress_fragments)
        pages += [f"/trainings/{run_id}", f"/trainings/new?from={run_id}", f"/trainings/{run_id}/delete"]
    for job in FeatureJob.select():
        pages.append(f"/features/{job.id}")
        if job.status == "completed":
            latents = [s.latent for s in FeatureStat.select().where(FeatureStat.job == job.id)
                       .order_by(FeatureStat.frequency.desc()).limit(1)]
            latents += [s.latent for s in FeatureStat.select().where(FeatureStat.job == job.id)
                        .order_by(FeatureStat.frequency).limit(1)]
            pages += [f"/features/{job.id}/latents/{n}" for n in latents]
    pages += [f"/extractions/{e.id}" for e in Extraction.select()]
    pages += [f"/templates/{t.id}/edit" for t in Template.select().limit(3)]
    pages += [f"/tunes/{t.id}" for t in TuneJob.select()]
    ids = sorted(runs.values())
    pages.append("/compare?" + "&".join(f"ids={i}" for i in ids))
    # each run beside another in the browser (the page's layout and script are the same for any pair, and
    # widest with all runs, above); every pair is fetched without a browser (comparisons_of_every_pair)
    pages += [f"/compare?ids={a}&ids={b}" for a, b in zip(ids, ids[1:])]
    return pages


def page_client(api):
    """A client of the app signed in for pages (they take a session, not the API's token)."""
    from app.models import User

    pages = api.application.test_client()
    with api.application.app_context():
        sign_in_client(pages, User.get(User.username == USER))
    return pages


def progress_fragments(api, runs: dict) -> list[str]:
    """Each run's progress fragment as htmx fetches it: the panel its page includes, with the run's status.
    Alone it is no page (no layout, no script), so the browser visits the run's page instead."""
    pages, problems = page_client(api), []
    for run_id in runs.values():
        response = pages.get(f"/trainings/{run_id}/progress")
        html = response.get_data(as_text=True)
        status = api.get(f"/api/trainings/{run_id}").json["status"]
        if response.status_code != 200 or 'id="progress"' not in html or f'data-status="{status}"' not in html:
            problems.append(f"/trainings/{run_id}/progress: HTTP {response.status_code}, "
                            f"not the panel of a {status} run")
    return problems


def comparisons_of_every_pair(api, runs: dict) -> list[str]:
    """Every pair of runs compared, fetched as the server answers it: a page that links both runs, for any pair."""
    pages, problems = page_client(api), []
    for a, b in itertools.combinations(sorted(runs.values()), 2):
        response = pages.get(f"/compare?ids={a}&ids={b}")
        html = response.get_data(as_text=True)
        if response.status_code != 200 or f'href="/trainings/{a}"' not in html or f'href="/trainings/{b}"' not in html:
            problems.append(f"/compare?ids={a}&ids={b}: HTTP {response.status_code}, not a comparison of both runs")
    return problems


def track_requests(page) -> set:
    """The page's requests in flight, kept current by its events (for ``settle``)."""
    inflight: set = set()
    page.on("request", lambda request: inflight.add(request))  # Playwright takes Python functions, not builtins
    page.on("requestfinished", lambda request: inflight.discard(request))
    page.on("requestfailed", lambda request: inflight.discard(request))
    return inflight


def settle(page, inflight: set, *, quiet_s: float = 0.08, timeout_s: float = 20) -> None:
    """Wait until no request has been in flight for ``quiet_s``: Playwright's "networkidle" with a
    shorter quiet spell (it waits 500 ms after the last request, on every one of ~120 visits). No page
    here sends a request on a timer once its jobs have ended (htmx polls only active ones); a fragment
    that loads another asks for it as htmx settles the swap (20 ms after it), well inside the spell; and
    the form's hints answer 300 ms after typing, which the visit waits for by their text first."""
    deadline = time.monotonic() + timeout_s
    calm_since = None
    while time.monotonic() < deadline:
        if inflight:
            calm_since = None
        elif calm_since is None:
            calm_since = time.monotonic()
        elif time.monotonic() - calm_since >= quiet_s:
            return
        page.wait_for_timeout(25)
    raise AssertionError(f"requests still in flight after {timeout_s}s: {[r.url for r in inflight]}")


# What each visit checks, in the page: overflow measured after htmx settled.
OVERFLOW = """() => {
  const doc = document.documentElement;
  const wide = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
    .slice(0, 5).map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + (e.className && e.className.baseVal === undefined ? '.' + e.className : '') + ' ' + Math.round(e.getBoundingClientRect().right));
  return {scrollWidth: doc.scrollWidth, innerWidth: window.innerWidth, wide};
}"""


def test_every_page_of_every_kind_of_run(served, env, tmp_path, chromium):
    base, api = served
    worker = start_worker(env, "crawl")
    try:
        runs = make_every_kind_of_run(api, env, worker)
    finally:
        stop_worker(worker)
    pages = every_page(runs)
    problems = comparisons_of_every_pair(api, runs) + progress_fragments(api, runs)
    note(f"{len(pages)} pages to visit")
    page = browser_page(chromium, WIDTHS[0], 900)
    page.set_default_timeout(20_000)
    inflight = track_requests(page)
    sign_in(page, base, USER, PASSWORD)
    console, failed = [], []
    page.on("console", lambda m: console.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: console.append(f"page error: {e}"))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 500 else None)
    for path in pages:
        console.clear()
        failed.clear()
        page.set_viewport_size({"width": WIDTHS[0], "height": 900})
        response = page.goto(base + path)
        assert response is not None
        if response.status >= 500:
            problems.append(f"{path}: HTTP {response.status}")
        if path.startswith("/trainings/new"):
            arch = path.split("architecture=")[1] if "architecture=" in path else None
            if arch:
                page.select_option("#architecture", arch)
            # a change: the live hints answer (and swap their out-of-band boxes)
            page.fill("#latent_dim", "512")
            shown(page, "#target-count", "of 512 latents")
        settle(page, inflight)
        # each width measured on the same visit: no page's script depends on the width (static/app.js
        # reads none), so a resize lays the page out as a load at that width would
        for width in WIDTHS:
            if width != WIDTHS[0]:
                page.set_viewport_size({"width": width, "height": 900})
            layout = page.evaluate(OVERFLOW)
            if layout["scrollWidth"] > layout["innerWidth"]:
                problems.append(f"{width}px {path}: {layout['scrollWidth']} px wide: {layout['wide']}")
        problems += [f"{path}: console: {text}" for text in console]
        problems += [f"{path}: {text}" for text in failed]
        if path == "/trainings/new":
            page.set_viewport_size({"width": WIDTHS[0], "height": 900})
            page.screenshot(path=str(tmp_path / f"form-{WIDTHS[0]}.png"), full_page=True)
    page.context.close()
    note(f"visited at {' and '.join(f'{w} px' for w in WIDTHS)}")
    assert not problems, "\n".join(problems)


def test_the_form_s_live_hints_swap_into_targets_that_exist(served, chromium):
    """Fast, without runs: the new-training form at both widths, each architecture, typed into; every
    out-of-band findings box the hints send has its target (htmx:oobErrorNoTarget is a console error)."""
    base, _ = served
    problems = []
    for width in WIDTHS:
        page = browser_page(chromium, width, 900)
        inflight = track_requests(page)
        sign_in(page, base, USER, PASSWORD)
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(base + "/trainings/new")
        for n, arch in enumerate(ARCHITECTURES):
            page.select_option("#architecture", arch)
            page.fill("#latent_dim", str(512 + n))
            shown(page, "#target-count", f"of {512 + n:,} latents")
        page.select_option("#architecture", "standard")
        page.fill("#l1_alpha", "0.0003")
        page.fill("#learning_rate", "0.0003")  # a warning: the swap
        shown(page, '.finding-warning[data-finding="l1_alpha"]')
        settle(page, inflight)
        width_now = page.evaluate("document.documentElement.scrollWidth")
        if width_now > width:
            problems.append(f"{width}px: the form is {width_now} px wide")
        problems += [f"{width}px: {e}" for e in errors]
        page.context.close()
    assert not problems, "\n".join(problems)
