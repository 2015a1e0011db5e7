"""TopK that does the work of k latents, not of all of them.

A TopK step's dense cost is the encoder's forward matmul: every pre-activation must be known
to pick the k largest. Everything after touches only the chosen latents:

- the decoder is a weighted gather of k decoder rows per token (``embedding_bag``), and its
  backward adds into those k rows only;
- the encoder's backward needs the gradient of the k chosen pre-activations per token, so
  its weight gradient is an index-add of k scaled input rows per token into ``W_encᵀ``
  instead of a dense ``xᵀ · grad`` matmul over all ``d_sae`` columns, and the input's
  gradient is again a weighted gather.

Per token that is ``2·d_in·d_sae`` multiply-adds (the forward matmul) plus ``O(k·d_in)``,
against about ``6·d_in·d_sae`` for the same maths done densely (forward, two backward
matmuls, dense decode and its two backward matmuls). Plain PyTorch: it runs on the CPU and
on CUDA with no compiler. ``TopKSAE`` uses it when ``sparse=True``; the tests compare its
forward, gradients and a short run's weights with the dense path. With AuxK on it pays only for wide
SAEs (``worth_sparse``): a narrow one's AuxK steps run densely (``TopK.build``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Rows per chunk of the encoder's weight-gradient index-add: bounds the temporary
# [rows·k, d_in] product to a few tens of MB whatever the batch.
CHUNK_ELEMENTS = 8_000_000

# The index-adds cost per chosen latent far more than a dense matmul costs per latent. With k alone the
# sparse path won at every shape measured; with AuxK on (its k_aux = d_in / 2 latents chosen too) it
# pays only when the latents outnumber the chosen ones by about this much: on the CPU
# (benchmarks/topk_paths.py) dense was 2x faster at 256 -> 1,024 with k 32 (ratio 6.4), even at 13.7,
# and sparse 1.15x faster at 18.3 and 1.5x at 19.7.
SPARSE_MIN_RATIO = 16


def worth_sparse(d_in: int, d_sae: int, k: int) -> bool:
    """Whether the sparse path beats the dense one for a step of a TopK SAE of this shape with AuxK on
    (``SPARSE_MIN_RATIO``)."""
    k_aux = max(1, min(d_in // 2, d_sae))  # AuxK's latents, chosen beside the k (TopKSAE.k_aux)
    return d_sae >= SPARSE_MIN_RATIO * (k + k_aux)


class TopKEncode(torch.autograd.Function):
    """``(values, indices)`` of the k largest of ``x_c @ W_enc + b_enc`` per row, and
    optionally the ``k_aux`` largest among ``dead`` latents (AuxK), with a sparse backward.

    Values are the raw pre-activations; the caller applies ReLU (whose zero gradient below 0
    then reaches the backward here as a zero).
    """

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, k: int, dead: torch.Tensor | None, k_aux: int):
        pre = torch.addmm(b_enc, x_c, W_enc)
        values, indices = pre.topk(k, dim=-1, sorted=False)
        if dead is not None:
            aux_values, aux_indices = pre.masked_fill(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
        else:
            aux_values = aux_indices = None
        ctx.save_for_backward(x_c, W_enc, indices, aux_indices if aux_indices is not None else indices)
        ctx.has_aux = dead is not None
        ctx.mark_non_differentiable(indices)
        if aux_indices is not None:
            ctx.mark_non_differentiable(aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, grad_indices, grad_aux_values, grad_aux_indices):
        x_c, W_enc, indices, aux_indices = ctx.saved_tensors
        parts = [(indices, grad_values)]
        if ctx.has_aux and grad_aux_values is not None:
            # -inf candidates (fewer dead latents than k_aux) carry no gradient
            parts.append((aux_indices, torch.nan_to_num(grad_aux_values, nan=0.0, posinf=0.0, neginf=0.0)))
        parts = [(i, g) for i, g in parts if g is not None]
        idx = torch.cat([i for i, _ in parts], dim=1) if len(parts) > 1 else parts[0][0]
        grad = torch.cat([g for _, g in parts], dim=1) if len(parts) > 1 else parts[0][1]
        grad = grad.to(x_c.dtype)
        d_sae = W_enc.shape[1]
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W_enc.t().contiguous(), per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_Wt = torch.zeros(d_sae, x_c.shape[1], dtype=W_enc.dtype, device=W_enc.device)
            per_row = idx.shape[1]
            rows = max(1, CHUNK_ELEMENTS // max(1, per_row * x_c.shape[1]))
            for start in range(0, x_c.shape[0], rows):
                i = idx[start:start + rows]
                contrib = x_c[start:start + rows].unsqueeze(1) * grad[start:start + rows].unsqueeze(2)
                grad_Wt.index_add_(0, i.reshape(-1), contrib.reshape(-1, x_c.shape[1]).to(grad_Wt.dtype))
            grad_W = grad_Wt.t()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=W_enc.dtype, device=W_enc.device).index_add_(
                0, idx.reshape(-1), grad.reshape(-1).to(W_enc.dtype))
        return grad_x, grad_W, grad_b, None, None, None


def sparse_decode(indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """``Σ_j values[:, j] · W_dec[indices[:, j]] + b_dec``: the decoder, touching k rows per token."""
    return F.embedding_bag(indices, W_dec, per_sample_weights=values.to(W_dec.dtype), mode="sum") + b_dec


def scatter_dense(indices: torch.Tensor, values: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The dense ``[batch, d_sae]`` latent matrix of a sparse code (for metrics and callers that want it)."""
    return torch.zeros(values.shape[0], d_sae, dtype=values.dtype, device=values.device).scatter_(-1, indices, values)
