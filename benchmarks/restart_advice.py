"""Does the early-stop "Restart with l1_alpha = …" land on the target when followed?

For each source, and for a penalty 10× and 100× weaker than the L0 model's value, this trains
the too-weak run under the app's runtime rules (the RuntimeMonitor, early stop on) until it
stops early (or ends), takes the suggestion the app would offer on the run's page (the verdict
of its held-out evaluation, computed by ``app.advice.suggest`` like every other suggestion),
trains that config from scratch as the "Restart with …" button opens it (steering on: the L0
controller moves l1_alpha after the warm-up until L0 holds the target) and, for comparison, with
steering off (the suggested value alone), and reports where each ends relative to the target.
It also checks that the form's validator does not warn about the suggested value.

Short runs (2,000 steps of 256, 1,024 latents or 4× d_in) so the whole script takes minutes on
a loaded CPU. Sources: the default synthetic (d_in 256), the hierarchical synthetic (d_in 256)
and a synthetic of another width (d_in 192, 6 active features, a source the L0 model never saw).

Usage: python benchmarks/restart_advice.py   Writes benchmarks/results/restart_advice.md.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.quality import RunProgress, RunSpec, RuntimeMonitor, verdict  # noqa: E402
from app.sae.control import L0Controller  # noqa: E402
from app.sae.sources import HierarchicalSource, SyntheticSource  # noqa: E402
from app.sae.trainer import TrainConfig, train  # noqa: E402
from app.validation import SourceStats, recommended_l1_alpha, validate_config  # noqa: E402

TARGET, STEPS, BATCH, WARMUP, CHECK_AT = 0.02, 2000, 256, 100, 500


def sources():
    yield "default synthetic (d_in 256)", SyntheticSource(256, 512, 5.0, 0)
    yield "hierarchical synthetic (d_in 256)", HierarchicalSource(256, 2048, 16.0, 0)
    yield "synthetic d_in 192, 6 active (held out)", SyntheticSource(192, 512, 6, seed=19)


def config(latent: int, alpha: float) -> TrainConfig:
    return TrainConfig(architecture="standard", latent_dim=latent, l1_alpha=alpha, target_l0=TARGET,
                       learning_rate=1e-3, batch_size=BATCH, total_steps=STEPS, lr_warmup_steps=WARMUP,
                       l1_warmup_steps=WARMUP, log_every=20, device="cpu", seed=0)


def form_cfg(latent: int, alpha: float) -> dict:
    return {"architecture": "standard", "latent_dim": latent, "target_l0": TARGET, "learning_rate": 1e-3,
            "batch_size": BATCH, "total_steps": STEPS, "lr_warmup_steps": WARMUP, "l1_warmup_steps": WARMUP,
            "k": None, "l1_alpha": alpha}


def main() -> None:
    torch.set_num_threads(1)
    rows, started = [], time.time()
    for name, src in sources():
        latent = 4 * src.d_in
        model = recommended_l1_alpha(src.d_in, latent, TARGET, STEPS, BATCH)
        for off in (10, 100):
            weak = model / off
            spec = RunSpec(architecture="standard", latent_dim=latent, target_l0=TARGET, warmup_steps=WARMUP,
                           l1_warmup_steps=WARMUP, early_stop=True, early_stop_step=CHECK_AT, d_in=src.d_in,
                           total_steps=STEPS, batch_size=BATCH)
            monitor = RuntimeMonitor(spec)

            def on_log(point, monitor=monitor):
                monitor.observe(point)
                return monitor.stop.message if monitor.stop else None

            first, _ = train(src, config(latent, weak), on_log=on_log)
            stopped = monitor.stop is not None
            v = verdict({k: v for k, v in first.eval.items() if k != "frequencies"}, architecture="standard",
                        latent_dim=latent, target_l0=TARGET, l1_alpha=weak,
                        progress=RunProgress(first.steps, STEPS, WARMUP, src.d_in, BATCH))
            restart = float(f"{v['suggested_l1_alpha']:.3g}")  # as the "Restart with" link carries it
            warned = [f.message for f in validate_config(form_cfg(latent, restart), SourceStats(src.d_in, None))
                      if f.field == "l1_alpha" and f.level != "info"]
            steered, _ = train(src, config(latent, restart),  # the button: steering on, as the app trains it
                               l1_alpha_control=L0Controller(target=TARGET, alpha=restart, start_step=WARMUP))
            alone, _ = train(src, config(latent, restart))  # the suggested value alone
            l0, l0_alone = steered.eval["l0_fraction"], alone.eval["l0_fraction"]
            rows.append((name, off, weak, first.steps if stopped else None, first.eval["l0_fraction"], restart,
                         l0, l0 / TARGET, bool(warned), l0_alone / TARGET))
            print(rows[-1], f"{time.time() - started:.0f}s", flush=True)
    write(rows, time.time() - started)


def write(rows, seconds: float) -> None:
    lines = ["# Restart advice, followed", "",
             f"Target L0 {100 * TARGET:.0f}%, runs of {STEPS:,} steps × {BATCH} tokens, latent_dim 4× d_in, warm-ups "
             f"{WARMUP}, early-stop check at step {CHECK_AT} (20%). The too-weak run starts at the L0 model's value "
             "divided by 10 or 100; the restart is the app's suggestion on the stopped run's page (three figures, as "
             "the link carries it), trained from scratch as the button opens it (steering on) and, for comparison, "
             "with steering off. Held-out L0. `benchmarks/restart_advice.py`, "
             f"{seconds / 60:.1f} min on a 2-core CPU.", "",
             "| source | too weak by | l1_alpha | stopped at | L0 then | restart with | followed (steering on): L0 | "
             "× target | form warns | steering off: × target |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, off, weak, step, l0_first, restart, l0, ratio, warned, alone in rows:
        lines.append(f"| {name} | {off}× | {weak:.3g} | {f'{step:,}' if step else 'ran to the end'} | "
                     f"{100 * l0_first:.1f}% | {restart:.3g} | {100 * l0:.2f}% | {ratio:.2f}× | "
                     f"{'yes' if warned else 'no'} | {alone:.2f}× |")
    for label, index in (("followed, steering on", 7), ("the suggested value alone", 9)):
        worst = max(abs(math.log(r[index])) for r in rows)
        lines.append(f"\n{label}: worst landing {math.exp(worst):.2f}× from the target (either way); median "
                     f"{sorted(r[index] for r in rows)[len(rows) // 2]:.2f}×.")
    lines.append("")
    out = ROOT / "benchmarks" / "results" / "restart_advice.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
