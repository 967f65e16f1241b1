"""Heads on pooled features: linear and MLP modules, stacked heads for sweeps, kNN.

A head maps features ``(N, D)`` (as the backbone gives them, unnormalised) to
logits ``(N, C)``; the standardisation learnt on the training split is part of
the head (:class:`Standardize`), so a head is used the same way on cached
features, on a live backbone and when fine-tuning.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import EmbedcacheError


class Standardize(nn.Module):
    """(x - mean) / std with statistics of the training features (fixed buffers)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float().clone())
        self.register_buffer("std", std.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def linear(in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised nn.Linear: its weights are always set afterwards (seeded or loaded), and
    torch's default init would draw from the caller's global random generator."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features)


def make_head(
    kind: str, dim: int, num_classes: int, *, hidden: int = 512, dropout: float = 0.0
) -> nn.Module:
    """A head of this shape (without standardisation), uninitialised: see :func:`init_template`."""
    if kind in ("linear", "logreg"):
        return linear(dim, num_classes)
    if kind == "mlp":
        return nn.Sequential(
            linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), linear(hidden, num_classes)
        )
    kinds = ("linear", "mlp", "logreg")  # a knn head is a bank of features, built by KNNHead
    raise EmbedcacheError(f"a trainable head is one of {', '.join(kinds)}, got {kind!r}")


class Head(nn.Module):
    """Standardisation followed by a classifier: what train-head saves and finetune reattaches."""

    def __init__(self, norm: Standardize, classifier: nn.Module):
        super().__init__()
        self.norm = norm
        self.classifier = classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(features))


class Blend(nn.Module):
    """The mean of its heads' class probabilities, returned as log-probabilities (so argmax and
    softmax work as for logits): the default head's answer where validation cannot tell the
    linear probe and the MLP apart (see :func:`embedcache.train.auto_choice`). With
    ``multi_label`` the mean of their sigmoids, returned as logits (so a sigmoid gives it back).
    """

    def __init__(self, members: list[nn.Module], *, multi_label: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.multi_label = multi_label

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.multi_label:
            p = torch.stack([torch.sigmoid(m(features).float()) for m in self.members]).mean(0)
            p = p.clamp(1e-7, 1 - 1e-7)
            return torch.log(p) - torch.log1p(-p)
        logp = torch.stack([torch.log_softmax(m(features).float(), 1) for m in self.members])
        return torch.logsumexp(logp, 0) - math.log(len(self.members))


class KNNHead(nn.Module):
    """Cosine k-nearest-neighbour vote over a bank of (standardised) training features.

    Returns log-probabilities (the vote shares), so that argmax and softmax work as for logits.
    """

    def __init__(self, bank: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int):
        super().__init__()
        self.register_buffer("bank", nn.functional.normalize(bank.float(), dim=1))
        self.register_buffer("labels", labels.long())
        self.num_classes, self.k = num_classes, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sims = nn.functional.normalize(x.float(), dim=1) @ self.bank.T
        idx = sims.topk(min(self.k, self.bank.shape[0]), dim=1).indices
        votes = nn.functional.one_hot(self.labels[idx], self.num_classes).float().mean(1)
        return torch.log(votes.clamp_min(1e-6))


# ---------------------------------------------------------------------------
# Stacked heads: H heads trained in one pass, one GEMM per layer


class StackedHeads(nn.Module):
    """H independent heads of the same shape evaluated at once.

    ``forward(x)`` maps standardised features ``(B, D)`` to logits ``(H, B, C)``.
    The first layer of all heads is one matrix ``(D, H * width)``, so the whole
    sweep costs one GEMM instead of H small ones. Every head starts from the
    same initial weights (those a single head gets from the same seed), so each
    one follows exactly the run a separate training with its settings would.
    """

    def __init__(self, template: nn.Module, num_heads: int):
        super().__init__()
        layers = [m for m in template.modules() if isinstance(m, nn.Linear)]
        self.kind = "linear" if len(layers) == 1 else "mlp"
        self.num_heads = H = num_heads
        first = layers[0]
        self.w1 = nn.Parameter(first.weight.detach().T.repeat(1, H).contiguous())  # (D, H * out1)
        self.b1 = nn.Parameter(first.bias.detach().repeat(H).contiguous())  # (H * out1)
        self.out1 = first.out_features
        if self.kind == "mlp":
            act, drop, second = template[1], template[2], template[3]
            self.act, self.dropout = act, drop
            self.w2 = nn.Parameter(
                second.weight.detach().T.unsqueeze(0).repeat(H, 1, 1).contiguous()
            )  # (H, hidden, C)
            self.b2 = nn.Parameter(
                second.bias.detach().unsqueeze(0).repeat(H, 1).unsqueeze(1).contiguous()
            )  # (H, 1, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H = x.shape[0], self.num_heads
        z = torch.addmm(self.b1, x, self.w1).view(B, H, self.out1).transpose(0, 1)  # (H, B, out1)
        if self.kind == "linear":
            return z
        z = self.dropout(self.act(z))
        return torch.baddbmm(self.b2, z, self.w2)

    def export(self, h: int, template: nn.Module) -> nn.Module:
        """Head ``h`` as a plain module shaped like ``template``."""
        out = make_like(template)
        layers = [m for m in out.modules() if isinstance(m, nn.Linear)]
        with torch.no_grad():
            sl = slice(h * self.out1, (h + 1) * self.out1)
            layers[0].weight.copy_(self.w1[:, sl].T)
            layers[0].bias.copy_(self.b1[sl])
            if self.kind == "mlp":
                layers[1].weight.copy_(self.w2[h].T)
                layers[1].bias.copy_(self.b2[h, 0])
        return out


def make_like(template: nn.Module) -> nn.Module:
    """A new module of the same architecture as a linear or MLP ``template``."""
    layers = [m for m in template.modules() if isinstance(m, nn.Linear)]
    if len(layers) == 1:
        return linear(layers[0].in_features, layers[0].out_features)
    return nn.Sequential(
        linear(layers[0].in_features, layers[0].out_features),
        nn.GELU(),
        nn.Dropout(template[2].p),
        linear(layers[1].in_features, layers[1].out_features),
    )


class StackedAdamW:
    """AdamW over stacked heads with one learning rate and weight decay per head.

    Mathematically the same update torch.optim.AdamW applies to each head on
    its own (decoupled weight decay, bias correction), vectorised over heads.
    """

    def __init__(
        self,
        heads: StackedHeads,
        lrs: torch.Tensor,
        wds: torch.Tensor,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
    ):
        self.heads = heads
        self.betas, self.eps = betas, eps
        self.lr = lrs.float()
        self.wd = wds.float()
        self.step_count = 0
        self.state = {
            name: (torch.zeros_like(p), torch.zeros_like(p)) for name, p in heads.named_parameters()
        }

    def per_head(self, name: str, values: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Broadcast a per-head vector to parameter ``name``'s layout."""
        H = self.heads.num_heads
        if name == "w1":
            return values.repeat_interleave(self.heads.out1).view(1, -1)
        if name == "b1":
            return values.repeat_interleave(self.heads.out1)
        return values.view(H, *([1] * (p.dim() - 1)))

    @torch.no_grad()
    def step(self) -> None:
        self.step_count += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.step_count, 1 - b2**self.step_count
        for name, p in self.heads.named_parameters():
            if p.grad is None:
                continue
            m, v = self.state[name]
            lr = self.per_head(name, self.lr.to(p.device), p)
            wd = self.per_head(name, self.wd.to(p.device), p)
            p.mul_(1 - lr * wd)
            m.mul_(b1).add_(p.grad, alpha=1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(c2)).add_(self.eps)
            p.sub_((lr / c1) * m / denom)

    def zero_grad(self) -> None:
        for p in self.heads.parameters():
            p.grad = None

    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "m": {k: s[0] for k, s in self.state.items()},
            "v": {k: s[1] for k, s in self.state.items()},
        }

    def load_state_dict(self, d: dict) -> None:
        self.step_count = int(d["step"])
        for k in self.state:
            self.state[k][0].copy_(d["m"][k])
            self.state[k][1].copy_(d["v"][k])


def init_template(
    kind: str, dim: int, num_classes: int, *, hidden: int, dropout: float, seed: int
) -> nn.Module:
    """The seeded initial head every member of a sweep starts from."""
    g = torch.Generator().manual_seed(seed)
    head = make_head(kind, dim, num_classes, hidden=hidden, dropout=dropout)
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, nn.Linear):
                bound = 1 / math.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=g)
                m.bias.uniform_(-bound, bound, generator=g)
    return head


BLEND_KINDS = ("linear", "mlp")  # a blend head's members, in order


def build_head_module(config: dict, state_dict: dict) -> torch.nn.Module:
    """A Head (or a Blend of a linear and an MLP Head) shaped by ``config``, ``state_dict``
    loaded."""
    if config["kind"] == "blend":
        members = [_member(config, kind) for kind in BLEND_KINDS]
        module = Blend(members, multi_label=bool(config.get("multi_label")))
    else:
        module = _member(config, config["kind"], state_dict)
    module.load_state_dict(state_dict)
    return module


def _member(config: dict, kind: str, state_dict: dict | None = None) -> Head:
    """A Head of ``kind`` shaped by ``config`` (a knn head's bank from ``state_dict``)."""
    D, C = config["dim"], config["num_classes"]
    norm = Standardize(torch.zeros(D), torch.ones(D))
    if kind == "knn":
        bank = state_dict["classifier.bank"]
        classifier = KNNHead(bank, state_dict["classifier.labels"], C, int(config.get("k", 1)))
    else:
        classifier = make_like(
            make_head(
                "mlp" if kind == "mlp" else "linear",
                D,
                C,
                hidden=config.get("hidden", 512),
                dropout=config.get("dropout", 0.0),
            )
        )
    return Head(norm, classifier)
