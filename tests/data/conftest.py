"""Fixtures of the data tests: timm transforms and a small set of uneven shards."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardtools import write_synth
from ufo.config import config_from_dict
from ufo.data.loader import build_transform


@pytest.fixture
def transform():
    cfg = config_from_dict({"model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "num_heads": 2},
                            "tasks": {"shapes": {"kind": "classification", "num_classes": 5}}}, "test")
    return {"train": build_transform(cfg, "shapes", True), "eval": build_transform(cfg, "shapes", False)}


@pytest.fixture
def shards(tmp_path) -> Path:
    """50 samples in shards of 7 (the last one of 1): uneven on purpose."""
    return write_synth(tmp_path / "shapes")
