"""Other toolkits' hookpoint names → ours (TransformerLens / SAELens, sparsify, Gemma Scope, dictionary_learning).

A name no rule knows is returned unchanged: it may already be a module path of the model, and `--hookpoint`
overrides it anyway. The embeddings (the input of block 0) are ``resid_post.0:input``: the block's input is the
residual stream before layer 0 whatever the architecture adds to it (GPT-2's position embeddings, Gemma's √d scale).
"""

from __future__ import annotations

import re

EMBEDDINGS = "resid_post.0:input"
"""Our name for the residual stream before block 0 (TransformerLens' blocks.0.hook_resid_pre)."""

# TransformerLens hook → (our alias, layer offset)
_TL_SITES = {
    "hook_resid_post": ("resid_post", 0),
    "hook_resid_pre": ("resid_post", -1),  # resid_pre.N is the output of block N−1
    "hook_mlp_out": ("mlp_out", 0),
    "hook_attn_out": ("attn_out", 0),
    "mlp.hook_post": ("mlp_hidden", 0),
    "hook_mlp_in": ("mlp_in", 0),
    "ln2.hook_normalized": ("mlp_in", 0),
}
_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")

# sparsify names hookpoints by module path under model.base_model (Llama `layers.N…`, GPT-2 `h.N…`, NeoX `layers.N…`)
_SPARSIFY = re.compile(r"^(?:layers|h)\.(\d+)(?:\.(mlp|self_attn|attn|attention|mlp\.act))?$")
_SPARSIFY_SITES = {None: "resid_post", "mlp": "mlp_out", "self_attn": "attn_out", "attn": "attn_out",
                   "attention": "attn_out", "mlp.act": "mlp_hidden"}

# Gemma Scope repositories: google/gemma-scope-{2b,9b,27b}-{pt,it}-{res,mlp,att,transcoders}[-canonical]
_GEMMA_REPO = re.compile(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)")
_GEMMA_SITES = {"res": "resid_post", "mlp": "mlp_out"}


def from_transformerlens(hook_name: str) -> str:
    """`blocks.9.hook_resid_post` → `resid_post.9`; `blocks.N.hook_resid_pre` → `resid_post.{N-1}` (N = 0 →
    `resid_post.0:input`); `hook_mlp_out` → `mlp_out.N`, `hook_attn_out` → `attn_out.N`, `mlp.hook_post` →
    `mlp_hidden.N`; `hook_embed` → `resid_post.0:input`. Other names are returned unchanged."""
    if hook_name in ("hook_embed", "blocks.0.hook_resid_pre"):
        return EMBEDDINGS
    m = _TL.match(hook_name)
    if not m or m[2] not in _TL_SITES:
        return hook_name
    alias, offset = _TL_SITES[m[2]]
    return f"{alias}.{int(m[1]) + offset}"


def from_sparsify(name: str) -> str:
    """`layers.9` → `resid_post.9`, `layers.9.mlp` → `mlp_out.9`, `layers.9.self_attn` → `attn_out.9`, GPT-2's
    `h.9`, `h.9.mlp`, `h.9.attn`, `h.9.mlp.act` likewise; `embed_tokens` → `resid_post.0:input`; others unchanged."""
    if name in ("embed_tokens", "embed_in", "wte"):
        return EMBEDDINGS
    m = _SPARSIFY.match(name)
    if not m:
        return name
    return f"{_SPARSIFY_SITES[m[2]]}.{m[1]}"


def gemma_scope_info(path: str) -> tuple[str, str]:
    """(hookpoint, model) from a Gemma Scope location such as
    `google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71` (also a Hugging Face cache path); "" where the
    path does not say. The site comes from the repository name (res → resid_post, mlp → mlp_out, att → the input of
    o_proj, Gemma's concatenated head outputs), the layer from `layer_N`."""
    repo = _GEMMA_REPO.search(path)
    model = f"google/gemma-2-{repo[1]}{'-it' if repo[2] == 'it' else ''}" if repo else ""
    if "embedding" in re.split(r"[/\\]", path):
        return EMBEDDINGS, model
    layer = re.search(r"(?:^|[/\\])layer_(\d+)(?:[/\\]|$)", path)
    if not repo or not layer:
        return "", model
    site = repo[3]
    if site == "att":
        return f"model.layers.{layer[1]}.self_attn.o_proj:input", model
    if site in _GEMMA_SITES:
        return f"{_GEMMA_SITES[site]}.{layer[1]}", model
    return "", model


def from_dictionary_learning(trainer_cfg: dict) -> str:
    """dictionary_learning's trainer config → our hookpoint: `submodule_name` such as `resid_post_layer_12`,
    `mlp_out_layer_3`, `attn_out_layer_3` when given, else `resid_post.{layer}` (what SAELens assumes too)."""
    sub = str(trainer_cfg.get("submodule_name") or "")
    m = re.fullmatch(r"(resid_post|mlp_out|attn_out)_layer_(\d+)", sub)
    if m:
        return f"{m[1]}.{m[2]}"
    if sub:
        return from_sparsify(sub)
    layer = trainer_cfg.get("layer")
    return f"resid_post.{int(layer)}" if isinstance(layer, int) and not isinstance(layer, bool) else ""
