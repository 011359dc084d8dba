"""Tiny configs, supernets and checkpoints built in tmp_path for the tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny import TINY, with_every_ffn, write_yaml
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
    """A supernet checkpoint with every FFN (model.ffns: all), its FFN-task MLPs different from FFN-shared,
    so paths matter."""
    cfg = with_every_ffn(tiny_cfg)
    return save_supernet(init_supernet(cfg), cfg, tmp_path / "ckpt" / "supernet.safetensors")

