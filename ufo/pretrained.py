"""A pretrained ViT's architecture, for the supernet's start (`model.pretrained`).

A timm model name (`vit_base_patch16_224.mae`, `vit_base_patch16_clip_224.openai`,
`vit_small_patch14_reg4_dinov2.lvd142m`) is read two ways, both timm's own:
- its **architecture** from timm's definition of the model (`resolve_architecture`, here, at config
  load: an instance on the meta device, no weights), so that the supernet is built to fit them;
- its **weights** by timm's pretrained machinery (`ufo.checkpoint.pretrained_vit`):
  `timm.create_model(name, pretrained=True)` finds them in the local Hugging Face cache (or
  `model.pretrained_file`), adapts them with the model's own filter (CLIP and DINOv2 layouts), and
  resamples the position and patch embeddings when `model.img_size` / `model.patch_size` differ.
A path instead of a name is a plain timm ViT state dict (`.safetensors`, `.pth`, `.bin`) for the
config's own architecture (`ufo init --from-timm`).

The supernet then takes the ViT's shared parts by name and, in every block, the ViT's MLP as
FFN-shared and as every task's FFN-task (`supernet_state_from_vit`); task heads keep their fresh
initialisation.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.layers import LayerScale, Mlp, QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ufo.errors import ConfigError

if TYPE_CHECKING:  # the config's model section is what this module reads; it sits below the config
    from ufo.config import ModelConfig

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# what may differ from the pretrained model: timm resamples the embeddings, the blocks are a prefix
ADAPTABLE = ("img_size", "patch_size", "depth", "in_chans")
# what the pretrained model decides (a config that sets another value is refused)
DECIDED = ("embed_dim", "num_heads", "mlp_ratio", "qkv_bias", "init_values", "global_pool", "reg_tokens",
           "no_embed_class", "pre_norm", "fc_norm", "act_layer", "norm_eps")


def is_file(pretrained: str) -> bool:
    """Whether `model.pretrained` names a weights file rather than a timm model."""
    return "/" in pretrained or pretrained.endswith(WEIGHT_SUFFIXES) or Path(pretrained).is_file()


def timm_name(model: ModelConfig) -> str | None:
    """The timm model (without its pretrained tag) the config's ViT is, when `model.pretrained` names one."""
    if model.pretrained and not is_file(model.pretrained):
        return model.pretrained.split(".")[0]
    return None


def _activation(act: nn.Module, name: str) -> str:
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    raise ConfigError(f"model.pretrained: {name}'s FFN activation {type(act).__name__} is not one ufo builds "
                      "(gelu, gelu_tanh, quick_gelu)")


def timm_architecture(name: str, in_chans: int = 3) -> dict[str, Any]:
    """The ModelConfig fields of timm model `name`, read from an instance of it on the meta device."""
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        raise ConfigError(f"model.pretrained: {name!r} is neither a weights file nor a timm model"
                          + (f" (did you mean {', '.join(close)}?)" if close else ""))
    with torch.device("meta"):
        vit = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans)
    if type(vit) is not VisionTransformer:
        raise ConfigError(f"model.pretrained: {name} is a {type(vit).__name__}, not a timm VisionTransformer")
    block = vit.blocks[0]
    why = ("it has no class token" if vit.cls_token is None else
           f"it pools by {vit.global_pool!r}" if vit.global_pool not in ("token", "avg") else
           "its attention normalizes q and k" if not isinstance(block.attn.q_norm, nn.Identity) else
           f"its FFN is a {type(block.mlp).__name__}" if type(block.mlp) is not Mlp else
           "it has no learned position embedding" if vit.pos_embed is None else "")
    if why:
        raise ConfigError(f"model.pretrained: {name} does not fit ufo's supernet: {why}")
    size = vit.patch_embed.img_size
    norm = vit.norm if not isinstance(vit.norm, nn.Identity) else vit.fc_norm
    return dict(
        img_size=size[0] if size[0] == size[1] else list(size), patch_size=vit.patch_embed.patch_size[0],
        in_chans=in_chans, embed_dim=vit.embed_dim, depth=len(vit.blocks), num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / vit.embed_dim, qkv_bias=block.attn.qkv.bias is not None,
        # LayerScale's start value only matters for a fresh model: the pretrained gammas replace it
        init_values=1e-5 if isinstance(block.ls1, LayerScale) else None,
        global_pool=vit.global_pool, reg_tokens=vit.num_reg_tokens, no_embed_class=vit.no_embed_class,
        pre_norm=not isinstance(vit.norm_pre, nn.Identity), fc_norm=not isinstance(vit.fc_norm, nn.Identity),
        act_layer=_activation(block.mlp.act, name), norm_eps=norm.eps)


def resolve_architecture(model: ModelConfig) -> ModelConfig:
    """The model section with a named pretrained model's architecture filled in (`ConfigError` when
    a key set in the config contradicts it); a file or no pretrained model: the section as it is."""
    if model.pretrained_file and not model.pretrained:
        raise ConfigError("model.pretrained_file: names the weights of model.pretrained, which is not set")
    if model.pretrained_file and is_file(model.pretrained):
        raise ConfigError("model.pretrained_file: model.pretrained is a file already; set one of them")
    if timm_name(model) is None:
        if model.norm_eps != 1e-6:
            raise ConfigError("model.norm_eps: another epsilon than timm's 1e-6 needs model.pretrained to name a "
                              "timm model defined with it (a subnet's config.json rebuilds it by that name)")
        return model
    arch = timm_architecture(model.pretrained, model.in_chans)
    explicit = model.model_fields_set
    for key in DECIDED:
        if key in explicit and getattr(model, key) != arch[key]:
            raise ConfigError(f"model.{key}: {getattr(model, key)} but model.pretrained {model.pretrained} has "
                              f"{arch[key]}; remove it (the pretrained model decides it)")
    if "depth" in explicit and model.depth > arch["depth"]:
        raise ConfigError(f"model.depth: {model.depth} but model.pretrained {model.pretrained} has "
                          f"{arch['depth']} blocks (a supernet may take their first ones, not more)")
    if isinstance(arch["img_size"], list):
        raise ConfigError(f"model.pretrained: {model.pretrained} takes {arch['img_size']} inputs; set model.img_size "
                          "(a square grid) and each task's own size (tasks.<t>.img_size)")
    return model.model_copy(update={k: v for k, v in arch.items() if k not in explicit or k not in ADAPTABLE})
