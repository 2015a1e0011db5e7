"""Fit the L0 model on the sweep's fit rows, score it on the held-out rows, write the results.

Called by ``calibrate_l1_alpha.py fit``. Writes ``app/calibration.json`` (the coefficients,
the held-out error per source, the band the validator draws around a prediction),
``benchmarks/results/l1_alpha_heldout.md`` (the error table and the validator's hit and
false-alarm counts on the held-out configs) and ``benchmarks/results/l1_alpha_curve.svg``.
"""
from __future__ import annotations

import importlib
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
NAMES = ("a", "b", "c", "e", "g", "k", "m0", "h")
FLOOR = 1e-4  # below this L0 a run is dead, not sparse: no point in fitting its logarithm
COLLAPSED_FVU = 0.9  # a run that reconstructs (almost) nothing has collapsed: its L0 is noise


def usable(r: dict) -> bool:
    return r["l0_fraction"] > FLOOR and r["fvu"] <= COLLAPSED_FVU


def model_log_l0(p, rows) -> np.ndarray:
    a, b, c, e, g, k, m0, h = p
    x = np.array([[math.log(r["l1_alpha"]), math.log(r["d_in"]), math.log(r["latent_dim"] / r["d_in"]),
                   math.log(r["steps"]), math.log(r["batch_size"])] for r in rows])
    z = a + b * x[:, 0] + c * x[:, 1] + e * x[:, 2] + g * x[:, 3] + k * x[:, 4]
    return m0 + h * x[:, 2] - np.logaddexp(0.0, -z)


def fit(rows: list[dict]) -> dict:
    rows = [r for r in rows if usable(r)]
    y = np.log([r["l0_fraction"] for r in rows])
    starts = ([-6.0, -1.0, 0.0, 0.0, -0.3, 0.0, math.log(0.6), -0.1], [-3.0, -0.8, 0.2, -0.2, -0.5, -0.5, -0.5, -0.1],
              [4.0, -1.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0])  # least squares on logs; the best of a few starts
    solved = min((least_squares(lambda p: model_log_l0(p, rows) - y, np.array(s)) for s in starts),
                 key=lambda s: s.cost)
    coef = dict(zip(NAMES, map(float, solved.x)))
    residual = model_log_l0(solved.x, rows) - y
    return {"model": coef, "fit_rms_log": float(np.sqrt(np.mean(residual ** 2))), "runs_fitted": len(rows)}


def errors(coef: dict, rows: list[dict]) -> dict:
    """RMS and mean of ln(predicted / measured) per source."""
    p = [coef[n] for n in NAMES]
    out = {}
    by = defaultdict(list)
    for r in rows:
        if usable(r):
            by[r["source"]].append(r)
    for name, group in sorted(by.items()):
        d = model_log_l0(p, group) - np.log([r["l0_fraction"] for r in group])
        out[name] = {"runs": len(group), "rms_log": float(np.sqrt(np.mean(d ** 2))), "bias_log": float(np.mean(d))}
    return out


def coverage(rows: list[dict]) -> tuple[int, int]:
    """How many usable runs measured an L0 inside the range the validator shows for them."""
    from app import l0_model

    inside = total = 0
    for r in filter(usable, rows):
        low, _, high = l0_model.predict_range(r["l1_alpha"], r["d_in"], r["latent_dim"], r["steps"], r["batch_size"])
        total += 1
        inside += low <= r["l0_fraction"] <= high * (1 + 1e-9)
    return inside, total


def validator_score(rows: list[dict]) -> dict:
    """Which held-out configs the validator warns about, against what they measured."""
    from app import validation

    counts = {"dense_runs": 0, "dense_warned": 0, "sparse_runs": 0, "sparse_warned": 0, "missed": [], "false": []}
    for r in rows:
        cfg = {"architecture": "standard", "latent_dim": r["latent_dim"], "total_steps": r["steps"],
               "batch_size": r["batch_size"], "target_l0": 0.02, "learning_rate": 1e-3, "l1_alpha": r["l1_alpha"],
               "k": None, "lr_warmup_steps": max(10, r["steps"] // 20), "l1_warmup_steps": max(10, r["steps"] // 20),
               "steer_l1_alpha": False}
        findings = validation.validate_config(cfg, validation.SourceStats(r["d_in"], None, r["source"]))
        warned = any(f.level == "warning" and f.field == "l1_alpha" for f in findings)  # any of its warnings
        label = f"{r['source']}, {r['latent_dim']} latents, {r['steps']} steps, l1_alpha {r['l1_alpha']:g}: " \
                f"L0 {100 * r['l0_fraction']:.1f}%"
        if r["l0_fraction"] > 0.15:
            counts["dense_runs"] += 1
            counts["dense_warned"] += warned
            if not warned:
                counts["missed"].append(label)
        elif r["l0_fraction"] < 0.05:
            counts["sparse_runs"] += 1
            counts["sparse_warned"] += warned
            if warned:
                counts["false"].append(label)
    return counts


def report(fit_rows: list[dict], held_rows: list[dict]) -> None:
    result = fit(fit_rows)
    result["fit_error"] = errors(result["model"], fit_rows)
    result["heldout_error"] = errors(result["model"], held_rows) if held_rows else {}
    worst = max([v["rms_log"] for v in result["heldout_error"].values()] or [result["fit_rms_log"]])
    result["band_log"] = max(worst, result["fit_rms_log"])
    result["steps_range"] = [min(r["steps"] for r in fit_rows), max(r["steps"] for r in fit_rows)]
    result["batch_range"] = [min(r["batch_size"] for r in fit_rows), max(r["batch_size"] for r in fit_rows)]
    result["provenance"] = (f"fitted on {result['runs_fitted']} runs (batch {fit_rows[0]['batch_size']}, "
                            f"{min(r['steps'] for r in fit_rows)}–{max(r['steps'] for r in fit_rows)} steps, "
                            f"l1_alpha {min(r['l1_alpha'] for r in fit_rows):g}–{max(r['l1_alpha'] for r in fit_rows):g}"
                            f"): " + "; ".join(sorted({r['source'] for r in fit_rows})))
    path = ROOT / "app" / "calibration.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    import app.l0_model
    import app.validation

    importlib.reload(app.l0_model)
    importlib.reload(app.validation)
    score = validator_score(held_rows)
    (held_in, held_n), (fit_in, fit_n) = coverage(held_rows), coverage(fit_rows)
    lines = ["# The L0 model: held-out error and the validator's warnings", "",
             f"Fitted on {result['runs_fitted']} runs; coefficients in `app/calibration.json`.", "",
             "| source | role | runs | RMS error (×) | bias (×) |", "| --- | --- | ---: | ---: | ---: |"]
    for role, table in (("fit", result["fit_error"]), ("held out", result["heldout_error"])):
        for name, v in table.items():
            lines.append(f"| {name} | {role} | {v['runs']} | {math.exp(v['rms_log']):.2f} | {math.exp(v['bias_log']):.2f} |")
    lines += ["", f"Band drawn around a prediction: ×/÷ {math.exp(result['band_log']):.2f} (the worst source's RMS error). "
              f"The measured L0 lay inside the range shown for {held_in} of {held_n} held-out runs and {fit_in} of "
              f"{fit_n} fitted ones.",
              "", f"Validator on {len(held_rows)} held-out configs (target 2%, fixed l1_alpha):", "",
              f"- measured L0 above 15%: {score['dense_runs']} configs, warned for {score['dense_warned']}",
              f"- measured L0 below 5%: {score['sparse_runs']} configs, warned (falsely) for {score['sparse_warned']}"]
    lines += [f"  - missed: {m}" for m in score["missed"]] + [f"  - false warning: {m}" for m in score["false"]]
    (RESULTS / "l1_alpha_heldout.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    chart(fit_rows + held_rows)


def chart(rows: list[dict]) -> None:
    from app import l0_model
    from app.charts import PALETTE, Series, line_chart

    series = []
    rows = [r for r in rows if r["batch_size"] == 256]  # the batch every source was swept at
    keys = sorted({(r["source"], r["latent_dim"], r["steps"]) for r in rows})
    longest = {}
    for source, latent, steps in keys:  # one line per source: its narrowest width at its longest run
        best = longest.get(source)
        if best is None or (latent, -steps) < (best[0], -best[1]):
            longest[source] = (latent, steps)
    for i, (source, (latent, steps)) in enumerate(sorted(longest.items())):
        pts = sorted((math.log10(r["l1_alpha"]), max(r["l0_fraction"], FLOOR)) for r in rows
                     if (r["source"], r["latent_dim"], r["steps"]) == (source, latent, steps))
        d_in = next(r["d_in"] for r in rows if r["source"] == source)
        colour = PALETTE[i % len(PALETTE)]
        series.append(Series(f"{source.split(',')[0]} {latent // d_in}x {steps}", pts, colour))
        model = [(x, l0_model.predict(10 ** x, d_in, latent, steps, 256)) for x in np.linspace(-4.7, -1, 30)]
        series.append(Series("  model", model, colour))
    svg = str(line_chart("L0 fraction against l1_alpha: measured and the model (log-log)", series, log_y=True,
                         width=1000, height=420, x_label="log10 l1_alpha"))
    style = ("<style>.grid{stroke:#eef2f7}.frame{fill:none;stroke:#d1d5db}.tick{font-size:11px;fill:#4b5563}"
             ".chart-title{font-size:13px;font-weight:600;fill:#111827}</style>")
    svg = svg.replace("<svg ", '<svg style="background:#fff;font-family:sans-serif" ', 1).replace(">", ">" + style, 1)
    (RESULTS / "l1_alpha_curve.svg").write_text(svg)
