"""One training loop for every baseline autoencoder (Adam, validation, ReduceLROnPlateau, clipping, early stopping)."""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import torch
import torch.nn as nn

from sae_toolkit.baselines._checks import as_matrix, check_unit_interval
from sae_toolkit.baselines.losses import Recon
from sae_toolkit.errors import SAEToolkitError


def as_model_input(model: nn.Module, X, name: str = "X") -> torch.Tensor:
    """Check X against the model's expected input and return a float32 tensor (on the CPU).

    Image models (with ``input_shape``) take [n, C, S, S] or flat [n, C·S·S]; the others take [n, input_dim].
    NaN/inf rows and a wrong feature count are one-line SAEToolkitErrors.
    """
    if hasattr(model, "input_shape"):
        shape = tuple(model.input_shape)
        arr = np.asarray(X.to_numpy() if hasattr(X, "to_numpy") else X, dtype=np.float32)
        flat = int(np.prod(shape))
        if arr.ndim == len(shape) + 1 and tuple(arr.shape[1:]) == shape:
            arr = arr.reshape(len(arr), flat)
        mat = as_matrix(arr, name, n_features=flat)
        return torch.from_numpy(mat.reshape(len(mat), *shape))
    return torch.from_numpy(as_matrix(X, name, n_features=getattr(model, "input_dim", None)))


def _check_bce(model: nn.Module, tensors: list[tuple[str, torch.Tensor]]) -> None:
    if getattr(model, "output_activation", "none") != "sigmoid":
        raise SAEToolkitError(
            f"loss='bce' needs a decoder with a sigmoid output but {type(model).__name__} has none; build it with "
            "output_activation='sigmoid' or use loss='mse'"
        )
    for name, t in tensors:
        check_unit_interval(t.numpy(), name)


def _loss_terms(model: nn.Module, x: torch.Tensor, loss: Recon | None) -> dict:
    kwargs = {} if loss is None else {"recon": loss}
    return model.loss(x, *model(x), **kwargs)


@torch.no_grad()
def evaluate_loss(model: nn.Module, X: torch.Tensor, loss: Recon | None = None, batch_size: int = 4096) -> dict:
    """Mean of every loss term over X in eval mode (no corruption, no dropout, VAE at its mean)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    for i in range(0, len(X), batch_size):
        xb = X[i : i + batch_size].to(device)
        for k, v in _loss_terms(model, xb, loss).items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(xb)
    model.train(was_training)
    return {k: v / len(X) for k, v in sums.items()}


def train_autoencoder(
    model: nn.Module,
    X_train,
    X_val=None,
    n_epochs: int = 50,
    batch_size: int = 256,
    lr: float = 1e-3,
    device: str = "cpu",
    *,
    loss: Recon | None = None,
    weight_decay: float = 1e-5,
    clip_norm: float | None = 1.0,
    lr_patience: int = 5,
    early_stopping: int | None = 10,
    seed: int | None = None,
    verbose: bool = True,
) -> dict:
    """Train any baseline autoencoder on X_train [n, d] (or images [n, C, S, S]); returns the history dict.

    Each step minimises ``model.loss(x, *model(x))["total"]`` with Adam, clipping the gradient norm to
    ``clip_norm``. After each epoch the validation loss (eval mode) drives ReduceLROnPlateau (factor 0.5,
    ``lr_patience`` epochs; the training loss when there is no X_val) and early stopping: training stops after
    ``early_stopping`` epochs without improvement and the best weights are restored (None disables it).
    ``loss``: "mse" or "bce" (None = the model's default); BCE is refused unless the model ends in a sigmoid and
    the data lie in [0, 1]. History keys: ``train``, ``val`` (per-epoch total loss), ``lr``, ``terms`` (per-epoch
    dict of every loss term on the training batches), ``best_epoch`` (0-based, None without X_val),
    ``stopped_early``.
    """
    if n_epochs < 1 or batch_size < 1 or lr <= 0:
        raise SAEToolkitError(f"n_epochs={n_epochs}, batch_size={batch_size}, lr={lr}: all must be positive")
    if loss not in (None, "mse", "bce"):
        raise SAEToolkitError(f"loss={loss!r}; use 'mse' or 'bce'")
    Xt = as_model_input(model, X_train, "X_train")
    Xv = None if X_val is None else as_model_input(model, X_val, "X_val")
    # the model's own default (BCE for the sigmoid-pixel ConvAutoencoder, MSE otherwise)
    loss = loss or getattr(model, "default_recon", "mse")
    if loss == "bce":
        _check_bce(model, [("X_train", Xt)] + ([] if Xv is None else [("X_val", Xv)]))

    from tqdm.auto import tqdm

    with few_threads(model, device):
        return _fit(model, Xt, Xv, n_epochs, batch_size, lr, device, loss, weight_decay, clip_norm, lr_patience,
                    early_stopping, seed, verbose, tqdm)


@contextlib.contextmanager
def few_threads(model: nn.Module, device: str | torch.device):
    """One intra-op thread for small models on CPU, restored afterwards.

    Tiny MLPs are bound by per-step Python overhead; extra intra-op threads only add synchronisation, and on a
    busy 2-core machine they made a 250-row detector fit 27× slower (80 s vs 3 s, measured in the notes).
    """
    small = sum(p.numel() for p in model.parameters()) < 100_000
    if not (small and str(device).startswith("cpu")):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit(model, Xt, Xv, n_epochs, batch_size, lr, device, loss, weight_decay, clip_norm, lr_patience,
         early_stopping, seed, verbose, tqdm) -> dict:
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    # `verbose=` was removed from ReduceLROnPlateau in torch 2.7; the progress bar shows lr instead
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, patience=lr_patience, factor=0.5)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    n = len(Xt)
    # BatchNorm cannot normalise a batch of one sample: drop a final singleton batch
    n_used = n - 1 if n % batch_size == 1 and n > 1 else n
    history: dict = {"train": [], "val": [], "lr": [], "terms": [], "best_epoch": None, "stopped_early": False}
    best_val, best_state, since_best = float("inf"), None, 0

    bar = tqdm(range(n_epochs), desc=f"train {type(model).__name__}", unit="epoch", disable=not verbose)
    for epoch in bar:
        terms = _train_epoch(model, optimizer, Xt, n_used, batch_size, loss, clip_norm, device, gen)
        history["train"].append(terms["total"])
        history["terms"].append(terms)
        history["lr"].append(optimizer.param_groups[0]["lr"])
        postfix = {"train": f"{terms['total']:.5f}", "lr": f"{history['lr'][-1]:.1e}"}
        monitored = terms["total"]
        if Xv is not None:
            monitored = evaluate_loss(model, Xv, loss)["total"]
            history["val"].append(monitored)
            postfix["val"] = f"{monitored:.5f}"
            if monitored < best_val - 1e-12:
                best_val, since_best, history["best_epoch"] = monitored, 0, epoch
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
        if not np.isfinite(monitored):
            raise SAEToolkitError(
                f"loss became {monitored} at epoch {epoch + 1}; lower lr (now {lr}) or check the input scaling"
            )
        scheduler.step(monitored)
        bar.set_postfix(postfix)
        if early_stopping is not None and Xv is not None and since_best >= early_stopping:
            history["stopped_early"] = True
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history


def _train_epoch(model, optimizer, Xt, n_used, batch_size, loss, clip_norm, device, gen) -> dict:
    """One pass over a fresh permutation; returns the sample-weighted mean of every loss term."""
    model.train()
    perm = torch.randperm(len(Xt), generator=gen)[:n_used]
    sums: dict[str, float] = {}
    for i in range(0, n_used, batch_size):
        xb = Xt[perm[i : i + batch_size]].to(device)
        optimizer.zero_grad(set_to_none=True)
        terms = _loss_terms(model, xb, loss)
        terms["total"].backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=clip_norm)
        optimizer.step()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * len(xb)
    return {k: v / n_used for k, v in sums.items()}


def train_denoising_ae(model: nn.Module, X_train, n_epochs: int = 50, batch_size: int = 256, lr: float = 1e-3) -> list:
    """The seed's DAE loop: per-epoch losses of x̂(x̃) against the CLEAN x (the model corrupts internally)."""
    history = train_autoencoder(model, X_train, n_epochs=n_epochs, batch_size=batch_size, lr=lr,
                                early_stopping=None, verbose=False)
    return history["train"]


def train_sparse_ae(model: nn.Module, X_train, n_epochs: int = 50, batch_size: int = 256, lr: float = 1e-3) -> list:
    """The seed's SAE loop: a list of per-epoch dicts with total, recon, sparsity and l0 (share of active units)."""
    history = train_autoencoder(model, X_train, n_epochs=n_epochs, batch_size=batch_size, lr=lr,
                                weight_decay=0.0, early_stopping=None, verbose=False)
    return [
        {"total": t["total"], "recon": t["recon"], "sparsity": t["sparsity"], "l0": t["l0_active"]}
        for t in history["terms"]
    ]


def train_mnist_ae(n_epochs: int = 20, batch_size: int = 256, mnist_dir: str | None = None,
                   device: str = "auto", verbose: bool = True) -> tuple[nn.Module, list]:
    """The seed's image example offline: a ConvAutoencoder trained with BCE on MNIST files in ``mnist_dir``
    (see ``load_mnist``) or, by default, on sklearn's bundled 8×8 digits. Returns (model, train_losses);
    draw reconstructions with ``plot_reconstructions``."""
    from sae_toolkit.baselines.conv import ConvAutoencoder
    from sae_toolkit.baselines.data import load_digits_images, load_mnist
    from sae_toolkit.units import resolve_device

    images = load_mnist(mnist_dir).images if mnist_dir else load_digits_images().images
    model = ConvAutoencoder(latent_dim=32, image_size=images.shape[-1])
    history = train_autoencoder(model, images, n_epochs=n_epochs, batch_size=batch_size, loss="bce",
                                device=resolve_device(device), early_stopping=None, verbose=verbose)
    return model, history["train"]
