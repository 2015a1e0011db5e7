"""Activation files: inspection and memory-mapped reading, with numpy only.

Kept free of torch so the web process can refuse a bad upload without importing it.
Accepted: ``.npy`` and ``.safetensors`` holding one 2-D float array (rows = tokens).
``.pt`` files are converted to ``.npy`` by ``app.sae.pt_convert`` in a child process.
"""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

FLOAT_DTYPES = {"float16", "float32", "float64"}
SAFETENSORS_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64"}
SCAN_ROWS = 65536


class ActivationFileError(UserError, ValueError):
    """The file cannot be used as activations; the message says why, for the user."""


@dataclass(frozen=True)
class ArrayInfo:
    """Where a 2-D float array lies in a file, enough to memory-map it."""

    format: str  # "npy" or "safetensors"
    dtype: str
    rows: int
    d_in: int
    offset: int  # byte offset of the first element

    def to_dict(self) -> dict:
        return asdict(self)


NPY_MAGIC = b"\x93NUMPY"


def _not_npy(head: bytes) -> str:
    """Why a file named .npy is not one, in terms of what it is."""
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0][:40] if text.strip() else ""
        return (f"this is a text file (it begins {first!r}), not a NumPy array: write the activations with "
                "numpy.save(path, array), which gives a binary .npy file")
    return ("not a .npy file: it does not begin with NumPy's header (\\x93NUMPY); write the activations with "
            "numpy.save(path, array)")


def _npy_info(path: Path) -> ArrayInfo:
    with path.open("rb") as fh:
        head = fh.read(256)
    if not head.startswith(NPY_MAGIC):
        raise ActivationFileError(_not_npy(head))
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "pickle" in str(exc) or "Python objects" in str(exc):  # an object array: never loaded, since unpickling runs code
            raise ActivationFileError("the .npy file holds Python objects, not numbers; save a float array "
                                      "(for example array.astype('float32'))") from exc
        raise ActivationFileError(f"not a plain numeric .npy array ({exc})") from exc
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise ActivationFileError(f"not a readable .npy file ({exc})") from exc
    if not isinstance(arr, np.memmap):
        raise ActivationFileError("the .npy file holds no array that can be memory-mapped")
    if arr.dtype.fields is not None:
        raise ActivationFileError("the .npy file holds a structured array, not a float array")
    if arr.ndim != 2:
        raise ActivationFileError(f"expected a 2-D array (tokens × d_in), got shape {tuple(arr.shape)}")
    if not arr.flags.c_contiguous:
        raise ActivationFileError("the .npy array is stored in Fortran order; save it C-contiguous")
    return ArrayInfo("npy", str(arr.dtype), int(arr.shape[0]), int(arr.shape[1]), int(arr.offset))


def _safetensors_info(path: Path) -> ArrayInfo:
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ActivationFileError("not a .safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len <= 0 or 8 + header_len > size or header_len > 100 * 2**20:
            raise ActivationFileError("not a .safetensors file (bad header length)")
        try:
            header = json.loads(fh.read(header_len))
        except (ValueError, RecursionError) as exc:
            raise ActivationFileError("not a .safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise ActivationFileError("not a .safetensors file (the header is not a JSON object)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    bad = [k for k, v in tensors.items() if not isinstance(v, dict)]
    if bad:
        raise ActivationFileError(f"not a .safetensors file (entry {str(bad[0])[:40]!r} is not a tensor)")
    if not tensors:
        raise ActivationFileError("the .safetensors file holds no tensor")
    if len(tensors) > 1:
        if "activations" not in tensors:
            raise ActivationFileError(
                f"the .safetensors file holds {len(tensors)} tensors; name the activations "
                "tensor 'activations' or store only one")
        name = "activations"
    else:
        (name,) = tensors
    spec = tensors[name]
    dtype = SAFETENSORS_DTYPES.get(spec.get("dtype"))
    if dtype is None:
        raise ActivationFileError(
            f"tensor {name!r} has dtype {spec.get('dtype')}; expected F16, F32 or F64")
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(_count(v) for v in shape):
        raise ActivationFileError(f"expected a 2-D tensor (tokens × d_in), got shape {str(shape)[:40]}")
    offsets = spec.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_count(v) for v in offsets) \
            or offsets[0] > offsets[1]:
        raise ActivationFileError("the .safetensors file's data offsets are missing or invalid")
    start, end = offsets
    rows, d_in = int(shape[0]), int(shape[1])
    if end - start != rows * d_in * np.dtype(dtype).itemsize or 8 + header_len + end > size:
        raise ActivationFileError("the .safetensors file is truncated or inconsistent")
    return ArrayInfo("safetensors", dtype, rows, d_in, 8 + header_len + start)


def _count(value) -> bool:
    """A non-negative integer of sane size (JSON may hold anything)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**62


def holdout_rows(rows: int, *, fraction: float = 0.05, cap: int = 16384) -> int:
    """How many final rows of a file are kept out of training, for evaluation."""
    return min(cap, int(rows * fraction))


def open_array(path: Path | str, info: ArrayInfo) -> np.memmap:
    """Memory-map the array described by ``info`` read-only."""
    return np.memmap(path, dtype=info.dtype, mode="r", offset=info.offset, shape=(info.rows, info.d_in))


def inspect_activation_file(path: Path | str, *, min_rows: int, max_bytes: int) -> ArrayInfo:
    """Check that ``path`` holds usable activations and say where they lie.

    Refuses (``ActivationFileError``) a file over ``max_bytes``, one that is not a 2-D
    float array, one with fewer than ``min_rows`` rows, or one holding NaN or Inf.
    """
    path = Path(path)
    if path.stat().st_size > max_bytes:
        raise ActivationFileError(f"the file is larger than the limit of {max_bytes:,} bytes")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        info = _npy_info(path)
    elif suffix == ".safetensors":
        info = _safetensors_info(path)
    else:
        raise ActivationFileError(f"unsupported file type {suffix or '(none)'}; use .npy, .safetensors or .pt")
    if info.dtype not in FLOAT_DTYPES:
        raise ActivationFileError(f"expected a float array, got dtype {info.dtype}")
    if info.d_in < 1:
        raise ActivationFileError("the array has no columns")
    if info.rows < min_rows:
        raise ActivationFileError(f"the array has {info.rows:,} rows; at least {min_rows:,} (one batch) are needed")
    arr = open_array(path, info)
    for start in range(0, info.rows, SCAN_ROWS):
        chunk = np.asarray(arr[start:start + SCAN_ROWS])
        if not np.isfinite(chunk).all():
            bad = start + int(np.argwhere(~np.isfinite(chunk))[0][0])
            raise ActivationFileError(f"the array holds NaN or Inf (first at row {bad:,})")
    return info
