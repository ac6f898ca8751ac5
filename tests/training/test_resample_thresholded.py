"""Dead-latent resampling for the thresholded SAEs (JumpReLU, tanh Gated): re-pointed latents fire at the asked rate;
the defaults that turn it on."""

from __future__ import annotations

import pytest
import torch
from _trainer_helpers import read_metrics

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.sae import SAEConfig, make_sae
from sae_toolkit.training.resample import NEW_RATE_SHARE, STARVING_RATE, resample_thresholded_
from sae_toolkit.training.trainer import TrainConfig, Trainer


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_resampled_latents_fire_at_the_rate_and_the_rest_is_untouched(arch):
    torch.manual_seed(0)
    sae = make_sae(SAEConfig(arch=arch, d_in=16, d_sae=64))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.training_loss(torch.randn(64, 16) * 2).loss.backward()
    opt.step()
    inputs = torch.randn(4000, 16)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[[2, 9, 30, 41]] = True
    before = {n: t.detach().clone() for n, t in sae.state_tensors().items()}
    with torch.no_grad():
        sae.b_dec.add_(0.3)  # the directions and the encoder's offset are taken relative to b_dec
        f_before = sae.encode(inputs)
    n = resample_thresholded_(sae, opt, dead, inputs, torch.Generator().manual_seed(0), rate=0.5)
    assert n == 4
    with torch.no_grad():
        f = sae.encode(inputs)
        rates = (f[:, dead] > 0).float().mean(0)
        # at NEW_RATE_SHARE of the rate asked for (a tenth: 5 % of the rows here)
        assert torch.allclose(rates, torch.full_like(rates, 0.5 * NEW_RATE_SHARE), atol=0.005), rates
        assert torch.equal(f[:, ~dead], f_before[:, ~dead])  # live latents encode exactly as before
        assert torch.allclose(sae.W_dec[dead].norm(dim=-1), torch.ones(4))
        # four different inputs (drawn without replacement), each a direction the latent decodes along
        assert (sae.W_dec[dead] @ sae.W_dec[dead].T).triu(1).abs().max() < 0.999
        assert torch.equal(sae.W_dec[~dead], before["W_dec"][~dead])
        # where a resampled latent fires, its value is its least-squares coefficient d·(x − b_dec) on its row d
        # (no high-norm rows here, so nothing is projected out of the encoder column)
        rows = f[:, dead] > 0
        coef = (inputs - sae.b_dec) @ sae.W_dec[dead].T
        assert torch.allclose(f[:, dead][rows], coef[rows], atol=1e-4)
    # Adam: momentum zeroed; second moment that of the live latents (a zeroed one makes the next steps ~30× lr here)
    threshold_param = sae.log_threshold if arch == "jumprelu" else sae.b_enc
    for param in (threshold_param, sae.W_dec):
        state = opt.state[param]
        assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg"][~dead] != 0).any()
        assert torch.allclose(state["exp_avg_sq"][dead], state["exp_avg_sq"][~dead].mean(0).expand_as(
            state["exp_avg_sq"][dead]))
    sq = opt.state[sae.W_enc]["exp_avg_sq"]
    assert torch.allclose(sq[:, dead], sq[:, ~dead].mean(1, keepdim=True).expand(16, 4))
    # nothing dead: nothing changes
    assert resample_thresholded_(sae, opt, torch.zeros(64, dtype=torch.bool), inputs, torch.Generator()) == 0


def test_without_a_rate_the_resampled_latents_take_the_saes_current_rate():
    torch.manual_seed(1)
    sae = make_sae(SAEConfig(arch="jumprelu", d_in=16, d_sae=64))
    inputs = torch.randn(4000, 16)
    with torch.no_grad():
        sae.init_thresholds_(inputs, 0.1)
        rate = float((sae.encode(inputs) > 0).float().mean())
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:8] = True
    opt = torch.optim.Adam(sae.parameters())
    resample_thresholded_(sae, opt, dead, inputs, torch.Generator().manual_seed(0))
    with torch.no_grad():
        new_rate = float((sae.encode(inputs)[:, dead] > 0).float().mean())
        assert new_rate == pytest.approx(rate * NEW_RATE_SHARE, abs=0.003)


def test_resampling_defaults_and_validation():
    base = dict(acts="a.h5", hookpoint="hp", out="o")
    cfg = TrainConfig(arch="jumprelu", target_l0=16, **base)
    assert cfg.resample is True and cfg.resample_fractions == (0.25, 0.5, 0.75)
    assert TrainConfig(arch="jumprelu", **base).resample is False  # without a target: unchanged
    assert TrainConfig(arch="jumprelu", target_l0=16, target="t", **base).resample is False  # transcoders
    assert TrainConfig(arch="gated", target_l0=16, **base).resample is False  # gated: only when asked for
    for arch in ("jumprelu", "gated"):
        cfg = TrainConfig(arch=arch, resample=True, **base)
        assert cfg.resample is True and cfg.resample_fractions == (0.25, 0.5, 0.75)
    relu = TrainConfig(arch="relu", **base)
    assert relu.resample is True and relu.resample_fractions == (0.125, 0.25, 0.375, 0.5)
    assert TrainConfig(arch="gated", gated_loss="l1", target_l0=16, **base).resample is False
    with pytest.raises(SAEToolkitError, match="not 'gated' with gated_loss='l1'.*set resample=False"):
        TrainConfig(arch="gated", gated_loss="l1", resample=True, **base)
    with pytest.raises(SAEToolkitError, match="not 'batchtopk'"):
        TrainConfig(arch="batchtopk", resample=True, **base)


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_trainer_revives_latents_that_never_fire(small, tmp_path, capsys, arch):
    cfg = TrainConfig(acts=str(small), hookpoint="hp", arch=arch, n_features=128, batch_size=128, tokens=128 * 30,
                      target_l0=4, resample=True, dead_window_tokens=512, resample_fractions=(0.5,),
                      out=str(tmp_path / "run"), log_every=5, checkpoint_every=100)
    trainer = Trainer(cfg)
    killed = torch.arange(0, 128, 8)
    with torch.no_grad():  # thresholds far above every pre-activation: these latents can never fire on their own
        if arch == "jumprelu":
            trainer.sae.log_threshold[killed] = 10.0
        else:
            trainer.sae.b_enc[killed] = -1e4
    trainer.fit()
    out = capsys.readouterr().out
    assert int(out.split("step 15: resampled ")[1].split()[0]) >= len(killed)
    rows = read_metrics(trainer.run_dir)
    at = {r["step"]: r["dead_fraction"] for r in rows}
    assert at[15] >= len(killed) / 128 and at[20] <= at[15] / 2  # measured 16-17 → 3 (jumprelu), 5 (gated) of 128
    with torch.no_grad():
        stuck = trainer.sae.log_threshold[killed] >= 10.0 if arch == "jumprelu" else trainer.sae.b_enc[killed] <= -1e4
    assert not stuck.any()
    # every one of them fired after its resampling (step 15 of 30), and for jumprelu most in the last 4 batches
    # (measured: all 16; gated 6: its resampled latents start at a tenth of the target rate, ~1.6 expected firings
    # in that window, and since the penalty charges the whole jump tanh(c·ReLU(π_mag)) its latents no longer die in
    # this tiny toy: 128 of 128 fire at the end without the killing, 122 before)
    assert bool((trainer.tokens_since_fired[killed] < 14 * cfg.batch_size).all())
    if arch == "jumprelu":
        assert int((trainer.tokens_since_fired[killed] < cfg.dead_window_tokens).sum()) >= 10


def test_starving_latents_are_resampled_too():
    """A latent that still fires, but on under STARVING_RATE of the sample, counts as dead (held-out checks of ~10k
    rows see such latents dead); one a little above it does not."""
    torch.manual_seed(2)
    sae = make_sae(SAEConfig(arch="jumprelu", d_in=16, d_sae=64))
    inputs = torch.randn(20000, 16)
    assert STARVING_RATE * 20000 == pytest.approx(7)
    with torch.no_grad():
        sae.init_thresholds_(inputs, 0.05)
        pre = sae.pre_acts(inputs)
        sae.log_threshold[5] = pre[:, 5].kthvalue(20000 - 3).values.log()  # fires on 3 rows: starving
        sae.log_threshold[6] = pre[:, 6].kthvalue(20000 - 12).values.log()  # 12 rows: not
    opt = torch.optim.Adam(sae.parameters())
    before = sae.W_dec.detach().clone()
    n = resample_thresholded_(sae, opt, torch.zeros(64, dtype=torch.bool), inputs, torch.Generator().manual_seed(0),
                              rate=0.05)
    assert n == 1
    changed = (sae.W_dec.detach() != before).any(-1)
    assert changed.nonzero().flatten().tolist() == [5]


def test_resampled_encoders_ignore_the_high_norm_rows():
    """A few rows with ~10× the median norm along a shared direction: without care every resampled latent's top
    quantile is those rows. The encoder columns have that direction projected out, so they fire on typical rows."""
    torch.manual_seed(3)
    sae = make_sae(SAEConfig(arch="jumprelu", d_in=16, d_sae=64))
    inputs = torch.randn(4000, 16)
    massive = torch.zeros(16)
    massive[0] = 1.0
    inputs[:40] = 40 * massive + 0.5 * torch.randn(40, 16)  # 1 % of the rows
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:16] = True
    resample_thresholded_(sae, torch.optim.Adam(sae.parameters()), dead, inputs, torch.Generator().manual_seed(0),
                          rate=0.2)
    with torch.no_grad():
        fired = sae.encode(inputs)[:, dead] > 0
        assert float(fired[:40].float().mean()) < 0.1  # rarely on the high-norm rows
        assert float(fired[40:].float().mean()) == pytest.approx(0.2 * NEW_RATE_SHARE, abs=0.005)  # at the rate there
        assert (sae.W_enc[0, dead].abs() < 0.01).all()  # the high-norm direction, up to their noise
