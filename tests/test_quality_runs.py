"""Quality control on real trainings: early stop through the worker, verdict, comparison."""
from __future__ import annotations

import re

from app.models import Event, MetricPoint, Training
from conftest import create_run


def test_a_dense_run_fires_the_dense_rule_and_stops_early(client, env, run_worker):
    # The smallest penalty the form allows is, for this source, no penalty at all.
    run = create_run(client, l1_alpha=1.1e-5, latent_dim=512, total_steps=3000, early_stop_step=300,
                 lr_warmup_steps=10, l1_warmup_steps=50)
    assert run_worker().returncode == 0
    run = Training.get_by_id(run.id)
    assert run.status == "stopped_early", run.reason
    assert run.step == 300 and run.finished_at is not None
    assert "still dense" in run.reason and "Restart with l1_alpha about" in run.reason
    codes = [e.code for e in run.events.order_by(Event.id)]
    assert "dense" in codes and codes[-1] == "early_stop"
    dense = Event.get(Event.training == run, Event.code == "dense")
    assert dense.level == "warning" and "Increase l1_alpha" in dense.suggestion
    # What was trained is kept: its metrics, its checkpoint and a verdict.
    assert run.metrics.count() == 30 and run.summary["checkpoint"]
    assert run.summary["verdict"]["grade"] == "red"

    html = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert "stopped early" in html and "still dense" in html
    suggested = run.summary["verdict"]["suggested_l1_alpha"]
    link = re.search(r'id="restart-suggested"\s+href="([^"]+)"', html)
    assert link, "no restart button"
    prefilled = client.get(link.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert f'value="{float(f"{suggested:.3g}")}"' in prefilled and "Pre-filled from run" in prefilled
    # the app's own form does not refuse the app's own advice (issue 25)
    box = re.search(r'<div id="findings-l1_alpha" class="findings">(.*?)</div>', prefilled, re.S)
    assert box and "finding-warning" not in box.group(1) and "finding-error" not in box.group(1), box
    # and it steers: the penalty starts at the advice, the controller closes what the L0 model misses
    steer = re.search(r'<input[^>]*name="steer_l1_alpha"[^>]*>', prefilled).group(0)
    assert "checked" in steer, steer


def test_finished_run_page_shows_verdict_and_histogram(client, run_worker):
    run = create_run(client, latent_dim=512, total_steps=600, batch_size=256, l1_warmup_steps=60)
    run_worker()
    run = Training.get_by_id(run.id)
    assert run.status == "completed", run.reason
    summary = run.summary
    hist = summary["density_histogram"]
    assert sum(hist["counts"]) + hist["never_fired"] == 512
    assert summary["eval_tokens"] == 16_384
    html = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert 'id="verdict"' in html and summary["verdict"]["headline"].split(":")[0] in html
    assert "Most likely to help:" in html
    assert 'id="histogram"' in html and "Latent density on held-out tokens" in html
    assert html.count("<rect") > 20  # the histogram's bars


def test_comparison_of_three_runs(client, run_worker):
    runs = [create_run(client, name=f"penalty {a}", l1_alpha=a) for a in (0.001, 0.003, 0.01)]
    run_worker()
    assert all(Training.get_by_id(r.id).status == "completed" for r in runs)
    html = client.get("/compare?" + "&".join(f"ids={r.id}" for r in runs)).get_data(as_text=True)
    assert all(f"penalty {a}" in html for a in (0.001, 0.003, 0.01))
    differing = re.findall(r'<tr class="differs"><td>([a-z0-9_]+)</td>', html)
    assert differing == ["l1_alpha"]
    assert html.count('class="chart"') == 3  # L0 overlay, FVU overlay, frontier
    assert html.count("<circle") == 3
    assert client.get(f"/compare?ids={runs[0].id}").status_code == 400
    index = client.get("/").get_data(as_text=True)
    assert index.count('name="ids"') == 3 and 'id="compare"' in index


def test_steering_changes_l1_alpha_and_records_it(client, run_worker):
    run = create_run(client, latent_dim=512, total_steps=400, l1_alpha=0.0005, steer_l1_alpha=True,
                 l1_warmup_steps=50, target_l0=0.03)
    run_worker()
    run = Training.get_by_id(run.id)
    assert run.status == "completed", run.reason
    alphas = [m.l1_alpha for m in run.metrics.order_by(MetricPoint.step) if m.step > 50]
    assert alphas[-1] > 2 * alphas[0]  # far too dense at the start: the controller raised the penalty
    assert all(1e-5 < a <= 0.1 for a in alphas)
    html = client.get(f"/trainings/{run.id}").get_data(as_text=True)
    assert "l1_alpha (sparsity penalty), log scale" in html
