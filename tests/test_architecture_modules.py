"""Each architecture is declared in one module: its name appears nowhere else in app/ or templates/.

A string constant equal to a registry name (or holding one in quotes, as a template string or an
error message built by hand would) outside ``app/sae/architectures/<name>.py`` fails, and so does
a quoted name in a template. Tests are exempt. The registry is read, not listed, so a new module
is covered the day it is added.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from markupsafe import escape

from app.sae import architectures
from app.training_config import BY_NAME

ROOT = Path(__file__).resolve().parent.parent
NAMES = architectures.names()

# What may name an architecture outside its module, and why.
ALLOWED = {
    # Migrations are frozen: each carries the literal data it wrote (a preset's architecture, the
    # standard presets it refreshed), so a later edit of an architecture's module cannot change
    # what an old migration did.
    "app/db.py": set(NAMES),
    "app/migration_rows.py": set(NAMES),  # the rows those migrations write, as data
}


def _constants(path: Path):
    """(line, value) of every string constant in a Python file, f-strings' literal parts included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


def _named(value: str) -> set[str]:
    found = {value} & set(NAMES)
    for name in NAMES:
        if re.search(rf"""(['"]){re.escape(name)}\1""", value):
            found.add(name)
    return found


def _offences() -> list[str]:
    out = []
    for path in sorted((ROOT / "app").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        own = path.stem if path.parent == ROOT / "app" / "sae" / "architectures" else None
        for line, value in _constants(path):
            for name in _named(value) - {own} - ALLOWED.get(rel, set()):
                out.append(f"{rel}:{line}: {name!r}")
    quoted = re.compile(r"""(['"])(%s)\1""" % "|".join(map(re.escape, NAMES)))
    for path in sorted((ROOT / "templates").rglob("*.html")):
        rel = path.relative_to(ROOT).as_posix()
        for number, text in enumerate(path.read_text().splitlines(), start=1):
            for match in quoted.finditer(text):
                if match.group(2) not in ALLOWED.get(rel, set()):
                    out.append(f"{rel}:{number}: {match.group(2)!r}")
    return out


def test_every_architecture_is_named_only_in_its_own_module():
    assert len(NAMES) >= 6
    assert _offences() == []


def test_the_check_catches_a_name_outside_its_module(tmp_path):
    """The scanner itself: a constant, a quoted name inside a message, and a template comparison."""
    name = NAMES[0]
    sample = tmp_path / "x.py"
    sample.write_text(f"A = {name!r}\nB = \"architecture '{name}' is\"\nC = '{name}_bandwidth'\n")
    assert [_named(v) for _, v in _constants(sample)] == [{name}, {name}, set()]


@pytest.mark.parametrize("arch", architectures.all(), ids=lambda a: a.name)
def test_each_module_declares_what_the_app_asks_of_it(arch):
    assert arch.label and arch.title and arch.sparsity_set_by in (architectures.PENALTY, architectures.K,
                                                                   architectures.TARGET)
    assert architectures.get(arch.name) is arch
    assert arch.name in {value for value, _ in architectures.choices()}
    assert arch.exports_as.saelens, "every architecture exports as one SAELens reads"
    from app import training_config

    for param in arch.params:  # its own settings are in the assembled list, needed by exactly those that use them
        assert training_config.BY_NAME[param.name].required_for == architectures.using(param.name)
        assert arch.name in architectures.using(param.name)
    for name in arch.shared:  # a setting it shares is one the assembled list has, needed by it too
        assert arch.name in training_config.BY_NAME[name].required_for
    assert arch.memory_bytes(64, 512, 256) > 0


@pytest.mark.parametrize("arch", architectures.all(), ids=lambda a: a.name)
def test_each_architecture_goes_through_the_api_and_its_pages(client, arch):
    """Queued through the API with only the settings it declares, and shown on the pages that list it."""
    from conftest import QUICK_CONFIG

    body = {**QUICK_CONFIG, "architecture": arch.name, "steer_l1_alpha": False,
            "l1_alpha": QUICK_CONFIG["l1_alpha"] if arch.uses("l1_alpha") else None,
            "k": QUICK_CONFIG["k"] if arch.uses("k") else None}
    if not arch.uses("l1_alpha"):  # the penalty's warm-up is not asked of an architecture without a penalty
        del body["l1_warmup_steps"]
    created = client.post("/api/trainings", json=body)
    assert created.status_code == 201, created.json
    detail = client.get(f"/trainings/{created.json['id']}")
    assert detail.status_code == 200
    from app.models import Training

    run = Training.get_by_id(created.json["id"])
    page = detail.get_data(as_text=True)
    for name, text in arch.describe(run).items():  # its own settings, in its own words, beside their labels
        assert f"<dt>{BY_NAME[name].label}</dt><dd>{escape(text)}</dd>" in page, (name, text)
    assert arch.summary(run.config_dict()) in client.get("/").get_data(as_text=True)
    hints = client.post("/trainings/hints", data={"architecture": arch.name, "latent_dim": "256", "target_l0": "0.02",
                                                   "k": "16", "l1_alpha": "0.003", "learning_rate": "0.001"})
    assert hints.status_code == 200 and 'id="arch-knob"' in hints.get_data(as_text=True)


def test_each_module_declares_exactly_the_presets_a_fresh_database_holds(app):
    """The migrations write presets as data (app/migration_rows.py, migration 20); each module still
    declares its own. They agree today, so a module whose presets change without a migration that
    writes them (or a migration that drifts from its module) fails here."""
    import math

    from app.models import PRESET_WIDTHS, Template, complete

    declared = {}
    for d_in in PRESET_WIDTHS:  # the widths and shared settings every architecture's presets start from
        latent, k = 8 * d_in, 32 if d_in <= 1024 else 64
        lr = 1e-3 if latent <= 16_384 else float(f"{1e-3 * math.sqrt(16_384 / latent):.2g}")
        common = {"latent_dim": latent, "learning_rate": lr, "batch_size": 4096, "total_steps": 30_000,
                  "lr_warmup_steps": 1000, "l1_warmup_steps": 1500, "target_l0": round(k / latent, 6),
                  "precision": "auto"}
        for arch in architectures.all():
            for title, settings, provenance in arch.presets(d_in, latent, k, common):
                config = complete({"architecture": arch.name, "l1_alpha": None, "k": None, **common, **settings})
                declared[f"d_in {d_in} · {title} · {latent:,} latents"] = (d_in, config, provenance)
    stored = {t.name: (t.d_in, t.config, t.provenance) for t in Template.select().where(Template.builtin == True)}  # noqa: E712
    assert len(stored) == len(declared) == len(PRESET_WIDTHS) * len(architectures.all())
    assert stored == declared
