"""ModelStream: activations straight from the model (no HDF5 file), shuffled through an in-memory buffer.

Corpus windows are packed exactly as the cacher packs them (so the first N tokens are the rows a cache of the
same corpus holds), cut into *groups* of `buffer_windows` consecutive windows, run through the model with the
forward stopped after the deepest hookpoint, and each group's usable rows (BOS excluded) are permuted before
they are handed out. Batches are consecutive slices of the concatenated permuted groups. Every hookpoint gets
the same permutation, so row i of each hookpoint's batch is the same token.

The stream is a pure function of `(seed, rows_done)`: a resume re-tokenizes the groups it has passed (cheap,
no forward) and runs the model only from the group it stopped in, so no buffer contents need saving.

    >>> cfg = StreamConfig("tiny-llama", "builtin:pydoc", ["mlp_out.1"])
    >>> stream = ModelStream(cfg, batch_size=4096)  # doctest: +SKIP
    >>> xs = stream.next_batches()  # {"mlp_out.1": [batch, d] float32 on the device}
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sae_toolkit.errors import SAEToolkitError

DEFAULT_BUFFER_BATCHES = 32
"""Default buffer = this many training batches: with batch 4096 and context 128 one group spans 1024 windows,
so a batch draws ~4 rows from each of ~1000 windows instead of whole runs of a few documents."""


@dataclass
class StreamConfig:
    """Where streamed activations come from; saved in each run's train_config.json under `source`."""

    model: str
    """Model spec (as for `cache`)."""
    dataset: str
    """Corpus spec (as for `cache`)."""
    hookpoints: list[str]
    """Hookpoints captured in one forward pass; each gets its own batches."""
    split: str = "train"
    """Dataset split."""
    text_column: str | None = None
    """Column holding the text; None guesses."""
    context_size: int = 128
    """Tokens per window, BOS included."""
    forward_batch: int = 32
    """Windows per model forward."""
    buffer_tokens: int | None = None
    """Tokens shuffled together (one group). None: DEFAULT_BUFFER_BATCHES training batches."""

    def __post_init__(self) -> None:
        if isinstance(self.hookpoints, str):
            self.hookpoints = [self.hookpoints]
        if not self.hookpoints:
            raise SAEToolkitError("no hookpoint given; pass --hookpoint such as mlp_out.1")
        if not self.model or not self.dataset:
            raise SAEToolkitError("training from the model needs both --model and --dataset")
        if not isinstance(self.context_size, int) or self.context_size < 2:
            raise SAEToolkitError(f"context_size={self.context_size!r} must be an integer >= 2")
        if not isinstance(self.forward_batch, int) or self.forward_batch < 1:
            raise SAEToolkitError(f"forward_batch={self.forward_batch!r} must be a positive integer")
        if self.buffer_tokens is not None and (not isinstance(self.buffer_tokens, int) or self.buffer_tokens < 1):
            raise SAEToolkitError(f"buffer_tokens={self.buffer_tokens!r} must be a positive integer, e.g. 256k")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ModelStream:
    """Endless shuffled batches `{hookpoint: [batch, d] float32}` from a model run over a corpus.

    With `world_size > 1`, this rank packs documents `rank, rank + world_size, ...` of the corpus into its own
    windows, disjoint from the other ranks'. The normalization `scale` per hookpoint (mean row norm → sqrt(d))
    is estimated from the first group; `sample` draws from a fixed pool of that group's rows (for b_dec
    initialisation and resampling).
    """

    def __init__(self, cfg: StreamConfig, *, batch_size: int, device: str | torch.device = "cpu", seed: int = 0,
                 exclude_bos: bool = True, normalize: bool = True, rank: int = 0, world_size: int = 1,
                 pool_rows: int = 16384, norm_sample: int = 8192):
        from sae_toolkit.model.hookpoints import resolve_all
        from sae_toolkit.model.loading import canonical_spec, load_model

        self.cfg = cfg
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.exclude_bos = exclude_bos
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self._model, self._tokenizer = load_model(cfg.model, device=str(self.device), dtype=dtype)
        self.model = canonical_spec(cfg.model)
        self._hookpoints = resolve_all(self._model, cfg.hookpoints)
        limit = getattr(getattr(self._model, "config", None), "max_position_embeddings", None)
        if limit is not None and cfg.context_size > limit:
            raise SAEToolkitError(f"context size {cfg.context_size} exceeds the model's {limit} positions; "
                                  f"use --context-size <= {limit}")
        from sae_toolkit.model.corpus import special_ids

        self.bos_token_id = special_ids(self._tokenizer)[0]
        buffer_tokens = cfg.buffer_tokens or DEFAULT_BUFFER_BATCHES * self.batch_size * self.world_size
        # Per rank: each rank buffers its share, so the global buffer is buffer_tokens whatever world_size.
        self.buffer_windows = max(1, math.ceil(buffer_tokens / self.world_size / cfg.context_size))
        self.rows_done = 0
        self.epoch = 0
        # The first group also gives the pool and the scale; the stream then starts inside it, so it runs once.
        self._rows: Iterator[tuple[dict[str, torch.Tensor], int]] | None = self._groups(0)
        first, _ = next(self._rows)
        self._current: tuple[dict[str, torch.Tensor], int] | None = (first, 0)
        self.d = {name: int(x.shape[1]) for name, x in first.items()}
        n = len(next(iter(first.values())))
        rng = np.random.default_rng([self.seed, 1_000_003])
        pick = torch.from_numpy(rng.permutation(n)[:pool_rows]).to(self.device)
        self._pool = {name: x[pick].cpu() for name, x in first.items()}
        self.raw_mean_norm = {name: x[:norm_sample].norm(dim=1).mean().item() for name, x in self._pool.items()}
        self.scale = {name: 1.0 for name in self.d}
        if normalize:
            for name, m in self.raw_mean_norm.items():
                if not m > 0:
                    raise SAEToolkitError(f"{name} activations of {cfg.model} are all zero on the first windows; "
                                          "cannot normalize — pick another hookpoint")
                self.scale[name] = math.sqrt(self.d[name]) / m

    @property
    def hookpoints(self) -> list[str]:
        return [hp.name for hp in self._hookpoints]

    # ---- windows and groups ----

    def _windows(self) -> Iterator[np.ndarray]:
        """This rank's windows int32 [context_size], in corpus order, packed as the cacher packs them.

        Ranks split the corpus by document (every world_size-th), so each rank tokenizes only its share; one
        process (world_size 1) gets exactly the cacher's windows. Tokenizing runs on a background thread.
        """
        from sae_toolkit.activations.cacher import _prefetch
        from sae_toolkit.model.corpus import open_corpus, token_windows

        cfg = self.cfg
        documents = open_corpus(cfg.dataset, split=cfg.split, text_column=cfg.text_column)
        if self.world_size > 1:
            documents = itertools.islice(documents, self.rank, None, self.world_size)
        for block in _prefetch(token_windows(documents, self._tokenizer, cfg.context_size)):
            yield from block

    def _token_groups(self) -> Iterator[np.ndarray]:
        """One pass over the corpus in groups int32 [<= buffer_windows, context_size]."""
        pending: list[np.ndarray] = []
        for window in self._windows():
            pending.append(window)
            if len(pending) == self.buffer_windows:
                yield np.stack(pending)
                pending = []
        if pending:
            yield np.stack(pending)

    def _keep(self, tokens: np.ndarray) -> np.ndarray:
        """[n_windows * context_size] bool: positions that are training rows."""
        flat = tokens.reshape(-1)
        if self.exclude_bos and self.bos_token_id is not None:
            return flat != self.bos_token_id
        return np.ones(len(flat), dtype=bool)

    def _groups(self, rows_done: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
        """`(rows, offset)` per group from stream position `rows_done` on: rows {name: [n, d]} permuted,
        offset the first row still to hand out. Groups before the position are tokenized but not run."""
        epoch, offset = 0, rows_done
        while True:
            empty = True
            for g, tokens in enumerate(self._token_groups()):
                empty = False
                keep = self._keep(tokens)
                n = int(keep.sum())
                if offset >= n:
                    offset -= n
                    continue
                self.epoch = epoch
                rows = self._forward(tokens, keep)
                perm = torch.from_numpy(np.random.default_rng([self.seed, epoch, g]).permutation(n)).to(self.device)
                yield {name: x[perm] for name, x in rows.items()}, offset
                offset = 0
            if empty:
                raise SAEToolkitError(f"corpus {self.cfg.dataset!r} gives no window of {self.cfg.context_size} "
                                      f"tokens for rank {self.rank} of {self.world_size}; use a larger corpus")
            epoch += 1

    @torch.inference_mode()
    def _forward(self, tokens: np.ndarray, keep: np.ndarray) -> dict[str, torch.Tensor]:
        """Usable rows {name: [n, d] float32 on the device} of a group of windows, in window order."""
        from sae_toolkit.model.hookpoints import run_capture

        parts: dict[str, list[torch.Tensor]] = {hp.name: [] for hp in self._hookpoints}
        keep_t = torch.from_numpy(keep).to(self.device)
        step = self.cfg.forward_batch
        ctx = self.cfg.context_size
        for i in range(0, len(tokens), step):
            ids = torch.from_numpy(tokens[i:i + step]).to(device=self.device, dtype=torch.long)
            acts = run_capture(self._model, self._hookpoints, ids)
            mask = keep_t[i * ctx:(i + len(ids)) * ctx]
            for name, x in acts.items():
                rows = x.reshape(-1, x.shape[-1])[mask].float()  # [batch * seq, d] -> [kept, d]
                if not torch.isfinite(rows).all():
                    raise SAEToolkitError(f"the model produced NaN/Inf activations at {name!r}; check the model "
                                          "or run it in float32 (--device cpu)")
                parts[name].append(rows)
        return {name: torch.cat(p) for name, p in parts.items()}

    # ---- public API ----

    def next_batches(self) -> dict[str, torch.Tensor]:
        """The next batch of every hookpoint, {name: [batch_size, d] float32 on the device}, scaled."""
        if self._rows is None:
            self._rows = self._groups(self.rows_done)
        pieces: dict[str, list[torch.Tensor]] = {name: [] for name in self.d}
        need = self.batch_size
        while need:
            if self._current is None or self._current[1] >= len(next(iter(self._current[0].values()))):
                self._current = next(self._rows)
            rows, pos = self._current
            take = min(need, len(next(iter(rows.values()))) - pos)
            for name, x in rows.items():
                pieces[name].append(x[pos:pos + take])
            self._current = (rows, pos + take)
            need -= take
        self.rows_done += self.batch_size
        return {name: torch.cat(p) * self.scale[name] for name, p in pieces.items()}

    def sample(self, name: str, n: int, *, seed: int = 0, normalized: bool = True) -> torch.Tensor:
        """`n` rows `[n, d]` float32 on CPU from the pool (the first group); a function of `seed` only."""
        pool = self._pool[name]
        pick = np.random.default_rng([self.seed, 2_000_003, seed]).permutation(len(pool))[:n]
        x = pool[torch.from_numpy(pick)]
        return x * self.scale[name] if normalized else x

    def state_dict(self) -> dict:
        """Stream position plus what must match for it to mean the same rows."""
        return {"rows_done": self.rows_done, "seed": self.seed, "batch_size": self.batch_size,
                "buffer_windows": self.buffer_windows, "rank": self.rank, "world_size": self.world_size,
                "hookpoints": self.hookpoints, "scale": dict(self.scale)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the groups before it are re-created, not stored."""
        have = self.state_dict()
        for key in ("seed", "batch_size", "buffer_windows", "rank", "world_size", "hookpoints"):
            if state.get(key) != have[key]:
                raise SAEToolkitError(f"cannot resume the model stream: {key} was {state.get(key)!r} and is now "
                                      f"{have[key]!r}; resume with the same --batch-size, --buffer-tokens, seed, "
                                      "hookpoints and number of processes")
        self.rows_done = int(state["rows_done"])
        self.scale = {name: float(v) for name, v in state["scale"].items()}
        self.close()  # the groups from the old position end now (their tokenizer thread joined); new ones on demand

    def close(self) -> None:
        if self._rows is not None:
            self._rows.close()  # closes the tokenizer's prefetch generator now, which joins its thread
        self._rows, self._current = None, None
