"""Fault drill: kill the worker at random moments, resume each time, compare with a clean run.

Starts its own Redis and a data folder in a temp dir. Trains one run straight through, then
the same config (same seed) while killing the whole worker with SIGKILL (work-horse first,
so nothing gets to save) at five random moments. After each kill a fresh worker's start-up
sweep marks the run ``interrupted`` once its heartbeat is stale, and the run is resumed
through the same call the Resume button makes. Prints, per kill: the step reached, the
checkpoint it resumed from and the steps lost; then metric rows duplicated, and the final
held-out L0 and FVU beside the uninterrupted run's.

Usage: ``python benchmarks/fault_drill.py [--kills 5] [--steps 3000] [--checkpoint-every 200]``
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="sae-drill-"))
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--dir", str(tmp)], stdout=subprocess.DEVNULL)
    os.environ.update({"DATA_DIR": str(tmp / "data"), "REDIS_URL": f"redis://127.0.0.1:{port}/0",
                       "QUEUE_NAME": "drill", "SAE_DEVICE": "cpu", "FEATURES_AFTER_TRAINING": "0",
                       "HEARTBEAT_S": "0.5", "HEARTBEAT_STALE_S": "3", "SWEEP_INTERVAL_S": "0.5"})
    time.sleep(0.5)
    from app import create_app
    from app.models import MetricPoint, Training
    from app.training_config import defaults
    from app.work.training import checkpoint_step, create_training, resume_training

    app = create_app()
    settings = app.config
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = {**defaults(), "name": "", "source_id": 1, "total_steps": args.steps, "latent_dim": 1024,
              "batch_size": 512, "log_every": 20, "checkpoint_every_steps": args.checkpoint_every}

    def worker(burst: bool = False) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(ROOT / "worker.py")] + (["--burst"] if burst else []), cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    try:
        with app.app_context():
            clean = create_training(config, settings)
            started = time.monotonic()
            worker(burst=True).wait()
            clean = Training.get_by_id(clean.id)
            print(f"uninterrupted run: {clean.status} in {time.monotonic() - started:.0f} s")
            drilled = create_training(config, settings)
            kills = []
            for _ in range(args.kills):
                proc = worker()
                target = Training.get_by_id(drilled.id).step + rng.randint(args.checkpoint_every // 2,
                                                                            3 * args.checkpoint_every)
                wait(lambda: Training.get_by_id(drilled.id).step >= min(target, args.steps - 100), 300, "progress")
                horse = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "worker.py"], capture_output=True,
                                       text=True).stdout.split()
                for pid in horse:
                    os.kill(int(pid), signal.SIGKILL)
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                reached = Training.get_by_id(drilled.id).step
                time.sleep(3.5)  # the heartbeat goes stale
                worker(burst=True).wait()  # a fresh worker's start-up sweep; nothing is queued yet
                run = Training.get_by_id(drilled.id)
                assert run.status == "interrupted", (run.status, run.reason)
                saved = checkpoint_step(run, settings) or 0
                kills.append((reached, saved))
                resume_training(run, settings)
            worker(burst=True).wait()
            drilled = Training.get_by_id(drilled.id)
            rows = MetricPoint.select().where(MetricPoint.training == drilled.id).count()
            steps = {p.step for p in MetricPoint.select(MetricPoint.step).where(MetricPoint.training == drilled.id)}
            clean_series = [(p.step, p.loss, p.l0, p.fvu) for p in clean.metrics.order_by(MetricPoint.step)]
            drilled_series = [(p.step, p.loss, p.l0, p.fvu) for p in drilled.metrics.order_by(MetricPoint.step)]
        print(f"drilled run: {drilled.status}, {args.kills} kills (SIGKILL of worker and work-horse), "
              f"checkpoint every {args.checkpoint_every} steps")
        print(f"{'kill':>4} {'step reached':>13} {'resumed from':>13} {'steps lost':>11}")
        for i, (reached, saved) in enumerate(kills, 1):
            print(f"{i:>4} {reached:>13,} {saved:>13,} {reached - saved:>11,}")
        print(f"most steps lost in one kill: {max(r - s for r, s in kills):,} (interval {args.checkpoint_every}; "
              f"metric rows are written every 20 steps)")
        print(f"metric rows: {rows:,}, distinct steps: {len(steps):,}, duplicated: {rows - len(steps)}; "
              f"series identical to the uninterrupted run: {drilled_series == clean_series}")
        for key in ("l0", "l0_fraction", "fvu"):
            print(f"held-out {key}: uninterrupted {clean.summary[key]:.6g}, drilled {drilled.summary[key]:.6g}")
        return 0
    finally:
        redis.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
