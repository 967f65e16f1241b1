"""--log-dir: TensorBoard event files of train-head and finetune, read back with TensorBoard's own
reader."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import SIZE, make_tree

from embedcache import finetune, train_head
from embedcache.errors import EmbedcacheError
from embedcache.tblog import INSTALL, number, run_name, sub_log_dir

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

LINEAR = {"head": "linear", "device": "cpu", "progress": False}
TINY = {
    "backbone": "timm:test_efficientnet",
    "weights": "none",
    "image_size": SIZE,
    "batch_size": 8,
    "num_workers": 0,
    "device": "cpu",
    "progress": False,
}
TAGS = {"train_loss": "loss/train", "val_loss": "loss/val"}
TAGS |= {"train_acc": "accuracy/train", "val_acc": "accuracy/val"}


def _runs(log_dir: Path) -> list[str]:
    return sorted(p.name for p in log_dir.iterdir())


def _read(run: Path) -> EventAccumulator:
    events = EventAccumulator(str(run))
    events.Reload()
    return events


def _scalars(events: EventAccumulator, tag: str) -> tuple[list[int], list[float]]:
    found = events.Scalars(tag)
    return [e.step for e in found], [e.value for e in found]


def _settings(events: EventAccumulator) -> str:
    return events.Tensors("settings/text_summary")[0].tensor_proto.string_val[0].decode()


def _events(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("tblog") / "d", per_class=4)


def test_a_linear_head_logs_every_epoch_of_its_history_and_its_settings(blob_cache, tmp_path):
    logs = tmp_path / "logs"
    r = train_head(blob_cache, out=tmp_path / "head.pt", epochs=6, log_dir=logs, **LINEAR)
    assert _runs(logs) == ["head-linear"]
    events = _read(logs / "head-linear")
    epochs = list(range(1, r.metrics["epochs_run"] + 1))
    for key, tag in TAGS.items():
        steps, values = _scalars(events, tag)
        assert steps == epochs, tag
        assert values == pytest.approx(r.metrics["history"][key], abs=1e-6), tag
    text = _settings(events)
    assert "| head | linear |" in text and "| epochs | 6 |" in text and "| lr | 0.001 |" in text
    assert f"| cache | {blob_cache} |" in text
    hparams = events.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams and "_hparams_/session_end_info" in hparams


def test_the_default_head_logs_both_candidates(blob_cache, tmp_path):
    logs = tmp_path / "logs"
    r = train_head(blob_cache, epochs=5, log_dir=logs, device="cpu", progress=False)
    assert _runs(logs) == ["head-auto-mlp", "head-auto-probe"]  # no --out: named head
    auto = r.metrics["auto"]
    steps, values = _scalars(_read(logs / "head-auto-mlp"), "accuracy/val")
    assert values == pytest.approx(auto["mlp"]["history"]["val_acc"], abs=1e-6)
    probe = _read(logs / "head-auto-probe")
    path = sorted(auto["linear"]["path"], key=lambda row: -row["lam"])  # as fitted: strongest first
    steps, values = _scalars(probe, "loss/val")
    assert steps == list(range(len(path)))
    assert values == pytest.approx([row["val_loss"] for row in path], rel=1e-6)
    assert _scalars(probe, "l2_strength")[1] == pytest.approx([row["lam"] for row in path])
    assert "| head | probe |" in _settings(probe)


def test_a_sweep_logs_one_run_per_configuration_and_resume_continues_its_steps(
    blob_cache, tmp_path
):
    logs, kw = tmp_path / "logs", {**LINEAR, "lr": [1e-3, 1e-2], "weight_decay": [0.0]}
    kw["patience"] = 50
    train_head(blob_cache, out=tmp_path / "h.pt", epochs=2, log_dir=logs, **kw)
    r = train_head(blob_cache, out=tmp_path / "h.pt", epochs=4, resume=True, log_dir=logs, **kw)
    assert _runs(logs) == ["h-linear-lr1e-2-wd0", "h-linear-lr1e-3-wd0"]
    kept = logs / f"h-linear-lr{number(r.metrics['best']['lr'])}-wd0"
    assert len(_events(kept)) == 2  # the resumed run added a file beside the first one's
    steps, values = _scalars(_read(kept), "accuracy/val")
    assert steps == [1, 2, 3, 4]
    assert values == pytest.approx(r.metrics["history"]["val_acc"], abs=1e-6)
    assert "| lr | 0.01 |" in _settings(_read(logs / "h-linear-lr1e-2-wd0"))


def test_finetune_logs_every_epoch_from_the_reattached_head_on(data, tmp_path):
    logs = tmp_path / "logs"
    r = finetune(
        data, out=tmp_path / "model.pt", unfreeze=1, epochs=2, augment="none", log_dir=logs, **TINY
    )
    assert _runs(logs) == ["model-unfreeze1"]
    events, h = _read(logs / "model-unfreeze1"), r.metrics["history"]
    for key, tag in TAGS.items():
        kept = [(e, v) for e, v in zip(h["epoch"], h[key], strict=True) if v is not None]
        steps, values = _scalars(events, tag)
        assert steps == [e for e, _ in kept], tag  # epoch 0 has no training loss
        assert values == pytest.approx([v for _, v in kept], abs=1e-6), tag
    text = _settings(events)
    assert "| verb | finetune |" in text and "| unfreeze | 1 |" in text
    assert "log_dir" not in r.metrics["config"]  # --resume may change it


def test_without_log_dir_nothing_is_imported_or_written(blob_cache, tmp_path, monkeypatch):
    import embedcache.tblog as tblog

    def refuse():
        raise AssertionError("SummaryWriter asked for without --log-dir")

    monkeypatch.setattr(tblog, "_summary_writer", refuse)
    train_head(blob_cache, out=tmp_path / "head.pt", epochs=2, **LINEAR)
    train_head(blob_cache, out=tmp_path / "auto.pt", epochs=2, device="cpu", progress=False)
    assert _events(tmp_path) == []


def test_missing_tensorboard_is_one_line_before_any_work(blob_cache, data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(EmbedcacheError) as e:
        train_head(blob_cache, out=tmp_path / "h.pt", log_dir=tmp_path / "logs", **LINEAR)
    assert str(e.value) == INSTALL and "\n" not in str(e.value)
    with pytest.raises(EmbedcacheError, match="pip install 'embedcache\\[tensorboard\\]'"):
        finetune(data, out=tmp_path / "m.pt", log_dir=tmp_path / "logs", **TINY)
    assert [p.name for p in tmp_path.iterdir()] == ["blobs.h5"]  # no head, model or log dir


def test_a_user_file_is_never_a_log_dir_or_a_run(blob_cache, data, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(EmbedcacheError, match=r"--log-dir .*notes.txt is a file; pass a folder"):
        train_head(blob_cache, out=tmp_path / "h.pt", log_dir=notes, **LINEAR)
    with pytest.raises(EmbedcacheError, match="is a file; pass a folder"):
        finetune(data, out=tmp_path / "m.pt", log_dir=notes, **TINY)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "h-linear").write_text("mine too")
    with pytest.raises(EmbedcacheError, match="holds a file h-linear where the run h-linear goes"):
        train_head(blob_cache, out=tmp_path / "h.pt", log_dir=logs, **LINEAR)
    assert notes.read_text() == "mine" and (logs / "h-linear").read_text() == "mine too"


def test_the_cli_takes_log_dir(blob_cache, tmp_path):
    from click.testing import CliRunner

    from embedcache.cli import main

    logs = tmp_path / "logs"
    args = ["train-head", str(blob_cache), "--out", str(tmp_path / "h.pt"), "--head", "linear"]
    r = CliRunner().invoke(
        main, [*args, "--epochs", "2", "--device", "cpu", "-q", "--log-dir", logs]
    )
    assert r.exit_code == 0, r.output
    assert _runs(logs) == ["h-linear"]


def test_run_names_read_and_stay_one_folder():
    assert [number(v) for v in (1e-3, 1e-2, 3e-4, 0.0, 0.1, 0.5, 1e5)] == [
        "1e-3",
        "1e-2",
        "3e-4",
        "0",
        "0.1",
        "0.5",
        "1e5",
    ]
    assert run_name("head", "", None, "auto", "mlp") == "head-auto-mlp"
    assert run_name("timm:vit_small", "10%", "a/b") == "timm_vit_small-10_-a_b"
    assert sub_log_dir(None, "resnet18", 0.1) is None
    assert sub_log_dir("logs", "resnet18", "f0.1") == str(Path("logs", "resnet18-f0.1"))
