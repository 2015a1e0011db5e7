"""What an architecture declares: the base class every module of this package subclasses once.

Pure Python (no torch, no Flask): the web process reads the declarations; the model class is
defined on first use by ``model_class()``, which is the only place torch is imported.
"""
from __future__ import annotations

import math

PENALTY, K, TARGET = "penalty", "k", "target"  # what sets an architecture's sparsity


def num(value, digits: int = 3) -> str:
    """A number as pages show it (the templates' ``num`` filter): "—" for None, 3 figures."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}g}"


def check_penalty(cfg, title: str) -> None:
    """The core's check of a penalty-set config: l1_alpha given, finite and >= 0 (0: a dense baseline)."""
    if cfg.l1_alpha is None:
        raise ValueError(f"l1_alpha (the sparsity penalty) is required for {title[0].lower() + title[1:]}")
    if not (math.isfinite(cfg.l1_alpha) and cfg.l1_alpha >= 0):
        raise ValueError(f"l1_alpha must be a finite number >= 0, got {cfg.l1_alpha}")


def check_k(cfg) -> None:
    if cfg.k is None or not 1 <= cfg.k <= cfg.latent_dim:
        raise ValueError(f"k must lie in [1, latent_dim], got {cfg.k}")


class Architecture:
    """One SAE architecture. A module under ``app/sae/architectures/`` defines a subclass and
    ``ARCH = ThatSubclass()``; the registry (``app.sae.architectures``) finds it.

    Class attributes (the declarations):

    - ``name``: the stored value (``Training.architecture``, the API, cfg.json); ``label``: the
      form's choice; ``title``: the short name sentences use ("TopK"); ``order``: the form's order.
    - ``sparsity_set_by``: ``"penalty"`` (l1_alpha), ``"k"`` or ``"target"`` (the target L0
      itself). The penalty-set ones get the dense warning, the early stop, steering and the
      l1_alpha chart; the wording of the verdict's advice follows it too.
    - ``shared``: the hyper-parameters of ``training_config`` it uses that other architectures
      use too (by name: ``"l1_alpha"``, ``"k"``); ``params``: its own ``Param``s.
    - ``l0_model``: the L0 model (fitted on standard SAEs) predicts its L0 from l1_alpha.
    - ``resample``: the dead-latent remedy (resampling) applies to it.
    - ``aux_k``: dead latents get the AuxK loss in training.
    - ``warmup``: which warm-up the verdict waits out: ``"sparsity"`` or ``"learning-rate"``.
    - ``inference_as``: another architecture it is at inference (its thresholds make it one);
      finished weights load into that one, and export as it.
    - ``saelens``: the SAELens architecture an exported file names (None: exports as
      ``inference_as``); a file naming it is read back as this architecture.
    - ``extra_bytes_per_token``: activations beyond the shared ones, in latents per token.
    - ``l0_finder``: the L0 finder trains its ladder on this one (the architecture its metric was
      made on: BatchTopK in "Sparse but Wrong"). Exactly one architecture says so.
    """

    name: str = ""
    label: str = ""
    title: str = ""
    order: int = 100
    sparsity_set_by: str = PENALTY
    shared: tuple[str, ...] = ()
    params: tuple = ()
    l0_model: bool = False
    l0_finder: bool = False
    resample: bool = False
    aux_k: bool = False
    warmup: str = "learning-rate"
    inference_as: Architecture | None = None
    saelens: str | None = None
    saelens_default: bool = False  # a cfg.json that names no architecture is this one
    presets_since: int = 4  # the schema version whose migration added its presets to an existing database
    extra_latents_per_token: int = 0
    extra_params_per_latent: int = 0
    # The form's note beside the knob it sets ({k}, {ld}, {pct}: k, latent_dim, k as a % of it).
    knob_hint: str = ""
    how_k: str = ""  # k-set: how k sets L0 ("fixes L0 at k"), for the validator's sentence

    # ----------------------------------------------------------------------- declarations
    def uses(self, param_name: str) -> bool:
        """Does a run of this architecture need the hyper-parameter ``param_name``?"""
        return param_name in self.shared or any(p.name == param_name for p in self.params)

    @property
    def by_penalty(self) -> bool:
        return self.sparsity_set_by == PENALTY

    @property
    def by_k(self) -> bool:
        return self.sparsity_set_by == K

    def __repr__(self) -> str:
        return f"<architecture {self.name}>"

    # --------------------------------------------------------------------- the ML core
    def model_class(self):
        """The torch module class (defined on first use; imports torch)."""
        cls = self.__dict__.get("_model_class")
        if cls is None:
            cls = self.define_model()
            self._model_class = cls
        return cls

    def define_model(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def build(self, d_in: int, d_sae: int, cfg, *, generator=None, device="cpu", sparse_topk: bool | None = None):
        """A fresh model for training: ``cfg`` has the training config's attributes."""
        return self.model_class()(d_in, d_sae, generator=generator, device=device)

    def inference_model(self, d_in: int, d_sae: int, *, k: int | None = None, device="cpu"):
        """A model to load finished weights into (in eval mode)."""
        if self.inference_as is not None:
            return self.inference_as.inference_model(d_in, d_sae, k=k, device=device)
        from types import SimpleNamespace

        return self.build(d_in, d_sae, SimpleNamespace(k=k), device=device).eval()

    def check(self, cfg) -> None:
        """Raise ``ValueError`` for a config the core cannot train (``cfg``: a ``TrainConfig``)."""

    def knob_text(self, *, k=None, latent_dim=None, target_l0=None, l1_alpha=None, learning_rate=None) -> str:
        """The form's note on what sets this run's sparsity ("" when the values for it are missing)."""
        if self.sparsity_set_by == K and k and latent_dim:
            return (f"{self.knob_hint} k = {k} latents per token ({100 * k / latent_dim:.2f}% of latents); "
                    "l1_alpha is not used.")
        if self.sparsity_set_by == TARGET and target_l0 and latent_dim:
            from ...training_config import target_l0_count

            return f"{self.title} trains L0 to the target ({target_l0_count(target_l0, latent_dim):,.0f} latents); l1_alpha is not used."
        if self.sparsity_set_by == PENALTY and l1_alpha is not None and learning_rate is not None:
            return f"Sparsity penalty l1_alpha = {num(l1_alpha)}; learning rate = {num(learning_rate)}."
        return ""

    # ------------------------------------------------------------------------ judgement
    def memory_bytes(self, d_in: int, latent_dim: int, batch_size: int) -> int:
        """Parameters, their gradients and both Adam moments, plus the batch's activations (fp32)."""
        params = 2 * d_in * latent_dim + (1 + self.extra_params_per_latent) * latent_dim + d_in
        per_token = (6 + self.extra_latents_per_token) * latent_dim + 4 * d_in
        return 4 * (4 * params + batch_size * per_token)

    def validate(self, cfg: dict, source, add) -> None:
        """Its own findings for a config (form field names): ``add(validation.Finding(...))``."""

    def check_form(self, latent_dim: int, k: int | None, values: dict) -> tuple[str, str] | None:
        """A rule between the form's fields: (field, message), or None. ``values``: its own fields
        that passed their own checks; ``k`` None unless valid."""
        return None

    def recommend(self, out: dict, *, source, latent_dim: int, target_l0: float, steps: int, batch: int) -> None:
        """Add its settings to ``validation.recommend_settings``'s ``out`` (name → (value, why))."""

    def presets(self, d_in: int, latent: int, k: int, common: dict) -> list[tuple[str, dict, str]]:
        """Built-in presets for one width: (title, settings, provenance)."""
        return []

    def summary(self, config) -> str:
        """The setting that decides its sparsity, as lists show it ("k = 32"); ``config``: a mapping."""
        return ""

    def describe(self, run) -> dict[str, str]:
        """What the run page's configuration panel says of this architecture's own settings, by the
        hyper-parameter's name, where the plain value needs words beside it (others show as stored)."""
        return {}

    # The verdict's and the runtime rules' advice when L0 is too high / too low / most latents are dead.
    def advise_sparser(self, *, target_k: int, target_l0: float, l0_fraction: float) -> str:
        return ""

    def advise_denser(self, *, target_k: int) -> str:
        return ""

    dead_advice: str = "Lower the learning rate."

    # ---------------------------------------------------------------------------- export
    @property
    def exports_as(self) -> Architecture:
        return self.inference_as or self

    def tensor_names(self) -> tuple[str, ...]:
        """Its weights in our checkpoints (``sae.safetensors``), as the core model names them."""
        return ("W_enc", "W_dec", "b_enc", "b_dec")

    def saelens_shapes(self, d_in: int, d_sae: int) -> dict[str, tuple[int, ...]]:
        """The tensors an SAELens file of this architecture holds, with their shapes."""
        return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}

    def fold(self, weights: dict, c: float) -> dict:
        """Weights acting on c·x → weights acting on raw x, under SAELens's names (numpy)."""
        import numpy as np

        return {"W_enc": (weights["W_enc"].astype(np.float64) * c).astype(np.float32),
                "W_dec": (weights["W_dec"].astype(np.float64) / c).astype(np.float32),
                "b_enc": weights["b_enc"].astype(np.float32),
                "b_dec": (weights["b_dec"].astype(np.float64) / c).astype(np.float32)}

    def saelens_cfg(self, k: int | None) -> dict:
        """Its entries of an exported cfg.json beyond the shared ones."""
        return {}

    def read_saelens(self, cfg: dict, d_sae: int) -> int | None:
        """Check an imported cfg.json's entries of this architecture; return its k (or None).
        Raises ``ValueError`` with the reason."""
        return None
