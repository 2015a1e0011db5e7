"""Free memory on the training device, without importing torch or initialising CUDA.

Used by the validator in the web process and again in the worker. GPU figures come from
``nvidia-smi`` (cached for a few seconds: it takes tens of milliseconds); the CPU figure
from /proc/meminfo.
"""
from __future__ import annotations

import shutil
import subprocess
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceMemory:
    device: str  # "cuda:0" or "cpu"
    free_bytes: int
    total_bytes: int


_cache: tuple[float, str, DeviceMemory | None] = (0.0, "", None)


def _gpu_memory(index: int) -> DeviceMemory | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=memory.free,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5).stdout.strip().splitlines()
        free, total = (int(v) * 2**20 for v in out[index].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return DeviceMemory(f"cuda:{index}", free, total)


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
    """Free and total memory of the device a training will use under ``SAE_DEVICE=setting``."""
    global _cache
    stamp, key, value = _cache
    if value is not None and key == setting and time.monotonic() - stamp < 10:
        return value
    memory = None
    if setting == "auto" or setting.startswith("cuda"):
        index = int(setting.split(":", 1)[1]) if ":" in setting else 0
        memory = _gpu_memory(index)
    if memory is None:
        memory = _host_memory()
    _cache = (time.monotonic(), setting, memory)
    return memory
