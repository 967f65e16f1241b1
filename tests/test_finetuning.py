from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, make_tree

from embedcache import evaluate, extract, finetune, load_model, open_cache, predict, train_head
from embedcache.backbones import Normalise, build_backbone
from embedcache.checkpoint import HeadCheckpoint
from embedcache.data import preprocess
from embedcache.errors import EmbedcacheError
from embedcache.finetuning.setup import _fresh_head, _reattach, freeze
from embedcache.models import FinetunedModel

FT = {
    "backbone": "resnet18",
    "weights": "none",
    "image_size": SIZE,
    "batch_size": 8,
    "num_workers": 0,
    "device": "cpu",
    "progress": False,
}

# Where the backbone is incidental: a tiny random-init one makes each epoch cheap.
TINY = {**FT, "backbone": "timm:test_efficientnet"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """2 classes x 8 images in train and val, made once: no test writes into it."""
    return make_tree(tmp_path_factory.mktemp("finetune") / "d", per_class=8)


@pytest.fixture(scope="module")
def head(data):
    """A resnet18 head trained on a cache of ``data`` (next to it: c.h5), made once: read only."""
    kw = {**FT, "batch_size": 4, "precision": "fp32"}  # what the live model computes, on every CPU
    extract(data, out=data.parent / "c.h5", **kw)
    train_head(
        data.parent / "c.h5", out=data.parent / "head.pt", epochs=30, device="cpu", progress=False
    )
    return data.parent / "head.pt"


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "bn_stats, augment, prefix, backbone",
    [(False, "none", "memory", "resnet18"), (True, "light", "off", "timm:test_efficientnet")],
)  # both providers; the run without a prefix cache (every epoch the whole net) on the tiny one
def test_frozen_weights_and_statistics_never_move_unfrozen_weights_do(
    data, tmp_path, bn_stats, augment, prefix, backbone
):
    net = build_backbone(backbone, weights="none", image_size=SIZE).net
    before, n_blocks = _snapshot(net), len(net.blocks)
    r = finetune(
        data,
        out=tmp_path / "m.pt",
        unfreeze=2,
        epochs=2,
        lr=1e-2,
        augment=augment,
        views=0,
        prefix_cache=prefix,
        bn_stats=bn_stats,
        patience=5,
        **{**FT, "backbone": backbone},
    )
    assert r.metrics["prefix_cache"]["where"] == prefix
    after = torch.load(tmp_path / "m.last.pt", weights_only=True)["net_state_dict"]
    assert n_blocks == {"resnet18": 5, "timm:test_efficientnet": 7}[backbone]
    frozen = [f"blocks.{i}." for i in range(n_blocks - 2)]  # resnet18: stem, layer1, layer2
    for k, v in before.items():
        if any(k.startswith(f) for f in frozen):
            assert torch.equal(after[k], v), f"frozen {k} moved"
        elif "running" in k or "num_batches" in k:
            assert torch.equal(after[k], v) != bn_stats, f"unfrozen statistic {k}"
        else:
            assert not torch.equal(after[k], v), f"trainable {k} did not change"


def test_a_step_on_the_prefix_cache_equals_a_step_on_the_full_model():
    torch.manual_seed(0)
    bb = build_backbone("resnet18", weights="none", image_size=SIZE)
    head, _ = _fresh_head(bb, ["a", "b"], seed=0)
    model = FinetunedModel(bb.net, head, 3, bb.transform)
    freeze(model)
    model.train()
    x = torch.randn(4, 3, SIZE, SIZE)
    y = torch.tensor([0, 1, 1, 0])

    def step(logits):
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        return loss.item(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad
        }

    full_loss, full_grads = step(model(x))
    with torch.no_grad():
        prefix = model.prefix(x)
    exact_loss, exact_grads = step(model.tail(prefix))  # the same arithmetic, split in two
    cached_loss, cached_grads = step(
        model.tail(prefix.half().float())
    )  # what the cache stores: float16
    assert exact_loss == pytest.approx(full_loss, rel=1e-6)
    assert cached_loss == pytest.approx(full_loss, rel=1e-3)
    assert set(full_grads) == set(cached_grads) == set(exact_grads) and len(full_grads) > 10
    for n, g in full_grads.items():
        torch.testing.assert_close(exact_grads[n], g, rtol=1e-4, atol=1e-6)
    # float16 activations (11-bit mantissa) move a few ReLU decisions: the same direction, a small
    # error. Measured (AMD EPYC): all gradients together 2.4% off, the worst tensor (layer4's last
    # bn2.bias, 512 values) 5.9% off at cosine 0.998; a wrong cache would be off by ~100%.
    full = torch.cat([g.flatten() for g in full_grads.values()])
    cached = torch.cat([cached_grads[n].flatten() for n in full_grads])
    assert torch.nn.functional.cosine_similarity(cached, full, dim=0) > 0.999
    assert (cached - full).norm() <= 0.05 * full.norm()
    for n, g in full_grads.items():
        c = cached_grads[n].flatten()
        assert torch.nn.functional.cosine_similarity(c, g.flatten(), dim=0) > 0.99, n
        assert (c - g.flatten()).norm() <= 0.15 * g.norm() + 1e-6, n


def test_the_reattached_head_predicts_as_it_did_on_the_cache(data, head, tmp_path):
    from embedcache.config import FinetuneConfig
    from embedcache.data import scan
    from embedcache.train import load_head

    bb = build_backbone("resnet18", weights="none", image_size=SIZE)
    reattached, _, note = _reattach(
        HeadCheckpoint.load(head), bb, scan(data), FinetuneConfig(), False
    )
    assert note is None  # trained on train, chosen on val, not refit: taken as saved
    model = FinetunedModel(bb.net, reattached, 3, bb.transform).eval()
    with open_cache(head.parent / "c.h5") as c:
        val = c["val"]
    x = torch.stack([torch.from_numpy(preprocess(data / p, bb.transform)) for p in val.paths])
    cached_head, ckpt = load_head(head)
    with torch.no_grad():
        live = model(Normalise(bb.transform)(x))
        on_cache = cached_head(torch.from_numpy(val.features.astype(np.float32)))
    assert torch.equal(live.argmax(1), on_cache.argmax(1))
    torch.testing.assert_close(
        live, on_cache, rtol=1e-2, atol=1e-2
    )  # the cache holds float16 features
    r = finetune(
        data,
        out=tmp_path / "m.pt",
        head=head,
        unfreeze=1,
        epochs=1,
        augment="none",
        views=0,
        **{**FT, "backbone": None, "weights": None, "image_size": None},
    )
    assert r.metrics["head_val_acc_before"] == pytest.approx(ckpt.metrics["val_acc"])


def test_model_checkpoint_loads_as_a_module_and_in_evaluate_and_predict(data, head, tmp_path):
    r = finetune(
        data,
        out=tmp_path / "m.pt",
        head=head,
        unfreeze=2,
        epochs=2,
        **{**FT, "backbone": None, "weights": None, "image_size": None},
    )
    model = load_model(tmp_path / "m.pt").module()  # the nn.Module behind the classifier
    assert isinstance(model, torch.nn.Module) and not model.training
    x = torch.stack(
        [
            torch.from_numpy(preprocess(p, model.transform))
            for p in sorted((data / "val" / "dog").glob("*.png"))
        ]
    )
    with torch.no_grad():
        logits = model(Normalise(model.transform)(x))
    assert logits.shape == (8, 2)
    ev = evaluate(tmp_path / "m.pt", data, split="val", device="cpu", num_workers=0, progress=False)
    assert ev["accuracy"] == pytest.approx(r.metrics["best_val_acc"], abs=1e-6)
    rows = predict(
        tmp_path / "m.pt", [data / "val" / "dog" / "dog_000.png"], device="cpu", num_workers=0
    )
    assert rows[0]["predictions"][0]["class"] in ("cat", "dog")
    with pytest.raises(
        EmbedcacheError, match="is a fine-tuned model, whose features differ from any cache"
    ):
        evaluate(tmp_path / "m.pt", head.parent / "c.h5", split="val")


def _progress(last):
    try:
        return int(torch.load(last, weights_only=True)["epoch"])
    except Exception:  # noqa: BLE001 - not written yet
        return 0


ENTRY = Path(__file__).with_name("dist_entry.py")


def _cli(args: list[str], **env) -> subprocess.CompletedProcess:
    """The CLI in a subprocess; tests/dist_entry.py stops it after a fine-tuning state is saved."""
    full = {**os.environ, "RANK": "0", "EMBEDCACHE_TEST_FAIL_RANK": "0", **env}
    return subprocess.run(
        [sys.executable, str(ENTRY), *args], env=full, capture_output=True, text=True, timeout=120
    )


def test_resume_after_a_signal_or_a_kill_continues_with_the_same_metrics(data, tmp_path):
    """One chain of runs: SIGTERM after epoch 1 (the CLI says to resume with --resume), a
    resumed run SIGKILLed after epoch 2, a second resume to the end: the metrics of every epoch
    are those of a run never interrupted. A tiny backbone: resuming does not depend on its size.
    (This also covers what tests/test_signals.py checks for extract, for finetune.)"""
    import json

    kw = {
        **FT,
        "backbone": "timm:test_efficientnet",
        "batch_size": 4,
        "epochs": 4,
        "patience": 9,
        "augment": "light",
        "views": 2,
    }
    straight = finetune(data, out=tmp_path / "a.pt", **kw)
    out, last = tmp_path / "b.pt", tmp_path / "b.last.pt"
    args = [
        "finetune",
        str(data),
        "--out",
        str(out),
        "-b",
        kw["backbone"],
        "-w",
        "none",
        "--image-size",
        str(SIZE),
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--epochs",
        "4",
        "--patience",
        "9",
        "--augment",
        "light",
        "--views",
        "2",
        "--json",
    ]
    stop = {"EMBEDCACHE_TEST_FAIL_HOW": "kill-after-epoch", "EMBEDCACHE_TEST_FAIL_AFTER": "1"}
    r = _cli(args, **stop, EMBEDCACHE_TEST_FAIL_SIGNAL="SIGTERM")
    assert r.returncode == 128 + signal.SIGTERM
    assert (
        r.stderr.strip().splitlines()[-1]
        == "stopped by SIGTERM; re-run the same command with --resume to continue from OUT.last.pt"
    )
    assert last.exists() and _progress(last) == 1
    killed = _cli([*args, "--resume"], **stop)  # SIGKILL once the resumed run saved epoch 2
    assert killed.returncode == -signal.SIGKILL
    assert 2 <= _progress(last) < 4, "the kill came too late to test a resume"
    resumed = _cli([*args, "--resume"], EMBEDCACHE_TEST_FAIL_HOW="none")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = straight.metrics["history"], json.loads(resumed.stdout)["history"]
    assert a["epoch"] == b["epoch"] == [0, 1, 2, 3, 4]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert b[key][1:] == pytest.approx(a[key][1:], rel=1e-5), key


def test_finetune_errors(data, head, tmp_path, make_cache):
    base = {**FT, "epochs": 1}
    with pytest.raises(
        EmbedcacheError, match=r"--unfreeze must be between 0 and 5 for resnet18 \(or all\), got 7"
    ):
        finetune(data, out=tmp_path / "m.pt", unfreeze=7, **base)
    with pytest.raises(
        EmbedcacheError,
        match=r"was trained on other features than this backbone gives "
        r"\(backbone resnet18 vs timm:test_efficientnet; .*head vs backbone\); pass --backbone",
    ):
        finetune(
            data, out=tmp_path / "m.pt", head=head, **{**base, "backbone": "timm:test_efficientnet"}
        )
    other = make_tree(tmp_path / "o", classes=("cat", "cow"), per_class=2)
    with pytest.raises(
        EmbedcacheError, match=r"was trained on classes cat, dog but the data has cat, cow"
    ):
        finetune(
            other,
            out=tmp_path / "m.pt",
            head=head,
            **{**base, "backbone": None, "weights": None, "image_size": None},
        )
    with pytest.raises(
        EmbedcacheError,
        match=r"--prefix-cache memory is not possible: "
        r"augmentation changes the input every epoch; pass --views V",
    ):
        finetune(
            data,
            out=tmp_path / "m.pt",
            augment="light",
            views=0,
            prefix_cache="memory",
            **base,
        )
    tiny = {**base, "backbone": TINY["backbone"]}  # a run to resume: any backbone will do
    finetune(data, out=tmp_path / "r.pt", unfreeze=1, **tiny)
    with pytest.raises(
        EmbedcacheError, match=r"r\.last\.pt is from a run with other settings \(unfreeze 1 vs 2\)"
    ):
        finetune(data, out=tmp_path / "r.pt", unfreeze=2, resume=True, **tiny)
    with pytest.raises(EmbedcacheError, match=r"--resume found no .*nope\.last\.pt"):
        finetune(data, out=tmp_path / "nope.pt", resume=True, **base)


def test_no_augmentation_runs_the_prefix_once_per_image_whatever_views_says(data, tmp_path):
    r = finetune(
        data,
        out=tmp_path / "m.pt",
        unfreeze=2,
        epochs=1,
        augment="none",
        views=4,
        prefix_cache="memory",
        **TINY,
    )
    pc = r.metrics["prefix_cache"]
    n_images = 2 * 8 * 2  # train + val, two classes of 8
    assert pc["bytes"] == n_images * int(np.prod(pc["shape"])) * 2  # float16, one view
    assert r.metrics["config"]["views"] == 0


def test_speedup_estimate_charges_one_prefix_pass_per_epoch():
    from embedcache.finetuning import _speedup
    from embedcache.finetuning.prefix import PrefixCache

    # 100 train images in 4 views + 50 val: 450 prefix passes in 9 s, 0.02 s each;
    # without the cache an epoch runs 150 of them (3 s) on top of its 1 s of tail.
    prefix = PrefixCache(views=[None] * 4, val=None, bytes=0, where="memory", seconds=9.0)
    assert _speedup(prefix, [1.0, 1.0], n_train=100, n_val=50) == pytest.approx(4.0)
    assert _speedup(None, [1.0], n_train=100, n_val=50) is None


def test_prefix_cache_on_disk_trains_like_in_memory_and_is_removed_after(data, tmp_path):
    kw = {**TINY, "unfreeze": 2, "epochs": 2, "augment": "none", "lr": 1e-2}
    memory = finetune(data, out=tmp_path / "mem.pt", prefix_cache="memory", **kw)
    disk = finetune(data, out=tmp_path / "disk.pt", prefix_cache="disk", **kw)
    assert disk.metrics["prefix_cache"]["where"] == "disk"
    assert disk.metrics["prefix_cache"]["bytes"] == memory.metrics["prefix_cache"]["bytes"]
    for key in ("train_loss", "val_loss", "val_acc"):
        assert disk.metrics["history"][key][1:] == pytest.approx(
            memory.metrics["history"][key][1:], rel=1e-5
        ), key
    assert not (tmp_path / "disk.prefix.h5").exists()


def test_auto_prefix_cache_goes_to_disk_past_max_memory(data, tmp_path):
    r = finetune(
        data, out=tmp_path / "m.pt", unfreeze=2, epochs=1, augment="none", max_memory=1000, **TINY
    )
    assert r.metrics["prefix_cache"]["where"] == "disk"


def test_precision_fp32_and_bf16_run_on_cpu_and_unknown_ones_are_refused(data, tmp_path):
    r = finetune(data, out=tmp_path / "m.pt", epochs=1, augment="none", precision="fp32", **TINY)
    assert r.metrics["config"]["precision"] == "fp32"
    b = finetune(data, out=tmp_path / "b.pt", epochs=1, augment="none", precision="bf16", **TINY)
    assert b.metrics["config"]["precision"] == "bf16"
    assert (
        b.metrics["history"]["train_loss"][1] != r.metrics["history"]["train_loss"][1]
    )  # bf16 ran
    with pytest.raises(EmbedcacheError, match="--precision must be one of auto, fp32, bf16, fp16"):
        finetune(data, out=tmp_path / "x.pt", epochs=1, precision="int8", **TINY)


def test_finetune_writes_metrics_curves_confusion_and_report_of_the_best_epoch(data, tmp_path):
    import json

    from PIL import Image

    r = finetune(data, out=tmp_path / "m.pt", unfreeze=1, epochs=2, augment="none", **TINY)
    names = {k: p.name for k, p in r.files.items()}
    assert names == {
        "model": "m.pt",
        "last": "m.last.pt",
        "metrics": "m.metrics.json",
        "report": "m.report.txt",
        "confusion": "m.confusion.png",
        "curves": "m.curves.png",
    }
    metrics = json.loads((tmp_path / "m.metrics.json").read_text())
    confusion = np.array(metrics["confusion"])
    assert confusion.sum() == 16  # the val images, 8 per class
    assert np.trace(confusion) / confusion.sum() == pytest.approx(r.metrics["best_val_acc"])
    assert "cat" in (tmp_path / "m.report.txt").read_text()
    for png in ("m.confusion.png", "m.curves.png"):
        assert Image.open(tmp_path / png).size[0] > 100


def test_finetune_fits_its_own_temperature_on_validation_and_saves_it(data, tmp_path):
    from embedcache.calibration import fit_temperature
    from embedcache.checkpoint import ModelCheckpoint
    from embedcache.forward import image_features
    from embedcache.runtime import Run

    r = finetune(data, out=tmp_path / "m.pt", unfreeze=1, epochs=2, augment="none", **TINY)
    cal, clf = r.metrics["calibration"], load_model(tmp_path / "m.pt")
    assert clf.temperature == ModelCheckpoint.load(tmp_path / "m.pt").temperature
    assert clf.temperature == cal["temperature"] != 1.0
    assert cal["val_ece_after"] <= cal["val_ece_before"]
    cpu = torch.device("cpu")
    files = sorted((data / "val").rglob("*.png"))
    feats, ok, _ = image_features(clf.backbone(cpu), files, Run(cpu, 4, 0))
    labels = np.array([clf.classes.index(files[i].parent.name) for i in ok])
    # the kept epoch's validation logits (through a float16 prefix cache) against these
    assert fit_temperature(clf.logits(feats), labels) == pytest.approx(clf.temperature, rel=0.05)


def test_resumed_run_still_reports_the_kept_epoch(data, tmp_path):
    kw = {**TINY, "unfreeze": 1, "augment": "none", "patience": 9}
    finetune(data, out=tmp_path / "m.pt", epochs=1, **kw)
    (tmp_path / "m.confusion.png").unlink()
    r = finetune(data, out=tmp_path / "m.pt", epochs=1, resume=True, **kw)  # nothing left to run
    assert r.metrics["epochs_run"] == 1 and (tmp_path / "m.confusion.png").exists()


def test_train_and_test_folders_without_val_fine_tune_on_the_heads_validation_images(
    tmp_path, extract_kw
):
    from embedcache.config import FinetuneConfig
    from embedcache.data import holdout
    from embedcache.finetuning.setup import _labelled

    data = make_tree(tmp_path / "d", splits=("train", "test"), per_class=10)
    extract(data, out=tmp_path / "c.h5", **{**extract_kw, "backbone": TINY["backbone"]})
    h = train_head(
        tmp_path / "c.h5", out=tmp_path / "head.pt", epochs=20, device="cpu", progress=False
    )
    assert h.metrics["val_source"].startswith("no val split: held out 4 of 20 train images")
    with open_cache(tmp_path / "c.h5") as c:
        paths, labels = c.paths("train"), c.labels("train")
    head_val = {paths[i] for i in holdout(paths, labels, fraction=0.2, seed=0)[1]}
    images, _, _ = _labelled(data, FinetuneConfig())
    assert {s.path for s in images.splits["val"]} == head_val
    assert not head_val & {s.path for s in images.splits["train"]}  # no leak into fine-tuning
    kw = {**FT, "backbone": None, "weights": None, "image_size": None}
    assert h.metrics["refit"]["images"] == 20  # the default refits on the held-out images
    r = finetune(
        data,
        out=tmp_path / "m.pt",
        head=tmp_path / "head.pt",
        unfreeze=1,
        epochs=1,
        augment="none",
        **kw,
    )
    # the head as chosen before its refit, which never saw finetune's validation images
    assert r.metrics["val_source"].startswith(h.metrics["val_source"])
    assert "as chosen before its refit" in r.metrics["val_source"]
    assert r.metrics["head_val_acc_before"] == pytest.approx(h.metrics["val_acc"])
    with pytest.raises(EmbedcacheError, match="trained on part of finetune's validation images"):
        finetune(data, out=tmp_path / "m2.pt", head=tmp_path / "head.pt", val_fraction=0.3, **kw)
    with pytest.raises(EmbedcacheError, match="was trained on these images"):
        evaluate(tmp_path / "m.pt", data, split="train", device="cpu", progress=False)
    ev = evaluate(
        tmp_path / "m.pt", data, split="test", device="cpu", num_workers=0, progress=False
    )
    assert ev["images"] == 20


def test_finetune_leaves_the_callers_random_state_alone(data, tmp_path):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    finetune(data, out=tmp_path / "m.pt", unfreeze=1, epochs=1, augment="none", **TINY)
    assert torch.equal(torch.get_rng_state(), before)


def test_the_plan_comes_first_and_its_estimate_from_one_timed_batch(data, tmp_path, monkeypatch):
    """Issue 33: 479 s of prefix cache began with no word of it. The plan names the passes and
    their images, then an estimate made of measured seconds per image (fixed here)."""
    from embedcache.finetuning import estimate

    timed = []

    def measure(model, items, decode, run):
        timed.append(len(items))
        return estimate.Costs(decode=0.0, prefix=1.0, tail_eval=0.1, tail_train=0.3)

    monkeypatch.setattr(estimate, "measure", measure)
    lines: list[str] = []
    kw = {**TINY, "num_workers": 0, "augment": "light", "views": 2, "epochs": 2, "unfreeze": 2}
    r = finetune(data, out=tmp_path / "m.pt", log=lines.append, **kw)
    assert timed == [8]  # one batch of --batch-size training images
    plan = lines.index(r.plan[0])
    assert r.plan == lines[plan : plan + 2] and plan < min(
        i for i, line in enumerate(lines) if line.startswith(("prefix cache", "epoch"))
    )
    assert r.plan[0] == (
        "plan: the frozen prefix once over 2 augmented views of 16 train and 16 val images, "
        "then up to 2 epochs of the trainable tail on its cached output"
    )
    # prefix: (16 x 2 views + 16) x 1 s; epoch 0: 16 x 0.1 s; each epoch 16 x 0.3 + 16 x 0.1 s
    assert r.plan[1] == (
        "estimate: about 62 s (48 s for the prefix cache, 6 s per epoch; from one timed batch)"
    )
    assert r.metrics["plan"] == {"lines": r.plan, "estimated_s": pytest.approx(62.4)}


def test_views_are_cut_to_the_epochs_that_can_draw_them_and_train_the_same(data, tmp_path):
    """Epoch e trains on view (e - 1) mod V: with 2 epochs views 3 and 4 were built for nothing."""
    lines: list[str] = []
    kw = {**TINY, "augment": "light", "epochs": 2, "unfreeze": 2, "lr": 1e-2}
    four = finetune(data, out=tmp_path / "a.pt", views=4, log=lines.append, **kw)
    two = finetune(data, out=tmp_path / "b.pt", views=2, **kw)
    pc = four.metrics["prefix_cache"]
    assert pc["bytes"] == (16 * 2 + 16) * int(np.prod(pc["shape"])) * 2  # 2 views, not 4
    assert pc["views"] == 2
    assert "--views 4 cut to 2: each epoch trains on one view, so 2 epochs use at most 2" in lines
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert four.metrics["history"][key] == two.metrics["history"][key], key


def test_one_bar_with_an_eta_over_prefix_cache_and_epochs_and_none_without_progress(
    data, tmp_path, capsys
):
    kw = {**TINY, "augment": "light", "views": 2, "epochs": 2, "unfreeze": 2}
    finetune(data, out=tmp_path / "m.pt", **{**kw, "progress": True})
    err = capsys.readouterr().err
    assert "prefix train" not in err and "epoch 1/2" not in err  # the bars of each phase are gone
    final = err.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("finetune 100%|") and "<00:00, epoch 2 of 2" in final
    finetune(data, out=tmp_path / "q.pt", **kw)  # progress=False
    assert capsys.readouterr().err == ""
