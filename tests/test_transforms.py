"""Tests for raylib_ad.data.transforms: decoding images and masks into model-ready arrays."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from raylib_ad.data import BatchDecoder, load_image, load_mask, normalize
from raylib_ad.errors import DataError


# --- transforms --------------------------------------------------------------------------


def test_load_image_grayscale_becomes_rgb(tmp_path):
    grey = write_image(tmp_path / "grey.png", size=(40, 20), mode="L", value=77)
    image = load_image(str(grey), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert (image == 77).all()
    with pytest.raises(DataError, match=str(tmp_path / "none.png")):
        load_image(str(tmp_path / "none.png"), 16)


def test_load_mask_thresholds_soft_edges(tmp_path):
    soft = np.zeros((8, 8), dtype=np.uint8)
    soft[:, 4:] = 255
    soft[:, 3] = 127  # soft edge just below half: background
    soft[:, 2] = 100
    Image.fromarray(soft).save(tmp_path / "soft.png")
    mask = load_mask(str(tmp_path / "soft.png"), 8)
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
    assert (mask[:, 4:] == 1).all() and (mask[:, :4] == 0).all()

    Image.fromarray((soft == 255).astype(np.uint8)).save(tmp_path / "zero_one.png")
    assert (load_mask(str(tmp_path / "zero_one.png"), 8) == mask).all()
    assert load_mask(str(tmp_path / "soft.png"), 16).shape == (16, 16)
    assert (load_mask(None, 5) == 0).all() and load_mask(None, 5).shape == (5, 5)


def test_normalize_layout_and_values():
    images = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    images[1] = 255
    out = normalize(images, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    assert out.shape == (2, 3, 4, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, :, 0, 0], [-1.0, -1.0, 0.0])
    np.testing.assert_allclose(out[1, :, 0, 0], [1.0, 3.0, 1.0], rtol=1e-6)


def test_batch_decoder_outputs_numeric_arrays_only(tmp_path):
    image = write_image(tmp_path / "a.png", size=(20, 10), value=255)
    defect = write_image(tmp_path / "b.jpg", size=(20, 10), mode="L", value=0)
    mask = write_image(tmp_path / "b_mask.png", size=(20, 10), mode="L", value=255)
    batch = {
        "path": np.array([str(image), str(defect)], dtype=object),
        "mask_path": np.array([None, str(mask)], dtype=object),
        "label": np.array([0, 1], dtype=np.int8),
        "defect": np.array(["good", "crack"], dtype=object),
    }
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    out = BatchDecoder(8, mean, std)(batch)
    assert set(out) == {"image", "mask", "label"}
    assert all(v.dtype.kind in "fiu" for v in out.values())
    assert out["image"].shape == (2, 3, 8, 8) and out["image"].dtype == np.float32
    assert out["mask"].shape == (2, 8, 8) and out["mask"].dtype == np.uint8
    assert out["label"].tolist() == [1 - 1, 1] and out["label"].dtype == np.int64
    np.testing.assert_allclose(out["image"][0, 0], 2.0)  # red channel 255 -> (1 - .5) / .25
    np.testing.assert_allclose(out["image"][1], -2.0)  # black -> (0 - .5) / .25
    assert out["mask"][0].sum() == 0 and (out["mask"][1] == 1).all()
    assert set(BatchDecoder(8, mean, std, with_masks=False)(batch)) == {"image", "label"}



def test_normalize_is_bit_identical_to_whole_array_arithmetic():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 9, 11, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, 3)
    s = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, 3)
    expected = ((images.astype(np.float32) * np.float32(1 / 255) - m) / s).transpose(0, 3, 1, 2)
    out = normalize(images, mean, std)
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected)


def test_grayscale_fast_path_equals_resizing_the_rgb_conversion(tmp_path):
    rng = np.random.default_rng(1)
    for size in ((40, 23), (300, 500)):  # upscaled and downscaled to 64
        path = tmp_path / f"grey{size[0]}.png"
        Image.fromarray(rng.integers(0, 256, size=size[::-1], dtype=np.uint8)).save(path)
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR))
        np.testing.assert_array_equal(load_image(str(path), 64), expected)
