"""Prefetcher: ActivationStore's background threads, from gathered batches to float32 batches on the device.

A prefetch thread gathers batches (GroupReader) while a reader thread reads the next groups. With CUDA the batch
buffers are a ring of pinned host buffers copied and converted on a side stream, so the copy overlaps the
training step; on CPU a finisher thread converts batch n while batch n + 1 is gathered, into float32 arrays
recycled once the consumer dropped them (`_Recycled`).
"""

from __future__ import annotations

import contextlib
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

_HOST_RING = 3
"""Stored-dtype batch buffers of the host path: one being gathered, the others waiting for or in conversion."""


def _one_torch_thread() -> None:
    """Run the calling thread's torch ops on one thread (the CPU prefetch thread's gathers and conversions).

    They are memory-bound and run beside a consumer whose step already has an OpenMP team on every core; a second
    team per op only oversubscribes the cores, and on a busy machine each op then waits for a descheduled team
    member (single-threaded gather/convert measured 50x faster than two threads under load, and no slower in
    interleaved store rounds). `torch.set_num_threads` sets the calling thread's team size, but also the default
    that threads starting later pick up: `next_batch` puts that default back once the thread is set up.
    """
    torch.get_num_threads()  # torch sets a thread up on its first use, from that default: before, not after
    torch.set_num_threads(1)


class _Recycled:
    """Host float32 arrays for batches handed to a consumer, each reused once the consumer dropped every tensor
    that shares its memory (views included): a new batch then writes to pages already mapped instead of fresh ones,
    whose page faults (and zeroing) cost about as much as the conversion itself.

    A batch's tensor comes from `torch.from_numpy`, whose storage holds a reference to the array: the array's
    reference count falls back to the pool's own exactly when no tensor uses it any more.
    """

    def __init__(self, shape: tuple[int, int], cap: int):
        """shape: [batch, width] of every array; cap: arrays kept for reuse (more in use: fresh ones)."""
        self.shape, self.cap = shape, cap
        self._arrays: list[np.ndarray] = []

    def take(self) -> torch.Tensor:
        """A float32 tensor of `shape` (contents undefined) that no one else holds."""
        for a in self._arrays:
            if sys.getrefcount(a) <= _POOL_REFS:
                return torch.from_numpy(a)
        a = np.empty(self.shape, dtype=np.float32)
        if len(self._arrays) < self.cap:
            self._arrays.append(a)
        return torch.from_numpy(a)


_POOL_REFS = 3
"""sys.getrefcount of an array of `_Recycled._arrays` that no tensor holds: the list, the loop variable and
getrefcount's own argument."""


def put_unless_stopped(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put `item` on the bounded queue `q` from a producer thread, waiting while it is full, unless `stop` is set
    first (checked every 0.1 s): True once put, False when stopped. A consumer that went away never leaves its
    producer blocked."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class _Stopped(Exception):
    """The consumer stopped the stream while the host path waited for a buffer."""


class _CudaOps:
    """The CUDA calls of the store's side-stream path, in one place so that CPU tests can stand in for them."""

    pin = True
    """Gather into page-locked host buffers (required for a copy that overlaps the step)."""

    def __init__(self, device: torch.device):
        self.device = device

    def stream(self) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def on(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def copy(self, buf: torch.Tensor) -> torch.Tensor:
        """Host buffer → a new device tensor, asynchronously on the current (side) stream."""
        return buf.to(self.device, non_blocking=True)

    def hand_over(self, x: torch.Tensor, ready: torch.cuda.Event) -> None:
        """Consumer side: its stream waits for the batch's copy and conversion before using `x`."""
        current = torch.cuda.current_stream(self.device)
        current.wait_event(ready)
        x.record_stream(current)  # its memory came from the side stream's pool


class Prefetcher:
    """ActivationStore's prefetch, reader and finisher threads (a base class of the store, not used on its own).

    Reads the store's `device`, `batch_size`, `prefetch`, `scale`, `dtype`, `d_in`, `_dset` and `_memory`, and
    gathers through GroupReader's `_batches`.
    """

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """A fresh stored-dtype batch → float32 scaled by `scale`, on x's device (CUDA: a kernel on the side stream).
        A float32 `x` is scaled in place: the callers hand over a tensor nobody else holds."""
        return self._scale_(x.to(torch.float32))

    def _scale_(self, x: torch.Tensor) -> torch.Tensor:
        """A float32 batch nobody else holds, scaled by `scale` in place."""
        return x.mul_(self.scale) if self.scale != 1.0 else x

    @contextlib.contextmanager
    def _reader(self) -> Iterator[ThreadPoolExecutor | None]:
        """The thread that reads streaming groups ahead of the gathers (None in memory: nothing to read)."""
        if self._memory is not None:
            yield None
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="ActivationStore-read")  # h5py and numpy only, no torch
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _produce(self, rows_done: int, out: queue.Queue, stop: threading.Event, ops: _CudaOps | None,
                 set_up: threading.Event) -> None:
        """Prefetch thread: fill `out` with device batches (or the exception that ended the stream) until `stop`.
        `set_up` is set once the host path runs single-threaded torch ops (see _one_torch_thread); with CUDA the
        consumer's step runs on the GPU, and the gathers keep the default threads, as before."""

        def put(item: object) -> bool:
            return put_unless_stopped(out, item, stop)

        try:
            if ops is None:
                _one_torch_thread()
            with self._reader() as reader, self._finisher(ops is None) as finisher:
                set_up.set()
                if ops is not None:
                    self._produce_cuda(rows_done, put, reader, ops)
                else:
                    self._produce_host(rows_done, put, reader, finisher)
        except BaseException as e:  # handed to the consumer, which re-raises it in the training thread
            put(e)
        finally:
            set_up.set()

    def _host_buffer(self, pin: bool = False) -> torch.Tensor:
        """An empty [batch, d_in] host tensor in the stored dtype."""
        dtype = torch.bfloat16 if self.dtype == "bfloat16" else getattr(torch, self._dset.dtype.name)
        return torch.empty(self.batch_size, self.d_in, dtype=dtype, pin_memory=pin)

    @contextlib.contextmanager
    def _finisher(self, host: bool) -> Iterator[ThreadPoolExecutor | None]:
        """The host path's second thread (None for CUDA): it converts and scales each gathered batch while the
        prefetch thread gathers the next one, so the two halves of a batch's CPU work run on two cores. Started and
        made single-threaded here, before `next_batch` puts torch's default thread count back."""
        if not host:
            yield None
            return
        pool = ThreadPoolExecutor(1, thread_name_prefix="ActivationStore-finish")
        try:
            pool.submit(_one_torch_thread).result()
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _produce_host(self, rows_done: int, put: Callable[[object], bool], reader: ThreadPoolExecutor | None,
                      finisher: ThreadPoolExecutor) -> None:
        """Gather each batch into one of _HOST_RING reused stored-dtype buffers; the finisher converts it to a new
        float32 tensor and hands it out (in order: one finisher thread). A buffer is refilled only once its previous
        batch was converted. A float32 file's batch is gathered into a new tensor instead: it is handed out as it is
        (scaled in place)."""
        fresh = self._host_buffer().dtype == torch.float32
        ring = [] if fresh else [self._host_buffer() for _ in range(_HOST_RING)]
        done: deque[Future] = deque()  # the finisher's jobs not yet waited for, oldest first
        turn = [0]
        # the float32 batches handed out: recycled once the consumer dropped them (no page faults per batch)
        outputs = _Recycled((self.batch_size, self._host_buffer().shape[1]), self.prefetch + _HOST_RING + 2)

        def finish(raw: torch.Tensor) -> bool:
            x = self._scale_(raw if fresh else outputs.take().copy_(raw))
            return put((x.to(self.device), None))

        def new_buffer() -> torch.Tensor:
            if fresh:
                return outputs.take()
            while len(done) >= _HOST_RING:  # the buffer about to be refilled is the oldest job's
                if not done.popleft().result():  # (re-raises the finisher's error here)
                    raise _Stopped
            return ring[turn[0] % _HOST_RING]

        try:
            with contextlib.closing(self._batches(rows_done, new_buffer, reader)) as batches:
                for raw in batches:
                    done.append(finisher.submit(finish, raw))
                    turn[0] += 1
                    while done and done[0].done():
                        if not done.popleft().result():
                            return
        except _Stopped:
            return
        except BaseException:
            # the batches gathered before the error reach the consumer before it does, as they would without a
            # finisher (a read error or a non-finite row comes after the batches of the rows before it)
            while done:
                done.popleft().result()
            raise

    def _produce_cuda(self, rows_done: int, put: Callable[[object], bool], reader: ThreadPoolExecutor | None,
                      ops: _CudaOps) -> None:
        """Gather into a ring of pinned buffers, copy and convert on a side stream; each batch travels with the
        event the consumer's stream waits on. A buffer is refilled only after its previous copy has finished."""
        stream = ops.stream()
        ring = [(self._host_buffer(pin=ops.pin), ops.event()) for _ in range(self.prefetch + 2)]
        turn = [-1]

        def new_buffer() -> torch.Tensor:
            turn[0] += 1
            buf, copied = ring[turn[0] % len(ring)]
            copied.synchronize()  # the copy out of this buffer (prefetch + 2 batches ago) is done
            return buf

        with contextlib.closing(self._batches(rows_done, new_buffer, reader)) as batches:
            for buf in batches:
                copied = ring[turn[0] % len(ring)][1]
                with ops.on(stream):
                    x = self._finish(ops.copy(buf))
                    copied.record(stream)
                if not put((x, copied)):
                    return

    def _device_ops(self) -> _CudaOps | None:
        """The side-stream calls for a CUDA device; None: the host path. (Tests stand in for them on CPU.)"""
        return _CudaOps(self.device) if self.device.type == "cuda" else None
