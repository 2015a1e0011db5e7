"""Activations straight from a model as it runs: many hook points from one forward pass, no disk.

A ``StreamedSource`` runs a ``transformers`` model over a corpus in batches of context windows
and captures every hook point (layer × site, the extraction's site names) in the same forward
pass, which it cuts short once the last of them has run. Its batches are dicts, one raw
activation tensor per hook point, all of the same tokens; ``app.sae.trainer.train_many`` hands
each SAE the one of its own hook point (a streamed sweep over layers).

The token stream
    Documents are cut into windows as extraction cuts them (``Tokenized``); the kept tokens
    (special tokens left out unless asked for) of every window, in corpus order, make one stream.
    Its first ``holdout_tokens`` are held out for evaluation and never trained on; the training
    stream is the rest. When the corpus runs out, the training stream starts it again (its held-out
    head skipped again) and ``on_repeat(epoch)`` is told, so the run can warn.

The mixing buffer
    The training stream is cut into rounds of ``buffer_tokens`` (rounded down to whole batches).
    A round's activations are computed together, shuffled by a permutation drawn from
    ``(seed, round)`` alone, and handed out as that round's batches; a thread computes the next
    round while the SAEs train on this one (the model's forward passes overlap the SAE steps), so
    at most two rounds are held per hook point. Tokens mix within a round: with the default of
    65,536 tokens and windows of 128 tokens, each batch draws on 512 windows of many documents.

Durable and reproducible
    Batch ``n`` is a function of ``n`` alone: round ``n // per_round``, position ``n % per_round``
    of that round's permutation. A checkpoint therefore needs only the corpus position where the
    round began (``position_at``: document, window, offsets and epoch) to continue exactly: the
    round is computed again from there, bit for bit on the CPU, instead of a buffer of hundreds of
    megabytes being written with every checkpoint. Without a position the stream is walked from
    its start (tokenized, not run through the model) to find it.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..extraction.capture import _Captured
from ..training_config import parse_hook_point
from .sources import ActivationSource

DEFAULT_BUFFER_TOKENS = 65_536
DEFAULT_HOLDOUT_TOKENS = 16_384


class StreamError(RuntimeError):
    """The stream cannot go on; the message is for the user."""


class _Abandoned(Exception):
    """A round's computation stopped because nobody will read it (the training ended)."""


def parse_hook(key: str) -> tuple[int, str]:
    """Layer and site of a hook point written as runs write it (``training_config.parse_hook_point``)."""
    layer, _, site = parse_hook_point(key).partition(".")
    if not layer:
        raise ValueError(f"{key!r} is not a hook point: write layer.site, as 3.resid")
    return int(layer), site


@dataclass(frozen=True)
class Position:
    """Where a round begins in the corpus: the ``window``-th window of document ``doc`` of pass
    ``epoch``, whose kept tokens start at ``corpus`` (within the pass) and ``train`` (in the
    training stream, all passes counted)."""

    epoch: int = 0
    doc: int = 0
    window: int = 0
    corpus: int = 0
    train: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "doc": self.doc, "window": self.window, "corpus": self.corpus,
                "train": self.train}


class _Cursor:
    """The corpus's windows read on from where the last range stopped, with one put back (the window
    the next range begins in)."""

    def __init__(self, windows: Iterator) -> None:
        self.windows, self.back = windows, None

    def __iter__(self):
        return self

    def __next__(self):
        if self.back is not None:
            item, self.back = self.back, None
            return item
        return next(self.windows)

    def push(self, item) -> None:
        self.back = item


@dataclass
class _Piece:
    """One window's part in a range of the stream: its ids and which of its rows are kept."""

    ids: list[int]
    keep: np.ndarray  # row indices of the window (into ids) that the range takes, in order
    doc: int = 0
    positions: list[int] | None = None  # each id's place in its document (-1: a special token)
    epoch: int = 0  # the pass over the corpus it belongs to


class StreamedSource(ActivationSource):
    """See the module's docstring. ``documents`` is a callable returning a fresh iterator over the
    corpus's documents (the same ones, in the same order, every call)."""

    n_tokens = None

    def __init__(self, model, tokenizer, documents: Callable[[], Iterator[str]], hooks: list[str], *,
                 context_length: int = 128, model_batch: int = 32, buffer_tokens: int = DEFAULT_BUFFER_TOKENS,
                 holdout_tokens: int = DEFAULT_HOLDOUT_TOKENS, exclude_special: bool = True,
                 device: torch.device | str = "cpu", on_repeat: Callable[[int], None] | None = None,
                 prefetch: bool = True) -> None:
        from ..extraction.capture import Tokenized, find_site

        if not hooks:
            raise StreamError("name at least one hook point")
        self.model, self.tokenizer, self.documents = model, tokenizer, documents
        self.hooks = list(dict.fromkeys(hooks))
        self.modules = {}
        for key in self.hooks:
            layer, site = parse_hook(key)
            self.modules[key], self.layout, self.n_layers = find_site(model, layer, site)
        self.d_in = int(model.config.hidden_size)
        self.context_length, self.model_batch = int(context_length), max(1, int(model_batch))
        self.buffer_tokens, self.holdout_tokens = int(buffer_tokens), int(holdout_tokens)
        self.exclude_special, self.device = exclude_special, torch.device(device)
        self.on_repeat, self.prefetch = on_repeat, prefetch
        self.tokenized = Tokenized(tokenizer, self.context_length)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
        self.starts: dict[int, Position] = {}  # round → where it began, for the checkpoints
        self.epochs = 1  # passes over the corpus begun so far
        self.model_tokens = 0  # tokens run through the model, and the seconds it took
        self.model_seconds = 0.0
        self.next_fill = 0.0  # the share of the next round already computed
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.keeping: dict = {}  # hook point → the RoundStore its rounds are kept in (``keep``)
        self.keep_failed: dict[str, str] = {}  # hook point → why keeping its store stopped
        self._keep_lock = threading.Lock()  # held while a round is written, and by ``release_keeping``
        self._lock = threading.Lock()  # the counters above
        # One forward pass at a time: the hooks are the modules' own, so a pass run by the prefetch
        # thread and one run for the evaluation rows would each see the other's activations.
        self._model_lock = threading.Lock()

    # --- the token stream ------------------------------------------------------------------

    def _kept(self, window) -> np.ndarray:
        pos = np.asarray(window.positions)
        return np.flatnonzero(pos >= 0) if self.exclude_special else np.arange(len(window.ids))

    def _windows(self, at: Position) -> Iterator[tuple[Position, object, np.ndarray]]:
        """Every window from ``at`` on, passes repeating, each with its position and kept rows."""
        epoch, start_doc, corpus, train = at.epoch, at.doc, at.corpus, at.train
        first = True
        while True:
            current, index = None, 0
            for w in self.tokenized.windows(itertools.islice(self.documents(), start_doc, None)):
                d = start_doc + w.document
                if d != current:
                    current, index = d, 0
                if first and d == at.doc and index < at.window:
                    index += 1  # before the starting window, in its document
                    continue
                kept = self._kept(w)
                yield Position(epoch, d, index, corpus, train), w, kept
                n = len(kept)
                train += max(0, corpus + n - max(corpus, self.holdout_tokens))
                corpus += n
                index += 1
            whole = not first or (at.doc == 0 and at.window == 0 and at.corpus == 0)
            if whole and corpus <= self.holdout_tokens:
                raise StreamError(f"the corpus holds {corpus:,} tokens, no more than the {self.holdout_tokens:,} "
                                  "held out for evaluation: there is nothing to train on")
            first, epoch, start_doc, corpus = False, epoch + 1, 0, 0
            if self.epochs < epoch + 1:
                self.epochs = epoch + 1
                if self.on_repeat is not None:
                    self.on_repeat(epoch)

    def _range(self, first: int, count: int, at: Position | _Cursor, *, held_out: bool = False,
               collect: bool = True) -> tuple[list[_Piece], Position | None]:
        """The windows holding training tokens ``[first, first + count)`` (or, ``held_out``, corpus tokens
        ``[0, count)`` of the first pass), walked from ``at`` (a position at or before ``first``, or a
        cursor left there by the previous range, which reads on without starting the corpus again); and
        the position of the window holding training token ``first + count``, where the next range begins
        (left as the cursor's next window)."""
        cursor = at if isinstance(at, _Cursor) else _Cursor(self._windows(at))
        pieces, following, end = [], None, first + count
        for item in cursor:
            pos, w, kept = item
            if held_out:
                if pos.epoch > 0 or pos.corpus >= count:
                    break
                lo, hi = 0, min(len(kept), count - pos.corpus)
            else:
                skip = min(len(kept), max(0, self.holdout_tokens - pos.corpus))  # its held-out head
                n_train = len(kept) - skip
                if pos.train >= end:
                    following = pos
                    cursor.push(item)
                    break
                if pos.train + n_train <= first:
                    continue
                lo = skip + max(0, first - pos.train)
                hi = skip + min(n_train, end - pos.train)
                if pos.train + n_train > end:
                    following = pos  # it straddles the end: the next range begins inside it
                    cursor.push(item)
            if collect and hi > lo:
                pieces.append(_Piece(w.ids, kept[lo:hi], pos.doc, w.positions, pos.epoch))
            if following is not None:
                break
        return pieces, following

    def _run(self, pieces: list[_Piece], progress: Callable[[float], None] | None = None,
             stop: threading.Event | None = None, dest: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The kept rows of ``pieces`` at every hook point, in order (or row i at ``dest[i]``: a round is
        shuffled as it is written, never copied): one forward pass per ``model_batch`` windows (sorted by
        length, so little is padding), cut short after the last hook point. ``stop``, once set, abandons
        the work between two passes."""
        with self._model_lock:
            return self._forward(pieces, progress, stop, dest)

    def _forward(self, pieces: list[_Piece], progress, stop, dest) -> dict[str, torch.Tensor]:
        order = sorted(range(len(pieces)), key=lambda i: len(pieces[i].ids))
        starts = np.cumsum([0] + [len(p.keep) for p in pieces])
        # written in place: no list of per-window tensors to gather (the heap would keep their pages)
        out = {key: torch.empty(int(starts[-1]), self.d_in, device=self.device) for key in self.hooks}
        captured: dict[str, torch.Tensor] = {}

        def hook_for(key):
            def hook(module, args, output):
                captured[key] = output[0] if isinstance(output, tuple) else output
                if len(captured) == len(self.hooks):
                    raise _Captured

            return hook

        handles = [self.modules[key].register_forward_hook(hook_for(key)) for key in self.hooks]
        started = time.perf_counter()
        tokens = 0
        try:
            for b in range(0, len(order), self.model_batch):
                if stop is not None and stop.is_set():
                    raise _Abandoned
                chunk = order[b:b + self.model_batch]
                width = max(len(pieces[i].ids) for i in chunk)
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    n = len(pieces[i].ids)
                    ids[row, :n] = torch.tensor(pieces[i].ids)
                    mask[row, :n] = 1
                captured.clear()
                with torch.inference_mode():
                    try:
                        self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device))
                    except _Captured:
                        pass
                if len(captured) != len(self.hooks):
                    raise StreamError("a hooked module never ran: the model skipped a layer")
                for key in self.hooks:
                    acts = captured[key]
                    for row, i in enumerate(chunk):
                        keep = torch.as_tensor(pieces[i].keep, device=acts.device)
                        lo, hi = int(starts[i]), int(starts[i + 1])
                        if dest is None:
                            out[key][lo:hi] = acts[row].index_select(0, keep)
                        else:
                            out[key].index_copy_(0, dest[lo:hi], acts[row].index_select(0, keep).float())
                captured.clear()
                tokens += int(sum(len(pieces[i].keep) for i in chunk))
                if progress is not None:
                    progress(min(1.0, (b + len(chunk)) / max(1, len(order))))
        finally:
            for handle in handles:
                handle.remove()
        with self._lock:
            self.model_tokens += tokens
            self.model_seconds += time.perf_counter() - started
        return out

    def _rows(self, first: int, count: int, *, held_out: bool = False) -> dict[str, torch.Tensor]:
        key = (first, count, held_out)
        if key not in self._cache:
            pieces, _ = self._range(first, count, Position(), held_out=held_out)
            self._cache[key] = self._run(pieces)
        return self._cache[key]

    # --- the interface -----------------------------------------------------------------------

    def per_round(self, batch_size: int) -> int:
        return max(1, self.buffer_tokens // batch_size)

    def round_tokens(self, batch_size: int) -> int:
        return self.per_round(batch_size) * batch_size

    def position_at(self, step: int, batch_size: int) -> dict | None:
        """Where the round holding batch ``step`` began, if this source has passed it (for a checkpoint)."""
        start = self.starts.get(step // self.per_round(batch_size))
        return None if start is None else start.to_dict()

    def _find(self, round_index: int, n: int) -> Position:
        """The position of the round's start, walked from the beginning (tokenizing, no model)."""
        if round_index == 0:
            return Position()
        _, found = self._range(0, round_index * n, Position(), collect=False)
        if found is None:
            raise StreamError("the stream ended before the checkpoint's position")
        return found

    def _round(self, index: int, at: Position | _Cursor, n: int, seed: int,
               stop: threading.Event | None = None, count: int | None = None) -> tuple[dict[str, torch.Tensor], Position]:
        """Round ``index`` of rounds of ``n`` tokens, or its first ``count`` (the last round a run reads:
        what no step reads is never computed)."""
        def fill(done):
            self.next_fill = done

        count = n if count is None else count
        self.next_fill = 0.0
        pieces, following = self._range(index * n, count, at)
        got = sum(len(p.keep) for p in pieces)
        if got != count or following is None:
            raise StreamError(f"round {index} holds {got} of its {count} tokens")
        # batch b is rows order[b·size : (b+1)·size] of the round: row i is written at place[i]
        order = torch.from_numpy(np.random.default_rng([seed, index]).permutation(count))
        place = torch.empty_like(order)
        place[order] = torch.arange(count)
        place = place.to(self.device)
        acts = self._run(pieces, progress=fill, stop=stop, dest=place)
        if self.keeping and not (stop is not None and stop.is_set()):
            self._keep(index, pieces, acts, place)
        return acts, following

    # --- keeping a store while streaming -----------------------------------------------------

    def keep(self, stores: dict) -> None:
        """Write the training tokens of the corpus's first pass, at each named hook point, into its
        ``app.extraction.store.RoundStore`` as the rounds are computed: a store as an extraction of
        those tokens would make, without a second forward pass. A round is written before it is handed
        out, so every round before a checkpoint's is on disk when the checkpoint is; a failure to write
        (a full disk, float16 overflowing) stops keeping that store, never the training (``keep_failed``)."""
        unknown = [hook for hook in stores if hook not in self.hooks]
        if unknown:
            raise StreamError(f"hook point {unknown[0]!r} is not one this source streams ({', '.join(self.hooks)})")
        self.keeping, self.keep_failed = dict(stores), {}

    def _stop_keeping(self, hook: str, why: str) -> None:
        self.keeping.pop(hook, None)
        self.keep_failed[hook] = why

    def release_keeping(self) -> None:
        """Stop writing rounds: returns once no round is being written (a prefetch thread that outlived
        the training may still be computing one), after which the stores are the caller's alone."""
        with self._keep_lock:
            self.keeping = {}

    def _keep(self, index: int, pieces: list[_Piece], acts: dict[str, torch.Tensor], place: torch.Tensor) -> None:
        with self._keep_lock:
            if self.keeping:
                self._keep_round(index, pieces, acts, place)

    def _keep_round(self, index: int, pieces: list[_Piece], acts: dict[str, torch.Tensor], place: torch.Tensor) -> None:
        from ..extraction.store import NormStats, StoreError, _cast

        first = list(itertools.takewhile(lambda p: p.epoch == 0, pieces))  # a repeated pass is not kept again
        rows = sum(len(p.keep) for p in first)
        if rows == 0:
            for hook, store in list(self.keeping.items()):
                try:
                    store.write_empty(index)
                except Exception as exc:  # noqa: BLE001
                    self._stop_keeping(hook, f"{type(exc).__name__}: {exc}")
            return
        index_rows = np.concatenate([np.stack([np.asarray(p.ids)[p.keep], np.full(len(p.keep), p.doc),
                                               np.asarray(p.positions)[p.keep]], axis=1) for p in first])
        chunk = 8192  # rows copied out of the shuffled round at a time: the copy stays small
        for hook, store in list(self.keeping.items()):
            def fill(out, out_index, hook=hook, store=store) -> NormStats:
                norms = NormStats()
                out_index[:] = index_rows
                for lo in range(0, rows, chunk):
                    hi = min(rows, lo + chunk)
                    # corpus row i of the round was written at place[i]
                    block = acts[hook].index_select(0, place[lo:hi]).float().cpu().numpy()
                    out[lo:hi] = _cast(block, store.dtype, "keep the store in float32")
                    norms.add(np.linalg.norm(block, axis=1))
                return norms

            try:
                store.write(index, rows, fill)
            except Exception as exc:  # noqa: BLE001 - the training goes on; the job reports why it is not kept
                self._stop_keeping(hook, str(exc) if isinstance(exc, StoreError) else f"{type(exc).__name__}: {exc}")

    def batches(self, batch_size, *, seed, device, start=0, position: dict | None = None, until: int | None = None):
        """As every source's, from batch ``start`` (entered at the corpus ``position`` a checkpoint recorded,
        or found by walking from the start); ``until``, the number of batches anyone will read, keeps the
        prefetch from computing a round past it and the last round to the batches it holds (so batch n
        depends on ``until`` too, which a run's resume passes as it was)."""
        per_round, n = self.per_round(batch_size), self.round_tokens(batch_size)
        index, offset = divmod(start, per_round)
        at = Position(**position) if position else self._find(index, n)
        if at.train > index * n:
            raise StreamError("the checkpoint's corpus position lies after its step's round")
        last = None if until is None else max(index, (until - 1) // per_round)
        last_count = None
        if until is not None and last * per_round < until < (last + 1) * per_round:
            last_count = (until - last * per_round) * batch_size
        for hook, store in list(self.keeping.items()):
            try:
                store.begin(index)
            except Exception as exc:  # noqa: BLE001 - a store that cannot be continued is not kept
                self._stop_keeping(hook, str(exc))
        rounds = _Rounds(self, index, at, n, seed, prefetch=self.prefetch, last=last, last_count=last_count)
        try:
            while True:
                acts = rounds.take()
                for b in range(offset, next(iter(acts.values())).shape[0] // batch_size):
                    yield {key: value[b * batch_size:(b + 1) * batch_size].to(device, non_blocking=True)
                           for key, value in acts.items()}
                offset = 0
                del acts
                rounds.done()
        finally:
            rounds.close()

    def sample(self, n, *, device, hook: str | None = None):
        return self._pick(self._rows(0, n), hook).to(device)

    def eval_rows(self, n, *, device, hook: str | None = None):
        return self._pick(self._rows(0, min(n, self.holdout_tokens), held_out=True), hook).to(device)

    def head(self, n: int, *, device, hook: str | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """The corpus's first ``n`` kept tokens in order (whole windows, for feature examples), with each
        row's token id, document and position, as an extracted store's ``head`` and ``head_index`` give."""
        pieces, _ = self._range(0, n, Position(), held_out=True)
        acts = self._run(pieces)
        index = np.concatenate([np.stack([np.asarray(p.ids)[p.keep], np.full(len(p.keep), p.doc),
                                          np.asarray(p.positions)[p.keep]], axis=1) for p in pieces]) \
            if pieces else np.zeros((0, 3), dtype=np.int64)
        return self._pick(acts, hook).to(device), index.astype(np.int64)

    def _pick(self, acts: dict[str, torch.Tensor], hook: str | None) -> torch.Tensor:
        return acts[hook if hook is not None else self.hooks[0]]

    def view(self, hook: str) -> _HookView:
        if hook not in self.hooks:
            raise StreamError(f"hook point {hook!r} is not one this source streams ({', '.join(self.hooks)})")
        return _HookView(self, hook)

    def stats(self) -> dict:
        """The model's throughput so far and how much of the next round is ready."""
        with self._lock:
            seconds, tokens = self.model_seconds, self.model_tokens
        return {"model_tokens_per_s": tokens / seconds if seconds > 0 else None, "model_tokens": tokens,
                "next_round_fill": self.next_fill, "epochs": self.epochs}


class _HookView(ActivationSource):
    """One hook point of a streamed source, as a plain source for what reads one (sample, evaluation)."""

    n_tokens = None

    def __init__(self, source: StreamedSource, hook: str) -> None:
        self.source, self.hook, self.d_in = source, hook, source.d_in

    def sample(self, n, *, device):
        return self.source.sample(n, device=device, hook=self.hook)

    def eval_rows(self, n, *, device):
        return self.source.eval_rows(n, device=device, hook=self.hook)

    def batches(self, batch_size, *, seed, device, start=0, position=None):
        for acts in self.source.batches(batch_size, seed=seed, device=device, start=start, position=position):
            yield acts[self.hook]


class _Rounds:
    """Rounds in order, computed one ahead in a thread (or inline without ``prefetch``); at most two
    are held at once: the one handed out and the next."""

    def __init__(self, source: StreamedSource, index: int, at: Position, n: int, seed: int, *, prefetch: bool,
                 last: int | None = None, last_count: int | None = None) -> None:
        self.source, self.index, self.at, self.n, self.seed, self.last = source, index, at, n, seed, last
        self.last_count = last_count  # tokens of the last round, when a run reads only part of it
        self.cursor = _Cursor(source._windows(at))  # read on round after round, the corpus opened once a pass
        self.prefetch = prefetch
        self.ready: queue.Queue = queue.Queue(maxsize=1)
        self.room = threading.Semaphore(2)  # rounds that may exist at once
        self.stopping = threading.Event()
        self.thread = None
        if prefetch:
            self.thread = threading.Thread(target=self._work, name="stream-prefetch", daemon=True)
            self.thread.start()

    def _next(self) -> dict[str, torch.Tensor]:
        self.source.starts[self.index] = self.at
        for old in [r for r in self.source.starts if r < self.index - 4]:
            self.source.starts.pop(old, None)
        count = self.last_count if self.index == self.last else None
        acts, self.at = self.source._round(self.index, self.cursor, self.n, self.seed, self.stopping, count)
        self.index += 1
        return acts

    def _work(self) -> None:
        try:
            while not self.stopping.is_set():
                self.room.acquire()
                if self.stopping.is_set() or (self.last is not None and self.index > self.last):
                    return  # nobody reads past the last round
                self._hand(self._next())
        except _Abandoned:
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            self._hand(exc)

    def _hand(self, item) -> None:
        """Queue a round (or the error that ended the thread) unless the consumer has gone."""
        while not self.stopping.is_set():
            try:
                self.ready.put(item, timeout=0.2)
                return
            except queue.Full:
                continue

    def take(self) -> dict[str, torch.Tensor]:
        if not self.prefetch:
            return self._next()
        while True:
            try:
                item = self.ready.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.ready.empty():
                    return self._next()  # read past the last round it was told of: computed here
        if isinstance(item, BaseException):
            raise item
        return item

    def done(self) -> None:
        if self.prefetch:
            self.room.release()

    def close(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.room.release()
            try:
                self.ready.get_nowait()  # a thread blocked handing over a round sees the stop
            except Exception:  # noqa: BLE001 - queue.Empty, or at interpreter exit the module is gone
                pass
            self.thread.join(timeout=30)
