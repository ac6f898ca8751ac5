"""Shared pieces of the analysis/report tests: activation files written with plain h5py, a tiny-model file,
a list tokenizer, and brute-force references."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import torch

BOS = 0


class ListTokenizer:
    """A tokenizer stand-in: token id i decodes to strings[i]; ids 0-2 are special (BOS, EOS, PAD) by default."""

    def __init__(self, strings: list[str], special: tuple[int, ...] = (0, 1, 2)):
        self.strings = strings
        self.all_special_ids = list(special)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.strings[i] for i in ids)


def write_acts(path: Path, acts: np.ndarray, tokens: np.ndarray, *, hookpoint: str = "mlp_out.1",
               dtype: str = "float32", model: str = "", tokenizer: str = "", extra_rows: int = 0) -> Path:
    """An activation file as DESIGN §3 describes it: acts [n_seqs, ctx, d], tokens [n_seqs, ctx]."""
    n, ctx, d = acts.shape
    rows = acts.reshape(n * ctx, d)
    if extra_rows:  # garbage past n_seqs*ctx, as a killed writer leaves it: must never be read
        rows = np.concatenate([rows, np.full((extra_rows, d), 1e4, rows.dtype)])
    with h5py.File(path, "w") as f:
        f.attrs.update(format="sae_toolkit.activations", format_version=1, model=model, dataset="unit-test",
                       context_size=ctx, n_seqs=n, tokenizer=tokenizer, bos_token_id=BOS)
        f.create_dataset("tokens", data=tokens.astype(np.int32))
        if dtype == "bfloat16":
            bits = torch.from_numpy(rows.astype(np.float32)).to(torch.bfloat16).view(torch.int16).numpy()
            ds = f.create_dataset(f"acts/{hookpoint}", data=bits.view(np.uint16), chunks=(ctx, d))
        else:
            ds = f.create_dataset(f"acts/{hookpoint}", data=rows.astype(dtype), chunks=(ctx, d))
        ds.attrs.update(hookpoint=hookpoint, module="x", io="output", d=d, dtype=dtype)
    return path


def random_file(path: Path, *, n_seqs: int = 12, ctx: int = 16, d: int = 16, vocab: int = 40, seed: int = 0,
                **kw) -> tuple[Path, np.ndarray, np.ndarray]:
    """Random activations; BOS at position 0 of every window, EOS (id 1) sprinkled in as another special."""
    rng = np.random.default_rng(seed)
    acts = rng.normal(size=(n_seqs, ctx, d)).astype(np.float32) + 0.5
    tokens = rng.integers(3, vocab, size=(n_seqs, ctx))
    tokens[:, 0] = BOS
    tokens[rng.random((n_seqs, ctx)) < 0.05] = 1
    return write_acts(path, acts, tokens, **kw), acts, tokens


def brute_force_top(f: torch.Tensor, valid: torch.Tensor, k: int, sep: int = 16) -> list[list[tuple[int, int, float]]]:
    """Per latent, the greedy top-k by brute force: (seq, position, value), best first, values > 0, no two in one
    sequence within `sep` positions (their context windows would overlap).

    f [n_seqs, ctx, d_sae] latents, valid [n_seqs, ctx]: positions allowed as a peak."""
    f = f.masked_fill(~valid[..., None], 0.0)
    out = []
    for j in range(f.shape[2]):
        col = f[:, :, j]
        cands = sorted(((float(col[s, p]), s, p) for s, p in zip(*torch.nonzero(col > 0, as_tuple=True))),
                       key=lambda c: -c[0])
        taken: list[tuple[int, int, float]] = []
        for v, s, p in cands:
            s, p = int(s), int(p)
            if len(taken) == k:
                break
            if all(t[0] != s or abs(t[1] - p) > sep for t in taken):
                taken.append((s, p, v))
        out.append(taken)
    return out


def perfect_relu_sae(d_in: int, hookpoint: str = ""):
    """A ReLU SAE that reconstructs every x exactly: latents [relu(x), relu(-x)], decoder [I; -I]."""
    from sae_toolkit.sae import SAEConfig, make_sae

    sae = make_sae(SAEConfig(arch="relu", d_in=d_in, d_sae=2 * d_in, hookpoint=hookpoint))
    eye = torch.eye(d_in)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def tiny_model_file(path: Path, *, spec: str = "tiny-llama", hookpoint: str = "mlp_out.1", n_seqs: int = 6,
                    ctx: int = 32, text: str | None = None) -> Path:
    """Activations of a builtin tiny model over packed byte-token windows (BOS first), written like the cacher."""
    from sae_toolkit.model.hookpoints import resolve, run_capture
    from sae_toolkit.model.loading import load_model

    model, tok = load_model(spec)
    text = text or ("The quick brown fox jumps over the lazy dog. def f(x): return x + 1\n" * 40)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    body = ctx - 1
    windows = [[tok.bos_token_id, *ids[i * body:(i + 1) * body]] for i in range(n_seqs)]
    input_ids = torch.tensor(windows)
    with torch.no_grad():
        acts = run_capture(model, [resolve(model, hookpoint)], input_ids)[hookpoint]
    write_acts(path, acts.numpy(), input_ids.numpy(), hookpoint=hookpoint, model=spec, tokenizer=spec)
    with h5py.File(path, "a") as f:
        f.attrs["bos_token_id"] = tok.bos_token_id
    return path
