from pathlib import Path

import pytest

from adaptive_quant.config import ConfigError, ExperimentConfig, config_to_dict, flatten, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["default.yaml", "smoke.yaml"])
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


def test_unknown_key_is_refused_with_its_name(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epocs: 3\n")
    with pytest.raises(ConfigError, match=r"train\.epocs"):
        load_config(p)


def test_unknown_override_section_is_refused() -> None:
    with pytest.raises(ConfigError, match="trian"):
        load_config(None, ["trian.epochs=3"])


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs.*expected int.*'five'"):
        load_config(None, ["train.epochs=five"])
    with pytest.raises(ConfigError, match=r"train\.bf16"):
        load_config(None, ["train.bf16=3"])


def test_invalid_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model\.widths"):
        load_config(None, ["model.widths=[8, 16]"])
    with pytest.raises(ConfigError, match=r"data\.source"):
        load_config(None, ["data.source=imagenet"])


def test_malformed_override_is_explained() -> None:
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["train.epochs"])


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_flatten_gives_dotted_keys() -> None:
    flat = flatten(config_to_dict(ExperimentConfig()))
    assert flat["train.epochs"] == ExperimentConfig().train.epochs
    assert "qat.freeze_bn_epoch" in flat
