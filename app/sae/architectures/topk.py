"""TopK: exactly the ``k`` largest pre-activations (after ReLU) fire per token; AuxK for dead latents."""
from __future__ import annotations

from ...training_config import target_l0_count
from ._base import K, Architecture, check_k

NAME = "topk"


class TopK(Architecture):
    name = NAME
    label = "TopK (exactly k active per token)"
    title = "TopK"
    order = 20
    sparsity_set_by = K
    shared = ("k",)
    aux_k = True
    saelens = NAME
    extra_latents_per_token = 2
    knob_hint = "TopK fixes L0 at"
    how_k = "fixes L0 at k"  # the validator's sentence about a target above k
    dead_advice = "Lower the learning rate or raise k."

    def define_model(self):
        import torch

        from ..metrics import SparseLatents
        from ..models import LossParts, SparseAutoencoder
        from ..sparse_topk import TopKEncode, sparse_decode

        class TopKSAE(SparseAutoencoder):
            """TopK SAE: exactly the ``k`` largest pre-activations (after ReLU) are kept per token.

            Dead latents get gradient from the AuxK loss: the ``k_aux`` largest pre-activations
            among dead latents reconstruct the main model's residual, weighted by ``aux_coeff``.
            Decoder rows are kept at unit norm after every step.
            """

            architecture = NAME
            row_cut = True  # a latent fires on a row when its pre-activation is among the row's k largest

            def __init__(self, d_in, d_sae, *, k, aux_coeff=1 / 32, generator=None, device="cpu", sparse=True,
                         sparse_with_aux=True):
                super().__init__(d_in, d_sae, generator=generator, device=device)
                if not 1 <= k <= d_sae:
                    raise ValueError(f"k must lie in [1, {d_sae}], got {k}")
                self.k, self.aux_coeff = k, aux_coeff
                # sparse: the training step touches only the k chosen latents per token (sparse_topk);
                # dense: the same maths with dense matrices (kept as the reference the tests compare to).
                # sparse_with_aux: whether a step with AuxK on (its k_aux latents chosen too) stays sparse;
                # a narrow SAE's such steps run faster densely (sparse_topk.worth_sparse)
                self.sparse, self.sparse_with_aux = sparse, sparse and sparse_with_aux
                with torch.no_grad():
                    self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True))
                    self.W_enc.copy_(self.W_dec.t())

            def _topk(self, pre, k):
                values, indices = pre.topk(k, dim=-1)
                return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

            def activate(self, pre):
                return self._topk(pre, self.k)

            @property
            def k_aux(self) -> int:
                return max(1, min(self.d_in // 2, self.d_sae))

            def loss(self, x, *, l1_alpha=0.0, dead_mask=None):
                if self.sparse and (dead_mask is None or self.sparse_with_aux):
                    return self._sparse_loss(x, dead_mask)
                pre = self.pre_activation(x)
                f = self._topk(pre, self.k)
                x_hat = self.decode(f)
                mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
                l1 = (f * self.decoder_norms()).sum(dim=-1).mean().detach()
                aux = self.aux_loss(x, x_hat, pre, dead_mask)
                return LossParts(mse + aux, mse, aux, l1), x_hat, f

            def _sparse_loss(self, x, dead_mask):
                values, indices, aux_values, aux_indices = TopKEncode.apply(
                    x - self.b_dec, self.W_enc, self.b_enc, self.k, dead_mask, self.k_aux)
                acts = torch.relu(values).float()
                x_hat = sparse_decode(indices, acts, self.W_dec, self.b_dec)
                mse = (x - x_hat).pow(2).sum(dim=-1).mean() / self.d_in
                l1 = (acts * self.decoder_norms()[indices]).sum(dim=-1).mean().detach()
                if dead_mask is None:
                    aux = torch.zeros((), device=x.device)
                else:
                    aux_acts = torch.relu(torch.nan_to_num(aux_values.float(), nan=0.0, neginf=0.0))
                    residual = (x - x_hat).detach()
                    aux_hat = sparse_decode(aux_indices, aux_acts, self.W_dec, torch.zeros_like(self.b_dec))
                    aux = self.aux_coeff * (residual - aux_hat).pow(2).sum(dim=-1).mean() / self.d_in * dead_mask.any()
                return LossParts(mse + aux, mse, aux, l1), x_hat, SparseLatents(indices, acts.detach(), self.d_sae)

            def after_step(self) -> None:
                with torch.no_grad():
                    self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

        return TopKSAE

    def build(self, d_in, d_sae, cfg, *, generator=None, device="cpu", sparse_topk=None):
        """``sparse_topk``: True or False forces the path; None takes the sparse one, but for the steps
        with AuxK on of an SAE too narrow for it to pay (``sparse_topk.worth_sparse``)."""
        if cfg.k is None:
            raise ValueError(f"a {self.name} SAE needs k")
        with_aux = sparse_topk is not False
        if sparse_topk is None:
            from ..sparse_topk import worth_sparse

            with_aux = worth_sparse(d_in, d_sae, cfg.k)
        return self.model_class()(d_in, d_sae, k=cfg.k, generator=generator, device=device,
                                  sparse=sparse_topk is not False, sparse_with_aux=with_aux)

    def check(self, cfg) -> None:
        check_k(cfg)

    def recommend(self, out, *, source, latent_dim, target_l0, steps, batch) -> None:
        from ...quality import format_target

        out["k"] = (max(1, round(target_l0_count(target_l0, latent_dim))), f"{self.title}'s L0 is k: "
                                                           f"{format_target(target_l0, latent_dim)}")

    def presets(self, d_in, latent, k, common):
        return [(f"TopK k={k}", {"k": k},
                 f"TopK with k = {k} (L0 = k by construction) and 8× expansion, a common starting point.")]

    def summary(self, config) -> str:
        return f"k={config.get('k')}"

    def describe(self, run):
        return {"k": f"{run.k} on every token"}

    def advise_sparser(self, *, target_k, target_l0, l0_fraction):
        return f"Lower k to about {target_k}."

    def advise_denser(self, *, target_k):
        return f"Raise k to about {target_k}."

    def saelens_cfg(self, k):
        return {"k": int(k), "rescale_acts_by_decoder_norm": False}

    def read_saelens(self, cfg, d_sae):
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not isinstance(k, int) or not 0 < k <= d_sae:
            raise ValueError(f"a {NAME} SAE needs an integer k between 1 and d_sae")
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise ValueError("rescale_acts_by_decoder_norm is not supported")
        return k


ARCH = TopK()
