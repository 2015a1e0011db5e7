"""The live page's charts: bounded whatever the run's length, extremes kept, drawn from the row."""
from __future__ import annotations

import json
from types import SimpleNamespace

from app.chart_series import ChartSeries, from_points
from app.models import MetricPoint, Training
from app.sae.trainer import LogPoint
from app.work import lifecycle
from app.work.training import MetricWriter
from conftest import QUICK_CONFIG


def point(step: int, **changes) -> SimpleNamespace:
    values = {"step": step, "l0_fraction": 0.5 / (1 + step / 1000), "loss": 1.0 + 1 / step, "mse": 0.5,
              "l1_alpha": 0.003, "fvu": 0.1}
    return SimpleNamespace(**{**values, **changes})


def test_a_100k_point_series_stays_bounded_and_keeps_its_spikes():
    series = ChartSeries(max_buckets=250)
    for step in range(1, 100_001):
        series.add(point(step, loss=50.0 if step == 77_777 else (0.01 if step == 123 else 1.0 + 1 / step)))
    assert len(series) == 100_000 and len(series.buckets) <= 250
    loss = series.points("loss")
    assert len(loss) <= 500 and [s for s, _ in loss] == sorted(s for s, _ in loss)
    assert (77_777, 50.0) in loss and (123, 0.01) in loss  # the spike and the dip survive any thinning
    l0 = series.points("l0_fraction")
    assert l0[0] == (1, 0.5 / 1.001) and l0[-1][0] == 100_000  # the first and the latest point are drawn
    again = ChartSeries(state=json.loads(json.dumps(series.state())))
    assert again.points("loss") == loss  # the state is plain JSON


def test_non_finite_values_are_left_out_not_drawn():
    series = from_points([point(1), point(2, loss=float("nan")), point(3)])
    assert [s for s, _ in series.points("loss")] == [1, 3]


def test_the_worker_keeps_the_series_on_the_row_and_the_page_draws_from_it(client):
    response = client.post("/api/trainings", json=QUICK_CONFIG)
    run = Training.get_by_id(response.json["id"])
    assert lifecycle.claim(run)  # the writer writes for the process that holds the run
    writer = MetricWriter(run, max_rows=1000)
    for step in range(10, 30_001, 10):
        writer.add(LogPoint(step=step, tokens=step * 256, loss=1.0, mse=0.5, sparsity_loss=0.1, l1=1.0, l0=5.0,
                            l0_fraction=0.02, fvu=0.1, dead=0, lr=1e-3, l1_alpha=0.003, tokens_per_s=1.0))
    writer.flush()
    run = Training.get_by_id(run.id)
    assert MetricPoint.select().where(MetricPoint.training == run.id).count() == 3000
    assert len(ChartSeries(state=run.chart)) == 3000 and len(run.chart["buckets"]) <= 250
    html = client.get(f"/trainings/{run.id}/progress").get_data(as_text=True)
    assert "<path" in html and "waiting for the first metrics" not in html
