"""Transcoders end to end on tiny-llama: mlp_in/mlp_out cached in one pass (rows = a plain hook), reconstruction
metrics on the target, CE/KL with the MLP's output replaced by the prediction from its input (an oracle that *is*
the MLP recovers exactly 100 %), the report header, and `analyze` + `export` from the CLI."""

import copy
import json

import h5py
import numpy as np
import pytest
import torch
from _cache_helpers import direct_capture, one_thread  # noqa: F401 (fixture)
from torch import nn

from sae_toolkit.activations.cacher import CacheConfig, cache_activations
from sae_toolkit.activations.reader import ActsReader
from sae_toolkit.analysis.evaluation import evaluate, model_metrics
from sae_toolkit.cli import main
from sae_toolkit.model.loading import load_model
from sae_toolkit.sae import SAE, SAEConfig, SAEOutput, make_sae

pytestmark = pytest.mark.usefixtures("one_thread")
CTX = 32


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    path = tmp_path_factory.mktemp("tc") / "acts.h5"
    cache_activations(CacheConfig(model="tiny-llama", hookpoints=["mlp_in.1", "mlp_out.1"], dataset="builtin:pydoc",
                                  tokens=8 * CTX, context_size=CTX, batch_size=4, dtype="float32", device="cpu",
                                  out=str(path)))
    return path


@pytest.fixture(scope="module")
def tiny_llama():
    return load_model("tiny-llama")[0]


def test_mlp_in_and_mlp_out_cached_in_one_pass_equal_a_plain_hook(acts, tiny_llama):
    with h5py.File(acts, "r") as f:
        ids = torch.from_numpy(f["tokens"][:].astype(np.int64))
        assert dict(f["acts/mlp_in.1"].attrs)["io"] == "input"
        assert f["acts/mlp_in.1"].attrs["module"] == f["acts/mlp_out.1"].attrs["module"] == "model.layers.1.mlp"
        for name, io in (("mlp_in.1", "input"), ("mlp_out.1", "output")):
            ref = direct_capture(tiny_llama, "model.layers.1.mlp", io, ids).reshape(-1, 64).numpy()
            np.testing.assert_allclose(f[f"acts/{name}"][:], ref, rtol=0, atol=1e-5)


class MLPOracle(nn.Module):
    """A 'transcoder' whose prediction is the model's own MLP applied to mlp_in: splicing it changes nothing."""

    def __init__(self, mlp: nn.Module, d: int):
        super().__init__()
        self.mlp = copy.deepcopy(mlp)  # a copy: the spliced module's hook must not call itself
        self.cfg = SAEConfig(arch="topk", d_in=d, d_sae=4, k=1, hookpoint="mlp_in.1", target="mlp_out.1")

    def forward(self, x: torch.Tensor) -> SAEOutput:
        return SAEOutput(self.mlp(x), x.new_zeros(*x.shape[:-1], 4))


def test_metrics_are_on_the_target_and_the_oracle_recovers_everything(acts, tiny_llama):
    oracle = MLPOracle(tiny_llama.model.layers[1].mlp, 64)
    m = evaluate(oracle, acts, tokenizer=None)
    assert m["fvu"] < 1e-9  # reconstruction measured against mlp_out.1, not against the input
    with ActsReader(acts, "mlp_in.1", tokenizer=None) as r:
        ids, bos = r.tokens(), r.bos_token_id
    mm = model_metrics(oracle, tiny_llama, ids, hookpoint="mlp_in.1", bos_token_id=bos).compute()
    assert mm["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4) and mm["kl_sae"] == pytest.approx(0, abs=1e-6)
    assert abs(mm["ce_zero_ablation"] - mm["ce_clean"]) > 1e-4  # zeroing mlp_out.1 does change the model

    class Zero(MLPOracle):  # predicting zeros must equal the zero-ablation baseline
        def forward(self, x):
            return SAEOutput(x.new_zeros(x.shape), x.new_zeros(*x.shape[:-1], 4))

    mz = model_metrics(Zero(oracle.mlp, 64), tiny_llama, ids, hookpoint="mlp_in.1", bos_token_id=bos).compute()
    assert mz["ce_sae"] == pytest.approx(mz["ce_zero_ablation"], abs=1e-6)
    assert mz["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-4)


def test_report_and_export_from_the_cli(acts, tmp_path, capsys):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch="batchtopk", d_in=64, d_sae=96, k=6, hookpoint="mlp_in.1", target="mlp_out.1",
                             skip=True, model="tiny-llama"))
    with torch.no_grad():
        sae.W_skip.normal_(0, 0.05)
        sae.threshold.fill_(0.05)
    sae.save(tmp_path / "tc")
    rc = main(["analyze", str(tmp_path / "tc"), "--acts", str(acts), "--model", "tiny-llama", "--top-k", "3",
               "--ce-windows", "2", "--device", "cpu", "--out", str(tmp_path / "report")])
    assert rc == 0
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["hookpoint"] == "mlp_in.1" and metrics["target"] == "mlp_out.1" and metrics["skip"] is True
    assert "ce_loss_recovered" in metrics and "kl_sae" in metrics
    # FVU against mlp_out.1, computed here from the file with plain h5py
    with h5py.File(acts, "r") as f:
        keep = (f["tokens"][:] != f.attrs["bos_token_id"]).reshape(-1)
        x, y = f["acts/mlp_in.1"][:][keep], f["acts/mlp_out.1"][:][keep]
    pred = sae.eval()(torch.from_numpy(x)).x_hat.detach().double().numpy()
    fvu = ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    # top activations read on the input side: the report's densities are those of the latents of mlp_in.1
    dens = (sae(torch.from_numpy(x)).feature_acts > 0).float().mean(0).numpy()
    feats = json.loads((tmp_path / "report" / "top_activations.jsonl").read_text().splitlines()[0])
    assert feats["density"] == pytest.approx(float(dens[feats["feature"]]), abs=1e-6)
    page = (tmp_path / "report" / "report.html").read_text()
    assert "reads mlp_in.1, writes mlp_out.1" in page and "skip transcoder" in page
    rc = main(["export", str(tmp_path / "tc"), "--format", "saelens", "--out", str(tmp_path / "saelens")])
    assert rc == 0
    back = SAE.load(tmp_path / "saelens")
    xt = torch.from_numpy(x[:16])
    torch.testing.assert_close(back(xt).x_hat, sae(xt).x_hat)
