from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image, make_tree
from PIL import Image

from embedcache.backbones import EvalTransform
from embedcache.data import UnreadableImage, load_rgb, preprocess, scan, stratified_split
from embedcache.errors import EmbedcacheError


def test_split_folders_give_splits_and_shared_class_index(tmp_path):
    root = make_tree(
        tmp_path / "d", splits=("train", "val", "test"), classes=("a", "b"), per_class=2
    )
    images = scan(root)
    assert images.layout == "split-folders"
    assert list(images.splits) == ["train", "val", "test"]
    assert images.classes == ["a", "b"]
    assert [s.label for s in images.splits["val"]] == [0, 0, 1, 1]
    assert all(s.path.startswith("val/") for s in images.splits["val"])


def test_validation_folder_aliases_map_to_val(tmp_path):
    root = make_tree(tmp_path / "d", splits=("training", "validation"), per_class=1)
    assert list(scan(root).splits) == ["train", "val"]


def test_class_folders_get_a_seeded_stratified_split(tmp_path):
    root = make_tree(tmp_path / "d", splits=(), classes=("a", "b"), per_class=10)
    images = scan(root, val_fraction=0.2, seed=3)
    assert images.layout == "class-folders"
    val = images.splits["val"]
    assert [sum(s.label == k for s in val) for k in (0, 1)] == [2, 2]
    assert len(images.splits["train"]) == 16
    again = scan(root, val_fraction=0.2, seed=3)
    assert [s.path for s in again.splits["val"]] == [s.path for s in val]
    other = scan(root, val_fraction=0.2, seed=4)
    assert [s.path for s in other.splits["val"]] != [s.path for s in val]


def test_stratified_split_moves_few_images_when_data_grows(tmp_path):
    root = make_tree(tmp_path / "d", splits=(), classes=("a",), per_class=40)
    before = {s.path for s in scan(root).splits["val"]}
    for i in range(40, 44):
        make_image(root / "a" / f"new_{i}.png", 0, i)
    after = {s.path for s in scan(root).splits["val"]}
    assert len(before - after) <= 1  # a shuffled list would reassign most of them


def test_val_fraction_zero_means_train_only(tmp_path):
    root = make_tree(tmp_path / "d", splits=(), per_class=3)
    assert list(scan(root, val_fraction=0).splits) == ["train"]


def test_stratified_split_rejects_bad_fraction():
    with pytest.raises(EmbedcacheError, match=r"--val-fraction must be in \[0, 1\), got 1.5"):
        stratified_split([], val_fraction=1.5, seed=0)


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(3):
        make_image(tmp_path / "d" / f"{i}.jpg", 0, i)
    images = scan(tmp_path / "d")
    assert images.layout == "unlabelled" and list(images.splits) == ["all"]
    assert {s.label for s in images.splits["all"]} == {-1}


def test_unlabelled_flag_ignores_class_folders(tmp_path):
    root = make_tree(tmp_path / "d", splits=(), per_class=2)
    images = scan(root, unlabelled=True)
    assert images.classes == [] and len(images.splits["all"]) == 4


def test_non_image_files_are_ignored_and_reported(tmp_path):
    root = make_tree(tmp_path / "d", per_class=1)
    (root / "train" / "cat" / "notes.txt").write_text("hello")
    (root / "train" / "cat" / ".DS_Store").write_text("x")
    images = scan(root)
    assert images.ignored == ["train/cat/notes.txt"]
    assert len(images) == 4


def test_csv_manifest_with_header_and_split(tmp_path):
    for i in range(4):
        make_image(tmp_path / "img" / f"{i}.png", i % 2, i)
    (tmp_path / "m.csv").write_text(
        "path,label,split\n"
        + "".join(f"img/{i}.png,{'xy'[i % 2]},{'train' if i < 2 else 'val'}\n" for i in range(4))
    )
    images = scan(tmp_path / "m.csv")
    assert images.layout == "csv" and images.classes == ["x", "y"]
    assert [s.path for s in images.splits["val"]] == ["img/2.png", "img/3.png"]
    assert [s.label for s in images.splits["train"]] == [0, 1]


def test_csv_without_split_gets_stratified_split_and_headerless_works(tmp_path):
    for i in range(10):
        make_image(tmp_path / f"{i}.png", i % 2, i)
    (tmp_path / "m.csv").write_text("".join(f"{i}.png,{i % 2}\n" for i in range(10)))
    images = scan(tmp_path / "m.csv", val_fraction=0.2)
    assert sorted(images.splits) == ["train", "val"]
    assert len(images.splits["val"]) == 2


def test_csv_with_bad_split_names_the_line(tmp_path):
    make_image(tmp_path / "0.png", 0, 0)
    (tmp_path / "m.csv").write_text("path,label,split\n0.png,a,holdout\n")
    with pytest.raises(
        EmbedcacheError, match=r"line 2: split must be train, val or test, got 'holdout'"
    ):
        scan(tmp_path / "m.csv")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, r"data path .* does not exist"),
        (lambda p: p.mkdir(), r"no images found under"),
        (lambda p: p.write_text("x"), r"is a file but not a \.csv manifest"),
        (os.mkfifo, r"data path \S+thing is not a folder or a regular file \(a pipe or a device\)"),
    ],
)
def test_scan_errors(tmp_path, setup, message):
    path = tmp_path / "thing"
    setup(path)
    with pytest.raises(EmbedcacheError, match=message):
        scan(path)


def _manifest(tmp_path: Path, text: str | bytes) -> Path:
    """m.csv in ``tmp_path`` holding ``text``, beside two images a/0.png and b/1.png."""
    make_image(tmp_path / "a" / "0.png", 0, 0)
    make_image(tmp_path / "b" / "1.png", 1, 1)
    path = tmp_path / "m.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "path,label\na/0.png,a\nb/1\x00.png,b\n",
            r"CSV manifest \S+m\.csv has a NUL byte on line 3, which no file name can hold",
        ),
        (
            "path,label\na/0.png,a\n" + "y" * 200_000 + ",b\n",
            r"CSV manifest \S+m\.csv line 3 cannot be read as CSV \(field larger than field limit",
        ),
        (
            "path,label,split\n\n\na/0.png,a,holdout\n",  # blank lines count: it is line 4
            r"m\.csv line 4: split must be train, val or test, got 'holdout'",
        ),
        (b"path,label\na/0.png,caf\xe9\n", r"m\.csv is not UTF-8 \(byte 0xe9 on line 2\)"),
        ("\ufeffpath,label\n,a\n", r"m\.csv line 2 has an empty path; give each row an image"),
    ],
    ids=["nul-byte", "field-over-128kB", "line-numbers", "latin-1", "empty-path"],
)
def test_a_manifest_that_cannot_be_read_is_one_line_naming_the_file_and_line(
    tmp_path, text, message
):
    """D11: a NUL byte was 'ValueError: embedded null byte', a long field an _csv.Error."""
    with pytest.raises(EmbedcacheError, match=message) as e:
        scan(_manifest(tmp_path, text))
    assert "\n" not in str(e.value)


def test_manifest_and_exclusion_share_one_csv_reader(tmp_path):
    """The rows a user's CSV holds, with the line each starts on (blank and quoted lines too);
    UTF-8 with a BOM and UTF-16 with one are read alike."""
    from embedcache.data.csvfile import csv_rows

    text = 'path,label\n\n"two\nlines.png",a\n  ,  \nc.png,b\n'
    (tmp_path / "u8.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "u16.csv").write_bytes(text.encode("utf-16"))
    for name in ("u8.csv", "u16.csv"):
        assert csv_rows(tmp_path / name, name) == [
            (1, ["path", "label"]),
            (3, ["two\nlines.png", "a"]),
            (6, ["c.png", "b"]),
        ]
    (tmp_path / "odd.csv").write_bytes(text.encode("utf-16")[:-1])
    with pytest.raises(EmbedcacheError, match=r"^odd is not UTF-16 \(byte 0x0a on line 6\)"):
        csv_rows(tmp_path / "odd.csv", "odd")


@pytest.mark.parametrize("same_label", [True, False])
def test_a_manifest_listing_one_file_under_two_names_is_refused(tmp_path, same_label):
    """D19: a file and a link to it, listed on two lines, made two samples of one image (with
    two labels, one image in two classes; split apart, a train/val leak)."""
    path = _manifest(tmp_path, "")
    (tmp_path / "link.png").symlink_to("a/0.png")
    label = "a" if same_label else "b"
    path.write_text(f"path,label\na/0.png,a\nb/1.png,b\nlink.png,{label}\n")
    with pytest.raises(
        EmbedcacheError,
        match=r"m\.csv lists one file under two names \(a link, or another path to it\): "
        r"a/0\.png \(line 2\) and link\.png \(line 4\); list each file once, with one label",
    ):
        scan(path)
    path.write_text(f"path,label\na/0.png,a\nb/1.png,b\n{tmp_path}/a/0.png,a\n")  # absolute
    with pytest.raises(EmbedcacheError, match=r"lists \S+0\.png twice \(lines 2 and 4\)"):
        scan(path)


def test_manifest_paths_outside_its_folder_and_many_blank_lines_are_read(tmp_path):
    """Probed: ../ and absolute paths name files outside the manifest's folder; a million blank
    lines are skipped, and line numbers still count them."""
    outside = make_image(tmp_path / "elsewhere" / "x.png", 0, 3)
    path = _manifest(tmp_path / "m", "")
    path.write_text(
        "path,label\n" + "\n" * 1_000_000 + f"../elsewhere/x.png,a\n{outside},a\nb/1.png,b\n"
    )
    with pytest.raises(EmbedcacheError, match=r"lines 1000002 and 1000003"):
        scan(path)
    path.write_text("path,label\n" + "\n" * 1_000_000 + "../elsewhere/x.png,a\nb/1.png,b\n")
    images = scan(path, val_fraction=0)
    assert [s.path for s in images.splits["train"]] == ["../elsewhere/x.png", "b/1.png"]
    assert images.splits["train"][0].size == outside.stat().st_size


# ---------------------------------------------------------------------------
# Decoding


def test_unreadable_files_give_short_reasons(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image at all")
    good = make_image(tmp_path / "good.jpg", 0, 0, size=(64, 64), fmt="JPEG")
    (tmp_path / "trunc.jpg").write_bytes(good.read_bytes()[:300])
    for name, reason in [
        ("empty.jpg", "empty file"),
        ("text.jpg", "not an image"),
        ("trunc.jpg", "truncated"),
        ("missing.jpg", "file not found"),
    ]:
        with pytest.raises(UnreadableImage, match=reason):
            load_rgb(tmp_path / name)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "I;16", "I", "F", "1"])
def test_odd_modes_decode_to_rgb_with_the_right_brightness(tmp_path, mode):
    grey = Image.new("L", (10, 10), 128)
    if mode == "I;16":
        img = Image.fromarray(np.full((10, 10), 128 * 257, np.uint16))
    elif mode == "I":
        img = Image.fromarray(np.full((10, 10), 128 * 257, np.int32))
    elif mode == "F":
        img = Image.fromarray(np.full((10, 10), 128 / 255, np.float32))
    elif mode == "1":
        img = Image.new("1", (10, 10), 1)
    else:
        img = grey.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I", "F", "CMYK") else "x.png")
    img.save(path)
    rgb = np.asarray(load_rgb(path))
    assert rgb.shape == (10, 10, 3) and rgb.dtype == np.uint8
    expected = 255 if mode == "1" else 128
    assert abs(int(rgb.mean()) - expected) <= 2, (mode, rgb.mean())


def test_transparent_pixels_become_white_not_black(tmp_path):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.save(tmp_path / "a.png")
    assert np.asarray(load_rgb(tmp_path / "a.png")).min() == 255


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (10, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").size == (20, 40)


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [(300, 217), (217, 300), (256, 256), (640, 480)])
def test_preprocess_matches_torchvision_eval_transform(tmp_path, interpolation, size):
    from torchvision import transforms as T

    rng = np.random.default_rng(0)  # photo-like: smooth regions and edges, not per-pixel noise
    blocks = rng.integers(0, 255, (size[1] // 8 + 1, size[0] // 8 + 1, 3)).astype(np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(blocks).resize(size, Image.BILINEAR).save(path)
    t = EvalTransform(resize=256, crop=224, interpolation=interpolation, jpeg_draft=False)
    ours = preprocess(path, t).astype(int)
    tf = T.Compose(
        [
            T.Resize(256, interpolation=T.InterpolationMode(interpolation)),
            T.CenterCrop(224),
            T.PILToTensor(),
        ]
    )
    expected = tf(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy().astype(int)
    assert ours.shape == expected.shape == (224, 224, 3)
    diff = np.abs(ours - expected)
    # Resampling only the cropped box rounds a few filter windows differently (at most a few
    # levels, rarely); a crop off by one pixel would move the mean difference by whole levels.
    assert diff.max() <= 8 and diff.mean() < 0.25, (diff.max(), diff.mean())


def test_normalise_gives_channels_last_float_with_the_weights_statistics():
    from embedcache.backbones import Normalise

    t = EvalTransform(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    x = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    y = Normalise(t)(x)
    assert y.shape == (2, 3, 4, 4) and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(y[0, :, 0, 0], torch.tensor([1.0, 3.0, 1.0]))


def test_jpeg_draft_decodes_big_photos_close_to_a_full_decode(tmp_path):
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (30, 40, 3)), np.ones((40, 40, 1))).astype(np.uint8)
    Image.fromarray(smooth).save(tmp_path / "big.jpg", quality=95)
    full = preprocess(tmp_path / "big.jpg", EvalTransform(jpeg_draft=False)).astype(float)
    fast = preprocess(tmp_path / "big.jpg", EvalTransform(jpeg_draft=True)).astype(float)
    assert fast.shape == full.shape == (224, 224, 3)
    assert np.abs(fast - full).mean() < 3.0


def test_transform_json_round_trip_and_rescale():
    t = EvalTransform(resize=256, crop=224, interpolation="bicubic")
    assert EvalTransform.from_json(t.to_json()) == t
    assert t.with_crop(112).resize == 128
    with pytest.raises(EmbedcacheError, match="crop <= resize"):
        EvalTransform(resize=100, crop=224)


def _smooth_jpeg(path: Path, size=(120, 90), seed=0) -> Path:
    """A smooth photo-like JPEG (noise would make every decoder's rounding show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    base = rng.uniform(40, 200, 3)
    img = np.stack([base[c] + 50 * np.sin(xx / 9 + c) * np.cos(yy / 13) for c in range(3)], -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=95)
    return path


def test_the_gpu_decode_path_matches_the_cpu_path_and_falls_back_per_file(tmp_path):
    """Run on the CPU (torchvision decodes JPEG there too): the batching, the per-file
    fallback and the resize/crop arithmetic are the same code a GPU runs."""
    from embedcache.data import gpu_decoded_batches

    t = EvalTransform(resize=40, crop=32, jpeg_draft=False)
    files = [
        _smooth_jpeg(tmp_path / "a.jpg"),
        make_image(tmp_path / "b.png", 0, 1, size=(50, 70)),  # not a JPEG: the CPU path
        _smooth_jpeg(tmp_path / "c.jpg", size=(64, 96), seed=2),
        tmp_path / "d.jpg",  # text named .jpg: the CPU path says why
        tmp_path / "e.jpg",  # a JPEG header and nothing else: the decoder refuses, then the CPU
        tmp_path / "f.jpg",  # empty
    ]
    files[3].write_text("hello")
    files[4].write_bytes(files[0].read_bytes()[:40])
    files[5].write_bytes(b"")
    batches = [[0, 1, 2], [3, 4, 5]]
    got = list(gpu_decoded_batches(files, batches, t, device=torch.device("cpu"), num_workers=2))
    assert [list(index) for index, _, _ in got] == [[0, 1, 2], []]
    assert got[1][1] is None
    assert got[0][2] == {} and set(got[1][2]) == {3, 4, 5}
    assert got[1][2][3] == "not an image (unrecognised format)"
    assert got[1][2][5] == "empty file (0 bytes)"
    images = got[0][1]
    assert images.shape == (3, 32, 32, 3) and images.dtype == torch.uint8
    for k, f in enumerate(files[:3]):
        cpu = torch.from_numpy(preprocess(f, t)).float()
        assert (images[k].float() - cpu).abs().mean() < 2.0, f.name  # antialiased resize vs PIL's


def test_gpu_decode_is_chosen_only_on_cuda_and_refused_without_it(monkeypatch):
    from embedcache import runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert not runtime.choose_gpu_decode("auto", cpu) and not runtime.choose_gpu_decode("cpu", cuda)
    with pytest.raises(
        EmbedcacheError, match=r"^--decode gpu needs a CUDA device; use --decode cpu or auto$"
    ):
        runtime.choose_gpu_decode("gpu", cpu)
    for works in (True, False):
        monkeypatch.setattr(runtime, "_nvjpeg_ok", {})
        monkeypatch.setattr(runtime, "_decodes_on", lambda d, w=works: w)
        assert runtime.choose_gpu_decode("auto", cuda) is works
    with pytest.raises(EmbedcacheError, match=r"no nvJPEG\); use --decode cpu or auto$"):
        runtime.choose_gpu_decode("gpu", cuda)


def test_os_errors_on_one_file_become_reasons_not_a_stopped_run(tmp_path):
    import os

    good = make_image(tmp_path / "good.png", 0, 1)
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    (tmp_path / "dangling.jpg").symlink_to("nowhere.jpg")
    os.mkfifo(tmp_path / "fifo.jpg")  # opening it would block forever
    t = EvalTransform(resize=40, crop=32)
    assert preprocess(good, t).shape == (32, 32, 3)
    for name, reason in (
        ("loop.jpg", "symlink loop"),
        ("dangling.jpg", "file not found"),
        ("fifo.jpg", "not a regular file"),
        ("x" * 300 + ".jpg", "name too long"),
    ):
        with pytest.raises(UnreadableImage, match=f"^{reason}$"):
            load_rgb(tmp_path / name)


def test_any_exception_a_decoder_raises_on_one_file_is_a_reason(tmp_path, monkeypatch):
    path = make_image(tmp_path / "a.png", 0, 1)

    def broken_load(self):
        raise IndexError("list index out of range")  # as malformed files make PIL plugins do

    monkeypatch.setattr(Image.Image, "load", broken_load)
    with pytest.raises(
        UnreadableImage, match=r"^cannot decode: IndexError list index out of range$"
    ):
        load_rgb(path)


def test_a_tar_member_whose_shard_is_gone_is_unreadable_with_a_reason(tmp_path):
    from embedcache.sources import TarMember

    member = TarMember(tmp_path / "gone.tar", 512, 100)  # the shard was deleted after listing
    with pytest.raises(UnreadableImage, match=r"^file not found$"):
        member.read_bytes()
    with pytest.raises(UnreadableImage, match=r"^file not found$"):
        load_rgb(member)


@pytest.mark.parametrize("size", [(40, 40), (50, 70), (70, 50), (333, 41), (41, 333)])
def test_cpu_and_gpu_decoders_share_torchvisions_resize_and_crop_geometry(size):
    from torchvision.transforms import CenterCrop, Resize

    from embedcache.data import resize_geometry

    t = EvalTransform(resize=40, crop=32)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    resized = Resize(t.resize)(Image.fromarray(pixels))
    nw, nh, top, left = resize_geometry(*size, t)
    assert (nw, nh) == resized.size
    crop = np.asarray(resized)[top : top + t.crop, left : left + t.crop]
    assert np.array_equal(crop, np.asarray(CenterCrop(t.crop)(resized)))


def _numbered(i: int) -> np.ndarray:
    return np.full((2, 2, 3), i, np.uint8)


@pytest.mark.parametrize("workers", [0, 2])
def test_cpu_batches_come_whole_and_in_order_whether_or_not_the_next_is_started_ahead(workers):
    from embedcache.data import decoded_batches

    batches, cpu = [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]], torch.device("cpu")
    plain = list(
        decoded_batches(list(range(10)), batches, _numbered, device=cpu, num_workers=workers)
    )
    loader = decoded_batches(list(range(10)), batches, _numbered, device=cpu, num_workers=workers)
    ahead = getattr(loader, "ahead", lambda: None)
    ahead()  # before the first batch: nothing to start
    got = []
    for b in loader:
        got.append(b)
        ahead(), ahead()  # the second call is a no-op
    assert [i.tolist() for i, _, _ in got] == [i.tolist() for i, _, _ in plain] == batches
    assert all(torch.equal(a[1], b[1]) for a, b in zip(got, plain, strict=True))
    assert all(int(x[1][k, 0, 0, 0]) == i for x in got for k, i in enumerate(x[0]))


def test_ahead_decodes_the_next_batch_before_it_is_asked_for():
    import threading

    from embedcache.data import decoded_batches

    seen, third = [], threading.Event()

    def decode(i: int) -> np.ndarray:
        seen.append(i)
        if i == 3:
            third.set()
        return _numbered(i)

    loader = decoded_batches(
        list(range(6)), [[0, 1, 2], [3, 4, 5]], decode, device=torch.device("cpu"), num_workers=2
    )
    batches = iter(loader)
    next(batches)
    assert 3 not in seen  # not started beside the forward pass
    loader.ahead()
    assert third.wait(timeout=30)  # decoding while the caller still holds the first batch
    index, images, _ = next(batches)
    assert index.tolist() == [3, 4, 5] and sorted(seen) == list(range(6))


# ---------------------------------------------------------------------------
# A JPEG whose header claims more pixels than its bytes can hold (issue 32, D18)


def _forged_jpeg(path: Path, side: int = 65000) -> Path:
    """A real 16 x 16 JPEG whose SOF0 header claims ``side`` x ``side`` pixels."""
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8)).save(
        buf, "JPEG"
    )
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = side.to_bytes(2, "big") * 2  # height, width
    path.write_bytes(bytes(data))
    return path


def test_a_jpeg_claiming_more_pixels_than_its_bytes_hold_is_unreadable(tmp_path):
    """It was decoded (at a draft scale, under the pixel limit) as a flat grey image."""
    forged = _forged_jpeg(tmp_path / "forged.jpg")
    n = forged.stat().st_size
    reason = rf"^truncated image \(header claims 65000x65000 pixels in {n} bytes\)$"
    for load in (
        lambda: preprocess(forged, EvalTransform(resize=73, crop=64)),
        lambda: load_rgb(forged, short_side=73),
    ):
        with pytest.raises(UnreadableImage, match=reason):
            load()

    class Member:  # a tar or Parquet member: bytes, no path
        def read_bytes(self):
            return forged.read_bytes()

    with pytest.raises(UnreadableImage, match=reason):
        load_rgb(Member(), short_side=73)


def test_the_gpu_path_refuses_a_forged_jpeg_before_decoding_it(tmp_path, monkeypatch):
    """nvJPEG would allocate what the header claims (12.7 GB here)."""
    from embedcache.data import batches

    given: list[int] = []

    def nvjpeg(datas, device):
        given.extend(len(d) for d in datas)
        return [torch.zeros(3, 40, 40, dtype=torch.uint8) for _ in datas]

    monkeypatch.setattr(batches, "_nvjpeg", nvjpeg)
    files = [_smooth_jpeg(tmp_path / "a.jpg"), _forged_jpeg(tmp_path / "b.jpg")]
    t = EvalTransform(resize=40, crop=32, jpeg_draft=False)
    index, images, failed = batches._gpu_batch(
        files, [0, 1], [f.read_bytes() for f in files], t, torch.device("cpu")
    )
    assert list(index) == [0] and given == [files[0].stat().st_size]
    n = files[1].stat().st_size
    assert failed == {1: f"truncated image (header claims 65000x65000 pixels in {n} bytes)"}


@pytest.mark.parametrize("mode, colour", [("L", 128), ("RGB", (255, 255, 255))])
def test_flat_jpegs_of_any_quality_pass_the_pixels_per_byte_bound(tmp_path, mode, colour):
    """The bound has a wide margin: flat 4000 x 3000 pictures, the most compressible there are,
    stay far under it however PIL writes them."""
    import io

    from embedcache.data.decode import MAX_JPEG_PIXELS_PER_BYTE, check_jpeg

    img = Image.new(mode, (4000, 3000), colour)
    for quality in (10, 50, 95):
        for progressive in (False, True):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=quality, progressive=progressive, optimize=True)
            check_jpeg(buf, len(buf.getvalue()))
            assert 4000 * 3000 / len(buf.getvalue()) < MAX_JPEG_PIXELS_PER_BYTE / 8
    (tmp_path / "flat.jpg").write_bytes(buf.getvalue())
    assert load_rgb(tmp_path / "flat.jpg", short_side=64).size == (500, 375)  # drafted 1/8


def test_hostile_images_are_skipped_or_read_quickly(tmp_path):
    """Probed: a GIF of 10,000 frames (its first is read), a PNG and a TIFF declaring
    400 MP (the pixel limit), a TIFF declaring 81 MP over a 16 x 16 body (truncated)."""
    import struct
    import time
    import zlib

    frames = [Image.new("P", (32, 32), i % 256) for i in range(10_000)]
    frames[0].save(tmp_path / "many.gif", save_all=True, append_images=frames[1:], duration=10)
    w = h = 20_000
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    body = zlib.compress(b"\0" * (w + 1) * 64)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    (tmp_path / "bomb.png").write_bytes(png)
    Image.new("L", (16, 16)).save(tmp_path / "small.tif")
    tiff = bytearray((tmp_path / "small.tif").read_bytes())
    for name, side in (("huge.tif", 60_000), ("claims.tif", 9_000)):
        data = bytearray(tiff)
        start = struct.unpack("<I", data[4:8])[0]
        for i in range(struct.unpack("<H", data[start : start + 2])[0]):
            e = start + 2 + 12 * i
            if struct.unpack("<H", data[e : e + 2])[0] in (256, 257):  # width, height: LONG
                data[e + 2 : e + 4], data[e + 8 : e + 12] = b"\x04\x00", struct.pack("<I", side)
        (tmp_path / name).write_bytes(bytes(data))
    t = EvalTransform(resize=73, crop=64)
    start = time.perf_counter()
    assert preprocess(tmp_path / "many.gif", t).shape == (64, 64, 3)
    for name, reason in (
        ("bomb.png", "image too large"),
        ("huge.tif", "image too large"),
        ("claims.tif", "truncated image"),
    ):
        with pytest.raises(UnreadableImage, match=reason):
            preprocess(tmp_path / name, t)
    assert time.perf_counter() - start < 5


def test_fractions_are_nested_stratified_seeded_and_keep_every_class():
    """Issue 34: 1% within 10% within 100%, every class at least one image, the same subset
    for the same seed, and a subset that barely moves when images are added."""
    from embedcache.data import nested_fractions

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), [300, 120, 40, 7, 1])
    paths = [f"c{y}/{i:04d}_{rng.integers(1e9)}.jpg" for i, y in enumerate(labels)]
    subsets = nested_fractions(paths, labels, fractions=(1.0, 0.01, 0.1), seed=3)
    assert list(subsets) == [0.01, 0.1, 1.0]
    small, mid, full = (set(subsets[f].tolist()) for f in (0.01, 0.1, 1.0))
    assert small <= mid <= full and full == set(range(len(labels)))
    for f, rows in subsets.items():
        counts = np.bincount(labels[rows], minlength=5)
        assert counts.min() >= 1, (f, counts)
        expected = [max(1, round(n * f)) for n in (300, 120, 40, 7, 1)]
        assert counts.tolist() == expected, (f, counts)
    again = nested_fractions(paths, labels, fractions=(0.1,), seed=3)[0.1]
    assert np.array_equal(again, subsets[0.1])
    other = nested_fractions(paths, labels, fractions=(0.1,), seed=4)[0.1]
    assert not np.array_equal(other, subsets[0.1])
    grown = nested_fractions([*paths, "c0/new.jpg"], np.append(labels, 0), fractions=(0.1,), seed=3)
    moved = set(np.asarray(paths)[subsets[0.1]]) ^ {([*paths, "c0/new.jpg"])[i] for i in grown[0.1]}
    assert len(moved) <= 2  # the new image may take one old image's place, nothing else moves
    with pytest.raises(EmbedcacheError, match=r"--fractions must be in \(0, 1\]"):
        nested_fractions(paths, labels, fractions=(0.0, 0.5), seed=0)
