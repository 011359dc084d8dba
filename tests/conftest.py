"""Tiny configs, supernets and checkpoints built in tmp_path for the tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ufo.checkpoint import init_supernet, save_supernet
from ufo.config import load_config

TINY = {
    "model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 4, "num_heads": 2,
              "mlp_ratio": 2.0, "task_ffn_init": "random"},
    "tasks": {
        "face": {"kind": "retrieval", "num_classes": 20, "embedding_dim": 24, "margin": "arcface",
                 "margin_value": 0.5, "path": "SSTT"},
        "person": {"kind": "retrieval", "num_classes": 15, "path": "STST"},
        "digits": {"kind": "classification", "num_classes": 10, "path": "TSSS"},
    },
    "train": {"seed": 3},
    "export": {"formats": ["safetensors"]},
}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


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
