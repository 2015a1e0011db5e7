"""The layers keep to their places (docs/design.md, "Layers"), checked on the source with ``ast``:

- the web (``app/views``) parses, calls a service and renders: it imports nothing that writes
  files or runs work (numpy, shutil, tempfile, subprocess, torch; the worker's own modules;
  the core's writers) and writes no file or record itself;
- ``app/work/lifecycle.py`` knows no kind of work: it imports no job module and no job model,
  and names none, so a new kind registers itself instead of being added there.
"""
from __future__ import annotations

import ast
from pathlib import Path

APP = Path(__file__).resolve().parents[1] / "app"

# what writes files, or runs work, and so has no place in a view
FILE_WRITING = {"numpy", "shutil", "tempfile", "subprocess", "uuid", "torch", "safetensors",
                "app.sae.trainer", "app.sae.pt_convert", "app.extraction.store", "app.extraction.capture",
                "app.work.worker", "app.work.maintenance", "app.work.janitor"}
# what a view may not call: file writes, and record writes (services do those)
WRITING_CALLS = {"write_bytes", "write_text", "mkdir", "unlink", "rmtree", "rename", "create", "insert",
                 "insert_many", "delete_instance", "save", "atomic"}
SERVICES = {"deletion", "exports", "sources", "templates", "janitor", "maintenance", "worker", "finder"}


def registered_kinds():
    from app.work import lifecycle

    return list(lifecycle.KINDS.values())


# every kind of work the lifecycle has registered (so a new kind is covered without editing this
# file), its module, its model and its label, and the services beside them
JOB_MODULES = {kind.function.split(".")[2] for kind in registered_kinds()} | SERVICES
JOB_NAMES = {name for kind in registered_kinds() for name in (kind.model.__name__, kind.label)}


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to ``app.…`` names."""
    package = ".".join(path.relative_to(APP.parent).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # ``from . import x`` names a module
    return found


def top(name: str) -> set[str]:
    """A module name and each package above it (``app.sae.trainer`` → app, app.sae, app.sae.trainer)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def test_the_views_import_nothing_that_writes_files_or_runs_work():
    views = sorted((APP / "views").glob("*.py"))
    assert len(views) > 5
    for path in views:
        bad = {name for name in imports(path) if top(name) & FILE_WRITING}
        assert not bad, f"{path.name} imports {sorted(bad)}: move the work into app/work/ or a pure module"


def test_the_views_write_no_file_and_no_record_themselves():
    for path in sorted((APP / "views").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                assert node.func.attr not in WRITING_CALLS, (
                    f"{path.name}:{node.lineno} calls .{node.func.attr}(): a service in app/work/ does that")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id != "open", f"{path.name}:{node.lineno} opens a file"


def test_the_lifecycle_knows_no_kind_of_work():
    path = APP / "work" / "lifecycle.py"
    names = imports(path)
    kinds = {name for name in names if name.startswith("app.work.") and name.split(".")[2] in JOB_MODULES}
    assert not kinds, f"lifecycle.py imports {sorted(kinds)}"
    from_models = {name.split(".")[-1] for name in names if name.startswith("app.models.")}
    assert from_models <= {"Event", "JobRecord", "utcnow"}, f"lifecycle.py imports {sorted(from_models)}"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            assert node.value not in JOB_NAMES, f"lifecycle.py:{node.lineno} names the kind {node.value!r}"
        if isinstance(node, ast.Name):
            assert node.id not in JOB_NAMES, f"lifecycle.py:{node.lineno} names {node.id}"


def test_every_kind_of_work_is_registered_with_the_lifecycle():
    """Importing the lifecycle (as the worker and the web do) finds every job model registered, each
    with the job function the queue names."""
    from app.models import JobRecord
    from app.work import lifecycle

    assert set(lifecycle.job_models()) == set(JobRecord.__subclasses__())
    for function, kind in lifecycle.job_functions().items():
        module, name = function.rsplit(".", 1)
        assert callable(getattr(__import__(module, fromlist=[name]), name)) and kind.label
