"""The standard SAE: ReLU latents, sparsity set by the decoder-norm-weighted L1 penalty ``l1_alpha``.

Loss per token: ``(1/d_in)·‖x − x̂‖² + l1_alpha · Σ_i f_i·‖W_dec,i‖`` (docs/design.md), the
penalty ramped from 0 over the sparsity warm-up. The L0 model (``app/l0_model.py``) is fitted
on this architecture, so the validator can predict where a penalty lands.
"""
from __future__ import annotations

from ._base import PENALTY, Architecture, check_penalty, num

NAME = "standard"


class Standard(Architecture):
    name = NAME
    label = "Standard (ReLU + L1 penalty)"
    title = "A standard SAE"
    order = 10
    sparsity_set_by = PENALTY
    shared = ("l1_alpha",)
    l0_model = True
    resample = True
    warmup = "sparsity"
    saelens = NAME
    saelens_default = True  # SAELens reads a cfg.json without an architecture as its standard SAE
    dead_advice = "Lower l1_alpha (the sparsity penalty) or switch on the dead-latent remedy."

    def define_model(self):
        import torch

        from ..models import LossParts, SparseAutoencoder

        class StandardSAE(SparseAutoencoder):
            """ReLU SAE trained with the decoder-norm-weighted L1 penalty of docs/design.md.

            Loss per token: ``(1/d_in)·‖x − x̂‖² + l1_alpha · Σ_i f_i·‖W_dec,i‖``. Weighting the
            L1 by the decoder norms means the model cannot shrink ``f`` by growing ``W_dec``, so
            the decoder needs no norm constraint.
            """

            architecture = NAME

            def activate(self, pre):
                return torch.relu(pre)

            def loss(self, x, *, l1_alpha, dead_mask=None):
                """Return ``(loss parts, x_hat, f)`` for a normalized batch ``x``."""
                f = self.encode(x)
                x_hat = self.decode(f)
                mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
                l1 = (f * self.decoder_norms()).sum(dim=-1).mean()
                sparsity = l1_alpha * l1
                return LossParts(mse + sparsity, mse, sparsity, l1), x_hat, f

        return StandardSAE

    def check(self, cfg) -> None:
        check_penalty(cfg, self.title)

    def recommend(self, out, *, source, latent_dim, target_l0, steps, batch) -> None:
        from ... import advice, l0_model
        from ...quality import format_target
        from ...validation import _round

        rec = advice.suggest(advice.Known(source.d_in, latent_dim, target_l0, steps, batch, source.l0_offset)).l1_alpha
        fit = l0_model.CALIBRATION
        learned = (f", corrected by {source.runs_seen} earlier run{'s' if source.runs_seen > 1 else ''} on this source"
                   if source.runs_seen else "")
        out["l1_alpha"] = (_round(rec), f"from the L0 model for {latent_dim:,} latents on d_in {source.d_in} at "
                                        f"{format_target(target_l0, latent_dim)} after {steps:,} steps "
                                        f"(fitted on {fit['runs_fitted']} runs{learned}; steering corrects what "
                                        "it misses)")
        out["steer_l1_alpha"] = (True, "the model is right to within about "
                                       f"{l0_model.band():.1f}× on sources it never saw; steering closes the rest "
                                       "once the warm-up is over")

    def presets(self, d_in, latent, k, common):
        settings, provenance = self.tuned_preset(d_in, {**common, "k": None})
        return [(NAME, settings, provenance)]

    def tuned_preset(self, d_in: int, config: dict) -> tuple[dict, str]:
        """A built-in preset's l1_alpha from the L0 model for its length, with steering on, and why."""
        from ...l0_model import CALIBRATION
        from ...validation import recommended_l1_alpha

        steps = config["total_steps"]
        alpha = float(f"{recommended_l1_alpha(d_in, config['latent_dim'], config['target_l0'], steps, config['batch_size']):.2g}")
        provenance = (f"l1_alpha from the L0 model for {steps:,} steps ({CALIBRATION['runs_fitted']} measured "
                      "runs, benchmarks/calibrate_l1_alpha.py), with steering on to close what the model misses"
                      + ("; at this width the model is extrapolated: watch the first run's early-stop check and "
                         "verdict." if d_in > 1024 else "."))
        return {"l1_alpha": alpha, "steer_l1_alpha": True}, provenance

    def summary(self, config) -> str:
        return f"l1_alpha={num(config.get('l1_alpha'))}"

    def describe(self, run):
        return {"l1_alpha": num(run.l1_alpha)}


ARCH = Standard()
