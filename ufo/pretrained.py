"""A pretrained ViT as the supernet's start (`model.pretrained`).

A timm model name (`vit_base_patch16_224.mae`, `vit_base_patch16_clip_224.openai`,
`vit_small_patch14_reg4_dinov2.lvd142m`) is read two ways, both timm's own:
- its **architecture** from timm's definition of the model (`resolve_architecture`, at config
  load: an instance on the meta device, no weights), so that the supernet is built to fit them;
- its **weights** by timm's pretrained machinery (`pretrained_vit`): `timm.create_model(name,
  pretrained=True)` finds them in the local Hugging Face cache (or `model.pretrained_file`), adapts
  them with the model's own filter (CLIP and DINOv2 layouts), and resamples the position embedding
  and the patch embedding when `model.img_size` / `model.patch_size` differ from the model's.
A path instead of a name is a plain timm ViT state dict (`.safetensors`, `.pth`, `.bin`) for the
config's own architecture (`ufo init --from-timm`).

The supernet then takes the ViT's shared parts by name and, in every block, the ViT's MLP as
FFN-shared and as every task's FFN-task (`supernet_state_from_vit`); task heads keep their fresh
initialisation.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from timm.layers import LayerScale, Mlp, QuickGELU
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ufo.config import ModelConfig
from ufo.errors import CheckpointError, ConfigError

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


class Pretrained(NamedTuple):
    state: dict[str, torch.Tensor]  # a plain timm ViT state dict of the config's geometry
    source: str  # where the weights came from
    changes: list[str]  # what was adapted on the way (resampled embeddings, dropped blocks)


def pretrained_vit(model: ModelConfig) -> Pretrained:
    """The weights `model.pretrained` names, as a timm ViT state dict of the config's geometry."""
    name = timm_name(model)
    if name is None:
        return _from_file(model, Path(model.pretrained))  # type: ignore[arg-type]
    overlay = {"file": str(model.pretrained_file)} if model.pretrained_file else {}
    native = timm_architecture(model.pretrained, model.in_chans)  # type: ignore[arg-type]
    try:
        vit = timm.create_model(model.pretrained, pretrained=True, num_classes=0, img_size=model.img_size,
                                patch_size=model.patch_size, in_chans=model.in_chans, pretrained_cfg_overlay=overlay)
    except Exception as e:  # timm and huggingface_hub say what is missing in many ways; one line for all
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(
            f"model.pretrained {model.pretrained}: cannot load its weights ({type(e).__name__}: {first}); offline, "
            "timm reads them from the Hugging Face cache (download them once where there is a network: "
            f"timm.create_model({model.pretrained!r}, pretrained=True)) or set model.pretrained_file") from None
    state = vit.state_dict()
    changes = []
    if native["img_size"] != model.img_size or native["patch_size"] != model.patch_size:
        g0, g1 = native["img_size"] // native["patch_size"], model.img_size // model.patch_size
        changes.append(f"position embedding resampled {g0}x{g0} -> {g1}x{g1} (timm)")
    if native["patch_size"] != model.patch_size:
        changes.append(f"patch embedding resampled {native['patch_size']} -> {model.patch_size} px (timm)")
    if model.depth < native["depth"]:
        state = {k: v for k, v in state.items()
                 if not (k.startswith("blocks.") and int(k.split(".")[1]) >= model.depth)}
        changes.append(f"the first {model.depth} of {native['depth']} blocks")
    return Pretrained(state, _source(vit, model), changes)


def _source(vit: nn.Module, model: ModelConfig) -> str:
    if model.pretrained_file:
        return str(model.pretrained_file)
    cfg = vit.pretrained_cfg
    hub = cfg.get("hf_hub_id")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        for file in ("model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"):
            found = try_to_load_from_cache(hub, cfg.get("hf_hub_filename") or file)
            if isinstance(found, str):
                return found
        return f"hf-hub:{hub}"
    return cfg.get("url") or cfg.get("file") or "timm"


def _from_file(model: ModelConfig, file: Path) -> Pretrained:
    """A plain timm ViT state dict file, adapted by timm's filter to the config's geometry."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    from ufo.checkpoint import read_state_dict_file
    from ufo.model import vit_args

    state = read_state_dict_file(file)
    geometry = VisionTransformer(**vit_args(model), num_classes=0, weight_init="skip")
    try:
        adapted = checkpoint_filter_fn(state, geometry)
    except Exception as e:  # shapes that cannot be adapted
        raise CheckpointError(f"{file}: cannot adapt this ViT to the config's model: {e}") from None
    changes = []
    pos = state.get("pos_embed")
    if pos is not None and pos.shape != adapted["pos_embed"].shape:
        changes.append(f"position embedding resampled {pos.shape[1]} -> {adapted['pos_embed'].shape[1]} "
                       "tokens (timm)")
    patch = state.get("patch_embed.proj.weight")
    if patch is not None and patch.shape != adapted["patch_embed.proj.weight"].shape:
        changes.append(f"patch embedding resampled {patch.shape[-1]} -> {model.patch_size} px (timm)")
    return Pretrained(adapted, str(file), changes)
