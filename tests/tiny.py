"""A tiny config every test can build supernets and checkpoints from."""

from __future__ import annotations

from pathlib import Path

import yaml

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


def with_every_ffn(cfg):
    """The config with model.ffns: all (the tiny config's fixed paths build only their own FFNs)."""
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"ffns": "all"})})
