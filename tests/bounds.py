"""Each numeric field's bounds: (field, value, accepted, other fields to change)."""
from __future__ import annotations

BOUNDS = [
    ("latent_dim", 16, True, {"target_l0": 0.1}), ("latent_dim", 15, False, {"target_l0": 0.1}),
    ("latent_dim", 1_048_576, True, {}), ("latent_dim", 1_048_577, False, {}),
    ("l1_alpha", 1.1e-5, True, {}), ("l1_alpha", 1e-5, False, {}),
    ("l1_alpha", 0.1, True, {}), ("l1_alpha", 0.1000001, False, {}),
    ("k", 1, True, {"architecture": "topk", "target_l0": 1 / 256}), ("k", 0, False, {"architecture": "topk"}),
    ("k", 65_536, True, {"architecture": "topk", "latent_dim": 65_536}),
    ("k", 65_537, False, {"architecture": "topk", "latent_dim": 131_072}),
    ("learning_rate", 1e-6, True, {}), ("learning_rate", 9.9e-7, False, {}),
    ("learning_rate", 0.1, True, {}), ("learning_rate", 0.1001, False, {}),
    ("batch_size", 16, True, {}), ("batch_size", 15, False, {}),
    ("batch_size", 65_536, True, {}), ("batch_size", 65_537, False, {}),
    ("total_steps", 10, True, {"lr_warmup_steps": 0, "l1_warmup_steps": 0}),
    ("total_steps", 9, False, {"lr_warmup_steps": 0, "l1_warmup_steps": 0}),
    ("total_steps", 10_000_000, True, {}), ("total_steps", 10_000_001, False, {}),
    ("lr_warmup_steps", 0, True, {}), ("lr_warmup_steps", -1, False, {}),
    ("lr_warmup_steps", 200, True, {"total_steps": 200}), ("lr_warmup_steps", 201, False, {"total_steps": 200}),
    ("l1_warmup_steps", 0, True, {}), ("l1_warmup_steps", -1, False, {}),
    ("l1_warmup_steps", 200, True, {"total_steps": 200}), ("l1_warmup_steps", 201, False, {"total_steps": 200}),
    ("target_l0", 0.0001, True, {"latent_dim": 16_384}), ("target_l0", 0, False, {}),
    ("target_l0", 0.5, True, {}), ("target_l0", 0.5001, False, {}),
    ("seed", 0, True, {}), ("seed", -1, False, {}),
    ("seed", 2**31 - 1, True, {}), ("seed", 2**31, False, {}),
    ("log_every", 1, True, {}), ("log_every", 0, False, {}),
    ("log_every", 10_000, True, {}), ("log_every", 10_001, False, {}),
    ("dead_window_tokens", 1_000, True, {}), ("dead_window_tokens", 999, False, {}),
    ("dead_window_tokens", 1_000_000_000, True, {}), ("dead_window_tokens", 1_000_000_001, False, {}),
    ("aux_window_tokens", 1, True, {}), ("aux_window_tokens", 0, False, {}),
    ("aux_window_tokens", 1_000_000_000, True, {}), ("aux_window_tokens", 1_000_000_001, False, {}),
    ("k", 300, False, {"architecture": "topk", "latent_dim": 256}),  # k above latent_dim
    ("early_stop_step", 1, True, {}), ("early_stop_step", 0, False, {}),
    ("early_stop_l0", 0.01, True, {}), ("early_stop_l0", 0, False, {}),
    ("early_stop_l0", 1, True, {}), ("early_stop_l0", 1.01, False, {}),
    ("plateau_window", 10, True, {}), ("plateau_window", 9, False, {}),
    ("checkpoint_every_steps", 10, True, {}), ("checkpoint_every_steps", 9, False, {}),
    ("checkpoint_every_minutes", 0.05, True, {}), ("checkpoint_every_minutes", 0.04, False, {}),
    ("checkpoint_every_minutes", 1440, True, {}), ("checkpoint_every_minutes", 1441, False, {}),
    ("precision", "bfloat16", True, {}), ("precision", "float64", False, {}),
]


def bound_id(case) -> str:
    field, value, accepted, _ = case
    return f"{field}={value}-{'ok' if accepted else 'refused'}"
