"""Convert a ``.pt`` activation file to ``.npy`` without executing pickled code.

Run as ``python -m app.sae.pt_convert SRC DST``; it exits 0 on success and otherwise 2
with the reason on stderr. The web process runs it as a child so it never imports torch.
"""
from __future__ import annotations

import sys

import numpy as np
import torch


def convert(src: str, dst: str) -> None:
    """Load ``src`` with ``weights_only=True`` (no arbitrary code) and save its tensor."""
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - the reason goes back to the user
        raise ValueError(f"not a loadable tensor file without executing code ({type(exc).__name__})") from exc
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        if len(tensors) == 1:
            (obj,) = tensors.values()
        elif "activations" in tensors:
            obj = tensors["activations"]
        else:
            raise ValueError("the .pt file holds a dict without a single tensor or an 'activations' tensor")
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"the .pt file holds a {type(obj).__name__}, not a tensor")
    if obj.dtype == torch.bfloat16:
        obj = obj.float()
    if obj.dtype not in (torch.float16, torch.float32, torch.float64):
        raise ValueError(f"expected a float tensor, got dtype {str(obj.dtype).removeprefix('torch.')}")
    if obj.dim() != 2:
        raise ValueError(f"expected a 2-D tensor (tokens × d_in), got shape {tuple(obj.shape)}")
    np.save(dst, obj.contiguous().numpy())


def main(argv: list[str]) -> int:
    try:
        convert(argv[1], argv[2])
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
