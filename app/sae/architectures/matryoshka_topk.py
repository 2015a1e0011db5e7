"""Matryoshka TopK: Matryoshka's nested prefixes with TopK's per-token selection.

Every prefix of the dictionary reconstructs the input on its own, as in Matryoshka BatchTopK,
but each token keeps exactly its own ``k`` largest latents instead of sharing ``k · batch``
with the batch. On both ground-truth generators of ``benchmarks/architecture_variants.py`` the
batch-wide cut handed most latents to the tokens with the largest norms and matched far fewer
true features (MCC 0.41 against 0.63 on ours, 0.39 against 0.59 on SAELens's, at 500,000
samples; the full table is in ``benchmarks/results/architectures.md``).

At inference it is a TopK SAE (the nesting only shapes training), so finished weights load
into TopK's model and export as SAELens's ``topk``.
"""
from __future__ import annotations

from . import matryoshka, topk
from .matryoshka import PREFIXES, check_levels, nested_loss

NAME = "matryoshka_topk"


class MatryoshkaTopK(matryoshka.Matryoshka):
    name = NAME
    label = "Matryoshka TopK (nested prefixes, exactly k active per token)"
    title = "Matryoshka TopK"
    order = 55
    presets_since = 25
    shared = ("k", PREFIXES.name)  # the prefixes are Matryoshka BatchTopK's setting, shared
    params = ()
    inference_as = topk.ARCH
    selection = topk.ARCH  # its k in TopK's words on the run page; build, checks, recommendations and
    # advice are Matryoshka's (BatchTopK's, which are TopK's)
    knob_hint = "Matryoshka TopK fixes L0 at"
    how_k = topk.TopK.how_k

    def define_model(self):
        class MatryoshkaTopKSAE(topk.ARCH.model_class()):
            """Matryoshka TopK SAE: TopK's selection (each token keeps its ``k`` largest latents), and
            Matryoshka's loss: every prefix of the dictionary (``levels``, the whole last) reconstructs
            on its own; the reported ``mse`` is the whole dictionary's. Decoder rows stay at unit norm."""

            architecture = NAME

            def __init__(self, d_in, d_sae, *, k, levels=(), aux_coeff=1 / 32, generator=None, device="cpu"):
                # the dense path: each level decodes its own slice of the latents
                super().__init__(d_in, d_sae, k=k, aux_coeff=aux_coeff, generator=generator, device=device,
                                 sparse=False)
                self.levels = check_levels(levels, d_sae)

            def loss(self, x, *, l1_alpha=0.0, dead_mask=None):
                pre = self.pre_activation(x)
                return nested_loss(self, x, pre, self._topk(pre, self.k), dead_mask)

        return MatryoshkaTopKSAE

    def presets(self, d_in, latent, k, common):
        return [(f"Matryoshka TopK k={k}", {"k": k, PREFIXES.name: ""},
                 f"Matryoshka TopK, k = {k} on every token; prefixes of 1/16, 1/8, 1/4 and 1/2 of the latents each "
                 "reconstruct alone. Matched more true features than Matryoshka BatchTopK on both synthetic "
                 "benchmarks.")]


ARCH = MatryoshkaTopK()
