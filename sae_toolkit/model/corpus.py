"""Corpus specs (HF dataset id, local .txt/.jsonl/.parquet/.csv, save_to_disk folder, builtin:pydoc) → token windows.

Documents are read in a fixed order, tokenized in batches by the tokenizer's Rust backend and packed into
windows of ``context_size`` tokens without padding::

    [BOS] doc0 tokens … EOS doc1 tokens … EOS doc2 …        (window 0)
    [BOS] … doc2 continued … EOS doc3 …                     (window 1)

Every window starts with BOS (when the tokenizer has one), documents are joined by EOS, long documents run on
into the next window, and the trailing partial window is dropped. The only special positions downstream code
has to skip are therefore the BOS tokens.

A ``.txt`` file holds one document per paragraph (paragraphs are separated by blank lines), so that EOS marks
real breaks in the text and a book does not become a single document.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_toolkit.errors import SAEToolkitError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BUILTIN_CORPORA = ("builtin:pydoc",)
TEXT_COLUMNS = ("text", "content", "document", "body", "article", "story", "sentence", "raw_content")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet", ".csv")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Documents per call to the Rust tokenizer: large enough to use its thread pool, small enough to start fast.
_DOCS_PER_BATCH = 256


def open_corpus(spec: str, *, split: str = "train", text_column: str | None = None) -> Iterator[str]:
    """An iterator over the documents of a corpus spec, in a fixed order.

    The spec, the file and the text column are checked here, before any document is read, so that a bad
    ``--dataset`` or ``--text-column`` fails at once. ``split`` is used by HF ids and save_to_disk folders.
    """
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_CORPORA:
            raise SAEToolkitError(f"unknown builtin dataset {spec!r}; builtins are: {', '.join(BUILTIN_CORPORA)}")
        return _pydoc_documents()
    path = Path(spec).expanduser()
    if path.is_dir():
        return _saved_dataset_documents(path, split, text_column)
    if path.is_file():
        try:  # a file that cannot be read fails here, before a model loads or an output file is made
            with path.open("rb") as f:
                f.read(1)
        except OSError as e:
            raise SAEToolkitError(
                f"cannot read dataset file {spec!r}: {e.strerror or e}; fix its permissions or copy it somewhere "
                "readable"
            ) from None
        suffix = path.suffix.lower()
        if suffix == ".txt":
            return _txt_documents(path)
        if suffix == ".jsonl":
            return _jsonl_documents(path, text_column)
        if suffix == ".parquet":
            return _parquet_documents(path, text_column)
        if suffix == ".csv":
            return _csv_documents(path, text_column)
        raise SAEToolkitError(
            f"dataset file {spec!r} has an unsupported extension; use {', '.join(_LOCAL_SUFFIXES)} "
            "or a datasets.save_to_disk folder"
        )
    if path.suffix.lower() in _LOCAL_SUFFIXES or spec.startswith((".", "/", "~")) or not _HUB_ID_RE.match(spec):
        raise SAEToolkitError(
            f"dataset {spec!r} does not exist; give an existing file or folder, an HF id or "
            f"{', '.join(BUILTIN_CORPORA)}"
        )
    return _hub_documents(spec, split, text_column)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """(BOS id, EOS id) used for packing; a tokenizer without BOS (e.g. GPT-2's) starts windows with EOS."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    return (bos if bos is not None else eos), eos


def token_windows(
    documents: Iterable[str], tokenizer: PreTrainedTokenizerBase, context_size: int, *, add_bos: bool = True
) -> Iterator[np.ndarray]:
    """Pack documents into blocks of windows, each block int32 [n_windows, context_size] (n_windows varies)."""
    bos, eos = special_ids(tokenizer)
    lead = [bos] if add_bos and bos is not None else []
    body = context_size - len(lead)
    if body < 1:
        raise SAEToolkitError(f"context size {context_size} leaves no room for text after BOS; use at least 2")
    encode = _batch_encoder(tokenizer)
    sep = np.array([eos] if eos is not None else [], dtype=np.int32)
    carry = np.empty(0, dtype=np.int32)
    for docs in _batched(documents, _DOCS_PER_BATCH):
        pieces = [carry]
        for ids in encode(docs):
            pieces += [np.asarray(ids, dtype=np.int32), sep]
        stream = np.concatenate(pieces)
        n = len(stream) // body
        if n:
            block = stream[: n * body].reshape(n, body)
            yield np.concatenate([np.full((n, len(lead)), lead, dtype=np.int32), block], axis=1)
        carry = stream[n * body :]


def window_batches(blocks: Iterator[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Regroup blocks of windows into batches of exactly ``batch_size`` windows (the last one may be smaller)."""
    pending: list[np.ndarray] = []
    have = 0
    for block in blocks:
        pending.append(block)
        have += len(block)
        while have >= batch_size:
            joined = np.concatenate(pending)
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, have = ([rest] if len(rest) else []), len(rest)
    if have:
        yield np.concatenate(pending)


def _batch_encoder(tokenizer: PreTrainedTokenizerBase):
    """Fast path: the Rust tokenizer's encode_batch, skipping the Python wrapper (and its length warnings)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return lambda docs: [e.ids for e in backend.encode_batch(docs, add_special_tokens=False)]
    return lambda docs: tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _pydoc_documents() -> Iterator[str]:
    """The Python reference documentation that ships with CPython: one document per topic, sorted by name."""
    from pydoc_data.topics import topics

    for key in sorted(topics):
        if topics[key].strip():
            yield topics[key]


def _txt_documents(path: Path) -> Iterator[str]:
    def paragraphs() -> Iterator[str]:
        lines: list[str] = []
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\n")
                    lines = []
        if lines:
            yield "".join(lines).rstrip("\n")

    return paragraphs()


def pick_text_column(columns: list[str], text_column: str | None, where: str) -> str:
    """The requested column if present, else the first usual text column name; errors list the columns."""
    if text_column is not None:
        if text_column not in columns:
            raise SAEToolkitError(
                f"text column {text_column!r} is not in {where}; its columns are: {', '.join(map(str, columns))}"
            )
        return text_column
    for name in TEXT_COLUMNS:
        if name in columns:
            return name
    raise SAEToolkitError(
        f"cannot guess the text column of {where} (columns: {', '.join(map(str, columns))}); pass --text-column"
    )


def _jsonl_documents(path: Path, text_column: str | None) -> Iterator[str]:
    try:
        with path.open("rb") as f:  # bytes: a text-mode read-ahead would trip over a bad byte in a later line
            first = f.readline().decode("utf-8")
        record = json.loads(first)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise SAEToolkitError(f"{path} line 1 is not JSON; a .jsonl file holds one JSON object per line") from None
    if not isinstance(record, dict):
        raise SAEToolkitError(f'{path} line 1 is not a JSON object; each line must be like {{"text": "..."}}')
    column = pick_text_column(list(record), text_column, str(path))

    def documents() -> Iterator[str]:
        # Bytes, decoded per line: a line that is not UTF-8 is named like any other bad line.
        with path.open("rb") as f:
            for i, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw.decode("utf-8")).get(column)
                except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                    raise SAEToolkitError(f"{path} line {i} is not a JSON object; fix or remove that line") from None
                if isinstance(text, str) and text.strip():
                    yield text

    return documents()


def _parquet_documents(path: Path, text_column: str | None) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SAEToolkitError("reading .parquet needs pyarrow: run `pip install pyarrow`") from None
    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid for non-parquet bytes
        raise SAEToolkitError(f"cannot read {path} as parquet: {e}") from None
    column = pick_text_column(pfile.schema_arrow.names, text_column, str(path))

    def documents() -> Iterator[str]:
        for batch in pfile.iter_batches(columns=[column], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())

    return documents()


def _csv_documents(path: Path, text_column: str | None) -> Iterator[str]:
    import pandas as pd

    try:
        columns = list(pd.read_csv(path, nrows=0).columns)
    except (ValueError, pd.errors.ParserError) as e:
        raise SAEToolkitError(f"cannot read {path} as CSV: {e}") from None
    column = pick_text_column(columns, text_column, str(path))

    def documents() -> Iterator[str]:
        for chunk in pd.read_csv(path, usecols=[column], dtype={column: str}, chunksize=4096, keep_default_na=False):
            yield from (t for t in chunk[column] if t.strip())

    return documents()


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise SAEToolkitError("HF dataset ids and save_to_disk folders need `pip install datasets`") from None
    return datasets


def _saved_dataset_documents(path: Path, split: str, text_column: str | None) -> Iterator[str]:
    datasets = _import_datasets()
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise SAEToolkitError(f"folder {path} is not a datasets.save_to_disk folder ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SAEToolkitError(f"split {split!r} is not in {path}; its splits are: {', '.join(ds)}")
        ds = ds[split]
    column = pick_text_column(ds.column_names, text_column, str(path))

    def documents() -> Iterator[str]:
        for batch in ds.select_columns([column]).iter(batch_size=1024):
            yield from (t for t in batch[column] if isinstance(t, str) and t.strip())

    return documents()


def _hub_documents(spec: str, split: str, text_column: str | None) -> Iterator[str]:
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(spec, split=split, streaming=True)
        columns = ds.column_names or list(next(iter(ds)))
    except Exception as e:  # datasets raises many unrelated classes for "not found", "offline", "bad split"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SAEToolkitError(f"cannot stream HF dataset {spec!r} split {split!r}: {first}") from None
    column = pick_text_column(columns, text_column, f"HF dataset {spec!r}")

    def documents() -> Iterator[str]:
        for row in ds:
            text = row.get(column)
            if isinstance(text, str) and text.strip():
                yield text

    return documents()
