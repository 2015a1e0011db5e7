"""What an SAE does to the model: splice its reconstruction back in at the hook and measure.

For every batch of held-out text the model runs three times: clean, with the SAE's
reconstruction in place of the activation at (layer, site) ("spliced"), and with that
activation set to zero ("ablated"). Positions the SAE was not trained on (special tokens,
when the extraction left them out) keep their clean activation in both.

- A causal LM is judged by its next-token predictions: the cross-entropy clean, spliced and
  ablated, the **CE-loss score** ``(CE_ablated − CE_spliced) / (CE_ablated − CE_clean)``, the
  KL divergence of the spliced and ablated next-token distributions from the clean one, and
  the **KL score** ``(KL_ablated − KL_spliced) / KL_ablated``. 1 is a perfect SAE; 0 is no
  better than deleting the activation.
- An encoder (the bundled MiniLM) has no next-token loss, so its final hidden states stand in:
  the damage is the mean squared distance of the final hidden states from the clean ones, and
  the **fidelity score** is the same formula, ``(damage_ablated − damage_spliced) / damage_ablated``.

At the hook itself, on the spliced positions (raw activations, x̂ the reconstruction):
**L2 ratio** mean ‖x̂‖/‖x‖, **cosine** mean cos(x, x̂), **relative reconstruction bias**
Σ‖x̂‖² / Σ⟨x̂, x⟩ (1: unbiased; below 1: the SAE shrinks its reconstructions), and FVU.

These follow SAELens's ``evals.py`` and SAEBench's "core" metrics.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .capture import ExtractionError, MODEL_DTYPES, Tokenized, batches_of, find_site, resolve_model


@dataclass
class Sums:
    """Running sums over tokens; read once at the end."""

    values: dict = field(default_factory=dict)

    def add(self, **kv) -> None:
        for key, value in kv.items():
            self.values[key] = self.values.get(key, 0.0) + float(value)

    def __getitem__(self, key: str) -> float:
        return self.values.get(key, 0.0)


def load_for_eval(name: str, device: torch.device, dtype: str = "float32"):
    """Tokenizer and model with its head where it has one (a causal LM's logits are the point)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = resolve_model(name)
    try:
        config = AutoConfig.from_pretrained(path)
        causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or []))
        tokenizer = AutoTokenizer.from_pretrained(path)
        loader = AutoModelForCausalLM if causal else AutoModel
        model = loader.from_pretrained(path, dtype=MODEL_DTYPES[dtype])
    except Exception as exc:  # noqa: BLE001 - the loader's many error types, for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExtractionError(f"could not load the model {name!r}: {first}") from exc
    return tokenizer, model.to(device).eval(), causal


class Splice:
    """A forward hook that replaces the module's output on the masked positions."""

    def __init__(self, reconstruct: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.mode = "clean"
        self.mask: torch.Tensor | None = None
        self.reconstruct = reconstruct
        self.sums = Sums()
        self.x_sum: torch.Tensor | None = None  # Σx over the spliced positions, for the FVU's mean

    def __call__(self, module, args, output):
        if self.mode == "clean":
            return None
        act = output[0] if isinstance(output, tuple) else output
        new = act.clone()
        x = act[self.mask]
        if self.mode == "spliced":
            x_hat = self.reconstruct(x.float())
            xf = x.float()
            norms, norms_hat = xf.norm(dim=-1), x_hat.norm(dim=-1)
            self.sums.add(n=len(xf), l2_ratio=(norms_hat / norms.clamp_min(1e-12)).sum(),
                          cosine=torch.nn.functional.cosine_similarity(xf, x_hat, dim=-1).sum(),
                          hat_sq=x_hat.pow(2).sum(), hat_dot=(x_hat * xf).sum(), err=(xf - x_hat).pow(2).sum(),
                          x_sq=xf.pow(2).sum())
            column = xf.sum(dim=0, dtype=torch.float64)
            self.x_sum = column if self.x_sum is None else self.x_sum + column
            new[self.mask] = x_hat.to(act.dtype)
        else:
            new[self.mask] = 0
        return (new, *output[1:]) if isinstance(output, tuple) else new


def downstream_eval(model, tokenizer, causal: bool, sae, *, norm_scale: float, layer: int, site: str,
                    docs: Iterable[str], token_budget: int, context_length: int, batch_size: int,
                    exclude_special: bool, device: torch.device,
                    should_stop: Callable[[], str | None] | None = None,
                    on_progress: Callable[[float], None] | None = None) -> dict:
    """Splice ``sae`` (normalized space, scale ``norm_scale``) into ``model`` at (layer, site) over
    ``docs`` until ``token_budget`` tokens are scored; return the metrics (see the module's doc)."""
    module, _, _ = find_site(model, layer, site)
    tok = Tokenized(tokenizer, context_length)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    c = float(norm_scale)

    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return sae.decode(sae.encode(x * c)) / c

    splice = Splice(reconstruct)
    handle = module.register_forward_hook(splice)
    scored = Sums()
    tokens = 0
    try:
        for batch in batches_of(tok.windows(docs), batch_size):
            if should_stop is not None and (reason := should_stop()):
                raise InterruptedError(reason)
            width = max(len(w.ids) for w in batch)
            ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.bool)
            trained_on = torch.zeros((len(batch), width), dtype=torch.bool)
            for row, w in enumerate(batch):
                ids[row, :len(w.ids)] = torch.tensor(w.ids)
                mask[row, :len(w.ids)] = True
                positions = torch.tensor(w.positions)
                trained_on[row, :len(w.ids)] = positions >= 0 if exclude_special else True
            ids, mask, trained_on = ids.to(device), mask.to(device), trained_on.to(device)
            splice.mask = trained_on
            outputs = {}
            with torch.inference_mode():
                for mode in ("clean", "spliced", "ablated"):
                    splice.mode = mode
                    out = model(input_ids=ids, attention_mask=mask.long())
                    outputs[mode] = (out.logits if causal else out.last_hidden_state).float()
            if causal:
                valid = mask[:, :-1] & mask[:, 1:]
                target = ids[:, 1:][valid]
                logp = {m: torch.log_softmax(o[:, :-1][valid], dim=-1) for m, o in outputs.items()}
                p_clean = logp["clean"].exp()
                n = int(valid.sum())
                scored.add(n=n, **{f"ce_{m}": -lp.gather(1, target[:, None]).sum() for m, lp in logp.items()},
                           kl_spliced=(p_clean * (logp["clean"] - logp["spliced"])).sum(),
                           kl_ablated=(p_clean * (logp["clean"] - logp["ablated"])).sum())
            else:
                clean = outputs["clean"][mask]
                n = int(mask.sum())
                scored.add(n=n, damage_spliced=(outputs["spliced"][mask] - clean).pow(2).sum(dim=-1).sum(),
                           damage_ablated=(outputs["ablated"][mask] - clean).pow(2).sum(dim=-1).sum())
            tokens += int(mask.sum())
            if on_progress is not None:
                on_progress(min(1.0, tokens / token_budget))
            if tokens >= token_budget:
                break
    finally:
        handle.remove()
    if scored["n"] == 0 or splice.sums["n"] == 0:
        raise ExtractionError("the held-out text gave no tokens to score")
    hook = splice.sums
    variance = hook["x_sq"] - float(splice.x_sum.pow(2).sum()) / hook["n"]
    result = {"tokens": tokens, "scored_tokens": int(scored["n"]), "causal": causal,
              "l2_ratio": hook["l2_ratio"] / hook["n"], "cosine": hook["cosine"] / hook["n"],
              "relative_reconstruction_bias": hook["hat_sq"] / hook["hat_dot"] if hook["hat_dot"] else math.nan,
              "fvu": hook["err"] / variance if variance > 0 else math.nan}
    n = scored["n"]
    if causal:
        ce = {m: scored[f"ce_{m}"] / n for m in ("clean", "spliced", "ablated")}
        kl_s, kl_a = scored["kl_spliced"] / n, scored["kl_ablated"] / n
        result.update(ce_clean=ce["clean"], ce_spliced=ce["spliced"], ce_ablated=ce["ablated"],
                      ce_loss_score=score(ce["ablated"], ce["spliced"], ce["clean"]),
                      kl_spliced=kl_s, kl_ablated=kl_a, kl_score=score(kl_a, kl_s, 0.0))
        result["score"], result["score_name"] = result["ce_loss_score"], "CE-loss score"
    else:
        damage_s, damage_a = scored["damage_spliced"] / n, scored["damage_ablated"] / n
        result.update(damage_spliced=damage_s, damage_ablated=damage_a,
                      fidelity_score=score(damage_a, damage_s, 0.0))
        result["score"], result["score_name"] = result["fidelity_score"], "hidden-state fidelity"
    return result


def score(ablated: float, spliced: float, clean: float) -> float:
    """The share of the ablation's damage the SAE avoids: 1 perfect, 0 as bad as deleting the activation."""
    if not math.isfinite(ablated - clean) or ablated - clean <= 0:
        return math.nan
    return (ablated - spliced) / (ablated - clean)
