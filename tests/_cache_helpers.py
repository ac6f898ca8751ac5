"""Shared test helpers for the model/hookpoint/corpus/cache tests: naive references that use none of our code."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine run ~10x faster single-threaded (OpenMP oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def direct_capture(model: torch.nn.Module, module_name: str, io: str, input_ids: torch.Tensor) -> torch.Tensor:
    """Reference capture: one plain hook, full forward pass, no early stop. Returns [batch, seq, d]."""
    module = dict(model.named_modules())[module_name]
    got: list[torch.Tensor] = []
    if io == "input":
        handle = module.register_forward_pre_hook(lambda m, args: got.append(args[0].detach().clone()))
    else:
        handle = module.register_forward_hook(
            lambda m, args, out: got.append((out[0] if isinstance(out, tuple) else out).detach().clone())
        )
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    finally:
        handle.remove()
    assert len(got) == 1
    return got[0]


def reference_windows(docs: list[str], tokenizer, context_size: int) -> np.ndarray:
    """Naive packing: tokenize each document alone, join with EOS, cut into BOS + (ctx-1) token windows."""
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    body = context_size - 1
    n = len(stream) // body
    return np.array([[tokenizer.bos_token_id] + stream[i * body : (i + 1) * body] for i in range(n)], dtype=np.int32)


def decode_rows(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows → float32 (bfloat16 is stored as the upper 16 bits of a float32)."""
    if dtype == "bfloat16":
        return (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.astype(np.float32)
