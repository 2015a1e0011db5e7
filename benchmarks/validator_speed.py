"""How long the pre-training validator takes, beside the form's own field validation.

Usage: python benchmarks/validator_speed.py
Prints, for the same config in the same process: field validation alone (the baseline the
form always pays), the validator's pure rules, and the whole preflight including the device
memory read. The target is "well under 100 ms" per config.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def per_call_ms(fn, repeat: int = 200) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def main() -> None:
    os.environ.setdefault("DATA_DIR", tempfile.mkdtemp())
    from werkzeug.datastructures import MultiDict

    from app import create_app
    from app.forms import TrainingForm
    from app.validation import SourceStats, validate_config

    app = create_app({"TESTING": True, "WTF_CSRF_ENABLED": False})
    data = MultiDict({"source_id": "1", "architecture": "standard", "latent_dim": "8192", "l1_alpha": "0.0003",
                      "learning_rate": "0.0003", "batch_size": "4096", "total_steps": "30000",
                      "lr_warmup_steps": "1000", "l1_warmup_steps": "1500", "target_l0": "0.01", "seed": "0",
                      "log_every": "20", "dead_window_tokens": "200000", "early_stop_step": "1000",
                      "early_stop_l0": "0.2", "plateau_window": "2000", "dead_latent_remedy": "none",
                      "checkpoint_every_steps": "2000", "checkpoint_every_minutes": "5", "precision": "auto"})
    cfg = {k: (float(v) if "." in v else int(v)) if v[0].isdigit() else v for k, v in data.items()}
    cfg.update(early_stop=True, steer_l1_alpha=False)
    with app.test_request_context(method="POST", data=data):
        fields = per_call_ms(lambda: TrainingForm(formdata=data).validate_fields())
        rules = per_call_ms(lambda: validate_config(cfg, SourceStats(768, 10_000_000), free_memory_bytes=2**34))
        full = per_call_ms(lambda: TrainingForm(formdata=data).validate())
    print(f"field validation only (baseline): {fields:7.3f} ms per config")
    print(f"validator rules (pure):           {rules:7.3f} ms per config")
    print(f"form + validator + device memory: {full:7.3f} ms per config (target: well under 100 ms)")


if __name__ == "__main__":
    main()
