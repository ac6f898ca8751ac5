"""Sequence-aligned reads of one hookpoint of an activation file (DESIGN §3): whole context windows with their
tokens, the special positions to exclude, and token strings for display."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from sae_toolkit.activations.format import (
    bos_token_id,
    check_token_ids,
    hookpoint_dataset,
    open_acts,
    root_attrs,
    stored_dtype,
)
from sae_toolkit.activations.outliers import DEFAULT_MULTIPLE, outlier_positions
from sae_toolkit.errors import SAEToolkitError


class ActsReader:
    """Sequence-aligned reads of one hookpoint of an activation file (DESIGN §3), with its tokens and metadata."""

    def __init__(self, path: str | Path, hookpoint: str | None = None, *, d_in: int | None = None,
                 seq_range: tuple[int, int] | None = None, tokens: int | None = None,
                 tokenizer: object | None = "auto", exclude_special: bool = True,
                 outlier_multiple: float | None = DEFAULT_MULTIPLE, exclude_first_positions: int = 0) -> None:
        """path: the .h5 file. hookpoint: name under acts/ (None: the only one, or the only one of width d_in).
        seq_range: (start, stop) sequences to read (default all); tokens: read at most this many tokens (whole
        windows, rounded up). tokenizer: an HF tokenizer, None (show ids), or "auto" (load the file's `tokenizer`
        attr; ids when that fails). exclude_special: special tokens are excluded along with BOS.
        outlier_multiple, exclude_first_positions: massive-activation positions to exclude too
        (activations.outliers.outlier_positions)."""
        self.path = Path(path)
        self.file = f = open_acts(self.path)
        try:
            self.dset = hookpoint_dataset(f, hookpoint, d_in=d_in)
        except BaseException:
            f.close()
            raise
        self.hookpoint = self.dset.name.removeprefix("/acts/")
        self.dtype = stored_dtype(self.dset)
        self.d = int(self.dset.shape[1])
        attrs = root_attrs(f)
        self.ctx = int(attrs["context_size"])
        self.n_seqs = int(attrs["n_seqs"])
        self.model = str(attrs.get("model", ""))
        self.dataset = str(attrs.get("dataset", ""))
        self.bos_token_id = bos_token_id(attrs)
        start, stop = (0, self.n_seqs) if seq_range is None else (int(seq_range[0]), int(seq_range[1]))
        if not 0 <= start < stop <= self.n_seqs:
            self.file.close()
            raise SAEToolkitError(f"seq_range={seq_range} is not within the file's {self.n_seqs} complete "
                                  f"sequences; pass 0 <= start < stop <= {self.n_seqs}")
        if tokens is not None:
            stop = min(stop, start + max(1, math.ceil(tokens / self.ctx)))
        self.seq_range = (start, stop)
        if tokenizer == "auto":
            tokenizer = _load_tokenizer(str(attrs.get("tokenizer", "")) or self.model)
        self.tokenizer = tokenizer
        special = {self.bos_token_id} if self.bos_token_id is not None else set()
        if exclude_special and self.tokenizer is not None:
            special |= set(getattr(self.tokenizer, "all_special_ids", []) or [])
        self.special_ids = torch.tensor(sorted(special), dtype=torch.int64)
        try:
            self.excluded_positions = torch.from_numpy(outlier_positions(
                self.dset, self.ctx, self.seq_range, multiple=outlier_multiple, first=exclude_first_positions,
                dtype=self.dtype))
        except BaseException:
            self.file.close()
            raise
        """[ctx] bool, massive-activation positions excluded everywhere."""
        self.n_excluded = {"special_tokens": 0, "outlier_positions": 0}
        """Tokens `keep_mask` has excluded so far, by reason."""
        self._strings: dict[int, str] = {}
        self._toks: dict[int, list[int]] = {}

    def chunks(self, seqs_per_chunk: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(seq_ids [s], tokens [s, seq] int64, acts [s*seq, d] float32) for whole windows of the range."""
        # Looked up in store at call time, where tests patch it to count reads (tests/test_report.py).
        from sae_toolkit.activations.store import _to_float32

        start, stop = self.seq_range
        for s0 in range(start, stop, seqs_per_chunk):
            s1 = min(stop, s0 + seqs_per_chunk)
            raw = self.file["tokens"][s0:s1]
            self._check_ids(raw, s0)
            toks = torch.from_numpy(raw.astype(np.int64))
            acts = torch.from_numpy(_to_float32(self.dset[s0 * self.ctx:s1 * self.ctx], self.dtype))
            yield torch.arange(s0, s1), toks, acts

    def keep_mask(self, toks: torch.Tensor) -> torch.Tensor:
        """tokens [s, seq] → [s, seq] bool, False at special tokens and massive-activation positions (counted in
        `n_excluded`)."""
        special = torch.isin(toks, self.special_ids)
        outlier = self.excluded_positions[None, :].expand_as(special) & ~special
        self.n_excluded["special_tokens"] += int(special.sum())
        self.n_excluded["outlier_positions"] += int(outlier.sum())
        return ~(special | outlier)

    def tokens(self, seqs: list[int] | None = None) -> torch.Tensor:
        """Token ids [len(seqs), seq] int64 of the given sequences (default: the range)."""
        if seqs is None:
            raw = self.file["tokens"][slice(*self.seq_range)]
            self._check_ids(raw, self.seq_range[0])
            return torch.from_numpy(raw.astype(np.int64))
        order = sorted(set(seqs))
        rows = self.file["tokens"][order] if order else np.zeros((0, self.ctx), np.int32)
        self._check_ids(rows, order)
        where = {s: i for i, s in enumerate(order)}
        return torch.from_numpy(rows[[where[s] for s in seqs]].astype(np.int64))

    def _check_ids(self, tokens: np.ndarray, first_seq: int | list[int]) -> None:
        """Token ids past the tokenizer's vocabulary: a one-line error, not a decode crash."""
        try:
            vocab = len(self.tokenizer) if self.tokenizer is not None else None
        except TypeError:  # a tokenizer-like object without a size (tests pass such): nothing to check against
            vocab = None
        if vocab:
            check_token_ids(tokens, vocab, str(self.path), first_seq)

    def decode(self, token_id: int) -> str:
        """One token as text (cached); `<id>` when no tokenizer could be loaded."""
        s = self._strings.get(token_id)
        if s is None:
            if self.tokenizer is None:
                s = f"<{token_id}>"
            else:
                s = self.tokenizer.decode([token_id])
            self._strings[token_id] = s
        return s

    def preload(self, seqs: list[int]) -> None:
        """Cache the tokens of these sequences for `tokens_of` (one sorted read instead of one per example)."""
        uniq = sorted(set(seqs))
        self._toks = dict(zip(uniq, self.tokens(uniq).tolist()))

    def tokens_of(self, seq: int, start: int, stop: int) -> list[str]:
        """Token strings of positions start..stop-1 of sequence seq."""
        row = self._toks[seq] if seq in self._toks else self.tokens([seq])[0].tolist()
        return [self.decode(t) for t in row[start:stop]]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> ActsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _load_tokenizer(spec: str):
    """The tokenizer of a model SPEC, or None (token ids are then shown as `<id>`)."""
    if not spec:
        return None
    try:
        from sae_toolkit.model.loading import load_tokenizer

        return load_tokenizer(spec)
    except Exception as e:  # any failure only costs readable token strings, so say so and go on
        import warnings

        warnings.warn(f"could not load tokenizer {spec!r} ({type(e).__name__}: {e}); showing token ids",
                      stacklevel=3)
        return None
