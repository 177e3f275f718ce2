"""Config lookup: checkout, working directory, and an install's data files."""

import sysconfig

import pytest

from condlora.core import config
from condlora.core.errors import ConfigError

from .conftest import CONFIGS


def test_finds_the_checkout_config():
    assert config.find_config("digits-baseline.yaml") == CONFIGS / "digits-baseline.yaml"


def test_finds_installed_data_files_outside_the_checkout(tmp_path, monkeypatch):
    data = tmp_path / "prefix"
    shipped = data / "share" / "condlora" / "configs"
    shipped.mkdir(parents=True)
    (shipped / "digits-baseline.yaml").write_text("name: from-install\n")
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "no-checkout")
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(data))
    monkeypatch.chdir(tmp_path)
    assert config.find_config("digits-baseline.yaml") == shipped / "digits-baseline.yaml"
    with pytest.raises(ConfigError, match="run from the repository root"):
        config.find_config("digits-missing.yaml")


def test_pyproject_ships_every_config_folder():
    text = (CONFIGS.parent / "pyproject.toml").read_text()
    folders = {p.parent for p in CONFIGS.rglob("*.yaml")}
    for folder in folders:
        rel = folder.relative_to(CONFIGS.parent).as_posix()
        assert f'["{rel}/*.yaml"]' in text, f"{rel} is not in [tool.setuptools.data-files]"
