"""Text corpora for extraction: documents from a file, a Hugging Face dataset or the stdlib.

Torch-free, so the web process can check an uploaded corpus (and refuse it with a reason)
before anything is queued. A corpus is described by a ``TextSpec``; ``documents`` yields
its documents as strings, in a fixed order.

Files: ``.txt`` (UTF-8; documents are separated by blank lines), ``.jsonl`` (one JSON object
per line), ``.csv`` (a header row) and ``.parquet``; the last three read the text column
the user names. A Hugging Face dataset is named as on the Hub (read from the local cache
when offline) or given as a folder written by ``Dataset.save_to_disk``.
"""
from __future__ import annotations

import ast
import csv
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import UserError

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".parquet")
COLUMN_SUFFIXES = (".jsonl", ".csv", ".parquet")
STDLIB_LABEL = "Python standard library docstrings (offline)"


class TextSourceError(UserError, ValueError):
    """The corpus cannot be read as text; the message says why, for the user."""

    def __init__(self, message: str, field: str = "text_file") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class TextSpec:
    """Where documents come from: ``kind`` is "stdlib", "file" or "hf"."""

    kind: str
    path: str | None = None  # file: absolute path
    dataset: str | None = None  # hf: Hub name or a save_to_disk folder
    split: str = "train"
    column: str = "text"

    def describe(self) -> str:
        if self.kind == "stdlib":
            return STDLIB_LABEL
        if self.kind == "file":
            return f"file {Path(self.path or '').name}" + (
                f" (column {self.column!r})" if Path(self.path or "").suffix.lower() in COLUMN_SUFFIXES else "")
        return f"dataset {self.dataset} [{self.split}] (column {self.column!r})"

    def to_dict(self) -> dict:
        return asdict(self)


def stdlib_docstrings(min_chars: int = 40) -> Iterator[str]:
    """Docstrings of modules, classes and functions of the standard library, read with ``ast``.

    Nothing is imported; test suites and IDLE are skipped. The order is fixed (sorted paths).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if any(part in ("test", "tests", "site-packages", "idlelib") for part in path.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= min_chars:
                    yield doc


def _text_value(value, where: str, column: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TextSourceError(f"column {column!r} holds {type(value).__name__} values, not text ({where})",
                              "text_column")
    return value


def _missing_column(column: str, found) -> TextSourceError:
    names = ", ".join(repr(str(n)) for n in list(found)[:20]) or "none"
    return TextSourceError(f"there is no text column {column!r}; the columns are: {names}", "text_column")


MAX_DOCUMENT_CHARS = 1_000_000  # a longer document is cut into pieces this long (windows are far shorter)


def _txt(path: Path) -> Iterator[str]:
    """Paragraphs (separated by blank lines), each at most MAX_DOCUMENT_CHARS: a file with no
    blank line, or no line break at all, is read piece by piece, never whole."""
    with path.open("rb") as fh:
        head = fh.read(8192)
    if b"\x00" in head:
        raise TextSourceError("the file looks binary (it holds NUL bytes), not UTF-8 text")
    paragraph: list[str] = []
    size = 0
    with path.open("r", encoding="utf-8", errors="strict", newline=None) as fh:
        try:
            while line := fh.readline(MAX_DOCUMENT_CHARS):
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                    size += len(line)
                    if size < MAX_DOCUMENT_CHARS:
                        continue
                if paragraph:
                    yield "\n".join(paragraph)
                    paragraph, size = [], 0
        except UnicodeDecodeError as exc:
            raise TextSourceError(f"the file is not UTF-8 text ({exc.reason})") from exc
    if paragraph:
        yield "\n".join(paragraph)


def _jsonl(path: Path, column: str) -> Iterator[str]:
    with path.open("r", encoding="utf-8", errors="strict") as fh:
        try:
            for number, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise TextSourceError(f"line {number:,} is not JSON ({exc.msg})") from exc
                if not isinstance(record, dict):
                    raise TextSourceError(f"line {number:,} is not a JSON object")
                if column not in record:
                    raise _missing_column(column, record.keys())
                text = _text_value(record[column], f"line {number:,}", column)
                if text and text.strip():
                    yield text
        except UnicodeDecodeError as exc:
            raise TextSourceError("the file is not UTF-8 text") from exc


def _csv(path: Path, column: str) -> Iterator[str]:
    csv.field_size_limit(2**31 - 1)
    with path.open("r", encoding="utf-8", errors="strict", newline="") as fh:
        try:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                return
            if column not in reader.fieldnames:
                raise _missing_column(column, reader.fieldnames)
            for row in reader:
                text = row.get(column)
                if text and text.strip():
                    yield text
        except UnicodeDecodeError as exc:
            raise TextSourceError("the file is not UTF-8 text") from exc
        except csv.Error as exc:
            raise TextSourceError(f"the file is not valid CSV ({exc})") from exc


def _parquet(path: Path, column: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - pyarrow comes with the models extra
        raise TextSourceError("reading .parquet needs pyarrow (installed by `make run`)") from exc
    try:
        parquet = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise TextSourceError(f"not a readable .parquet file ({exc})") from exc
    if column not in parquet.schema_arrow.names:
        raise _missing_column(column, parquet.schema_arrow.names)
    for batch in parquet.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            text = _text_value(value, "parquet", column)
            if text and text.strip():
                yield text


def _hf(spec: TextSpec) -> Iterator[str]:
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets comes with the models extra
        raise TextSourceError("Hugging Face datasets need the `datasets` package (installed by `make run`)",
                              "dataset_name") from exc
    name = spec.dataset or ""
    local = Path(name)
    if not local.is_absolute():  # a Hub id, never a path relative to the working directory
        from ..paths import PathRefused, hub_only

        try:
            hub_only(name, "dataset")
        except PathRefused as exc:
            raise TextSourceError(str(exc), "dataset_name") from None
    try:
        if local.is_absolute() and local.is_dir() and ((local / "dataset_info.json").exists() or (local / "dataset_dict.json").exists()
                               or (local / "state.json").exists()):
            loaded = datasets.load_from_disk(str(local))
            if isinstance(loaded, datasets.DatasetDict):
                if spec.split not in loaded:
                    raise TextSourceError(f"the dataset has no split {spec.split!r}; its splits are: "
                                          f"{', '.join(map(repr, loaded.keys()))}", "dataset_split")
                loaded = loaded[spec.split]
        else:
            loaded = datasets.load_dataset(name, split=spec.split, streaming=True)
    except TextSourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - the hub's and the loader's errors, for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TextSourceError(f"could not load the dataset {name!r}: {first}", "dataset_name") from exc
    columns = loaded.column_names if loaded.column_names is not None else list((loaded.features or {}).keys())
    if columns and spec.column not in columns:
        raise _missing_column(spec.column, columns)
    for index, record in enumerate(loaded):
        if spec.column not in record:
            raise _missing_column(spec.column, record.keys())
        text = _text_value(record[spec.column], f"record {index:,}", spec.column)
        if text and text.strip():
            yield text


def documents(spec: TextSpec) -> Iterator[str]:
    """The corpus's non-empty documents, in order. Raises ``TextSourceError`` for bad input."""
    if spec.kind == "stdlib":
        yield from stdlib_docstrings()
        return
    if spec.kind == "hf":
        yield from _hf(spec)
        return
    if spec.kind != "file" or not spec.path:
        raise TextSourceError(f"unknown text source {spec.kind!r}", "text_kind")
    path = Path(spec.path)
    suffix = path.suffix.lower()
    if not path.is_file():
        raise TextSourceError(f"the text file {path.name} is missing")
    if suffix == ".txt":
        yield from _txt(path)
    elif suffix == ".jsonl":
        yield from _jsonl(path, spec.column)
    elif suffix == ".csv":
        yield from _csv(path, spec.column)
    elif suffix == ".parquet":
        yield from _parquet(path, spec.column)
    else:
        raise TextSourceError(f"unsupported text file type {suffix or '(none)'}; use {', '.join(TEXT_SUFFIXES)}")


def check_corpus(spec: TextSpec, *, peek: int = 20) -> list[str]:
    """Read the first ``peek`` documents; refuse a corpus that holds no text at all."""
    found = []
    for doc in documents(spec):
        found.append(doc)
        if len(found) >= peek:
            break
    if not found:
        where = "column " + repr(spec.column) if spec.kind != "stdlib" and (
            spec.kind == "hf" or Path(spec.path or "").suffix.lower() in COLUMN_SUFFIXES) else "it"
        raise TextSourceError(f"the corpus holds no text (no non-empty document in {where})",
                              "dataset_name" if spec.kind == "hf" else "text_file")
    return found

