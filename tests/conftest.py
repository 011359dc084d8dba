"""Tiny configs, supernets and checkpoints built in tmp_path for the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny import TINY, write_yaml
from ufo.checkpoint import init_supernet, save_supernet
from ufo.config import load_config


@pytest.fixture
def tiny_config_file(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "tiny.yaml", TINY)


@pytest.fixture
def tiny_cfg(tiny_config_file: Path):
    return load_config(tiny_config_file)


@pytest.fixture
def tiny_checkpoint(tmp_path: Path, tiny_cfg) -> Path:
    """A supernet checkpoint whose FFN-task MLPs differ from FFN-shared, so paths matter."""
    return save_supernet(init_supernet(tiny_cfg), tiny_cfg, tmp_path / "ckpt" / "supernet.safetensors")
