"""The HDF5 activation file on the reading side (DESIGN §3): open and check it, its attrs and hookpoints, float32 rows.

The writing side (layout, growing, committing) is writer.py; ActivationStore and ActsReader read through here.

    >>> with open_acts("acts.h5") as f:  # doctest: +SKIP
    ...     dset = hookpoint_dataset(f, "mlp_out.6")
    ...     x = to_float32(dset[:1000], stored_dtype(dset))  # [1000, d] float32
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sae_toolkit.errors import RunFailure, SAEToolkitError

if TYPE_CHECKING:
    import h5py

FORMAT = "sae_toolkit.activations"
FORMAT_VERSION = 1


def open_acts(path: str | Path) -> h5py.File:
    """The file open read-only, once it is an activation file this version reads; else a one-line SAEToolkitError.

    Refused: a missing file, a file that is not HDF5, another `format` or no `acts/` and `tokens`, a newer
    `format_version`, no `context_size` / `n_seqs`. The caller closes the file.
    """
    f = _open(path, fix="pass a file written by `sae-toolkit cache`")
    try:
        with damaged(path):
            _check_format(root_attrs(f), f.filename, fix="write it with `sae-toolkit cache`",
                          datasets="acts" in f and "tokens" in f)
            for name in ("tokens", *(f"acts/{n}" for n in f["acts"])):
                f[name].shape  # noqa: B018 (opening each object reads its header: damage shows here, once)
    except BaseException:
        f.close()
        raise
    return f


@contextmanager
def damaged(path: str | Path) -> Iterator[None]:
    """Turn the errors h5py raises for a damaged file (bad object headers, truncated data) into one line."""
    try:
        yield
    except (OSError, KeyError, RuntimeError, ValueError, IndexError) as e:
        if isinstance(e, BlockingIOError) or getattr(e, "errno", None) == errno.ENOSPC:
            raise
        text = str(e).strip()
        first = text.splitlines()[0] if text else type(e).__name__
        raise SAEToolkitError(f"{str(path)!r} is damaged and cannot be read ({first}); re-create it with "
                              "`sae-toolkit cache`") from None


def read_root_attrs(path: str | Path, *, fix: str = "pass a file written by `sae-toolkit cache`") -> dict:
    """Root attrs of an activation file as plain Python values; a one-line SAEToolkitError for anything else.

    Unlike `open_acts`, the datasets are not required. `fix` says what to do with a file that is not one.
    """
    with _open(path, fix=fix) as f, damaged(path):
        attrs = root_attrs(f)
    _check_format(attrs, str(path), fix=fix, noun="sae-toolkit")
    return attrs


def root_attrs(f: h5py.File) -> dict:
    """All root attrs of an open file, as plain Python (str, int, float, bool)."""
    return {k: _plain(v) for k, v in f.attrs.items()}


def bos_token_id(attrs: Mapping[str, object]) -> int | None:
    """The BOS id whose positions are excluded from training and metrics; None when the attr is absent or -1."""
    bos = attrs.get("bos_token_id")
    return None if bos is None or int(bos) < 0 else int(bos)


def hookpoints(f: h5py.File) -> list[str]:
    """The hookpoint names under `acts/`, sorted."""
    return sorted(f["acts"].keys())


def hookpoint_dataset(f: h5py.File, name: str | None, *, d_in: int | None = None) -> h5py.Dataset:
    """`acts/<name>` of a file from `open_acts`, checked: 2-d, a float or bfloat16-as-uint16 dtype, at least
    `n_seqs*context_size` rows (more are allowed, but they are not data), and `tokens` `[>= n_seqs, context_size]`.

    name None picks the only hookpoint, or the only one of width `d_in`; anything else missing is a one-line
    error that lists what the file holds.
    """
    names = hookpoints(f)
    if name is None or name not in names:
        fits = [n for n in names if d_in is None or f["acts"][n].shape[1:] == (d_in,)]
        if name is not None or len(fits) != 1:
            raise SAEToolkitError(f"hookpoint {name!r} is not in {f.filename!r}, which holds "
                                  f"{', '.join(names) or 'nothing'}; pass one of those")
        name = fits[0]
    dset = f["acts"][name]
    if dset.ndim != 2:
        raise SAEToolkitError(f"acts/{name} in {f.filename!r} has shape {dset.shape}; expected "
                              "[n_seqs*context_size, d]")
    dtype = stored_dtype(dset)
    if dtype == "bfloat16" and dset.dtype != np.uint16:
        raise SAEToolkitError(f"acts/{name} says dtype=bfloat16 but is stored as {dset.dtype}; "
                              "bfloat16 must be stored as uint16")
    if dtype != "bfloat16" and dset.dtype.kind != "f":
        raise SAEToolkitError(f"acts/{name} has dtype {dset.dtype}; expected float16/float32 "
                              "or bfloat16-as-uint16 with attr dtype='bfloat16'")
    n_seqs, ctx = int(f.attrs["n_seqs"]), int(f.attrs["context_size"])
    if n_seqs * ctx > dset.shape[0]:
        raise SAEToolkitError(f"{f.filename!r} claims n_seqs={n_seqs} x context_size={ctx} "
                              f"rows but acts/{name} holds only {dset.shape[0]}; the file is damaged")
    tokens = f["tokens"]
    if tokens.ndim != 2 or tokens.shape[0] < n_seqs or tokens.shape[1] != ctx:
        raise SAEToolkitError(f"tokens in {f.filename!r} has shape {tokens.shape}; n_seqs={n_seqs} and "
                              f"context_size={ctx} need [{n_seqs} or more, {ctx}] — the file is damaged")
    return dset


def stored_dtype(dset: h5py.Dataset) -> str:
    """The dtype the rows stand for: the `dtype` attr ("bfloat16" for uint16 storage), else the storage dtype."""
    return str(_plain(dset.attrs.get("dtype", dset.dtype.name)))


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows → float32. bfloat16 is stored as uint16 holding the top half of a float32's bits."""
    if dtype == "bfloat16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def _check_format(attrs: Mapping[str, object], where: str, *, fix: str, datasets: bool | None = None,
                  noun: str = "sae_toolkit") -> None:
    """Raise unless `attrs` are the root attrs of a file this version reads (and, unless `datasets` is None, the
    file holds `acts/` and `tokens`). `noun` keeps each caller's established spelling of the file kind."""
    fmt = attrs.get("format")
    if fmt != FORMAT or datasets is False:
        need = f"{FORMAT!r}" if datasets is None else f"{FORMAT!r} with acts/ and tokens"
        raise SAEToolkitError(f"{where!r} is not a {noun} activation file (root attr format={fmt!r}, need {need}); "
                              f"{fix}")
    version = int(attrs.get("format_version", 0))
    if version > FORMAT_VERSION:
        raise SAEToolkitError(f"{where!r} has format_version {version}; this toolkit reads version {FORMAT_VERSION} "
                              "— upgrade sae-toolkit")
    missing = [k for k in ("context_size", "n_seqs") if k not in attrs]
    if missing:
        raise SAEToolkitError(f"{where!r} lacks the root attr(s) {missing}; the file is damaged — {fix}")
    for key, low in (("context_size", 1), ("n_seqs", 0), ("n_seqs_target", 0)):
        value = attrs.get(key, low)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise SAEToolkitError(f"{where!r} has root attr {key}={value!r}, not an integer >= {low}; the file is "
                                  f"damaged — {fix}")
    config = attrs.get("config", "{}")
    try:
        parsed = json.loads(config) if isinstance(config, str) else None
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise SAEToolkitError(f"{where!r} has a root attr config that is not a JSON object ({str(config)[:60]!r}); "
                              f"the file is damaged — {fix}")


def _open(path: str | Path, *, fix: str) -> h5py.File:
    import h5py

    where = str(path)
    if Path(path).is_dir():
        raise SAEToolkitError(f"{where!r} is a folder, not an activation file; pass the .h5 file written by "
                              "`sae-toolkit cache`")
    if not Path(path).is_file():
        raise SAEToolkitError(f"activation file {where!r} does not exist; create it with `sae-toolkit cache`")
    try:
        return h5py.File(path, "r")
    except BlockingIOError:
        raise RunFailure(f"{where!r} is locked by another process (a `sae-toolkit cache` still writing it?); "
                         "wait for it to finish") from None
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM):
            raise RunFailure(f"no permission to read {where!r}; fix its permissions") from None
        raise SAEToolkitError(f"{where!r} is not a readable HDF5 file ({e}); {fix}") from None


def check_token_ids(tokens: np.ndarray, vocab_size: int, where: str, first_seq: int | list[int] = 0) -> None:
    """Refuse token ids outside [0, vocab_size): a model would index past its embedding (or crash on CUDA).

    tokens: int [n, context_size] read from sequences first_seq.. (or the listed sequences) of file ``where``.
    """
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        row = int(np.argwhere((tokens < 0) | (tokens >= vocab_size))[0][0])
        seq = first_seq[row] if isinstance(first_seq, list) else first_seq + row
        raise SAEToolkitError(f"{where!r} holds token id {bad} (sequence {seq}), outside the vocabulary of "
                              f"{vocab_size} tokens; it was cached with another tokenizer or is damaged — "
                              "use the model it was cached with, or re-create it with `sae-toolkit cache`")


def _plain(value: object) -> object:
    """HDF5 attr values as plain Python (bytes → str, numpy scalars → int/float/bool)."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.generic):
        return value.item()
    return value
