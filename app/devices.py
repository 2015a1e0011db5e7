"""The GPUs of this machine and their free memory, without importing torch or initialising CUDA.

Used by ``make run``'s supervisor (one worker per GPU), by the validator in the web process, and
by each worker to place jobs on its own device. Everything comes from ``nvidia-smi`` (a few tens
of milliseconds per call, so readings are cached for a moment); the CPU figure from /proc/meminfo.
No ``nvidia-smi``, or one that fails, means a CPU-only machine. This module imports the standard
library only: the supervisor loads it on its own, outside the app package.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass

QUERY = "--query-gpu=index,uuid,name,memory.total,memory.free"


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # "cuda:0" (nvidia-smi's index) or "cpu"
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's index (PCI bus order)
    uuid: str
    name: str
    total_bytes: int
    free_bytes: int

    @property
    def label(self) -> str:
        return f"GPU {self.index} ({self.name})"


_gpus_cache: tuple[float, list[Gpu] | None] = (-1e9, None)
GPU_CACHE_S = 1.0


def parse_gpus(text: str) -> list[Gpu]:
    """nvidia-smi's CSV (``index, uuid, name, memory.total, memory.free`` in MiB), one GPU a line."""
    gpus = []
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        index, uuid, rest = (part.strip() for part in line.split(",", 2))
        name, total, free = (part.strip() for part in rest.rsplit(",", 2))
        gpus.append(Gpu(int(index), uuid, name, int(float(total)) * 2**20, int(float(free)) * 2**20))
    return gpus


def list_gpus(*, fresh: bool = False) -> list[Gpu] | None:
    """Every GPU nvidia-smi reports, in its index order; None when there is no nvidia-smi or it fails."""
    global _gpus_cache
    stamp, cached = _gpus_cache
    if not fresh and time.monotonic() - stamp < GPU_CACHE_S:
        return cached
    gpus = None
    exe = shutil.which("nvidia-smi")
    if exe is not None:
        try:
            done = subprocess.run([exe, QUERY, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                  timeout=10)
            if done.returncode == 0:
                gpus = parse_gpus(done.stdout) or None
        except (OSError, subprocess.SubprocessError, ValueError):
            gpus = None
    _gpus_cache = (time.monotonic(), gpus)
    return gpus


def find_gpu(gpus: list[Gpu] | None, wanted: str) -> Gpu | None:
    """The GPU named by an index (``2``) or a UUID (``GPU-…``), as CUDA_VISIBLE_DEVICES names them."""
    wanted = wanted.strip()
    for gpu in gpus or []:
        if wanted == str(gpu.index) or (wanted.startswith("GPU-") and gpu.uuid.startswith(wanted)):
            return gpu
    return None


def worker_gpu(setting: str = "auto", environ=None) -> Gpu | None:
    """The physical GPU a process trains on under ``SAE_DEVICE=setting``: the ``cuda:N``-th entry
    of CUDA_VISIBLE_DEVICES when that is set (a pinned worker), else nvidia-smi's GPU N. None on
    the CPU (``SAE_DEVICE=cpu``, no nvidia-smi, or no such GPU)."""
    environ = os.environ if environ is None else environ
    if setting == "cpu":
        return None
    gpus = list_gpus()
    if not gpus:
        return None
    local = 0
    if setting.startswith("cuda:"):
        try:
            local = int(setting.split(":", 1)[1])
        except ValueError:
            return None
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [v.strip() for v in visible.split(",") if v.strip()]
        if local >= len(entries):
            return None
        return find_gpu(gpus, entries[local])
    return find_gpu(gpus, str(local))


def _host_memory() -> DeviceMemory:
    fields = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, value = line.split(":", 1)
                fields[key] = int(value.split()[0]) * 1024
    except OSError:
        return DeviceMemory("cpu", 0, 0)
    return DeviceMemory("cpu", fields.get("MemAvailable", 0), fields.get("MemTotal", 0))


def device_memory(setting: str = "auto") -> DeviceMemory:
    """Free and total memory of the device a training will use under ``SAE_DEVICE=setting`` (in a
    worker pinned with CUDA_VISIBLE_DEVICES, the GPU it is pinned to)."""
    gpu = worker_gpu(setting)
    if gpu is None:
        return _host_memory()
    return DeviceMemory(f"cuda:{gpu.index}", gpu.free_bytes, gpu.total_bytes)


def disk_free(folder: str | os.PathLike) -> int | None:
    """Bytes free on the filesystem holding ``folder`` (None if it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None
