"""heads.py: standardisation, stacked heads and their optimiser, rebuilding a saved head."""

from __future__ import annotations

import pytest
import torch

from embedcache.errors import EmbedcacheError
from embedcache.heads import (
    Head,
    KNNHead,
    StackedAdamW,
    StackedHeads,
    Standardize,
    build_head_module,
    init_template,
    make_head,
)

D, C, HIDDEN = 6, 3, 5


def test_stacked_adamw_is_torch_adamw_per_head():
    torch.manual_seed(0)
    template = init_template("linear", 6, 3, hidden=0, dropout=0, seed=0)
    reference = init_template("linear", 6, 3, hidden=0, dropout=0, seed=0)
    heads = StackedHeads(template, 2)
    opt = StackedAdamW(heads, torch.tensor([1e-2, 1e-1]), torch.tensor([0.0, 0.5]))
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-1, weight_decay=0.5)
    for _ in range(20):
        x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            heads(x).reshape(32, 3), y.repeat(2), reduction="none"
        ).view(2, 16).mean(1).sum().backward()
        opt.step()
        ref_opt.zero_grad()
        torch.nn.functional.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    exported = heads.export(1, template)
    torch.testing.assert_close(exported.weight, reference.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exported.bias, reference.bias, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_an_exported_head_computes_what_its_slot_of_the_stack_computes(kind):
    template = init_template(kind, D, C, hidden=HIDDEN, dropout=0.0, seed=0)
    stack = StackedHeads(template, 3).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every head different, as after a sweep
        for p in stack.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    x = torch.randn(7, D, generator=g)
    with torch.no_grad():
        stacked = stack(x)
        outputs = [stack.export(h, template).eval()(x) for h in range(3)]
    assert stacked.shape == (3, 7, C)
    for h, out in enumerate(outputs):
        torch.testing.assert_close(out, stacked[h])
    assert not torch.allclose(outputs[0], outputs[1])


def _norm() -> Standardize:
    g = torch.Generator().manual_seed(2)
    return Standardize(torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5)


@pytest.mark.parametrize("kind", ["linear", "logreg", "mlp"])
def test_a_saved_torch_head_rebuilds_with_the_same_outputs(kind):
    classifier = init_template(kind, D, C, hidden=HIDDEN, dropout=0.0, seed=3)
    head = Head(_norm(), classifier).eval()
    config = {"kind": kind, "dim": D, "num_classes": C, "hidden": HIDDEN, "dropout": 0.0}
    rebuilt = build_head_module(config, head.state_dict()).eval()
    x = torch.randn(9, D)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), head(x), rtol=0, atol=0)


def test_a_saved_knn_head_rebuilds_with_the_same_votes():
    g = torch.Generator().manual_seed(4)
    bank, labels = torch.randn(12, D, generator=g), torch.arange(12) % C
    head = Head(_norm(), KNNHead(bank, labels, C, k=5)).eval()
    config = {"kind": "knn", "dim": D, "num_classes": C, "k": 5}
    rebuilt = build_head_module(config, head.state_dict()).eval()
    x = torch.randn(20, D, generator=g)
    assert rebuilt.classifier.k == 5
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), head(x), rtol=0, atol=0)
        # k matters: one neighbour votes differently from five on some of these points
        one = build_head_module({**config, "k": 1}, head.state_dict())(x)
    assert not torch.equal(one, head(x))


def test_standardize_subtracts_the_mean_and_divides_by_the_std():
    mean, std = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([2.0, 0.5, 4.0])
    x = torch.tensor([[3.0, -2.0, 0.5], [1.0, -1.0, 8.5]], dtype=torch.float16)
    out = Standardize(mean, std)(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 2.0]]))


def test_standardize_keeps_its_statistics_as_buffers_not_parameters():
    norm = Standardize(torch.zeros(D), torch.ones(D))
    assert list(norm.parameters()) == []
    assert set(norm.state_dict()) == {"mean", "std"}


def test_an_unknown_head_kind_lists_the_kinds():
    with pytest.raises(
        EmbedcacheError, match=r"^a trainable head is one of linear, mlp, logreg, got 'bogus'$"
    ):
        make_head("bogus", D, C)


def test_init_template_is_seeded_and_leaves_the_global_generator_alone():
    state = torch.get_rng_state()
    a = init_template("mlp", D, C, hidden=HIDDEN, dropout=0.0, seed=7)
    b = init_template("mlp", D, C, hidden=HIDDEN, dropout=0.0, seed=7)
    c = init_template("mlp", D, C, hidden=HIDDEN, dropout=0.0, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert not torch.equal(a[0].weight, c[0].weight)
