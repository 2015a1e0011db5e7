"""BatchTopK: the ``k · batch`` largest activations of the batch fire in training; a threshold at inference."""
from __future__ import annotations

from . import jumprelu, topk
from ._base import K, Architecture, check_k

NAME = "batchtopk"


class BatchTopK(Architecture):
    name = NAME
    label = "BatchTopK (k active per token on average over the batch)"
    title = "BatchTopK"
    order = 30
    presets_since = 12
    sparsity_set_by = K
    shared = ("k",)
    aux_k = True
    l0_finder = True  # "Sparse but Wrong" studies BatchTopK; the L0 finder's ladder is trained on it
    inference_as = jumprelu.ARCH  # its thresholds make it a JumpReLU: loads and exports as one
    extra_latents_per_token = 4  # the dense selection and its gradient
    knob_hint = "BatchTopK keeps on average"
    how_k = "keeps k latents per token on average: L0 is k"
    dead_advice = "Lower the learning rate or raise k."

    def define_model(self):
        import torch

        from ..models import LossParts

        class BatchTopKSAE(topk.ARCH.model_class()):
            """BatchTopK SAE: in training, the ``k · batch`` largest activations of the whole batch are kept,
            so a token keeps k latents on average but more when it holds more and fewer when it holds less.

            At inference a token cannot see its batch, so the SAE becomes a JumpReLU: a latent fires when
            its pre-activation exceeds ``threshold``. The threshold is an exponential moving average
            (rate ``threshold_rate``) of the batch's cut, the smallest activation the batch top-k kept.
            That cut is one value for the whole batch, so every latent's threshold is that value (with
            unit-norm decoder rows, the selection needs no per-latent scale); it is stored per latent,
            the layout JumpReLU SAEs export in.
            """

            architecture = NAME
            row_cut = False
            threshold_rate = 0.01

            def __init__(self, d_in, d_sae, *, k, aux_coeff=1 / 32, generator=None, device="cpu"):
                super().__init__(d_in, d_sae, k=k, aux_coeff=aux_coeff, generator=generator, device=device,
                                 sparse=False)
                self.register_buffer("threshold", torch.zeros(d_sae, device=device))
                self.register_buffer("threshold_seen", torch.zeros((), dtype=torch.bool, device=device))

            def batch_topk(self, pre):
                acts = torch.relu(pre)
                flat = acts.flatten()
                values, indices = flat.topk(min(self.k * acts.shape[0], flat.numel()), sorted=False)
                return torch.zeros_like(flat).scatter_(0, indices, values).view_as(acts)

            def activate(self, pre):
                if self.training:
                    return self.batch_topk(pre)
                return pre * (pre > self.threshold.to(pre.dtype))

            @torch.no_grad()
            def update_threshold(self, f) -> None:
                """Move the threshold toward this batch's cut; no host sync (a batch with nothing kept is skipped)."""
                f = f.detach().float()
                cut = f.masked_fill(f <= 0, float("inf")).min()
                found = torch.isfinite(cut)
                cut = torch.where(found, cut, torch.zeros_like(cut))
                moved = torch.where(self.threshold_seen,
                                    (1 - self.threshold_rate) * self.threshold + self.threshold_rate * cut,
                                    cut.expand_as(self.threshold))
                self.threshold.copy_(torch.where(found, moved, self.threshold))
                self.threshold_seen.logical_or_(found)

            def _select(self, x):
                pre = self.pre_activation(x)
                f = self.batch_topk(pre)
                self.update_threshold(f)
                return pre, f

            def loss(self, x, *, l1_alpha=0.0, dead_mask=None):
                pre, f = self._select(x)
                x_hat = self.decode(f)
                mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
                l1 = (f * self.decoder_norms()).sum(dim=-1).mean().detach()
                aux = self.aux_loss(x, x_hat, pre, dead_mask)
                return LossParts(mse + aux, mse, aux, l1), x_hat, f

        return BatchTopKSAE

    def build(self, d_in, d_sae, cfg, *, generator=None, device="cpu", sparse_topk=None):
        if cfg.k is None:
            raise ValueError(f"a {self.name} SAE needs k")
        return self.model_class()(d_in, d_sae, k=cfg.k, generator=generator, device=device)

    def check(self, cfg) -> None:
        check_k(cfg)

    recommend = topk.TopK.recommend
    summary = topk.TopK.summary
    advise_sparser = topk.TopK.advise_sparser
    advise_denser = topk.TopK.advise_denser

    def presets(self, d_in, latent, k, common):
        return [(f"BatchTopK k={k}", {"k": k},
                 f"BatchTopK with k = {k} on average per token (L0 = k by construction; a threshold at inference).")]

    def describe(self, run):
        return {"k": f"{run.k} on average over each batch; a learned threshold at inference"}


ARCH = BatchTopK()
