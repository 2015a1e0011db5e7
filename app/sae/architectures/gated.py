"""The Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders"): which latents fire and how strongly are decided by two paths that share ``W_enc``.

- gate: ``π_gate = (x − b_dec)·W_enc + b_gate``; a latent is active where ``π_gate > 0``;
- magnitude: ``m = ReLU((x − b_dec)·W_enc·exp(r_mag) + b_mag)``;
- latents ``f = 1[π_gate > 0] · m``, decoded as ``x̂ = f·W_dec + b_dec``.

Loss per token (normalized space, docs/design.md):
``(1/d_in)·‖x − x̂‖² + l1_alpha·Σ_i ReLU(π_gate,i)·‖W_dec,i‖ + (1/d_in)·‖x − x̂_aux‖²``,
where ``x̂_aux = ReLU(π_gate)·W_dec + b_dec`` reconstructs x from the gate alone. The Heaviside
step gives the gate no gradient through the reconstruction, so the penalty and the auxiliary term
are what train it; the penalty acts on the gate only, so it no longer shrinks the magnitudes of
the latents that fire (the standard SAE's shrinkage).

Decoder rows start at norm 0.1 (as every SAE here) and are free, and the auxiliary term reaches the
decoder. The paper sends x̂_aux through a frozen copy of the decoder, and this module used to, with
rows held at unit norm; measured against SAELens's Gated trainer (which does neither) on both
ground-truth generators, that version left a quarter to two fifths of the latents never firing and
trailed it by about 0.2 MCC (``benchmarks/results/architectures_two_generators.md``). The free
decoder alone is not enough: with a detached x̂_aux the model shrinks ``W_dec`` and grows the
magnitudes back to escape the penalty (L0 over 200 at a penalty SAELens holds near 14); the
auxiliary term's pull on the decoder is what ties its scale to the gate's.

Sparsity is set by the penalty ``l1_alpha``, as for the standard SAE: steering, the dense warning
and the early stop apply. The L0 model is fitted on standard SAEs only, so the validator makes
no prediction for it; the recommended start (``start_l1_alpha``) is the standard SAE's value for the
same run, with steering on. Where steering starts matters: on the hierarchical source, from a start
2.6 times too strong it ended on target but at MCC 0.61 and FVU 0.25, against 0.73 and 0.17 from
one near the end value (``benchmarks/results/architectures.md``).
Exports as SAELens's "gated" architecture (``b_gate``, ``b_mag``, ``r_mag``, no ``b_enc``).
"""
from __future__ import annotations

from ._base import PENALTY, Architecture, check_penalty, num

NAME = "gated"


class Gated(Architecture):
    name = NAME
    label = "Gated (separate gate and magnitude paths, L1 penalty on the gate)"
    title = "A Gated SAE"
    order = 60
    presets_since = 20
    sparsity_set_by = PENALTY
    shared = ("l1_alpha",)
    warmup = "sparsity"
    resample = True  # a shut gate has no gradient from any term: resampling is the only way back
    saelens = NAME
    extra_params_per_latent = 2  # b_gate, b_mag and r_mag where the others have b_enc
    extra_latents_per_token = 4  # the magnitude path and the auxiliary reconstruction's codes, with grads
    dead_advice = "Lower l1_alpha (the sparsity penalty): the penalty on the gate keeps these latents shut."

    def define_model(self):
        import torch
        from torch import nn

        from ..models import LossParts, SparseAutoencoder

        class GatedSAE(SparseAutoencoder):
            """Gated SAE: gate and magnitude paths sharing ``W_enc`` (see the module's docstring)."""

            architecture = NAME

            def __init__(self, d_in, d_sae, *, generator=None, device="cpu"):
                super().__init__(d_in, d_sae, generator=generator, device=device)
                del self.b_enc  # the gate and the magnitude path each have their own bias
                self.b_gate = nn.Parameter(torch.zeros(d_sae, device=device))
                self.b_mag = nn.Parameter(torch.zeros(d_sae, device=device))
                self.r_mag = nn.Parameter(torch.zeros(d_sae, device=device))

            def pre_activation(self, x):
                """The gate's pre-activation π_gate."""
                return (x - self.b_dec) @ self.W_enc + self.b_gate

            def _paths(self, x):
                centred = (x - self.b_dec) @ self.W_enc
                gate = centred + self.b_gate
                magnitude = torch.relu(centred * torch.exp(self.r_mag) + self.b_mag)
                return gate, magnitude

            def encode(self, x):
                gate, magnitude = self._paths(x)
                return (gate > 0).to(magnitude.dtype) * magnitude

            def latent_activations(self, xs, latents):
                centred = torch.einsum("bmd,db->bm", xs - self.b_dec, self.W_enc[:, latents])
                gate = centred + self.b_gate[latents].unsqueeze(1)
                magnitude = torch.relu(centred * torch.exp(self.r_mag[latents]).unsqueeze(1)
                                       + self.b_mag[latents].unsqueeze(1))
                return gate, (gate > 0).to(magnitude.dtype) * magnitude

            def loss(self, x, *, l1_alpha, dead_mask=None):
                gate, magnitude = self._paths(x)
                f = (gate > 0).to(magnitude.dtype) * magnitude
                x_hat = self.decode(f)
                mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
                gate_on = torch.relu(gate)
                l1 = (gate_on * self.decoder_norms()).sum(dim=-1).mean()
                x_aux = gate_on @ self.W_dec + self.b_dec
                aux = (x - x_aux).pow(2).sum(dim=-1).mean() / self.d_in
                sparsity = l1_alpha * l1
                return LossParts(mse + sparsity + aux, mse, sparsity + aux, l1), x_hat, f

            def latent_biases(self):
                return (self.b_gate, self.b_mag, self.r_mag)

        return GatedSAE

    def check(self, cfg) -> None:
        check_penalty(cfg, self.title)

    def recommend(self, out, *, source, latent_dim, target_l0, steps, batch) -> None:
        start = start_l1_alpha(source.d_in, latent_dim, target_l0, steps, batch, offset=source.l0_offset)
        out["l1_alpha"] = (start, "the standard SAE's l1_alpha for this run: steering ended within a factor of 1.6 of "
                                  "it on three synthetic sources, and a start far above its end costs feature quality")
        out["steer_l1_alpha"] = (True, "the L0 model does not predict a Gated SAE's L0: steering moves l1_alpha "
                                       "to the target once the warm-up is over")

    def presets(self, d_in, latent, k, common):
        start = start_l1_alpha(d_in, latent, common["target_l0"], common["total_steps"], common["batch_size"])
        return [("Gated", {"l1_alpha": start, "steer_l1_alpha": True},
                 f"Gated SAE starting at l1_alpha {start:g} (the standard SAE's value from the L0 model) with "
                 "steering on, which moves the penalty to the target L0.")]

    def summary(self, config) -> str:
        return f"l1_alpha={num(config.get('l1_alpha'))}"

    def describe(self, run):
        return {"l1_alpha": f"{num(run.l1_alpha)} on the gate's pre-activations"}

    def validate(self, cfg, source, add) -> None:
        from ...validation import Finding

        if cfg.get("l1_alpha") is not None and not cfg.get("steer_l1_alpha"):
            add(Finding("info", "steer_l1_alpha", "The L0 model is fitted on standard SAEs and makes no prediction "
                        "for a Gated SAE: switch steering on to bring L0 to the target.", "Switch steering on."))

    def tensor_names(self):
        return ("W_enc", "W_dec", "b_gate", "b_mag", "r_mag", "b_dec")

    def saelens_shapes(self, d_in, d_sae):
        return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_gate": (d_sae,), "b_mag": (d_sae,),
                "r_mag": (d_sae,), "b_dec": (d_in,)}

    def fold(self, weights, c):
        # c·x: W_enc·c and b_dec/c leave both paths' pre-activations as they were; the biases and r_mag stay
        import numpy as np

        return {"W_enc": (weights["W_enc"].astype(np.float64) * c).astype(np.float32),
                "W_dec": (weights["W_dec"].astype(np.float64) / c).astype(np.float32),
                **{name: weights[name].astype(np.float32) for name in ("b_gate", "b_mag", "r_mag")},
                "b_dec": (weights["b_dec"].astype(np.float64) / c).astype(np.float32)}


# Where steering ends for a Gated SAE, against the standard SAE's l1_alpha that the L0 model gives for
# the same d_in, width, target and run: 1.43 and 1.55 times it on the two ground-truth generators (d_in
# 256, 2,048 latents, L0 16 and 19, 2,929 steps of 512), 0.69 times it on the default source (1,024
# latents, target 2%, 3,000 steps of 1,024). So steering starts there: it climbs (slowly, by design) or
# retreats by less than a factor of two, and a start near the end lands with the features a fixed
# penalty finds (the docstring).


def start_l1_alpha(d_in: int, latent_dim: int, target_l0: float, steps: int, batch: int,
                   offset: float = 0.0) -> float:
    """Where steering a Gated SAE's l1_alpha starts: the standard SAE's value for the run, from the L0
    model, to two significant digits (unrounded where rounding would leave the valid range)."""
    from ...training_config import L1_ALPHA_MIN_EXCLUSIVE
    from ...validation import recommended_l1_alpha

    standard = recommended_l1_alpha(d_in, latent_dim, target_l0, steps=steps, batch_size=batch, offset=offset)
    rounded = float(f"{standard:.2g}")
    return rounded if rounded > L1_ALPHA_MIN_EXCLUSIVE else standard


ARCH = Gated()
