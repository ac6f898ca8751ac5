"""The cacher end to end: stored rows equal a plain hook capture, resume after SIGKILL, errors, CLI, info."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from _cache_helpers import decode_rows, direct_capture, one_thread, reference_windows  # noqa: F401 (fixture)

from sae_toolkit import cli
from sae_toolkit.activations.cacher import CacheConfig, cache_activations
from sae_toolkit.activations.info import describe
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.model.corpus import open_corpus
from sae_toolkit.model.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = {"float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-2}


def small_config(out, **kw) -> CacheConfig:
    base = dict(
        model="tiny-llama",
        hookpoints=["mlp_out.1"],
        dataset="builtin:pydoc",
        tokens=12 * 32,
        context_size=32,
        batch_size=5,
        device="cpu",
        out=str(out),
    )
    return CacheConfig(**{**base, **kw})


def read_all(path):
    with h5py.File(path, "r") as f:
        return {"attrs": dict(f.attrs), "tokens": f["tokens"][:], **{f"acts/{k}": v[:] for k, v in f["acts"].items()}}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("spec, block", [("tiny-llama", "model.layers"), ("tiny-gpt2", "transformer.h")])
def test_rows_equal_a_plain_hook_for_every_window(tmp_path, spec, block, dtype):
    hookpoints = ["mlp_out.1", "mlp_hidden.2", f"{block}.3:input"]
    cfg = small_config(tmp_path / "a.h5", model=spec, hookpoints=hookpoints, dtype=dtype)
    path = cache_activations(cfg)

    model, tokenizer = load_model(spec)
    windows = reference_windows(list(open_corpus("builtin:pydoc"))[:3], tokenizer, 32)[:12]
    with h5py.File(path, "r") as f:
        assert f.attrs["n_seqs"] == 12 and f.attrs["n_seqs_target"] == 12
        assert np.array_equal(f["tokens"][:], windows)  # stored tokens = what the tokenizer produced
        for name, (module, io) in zip(
            hookpoints,
            [
                (f"{block}.1.mlp", "output"),
                (f"{block}.2.mlp.{'down_proj' if 'llama' in spec else 'c_proj'}", "input"),
                (f"{block}.3", "input"),
            ],
        ):
            dset = f["acts"][name]
            assert dict(dset.attrs) == {
                "hookpoint": name,
                "module": module,
                "io": io,
                "d": dset.shape[1],
                "dtype": dtype,
            }
            assert dset.dtype == (np.uint16 if dtype == "bfloat16" else np.dtype(dtype))
            ref = direct_capture(model, module, io, torch.from_numpy(windows).long())  # [12, 32, d]
            got = decode_rows(dset[:], dtype).reshape(ref.shape)
            tol = TOLERANCE[dtype]
            np.testing.assert_allclose(got, ref.numpy(), rtol=tol, atol=tol * float(ref.abs().max()))


def test_cli_cache_then_info_and_plain_h5py(tmp_path, capsys):
    out = tmp_path / "a.h5"
    argv = [
        "cache",
        "--model",
        "tiny-gptneox",
        "--hookpoint",
        "mlp_out.2",
        "--hookpoint",
        "attn_out.0",
        "--dataset",
        "builtin:pydoc",
        "--tokens",
        "1k",
        "--context-size",
        "64",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert f"wrote activations to {out}" in capsys.readouterr().out
    assert cli.main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    for part in (
        "tiny-gptneox",
        "builtin:pydoc",
        "64 tokens per sequence",
        "16 sequences = 1,024 tokens",
        "complete",
        "mlp_out.2",
        "gpt_neox.layers.2.mlp (output), d=64, float16",
        "gpt_neox.layers.0.attention (output)",
    ):
        assert part in text, part
    with h5py.File(out, "r") as f:  # DESIGN §3: plain h5py is enough
        assert f.attrs["format"] == "sae_toolkit.activations" and f.attrs["format_version"] == 1
        assert f["acts/mlp_out.2"][:1000].shape == (1000, 64) and f["tokens"][0][0] == f.attrs["bos_token_id"]
        config = json.loads(f.attrs["config"])
        assert config["hookpoints"] == ["mlp_out.2", "attn_out.0"] and config["tokens"] == 1000
        for key in ("model", "dataset", "context_size", "n_seqs", "tokenizer", "created", "toolkit_version"):
            assert key in f.attrs
    # An existing output is never overwritten silently.
    assert cli.main(argv) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err


def test_info_rejects_other_files(tmp_path):
    (tmp_path / "x.h5").write_bytes(b"garbage")
    with pytest.raises(SAEToolkitError, match="not a readable HDF5 file"):
        describe(str(tmp_path / "x.h5"))
    with h5py.File(tmp_path / "y.h5", "w") as f:
        f["z"] = 1
    with pytest.raises(SAEToolkitError, match="not a sae-toolkit activation file"):
        describe(str(tmp_path / "y.h5"))
    with pytest.raises(SAEToolkitError, match="does not exist"):
        describe(str(tmp_path / "none.h5"))


def _peek_n_seqs(path: Path) -> int:
    """n_seqs of a file another process is writing (no HDF5 lock; a torn read counts as 0)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return int(f.attrs.get("n_seqs", 0))
    except (OSError, KeyError, RuntimeError):
        return 0


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    args = [
        "--model",
        "tiny-llama",
        "--hookpoint",
        "mlp_out.1",
        "--hookpoint",
        "mlp_hidden.2",
        "--dataset",
        "builtin:pydoc",
        "--tokens",
        "8k",
        "--context-size",
        "32",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    killed, full = tmp_path / "killed.h5", tmp_path / "full.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sae_toolkit", "cache", *args, "--out", str(killed)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if killed.exists() and _peek_n_seqs(killed) > 0:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the cacher was not killed mid-run: {err.decode()[-500:]}"
    with h5py.File(killed, "r") as f:  # the killed file is readable and consistent
        n_killed = int(f.attrs["n_seqs"])
    assert 0 < n_killed < 250, n_killed
    assert "INCOMPLETE" in describe(str(killed))
    # Junk rows past n_seqs (what a writer killed mid-batch leaves) must be overwritten by the resume, and datasets
    # left at different lengths (killed between the writer's resizes: tokens grown past the next batch, the
    # activations by 2 sequences) grown as each needs.
    with h5py.File(killed, "r+") as f:
        for dset, seqs in ((f["tokens"], 8), (f["acts/mlp_out.1"], 2)):
            rows = (n_killed + seqs) * (32 if dset.name.startswith("/acts") else 1)
            dset.resize(max(rows, dset.shape[0]), axis=0)
        f["tokens"][n_killed : n_killed + 2] = 7
        f["acts/mlp_out.1"][n_killed * 32 : (n_killed + 2) * 32] = 1234.0

    assert cli.main(["cache", *args, "--out", str(killed), "--resume"]) == 0
    assert cli.main(["cache", *args, "--out", str(full)]) == 0
    a, b = read_all(killed), read_all(full)
    assert a["attrs"]["n_seqs"] == b["attrs"]["n_seqs"] == 250
    for key in ("tokens", "acts/mlp_out.1", "acts/mlp_hidden.2"):
        assert a[key].shape == b[key].shape and np.array_equal(a[key], b[key]), key


def test_resume_extends_to_more_tokens_like_a_fresh_run(tmp_path, capsys):
    cache_activations(small_config(tmp_path / "r.h5", tokens=7 * 32))
    cache_activations(small_config(tmp_path / "r.h5", tokens=12 * 32, resume=True))
    cache_activations(small_config(tmp_path / "f.h5"))
    a, b = read_all(tmp_path / "r.h5"), read_all(tmp_path / "f.h5")
    assert np.array_equal(a["tokens"], b["tokens"]) and np.array_equal(a["acts/mlp_out.1"], b["acts/mlp_out.1"])
    # Resuming a complete file does nothing.
    before = (tmp_path / "r.h5").stat().st_mtime_ns
    cache_activations(small_config(tmp_path / "r.h5", resume=True))
    assert "nothing to do" in capsys.readouterr().out
    assert (tmp_path / "r.h5").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hookpoints": ["mlp_out.2"]}, "hookpoints=\\['mlp_out.1'\\], not \\['mlp_out.2'\\]"),
        ({"model": "tiny-gpt2"}, "model='tiny-llama', not 'tiny-gpt2'"),
        ({"context_size": 16}, "context_size=32, not 16"),
        ({"dtype": "float32"}, "dtype='float16', not 'float32'"),
    ],
)
def test_resume_with_other_settings_is_refused(tmp_path, change, message):
    cache_activations(small_config(tmp_path / "a.h5", tokens=64))
    with pytest.raises(SAEToolkitError, match=f"cannot resume .*{message}"):
        cache_activations(small_config(tmp_path / "a.h5", tokens=64, resume=True, **change))


def test_resume_with_a_changed_corpus_is_refused(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("alpha " * 200)
    cache_activations(small_config(tmp_path / "a.h5", dataset=str(corpus), tokens=64))
    corpus.write_text("omega " * 200)
    with pytest.raises(SAEToolkitError, match="no longer gives the stored tokens"):
        cache_activations(small_config(tmp_path / "a.h5", dataset=str(corpus), tokens=128, resume=True))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hookpoints": ["mlp_outt.1"]}, "did you mean 'mlp_out.1'"),
        ({"dataset": "nope.jsonl"}, "does not exist"),
        ({"dataset": "DATA", "text_column": "body"}, "text column 'body' is not in .*columns are: text"),
        ({"context_size": 4096}, "exceeds the model's 2048 positions"),
    ],
)
def test_bad_inputs_fail_before_any_work(tmp_path, change, message):
    if change.get("dataset") == "DATA":
        (tmp_path / "d.jsonl").write_text('{"text": "hello"}\n')
        change = {**change, "dataset": str(tmp_path / "d.jsonl")}
    with pytest.raises(SAEToolkitError, match=message):
        cache_activations(small_config(tmp_path / "a.h5", **change))
    assert not (tmp_path / "a.h5").exists()


def test_config_validation():
    with pytest.raises(SAEToolkitError, match="dtype='float8'"):
        small_config("x.h5", dtype="float8")
    with pytest.raises(SAEToolkitError, match="batch_size=0"):
        small_config("x.h5", batch_size=0)
    assert small_config("x.h5", tokens="2k").tokens == 2000


def test_fp16_overflow_stops_with_advice_and_bfloat16_works(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e9)  # MLP outputs far beyond float16's 65504
    model.save_pretrained(tmp_path / "loud")
    tokenizer.save_pretrained(tmp_path / "loud")
    with pytest.raises(SAEToolkitError, match="beyond float16's ±65504.*--dtype bfloat16 or float32"):
        cache_activations(small_config(tmp_path / "a.h5", model=str(tmp_path / "loud")))
    assert not (tmp_path / "a.h5").exists()  # nothing garbage committed; the empty file it made is removed
    path = cache_activations(small_config(tmp_path / "b.h5", model=str(tmp_path / "loud"), dtype="bfloat16"))
    with h5py.File(path, "r") as f:
        rows = decode_rows(f["acts/mlp_out.1"][:], "bfloat16")
    assert np.isfinite(rows).all() and np.abs(rows).max() > 65504


def test_corpus_running_out_keeps_what_there_is(tmp_path, capsys):
    corpus = tmp_path / "small.txt"
    corpus.write_text("A short paragraph.\n\nAnother one, a little longer than the first.\n\n" * 10)
    path = cache_activations(small_config(tmp_path / "a.h5", dataset=str(corpus), tokens="10k"))
    assert "the corpus ran out after" in capsys.readouterr().err
    n_windows = len(reference_windows(list(open_corpus(str(corpus))), load_model("tiny-llama")[1], 32))
    with h5py.File(path, "r") as f:
        assert f.attrs["n_seqs"] == n_windows and f["tokens"].shape[0] == n_windows
        assert f["acts/mlp_out.1"].shape[0] == n_windows * 32
    assert "complete (the corpus ran out" in describe(str(path))


@pytest.mark.realmodel
def test_smollm2_on_pydoc(tmp_path):
    path = cache_activations(
        CacheConfig(
            model="smollm2-135m",
            hookpoints=["mlp_out.3"],
            dataset="builtin:pydoc",
            tokens=64,
            context_size=32,
            device="cpu",
            out=str(tmp_path / "s.h5"),
        )
    )
    with h5py.File(path, "r") as f:
        acts = f["acts/mlp_out.3"][:].astype(np.float32)
        assert f.attrs["n_seqs"] == 2 and f.attrs["bos_token_id"] == 1 and f["tokens"][1][0] == 1
    assert acts.shape == (64, 576)
    assert np.isfinite(acts).all() and acts.std(axis=0).max() > 1e-3 and acts.std(axis=1).min() > 1e-4


def test_forward_size_defaults_to_32k_tokens_on_a_gpu():
    cfg = small_config("x.h5", batch_size=None)
    assert cfg.windows_per_forward("cpu") == 32
    assert cfg.windows_per_forward("cuda") * cfg.context_size == 32768  # context 32
    assert small_config("x.h5", batch_size=None, context_size=100).windows_per_forward("cuda:1") == 328
    assert small_config("x.h5", batch_size=7).windows_per_forward("cuda") == 7


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_host_copy_keeps_storage_bits(dtype):
    from sae_toolkit.activations.cacher import _to_host

    x = torch.randn(50, 6) * 100
    got = _to_host(x, dtype)
    assert got.dtype == getattr(torch, dtype) and got.device.type == "cpu"
    assert torch.equal(got, x.to(getattr(torch, dtype)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_cache_with_pinned_async_copies_matches_cpu(tmp_path, dtype):
    from sae_toolkit.activations.cacher import _to_host

    x = torch.randn(4096, 64, device="cuda") * 10
    bufs = [_to_host(x * i, dtype) for i in range(4)]  # queued, then one sync
    torch.cuda.synchronize()
    for i, b in enumerate(bufs):
        assert b.is_pinned() and torch.equal(b, (x * i).to(getattr(torch, dtype)).cpu())
    got = {}
    for device in ("cpu", "cuda"):
        got[device] = read_all(cache_activations(small_config(tmp_path / f"{device}.h5", dtype=dtype,
                                                              device=device, batch_size=None)))
    assert np.array_equal(got["cpu"]["tokens"], got["cuda"]["tokens"])
    for name in got["cpu"]:
        if name.startswith("acts/"):
            a, b = (decode_rows(got[d][name], dtype).astype(np.float64) for d in ("cpu", "cuda"))
            # the GPU runs the model in bf16 (the CPU in fp32): close, not equal
            assert a.shape == b.shape and np.linalg.norm(a - b) < 0.05 * np.linalg.norm(a), name
