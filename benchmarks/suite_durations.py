"""How long each test file takes: a pytest plugin that writes per-file totals, and a table of two runs.

Record a run (setup, call and teardown of every test, summed per file; session fixtures such as
the PostgreSQL cluster or the tiny models count in the file whose test first asks for them):

    PYTHONPATH=benchmarks python -m pytest -p suite_durations --suite-durations=before-sqlite.json
    TEST_DATABASE=postgresql PYTHONPATH=benchmarks python -m pytest -m db -p suite_durations \\
        --suite-durations=after-postgresql.json

Compare runs (each argument is LABEL=FILE.json; a file missing from a run shows as "-"):

    python benchmarks/suite_durations.py "before=before-sqlite.json" "after=after-sqlite.json"
"""
from __future__ import annotations

import collections
import json
import resource
import sys
import time
from pathlib import Path

import pytest


def pytest_addoption(parser):
    parser.addoption("--suite-durations", default=None, help="write per-file test durations (JSON) to this path")


def pytest_configure(config):
    path = config.getoption("--suite-durations")
    if path:
        config.pluginmanager.register(_Recorder(Path(path)), "suite-durations-recorder")


class _Recorder:
    def __init__(self, path: Path):
        self.path = path
        self.started = time.monotonic()
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.tests: dict[str, set] = collections.defaultdict(set)
        self.outcomes: collections.Counter = collections.Counter()
        self.cpu: dict[str, float] = collections.defaultdict(float)

    @staticmethod
    def cpu_seconds() -> float:
        """CPU time of this process and of the children it has waited for (workers, Redis, Chromium's
        driver): unlike wall-clock time it hardly changes when other work shares the machine. A
        PostgreSQL server, started as a daemon, is not in it."""
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        before = self.cpu_seconds()
        yield
        self.cpu[item.nodeid.split("::")[0]] += self.cpu_seconds() - before

    def pytest_runtest_logreport(self, report):
        file = report.nodeid.split("::")[0]
        self.seconds[file] += report.duration
        self.tests[file].add(report.nodeid)
        if report.when == "call" or report.outcome != "passed":
            self.outcomes[report.outcome] += 1
        if report.when == "teardown":  # written as it goes: a run stopped half-way still says what it measured
            self.write(None)

    def pytest_sessionfinish(self, session, exitstatus):
        self.write(int(exitstatus))

    def write(self, exitstatus):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({
            "wall_s": round(time.monotonic() - self.started, 1), "exitstatus": exitstatus,
            "outcomes": dict(self.outcomes),
            "cpu_s": round(self.cpu_seconds(), 1),
            "files": {f: {"seconds": round(s, 2), "cpu_s": round(self.cpu[f], 2), "tests": len(self.tests[f])}
                      for f, s in sorted(self.seconds.items())},
        }, indent=1))


def table(runs: list[tuple[str, dict]]) -> str:
    files = sorted({f for _, run in runs for f in run["files"]})
    head = "| file | " + " | ".join(f"{label} (s) | tests" for label, _ in runs) + " |"
    rule = "|---|" + "---:|---:|" * len(runs)
    rows = [head, rule]
    for f in files:
        cells = []
        for _, run in runs:
            entry = run["files"].get(f)
            cells += [f"{entry['seconds']:.1f}", str(entry["tests"])] if entry else ["-", "-"]
        rows.append(f"| {f} | " + " | ".join(cells) + " |")
    totals = []
    for _, run in runs:
        totals += [f"{sum(e['seconds'] for e in run['files'].values()):.1f}",
                   str(sum(e["tests"] for e in run["files"].values()))]
    rows.append("| **sum of tests** | " + " | ".join(totals) + " |")
    walls = []
    for _, run in runs:
        walls += [f"{run['wall_s']:.1f}", ""]
    rows.append("| **wall clock** | " + " | ".join(walls) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    pairs = [arg.split("=", 1) for arg in sys.argv[1:]]
    if not pairs:
        sys.exit(__doc__)
    print(table([(label, json.loads(Path(path).read_text())) for label, path in pairs]))
