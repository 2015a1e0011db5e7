"""The live progress fragment with 100,000 metric points and 20 pollers, against the real server.

Fills a run with 100,000 metric points (and the bounded chart series the worker keeps on its
row), starts the app under gunicorn as ``make run`` does (2 workers × 4 threads), and lets 20
pollers fetch the fragment the way the page does (every 2 s, starting at random offsets) for
``--seconds``; then the same 20 pollers back to back, to show the headroom. Prints latency
percentiles. Baselines in the same run: the fragment of a run with 1,000 points, and, in
process, what drawing the charts from every stored point costs (the way the page worked
before the series was kept on the row).

Usage: ``python benchmarks/progress_fragment.py [--points 100000] [--pollers 20] [--seconds 30]``
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fill(points: int) -> int:
    """A running run with ``points`` metric points and its chart series; returns its id."""
    from app.chart_series import ChartSeries
    from app.db import database
    from app.models import Event, MetricPoint, Training
    from app.sae.trainer import LogPoint
    from app.training_config import defaults

    config = {**defaults(), "total_steps": points * 20, "log_every": 20}
    run = Training.create(name=f"{points:,} points", source=1, status="running", **config)
    series = ChartSeries()
    rows = []
    rng = random.Random(0)
    for i in range(1, points + 1):
        step = 20 * i
        p = LogPoint(step=step, tokens=step * 4096, loss=0.1 + 1 / i + rng.random() * 0.01, mse=0.05 + 1 / i,
                     sparsity_loss=0.05, l1=10.0, l0=30.0 + 3000 / i, l0_fraction=(30.0 + 3000 / i) / 16384,
                     fvu=0.1 + 1 / i, dead=10, lr=1e-3, l1_alpha=0.003, tokens_per_s=200_000.0)
        series.add(p)
        rows.append({"training": run.id, **p.to_dict()})
        if len(rows) == 2000:
            with database.atomic():
                MetricPoint.insert_many(rows).execute()
            rows = []
    if rows:
        MetricPoint.insert_many(rows).execute()
    for i in range(60):
        Event.create(training=run, step=i * 100, level="info", code="note", message=f"event {i}")
    Training.update(step=points * 20, tokens_seen=points * 20 * 4096, chart=series.state()).where(
        Training.id == run.id).execute()
    return run.id


def poll(url: str, seconds: float, interval: float | None, out: list[float], errors: list[str],
         cookie: str) -> None:
    deadline = time.monotonic() + seconds
    if interval:
        time.sleep(random.random() * interval)
    while time.monotonic() < deadline:
        started = time.perf_counter()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"Cookie": cookie}), timeout=30) as response:
                response.read()
                if response.status != 200 or not response.geturl().endswith("/progress"):
                    errors.append(f"{response.status} {response.geturl()}")  # e.g. sent to sign in
        except Exception as exc:  # noqa: BLE001 - counted, not fatal
            errors.append(type(exc).__name__)
        out.append((time.perf_counter() - started) * 1000)
        if interval:
            time.sleep(max(0.0, interval - (time.perf_counter() - started)))


def percentiles(ms: list[float]) -> str:
    ms = sorted(ms)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return f"n {len(ms):>5}  p50 {q[49]:6.1f} ms  p95 {q[94]:6.1f} ms  p99 {q[98]:6.1f} ms  max {ms[-1]:6.1f} ms"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sae-fragment-"))
    os.environ.update({"DATA_DIR": str(tmp), "REDIS_URL": "redis://127.0.0.1:1/0", "SECRET_KEY": "bench"})
    from app import create_app

    app = create_app()
    with app.app_context():
        from app.db import database

        database.connect(reuse_if_open=True)
        started = time.perf_counter()
        big, small = fill(args.points), fill(1_000)
        print(f"filled runs of {args.points:,} and 1,000 points in {time.perf_counter() - started:.0f} s")
        # the baseline: the charts drawn from every stored point, as the page did before
        from app import charts
        from app.chart_series import from_points
        from app.models import MetricPoint, Training

        from app.auth import create_user

        user, _ = create_user("bench", "a long benchmark password")
        # the pollers are a signed-in user: the session cookie the app would have set
        serializer = app.session_interface.get_signing_serializer(app)
        cookie = f"{app.config['SESSION_COOKIE_NAME']}=" + serializer.dumps(
            {"user_id": user.id, "password_hash": user.password_hash[-16:]})
        run = Training.get_by_id(big)
        started = time.perf_counter()
        rows = list(run.metrics.order_by(MetricPoint.step))
        everything = from_points(rows, max_buckets=10**9)
        charts.l0_chart(everything, run.target_l0, run.total_steps)
        charts.loss_chart(everything, run.total_steps)
        old_ms = (time.perf_counter() - started) * 1000
        database.close()
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers", "2",
                               "--threads", "4", "app:create_app()"], cwd=ROOT, env={**os.environ},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.1)
        print(f"baseline, in process: reading {args.points:,} points and drawing the charts from all of them: "
              f"{old_ms:.0f} ms per fragment")
        for label, run_id, interval, seconds in (
                (f"{args.points:,} points, {args.pollers} pollers every 2 s", big, 2.0, args.seconds),
                (f"1,000 points, {args.pollers} pollers every 2 s", small, 2.0, args.seconds),
                (f"{args.points:,} points, {args.pollers} pollers back to back", big, None, 10.0)):
            url = f"http://127.0.0.1:{port}/trainings/{run_id}/progress"
            latencies: list[float] = []
            errors: list[str] = []
            threads = [threading.Thread(target=poll, args=(url, seconds, interval, latencies, errors, cookie))
                       for _ in range(args.pollers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rate = len(latencies) / seconds
            print(f"{label:<45} {percentiles(latencies)}  {rate:5.1f} req/s  errors {len(errors)}")
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
