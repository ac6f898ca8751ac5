"""Hookpoint names → modules (module paths, `:input`, per-architecture aliases); capture and splice contexts.

A hookpoint is a module path as ``model.named_modules()`` prints it (``model.layers.6.mlp``), optionally with
``:input`` to take the module's first input instead of its output, or an alias resolved per architecture:

=============== ============================================== ====================== =====================
alias           Llama / Qwen2 / Mistral / Gemma                GPT-2                  GPT-NeoX
=============== ============================================== ====================== =====================
``mlp_out.N``   ``model.layers.N.mlp``                         ``transformer.h.N.mlp`` ``gpt_neox.layers.N.mlp``
``mlp_in.N``    ``model.layers.N.mlp:input``                   ``….mlp:input``         ``….mlp:input``
``mlp_hidden.N`` ``model.layers.N.mlp.down_proj:input``        ``….mlp.c_proj:input``  ``….mlp.dense_4h_to_h:input``
``resid_post.N`` ``model.layers.N`` (block output)             ``transformer.h.N``     ``gpt_neox.layers.N``
``attn_out.N``  ``model.layers.N.self_attn``                   ``transformer.h.N.attn`` ``….attention``
=============== ============================================== ====================== =====================

BERT-style encoders: ``mlp_out.N`` = ``bert.encoder.layer.N.output.dense`` (before the residual add and
LayerNorm), ``mlp_in.N`` = ``….intermediate:input`` (the attention block's LayerNorm output the MLP reads),
``mlp_hidden.N`` = the input of ``output.dense``, ``attn_out.N`` = ``….attention.output.dense``, ``resid_post.N`` = the
layer output. Models of unknown type get the first layout whose module names they have.

``mlp_in.N`` is the normalized residual the MLP reads (after ``post_attention_layernorm`` / ``ln_2`` /
``pre_feedforward_layernorm``); with GPT-NeoX's parallel residual it is the same module input, the norm of the
block input rather than of the attention output. A transcoder reads ``mlp_in.N`` and predicts ``mlp_out.N``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal, NamedTuple

from torch import Tensor, nn

from sae_toolkit.errors import SAEToolkitError

ALIASES = ("mlp_out", "mlp_in", "mlp_hidden", "resid_post", "attn_out")
_ALIAS_RE = re.compile(rf"^({'|'.join(ALIASES)})\.(-?\d+)$")


class Hookpoint(NamedTuple):
    """One place in a model whose activations are read or replaced."""

    name: str
    """The name as the user gave it (`mlp_out.6`, `model.layers.6.mlp:input`); key of captured activations."""
    module_name: str
    """The resolved path in `model.named_modules()`."""
    module: nn.Module
    """The hooked module."""
    io: Literal["output", "input"]
    """Whether the module's output (tuple element 0 for tuples) or its first input is taken."""


class _Layout(NamedTuple):
    """Where the aliases live in one architecture family (paths relative to a transformer block)."""

    layers: str
    """Name (or dotted suffix) of the ModuleList holding the blocks."""
    mlp: str
    """Module whose output is `mlp_out`."""
    mlp_down: str
    """Module whose input is `mlp_hidden` (the MLP's hidden neurons after the nonlinearity)."""
    attn: str
    """Module whose output is `attn_out`."""
    mlp_in: str
    """Module whose input is `mlp_in` (the normalized residual the MLP reads)."""


_LLAMA = _Layout("layers", "mlp", "mlp.down_proj", "self_attn", "mlp")
_GPT2 = _Layout("h", "mlp", "mlp.c_proj", "attn", "mlp")
_NEOX = _Layout("layers", "mlp", "mlp.dense_4h_to_h", "attention", "mlp")
_BERT = _Layout("encoder.layer", "output.dense", "output.dense", "attention.output.dense", "intermediate")
_LAYOUTS: dict[str, _Layout] = {
    **dict.fromkeys(
        [
            "llama",
            "qwen2",
            "qwen3",
            "mistral",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "phi3",
            "granite",
            "smollm3",
            "cohere",
            "stablelm",
        ],
        _LLAMA,
    ),
    "gpt2": _GPT2,
    "gpt_neox": _NEOX,
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra", "camembert"], _BERT),
}


def resolve(model: nn.Module, name: str) -> Hookpoint:
    """Resolve a hookpoint name against ``model``; an unknown name raises SAEToolkitError listing close matches.

    >>> from sae_toolkit.model.loading import load_model
    >>> model, _ = load_model("tiny-llama")
    >>> resolve(model, "mlp_hidden.1")[1:2], resolve(model, "mlp_hidden.1").io
    (('model.layers.1.mlp.down_proj',), 'input')
    """
    base, io = name, "output"
    if name.endswith(":input"):
        base, io = name.removesuffix(":input"), "input"
    elif name.endswith(":output"):
        base = name.removesuffix(":output")
    modules = dict(model.named_modules())
    alias = _ALIAS_RE.match(base)
    if alias:
        module_name, alias_io = _resolve_alias(model, modules, name, alias.group(1), int(alias.group(2)))
        if alias_io == "input" and name.endswith(":input"):
            raise SAEToolkitError(f"hookpoint {name!r}: {alias.group(1)} is already a module input; drop ':input'")
        io = "input" if alias_io == "input" else io
    elif base in modules and base != "":
        module_name = base
    else:
        raise SAEToolkitError(f"unknown hookpoint {name!r}{_suggest(model, modules, base, name)}")
    return Hookpoint(name, module_name, modules[module_name], io)


def resolve_all(model: nn.Module, names: list[str]) -> list[Hookpoint]:
    """Resolve several names, failing on the first bad one before any work; duplicates are refused."""
    if not names:
        raise SAEToolkitError("no hookpoint given; pass at least one --hookpoint (e.g. mlp_out.3)")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise SAEToolkitError(f"hookpoint {dupes[0]!r} is given twice; list each hookpoint once")
    return [resolve(model, n) for n in names]


def _layout(model: nn.Module, modules: dict[str, nn.Module]) -> tuple[_Layout, str, int] | None:
    """(layout, path of the block list, number of blocks) for ``model``, or None when no layout fits."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    candidates = [_LAYOUTS[model_type]] if model_type in _LAYOUTS else list(dict.fromkeys(_LAYOUTS.values()))
    for layout in candidates:
        for path, module in modules.items():
            if not isinstance(module, nn.ModuleList) or len(module) == 0:
                continue
            if path != layout.layers and not path.endswith("." + layout.layers):
                continue
            block = f"{path}.0"
            if all(f"{block}.{rel}" in modules for rel in (layout.mlp, layout.mlp_down, layout.attn, layout.mlp_in)):
                return layout, path, len(module)
    return None


def _resolve_alias(
    model: nn.Module, modules: dict[str, nn.Module], name: str, kind: str, layer: int
) -> tuple[str, Literal["output", "input"]]:
    found = _layout(model, modules)
    if found is None:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise SAEToolkitError(
            f"hookpoint {name!r}: aliases are not known for model type {model_type!r}; "
            "give a module path from model.named_modules() instead"
        )
    layout, blocks, n_layers = found
    if not 0 <= layer < n_layers:
        raise SAEToolkitError(
            f"hookpoint {name!r}: layer {layer} is out of range, the model has {n_layers} layers "
            f"(use {kind}.0 … {kind}.{n_layers - 1})"
        )
    block = f"{blocks}.{layer}"
    if kind == "mlp_out":
        return f"{block}.{layout.mlp}", "output"
    if kind == "mlp_in":
        return f"{block}.{layout.mlp_in}", "input"
    if kind == "mlp_hidden":
        return f"{block}.{layout.mlp_down}", "input"
    if kind == "resid_post":
        return block, "output"
    return f"{block}.{layout.attn}", "output"


def _suggest(model: nn.Module, modules: dict[str, nn.Module], base: str, name: str) -> str:
    choices = [m for m in modules if m]
    found = _layout(model, modules)
    if found is not None:
        choices += [f"{kind}.{i}" for kind in ALIASES for i in range(found[2])]
    suffix = name[len(base) :]
    close = difflib.get_close_matches(base, choices, n=5, cutoff=0.6)
    if not close:
        return "; aliases are mlp_out.N, mlp_in.N, mlp_hidden.N, resid_post.N, attn_out.N, or give a module path"
    return "; did you mean " + ", ".join(repr(c + suffix) for c in close) + "?"


class _StopForward(BaseException):
    """Raised by the last capture hook to abandon the rest of the forward pass.

    A BaseException so that no `except Exception` inside model code swallows it.
    """


def _output_tensor(out: object, name: str) -> Tensor:
    """The activation in a module output: the tensor itself, or element 0 of a tuple / ModelOutput."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    first = out.to_tuple()[0] if hasattr(out, "to_tuple") else None
    if isinstance(first, Tensor):
        return first
    raise SAEToolkitError(f"hookpoint {name!r}: the module returned {type(out).__name__}, not a tensor")


def _input_tensor(args: tuple, kwargs: dict, name: str) -> tuple[Tensor, str | int]:
    """The module's first input and where it sits (position 0 or a keyword)."""
    if args and isinstance(args[0], Tensor):
        return args[0], 0
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key], key
    raise SAEToolkitError(f"hookpoint {name!r}: the module was called without a tensor input to capture")


@contextmanager
def capture(model: nn.Module, hookpoints: list[Hookpoint], *, stop_early: bool = True) -> Iterator[dict[str, Tensor]]:
    """Register hooks that store each hookpoint's activation [batch, seq, d] under its name; always removed.

    With ``stop_early`` the forward pass is abandoned once every hookpoint has fired; the exception doing that
    is swallowed when the ``with`` block ends, so make the forward call the block's last statement
    (:func:`run_capture` does exactly this).
    """
    acts: dict[str, Tensor] = {}
    names = {hp.name for hp in hookpoints}
    pending: set[str] = set(names)

    def record(name: str, x: Tensor) -> None:
        acts[name] = x.detach()
        pending.discard(name)
        if stop_early and not pending:
            pending.update(names)  # ready for the next forward even when the root pre-hook does not run
            raise _StopForward

    def reset(*_: object) -> None:  # each forward starts with every hookpoint pending
        pending.update(names)

    handles = [model.register_forward_pre_hook(reset)]
    try:
        for hp in hookpoints:
            if hp.io == "output":
                hook = lambda mod, args, out, name=hp.name: record(name, _output_tensor(out, name))
                handles.append(hp.module.register_forward_hook(hook))
            else:
                hook = lambda mod, args, kwargs, name=hp.name: record(name, _input_tensor(args, kwargs, name)[0])
                handles.append(hp.module.register_forward_pre_hook(hook, with_kwargs=True))
        yield acts
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()


def forward_kwargs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> dict:
    """Keyword arguments for a plain forward: no KV cache (we never generate) where the model has one."""
    kwargs: dict = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return kwargs


def run_capture(
    model: nn.Module,
    hookpoints: list[Hookpoint],
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    stop_early: bool = True,
) -> dict[str, Tensor]:
    """One forward pass over ``input_ids`` [batch, seq]; returns name → activation [batch, seq, d].

    With ``stop_early`` nothing after the deepest hooked module runs (the later blocks and the LM head):
    on SmolLM2-135M with ``mlp_out.6`` of 30 layers that is several times faster (numbers in the README).
    """
    with capture(model, hookpoints, stop_early=stop_early) as acts:
        model(**forward_kwargs(model, input_ids, attention_mask))
    missing = [hp.name for hp in hookpoints if hp.name not in acts]
    if missing:
        raise SAEToolkitError(f"hookpoint {missing[0]!r} did not run during the forward pass; pick another module")
    return acts


@contextmanager
def splice(model: nn.Module, hookpoint: Hookpoint, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """During forwards inside the block, the activation [batch, seq, d] at ``hookpoint`` is replaced by ``fn(act)``.

    Used for SAE splicing (``fn = lambda x: sae(x).x_hat``) and zero ablation (``torch.zeros_like``).
    """

    def replace_output(mod: nn.Module, args: tuple, out: object) -> object:
        if isinstance(out, Tensor):
            return fn(out)
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            return (fn(out[0]), *out[1:])
        raise SAEToolkitError(f"cannot splice {hookpoint.name!r}: the module returned {type(out).__name__}")

    def replace_input(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x, where = _input_tensor(args, kwargs, hookpoint.name)
        if where == 0:
            return (fn(x), *args[1:]), kwargs
        return args, {**kwargs, where: fn(x)}

    if hookpoint.io == "output":
        handle = hookpoint.module.register_forward_hook(replace_output)
    else:
        handle = hookpoint.module.register_forward_pre_hook(replace_input, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


__all__ = ["ALIASES", "Hookpoint", "capture", "forward_kwargs", "resolve", "resolve_all", "run_capture", "splice"]
