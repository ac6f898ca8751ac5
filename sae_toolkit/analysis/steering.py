"""Steering and ablation: edit SAE latents inside a running model, keeping the SAE's reconstruction error.

At the SAE's hookpoint the activation x [batch, seq, d_in] becomes

    x′ = x + W_decᵀ(f′ − f),   f = encode(x),   f′ = f with the chosen latents set (or scaled),

so only the chosen latents' contribution changes and everything the SAE does not explain (x − x̂) stays. Where
f′ = f (nothing chosen, a latent set to the value it already has, a position outside ``positions``) the
activation is passed through untouched, so the model's outputs are bit-identical to the unhooked model's.

    >>> with steer(model, sae, {2741: 8.0}):                     # doctest: +SKIP
    ...     out = model.generate(**inputs, max_new_tokens=20)
    >>> with steer(model, sae, {}, scale={2741: 0.5}, positions=[3, 4]):  # doctest: +SKIP
    ...     logits = model(input_ids).logits
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.model.hookpoints import Hookpoint, forward_kwargs, resolve, splice

__all__ = ["Continuations", "generate", "steer", "steering_delta"]


def steering_delta(sae, x: Tensor, set_to: Mapping[int, float], scale: Mapping[int, float]) -> tuple[Tensor, Tensor]:
    """(delta [..., d_in], changed [...] bool): W_decᵀ(f′ − f) for activations x [..., d_in], and where f′ ≠ f.

    f′ equals f except latent i, which is set to ``set_to[i]`` or multiplied by ``scale[i]``.
    """
    f = sae.encode(x)  # [..., d_sae]
    idx = torch.tensor([*set_to, *scale], dtype=torch.long, device=f.device)
    old = f[..., idx]  # [..., n]
    new = torch.cat([torch.tensor(list(set_to.values()), dtype=f.dtype, device=f.device).expand(*f.shape[:-1], -1),
                     old[..., len(set_to):] * torch.tensor(list(scale.values()), dtype=f.dtype, device=f.device)],
                    dim=-1)
    diff = new - old  # [..., n]
    delta = diff @ sae.W_dec[idx]  # [..., n] x [n, d_in] -> [..., d_in]
    return delta, (diff != 0).any(-1)


def _check_latents(sae, name: str, values: Mapping[int, float]) -> dict[int, float]:
    out = {}
    for i, v in values.items():
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < sae.cfg.d_sae:
            raise SAEToolkitError(f"{name}: feature {i!r} is not a latent of this SAE; use 0 … {sae.cfg.d_sae - 1}")
        i = int(i)  # numpy / torch integers too
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise SAEToolkitError(f"{name}: feature {i} has value {v!r}; give a number") from None
        if not math.isfinite(v):
            raise SAEToolkitError(f"{name}: feature {i} has value {v!r}; give a finite number")
        out[i] = v
    return out


@contextmanager
def steer(model: nn.Module, sae, features: Mapping[int, float] | None = None, positions: Iterable[int] | None = None,
          *, scale: Mapping[int, float] | None = None, hookpoint: str | None = None) -> Iterator[Hookpoint]:
    """While the block runs, every forward of ``model`` has the SAE's latents edited at its hookpoint.

    features: latent → value it is set to (0 ablates). scale: latent → factor its activation is multiplied by
    (0 also ablates, 2 doubles). positions: token positions to edit, as the model numbers them (0 = first token;
    the model's position_ids when the forward gets them), default every position, prompt and generated tokens
    alike; during cached generation the new tokens' positions count on from the prompt's.
    hookpoint: where to hook (default ``sae.cfg.hookpoint``). Yields the resolved Hookpoint.
    """
    set_to = _check_latents(sae, "steer", features or {})
    scale = _check_latents(sae, "steer scale", scale or {})
    both = sorted(set(set_to) & set(scale))
    if both:
        raise SAEToolkitError(f"steer: feature {both[0]} is both set and scaled; give it in one of the two only")
    name = hookpoint or sae.cfg.hookpoint
    if not name:
        raise SAEToolkitError("steer: the SAE's cfg.json names no hookpoint; pass hookpoint= (e.g. 'mlp_out.9')")
    hp = resolve(model, name)
    wanted = None
    if positions is not None:
        wanted = sorted({int(p) for p in positions})
        if wanted and wanted[0] < 0:
            raise SAEToolkitError(f"steer: position {wanted[0]} is negative; give absolute token positions (0 = first)")
    state: dict[str, Tensor | None] = {"pos": None}

    def note_positions(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        # The positions of this forward's tokens: cached generation passes position_ids (or cache_position) for
        # the new tokens only; a plain forward passes neither and its tokens are 0 … seq-1.
        pos = kwargs.get("position_ids")
        state["pos"] = pos if pos is not None else kwargs.get("cache_position")

    def edit(x: Tensor) -> Tensor:
        if not set_to and not scale:
            return x
        delta, changed = steering_delta(sae, x, set_to, scale)  # [batch, seq, d_in], [batch, seq]
        if wanted is not None:
            seq = x.shape[-2]
            pos = state["pos"]
            if pos is None or pos.shape[-1] != seq:
                pos = torch.arange(seq, device=x.device)
            pos = pos.to(x.device).expand(changed.shape)  # [batch, seq]
            changed = changed & torch.isin(pos, torch.tensor(wanted, device=x.device))
        # Unchanged positions keep x itself (not x + 0), so an edit that changes nothing is bit-exact.
        return torch.where(changed[..., None], (x.to(delta.dtype) + delta).to(x.dtype), x)

    handle = model.register_forward_pre_hook(note_positions, with_kwargs=True)
    try:
        with splice(model, hp, edit):
            yield hp
    finally:
        handle.remove()


class Continuations(NamedTuple):
    """What `generate` returns: the continuation text of the plain and of the steered model."""

    baseline: str
    """Continuation of the unhooked model."""
    steered: str
    """Continuation with the latents edited."""


@torch.no_grad()
def generate(model: nn.Module, tokenizer, sae, prompt: str, features: Mapping[int, float] | None = None, *,
             scale: Mapping[int, float] | None = None, positions: Iterable[int] | None = None,
             max_new_tokens: int = 30, temperature: float = 0.0, seed: int = 0) -> Continuations:
    """Baseline and steered continuations of ``prompt``: greedy by default; with temperature > 0 sampled, each from
    the same seed, so both are reproducible."""
    if max_new_tokens < 1:
        raise SAEToolkitError(f"max_new_tokens={max_new_tokens}; generate at least 1 token")
    if not temperature >= 0:
        raise SAEToolkitError(f"temperature={temperature}; give 0 (greedy) or a positive number")
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    if ids.shape[1] == 0:
        raise SAEToolkitError("the prompt is empty; give some text with --prompt")
    kw = forward_kwargs(model, ids)
    kw.pop("use_cache", None)  # generation wants its KV cache
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen = {"max_new_tokens": max_new_tokens, "pad_token_id": pad, "attention_mask": torch.ones_like(ids)}
    gen.update({"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else
               {"do_sample": False, "temperature": None, "top_p": None, "top_k": None})

    def run() -> str:
        torch.manual_seed(seed)
        out = model.generate(**kw, **gen)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    baseline = run()
    with steer(model, sae, features, positions, scale=scale):
        steered = run()
    return Continuations(baseline, steered)


def side_by_side(left: str, right: str, *, width: int = 44, titles: tuple[str, str] = ("baseline", "steered")) -> str:
    """Two texts in two wrapped columns (newlines shown as ↵) under their titles."""
    import textwrap

    def lines(text: str) -> list[str]:
        return textwrap.wrap(text.replace("\n", "↵ "), width, drop_whitespace=False, replace_whitespace=False) or [""]

    a, b = lines(left), lines(right)
    rows = [f"{titles[0]:<{width}} | {titles[1]}", f"{'-' * width}-+-{'-' * width}"]
    rows += [f"{x:<{width}} | {y}" for x, y in zip(a + [""] * (len(b) - len(a)), b + [""] * (len(a) - len(b)))]
    return "\n".join(r.rstrip() for r in rows)
