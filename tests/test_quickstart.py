"""Quickstart's config lookup: checkout, working directory, and an install's data files."""

import sysconfig

import pytest

from condlora.core.errors import CondloraError
from condlora.evaluation import quickstart

from .conftest import CONFIGS


def test_finds_the_checkout_config():
    assert quickstart.find_config("digits-baseline.yaml") == CONFIGS / "digits-baseline.yaml"


def test_finds_installed_data_files_outside_the_checkout(tmp_path, monkeypatch):
    data = tmp_path / "prefix"
    shipped = data / "share" / "condlora" / "configs"
    shipped.mkdir(parents=True)
    (shipped / "digits-baseline.yaml").write_text("name: from-install\n")
    monkeypatch.setattr(quickstart, "CONFIG_DIR", tmp_path / "no-checkout")
    monkeypatch.setattr(sysconfig, "get_path", lambda name: str(data))
    monkeypatch.chdir(tmp_path)
    assert quickstart.find_config("digits-baseline.yaml") == shipped / "digits-baseline.yaml"
    with pytest.raises(CondloraError, match="run quickstart from the repository root"):
        quickstart.find_config("digits-missing.yaml")


def test_pyproject_ships_every_config_folder():
    text = (CONFIGS.parent / "pyproject.toml").read_text()
    folders = {p.parent for p in CONFIGS.rglob("*.yaml")}
    for folder in folders:
        rel = folder.relative_to(CONFIGS.parent).as_posix()
        assert f'["{rel}/*.yaml"]' in text, f"{rel} is not in [tool.setuptools.data-files]"
