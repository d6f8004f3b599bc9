"""The fast-training recipe pieces (airbench): whitening stem, lookahead, alternating flips,
the generalised one-cycle schedule, BN without learned scale, Dirac init, and that the
resulting network still quantizes (PT2E) and converts to an INT8 graph close to the float one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from adaptive_quant.config import ConfigError, ModelConfig, load_config
from adaptive_quant.data import load_dataset, make_synthetic
from adaptive_quant.training.augment import alternating_flip_mask, to_normalized_tensor
from adaptive_quant.training.averaging import Lookahead
from adaptive_quant.training.checkpoint import load_checkpoint, restore_converted_model, restore_float_model
from adaptive_quant.training.engine import make_optimizer, one_cycle, predict_logits
from adaptive_quant.training.model import build_model
from adaptive_quant.training.whitening import WhiteningStem, image_patches

# the airbench94 network and optimiser at smoke size (widths shrunk, stem 12 = ± 6 eigenvectors)
RECIPE = [
    "model.stem=whiten",
    "model.widths=[12, 16, 32, 32]",
    "model.blocks=[1, 1, 1]",
    "model.block=plain",
    "model.bn_momentum=0.4",
    "model.bn_scale=false",
    "model.dirac_init=true",
    "augment.crop_padding=2",
    "augment.cutout=0",
    "augment.flip_mode=alternate",
    "train.lr=0.3",
    "train.momentum=0.85",
    "train.lr_start_factor=0.2",
    "train.lr_end_factor=0.07",
    "train.bn_lr_scale=8",
    "train.lookahead_steps=5",
    "train.whiten_bias_epochs=1",
    "qat.epochs=1",
]


def test_whitening_stem_decorrelates_its_training_patches() -> None:
    images = to_normalized_tensor(make_synthetic(200, seed=0).images)
    stem = WhiteningStem(24, kernel=2)  # all 12 eigenvectors of 2×2×3 patches, ±
    stem.fit(images, eps=1e-6)
    out = stem.conv(images)[:, :12]  # (N, 12, 31, 31), before the ReLU; bias is 0
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12, dtype=cov.dtype), atol=0.02), cov.diagonal()
    # the other half is the same filters negated, so the ReLU keeps both signs of each component
    assert torch.equal(stem.conv.weight[12:], -stem.conv.weight[:12])
    assert out.shape[-2:] == (31, 31)
    assert not stem.conv.weight.requires_grad  # fixed: only its bias trains
    assert image_patches(images[:2], 2).shape == (2 * 31 * 31, 3, 2, 2)


def test_whitening_stem_width_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"model.widths\[0\].*even and <= 24"):
        ModelConfig(stem="whiten", widths=[32, 64, 128, 256])
    with pytest.raises(ConfigError, match="model.block"):
        load_config(None, ["model.block=dense"])


def test_one_cycle_runs_from_start_to_peak_to_end_factor() -> None:
    f = one_cycle(100, 0.25, start_factor=0.2, end_factor=0.07)
    assert f(0) == pytest.approx(0.2 + 0.8 / 25)
    assert f(24) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.07, abs=0.02)
    assert all(f(s) >= f(s + 1) for s in range(25, 99))  # monotone decay after the peak
    classic = one_cycle(100, 0.25)  # the old triangle: 0 → 1 → 0
    assert classic(99) == pytest.approx(1 / 75, abs=1e-9)


def test_alternating_flips_flip_each_image_every_other_epoch() -> None:
    gen = torch.Generator().manual_seed(0)
    base = alternating_flip_mask(1000, 0, gen)
    assert 0.4 < base.float().mean() < 0.6
    assert torch.equal(alternating_flip_mask(1000, 1, gen, base), ~base)
    assert torch.equal(alternating_flip_mask(1000, 2, gen, base), base)


def test_lookahead_resets_live_weights_to_the_average_every_k_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    la = Lookahead(model, total_steps=20, every=5)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    for step in range(1, 15):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        la.after_step(model)
        live = model[0].weight.detach()
        if step % 5 == 0:  # just synced: the live weights are the average
            assert torch.equal(live, la.average["0.weight"])
        elif step > 5:  # in between, SGD has moved them away from it
            assert not torch.allclose(live, la.average["0.weight"])
    la.sync(model, decay=1.0)  # the end of training: keep the average, drop the last live steps
    assert torch.equal(model[0].weight, la.average["0.weight"])
    assert torch.equal(model[1].running_mean, la.average["1.running_mean"])  # BN statistics are averaged too


def test_bn_without_scale_and_dirac_init() -> None:
    cfg = ModelConfig(widths=[8, 8, 16, 16], blocks=[1, 0, 0], block="plain", bn_scale=False, dirac_init=True)
    model = build_model(cfg)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not m.weight.requires_grad and m.bias.requires_grad for m in bns)
    conv = model.stages[0][0][0]  # 8 → 8 channels, 3×3: Dirac = identity
    x = torch.randn(2, 8, 6, 6)
    assert torch.allclose(conv(x), x, atol=1e-6)
    # BN parameters get their own lr (bn_lr_scale); fixed BN scales are never stepped
    opt = make_optimizer(model, lr=0.1, momentum=0.9, weight_decay=5e-4, bn_lr_scale=64)
    assert sorted(g["lr"] for g in opt.param_groups) == [0.1, 0.1, 6.4]


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory: pytest.TempPathFactory, smoke_config_path):
    from adaptive_quant.training.pipeline import run_training

    tmp = tmp_path_factory.mktemp("recipe")
    cfg = load_config(smoke_config_path, [*RECIPE, f"output_dir={tmp / 'run'}", "tracking.enabled=false"])
    return cfg, run_training(cfg)


def test_recipe_network_trains_quantizes_and_converts(recipe_run) -> None:
    cfg, result = recipe_run
    m = result.metrics
    assert m["fp32_test_acc"] > 0.5 and m["int8_test_acc"] > 0.5  # synthetic classes: chance is 0.1
    payload = load_checkpoint(result.checkpoint)
    _, float_model = restore_float_model(payload)
    # what was kept is what training produced: fixed BN scales still 1, the fitted whitening filters
    stem = float_model.stem
    assert isinstance(stem, WhiteningStem) and stem.conv.weight.abs().sum() > 0
    assert all(torch.all(mod.weight == 1) for mod in float_model.modules() if isinstance(mod, nn.BatchNorm2d))
    converted = restore_converted_model(payload)
    val = load_dataset(cfg.data, cfg.seed).val
    fp = predict_logits(float_model, val.images)
    q = predict_logits(converted, val.images)
    # converted INT8 vs FP32 on the validation images: same class nearly everywhere, logits close
    agreement = float((fp.argmax(1) == q.argmax(1)).mean())
    assert agreement >= 0.9, f"top-1 agreement {agreement:.3f}"
    assert float(np.abs(fp - q).mean() / fp.std()) < 0.25
    assert any("quantize_per" in str(n.target) for n in converted.graph.nodes)
