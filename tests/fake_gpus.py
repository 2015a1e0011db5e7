"""A fake ``nvidia-smi`` for tests on machines without GPUs.

It answers the one query SAE Studio makes (``--query-gpu=index,uuid,name,memory.total,memory.free
--format=csv,noheader,nounits``) from a file the test writes and may rewrite while workers run
(free memory changing); without the file it fails, as nvidia-smi does on a box whose driver is gone.
"""
from __future__ import annotations

import os
from pathlib import Path

SCRIPT = """#!/bin/sh
case "$*" in
  *--query-gpu=index,uuid,name,memory.total,memory.free*) ;;
  *) echo "fake nvidia-smi: unexpected arguments: $*" >&2; exit 2 ;;
esac
[ -f "{table}" ] || {{ echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver." >&2; exit 9; }}
cat "{table}"
"""

GIB = 2**30


def install(folder: Path) -> tuple[Path, Path]:
    """Write the fake into ``folder/bin``; return (that bin folder, the table file it reads)."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    table = folder / "gpus.csv"
    exe = bin_dir / "nvidia-smi"
    exe.write_text(SCRIPT.format(table=table))
    exe.chmod(0o755)
    return bin_dir, table


def write_table(table: Path, free_gib: list[float], total_gib: float = 80.0, name: str = "NVIDIA H100 80GB HBM3") -> None:
    """One line per GPU: index, uuid, name, total and free memory (MiB), as nvidia-smi prints them."""
    lines = [f"{i}, {uuid(i)}, {name}, {int(total_gib * 1024)}, {int(free * 1024)}" for i, free in enumerate(free_gib)]
    tmp = table.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, table)  # a reader never sees half a table


def uuid(index: int) -> str:
    return f"GPU-{index:08x}-1111-2222-3333-444455556666"


def path_with(bin_dir: Path) -> str:
    return f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
