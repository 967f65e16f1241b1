from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from embedcache import quickstart
from embedcache.data import scan


def test_write_digits_writes_every_digit_as_a_class_folder(tmp_path):
    root = quickstart.write_digits(tmp_path / "digits")
    images = scan(root)
    assert images.classes == [str(d) for d in range(10)]
    assert len(images) == 1797
    img = np.asarray(Image.open(root / "0" / "0000.png"))
    from sklearn.datasets import load_digits

    np.testing.assert_array_equal(
        img, np.round(load_digits().images[0] * 255 / 16).astype(np.uint8)
    )
    before = (root / "0" / "0000.png").stat().st_mtime_ns
    quickstart.write_digits(tmp_path / "digits")  # an existing folder is left as it is
    assert (root / "0" / "0000.png").stat().st_mtime_ns == before
    assert not (tmp_path / "digits.tmp").exists()


def test_demo_weights_fall_back_to_random_init_with_a_warning(monkeypatch):
    monkeypatch.setattr(quickstart, "lite0_weights_available", lambda: False)
    with pytest.warns(UserWarning, match="random-init backbone"):
        assert quickstart.demo_weights() == "none"
    monkeypatch.setattr(quickstart, "lite0_weights_available", lambda: True)
    assert quickstart.demo_weights() == "DEFAULT"


def test_demo_fine_tunes_the_digits_without_augmentation(tmp_path, monkeypatch):
    import embedcache.comparison

    seen = {}
    monkeypatch.setattr(
        embedcache.comparison, "compare", lambda data, **kw: seen.update(kw, data=data)
    )
    monkeypatch.chdir(tmp_path)
    quickstart.demo(progress=False)
    assert seen["augment"] == "none" and seen["image_size"] == quickstart.DEMO_IMAGE_SIZE
    assert seen["views"] == 0  # a mirrored digit is another digit
    assert (
        seen["data"] == tmp_path / "data" / "digits"
        or seen["data"].resolve() == tmp_path / "data" / "digits"
    )
    quickstart.demo(data=tmp_path / "data" / "digits", progress=False)  # a user's own folder
    assert seen["augment"] == "light" and seen["image_size"] is None and seen["views"] == 4
