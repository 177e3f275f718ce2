"""Config loading: defaults, overrides, and clear errors on bad keys and values."""

from pathlib import Path

import pytest

from condlora.core.config import parse_overrides, to_dict
from condlora.core.errors import ConfigError
from condlora.image.config import Config, config_from_json, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_every_shipped_digits_config_loads():
    names = {p.name for p in CONFIGS.glob("digits-*.yaml")}
    expected = {"baseline", "uclora", "timelora", "classlora", "onlylora"}
    assert {f"digits-{n}.yaml" for n in expected} <= names
    for name in names:
        cfg = load_config(CONFIGS / name)
        assert cfg.name == name.removesuffix(".yaml")


def test_yaml_overrides_defaults_and_keeps_the_rest(tmp_path):
    cfg = load_config(write(tmp_path, "lora:\n  method: uc\n  rank: 2\ntrain:\n  lr: 1\n"))
    assert cfg.lora.method == "uc" and cfg.lora.rank == 2
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == Config().train.batch_size


def test_command_line_overrides_win(tmp_path):
    path = write(tmp_path, "train:\n  lr: 0.5\n")
    cfg = load_config(path, ["train.lr=1e-3", "net.channel_mult=[1, 2]", "data.path="])
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.net.channel_mult == [1, 2]
    assert cfg.data.path is None


def test_misspelled_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "net:\n  model_chanels: 8\n"))
    message = str(err.value)
    assert "net.model_chanels" in message and "model_channels" in message
    assert "num_blocks" in message  # the list of valid keys


def test_unknown_top_level_and_override_keys(tmp_path):
    with pytest.raises(ConfigError, match="valid keys"):
        load_config(write(tmp_path, "trian: {}\n"))
    with pytest.raises(ConfigError, match="lora.rnak"):
        load_config(write(tmp_path, ""), ["lora.rnak=3"])


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("train:\n  max_steps: ten\n", "integer"),
        ("train:\n  lr: fast\n", "float"),
        ("net:\n  class_conditional: 3\n", "true or false"),
        ("net:\n  channel_mult: 2\n", "list"),
        ("net: 5\n", "mapping"),
    ],
)
def test_wrong_types_are_refused(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(write(tmp_path, text))


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["train.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_json_round_trip(tmp_path):
    import json

    cfg = load_config(CONFIGS / "digits-classlora.yaml", ["train.seed=7"])
    assert config_from_json(json.dumps(to_dict(cfg))) == cfg


def test_base_file_is_merged_underneath(tmp_path):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "base.yaml").write_text("train:\n  lr: 0.5\n  batch_size: 8\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: shared/base.yaml\ntrain:\n  batch_size: 4\n")
    cfg = load_config(child, ["train.max_steps=7"])
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.max_steps) == (0.5, 4, 7)


def test_base_cycle_and_missing_base_are_config_errors(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("base: b.yaml\n")
    b.write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(a)
    b.write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="not found"):
        load_config(a)
