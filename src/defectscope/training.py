"""The training kit every trainable method shares (below the models: seed, device, batches, loop).

Plain PyTorch (no training framework): a seed, the device chosen automatically (CUDA when
present, else CPU), a progress bar with the running loss, and optional early stopping on a
validation loss computed from normal images of the training side.
"""

from __future__ import annotations

import copy
import math
import random
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn
from .progress import progress

__all__ = ["seed_everything", "auto_device", "load_images", "batches", "train_loop"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def auto_device(device: str | None = None) -> torch.device:
    """``device`` if given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else CUDA when present, else CPU."""
    if device and device != "auto":
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_images(dataset, desc: str = "loading images") -> torch.Tensor:
    """All images of ``dataset`` stacked in one float tensor ``[N, C, H, W]``.

    Training sets of anomaly detection are small (tens to a few thousand images); holding them
    in memory once makes every epoch a pure tensor loop.
    """
    images = [dataset[i]["image"] for i in progress(range(len(dataset)), desc=desc)]
    return torch.stack(images)


def batches(images: torch.Tensor, batch_size: int, shuffle: bool, generator: torch.Generator | None = None,
            drop_last: bool = False) -> Iterable[torch.Tensor]:
    """Yield mini-batches of ``images`` (``[N, ...]``), shuffled with ``generator`` if asked."""
    n = images.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield images[order[start:start + batch_size]]


def train_loop(
    module: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
    val_images: torch.Tensor | None = None,
    patience: int | None = None,
    scheduler=None,
    desc: str = "train",
    device: torch.device | None = None,
) -> dict:
    """Minimise ``loss_fn(batch)`` over ``images`` for ``epochs`` epochs.

    Args:
        module: the trainable module (put in train mode; its best state is restored when early
            stopping is on).
        loss_fn: maps a batch ``[b, C, H, W]`` on ``device`` to a scalar loss.
        images: training images ``[N, C, H, W]`` (CPU); moved batch by batch to ``device``.
        val_images: normal images held out from training; when given, the mean validation loss
            is computed each epoch, and with ``patience`` training stops after that many epochs
            without improvement and the best weights are restored.
        scheduler: optional learning-rate scheduler stepped once per epoch.

    Returns:
        ``{"loss": [mean training loss per epoch], "val_loss": [...], "best_epoch": int}``.
    """
    device = device or auto_device()
    history: dict = {"loss": [], "val_loss": [], "best_epoch": None}
    best, best_state, stale = math.inf, None, 0
    bar = progress(range(epochs), desc=desc, unit="epoch")
    for epoch in bar:
        module.train()
        total, count = 0.0, 0
        for batch in batches(images, batch_size, shuffle=True, generator=generator):
            batch = batch.to(device, non_blocking=True)
            loss = loss_fn(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * batch.shape[0]
            count += batch.shape[0]
        if scheduler is not None:
            scheduler.step()
        history["loss"].append(total / max(count, 1))
        postfix = {"loss": f"{history['loss'][-1]:.4g}"}
        if val_images is not None and len(val_images):
            module.eval()
            with torch.no_grad():
                vals = [loss_fn(b.to(device)).item() * b.shape[0] for b in batches(val_images, batch_size, False)]
            val = sum(vals) / len(val_images)
            history["val_loss"].append(val)
            postfix["val"] = f"{val:.4g}"
            if val < best:
                best, stale, history["best_epoch"] = val, 0, epoch
                if patience is not None:
                    best_state = copy.deepcopy(module.state_dict())
            else:
                stale += 1
                if patience is not None and stale >= patience:
                    bar.set_postfix(postfix)
                    break
        bar.set_postfix(postfix)
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return history
