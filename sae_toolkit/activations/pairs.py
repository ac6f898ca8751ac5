"""PairedActivationStore: row-aligned (input, target) batches of two hookpoints of one file, for transcoders.

    >>> store = open_store("acts.h5", "mlp_in.6", target="mlp_out.6", batch_size=4096)  # doctest: +SKIP
    >>> x, y = split_batch(store.next_batch())  # x [batch, d_in] of mlp_in.6, y [batch, d_out] of the same tokens

Row r of every `acts/<HP>` dataset is the same (sequence, position) (DESIGN §3), so reading both datasets over
the same row ranges and applying one permutation keeps the pairs aligned. The store reads the two side by side
as one [n, d_in + d_out] row, which lets ActivationStore's block/buffer shuffle, prefetch and resume work as
they are; `next_batch` splits it into a `Pair`. Input and target are normalized separately (each to mean norm
√width), so the loss and the λ/lr defaults stay on the scale they were tuned for; `fold_scales_` undoes both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import torch

from sae_toolkit.activations.format import hookpoint_dataset, hookpoints, stored_dtype
from sae_toolkit.activations.store import ActivationStore
from sae_toolkit.errors import SAEToolkitError


class Pair(NamedTuple):
    """One batch (or sample) of a transcoder's data."""

    x: torch.Tensor
    """[batch, d_in] the encoder's input (input hookpoint), scaled by `scale`."""
    y: torch.Tensor
    """[batch, d_out] the target of the same tokens, scaled by `target_scale`."""


def split_batch(batch: torch.Tensor | Pair) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, y) of a batch: a Pair from a PairedActivationStore, or (x, None) for a plain ActivationStore batch."""
    if isinstance(batch, Pair):
        return batch.x, batch.y
    return batch, None


def open_store(path: str | Path, hookpoint: str, target: str = "", **kwargs) -> ActivationStore:
    """An ActivationStore of `hookpoint`, or a PairedActivationStore when a `target` hookpoint is given."""
    if target:
        return PairedActivationStore(path, hookpoint, target, **kwargs)
    return ActivationStore(path, hookpoint, **kwargs)


class PairedActivationStore(ActivationStore):
    """Endless shuffled `Pair(x, y)` batches: x from `acts/<hookpoint>`, y from `acts/<target>`, same tokens.

    Everything else (BOS exclusion, seq_range, shuffle, prefetch, `state_dict`) is ActivationStore's, over the
    rows of both datasets. `scale` is the input's factor, `target_scale` the target's (both 1 without normalize).
    """

    def __init__(self, path: str | Path, hookpoint: str, target: str, *, normalize: bool = False,
                 norm_sample: int = 8192, **kwargs) -> None:
        """As ActivationStore, plus target: the dataset under acts/ the decoder predicts (a different one)."""
        if target == hookpoint:
            raise SAEToolkitError(f"--target {target!r} is the --hookpoint itself; a transcoder predicts another "
                                  "hookpoint (drop --target to train an SAE)")
        self.target = target
        self._normalize_pair = normalize
        self._pair_norm_sample = norm_sample
        super().__init__(path, hookpoint, normalize=False, norm_sample=norm_sample, **kwargs)

    def _open(self, hookpoint: str, seq_range: tuple[int, int] | None, exclude_bos: bool,
              block_rows: int | None) -> None:
        present = hookpoints(self._file)
        if self.target not in present:
            raise SAEToolkitError(f"target hookpoint {self.target!r} is not in {str(self.path)!r}; it holds: "
                                  f"{', '.join(present) or 'none'} (cache it with a second --hookpoint)")
        super()._open(hookpoint, seq_range, exclude_bos, block_rows)
        self._target_dset = hookpoint_dataset(self._file, self.target)
        self.d_out = int(self._target_dset.shape[1])
        self.target_dtype = stored_dtype(self._target_dset)
        if self.target_dtype != self.dtype or self._target_dset.dtype != self._dset.dtype:
            # rows of both travel side by side in one buffer of the stored dtype (the cacher writes one dtype)
            raise SAEToolkitError(f"acts/{hookpoint} is {self.dtype} but acts/{self.target} is {self.target_dtype} "
                                  f"in {str(self.path)!r}; a transcoder needs both stored in one dtype — re-cache "
                                  "them in one `sae-toolkit cache` run")
        if self._target_dset.shape[0] < self._row_stop:
            raise SAEToolkitError(f"acts/{self.target} has {self._target_dset.shape[0]} rows but the file's "
                                  f"sequences need {self._row_stop}; re-cache the file")

    def _prepare(self, in_memory, buffer_blocks: int, normalize: bool, norm_sample: int) -> None:
        super()._prepare(in_memory, buffer_blocks, False, norm_sample)
        self.target_scale = 1.0
        if self._normalize_pair:
            raw = super().sample(self._pair_norm_sample, seed=self.seed + 7919, normalized=False)
            x, y = raw[:, :self.d_in], raw[:, self.d_in:]
            for name, part in ((self.hookpoint, x), (self.target, y)):
                if not part.norm(dim=1).mean().item() > 0:
                    raise SAEToolkitError(f"acts/{name} rows sampled from {self.path} are all zero; cannot "
                                          "normalize — check the file or train with normalize=False")
            self.scale = math.sqrt(self.d_in) / x.norm(dim=1).mean().item()
            self.target_scale = math.sqrt(self.d_out) / y.norm(dim=1).mean().item()

    def _read_rows(self, lo: int, hi: int) -> np.ndarray:
        """Usable rows of `[lo, hi)` in the stored dtype, `[n, d_in + d_out]`: input and target side by side."""
        x = super()._read_rows(lo, hi)
        y = self._target_dset[lo:hi]
        self._check_finite(y, lo, self.target)
        return np.concatenate([x, y[self._keep[lo - self._row_start:hi - self._row_start]]], axis=1)

    def _read_group(self, group: np.ndarray, buffer: int) -> tuple[np.ndarray, np.ndarray]:
        """As ActivationStore's, with both datasets' rows side by side in the (wider) reusable buffer."""
        width = self.d_in + self.d_out
        if self._buffers[buffer] is None:
            self._buffers[buffer] = np.empty((self.buffer_blocks * self._block_rows, width), self._dset.dtype)
        buf, at, positions = self._buffers[buffer], 0, []
        for b in group:
            lo, hi = self._blocks[b]
            rows = np.s_[at:at + hi - lo]
            # straight into each side's columns of the buffer: no intermediate arrays
            self._dset.read_direct(buf, np.s_[lo:hi], np.s_[rows, :self.d_in])
            self._target_dset.read_direct(buf, np.s_[lo:hi], np.s_[rows, self.d_in:])
            self._check_finite(buf[rows, :self.d_in], lo)
            self._check_finite(buf[rows, self.d_in:], lo, self.target)
            positions.append(at + np.flatnonzero(self._keep[lo - self._row_start:hi - self._row_start]))
            at += hi - lo
        return buf, np.concatenate(positions)

    def _streamed(self) -> list[tuple[h5py.Dataset, str]]:
        """Input then target: a batch row holds both, side by side."""
        return [(self._dset, self.hookpoint), (self._target_dset, self.target)]

    def _host_buffer(self, pin: bool = False) -> torch.Tensor:
        """An empty [batch, d_in + d_out] host tensor in the stored dtype."""
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else getattr(torch, self._dset.dtype.name)
        return torch.empty(self.batch_size, self.d_in + self.d_out, dtype=dtype, pin_memory=pin)

    def _scale_(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 [batch, d_in + d_out] nobody else holds, each side scaled by its own factor in place."""
        return x if self.scale == 1.0 and self.target_scale == 1.0 else x.mul_(self._factors().to(x.device))

    def _factors(self) -> torch.Tensor:
        """[d_in + d_out] float32: `scale` for the input's columns, `target_scale` for the target's."""
        return torch.cat([torch.full((self.d_in,), self.scale), torch.full((self.d_out,), self.target_scale)])

    def _scaled(self, rows: torch.Tensor) -> torch.Tensor:
        """[n, d_in + d_out] raw → the same with the input part × scale and the target part × target_scale."""
        if self.scale == 1.0 and self.target_scale == 1.0:
            return rows
        return rows * self._factors().to(rows)

    def next_batch(self) -> Pair:  # type: ignore[override]  # a Pair instead of one tensor: the point of the class
        """The next `Pair(x [batch, d_in], y [batch, d_out])` on `device`, scaled."""
        both = super().next_batch()
        return Pair(both[:, :self.d_in], both[:, self.d_in:])

    def sample(self, n: int, *, seed: int = 0, normalized: bool = True) -> Pair:  # type: ignore[override]
        """`n` usable (x, y) rows on CPU as a Pair (see ActivationStore.sample)."""
        both = super().sample(n, seed=seed, normalized=False)
        if normalized:
            both = self._scaled(both)
        return Pair(both[:, :self.d_in], both[:, self.d_in:])

    def state_dict(self) -> dict:
        return {**super().state_dict(), "target": self.target, "target_scale": self.target_scale}

    def load_state_dict(self, state: dict) -> None:
        if state.get("target") != self.target:
            raise SAEToolkitError(f"cannot resume the activation stream: target was {state.get('target')!r}, now "
                                  f"{self.target!r}; resume with the same --target")
        super().load_state_dict(state)
        self.target_scale = float(state["target_scale"])

    def __repr__(self) -> str:
        return (f"PairedActivationStore({str(self.path)!r}, {self.hookpoint!r} → {self.target!r}, d_in={self.d_in}, "
                f"d_out={self.d_out}, rows={self.n_rows}, batch_size={self.batch_size})")


__all__ = ["Pair", "PairedActivationStore", "open_store", "split_batch"]
