"""The training pipeline: float training → QAT fine-tuning → converted INT8, tracked in MLflow.

Model selection uses the validation split only; the test split is evaluated once at the end,
for the report, and never feeds back into any choice.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from adaptive_quant.config import ExperimentConfig, config_to_dict, flatten
from adaptive_quant.data import Dataset, load_dataset
from adaptive_quant.tracking import Tracker, git_commit, start_run
from adaptive_quant.training.augment import alternating_flip_mask, to_normalized_tensor
from adaptive_quant.training.averaging import Lookahead
from adaptive_quant.training.checkpoint import save_checkpoint
from adaptive_quant.training.engine import cosine, evaluate, make_optimizer, one_cycle, steps_per_epoch, train_one_epoch
from adaptive_quant.training.model import CifarResNet, build_model, count_parameters
from adaptive_quant.training.prune import prune_channels
from adaptive_quant.training.quantize import convert, prepare_qat, set_qat_mode
from adaptive_quant.training.whitening import WhiteningStem

log = logging.getLogger(__name__)


@dataclass
class TrainingResult:
    checkpoint: Path
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _state_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def build_float_model(cfg: ExperimentConfig, data: Dataset) -> CifarResNet:
    """The untrained network; a whitening stem is fitted on the first whiten_images training images."""
    model = build_model(cfg.model)
    if isinstance(model.stem, WhiteningStem):
        images = to_normalized_tensor(data.train.images[: cfg.model.whiten_images])
        model.stem.fit(images, cfg.model.whiten_eps)
    return model


def train_float(
    cfg: ExperimentConfig, data: Dataset, tracker: Tracker, gen: torch.Generator
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Float phase: one-cycle Nesterov SGD; keeps the epoch with the best validation accuracy.

    With lookahead the averaged weights are the ones validated, selected and returned.
    """
    t = cfg.train
    model = build_float_model(cfg, data)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    n_steps = steps_per_epoch(len(data.train), t.batch_size, t.max_steps_per_epoch)
    total_steps = n_steps * max(1, t.epochs)
    optimizer = make_optimizer(model, t.lr, t.momentum, t.weight_decay, t.bn_lr_scale, t.bn_weight_decay)
    schedule = one_cycle(total_steps, t.warmup_fraction, t.lr_start_factor, t.lr_end_factor)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lookahead = Lookahead(model, total_steps, t.lookahead_steps) if t.lookahead_steps else None
    flip_base = None
    if cfg.augment.flip and cfg.augment.flip_mode == "alternate":
        flip_base = alternating_flip_mask(len(data.train), 0, gen)
    whiten = model.stem if isinstance(model.stem, WhiteningStem) else None
    best_acc, best_state, best_epoch = -1.0, _state_copy(model), -1
    bar = tqdm(range(t.epochs), desc="float", unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        if whiten is not None:  # airbench: the whitening bias adapts early, then stays fixed
            whiten.conv.bias.requires_grad_(epoch < t.whiten_bias_epochs)
        stats = train_one_epoch(
            model,
            data.train,
            optimizer,
            scheduler,
            cfg.augment,
            t.batch_size,
            gen,
            label_smoothing=t.label_smoothing,
            bf16=t.bf16,
            channels_last=t.channels_last,
            max_steps=t.max_steps_per_epoch,
            desc=f"float {epoch + 1}/{t.epochs}",
            flip_mask=None if flip_base is None else alternating_flip_mask(len(data.train), epoch, gen, flip_base),
            after_step=None if lookahead is None else lambda: lookahead.after_step(model),
        )
        if lookahead is not None:  # validate (and keep) the average, not the last few live steps
            lookahead.sync(model, decay=1.0 if epoch == t.epochs - 1 else None)
        # validation in fp32 (no autocast): the number we select on is the FP32 model's
        val = evaluate(model, data.val, t.eval_batch_size, bf16=False, channels_last=t.channels_last)
        tracker.log_metrics(
            {
                "float/train_loss": stats.loss,
                "float/train_acc": stats.accuracy,
                "float/lr": stats.lr,
                "float/val_loss": val.loss,
                "float/val_acc": val.accuracy,
                "float/epoch_s": stats.seconds,
                "float/images_per_s": stats.images_per_s,
            },
            step=epoch,
        )
        log.info(
            "float epoch %d/%d: loss %.4f train %.4f val %.4f (%.0f s, %.0f img/s)",
            epoch + 1,
            t.epochs,
            stats.loss,
            stats.accuracy,
            val.accuracy,
            stats.seconds,
            stats.images_per_s,
        )
        bar.set_postfix(loss=f"{stats.loss:.3f}", val=f"{val.accuracy:.4f}", s=f"{stats.seconds:.0f}")
        if val.accuracy > best_acc:
            best_acc, best_state, best_epoch = val.accuracy, _state_copy(model), epoch
    model.load_state_dict(best_state)
    model = model.to(memory_format=torch.contiguous_format).eval()
    return model, {"float_val_acc": best_acc, "float_best_epoch": float(best_epoch)}


def prune_and_finetune(
    cfg: ExperimentConfig, model: CifarResNet, data: Dataset, tracker: Tracker, gen: torch.Generator
) -> tuple[CifarResNet, ExperimentConfig, dict[str, float]]:
    """Channel pruning (prune.amount of every group), then a short float fine-tune (cosine lr).

    Returns the pruned model, the config whose model section rebuilds it, and metrics; the
    fine-tune epoch with the best validation accuracy is kept.
    """
    p, t = cfg.prune, cfg.train
    before = count_parameters(model)
    pruned, model_cfg = prune_channels(model, cfg.model, p.amount, p.criterion)
    cfg = cfg.model_copy(update={"model": model_cfg})  # the other sections are shared, never changed
    val = evaluate(pruned, data.val, t.eval_batch_size)
    log.info(
        "pruned %.0f%% of channels: widths %s inner %s, %d → %d parameters, val %.4f before fine-tuning",
        100 * p.amount,
        model_cfg.widths,
        model_cfg.inner_widths,
        before,
        count_parameters(pruned),
        val.accuracy,
    )
    metrics = {
        "prune/params_before": float(before),
        "prune/params_after": float(count_parameters(pruned)),
        "prune/val_acc_before_finetune": val.accuracy,
    }
    tracker.log_metrics(metrics)
    best_acc, best_state = val.accuracy, _state_copy(pruned)
    if t.channels_last:
        pruned = pruned.to(memory_format=torch.channels_last)
    n_steps = steps_per_epoch(len(data.train), t.batch_size, p.finetune_max_steps_per_epoch)
    optimizer = make_optimizer(pruned, p.finetune_lr, t.momentum, t.weight_decay, t.bn_lr_scale, t.bn_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(n_steps * max(1, p.finetune_epochs)))
    for epoch in range(p.finetune_epochs):
        stats = train_one_epoch(
            pruned,
            data.train,
            optimizer,
            scheduler,
            cfg.augment,
            t.batch_size,
            gen,
            label_smoothing=t.label_smoothing,
            bf16=t.bf16,
            channels_last=t.channels_last,
            max_steps=p.finetune_max_steps_per_epoch,
            desc=f"prune fine-tune {epoch + 1}/{p.finetune_epochs}",
        )
        val = evaluate(pruned, data.val, t.eval_batch_size, channels_last=t.channels_last)
        tracker.log_metrics(
            {"prune/train_loss": stats.loss, "prune/val_acc": val.accuracy, "prune/epoch_s": stats.seconds}, step=epoch
        )
        log.info("prune fine-tune epoch %d: val %.4f (%.0f s)", epoch + 1, val.accuracy, stats.seconds)
        if val.accuracy > best_acc:
            best_acc, best_state = val.accuracy, _state_copy(pruned)
    pruned.load_state_dict(best_state)
    metrics["prune/val_acc"] = best_acc
    return pruned.to(memory_format=torch.contiguous_format).eval(), cfg, metrics


def train_qat(
    cfg: ExperimentConfig, float_model: torch.nn.Module, data: Dataset, tracker: Tracker, gen: torch.Generator
) -> tuple[torch.fx.GraphModule, dict[str, torch.Tensor], dict[str, float]]:
    """QAT phase: fine-tune the fake-quant graph; each epoch converts a copy to INT8 and validates *that*.

    Returns the best converted model (by converted validation accuracy), the matching
    prepared-graph state (weights + observer scales) and metrics.
    """
    q = cfg.qat
    prepared = prepare_qat(float_model, cfg.data.image_size)
    n_steps = steps_per_epoch(len(data.train), q.batch_size, q.max_steps_per_epoch)
    optimizer = make_optimizer(prepared, q.lr, cfg.train.momentum, cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine(n_steps * q.epochs))
    best: tuple[float, torch.fx.GraphModule | None, dict[str, torch.Tensor], int] = (-1.0, None, {}, -1)
    fq_val_acc = float("nan")
    bar = tqdm(range(q.epochs), desc="qat", unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        freeze_bn = epoch >= q.freeze_bn_epoch
        freeze_obs = epoch >= q.freeze_observers_epoch
        set_qat_mode(prepared, train=True, freeze_bn=freeze_bn, freeze_observers=freeze_obs)
        stats = train_one_epoch(
            prepared,
            data.train,
            optimizer,
            scheduler,
            cfg.augment,
            q.batch_size,
            gen,
            label_smoothing=cfg.train.label_smoothing,
            bf16=False,
            channels_last=False,
            max_steps=q.max_steps_per_epoch,
            desc=f"qat {epoch + 1}/{q.epochs}",
        )
        set_qat_mode(prepared, train=False, freeze_bn=True, freeze_observers=True)
        fq_val = evaluate(prepared, data.val, cfg.train.eval_batch_size)
        converted = convert(prepared)
        int8_val = evaluate(converted, data.val, cfg.train.eval_batch_size)
        fq_val_acc = fq_val.accuracy
        tracker.log_metrics(
            {
                "qat/train_loss": stats.loss,
                "qat/train_acc": stats.accuracy,
                "qat/lr": stats.lr,
                "qat/fakequant_val_acc": fq_val.accuracy,
                "qat/int8_val_acc": int8_val.accuracy,
                "qat/epoch_s": stats.seconds,
                "qat/images_per_s": stats.images_per_s,
                "qat/bn_frozen": float(freeze_bn),
                "qat/observers_frozen": float(freeze_obs),
            },
            step=epoch,
        )
        log.info(
            "qat epoch %d/%d: loss %.4f fake-quant val %.4f converted INT8 val %.4f (%.0f s)",
            epoch + 1,
            q.epochs,
            stats.loss,
            fq_val.accuracy,
            int8_val.accuracy,
            stats.seconds,
        )
        bar.set_postfix(fq=f"{fq_val.accuracy:.4f}", int8=f"{int8_val.accuracy:.4f}")
        if int8_val.accuracy > best[0]:
            best = (int8_val.accuracy, converted, _state_copy(prepared), epoch)
    if best[1] is None:  # qat.epochs == 0: post-training calibration only would go here; convert as is
        set_qat_mode(prepared, train=False, freeze_bn=True, freeze_observers=True)
        converted = convert(prepared)
        best = (evaluate(converted, data.val, cfg.train.eval_batch_size).accuracy, converted, _state_copy(prepared), -1)
    metrics = {"int8_val_acc": best[0], "qat_best_epoch": float(best[3]), "qat_last_fakequant_val_acc": fq_val_acc}
    return best[1], best[2], metrics


def _float_from_checkpoint(cfg: ExperimentConfig, path: str | Path) -> tuple[torch.nn.Module, dict[str, float], str]:
    """Reuse a finished float phase (e.g. to redo QAT with another quantizer) instead of retraining."""
    from adaptive_quant.training.checkpoint import CheckpointError, load_checkpoint, restore_float_model

    payload = load_checkpoint(path)
    old_cfg, model = restore_float_model(payload)
    if old_cfg.model != cfg.model:
        raise CheckpointError(f"checkpoint {path} has model {old_cfg.model}, the config asks for {cfg.model}")
    keep = ("float_val_acc", "float_best_epoch", "float_seconds")
    metrics = {k: float(payload["metrics"][k]) for k in keep if k in payload["metrics"]}
    return model, metrics, str(payload.get("mlflow_run_id"))


def run_training(cfg: ExperimentConfig, float_checkpoint: str | Path | None = None) -> TrainingResult:
    """The whole pipeline. Writes <output_dir>/best.pt and config.yaml; logs everything to MLflow.

    float_checkpoint: skip the float phase and start QAT from that checkpoint's float weights
    (its float metrics and time are carried over, so totals still describe the whole pipeline).
    """
    start = time.perf_counter()
    gen = seed_everything(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_path = out_dir / "config.yaml"
    config_path.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    commit = git_commit()

    data = load_dataset(cfg.data, cfg.seed)
    log.info("data: %d train, %d val, %d test images", len(data.train), len(data.val), len(data.test))
    if cfg.train.seed is not None:  # the split is drawn; weights, order and augmentations use their own seed
        gen = seed_everything(cfg.train.seed)
    with start_run(cfg.tracking, kind="train") as tracker:
        tracker.log_params(flatten(config_to_dict(cfg)))
        tracker.set_tags({"git_commit": commit, "phase": "train", "data.source": cfg.data.source})
        tracker.log_artifact(config_path)
        metrics: dict[str, float] = {}

        t0 = time.perf_counter()
        if float_checkpoint is None:
            float_model, m = train_float(cfg, data, tracker, gen)
            metrics.update(m)
            metrics["float_seconds"] = time.perf_counter() - t0
        else:
            float_model, m, source_run = _float_from_checkpoint(cfg, float_checkpoint)
            metrics.update(m)
            tracker.set_tags({"float_from_checkpoint": str(float_checkpoint), "float_from_run": source_run})
        if cfg.prune.enabled:  # from here on cfg.model describes the pruned (narrower) network
            t0 = time.perf_counter()
            float_model, cfg, m = prune_and_finetune(cfg, float_model, data, tracker, gen)
            metrics.update(m)
            metrics["unpruned_val_acc"] = metrics["float_val_acc"]
            metrics["float_val_acc"] = m["prune/val_acc"]  # FP32 figures below describe the pruned network
            metrics["prune_seconds"] = time.perf_counter() - t0
            tracker.log_params(
                {"pruned.widths": str(cfg.model.widths), "pruned.inner_widths": str(cfg.model.inner_widths)}
            )
        metrics["parameters"] = float(count_parameters(float_model))
        metrics["fp32_test_acc"] = evaluate(float_model, data.test, cfg.train.eval_batch_size).accuracy

        qat_state = None
        if cfg.qat.enabled:
            t0 = time.perf_counter()
            converted, qat_state, m = train_qat(cfg, copy.deepcopy(float_model), data, tracker, gen)
            metrics.update(m)
            metrics["qat_seconds"] = time.perf_counter() - t0
            metrics["int8_test_acc"] = evaluate(converted, data.test, cfg.train.eval_batch_size).accuracy
            metrics["int8_minus_fp32_test"] = metrics["int8_test_acc"] - metrics["fp32_test_acc"]
        metrics["total_seconds"] = time.perf_counter() - start
        if float_checkpoint is not None:  # the float phase ran earlier: count its time in the total
            metrics["total_seconds"] += metrics.get("float_seconds", 0.0)

        ckpt = save_checkpoint(
            out_dir / "best.pt",
            cfg,
            _state_copy(float_model),
            qat_state,
            metrics,
            extra={"classes": data.classes, "git_commit": commit, "mlflow_run_id": tracker.run_id},
        )
        tracker.log_metrics(metrics)
        tracker.log_artifact(ckpt, artifact_path="checkpoint")
        return TrainingResult(checkpoint=ckpt, run_id=tracker.run_id, metrics=metrics)
