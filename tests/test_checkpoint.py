"""checkpoint.py: every loader refuses what it cannot trust in one line; saves are atomic."""

from __future__ import annotations

import collections
import errno
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, blobs
from PIL import Image

from embedcache.cache import write_cache
from embedcache.checkpoint import (
    FORMAT_VERSION,
    HEAD_FORMAT,
    MODEL_FORMAT,
    STATE_FORMAT,
    FinetuneState,
    HeadCheckpoint,
    ModelCheckpoint,
    Recorded,
    load_checkpoint,
    load_classifier_checkpoint,
    save_checkpoint,
)
from embedcache.errors import EmbedcacheError
from embedcache.models import load_classifier, load_model
from embedcache.train import load_head, train_head

STATE_CONFIG = {"unfreeze": "2", "epochs": 3}


class Payload:
    """An arbitrary class: pickling it records a reference to code in this module."""

    def __init__(self):
        self.value = 1


class SneakyDict(collections.OrderedDict):
    """An OrderedDict (which weights_only loads) subclass (which it must not)."""


def _head_checkpoint(folder: Path) -> Path:
    x, y = blobs(10, dim=8)
    xv, yv = blobs(5, dim=8, seed=1)
    cache = write_cache(
        folder / "blobs.h5",
        {"train": (x, y, [f"t{i}.png" for i in range(len(y))]), "val": (xv, yv, ["v"] * len(yv))},
        classes=["a", "b", "c"],
        backbone="resnet18",
        weights="none",
        transform='{"crop": 64}',
    )
    out = folder / "head.pt"
    train_head(cache, out=out, epochs=2, device="cpu", progress=False)
    return out


def _model_checkpoint(folder: Path) -> Path:
    from embedcache.backbones import build_backbone
    from embedcache.heads import Head, Standardize, init_template

    bb = build_backbone("resnet18", weights="none", image_size=SIZE)
    classifier = init_template("linear", bb.feature_dim, 2, hidden=0, dropout=0.0, seed=0)
    head = Head(Standardize(torch.zeros(bb.feature_dim), torch.ones(bb.feature_dim)), classifier)
    config = {"kind": "linear", "dim": bb.feature_dim, "num_classes": 2, "hidden": 512}
    ckpt = ModelCheckpoint(
        Recorded(bb.identity(), bb.weights_arg, bb.feature_dim),
        bb.net.state_dict(),
        {**config, "dropout": 0.0},
        head.state_dict(),
        ["cat", "dog"],
        len(bb.block_names) - 1,
        {"unfreeze": "1"},
    )
    return ckpt.save(folder / "model.pt")


def _state_checkpoint(folder: Path) -> Path:
    state = FinetuneState(
        config=dict(STATE_CONFIG),
        epoch=1,
        net_state_dict={"w": torch.ones(3)},
        head_state_dict={"classifier.weight": torch.zeros(2, 3)},
        optimizer={"state": {}, "param_groups": []},
        scheduler={"last_epoch": 1},
        scaler={},
        history={"epoch": [0, 1], "train_loss": [None, 0.5]},
        best={"epoch": 1, "acc": 0.5, "loss": 0.7},
    )
    return state.save(folder / "model.last.pt")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """One real checkpoint of each kind, built once (tests copy them before changing them)."""
    folder = tmp_path_factory.mktemp("checkpoints")
    return {
        "head": _head_checkpoint(folder),  # writes blobs.h5, the cache it is trained on
        "cache": folder / "blobs.h5",
        "model": _model_checkpoint(folder),
        "state": _state_checkpoint(folder),
    }


FORMATS = {"head": HEAD_FORMAT, "model": MODEL_FORMAT, "state": STATE_FORMAT}

# loader, the kinds it reads, what it calls itself in "is not an embedcache ... checkpoint".
LOADERS = {
    "HeadCheckpoint.load": (HeadCheckpoint.load, ("head",), "head"),
    "train.load_head": (load_head, ("head",), "head"),
    "ModelCheckpoint.load": (ModelCheckpoint.load, ("model",), "model"),
    "models.load_model": (load_model, ("head", "model"), "head or model"),
    "FinetuneState.load": (
        lambda p: FinetuneState.load(p, config=STATE_CONFIG),
        ("state",),
        "fine-tuning state",
    ),
    "load_classifier_checkpoint": (load_classifier_checkpoint, ("head", "model"), "head or model"),
    "models.load_classifier": (load_classifier, ("head", "model"), "head or model"),
}
loaders = pytest.mark.parametrize("loader", list(LOADERS))


def _refused(loader: str, path: Path, match: str) -> str:
    """Call ``loader`` on ``path``, expect a one-line EmbedcacheError matching ``match``."""
    with pytest.raises(EmbedcacheError, match=match) as e:
        LOADERS[loader][0](path)
    assert "\n" not in str(e.value)
    return str(e.value)


def _raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@loaders
def test_every_loader_reads_the_kinds_it_is_for(saved, loader):
    load, kinds, _ = LOADERS[loader]
    for kind in kinds:
        assert load(saved[kind]) is not None


@loaders
def test_a_checkpoint_of_another_kind_is_refused_naming_what_it_is_not(saved, loader):
    _, kinds, name = LOADERS[loader]
    wrong = "state" if "head" in kinds else "head"
    _refused(
        loader,
        saved[wrong],
        rf"is not an embedcache {name} checkpoint \(format '{FORMATS[wrong]}'\)$",
    )


@loaders
def test_a_truncated_checkpoint_is_refused_in_one_line(saved, tmp_path, loader):
    original = saved[LOADERS[loader][1][0]]
    cut = tmp_path / "cut.pt"
    data = original.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _refused(loader, cut, r"cut\.pt is not a readable checkpoint \(.*\); it may be truncated")


@loaders
@pytest.mark.parametrize("payload", [Payload, lambda: SneakyDict(a=1)], ids=["class", "subclass"])
def test_a_checkpoint_holding_python_objects_is_refused(tmp_path, loader, payload):
    kind = LOADERS[loader][1][0]
    path = tmp_path / "objects.pt"
    torch.save({"format": FORMATS[kind], "format_version": 1, "x": payload()}, path)
    _refused(
        loader, path, r"^refusing to load .*objects\.pt: it holds Python objects other than tensors"
    )


@loaders
def test_a_cache_or_an_image_given_as_a_checkpoint_says_what_it_is_and_where_it_goes(
    saved, tmp_path, loader
):
    """Issue 33: `evaluate cache.h5 head.pt` said the cache "may be truncated or damaged"."""
    name = LOADERS[loader][2]
    _refused(
        loader,
        saved["cache"],
        rf"blobs\.h5 is an embedcache cache, not a {name} checkpoint: pass it as DATA "
        r"\(embedcache evaluate MODEL DATA\)$",
    )
    image = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(image)
    _refused(
        loader,
        image,
        rf"photo\.png is an image, not a {name} checkpoint: pass it as IMAGES "
        r"\(embedcache predict MODEL IMAGES\)$",
    )


def test_load_model_loads_heads_and_models_as_classifiers(saved):
    from embedcache.models import Classifier

    head, model = load_model(saved["head"]), load_model(saved["model"])
    assert isinstance(head, Classifier) and isinstance(model, Classifier)
    assert (head.kind, head.classes) == ("head", ["a", "b", "c"])
    assert (model.kind, model.classes) == ("model", ["cat", "dog"])
    assert load_classifier is load_model  # the name it had before


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path):
    pwned = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(pwned)!r}, 'w').close()",))

    torch.save({"format": "embedcache.head", "config": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(
        EmbedcacheError,
        match=r"refusing to load .*evil\.pt: it holds Python objects other than tensors",
    ):
        load_head(tmp_path / "evil.pt")
    assert not pwned.exists()


@loaders
def test_a_checkpoint_of_a_newer_format_asks_to_upgrade(saved, tmp_path, loader):
    kind = LOADERS[loader][1][0]
    path = tmp_path / "newer.pt"
    save_checkpoint({**_raw(saved[kind]), "format_version": FORMAT_VERSION + 1}, path)
    _refused(
        loader,
        path,
        rf"newer\.pt has checkpoint format {FORMAT_VERSION + 1}, newer than this embedcache reads "
        rf"\({FORMAT_VERSION}\); upgrade embedcache$",
    )


@pytest.mark.parametrize(
    "loader, kind, key",
    [
        ("HeadCheckpoint.load", "head", "classes"),
        ("train.load_head", "head", "state_dict"),
        ("load_classifier_checkpoint", "head", "identity"),
        ("models.load_classifier", "head", "config"),
        ("ModelCheckpoint.load", "model", "start"),
        ("models.load_model", "model", "net_state_dict"),
        ("load_classifier_checkpoint", "model", "head_config"),
        ("FinetuneState.load", "state", "optimizer"),
    ],
)
def test_a_checkpoint_missing_a_key_is_refused_as_incomplete(saved, tmp_path, loader, kind, key):
    path = tmp_path / "partial.pt"
    obj = _raw(saved[kind])
    del obj[key]
    save_checkpoint(obj, path)
    name = {"head": "head", "model": "model", "state": "fine-tuning state"}[kind]
    _refused(loader, path, rf"partial\.pt is an incomplete {name} checkpoint \(missing {key}\)$")


@pytest.mark.parametrize("loader", ["HeadCheckpoint.load", "models.load_classifier"])
def test_a_head_checkpoint_whose_identity_lacks_a_field_is_refused_as_incomplete(
    saved, tmp_path, loader
):
    path = tmp_path / "partial.pt"
    obj = _raw(saved["head"])
    del obj["identity"]["weights"]
    save_checkpoint(obj, path)
    _refused(loader, path, r"partial\.pt is an incomplete head checkpoint")


def test_freshly_loaded_checkpoints_keep_what_was_saved(saved):
    head = HeadCheckpoint.load(saved["head"])
    assert head.classes == ["a", "b", "c"] and head.config["dim"] == 8
    assert head.recorded.identity.backbone == "resnet18" and head.recorded.dtype == "float16"
    model = ModelCheckpoint.load(saved["model"])
    assert model.classes == ["cat", "dog"] and model.config == {"unfreeze": "1"}
    state = FinetuneState.load(saved["state"], config=STATE_CONFIG)
    assert state.epoch == 1 and state.history["train_loss"] == [None, 0.5]
    assert torch.equal(state.net_state_dict["w"], torch.ones(3)) and state.best_val is None


@pytest.mark.parametrize("kind", ["head", "model"])
def test_the_temperature_round_trips_and_a_checkpoint_saved_without_one_loads_with_one(
    saved, tmp_path, kind
):
    ckpt = _reloaded(kind, saved[kind])
    ckpt.temperature = 1.75
    ckpt.save(tmp_path / "t.pt")
    assert _reloaded(kind, tmp_path / "t.pt").temperature == 1.75
    assert load_model(tmp_path / "t.pt").temperature == 1.75
    obj = _raw(tmp_path / "t.pt")
    obj.pop("temperature"), obj.pop("sha256")
    save_checkpoint(obj, tmp_path / "old.pt")  # as written before temperatures were fitted
    assert _reloaded(kind, tmp_path / "old.pt").temperature == 1.0


# ---------------------------------------------------------------------------
# Saving


def _reloaded(kind: str, path: Path):
    if kind == "head":
        return HeadCheckpoint.load(path)
    if kind == "model":
        return ModelCheckpoint.load(path)
    return FinetuneState.load(path, config=STATE_CONFIG)


@pytest.mark.parametrize("kind", ["head", "model", "state"])
def test_save_leaves_only_the_checkpoint_behind(saved, tmp_path, kind):
    ckpt = _reloaded(kind, saved[kind])
    out = tmp_path / "sub" / "c.pt"
    assert ckpt.save(out) == out
    assert [p.name for p in out.parent.iterdir()] == ["c.pt"]
    assert _raw(out)["format"] == FORMATS[kind]


@pytest.mark.parametrize("kind", ["head", "model", "state"])
def test_a_failed_write_keeps_the_previous_file_intact(saved, tmp_path, monkeypatch, kind):
    out = tmp_path / "c.pt"
    shutil.copy(saved[kind], out)
    before = out.read_bytes()
    ckpt = _reloaded(kind, out)

    def disk_full(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        EmbedcacheError,
        match=r"^cannot write .*c\.pt \(no space left on the device\); "
        r"free some space or choose a writable location$",
    ):
        ckpt.save(out)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize(
    "obj, where",
    [
        ({"x": Payload()}, r"checkpoint\['x'\] holds a Payload"),
        ({"a": [1, {"b": Path("x")}]}, r"checkpoint\['a'\]\[1\]\['b'\] holds a PosixPath"),
        ({"a": np.zeros(2)}, r"checkpoint\['a'\] holds a ndarray"),
    ],
)
def test_save_checkpoint_refuses_objects_other_than_tensors_and_plain_values(tmp_path, obj, where):
    with pytest.raises(TypeError, match=where + "; checkpoints hold tensors and plain containers"):
        save_checkpoint({"format": HEAD_FORMAT, **obj}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_checkpoint_refuses_keys_other_than_str_and_int(tmp_path):
    with pytest.raises(TypeError, match=r"checkpoint\['a'\]: key \(1, 2\) is not a str or int"):
        save_checkpoint({"a": {(1, 2): 0}}, tmp_path / "c.pt")
    assert list(tmp_path.iterdir()) == []


# numpy scalars (np.float64 is a float, np.str_ a str) and dict subclasses are pickled as their own
# class, which weights_only loading refuses: save must refuse them, not write an unloadable file.
@pytest.mark.parametrize(
    "value",
    [np.float64(0.5), np.str_("a"), collections.defaultdict(int, a=1)],
    ids=["np.float64", "np.str_", "defaultdict"],
)
def test_what_save_checkpoint_accepts_loads_back(tmp_path, value):
    path = tmp_path / "c.pt"
    try:
        save_checkpoint({"format": HEAD_FORMAT, "metrics": {"x": value}}, path)
    except TypeError:
        return  # refusing it at save time is fine too
    obj = load_checkpoint(path, kind=HEAD_FORMAT)
    assert obj["metrics"]["x"] == value


def test_a_state_saved_before_multi_label_resumes_a_run_with_one_label_only(saved):
    # STATE_CONFIG, as an older finetune saved it, has no multi_label setting
    loaded = FinetuneState.load(saved["state"], config={**STATE_CONFIG, "multi_label": False})
    assert loaded.epoch == 1
    with pytest.raises(EmbedcacheError, match=r"other settings \(multi_label False vs True\)"):
        FinetuneState.load(saved["state"], config={**STATE_CONFIG, "multi_label": True})


def test_a_multi_label_model_keeps_a_threshold_per_class_and_needs_them(saved, tmp_path):
    one = ModelCheckpoint.load(saved["model"])
    assert one.thresholds is None and not one.multi_label  # an older model loads unchanged
    one.head_config = {**one.head_config, "multi_label": True}
    one.thresholds = [0.25, 0.75]
    multi = ModelCheckpoint.load(one.save(tmp_path / "multi.pt"))
    assert multi.multi_label and multi.thresholds == [0.25, 0.75]
    assert load_classifier(tmp_path / "multi.pt").thresholds.tolist() == [0.25, 0.75]
    one.thresholds = None
    one.save(tmp_path / "bare.pt")
    with pytest.raises(EmbedcacheError, match="multi-label model without 2 thresholds in"):
        ModelCheckpoint.load(tmp_path / "bare.pt")
