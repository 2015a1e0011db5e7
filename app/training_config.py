"""The training configuration, defined once.

Every hyper-parameter of a training run is one ``Param`` below: its name, type, range,
default, aliases, label and help. The rest is derived from this list:

- the form's fields (``app.forms``) and their range checks,
- the JSON API's mapping (which keys a script may leave out, aliases, integer coercion),
- the stored columns of a ``Training`` row and ``Training.config_dict``,
- the core's ``TrainConfig`` (``app.sae.trainer``),
- the fields a template holds.

A new hyper-parameter is one entry here plus a migration adding its column; a parameter only
one architecture uses is declared in that architecture's module (``app/sae/architectures/``)
and placed here after ``target_l0``. The architectures themselves (``ARCHITECTURES``, which
need which value) come from that registry. This module is pure Python so that the ML core can
import it without Flask, RQ or Peewee.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

PRECISIONS = (("auto", "Auto: bfloat16 where the device computes it fast, else float32"),
              ("float32", "float32"),
              ("bfloat16", "bfloat16 autocast (weights, optimizer and metrics stay float32)"),
              ("tf32", "TF32 matmuls (CUDA; float32 elsewhere)"))
KEEP_STORE = (("no", "No"), ("float16", "Yes, in float16 (half the disk)"), ("float32", "Yes, in float32"))
DEAD_LATENT_REMEDIES = (("none", "None"), ("resample", "Resample: point dead latents at badly reconstructed inputs"))

# The sparsity penalty's valid range and default: the one place they are written down.
L1_ALPHA_MIN_EXCLUSIVE = 1e-5
L1_ALPHA_MAX = 0.1
DEFAULT_L1_ALPHA = 0.003
L1_ALPHA_ALIASES = ("sparsity_coefficient", "l1_coefficient")


@dataclass(frozen=True)
class Param:
    """One hyper-parameter of a training run.

    ``required_for`` names the architectures that need the value (``None``: every run
    needs it); for other architectures it is stored as null. ``api_optional`` lets a JSON
    body leave it out, taking the default (only for settings whose default is always safe:
    the hyper-parameters that decide sparsity must be given). ``template`` puts it in
    templates; ``core`` passes it to the trainer's ``TrainConfig``.
    """

    name: str
    type: type
    default: object
    label: str
    help: str = ""
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple[tuple[str, str], ...] | None = None
    aliases: tuple[str, ...] = ()
    required_for: tuple[str, ...] | None = None
    required_message: str | None = None
    null_message: str | None = None
    api_optional: bool = False
    template: bool = False
    core: bool = True
    parse: Callable[[str], object] | None = None  # a free-text value: its parser (raises ValueError)
    placeholder: str = ""  # what an empty field means, shown in it
    group: str = "advanced"  # the form's fieldset it appears in (GROUPS)

    @property
    def is_numeric(self) -> bool:
        return self.type in (int, float)

    def applies_to(self, architecture: str | None) -> bool:
        return self.required_for is None or architecture in self.required_for

    def in_range(self, value) -> bool:
        if self.choices is not None:
            return value in {c for c, _ in self.choices}
        if self.parse is not None:
            try:
                self.parse(value)
            except (TypeError, ValueError):
                return False
            return True
        if not self.is_numeric:
            return isinstance(value, self.type)
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return False
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            return False
        return self.max is None or value <= self.max


def target_l0_count(target_l0: float, latent_dim: int) -> float:
    """The target L0 as a count of latents: the one conversion from the fraction every page, the
    API and the database use (docs/design.md, "Names and units at the boundaries")."""
    return target_l0 * latent_dim


# The registry declares each architecture, its own Params among them; it imports Param from here,
# so it is imported once Param and the helpers above are defined.
from .sae import architectures as _architectures  # noqa: E402

ARCHITECTURES = _architectures.choices()  # (value, label) for the form's select


def _for(param_name: str) -> str:
    """The architectures that need ``param_name``, for a message."""
    return _architectures.titles(lambda a: a.uses(param_name))


def _k_help() -> str:
    """What k does, in each architecture's own words (its module's ``how_k``)."""
    return " ".join(f"{a.title} {a.how_k}." for a in _architectures.all() if a.uses("k"))


def parse_hook_point(text: str) -> str:
    """A hook point as runs write it, ``layer.site`` (``3.resid``), or "" for a source's first."""
    text = (text or "").strip()
    if not text:
        return ""
    layer, _, site = text.partition(".")
    from .extraction.capture_names import SITES

    if not layer.isdigit() or site not in SITES:
        raise ValueError(f"write a hook point as layer.site, with a site among {', '.join(SITES)} (e.g. 3.resid)")
    return f"{int(layer)}.{site}"


# The form's fieldsets, in order: (key, legend). "advanced" is folded away until one of its fields has an error.
GROUPS = (("model", "What to train on"), ("sparsity", "Sparsity"), ("optimization", "Optimization"),
          ("quality", "Quality control"), ("advanced", "Advanced"))

L1_REQUIRED = (f"The sparsity penalty l1_alpha is required for {_for('l1_alpha')}; without it the features come "
               f"out dense. {DEFAULT_L1_ALPHA:g} is a sound start.")

PARAMS: tuple[Param, ...] = (
    Param("architecture", str, _architectures.default().name, "Architecture", choices=ARCHITECTURES, template=True,
          group="model"),
    Param("hook_point", str, "", "Hook point (streamed sources)", api_optional=True, template=False, core=False,
          parse=parse_hook_point, placeholder="the source's first",
          help="Which of a streamed source's hook points this SAE reads, as layer.site (3.resid: layer 3's "
               "residual stream). Empty: the source's first. Other sources have none.", group="model"),
    Param("keep_store", str, "no", "Keep an activation store (streamed sources)", choices=KEEP_STORE,
          api_optional=True, core=False,
          help="Write the activations this run streams at its hook point (the corpus's first pass) into an "
               "activation store as it trains, with no second forward pass: when the run ends it is a new source, "
               "as an extraction of those tokens would make, for runs that share the layer without running the "
               "model. A sweep keeps one per hook point its members read.", group="model"),
    Param("latent_dim", int, 1024, "Latents (latent_dim)", min=16, max=1_048_576, template=True,
          help="Number of SAE features; usually 4× to 64× the activation width d_in.", group="model"),
    Param("l1_alpha", float, DEFAULT_L1_ALPHA, "Sparsity penalty (l1_alpha)", min=L1_ALPHA_MIN_EXCLUSIVE,
          max=L1_ALPHA_MAX, min_exclusive=True, aliases=L1_ALPHA_ALIASES, required_for=_architectures.using("l1_alpha"),
          required_message=L1_REQUIRED, template=True,
          null_message=f"Must not be null: the sparsity penalty l1_alpha is required for {_for('l1_alpha')} "
                       f"(without it the features come out dense); {DEFAULT_L1_ALPHA:g} is a sound start.",
          help="Weight of the L1 term that makes features sparse. Higher → fewer active latents. "
               f"Not the learning rate. Range: above {L1_ALPHA_MIN_EXCLUSIVE:.5f}, at most {L1_ALPHA_MAX:g}.",
                     group="sparsity"),
    Param("k", int, 32, "Active latents per token (k)", min=1, max=65_536, required_for=_architectures.using("k"),
          required_message=f"k is required for a {_for('k')} SAE.", template=True,
          null_message=f"Must not be null: k is required for a {_for('k')} SAE.",
          help=_k_help(), group="sparsity"),
    Param("learning_rate", float, 0.001, "Learning rate (optimizer step size)", min=1e-6, max=0.1, template=True,
          help="Adam's step size. Not the sparsity penalty. Typical: 0.0001 to 0.001.", group="optimization"),
    Param("batch_size", int, 512, "Batch size (tokens per step)", min=16, max=65_536, template=True,
          group="optimization"),
    Param("total_steps", int, 2000, "Training steps", min=10, max=10_000_000, template=True, group="optimization"),
    Param("lr_warmup_steps", int, 100, "Learning-rate warm-up steps", min=0, max=10_000_000, template=True,
          help="The learning rate rises linearly from 0 over these steps.", group="optimization"),
    Param("l1_warmup_steps", int, 200, "Sparsity warm-up steps", min=0, max=10_000_000, template=True,
          api_optional=True,  # a script training an architecture without a penalty need not send it
          help="l1_alpha rises linearly from 0 over these steps (architectures set by a penalty; the others "
               "ignore it).", group="optimization"),
    Param("target_l0", float, 0.02, "Target L0 (fraction of latents)", min=0, max=0.5, min_exclusive=True,
          template=True,
          help="The share of latents you want active per token; 0.01–0.05 is typical. "
               f"{_architectures.titles(lambda a: a.sparsity_set_by == _architectures.TARGET, ' and ')} trains to it.",
          group="sparsity"),
    # each architecture's own settings, in the registry's order, needed by it alone
    *(dataclasses.replace(p, required_for=_architectures.using(p.name)) for a in _architectures.all() for p in a.params),
    Param("seed", int, 0, "Random seed", min=0, max=2**31 - 1, group="optimization"),
    Param("log_every", int, 20, "Log metrics every (steps)", min=1, max=10_000, api_optional=True, group="advanced"),
    Param("dead_window_tokens", int, 200_000, "Dead-latent window (tokens)", min=1_000, max=1_000_000_000,
          api_optional=True, help="A latent that has not fired in this many tokens counts as dead.", group="advanced"),
    Param("aux_window_tokens", int, 5_000, "AuxK window (tokens)", min=1, max=1_000_000_000, api_optional=True,
          help=f"{_architectures.titles(lambda a: a.aux_k, ' and ')}: a latent that has not fired in this many tokens "
               "gets the auxiliary loss's gradient toward what the others miss (at most the dead-latent window). "
               "Shorter than the dead-latent window, so rare latents are helped before they die; "
               "benchmarks/results/architectures.md measured it.", group="advanced"),
    Param("early_stop", bool, True, "Stop early if still dense", core=False,
          help="End the run as 'stopped early' if L0 is still above the threshold at the given step.", group="quality"),
    Param("early_stop_step", int, 1000, "Early-stop check at step", min=1, max=10_000_000, api_optional=True,
          core=False, group="quality"),
    Param("early_stop_l0", float, 0.20, "Early-stop L0 threshold (fraction)", min=0, max=1, min_exclusive=True,
          api_optional=True, core=False, group="quality"),
    Param("steer_l1_alpha", bool, False, "Steer l1_alpha to hit the target L0", core=False, template=True,
          help="After the sparsity warm-up, adjust l1_alpha within its valid range so L0 settles at the "
               "target. The l1_alpha you set is the starting point.", group="sparsity"),
    Param("dead_latent_remedy", str, "none",
          f"Dead-latent remedy (for {_architectures.titles(lambda a: a.resample, ' and ')})", choices=DEAD_LATENT_REMEDIES,
          api_optional=True, group="sparsity"),
    Param("plateau_window", int, 2000, "Plateau window (steps)", min=10, max=10_000_000, api_optional=True,
          core=False, help="Warn when the loss has not improved for this many steps.", group="advanced"),
    Param("precision", str, "auto", "Precision of the matmuls", choices=PRECISIONS, template=True, api_optional=True,
          help="bfloat16 runs the SAE's matrix products in bfloat16 with float32 master weights; "
               "the loss, L0 and FVU are accumulated in float32.", group="optimization"),
    Param("checkpoint_every_steps", int, 2000, "Checkpoint every (steps)", min=10, max=10_000_000,
          api_optional=True,
          help="Save weights, optimizer and data position this often, so a crash loses at most this many steps.",
                group="advanced"),
    Param("checkpoint_every_minutes", float, 5.0, "Checkpoint every (minutes)", min=0.05, max=1440,
          api_optional=True,
          help="…and at least this often by the clock, whichever comes first: at most this much work is lost.",
                group="advanced"),
)

BY_NAME = {p.name: p for p in PARAMS}
NAMES = tuple(BY_NAME)
TEMPLATE_FIELDS = tuple(p.name for p in PARAMS if p.template)
CORE_FIELDS = tuple(p.name for p in PARAMS if p.core)
INTEGER_FIELDS = tuple(p.name for p in PARAMS if p.type is int)
BOOLEAN_FIELDS = tuple(p.name for p in PARAMS if p.type is bool)
NUMERIC_FIELDS = tuple(p.name for p in PARAMS if p.is_numeric)
API_OPTIONAL = tuple(p.name for p in PARAMS if p.api_optional)


def defaults() -> dict:
    """Every hyper-parameter's default."""
    return {p.name: p.default for p in PARAMS}


def normalize(config: dict) -> dict:
    """Null the values that the run's architecture does not use (k where the penalty sets sparsity,
    l1_alpha where k does); steering needs a penalty, the dead-latent remedy an architecture it suits."""
    out = dict(config)
    arch = _architectures.find(out.get("architecture"))
    for p in PARAMS:
        if p.required_for is not None and not p.applies_to(out.get("architecture")):
            out[p.name] = None
    if arch is None or not arch.by_penalty:
        out["steer_l1_alpha"] = False
    if arch is None or not arch.resample:
        out["dead_latent_remedy"] = "none"  # the others have AuxK or their thresholds
    return out
