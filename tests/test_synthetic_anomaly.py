"""The synthetic-anomaly generator DRAEM and DSR train on: masks, textures, blending, determinism, and
anomalies drawn per image that do not depend on the batch an image comes in."""

import pytest
import torch
from PIL import Image

from raylib_ad.errors import ConfigError
from raylib_ad.models.components.synthetic_anomaly import (
    SyntheticAnomalyGenerator,
    augment_textures,
    perlin_masks,
    perlin_noise,
    self_textures,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def smooth_images(n: int, size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    return torch.stack([torch.stack([0.5 + 0.4 * torch.sin(12 * xx + i), 0.5 + 0.4 * torch.cos(9 * yy + i),
                                     0.2 + 0.3 * xx]) for i in range(n)])


def test_perlin_noise_is_bounded_and_varies_per_image():
    noise = perlin_noise(6, 64, 64, gen(0))
    assert noise.shape == (6, 64, 64)
    assert noise.abs().max() <= 1.5  # sqrt(2)-scaled gradient noise
    assert not torch.allclose(noise[0], noise[1])


def test_masks_are_binary_nonempty_partial_and_respect_probability():
    masks = perlin_masks(32, 64, 64, gen(1))
    assert masks.shape == (32, 1, 64, 64) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    coverage = masks.flatten(1).mean(1)
    assert (coverage > 0).all(), "probability 1 with redraws: every image gets an anomaly"
    assert (coverage < 0.9).all() and 0.005 < float(coverage.mean()) < 0.5
    assert perlin_masks(8, 64, 64, gen(1), probability=0.0).sum() == 0
    half = perlin_masks(64, 32, 32, gen(2), probability=0.5).flatten(1).amax(1)
    assert 10 < int(half.sum()) < 54  # about half of the images carry a mask


def test_masks_for_non_square_sizes():
    masks = perlin_masks(4, 48, 40, gen(3))
    assert masks.shape == (4, 1, 48, 40) and (masks.flatten(1).sum(1) > 0).all()


@pytest.mark.parametrize("textures", ["self", "noise"])
def test_same_seed_same_anomalies_other_seed_other_ones(textures):
    images = smooth_images(4)
    generator = SyntheticAnomalyGenerator(textures, probability=1.0)
    a1, m1 = generator(images, gen(7))
    a2, m2 = generator(images, gen(7))
    a3, m3 = generator(images, gen(8))
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    assert not torch.equal(m1, m3)


@pytest.mark.parametrize("textures", ["self", "noise"])
def test_with_a_generator_per_image_an_images_anomaly_does_not_depend_on_its_batch(textures):
    # The runner seeds one generator per image by its row in the training set (batch["generators"]): on
    # 2 workers image 0 shares its batch with image 2, on 1 worker with images 1-3; its anomaly must not change.
    images = smooth_images(4)
    generator = SyntheticAnomalyGenerator(textures, probability=1.0)
    whole, whole_masks = generator(images, [gen(10 + i) for i in range(4)])
    for rows in ([0, 2], [1, 3], [3]):
        part, part_masks = generator(images[rows], [gen(10 + i) for i in rows])
        assert torch.equal(part, whole[rows]) and torch.equal(part_masks, whole_masks[rows])
    masks = perlin_masks(4, 64, 64, [gen(10 + i) for i in range(4)], probability=0.5)
    assert torch.equal(perlin_masks(2, 64, 64, [gen(11), gen(13)], probability=0.5), masks[[1, 3]])
    assert not torch.equal(whole_masks[0], whole_masks[1])  # and the images' own draws differ
    with pytest.raises(ValueError, match="one per image"):
        generator(images, [gen(0)])


@pytest.mark.parametrize("textures", ["self", "noise"])
def test_blend_changes_pixels_inside_the_mask_only(textures):
    images = smooth_images(4)
    augmented, masks = SyntheticAnomalyGenerator(textures, probability=1.0, blend=(0.5, 1.0))(images, gen(4))
    outside = masks.expand_as(images) == 0
    assert torch.equal(augmented[outside], images[outside])
    inside = ~outside
    assert (augmented[inside] - images[inside]).abs().mean() > 0.02
    assert augmented.min() >= 0 and augmented.max() <= 1


def test_blend_factor_one_pastes_the_texture(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (50, 70), colour).save(tmp_path / f"t{i}.png")
    images = torch.full((3, 3, 32, 32), 0.5)
    generator = SyntheticAnomalyGenerator(str(tmp_path), probability=1.0, blend=1.0, augmentations=0)
    augmented, masks = generator(images, gen(5))
    palette = torch.tensor(colours, dtype=torch.float32) / 255
    for b in range(3):
        pixels = augmented[b].permute(1, 2, 0)[masks[b, 0] > 0]  # (n, 3)
        assert len(pixels) and torch.isclose(pixels[:, None], palette[None]).all(-1).any(-1).all()


def test_texture_folder_errors_name_the_setting(tmp_path):
    with pytest.raises(ConfigError, match="dtd_dir.*not a directory"):
        SyntheticAnomalyGenerator(str(tmp_path / "missing"), setting="dtd_dir")
    with pytest.raises(ConfigError, match="texture_dir.*no images"):
        SyntheticAnomalyGenerator(str(tmp_path))


def test_self_textures_shuffle_the_batch_content_and_augmentations_stay_in_range():
    images = smooth_images(3, 32)
    textures = self_textures(images, gen(6))
    assert textures.shape == images.shape
    # Patches of other images, channels permuted: the multiset of values of image 2 shows up in texture 0.
    assert torch.allclose(textures[0].flatten().sort().values, images[2].flatten().sort().values)
    augmented = augment_textures(textures, gen(6), count=3)
    assert augmented.shape == images.shape and augmented.min() >= 0 and augmented.max() <= 1
    assert self_textures(images[:1], gen(6)).shape == (1, 3, 32, 32)  # a batch of one works


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_the_gpu_with_a_gpu_generator():
    images = smooth_images(4).cuda()
    generator = torch.Generator(device="cuda").manual_seed(0)
    augmented, masks = SyntheticAnomalyGenerator("self", probability=1.0)(images, generator)
    assert augmented.is_cuda and masks.is_cuda and masks.flatten(1).amax(1).all()
