"""An exported subnet as files: what its directory holds and how timm alone loads it as deployed.

`ufo/export.py` writes these directories; `ufo eval`, tracking and quantisation read them here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import timm
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ufo.errors import ExportError
from ufo.model import narrow_attention

FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx", "torchscript": "model.torchscript.pt",
         "onnx-int8": "model.int8.onnx"}


class DeployedSubnet(nn.Module):
    """The timm subnet plus the task's postprocessing (L2 normalization for retrieval), for ONNX/TorchScript."""

    def __init__(self, vit: VisionTransformer, normalize: bool):
        super().__init__()
        self.vit = vit
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.vit(images)
        return nn.functional.normalize(out, dim=-1) if self.normalize else out


def timm_subnet(config: dict) -> VisionTransformer:
    """The subnet's timm ViT on the meta device: `timm.create_model(architecture, **model_args)` (the
    architecture's definition holds what model_args cannot: a CLIP's LayerNorm epsilon), its blocks'
    attention narrowed where config.json's `ufo.attention` says so (`narrow_attention`)."""
    with torch.device("meta"):
        vit = timm.create_model(config.get("architecture", "vit_base_patch16_224"), pretrained=False,
                                **config["model_args"])
        attention = config.get("ufo", {}).get("attention")
        if attention:  # fewer heads, each of the supernet's width: timm's Attention with attn_head_dim
            narrow_attention(vit, attention["num_heads"], attention["head_dim"])
        return vit


def subnet_config(directory: str | Path) -> dict:
    """An exported subnet's config.json (timm's, with ufo's `ufo` section)."""
    file = Path(directory) / "config.json"
    try:
        config = json.loads(file.read_text())
        if not isinstance(config["model_args"], dict) or not all(isinstance(config["ufo"][k], str)
                                                                 for k in ("kind", "task")):
            raise TypeError("model_args")
    except FileNotFoundError:
        raise ExportError(f"{directory}: not an exported subnet (no config.json)") from None
    except (ValueError, KeyError, TypeError):
        raise ExportError(f"{file}: not a ufo subnet's config (model_args and ufo.kind expected)") from None
    return config


def load_subnet(directory: str | Path) -> tuple[DeployedSubnet, dict]:
    """An exported subnet as deployed, with timm alone: `timm.create_model(architecture, **model_args)`
    from its config.json (the architecture's definition holds what model_args cannot: a CLIP's
    LayerNorm epsilon), its model.safetensors, and the task's postprocessing; and the config."""
    directory = Path(directory)
    file = directory / "config.json"
    config = subnet_config(directory)
    kind = config["ufo"]["kind"]
    weights = directory / FILES["safetensors"]
    if not weights.is_file():
        raise ExportError(f"{directory}: no {FILES['safetensors']} (exported without the safetensors format)")
    try:
        vit = timm_subnet(config)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ExportError(f"{file}: timm cannot build its architecture ({str(e).splitlines()[0]})") from None
    try:
        vit.load_state_dict(load_file(weights), strict=True, assign=True)
    except (RuntimeError, OSError) as e:
        raise ExportError(f"{weights}: does not match {file}'s model_args ({str(e).splitlines()[0]})") from None
    return DeployedSubnet(vit, normalize=(kind == "retrieval")).eval(), config


def onnx_session(file: str | Path, threads: int | None = None):
    """An onnxruntime CPU session of an exported graph (`threads`: intra-op threads, default all)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # onnxruntime's warnings about unused initialisers are noise here
    return onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])


def onnx_forward(file: str | Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> the graph's output, as a torch tensor (what `evaluate_task` calls)."""
    s = onnx_session(file)

    def forward(images: torch.Tensor) -> torch.Tensor:
        if not len(images):
            return torch.zeros(0, s.get_outputs()[0].shape[-1])
        return torch.from_numpy(s.run(None, {"images": images.float().numpy()})[0])

    return forward
