import torch

from adaptive_quant.config import AugmentConfig, ModelConfig
from adaptive_quant.data import CIFAR10_STD
from adaptive_quant.training.augment import (
    augment_batch,
    cutout,
    pixel_noise,
    random_crop,
    random_flip,
    to_normalized_tensor,
)
from adaptive_quant.training.model import build_model, count_parameters


def test_model_maps_images_to_logits() -> None:
    model = build_model(ModelConfig(widths=[8, 16, 32, 32], blocks=[1, 0, 1])).eval()
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 10) and torch.isfinite(out).all()


def test_width_and_depth_come_from_config() -> None:
    small = count_parameters(build_model(ModelConfig(widths=[8, 16, 32, 32], blocks=[0, 0, 0])))
    wide = count_parameters(build_model(ModelConfig(widths=[16, 32, 64, 64], blocks=[0, 0, 0])))
    deep = count_parameters(build_model(ModelConfig(widths=[8, 16, 32, 32], blocks=[1, 1, 1])))
    assert wide > small and deep > small


def test_normalisation_uses_cifar_statistics() -> None:
    img = torch.full((1, 32, 32, 3), 255, dtype=torch.uint8)
    x = to_normalized_tensor(img)
    assert x.shape == (1, 3, 32, 32)
    assert abs(float(x[0, 0, 0, 0]) - (1 - 0.4914) / 0.2470) < 1e-4


def test_random_crop_is_a_shifted_window_of_the_padded_image() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for i in range(2):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 8], out[i])
        ]
        assert hits, "each crop must be a window of the padded image"


def test_flip_and_cutout() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 3, 8, 8)
    flipped = random_flip(x, g)
    same = [torch.equal(flipped[i], x[i]) for i in range(64)]
    mirrored = [torch.equal(flipped[i], x[i].flip(2)) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    cut = cutout(torch.ones(16, 3, 32, 32), 8, g)
    zeros_per_image = (cut == 0).flatten(1).sum(1) / 3
    assert (zeros_per_image > 0).all() and (zeros_per_image <= 64).all()


def test_pixel_noise_reaches_a_share_of_the_images_at_most_its_level() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(4000, 3, 32, 32)
    noisy = pixel_noise(x, 12.0, 0.5, g)
    # back in grey levels (0..255): each channel's std undoes the normalisation
    grey = noisy * torch.tensor(CIFAR10_STD).view(1, 3, 1, 1) * 255
    sigma = grey.flatten(1).std(1)
    touched = sigma > 0
    assert 0.45 < touched.float().mean() < 0.55  # about half the batch
    assert sigma.max() < 12.0 * 1.1  # σ ~ U(0, 12): none above the level, within sampling error
    assert 5.0 < sigma[touched].mean() < 7.0  # the mean of U(0, 12)
    assert torch.equal(pixel_noise(x, 0.0, 0.5, g), x) and torch.equal(pixel_noise(x, 12.0, 0.0, g), x)


def test_augment_batch_adds_noise_only_when_configured() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.zeros(256, 3, 32, 32)
    off = AugmentConfig(crop_padding=0, flip=False, cutout=0)
    assert torch.equal(augment_batch(x, off, g), x)
    on = off.model_copy(update={"noise_std": 8.0, "noise_share": 1.0})
    assert (augment_batch(x, on, g).flatten(1).std(1) > 0).all()
