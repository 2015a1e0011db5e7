"""The activation store: a folder of ``.npy`` shards written incrementally, read memory-mapped.

Layout of a finished store (numpy only, so the web process can read it without torch)::

    meta.json                 model, layer, site, d_in, dtype, token count, norm statistics, shards
    shard_00000.acts.npy      [rows, d_in] float16 or float32 activations
    shard_00000.index.npy     [rows, 3] int32: token id, document, position in the document

Rows are in extraction order, so the tokens of one context window are consecutive rows.
A store is written under a temporary name and renamed into place only when complete
(``ShardWriter.commit``); ``abort`` removes everything, so a failed extraction leaves nothing.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

SHARD_BYTES = 64 * 2**20
INDEX_COLUMNS = ("token_id", "document", "position")


class StoreError(UserError, ValueError):
    """The store is missing or inconsistent; the message says what, for the user."""


@dataclass
class NormStats:
    """Running statistics of the rows' L2 norms (float64 sums, exact over any row count)."""

    count: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    max: float = 0.0

    def add(self, norms: np.ndarray) -> None:
        norms = norms.astype(np.float64)
        self.count += int(norms.size)
        self.total += float(norms.sum())
        self.total_sq += float(np.square(norms).sum())
        self.max = max(self.max, float(norms.max(initial=0.0)))

    def to_dict(self) -> dict:
        mean = self.total / self.count if self.count else 0.0
        mean_sq = self.total_sq / self.count if self.count else 0.0
        return {"mean_norm": mean, "std_norm": math.sqrt(max(mean_sq - mean * mean, 0.0)),
                "max_norm": self.max, "mean_sq_norm": mean_sq}


def _cast(acts: np.ndarray, dtype: str, advice: str = "extract with dtype float32") -> np.ndarray:
    """Rows in the store's dtype; an overflow to float16's infinity or a NaN is refused, with the reason
    (and ``advice``, what to do about an overflow)."""
    with np.errstate(over="ignore"):  # an overflow to inf is caught just below, with the reason
        cast = acts.astype(dtype, copy=False)
    if not np.isfinite(cast).all():
        if np.isfinite(acts).all():
            raise StoreError(f"activations reach {float(np.abs(acts).max()):.3g}, beyond float16's range; {advice}")
        raise StoreError("the model produced NaN or Inf activations")
    return cast


@dataclass
class ShardWriter:
    """Buffers rows and writes a shard of about ``SHARD_BYTES`` each time the buffer fills."""

    final_dir: Path
    d_in: int
    dtype: str
    shard_bytes: int = SHARD_BYTES
    shards: list[dict] = field(default_factory=list)
    norms: NormStats = field(default_factory=NormStats)

    def __post_init__(self) -> None:
        if self.dtype not in ("float16", "float32"):
            raise ValueError("dtype must be float16 or float32")
        self.final_dir = Path(self.final_dir)
        self.work_dir = self.final_dir.with_name(f".partial-{self.final_dir.name}")
        if self.final_dir.exists():
            raise StoreError(f"{self.final_dir} already exists")
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.work_dir.mkdir(parents=True)
        self.shard_rows = max(256, self.shard_bytes // (self.d_in * np.dtype(self.dtype).itemsize))
        self._acts = np.empty((self.shard_rows, self.d_in), dtype=self.dtype)
        self._index = np.empty((self.shard_rows, 3), dtype=np.int32)
        self._fill = 0
        self.rows = 0

    def add(self, acts: np.ndarray, token_ids: np.ndarray, documents: np.ndarray, positions: np.ndarray) -> None:
        """Append rows (float32 activations are cast to the store's dtype; overflow is refused)."""
        if acts.ndim != 2 or acts.shape[1] != self.d_in:
            raise ValueError(f"expected rows of width {self.d_in}, got shape {acts.shape}")
        cast = _cast(acts, self.dtype)
        self.norms.add(np.linalg.norm(acts.astype(np.float32, copy=False), axis=1))
        start = 0
        while start < len(cast):
            take = min(len(cast) - start, self.shard_rows - self._fill)
            stop = start + take
            self._acts[self._fill:self._fill + take] = cast[start:stop]
            self._index[self._fill:self._fill + take, 0] = token_ids[start:stop]
            self._index[self._fill:self._fill + take, 1] = documents[start:stop]
            self._index[self._fill:self._fill + take, 2] = positions[start:stop]
            self._fill += take
            start = stop
            if self._fill == self.shard_rows:
                self._flush()
        self.rows += len(cast)

    def _flush(self) -> None:
        if self._fill == 0:
            return
        name = f"shard_{len(self.shards):05d}"
        np.save(self.work_dir / f"{name}.acts.npy", self._acts[:self._fill])
        np.save(self.work_dir / f"{name}.index.npy", self._index[:self._fill])
        self.shards.append({"name": name, "rows": int(self._fill)})
        self._fill = 0

    def commit(self, meta: dict) -> dict:
        """Write the last shard and ``meta.json``, then move the folder to its final name."""
        self._flush()
        if self.rows == 0:
            raise StoreError("no token was extracted")
        meta = {**meta, "d_in": self.d_in, "dtype": self.dtype, "n_tokens": self.rows, "shards": self.shards,
                "norm": self.norms.to_dict(), "index_columns": list(INDEX_COLUMNS)}
        with (self.work_dir / "meta.json").open("w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(self.work_dir, self.final_dir)
        return meta

    def abort(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


class RoundStore:
    """A store written a round at a time by a streamed run (``app.sae.stream``): one shard per round of
    the stream, named by the round's index, with its own norm statistics beside it. A run resumed at
    round ``r`` keeps the shards before ``r`` (written before its checkpoint) and writes the rest again,
    so the committed store is the same however often the run was interrupted. Each file is written
    under a temporary name and renamed: a shard whose statistics exist is whole.

    Rows are in corpus order within a round, and rounds follow each other: the store reads as an
    extraction of the stream's training tokens would."""

    def __init__(self, work_dir: Path | str, d_in: int, dtype: str) -> None:
        if dtype not in ("float16", "float32"):
            raise ValueError("dtype must be float16 or float32")
        self.work_dir, self.d_in, self.dtype = Path(work_dir), int(d_in), dtype

    def _name(self, index: int) -> str:
        return f"round_{index:06d}"

    def _rounds(self) -> dict[int, Path]:
        """The whole rounds on disk: those whose statistics were written (after their arrays)."""
        found = {}
        for path in self.work_dir.glob("round_*.json"):
            try:
                found[int(path.stem.split("_")[1])] = path
            except (IndexError, ValueError):
                continue
        return found

    def begin(self, first_round: int) -> None:
        """Enter at ``first_round``: every round before it must be on disk (``StoreError`` if one is not);
        it and the later ones are removed, to be written again."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        have = self._rounds()
        missing = [i for i in range(first_round) if i not in have]
        if missing:
            raise StoreError(f"round {missing[0]} of the kept store is missing, so it cannot be continued")
        for path in self.work_dir.iterdir():
            stem = path.name.split(".")[0]
            if not stem.startswith("round_") or ".tmp" in path.name:
                path.unlink(missing_ok=True)  # a temporary file a killed process left, or a seal's meta.json
                continue
            try:
                index = int(stem.split("_")[1])
            except (IndexError, ValueError):
                index = first_round
            if index >= first_round:
                path.unlink(missing_ok=True)

    def _stats(self, name: str, tag: str, rows: int, norms: NormStats) -> None:
        stats_tmp = self.work_dir / f"{name}.json{tag}"
        stats_tmp.write_text(json.dumps({"rows": rows, "count": norms.count, "total": norms.total,
                                         "total_sq": norms.total_sq, "max": norms.max}))
        os.replace(stats_tmp, self.work_dir / f"{name}.json")

    def write(self, index: int, rows: int, fill) -> None:
        """Write round ``index``: ``fill(acts, index_rows)`` fills a memory-mapped ``[rows, d_in]`` array
        of the store's dtype and a ``[rows, 3]`` int32 index (token id, document, position) in place,
        and returns the rows' norm statistics (``NormStats``)."""
        name, tag = self._name(index), f".tmp-{secrets.token_hex(6)}"
        acts_tmp = self.work_dir / f"{name}.acts.npy{tag}"
        index_tmp = self.work_dir / f"{name}.index.npy{tag}"
        try:
            acts = np.lib.format.open_memmap(acts_tmp, mode="w+", dtype=self.dtype, shape=(rows, self.d_in))
            index_rows = np.lib.format.open_memmap(index_tmp, mode="w+", dtype=np.int32, shape=(rows, 3))
            norms = fill(acts, index_rows)
            acts.flush()
            index_rows.flush()
            del acts, index_rows
            os.replace(acts_tmp, self.work_dir / f"{name}.acts.npy")
            os.replace(index_tmp, self.work_dir / f"{name}.index.npy")
            self._stats(name, tag, rows, norms)
        finally:
            for path in (acts_tmp, index_tmp):
                path.unlink(missing_ok=True)

    def write_empty(self, index: int) -> None:
        """Round ``index`` holds no row to keep (the stream is past the corpus's first pass): its statistics
        alone say so, so that a run resumed after it still finds every round before its own."""
        self._stats(self._name(index), f".tmp-{secrets.token_hex(6)}", 0, NormStats())

    def seal(self, meta: dict) -> dict:
        """Write ``meta.json`` (under a temporary name, then renamed) over the rounds on disk, whole, from
        round 0 on, in order; nothing is removed, so a store sealed but not moved can still be continued."""
        have = self._rounds()
        rounds = list(itertools.takewhile(lambda i: i in have, itertools.count()))
        shards, norms = [], NormStats()
        for i in rounds:
            stats = json.loads(have[i].read_text())
            if stats["rows"] == 0:
                continue
            shards.append({"name": self._name(i), "rows": int(stats["rows"])})
            norms.count += int(stats["count"])
            norms.total += float(stats["total"])
            norms.total_sq += float(stats["total_sq"])
            norms.max = max(norms.max, float(stats["max"]))
        rows = sum(s["rows"] for s in shards)
        if rows == 0:
            raise StoreError("no round was kept")
        last = np.load(self.work_dir / f"{shards[-1]['name']}.index.npy", mmap_mode="r")
        meta = {**meta, "d_in": self.d_in, "dtype": self.dtype, "n_tokens": rows, "shards": shards,
                "norm": norms.to_dict(), "index_columns": list(INDEX_COLUMNS), "documents": int(last[-1, 1]) + 1}
        tmp = self.work_dir / f"meta.json.tmp-{secrets.token_hex(6)}"
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, self.work_dir / "meta.json")
        return meta

    def move(self, final_dir: Path | str) -> None:
        """Move the sealed store to ``final_dir``, where it reads as any other (``open_shards``)."""
        if Path(final_dir).exists():
            raise StoreError(f"{final_dir} already exists")
        os.replace(self.work_dir, final_dir)

    def move_back(self, final_dir: Path | str) -> None:
        """Undo ``move`` (what its caller recorded failed): the store can be continued again."""
        if Path(final_dir).exists() and not self.work_dir.exists():
            os.replace(final_dir, self.work_dir)

    @staticmethod
    def tidy(final_dir: Path | str, meta: dict) -> None:
        """Remove from a moved store what its ``meta.json`` does not name (the rounds' statistics, rounds
        after a gap, temporary files a killed writer left)."""
        kept = {s["name"] for s in meta["shards"]}
        for path in Path(final_dir).iterdir():
            if path.name == "meta.json":
                continue
            if not (path.name.endswith((".acts.npy", ".index.npy")) and path.name.split(".")[0] in kept):
                path.unlink(missing_ok=True)

    def commit(self, final_dir: Path | str, meta: dict) -> dict:
        """``seal``, ``move`` and ``tidy`` in one: the store in its final place."""
        meta = self.seal(meta)
        self.move(final_dir)
        self.tidy(final_dir, meta)
        return meta

    def abort(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)


def read_meta(folder: Path | str) -> dict:
    path = Path(folder) / "meta.json"
    if not path.exists():
        raise StoreError(f"the activation store {Path(folder).name} is missing from the data folder")
    with path.open() as fh:
        return json.load(fh)


def open_shards(folder: Path | str, meta: dict | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Memory-map every shard's activations and index, checking them against ``meta``."""
    folder = Path(folder)
    meta = meta or read_meta(folder)
    acts, index = [], []
    for shard in meta["shards"]:
        a = np.load(folder / f"{shard['name']}.acts.npy", mmap_mode="r")
        i = np.load(folder / f"{shard['name']}.index.npy", mmap_mode="r")
        if a.shape != (shard["rows"], meta["d_in"]) or i.shape != (shard["rows"], 3):
            raise StoreError(f"shard {shard['name']} does not match meta.json")
        acts.append(a)
        index.append(i)
    return acts, index
