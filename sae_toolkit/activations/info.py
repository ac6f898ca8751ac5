"""`sae-toolkit info FILE.h5`: a readable summary of an activation file (DESIGN §3)."""

from __future__ import annotations

import json
from pathlib import Path

from sae_toolkit.activations.format import (
    bos_token_id,
    damaged,
    hookpoint_dataset,
    hookpoints,
    open_acts,
    read_root_attrs,
    stored_dtype,
)
from sae_toolkit.errors import SAEToolkitError


def describe(path: str) -> str:
    """Model, dataset, context size, hookpoints (module, io, d, dtype), tokens, completeness and file size.

    Anything that is not a toolkit activation file gives a one-line SAEToolkitError.
    """
    file = Path(path).expanduser()
    attrs = read_root_attrs(file)
    ctx, n_seqs = int(attrs["context_size"]), int(attrs["n_seqs"])
    target = int(attrs.get("n_seqs_target", n_seqs))
    config = json.loads(attrs.get("config", "{}"))
    lines = [
        f"file:         {file} ({_size(file.stat().st_size)})",
        f"format:       {attrs['format']} v{attrs['format_version']}, written {attrs.get('created', '?')} "
        f"by sae-toolkit {attrs.get('toolkit_version', '?')}",
        f"model:        {attrs.get('model', '?')}",
        f"dataset:      {attrs.get('dataset', '?')} (split {config.get('split', '?')}, "
        f"text column {config.get('text_column') or 'guessed'})",
        f"context size: {ctx} tokens per sequence, BOS id {_bos(attrs)}",
        f"stored:       {n_seqs} sequences = {n_seqs * ctx:,} tokens",
        f"status:       {_status(attrs, n_seqs, target, ctx, config.get('tokens'))}",
        "hookpoints:",
    ]
    try:
        with open_acts(file) as f, damaged(file):
            for name in hookpoints(f):
                dset = f["acts"][name]
                if dset.ndim != 2:
                    hookpoint_dataset(f, name)  # raises its one-line "expected [n_seqs*context_size, d]"
                a = dset.attrs
                lines.append(
                    f"  {name:<28} module {a.get('module', '?')} ({a.get('io', '?')}), d={a.get('d', dset.shape[1])}, "
                    f"{stored_dtype(dset)}{_rows_note(dset.shape[0], n_seqs * ctx)}"
                )
    except OSError as e:
        raise SAEToolkitError(f"cannot read {path}: {e}") from None
    return "\n".join(lines)


def _bos(attrs: dict) -> str:
    """The BOS id, or what stands in for it: -1 means the tokenizer has none (DESIGN §3)."""
    if "bos_token_id" not in attrs:
        return "?"
    bos = bos_token_id(attrs)
    return "none" if bos is None else str(bos)


def _rows_note(rows: int, data_rows: int) -> str:
    """Rows past n_seqs*context_size are not data (a killed writer may leave them); fewer means damage."""
    if rows > data_rows:
        return f", {rows - data_rows:,} rows past n_seqs are not data"
    if rows < data_rows:
        return f", DAMAGED: {rows:,} rows where n_seqs needs {data_rows:,}"
    return ""


def _status(attrs: dict, n_seqs: int, target: int, ctx: int, asked: int | None) -> str:
    if attrs.get("corpus_exhausted"):
        return f"complete (the corpus ran out after {n_seqs * ctx:,} tokens, before the {asked or '?':,} asked)"
    if n_seqs >= target:
        return "complete"
    return (
        f"INCOMPLETE: {n_seqs} of {target} sequences ({100 * n_seqs / max(target, 1):.0f}%); "
        "continue it with `sae-toolkit cache ... --resume` and the same settings"
    )


def _size(n_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n_bytes < 1024 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes} B"
