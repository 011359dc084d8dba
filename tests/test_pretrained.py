"""`model.pretrained`: a supernet started from a timm ViT (weights made here and saved to files,
read through timm's own pretrained machinery and the Hugging Face cache) gives that ViT's features
on every path, and its subnets exported at step 0 too."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from tiny import TINY, write_yaml
from ufo.checkpoint import init_supernet, load_supernet, read_checkpoint, save_supernet
from ufo.config import config_from_dict
from ufo.errors import ConfigError
from ufo.export import export_subnet
from ufo.model import TaskSlice

REPO = Path(__file__).resolve().parents[1]

# (timm name with its tag, model.img_size, model.patch_size): a plain ViT whose patch embedding is
# resampled too, CLIP's (a norm before the blocks, LayerNorm eps 1e-5) and DINOv2's with registers
# (LayerScale, 4 register tokens, no position embedding on them, 14 px patches)
VARIANTS = [("vit_tiny_patch16_224.augreg_in21k", 32, 8), ("vit_xsmall_patch16_clip_224.tinyclip_yfcc15m", 32, 16),
            ("vit_small_patch14_reg4_dinov2.lvd142m", 28, 14)]


def released(name: str, file: Path) -> Path:
    """Stands in for released weights: the timm model `name` with random weights, saved as timm saves them."""
    torch.manual_seed(1)
    vit = timm.create_model(name.split(".")[0], num_classes=0)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # LayerNorm and LayerScale values away from their init too
    file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(file))
    return file


def config(name: str, img: int, patch: int, **model) -> dict:
    raw = copy.deepcopy(TINY)
    raw["model"] = {"pretrained": name, "depth": 2, "img_size": img, "patch_size": patch, "ffns": "all", **model}
    for task in raw["tasks"].values():
        task["path"] = "ST"
    return raw


@pytest.mark.parametrize("name,img,patch", VARIANTS, ids=[v[0].split("_patch")[0] for v in VARIANTS])
def test_a_supernet_from_a_timm_vit_gives_its_features_on_every_path_and_exported(tmp_path, name, img, patch):
    file = released(name, tmp_path / "weights.safetensors")
    cfg = config_from_dict(config(name, img, patch, pretrained_file=str(file)), "test")
    native = timm.create_model(name.split(".")[0], pretrained=False)
    assert cfg.model.embed_dim == native.embed_dim and cfg.model.num_heads == native.blocks[0].attn.num_heads
    said: list[str] = []
    model = init_supernet(cfg, say=said.append).eval()
    grid = native.patch_embed.grid_size[0]
    assert said == [f"pretrained: {name} from {file}; position embedding resampled {grid}x{grid} -> "
                    f"{img // patch}x{img // patch} (timm)"
                    + ("; patch embedding resampled 16 -> 8 px (timm)" if patch == 8 else "")
                    + f"; the first 2 of {len(native.blocks)} blocks"]
    # the reference: timm's own loading of the same file at the same geometry, its first two blocks
    ref = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, num_classes=0,
                            img_size=img, patch_size=patch).eval()
    ref.blocks = ref.blocks[:2]
    x = torch.randn(3, 3, img, img)
    with torch.no_grad():
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
        for path in ("SS", "ST", "TS", "TT"):  # every FFN, shared and task, starts as the block's MLP
            got = model.forward_features(x, [TaskSlice("digits", path, 3)])
            assert (got - want).abs().max() <= 1e-5, path
    ckpt = save_supernet(model, cfg, tmp_path / "supernet.safetensors")
    result = export_subnet(ckpt, "digits", tmp_path / "subnet", path="TS", log=lambda _: None)
    assert result.max_abs_diff["safetensors"] <= 1e-5
    subnet = timm.create_model(f"local-dir:{tmp_path / 'subnet'}", pretrained=True).eval()  # by its name
    with torch.no_grad():
        assert (subnet.forward_head(subnet.forward_features(x), pre_logits=True) - want).abs().max() <= 1e-5


def offline_hub(root: Path, name: str) -> dict[str, str]:
    """A Hugging Face cache holding `name`'s weights where timm looks for them, and an offline environment."""
    cache = root / "hub" / f"models--timm--{name}"
    commit = "0" * 40
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    released(name, cache / "snapshots" / commit / "model.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return {**env, "HF_HOME": str(root), "HF_HUB_OFFLINE": "1"}


def test_ufo_init_finds_released_weights_by_name_in_the_hugging_face_cache_offline(tmp_path):
    name = "vit_tiny_patch16_224.augreg_in21k"
    env = offline_hub(tmp_path / "hf", name)
    cfg_file = write_yaml(tmp_path / "c.yaml", config(name, 32, 16))
    ufo = [sys.executable, "-m", "ufo.cli", "init", str(cfg_file), "--out", str(tmp_path / "s.safetensors")]
    done = subprocess.run(ufo, capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    blob = tmp_path / "hf" / "hub" / f"models--timm--{name}" / "snapshots" / ("0" * 40) / "model.safetensors"
    assert f"pretrained: {name} from {blob}; position embedding resampled 14x14 -> 2x2" in done.stdout
    model = load_supernet(read_checkpoint(tmp_path / "s.safetensors"))
    state = load_file(str(blob))  # what timm read: every FFN holds its block's MLP
    assert torch.equal(model.blocks[1].mlp.task["face"].fc2.weight, state["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    # weights that are not in the cache: one line that says where timm looked and what to do
    done = subprocess.run(ufo[:-2] + ["--out", str(tmp_path / "t.safetensors"), "--set",
                                      "model.pretrained=vit_tiny_patch16_224.augreg_in21k_ft_in1k"],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode != 0 and not (tmp_path / "t.safetensors").exists()
    last = done.stderr.strip().splitlines()[-1]
    assert "model.pretrained vit_tiny_patch16_224.augreg_in21k_ft_in1k: cannot load its weights" in last
    assert "set model.pretrained_file" in last


@pytest.mark.parametrize("model,message", [
    ({"pretrained_file": "/x.safetensors"}, "model.pretrained_file: names the weights of model.pretrained"),
    ({"pretrained": "vit_tiny_patch16_225"}, "model.pretrained: 'vit_tiny_patch16_225' is neither a weights file "
                                             "nor a timm model (did you mean vit_tiny_patch16_224"),
    ({"pretrained": "resnet50.a1_in1k"}, "model.pretrained: resnet50.a1_in1k is a ResNet, not a timm VisionTransformer"),
    ({"pretrained": "vit_tiny_patch16_224.augreg_in21k", "embed_dim": 32},
     "model.embed_dim: 32 but model.pretrained vit_tiny_patch16_224.augreg_in21k has 192; remove it"),
    ({"pretrained": "vit_tiny_patch16_224.augreg_in21k", "depth": 13},
     "model.depth: 13 but model.pretrained vit_tiny_patch16_224.augreg_in21k has 12 blocks"),
    ({"pretrained": "vit_so150m_patch16_reg4_map_256.sbb_e250_in12k"},
     "model.pretrained: vit_so150m_patch16_reg4_map_256.sbb_e250_in12k does not fit ufo's supernet: it has no class "
     "token"),
    ({"norm_eps": 1e-5}, "model.norm_eps: another epsilon than timm's 1e-6 needs model.pretrained"),
])
def test_a_pretrained_model_that_does_not_fit_is_refused_at_load(model, message):
    raw = copy.deepcopy(TINY)
    raw["model"] = model if "pretrained" in model else {**raw["model"], **model}
    with pytest.raises(ConfigError, match="^test: " + re.escape(message)):
        config_from_dict(raw, "test")
