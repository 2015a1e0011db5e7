"""Server-rendered SVG charts: small, dependency-free, readable without JavaScript."""
from __future__ import annotations

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

from .quality import GREEN_BELOW, RED_ABOVE


@dataclass
class Series:
    label: str
    points: list[tuple[float, float]]
    color: str
    dashed: bool = False


def _ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float, log: bool) -> str:
    if log:
        return f"1e{int(round(v))}"
    if v == 0:
        return "0"
    return f"{v:.3g}" if abs(v) >= 1e-3 else f"{v:.0e}"


def line_chart(title: str, series: list[Series], *, width: int = 460, height: int = 220,
               log_y: bool = False, y_min: float | None = None, y_max: float | None = None,
               bands: list[tuple[float, float, str]] | None = None, y_percent: bool = False,
               x_max: float | None = None, legend: bool = True, x_label: str = "step") -> Markup:
    """An SVG line chart of ``series`` over steps. ``bands`` shade y-ranges (lo, hi, color)."""
    # The legend gets a row of its own under the title, so long labels never cover it.
    left, right, top, bottom = 56, 12, (40 if legend else 26), 30
    pw, ph = width - left - right, height - top - bottom
    pts = [(x, y) for s in series for x, y in s.points if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{escape(title)}">',
             f'<text x="{left}" y="16" class="chart-title">{escape(title)}</text>']
    if not pts:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" class="chart-empty">'
                     'waiting for the first metrics…</text></svg>')
        return Markup("".join(parts))
    tf = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [p[0] for p in pts]
    ys = [tf(p[1]) for p in pts]
    x0, x1 = min(xs + ([0] if x_max is not None or min(xs) >= 0 else [])), max(xs + [x_max if x_max is not None else max(xs)])
    if x1 == x0:
        x1 = x0 + 1
    lo = tf(y_min) if y_min is not None else min(ys)
    hi = tf(y_max) if y_max is not None else max(ys)
    if y_max is None and hi < max(ys):
        hi = max(ys)
    if hi <= lo:
        hi = lo + (1 if log_y else max(abs(lo) * 0.1, 1e-9))
    if log_y:
        lo, hi = math.floor(lo), math.ceil(hi)
    else:
        hi += (hi - lo) * 0.05

    def sx(x):
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y):
        return top + ph - (min(max(y, lo), hi) - lo) / (hi - lo) * ph

    for band in bands or []:
        b_lo, b_hi, color = band[:3]
        y_a, y_b = sy(tf(min(b_hi, 10 ** hi if log_y else hi))), sy(tf(max(b_lo, 1e-300) if log_y else b_lo))
        parts.append(f'<rect x="{left}" y="{y_a:.1f}" width="{pw}" height="{max(y_b - y_a, 0):.1f}" '
                     f'fill="{color}" opacity="0.12"/>')
        if len(band) > 3 and y_b - y_a > 10:  # a label inside the band, at its top right
            parts.append(f'<text x="{left + pw - 4}" y="{y_a + 11:.1f}" text-anchor="end" class="tick band-label" '
                         f'fill="{color}">{escape(band[3])}</text>')
    y_ticks = list(range(int(lo), int(hi) + 1)) if log_y else _ticks(lo, hi)
    for t in y_ticks:
        label = (f"{100 * 10 ** t:g}%" if log_y else f"{t * 100:.3g}%") if y_percent else _fmt(t, log_y)
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{label}</text>')
    for t in _ticks(x0, x1):
        anchor = "end" if sx(t) > left + pw - 20 else "middle"
        label = f"{int(t):,}" if float(t).is_integer() else f"{t:g}"
        parts.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" text-anchor="{anchor}" class="tick">{label}</text>')
    parts.append(f'<text x="{left + pw}" y="{height - 2}" text-anchor="end" class="tick">{escape(x_label)}</text>')
    legend_x = left + pw
    for s in reversed(series):
        legend_x -= 7 * len(s.label) + 30
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        if legend:
            parts.append(f'<line x1="{legend_x}" x2="{legend_x + 14}" y1="27" y2="27" stroke="{s.color}" '
                         f'stroke-width="2.5"{dash}/>'
                         f'<text x="{legend_x + 18}" y="31" class="tick">{escape(s.label)}</text>')
        good = [(x, tf(y)) for x, y in s.points if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
        if not good:
            continue
        if len(good) == 1:
            x, y = good[0]
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}"/>')
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{sx(x):.1f},{sy(y):.1f}" for i, (x, y) in enumerate(good))
        parts.append(f'<path d="{d}" fill="none" stroke="{s.color}" stroke-width="2"{dash}/>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/></svg>')
    return Markup("".join(parts))


GRADE_BANDS = [(0, GREEN_BELOW, "#16a34a", f"sparse < {100 * GREEN_BELOW:g}%"),
               (GREEN_BELOW, RED_ABOVE, "#ca8a04", "borderline"),
               (RED_ABOVE, 1.0, "#dc2626", f"dense > {100 * RED_ABOVE:g}%")]


def l0_chart(series, target_l0: float, total_steps: int) -> Markup:
    """L0 fraction over steps (a ``ChartSeries``), with the target and the grade bands.

    The axis is logarithmic: a run falls from 50% to 2% in its first steps, and on a linear
    axis the final L0 and its target would sit on top of each other at the bottom. The
    legend gives the latest L0 and the target as numbers.
    """
    pts = series.points("l0_fraction")
    positive = [y for _, y in pts if y and y > 0]
    low = min(positive + [target_l0]) / 2
    target = Series(f"target {100 * target_l0:.3g}%", [(0, target_l0), (max(total_steps, 1), target_l0)], "#555",
                    dashed=True)
    now = f"L0 (now {100 * positive[-1]:.3g}%)" if positive and pts[-1][1] == positive[-1] else "L0"
    return line_chart("L0 fraction (share of latents active), log scale", [Series(now, pts, "#2563eb"), target],
                      log_y=True, y_min=low, y_max=1.0, y_percent=True, bands=GRADE_BANDS, x_max=total_steps)


def loss_chart(series, total_steps: int) -> Markup:
    """Total loss and its reconstruction term over steps, log scale."""
    return line_chart("Loss (log scale)", [
        Series("loss", series.points("loss"), "#7c3aed"),
        Series("MSE term", series.points("mse"), "#0891b2", dashed=True),
    ], log_y=True, x_max=total_steps)


def l1_alpha_chart(series, total_steps: int) -> Markup:
    """The sparsity penalty in force at each log point (it moves when steering is on)."""
    return line_chart("l1_alpha (sparsity penalty), log scale",
                      [Series("l1_alpha", series.points("l1_alpha"), "#db2777")],
                      log_y=True, x_max=total_steps)


def histogram_chart(hist: dict, *, width: int = 460, height: int = 200,
                    title: str = "Latent density on held-out tokens") -> Markup:
    """Bars of latents per log10 firing-frequency bin; the never-fired count is noted apart."""
    left, right, top, bottom = 44, 12, 26, 32
    pw, ph = width - left - right, height - top - bottom
    counts = hist["counts"]
    peak = max(counts + [1])
    bar_w = pw / len(counts)
    title = f"{title} (never fired: {hist['never_fired']:,})"
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}"><text x="{left}" y="16" class="chart-title">{escape(title)}</text>']
    for i, c in enumerate(counts):
        h = ph * c / peak
        lo = hist["low"] + i * hist["width"]
        color = "#dc2626" if lo >= -1 else "#2563eb"  # above 10% of tokens: dense
        parts.append(f'<rect x="{left + i * bar_w + 1:.1f}" y="{top + ph - h:.1f}" width="{bar_w - 2:.1f}" '
                     f'height="{h:.1f}" fill="{color}"><title>10^{lo:g}–10^{lo + hist["width"]:g}: {c:,} latents'
                     f'</title></rect>')
    for exp in range(int(hist["low"]), 1):
        x = left + (exp - hist["low"]) / (len(counts) * hist["width"]) * pw
        parts.append(f'<text x="{x:.1f}" y="{top + ph + 14}" text-anchor="middle" class="tick">1e{exp}</text>')
    parts.append(f'<text x="{left + pw}" y="{height - 2}" text-anchor="end" class="tick">firing frequency (log10)</text>')
    parts.append(f'<text x="{left - 6}" y="{top + 8}" text-anchor="end" class="tick">{peak:,}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/></svg>')
    return Markup("".join(parts))


# Colours that tell runs apart. None is the green, yellow or red of a grade, so that a run's
# colour is never read as its quality (the grade is shown beside it, as a badge).
PALETTE = ["#2563eb", "#7c3aed", "#0891b2", "#334155", "#c026d3", "#4338ca", "#0f766e", "#78716c"]


def scatter_chart(title: str, points: list[tuple[float, float, str, str | None]], *, width: int = 560,
                  height: int = 300, y_label: str = "FVU") -> Markup:
    """L0 fraction (log x) against ``y_label`` (FVU by default).

    ``points`` are (x, y, label, colour): a run drawn in its colour is one being compared
    (labelled); ``None`` draws it grey, for context.
    """
    left, right, top, bottom = 52, 16, 26, 34
    pw, ph = width - left - right, height - top - bottom
    good = [(x, y, lab, hi) for x, y, lab, hi in points if x and x > 0 and y is not None and math.isfinite(y)]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(title)}"><text x="{left}" y="16" class="chart-title">{escape(title)}</text>']
    if not good:
        parts.append(f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" class="chart-empty">'
                     'no completed runs yet</text></svg>')
        return Markup("".join(parts))
    lx = [math.log10(x) for x, *_ in good]
    x_lo, x_hi = math.floor(min(lx + [math.log10(GREEN_BELOW)])), math.ceil(max(lx + [-0.5]))
    y_hi = max(max(y for _, y, *_ in good) * 1.1, 0.05)
    y_lo = min(0.0, min(y for _, y, *_ in good) * 1.1)

    def sx(v):
        return left + (math.log10(v) - x_lo) / (x_hi - x_lo) * pw

    def sy(v):
        return top + ph - (v - y_lo) / (y_hi - y_lo) * ph

    for edge, color, text, anchor, shift in ((GREEN_BELOW, "#16a34a", f"sparse < {100 * GREEN_BELOW:g}%", "end", -4),
                                             (RED_ABOVE, "#dc2626", f"dense > {100 * RED_ABOVE:g}%", "start", 4)):
        parts.append(f'<line x1="{sx(edge):.1f}" x2="{sx(edge):.1f}" y1="{top}" y2="{top + ph}" stroke="{color}" '
                     f'stroke-dasharray="4 3"/><text x="{sx(edge) + shift:.1f}" y="{top + 11}" text-anchor="{anchor}" '
                     f'class="tick band-label" fill="{color}">{escape(text)}</text>')
    for e in range(x_lo, x_hi + 1):
        parts.append(f'<text x="{sx(10 ** e):.1f}" y="{top + ph + 14}" text-anchor="middle" class="tick">'
                     f'{100 * 10 ** e:g}%</text>')
    for t in _ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{sy(t) + 4:.1f}" text-anchor="end" class="tick">{t:.3g}</text>')
    parts.append(f'<text x="{left + pw}" y="{height - 2}" text-anchor="end" class="tick">L0 fraction (log)</text>'
                 f'<text x="{left - 40}" y="{top - 6}" class="tick">{escape(y_label)}</text>')
    for x, y, label, run_color in sorted(good, key=lambda p: p[3] is not None):
        highlighted = run_color is not None
        color = run_color or "#94a3b8"
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{5 if highlighted else 4}" fill="{color}" '
                     f'opacity="0.85"><title>{escape(label)}: L0 {100 * x:.2f}%, {escape(y_label)} {y:.3f}</title></circle>')
        if highlighted:
            parts.append(f'<text x="{sx(x) + 7:.1f}" y="{sy(y) - 6:.1f}" class="tick">{escape(label)}</text>')
    parts.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/></svg>')
    return Markup("".join(parts))


def overlay_chart(title: str, runs: list[tuple[str, list[tuple[float, float]]]], *, log_y: bool = False,
                  y_percent: bool = False, bands=None, y_min: float | None = None, y_max: float | None = None) -> Markup:
    """One line per run, colours from the palette in the order given."""
    series = [Series(label, pts, PALETTE[i % len(PALETTE)]) for i, (label, pts) in enumerate(runs)]
    return line_chart(title, series, log_y=log_y, y_min=y_min if log_y else 0, y_max=y_max, y_percent=y_percent,
                      legend=False, bands=bands)
