"""Training stops on NaN/Inf keeping the last good checkpoint, refuses an SAE too big for memory before it
starts, and --force replaces only an earlier run's own files."""

from __future__ import annotations

import pytest
import torch
from _trainer_helpers import one_torch_thread, toy_file  # noqa: F401

from sae_toolkit.cli import main
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.training.checkpoint import list_checkpoints
from sae_toolkit.training.divergence import TrainingDiverged
from sae_toolkit.training.memory import check_fits, training_bytes
from sae_toolkit.training.trainer import TrainConfig, Trainer, train_sae


def _cfg(acts, out, **kw) -> TrainConfig:
    base = dict(acts=str(acts), hookpoint="hp", arch="topk", n_features=64, k=4, batch_size=128, tokens=128 * 12,
                out=str(out), log_every=5, checkpoint_every=4)
    return TrainConfig(**{**base, **kw})


def test_huge_lr_stops_with_the_step_and_a_hint(small, tmp_path, capsys):
    rc = main(["train", str(small), "--hookpoint", "hp", "--arch", "topk", "--k", "4", "--n-features", "64",
               "--batch-size", "128", "--lr", "1e30", "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc != 0 and err.startswith("error: training diverged") and "lower --lr" in err
    assert "at step " in err and "no checkpoint had been saved yet" in err
    assert not (tmp_path / "run" / "sae").exists()  # no all-NaN SAE for export/analyze to pick up


def test_divergence_keeps_the_last_good_checkpoint(small, tmp_path, monkeypatch):
    real = Trainer.train_one

    def poisoned(self, x):  # weights go NaN in the update of step 6 (a fault injected where lr 1e30 would)
        out = real(self, x)
        if self.step == 5:
            with torch.no_grad():
                self.sae.W_dec.fill_(float("nan"))
        return out

    monkeypatch.setattr(Trainer, "train_one", poisoned)
    with pytest.raises(TrainingDiverged, match=r"NaN/Inf at step 7 .*step_00000004\) is kept") as e:
        train_sae(_cfg(small, tmp_path / "run"))
    assert e.value.exit_code == 1
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step_00000004"]
    assert not (tmp_path / "run" / "sae").exists()


def test_memory_estimate_refuses_huge_saes_before_training(small, tmp_path):
    assert training_bytes(10, 100, 1) == (2 * 10 * 100 + 110) * 16 + 4 * 4 * 100
    with pytest.raises(SAEToolkitError, match=r"needs about 2\.0 GiB .* but cpu has 0\.5 GiB free"):
        check_fits(1, 2**25, 1, torch.device("cpu"), available=2**29)
    with pytest.raises(SAEToolkitError, match=r"d_sae=1,000,000,000,000 latents .* lower --n-features"):
        train_sae(_cfg(small, tmp_path / "run", n_features=10**12))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


def test_force_replaces_only_an_earlier_runs_own_files(small, tmp_path):
    run = tmp_path / "run"
    train_sae(_cfg(small, run))
    with pytest.raises(SAEToolkitError, match="--force to start it over"):
        train_sae(_cfg(small, run))
    with pytest.raises(SAEToolkitError, match="--force starts the run over and --resume continues it"):
        train_sae(_cfg(small, run, resume=True), force=True)
    train_sae(_cfg(small, run, tokens=128 * 8), force=True)
    assert [p.name for p in list_checkpoints(run)] == ["step_00000004", "step_00000008"]
    (run / "notes.txt").write_text("mine")
    with pytest.raises(SAEToolkitError, match=r"did not write \(notes.txt\)"):
        train_sae(_cfg(small, run), force=True)
    assert (run / "notes.txt").read_text() == "mine" and (run / "sae" / "cfg.json").is_file()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "data.csv").write_text("1,2")
    with pytest.raises(SAEToolkitError, match="not written by sae-toolkit"):
        train_sae(_cfg(small, theirs), force=True)
    assert (theirs / "data.csv").read_text() == "1,2"
