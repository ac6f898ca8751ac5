"""hf:ORG/REPO[/SUBFOLDER] sources: read from a Hugging Face cache laid out as huggingface_hub lays it out, and
the offline fallback of the download; nothing is downloaded."""

from pathlib import Path

import pytest
import torch
from _formats_helpers import random_weights, write_gemma_scope, write_saelens, write_sparsify

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAE, load_sae
from sae_toolkit.sae.formats import hub

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An offline HF cache: <cache>/models--ORG--REPO/{refs/main, snapshots/<sha>/...} (huggingface_hub's layout)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def repo(repo_id: str):
        root = cache / f"models--{repo_id.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(SHA)
        return root / "snapshots" / SHA

    return repo


def test_hub_ids_read_the_local_cache_offline(hf_cache):
    snap = hf_cache("EleutherAI/sae-tiny-32x")
    w = random_weights(8, 32, seed=3)
    write_sparsify(snap / "layers.1", w, k=4)
    write_sparsify(snap / "layers.2", random_weights(8, 32, seed=4), k=4)
    sae = SAE.load(Path("hf:EleutherAI/sae-tiny-32x/layers.1"))  # analyze passes it on as a Path
    assert sae.cfg.hookpoint == "resid_post.1" and sae.cfg.extra["source"] == "hf:EleutherAI/sae-tiny-32x/layers.1"
    torch.testing.assert_close(sae.W_dec, w["W_dec"])
    with pytest.raises(SAEToolkitError, match="no folder 'layers.9'"):
        load_sae("hf:EleutherAI/sae-tiny-32x/layers.9")

    gs = hf_cache("google/gemma-scope-2b-pt-mlp")
    write_gemma_scope(gs / "layer_3" / "width_16k" / "average_l0_40", random_weights(8, 32))
    sae = load_sae("hf:google/gemma-scope-2b-pt-mlp/layer_3/width_16k/average_l0_40")
    assert (sae.cfg.arch, sae.cfg.hookpoint, sae.cfg.model) == ("jumprelu", "mlp_out.3", "google/gemma-2-2b")

    sl = hf_cache("someone/one-sae")  # an SAE at the repository root, no SUBFOLDER
    write_saelens(sl, "topk", random_weights(8, 32), k=3, hook_name="blocks.0.hook_resid_post")
    assert load_sae("hf:someone/one-sae").cfg.hookpoint == "resid_post.0"


def test_download_falls_back_to_the_cache(monkeypatch, tmp_path):
    import huggingface_hub

    snap = tmp_path / "snap"
    write_sparsify(snap / "layers.0.mlp", random_weights(8, 32), k=4)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, allow_patterns, local_files_only))
        if not local_files_only:
            raise ConnectionError("Network is unreachable")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert load_sae("hf:org/repo/layers.0.mlp").cfg.hookpoint == "mlp_out.0"
    # only the SUBFOLDER (and the run's config.json) is fetched, never the whole repository
    assert calls == [("org/repo", ["layers.0.mlp/*", "config.json"], False),
                     ("org/repo", ["layers.0.mlp/*", "config.json"], True)]
    calls.clear()
    write_sparsify(snap / "layers.1", random_weights(8, 32), k=4)
    with pytest.raises(SAEToolkitError, match=r"holds 2 SAEs: layers\.0\.mlp \(mlp_out\.0\), layers\.1"):
        load_sae("hf:org/repo")
    assert calls[0][1] == hub.ROOT_FILES

    def offline(repo_id, allow_patterns=None, local_files_only=False):
        raise OSError("offline") if not local_files_only else FileNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SAEToolkitError, match=r"cannot download hf:org/other \(offline\).*not in the local"):
        load_sae("hf:org/other")


@pytest.mark.parametrize("bad", ["hf:", "hf:onlyorg", "hf:org/repo/../x"])
def test_bad_hub_ids(bad):
    with pytest.raises(SAEToolkitError, match="cannot read hub id"):
        load_sae(bad)
