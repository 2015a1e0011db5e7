"""The SAE architectures: one module each, found here by name.

Every module of this package whose name does not start with ``_`` defines ``ARCH``, an
instance of ``_base.Architecture`` that declares everything about its architecture (see
docs/design.md, "Architectures"). Code elsewhere asks the registry (``get(name)``, ``all()``)
and the declarations (``arch.by_penalty``, ``arch.uses("k")``), never an architecture's name.

Pure Python: the web process imports this without torch.
"""
from __future__ import annotations

import importlib
import pkgutil

from ._base import K, PENALTY, TARGET, Architecture

__all__ = ["Architecture", "K", "PENALTY", "TARGET", "all", "by_k", "by_penalty", "choices", "default", "get", "titles",
           "names"]

_REGISTRY: dict[str, Architecture] | None = None


def _load() -> dict[str, Architecture]:
    global _REGISTRY
    if _REGISTRY is None:
        found = []
        for info in pkgutil.iter_modules(__path__):
            if info.name.startswith("_"):
                continue
            module = importlib.import_module(f"{__name__}.{info.name}")
            found.append(module.ARCH)
        _REGISTRY = {arch.name: arch for arch in sorted(found, key=lambda a: (a.order, a.name))}
    return _REGISTRY


def all() -> tuple[Architecture, ...]:  # noqa: A001 - the registry's own word
    """Every architecture, in the form's order."""
    return tuple(_load().values())


def names() -> tuple[str, ...]:
    return tuple(_load())


def get(name: str | None) -> Architecture:
    """The architecture called ``name``; ``ValueError`` for an unknown one."""
    try:
        return _load()[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown architecture {name!r}; expected one of {names()}") from None


def find(name: str | None) -> Architecture | None:
    """The architecture called ``name``, or None."""
    return _load().get(name) if isinstance(name, str) else None


def choices() -> tuple[tuple[str, str], ...]:
    """(value, label) for the form's select."""
    return tuple((a.name, a.label) for a in all())


def default() -> Architecture:
    """The form's first choice."""
    return all()[0]


def by_penalty() -> tuple[str, ...]:
    return tuple(a.name for a in all() if a.by_penalty)


def by_k() -> tuple[str, ...]:
    return tuple(a.name for a in all() if a.by_k)


def using(param_name: str) -> tuple[str, ...]:
    """The architectures that use the hyper-parameter ``param_name``."""
    return tuple(a.name for a in all() if a.uses(param_name))


def titles(which, joiner: str = " or ") -> str:
    """"a standard SAE or a Gated SAE": the titles of the architectures ``which`` picks, for a sentence."""
    named = [a.title[0].lower() + a.title[1:] if a.title.startswith("A ") else a.title for a in all() if which(a)]
    return ", ".join(named[:-1]) + (joiner if len(named) > 1 else "") + named[-1] if named else ""


def used_by_hint(names) -> str:
    """The form's note beside a setting only the architectures ``names`` use: "Used by JumpReLU only."."""
    titles = [a.title[2:] if a.title.startswith("A ") else a.title for a in all() if a.name in names]
    if not titles:
        return ""
    listed = ", ".join(titles[:-1]) + (" and " if len(titles) > 1 else "") + titles[-1]
    return f"Used by {listed} only."


def saelens_readable() -> str:
    """"standard, topk, jumprelu or gated": the SAELens architectures an import reads."""
    names = [a.saelens for a in all() if a.saelens]
    return ", ".join(names[:-1]) + " or " + names[-1]


def for_l0_finder() -> Architecture:
    """The architecture the L0 finder trains its ladder on."""
    return next(a for a in all() if a.l0_finder)


def saelens_default() -> Architecture:
    """The architecture a cfg.json without one is (SAELens's default)."""
    return next(a for a in all() if a.saelens_default)


def from_saelens(saelens_name: str) -> Architecture | None:
    """Our architecture that reads a SAELens file naming ``saelens_name``."""
    for arch in all():
        if arch.saelens == saelens_name:
            return arch
    return None


# Param lives in training_config, which builds PARAMS from this registry: imported last, so
# that whichever of the two is imported first, both finish (see training_config).
from ... import training_config as _training_config  # noqa: E402,F401
