"""The tutorial recipe: a frozen backbone forwarded over every image on every epoch, a linear
classifier trained on its output, as the courses build it (compare's time reference)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from ..backbones import Backbone
from ..config import CompareConfig
from ..data import ImageSet, load_rgb
from ..heads import make_head
from ..runtime import Overall

TUTORIAL_LR, TUTORIAL_BATCH, TUTORIAL_PATIENCE = 1e-3, 32, 5  # the courses' Adam settings


class _TutorialImages(torch.utils.data.Dataset):
    """(image, label) pairs through torchvision's PIL transforms, as the courses build them."""

    def __init__(self, files: list[Path], labels: np.ndarray, bb: Backbone):
        from torchvision import transforms

        t = bb.transform
        self.files, self.labels = files, labels
        self.tf = transforms.Compose(
            [
                transforms.Resize(
                    t.resize, interpolation=transforms.InterpolationMode(t.interpolation)
                ),
                transforms.CenterCrop(t.crop),
                transforms.ToTensor(),
                transforms.Normalize(t.mean, t.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.tf(load_rgb(self.files[i])), int(self.labels[i])


class EarlyStopper:
    """The tutorials' early stopper: stop when validation loss has not improved for
    ``patience`` epochs."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0):
        self.patience, self.min_delta, self.counter, self.best = patience, min_delta, 0, math.inf

    def should_stop(self, loss: float) -> bool:
        if loss < self.best - self.min_delta:
            self.best, self.counter = loss, 0
            return False
        self.counter += 1
        return self.counter >= self.patience


def _tutorial_loaders(images: ImageSet, bb: Backbone, batch_size: int, seed: int) -> dict:
    """ImageFolder-style PIL transforms, DataLoader with no workers, fp32: as the courses build
    them."""
    g = torch.Generator().manual_seed(seed)
    loaders = {}
    for s in ("train", "val"):
        files = [images.root / x.path for x in images.splits[s]]
        labels = np.array([x.label for x in images.splits[s]], dtype=np.int64)
        dataset = _TutorialImages(files, labels, bb)
        loaders[s] = torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=(s == "train"),
            num_workers=0,
            generator=g if s == "train" else None,
        )
    return loaders


def _tutorial_epoch(
    net, classifier, loader, optimizer, device, bar: Overall
) -> tuple[float, float]:
    """One pass of the recipe: (mean loss, accuracy); trains when ``optimizer`` is given."""
    classifier.train(optimizer is not None)
    loss_sum = correct = n = 0
    with torch.inference_mode(optimizer is None):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = classifier(net(x))  # the backbone forward, again, every epoch
            loss = torch.nn.functional.cross_entropy(logits, y)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            bar.advance(len(y))
    return loss_sum / n, correct / n


def tutorial_recipe(
    images: ImageSet,
    bb: Backbone,
    *,
    epochs: int = CompareConfig.tutorial_epochs,
    seed: int = 0,
    device: torch.device,
    progress: bool | Overall = False,
) -> tuple[dict, torch.nn.Module]:
    """Train a fresh linear classifier on a frozen backbone that is forwarded every epoch.

    Adam lr 1e-3, batch 32, early stopping with patience 5 on validation loss.
    The backbone stays in eval mode (frozen BatchNorm statistics too, which the
    courses' ``model.train()`` forgets); data goes through ImageFolder-style
    PIL transforms and a DataLoader with no workers, in fp32 NCHW. ``progress``:
    a bar (or, given compare's :class:`embedcache.runtime.Overall`, one that moves it).

    Returns (metrics with per-epoch history and times, the classifier).
    """
    loaders = _tutorial_loaders(images, bb, TUTORIAL_BATCH, seed)
    net = bb.net.to(device).eval().to(memory_format=torch.contiguous_format)
    for p in net.parameters():
        p.requires_grad_(False)
    classifier = make_head("linear", bb.feature_dim, len(images.classes))
    bound = 1 / bb.feature_dim**0.5  # torch's default init, from a seeded generator
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        classifier.weight.uniform_(-bound, bound, generator=g)
        classifier.bias.uniform_(-bound, bound, generator=g)
    classifier = classifier.to(device)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=TUTORIAL_LR)
    stopper = EarlyStopper(TUTORIAL_PATIENCE)
    history = {k: [] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "seconds")}
    bar = Overall.of(progress, "tutorial recipe")  # in images forwarded
    bar.expect(epochs * sum(len(loader.dataset) for loader in loaders.values()))
    try:
        for epoch in range(1, epochs + 1):
            bar.phase(f"epoch {epoch} of {epochs}")
            t0 = time.perf_counter()
            tl, ta = _tutorial_epoch(net, classifier, loaders["train"], optimizer, device, bar)
            vl, va = _tutorial_epoch(net, classifier, loaders["val"], None, device, bar)
            for k, v in zip(history, (tl, ta, vl, va, time.perf_counter() - t0), strict=True):
                history[k].append(v)
            if stopper.should_stop(vl):
                break
        bar.finish()
    finally:
        bar.close()
    metrics = {
        "history": history,
        "epochs_run": len(history["val_acc"]),
        "best_val_acc": max(history["val_acc"]),
    }
    return metrics, classifier
