"""The training/experiment config (config.py): YAML + --set on the machinery the gateway's settings use."""

import json
from pathlib import Path

import pytest
import yaml

from adaptive_quant.config import (
    ConfigError,
    ExperimentConfig,
    ExportConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    flatten,
    load_config,
)
from adaptive_quant.core.settings import ConfigError as CoreConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml", "resnet.yaml"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.seed == 42


def test_override_changes_value_and_keeps_type() -> None:
    cfg = load_config(
        ROOT / "configs" / "default.yaml", ["train.epochs=5", "train.lr=1", "model.widths=[16, 32, 64, 128]"]
    )
    assert cfg.train.epochs == 5
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # an int is accepted where a float is expected
    assert cfg.model.widths == [16, 32, 64, 128]


def test_overrides_of_text_keys_keep_the_text() -> None:
    cfg = load_config(None, ["tracking.run_name=0x1F", "output_dir=yes", "tracking.tracking_uri=null", "seed=7"])
    assert (cfg.tracking.run_name, cfg.output_dir, cfg.tracking.tracking_uri, cfg.seed) == ("0x1F", "yes", None, 7)


def test_unknown_key_is_refused_with_its_name_and_the_known_ones(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == (
        "unknown config key 'train.epocs'; known here: batch_size, bf16, bn_lr_scale, bn_weight_decay, channels_last, "
        "epochs, eval_batch_size, label_smoothing, lookahead_steps, lr, lr_end_factor, lr_start_factor, "
        "max_steps_per_epoch, momentum, seed, threads, warmup_fraction, weight_decay, whiten_bias_epochs"
    )


def test_unknown_override_section_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'; known here: augment, data, export"):
        load_config(None, ["trian.epochs=3"])


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'train\.epochs': must be an integer, got 'five'$"):
        load_config(None, ["train.epochs=five"])
    with pytest.raises(ConfigError, match=r"^config key 'train\.bf16': must be true or false, got 3$"):
        load_config(None, ["train.bf16=3"])
    with pytest.raises(ConfigError, match=r"^config key 'model\.widths\[1\]': must be an integer, got 'x'$"):
        load_config(None, ["model.widths=[8, x, 16, 16]"])


def test_invalid_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'train\.lr': must be > 0, got -1$"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match=r"'train\.warmup_fraction': must be in \[0, 1\), got 1$"):
        load_config(None, ["train.warmup_fraction=1"])
    with pytest.raises(ConfigError, match=r"'model\.widths': needs 4 entries \(stem \+ 3 stages\), got \[8, 16\]"):
        load_config(None, ["model.widths=[8, 16]"])
    with pytest.raises(ConfigError, match=r"'data\.source': must be one of 'folder' or 'synthetic', got 'imagenet'"):
        load_config(None, ["data.source=imagenet"])
    with pytest.raises(ConfigError, match=r"'export\.instance_kind': must be one of 'KIND_AUTO', 'KIND_CPU' or"):
        load_config(None, ["export.instance_kind=KIND_TPU"])
    with pytest.raises(ConfigError, match=r"qat.*epochs must be >= 1 while qat.enabled is true; set qat.enabled=false"):
        load_config(None, ["qat.epochs=0"])
    assert load_config(None, ["qat.epochs=0", "qat.enabled=false"]).qat.enabled is False
    with pytest.raises(
        ConfigError, match=r"'export\.shift_corruptions'.*unknown corruption\(s\) \['fog'\]; accepted: noise"
    ):
        load_config(None, ["export.shift_corruptions=[noise, fog]"])


def test_sections_validate_on_construction_and_are_frozen() -> None:
    with pytest.raises(ConfigError, match=r"^config key 'train\.lr': must be > 0, got 0$"):
        TrainConfig(lr=0)
    cfg = ExperimentConfig()
    with pytest.raises(ValueError, match="frozen"):
        cfg.export.ptq_calibration_images = 256  # type: ignore[misc]
    # a stage that needs other values builds a copy; the original is untouched
    fewer = cfg.model_copy(update={"export": cfg.export.model_copy(update={"ptq_calibration_images": 256})})
    assert fewer.export.ptq_calibration_images == 256 and cfg.export.ptq_calibration_images == 512
    assert ConfigError is CoreConfigError  # one error type for the gateway's settings and this config


def test_a_training_run_reads_no_environment(monkeypatch) -> None:
    """The run is its file plus its overrides, both recorded: the gateway's AQ_* variables stay out."""
    monkeypatch.setenv("AQ_TRAIN__EPOCHS", "99")
    monkeypatch.setenv("AQ_SEED", "1")
    assert load_config(ROOT / "configs" / "smoke.yaml").train.epochs == 3
    assert ExperimentConfig().seed == 42


def test_importing_the_config_leaves_the_warnings_filters_alone() -> None:
    import warnings

    assert not any("register" in getattr(f[1], "pattern", "") for f in warnings.filters if f[1] is not None)


def test_malformed_override_is_explained() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"cannot set config key 'seed\.x': 'seed' is a value, not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])
    with pytest.raises(ConfigError, match=r"^cannot set config key 'seed\.x': 'seed' is a value, not a section$"):
        load_config(None, ["seed.x=2"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_round_trip_through_plain_data_as_checkpoints_store_it() -> None:
    cfg = load_config(ROOT / "configs" / "smoke.yaml", ["train.lr=0.3", "export.register=false"])
    data = config_to_dict(cfg)
    json.dumps(data)  # plain data only: torch.load(weights_only=True) and yaml.safe_dump take it
    assert config_from_dict(data) == cfg
    assert config_from_dict(yaml.safe_load(yaml.safe_dump(data))) == cfg
    # a checkpoint's config is a dict with every key (what the dataclass version stored too)
    assert set(data) == set(ExperimentConfig.model_fields) and data["export"]["register"] is False
    # the export stage overrides a checkpoint's dict the same way
    patched = config_from_dict(apply_overrides(data, ["export.repository=/tmp/r", "export.max_batch_size=32"]))
    assert patched.export == ExportConfig(
        **{**config_to_dict(cfg)["export"], "repository": "/tmp/r", "max_batch_size": 32}
    )


def test_a_checkpoint_from_before_the_pixel_predictor_was_retired_still_loads(caplog) -> None:
    """Checkpoints store the whole config; those written before carry a `predictor` section."""
    data = config_to_dict(load_config(ROOT / "configs" / "smoke.yaml"))
    old = {**data, "predictor": {"hidden": [64, 32], "epochs": 10, "batch_size": 256}}
    with caplog.at_level("INFO", logger="adaptive_quant.config"):
        cfg = config_from_dict(old)
    assert config_to_dict(cfg) == data  # nothing else changed, and the section is gone
    assert any("'predictor' ignored" in r.getMessage() and "retired" in r.getMessage() for r in caplog.records)
    with pytest.raises(
        ConfigError, match=r"^unknown config key 'predictor\.epochs': the pre-inference pixel predictor was retired$"
    ):
        load_config(None, ["predictor.epochs=3"])  # setting it now is a mistake, said so


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(config_to_dict(ExperimentConfig()))
    assert flat["train.epochs"] == ExperimentConfig().train.epochs
    assert "qat.freeze_bn_epoch" in flat
    assert flatten(ExperimentConfig()) == flat  # the model itself flattens the same
