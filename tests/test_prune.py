"""Channel pruning: the pruned network has the stated widths, keeps the best filters, still computes
what the kept channels computed, and goes through PT2E QAT and conversion like the full one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from adaptive_quant.config import ConfigError, ModelConfig, load_config
from adaptive_quant.training.checkpoint import load_checkpoint, restore_converted_model, restore_float_model
from adaptive_quant.training.engine import predict_logits
from adaptive_quant.training.model import build_model, count_parameters
from adaptive_quant.training.prune import prune_channels
from adaptive_quant.training.quantize import convert, prepare_qat, set_qat_mode


def _trained_like(cfg: ModelConfig) -> nn.Module:
    """A model with non-trivial BN statistics (one forward pass in train mode), then eval."""
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    with torch.no_grad():
        model(torch.randn(64, 3, 32, 32))
    return model.eval()


def _conv_widths(model: nn.Module) -> list[tuple[int, int]]:
    return [(m.in_channels, m.out_channels) for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_residual_network_is_pruned_to_the_stated_widths() -> None:
    cfg = ModelConfig(widths=[16, 32, 64, 64], blocks=[1, 0, 2])
    pruned, new_cfg = prune_channels(_trained_like(cfg), cfg, amount=0.25)
    assert new_cfg.widths == [12, 24, 48, 48]
    assert new_cfg.inner_widths == [24, 48, 48]  # stage 2 has no block: its inner width is unused
    # stem, stage0 down + block (inner 24, back to the 24-wide skip), stage1 down, stage2 down + 2 blocks
    assert _conv_widths(pruned) == [
        (3, 12),
        (12, 24),
        (24, 24),
        (24, 24),
        (24, 48),
        (48, 48),
        (48, 48),
        (48, 48),
        (48, 48),
        (48, 48),
    ]
    assert pruned.fc.in_features == 48
    assert count_parameters(pruned) < 0.6 * count_parameters(build_model(cfg))
    # the config alone rebuilds it (what checkpoints rely on)
    build_model(new_cfg).load_state_dict(pruned.state_dict())


def test_plain_whitening_network_keeps_the_stem_and_prunes_the_rest() -> None:
    cfg = ModelConfig(stem="whiten", widths=[12, 32, 64, 64], blocks=[1, 1, 1], block="plain", bn_scale=False)
    pruned, new_cfg = prune_channels(_trained_like(cfg), cfg, amount=0.5)
    assert new_cfg.widths == [12, 16, 32, 32]  # the fixed whitening stem is never cut
    assert new_cfg.inner_widths == [16, 32, 32]
    assert _conv_widths(pruned) == [(3, 12), (12, 16), (16, 16), (16, 32), (32, 32), (32, 32), (32, 32)]
    with pytest.raises(ValueError, match="bn_scale is false"):
        prune_channels(_trained_like(cfg), cfg, amount=0.5, criterion="bn")


def test_pruning_keeps_the_highest_scored_filters_and_their_outputs() -> None:
    cfg = ModelConfig(widths=[8, 16, 16, 16], blocks=[0, 0, 0])
    model = _trained_like(cfg)
    with torch.no_grad():  # make stem filters 1, 4 and 6 the weakest by L1 norm
        model.stem[0].weight[[1, 4, 6]] *= 1e-3
    pruned, new_cfg = prune_channels(model, cfg, amount=0.375)  # 8 → 5 stem channels
    assert new_cfg.widths[0] == 5
    kept = [0, 2, 3, 5, 7]
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # the kept stem channels compute exactly what they did before
        assert torch.allclose(pruned.stem(x), model.stem(x)[:, kept], atol=1e-6)


def test_pruned_network_quantizes_and_converts() -> None:
    cfg = ModelConfig(widths=[16, 32, 64, 64], blocks=[1, 1, 1])
    pruned, _ = prune_channels(_trained_like(cfg), cfg, amount=0.5)
    prepared = prepare_qat(pruned)
    prepared(torch.randn(32, 3, 32, 32))  # observers see data (train mode)
    set_qat_mode(prepared, train=False, freeze_bn=True, freeze_observers=True)
    converted = convert(prepared)
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    fq, q = predict_logits(prepared, images), predict_logits(converted, images)
    assert q.shape == (64, 10)
    assert float(np.abs(fq - q).mean() / fq.std()) < 0.1
    assert any("quantize_per" in str(n.target) for n in converted.graph.nodes)


def test_prune_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="prune.amount"):
        load_config(None, ["prune.amount=1.5"])
    with pytest.raises(ConfigError, match="model.inner_widths"):
        load_config(None, ["model.inner_widths=[8, 8]"])
    # refused at load time, before an hour of float training, not when pruning starts
    with pytest.raises(ConfigError, match=r"^config key 'prune\.criterion': 'bn' ranks channels by BN scale"):
        load_config(None, ["prune.enabled=true", "prune.criterion=bn", "model.bn_scale=false"])


def test_pipeline_prunes_finetunes_and_saves_a_restorable_checkpoint(tmp_path, smoke_config_path) -> None:
    from adaptive_quant.training.pipeline import run_training

    cfg = load_config(
        smoke_config_path,
        [
            f"output_dir={tmp_path / 'run'}",
            "tracking.enabled=false",
            "train.epochs=2",
            "qat.epochs=1",
            "prune.enabled=true",
            "prune.amount=0.5",
            "prune.finetune_epochs=1",
        ],
    )
    result = run_training(cfg)
    m = result.metrics
    assert m["prune/params_after"] < m["prune/params_before"] == pytest.approx(count_parameters(build_model(cfg.model)))
    payload = load_checkpoint(result.checkpoint)
    assert payload["config"]["model"]["widths"] == [4, 8, 16, 16]  # smoke widths [8, 16, 32, 32] halved
    _, float_model = restore_float_model(payload)
    assert count_parameters(float_model) == m["parameters"] == m["prune/params_after"]
    converted = restore_converted_model(payload)  # QAT ran on the pruned graph
    assert predict_logits(converted, np.zeros((2, 32, 32, 3), np.uint8)).shape == (2, 10)
    assert m["int8_test_acc"] > 0.3  # synthetic data, chance 0.1: the pruned net still classifies
