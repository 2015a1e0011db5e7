"""A run's charted series, bounded in size whatever the run's length, extremes kept.

The worker feeds every logged point to a ``ChartSeries``; it keeps at most ``max_buckets``
buckets of consecutive points, each remembering, per charted metric, its minimum and its
maximum and the steps where they fell. When the buckets run out, neighbours merge in pairs,
so a bucket's width doubles and the total stays bounded (at most ``2 · max_buckets`` points
per line when drawn). The state is plain JSON: it is stored on the run's row at each metric
flush, so the live page draws its charts from one row instead of reading every metric point,
and a spike in the loss survives any amount of thinning.
"""
from __future__ import annotations

import math

KEYS = ("l0_fraction", "loss", "mse", "l1_alpha", "fvu")


class ChartSeries:
    def __init__(self, max_buckets: int = 250, state: dict | None = None) -> None:
        self.max_buckets = max_buckets
        self.width = 1  # points per full bucket
        self.buckets: list[dict] = []
        if state:
            self.max_buckets, self.width, self.buckets = state["max_buckets"], state["width"], state["buckets"]

    def state(self) -> dict:
        return {"max_buckets": self.max_buckets, "width": self.width, "buckets": self.buckets}

    def add(self, point) -> None:
        values = {k: getattr(point, k) for k in KEYS}
        if self.buckets and self.buckets[-1]["n"] < self.width:
            bucket = self.buckets[-1]
            bucket["n"] += 1
            bucket["last"] = point.step
            for key, value in values.items():
                _extend(bucket[key], value, point.step)
        else:
            self.buckets.append({"n": 1, "first": point.step, "last": point.step,
                                 **{k: _extreme(v, point.step) for k, v in values.items()}})
        if len(self.buckets) > self.max_buckets:
            self._halve()

    def _halve(self) -> None:
        merged = []
        for i in range(0, len(self.buckets), 2):
            pair = self.buckets[i:i + 2]
            if len(pair) == 1:
                merged.append(pair[0])
                continue
            a, b = pair
            merged.append({"n": a["n"] + b["n"], "first": a["first"], "last": b["last"],
                           **{k: _merge(a[k], b[k]) for k in KEYS}})
        self.buckets = merged
        self.width *= 2

    def points(self, key: str) -> list[tuple[int, float]]:
        """The line to draw for ``key``: each bucket's minimum and maximum, in step order."""
        out: list[tuple[int, float]] = []
        for bucket in self.buckets:
            lo, lo_step, hi, hi_step = bucket[key]
            if lo is None:
                continue
            pair = sorted({(lo_step, lo), (hi_step, hi)})
            out.extend(pair)
        return out

    def __len__(self) -> int:
        return sum(b["n"] for b in self.buckets)


def _extreme(value, step: int) -> list:
    ok = value is not None and math.isfinite(value)
    return [value, step, value, step] if ok else [None, step, None, step]


def _extend(extreme: list, value, step: int) -> None:
    if value is None or not math.isfinite(value):
        return
    if extreme[0] is None or value < extreme[0]:
        extreme[0], extreme[1] = value, step
    if extreme[2] is None or value > extreme[2]:
        extreme[2], extreme[3] = value, step


def _merge(a: list, b: list) -> list:
    out = list(a)
    if b[0] is not None:
        _extend(out, b[0], b[1])
        _extend(out, b[2], b[3])
    return out


def from_points(points, max_buckets: int = 250) -> ChartSeries:
    """The series of stored points (for runs recorded before series were kept on the row)."""
    series = ChartSeries(max_buckets)
    for point in points:
        series.add(point)
    return series
