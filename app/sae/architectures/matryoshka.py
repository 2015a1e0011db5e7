"""Matryoshka BatchTopK: every prefix of the dictionary reconstructs on its own (against feature absorption)."""
from __future__ import annotations

from ...training_config import Param
from . import batchtopk, jumprelu
from ._base import K, Architecture, check_k

NAME = "matryoshka"


def parse_prefixes(text) -> tuple[int, ...]:
    """Matryoshka prefix sizes from "128, 512" (empty: the default); raises ValueError with a message."""
    if text is None or not str(text).strip():
        return ()
    if len(str(text)) > 200:
        raise ValueError("At most 200 characters.")
    sizes = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip().replace("_", "")
        if not part.isdigit():
            raise ValueError(f"{part!r} is not a whole number: list latent counts separated by commas, e.g. 128, 512.")
        sizes.append(int(part))
    if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
        raise ValueError("The prefix sizes must be positive and increasing, e.g. 128, 512.")
    if len(sizes) > 16:
        raise ValueError("At most 16 prefixes.")
    return tuple(sizes)


def level_sizes(prefixes, latent_dim: int) -> tuple[int, ...]:
    """Every level's size, the whole dictionary last: the user's prefixes, or 1/16, 1/8, 1/4, 1/2 of it."""
    sizes = parse_prefixes(prefixes)
    if not sizes:
        sizes = tuple(sorted({max(1, latent_dim // d) for d in (16, 8, 4, 2)}))
    sizes = tuple(s for s in sizes if s < latent_dim)
    return (*sizes, latent_dim)


def nested_loss(model, x, pre, f, dead_mask):
    """The Matryoshka loss of a model with ``levels``, given its pre-activations and the latents its
    selection kept: every prefix of the dictionary reconstructs x on its own, and the loss is the
    sum of their reconstruction terms plus AuxK on the whole dictionary's residual. Returns
    ``(LossParts, x_hat, f)`` with the whole dictionary's ``mse`` and ``x_hat``."""
    import torch

    from ..models import LossParts

    x_hat = model.b_dec.expand_as(x)
    levels_mse, start = [], 0
    for end in model.levels:  # each level adds its segment of the dictionary to the previous one's
        x_hat = x_hat + f[:, start:end] @ model.W_dec[start:end]
        levels_mse.append((x - x_hat).pow(2).sum(dim=-1).mean() / model.d_in)
        start = end
    l1 = (f * model.decoder_norms()).sum(dim=-1).mean().detach()
    aux = model.aux_loss(x, x_hat, pre, dead_mask)
    return LossParts(torch.stack(levels_mse).sum() + aux, levels_mse[-1], aux, l1), x_hat, f


def check_levels(levels, d_sae) -> tuple[int, ...]:
    """The model's levels (the default ones when empty); ``ValueError`` unless they increase to d_sae."""
    levels = tuple(levels) or level_sizes("", d_sae)
    if list(levels) != sorted(set(levels)) or levels[0] < 1 or levels[-1] != d_sae:
        raise ValueError(f"matryoshka levels must increase and end at d_sae {d_sae}, got {levels}")
    return levels


PREFIXES = Param(
    "matryoshka_prefixes", str, "", "Nested prefix sizes (Matryoshka)", api_optional=True, template=True,
    parse=parse_prefixes, placeholder="auto: 1/16, 1/8, 1/4, 1/2 of the latents",
    help="Matryoshka only: comma-separated latent counts, each prefix of the dictionary trained to "
         "reconstruct on its own; the whole dictionary is always the last level. Empty: 1/16, 1/8, "
         "1/4 and 1/2 of the latents.", group="sparsity")


class Matryoshka(Architecture):
    name = NAME
    label = "Matryoshka BatchTopK (nested prefixes; against feature absorption)"
    title = "Matryoshka BatchTopK"
    order = 50
    presets_since = 12
    sparsity_set_by = K
    shared = ("k",)
    params = (PREFIXES,)
    aux_k = True
    inference_as = jumprelu.ARCH
    extra_latents_per_token = 4
    knob_hint = "Matryoshka BatchTopK keeps on average"
    how_k = batchtopk.BatchTopK.how_k
    dead_advice = "Lower the learning rate or raise k."

    def define_model(self):
        class MatryoshkaSAE(batchtopk.ARCH.model_class()):
            """Matryoshka BatchTopK SAE: every prefix of the dictionary (``levels``, the whole last)
            reconstructs the input on its own, so general features settle in the early latents and
            specific ones cannot absorb them. The loss is the sum of every level's reconstruction term
            (plus AuxK); the reported ``mse`` is the whole dictionary's. Selection and inference are
            BatchTopK's.
            """

            architecture = NAME

            def __init__(self, d_in, d_sae, *, k, levels=(), aux_coeff=1 / 32, generator=None, device="cpu"):
                super().__init__(d_in, d_sae, k=k, aux_coeff=aux_coeff, generator=generator, device=device)
                self.levels = check_levels(levels, d_sae)

            def loss(self, x, *, l1_alpha=0.0, dead_mask=None):
                pre, f = self._select(x)
                return nested_loss(self, x, pre, f, dead_mask)

        return MatryoshkaSAE

    def build(self, d_in, d_sae, cfg, *, generator=None, device="cpu", sparse_topk=None):
        if cfg.k is None:
            raise ValueError(f"a {self.name} SAE needs k")
        levels = level_sizes(getattr(cfg, PREFIXES.name, "") or "", d_sae)
        return self.model_class()(d_in, d_sae, k=cfg.k, levels=levels, generator=generator, device=device)

    def check(self, cfg) -> None:
        check_k(cfg)
        sizes = parse_prefixes(getattr(cfg, PREFIXES.name))
        if sizes and sizes[-1] >= cfg.latent_dim:
            raise ValueError(f"matryoshka prefixes must be smaller than latent_dim, got {sizes}")

    def validate(self, cfg, source, add) -> None:
        from ...validation import Finding

        k = cfg.get("k")
        if k is None:
            return
        levels = level_sizes(cfg.get(PREFIXES.name) or "", cfg["latent_dim"])
        if len(levels) > 1 and levels[0] < 2 * k:
            add(Finding("warning", PREFIXES.name, f"The smallest level holds {levels[0]:,} latents for k = {k}: "
                        "it cannot reconstruct much on its own.", f"Use at least {2 * k:,} latents for it."))

    def check_form(self, latent_dim, k, values):
        if values.get(PREFIXES.name) is None:
            return None
        sizes = parse_prefixes(values[PREFIXES.name])
        if sizes and sizes[-1] >= latent_dim:
            return PREFIXES.name, (f"Each prefix must be smaller than latent_dim ({latent_dim:,}); the whole "
                                   "dictionary is always the last level.")
        if sizes and k and sizes[0] < 2 * k:
            return PREFIXES.name, (f"The smallest prefix ({sizes[0]:,}) must hold at least 2·k = "
                                   f"{2 * k:,} latents, or it cannot reconstruct on its own.")
        return None

    recommend = batchtopk.BatchTopK.recommend
    summary = batchtopk.BatchTopK.summary
    advise_sparser = batchtopk.BatchTopK.advise_sparser
    advise_denser = batchtopk.BatchTopK.advise_denser

    def presets(self, d_in, latent, k, common):
        return [(f"Matryoshka k={k}", {"k": k, PREFIXES.name: ""},
                 f"Matryoshka BatchTopK, k = {k}; prefixes of 1/16, 1/8, 1/4 and 1/2 of the latents each reconstruct "
                 "alone, which keeps general features from being absorbed by specific ones.")]

    selection = batchtopk.ARCH  # whose selection it trains with: the run page describes k in its words

    def describe(self, run):
        prefixes = getattr(run, PREFIXES.name) or ""
        levels = level_sizes(prefixes, run.latent_dim)
        return {**self.selection.describe(run),
                PREFIXES.name: f"{prefixes or 'auto'}: nested levels of {', '.join(f'{n:,}' for n in levels)} latents"}


ARCH = Matryoshka()
