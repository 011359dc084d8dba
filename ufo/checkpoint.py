"""Supernet checkpoints: the initial one that `ufo init` writes, training checkpoints, and one
reader for all of them.

`ufo init` writes a single safetensors file whose metadata holds the format tag, the resolved
config and the ufo version. Training writes DeepSpeed checkpoints (any ZeRO stage) as
`OUT/checkpoints/stepNNNNNNNN/`; each rank adds its own state file (data position, RNG), and
rank 0 writes the marker `ufo.json` last, after every rank has finished: a directory without
it is torn and is never read. The marker lists every file of the step with its size (and the
SHA-256 of the small ones), so a step damaged after the fact (a file deleted, truncated or
replaced) is skipped for the newest one that is whole. `read_checkpoint` turns any of them
into (config, consolidated fp32 state dict, step); `ufo export` and training start from it.

Trust: nothing read from a checkpoint runs code. Every torch file is unpickled with
`weights_only=True` (tensors and plain values; the few DeepSpeed classes its ZeRO files hold are
allowed by name), DeepSpeed's own files are checked that way before DeepSpeed opens them, and
ufo's own files hold nothing else.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Container, Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

import ufo
from ufo.atomic import atomic_file, remove_stale
from ufo.best import best_tags
from ufo.config import ModelConfig, UfoConfig, config_from_dict
from ufo.ema import read_whole as read_ema
from ufo.errors import CheckpointError
from ufo.layout import import_deepspeed
from ufo.model import SupernetViT, supernet_state_from_vit, vit_args
from ufo.model.supernet import Gather
from ufo.pretrained import timm_architecture, timm_name

FORMAT = "ufo-supernet"
TRAIN_FORMAT = "ufo-train-checkpoint"
MARKER = "ufo.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: UfoConfig
    state_dict: dict[str, torch.Tensor]
    step: int
    ufo_version: str


def init_supernet(cfg: UfoConfig, from_timm: str | Path | None = None,
                  held: Sequence[str] | None = None, gather: Gather | None = None,
                  say: Callable[[str], None] | None = None, pretrained: bool = True,
                  centres: Mapping[str, tuple[int, int]] | None = None) -> SupernetViT:
    """A freshly initialised supernet (seeded by `train.seed`), from `model.pretrained` when the config
    names one (or from the plain timm ViT file `from_timm`); with `held`, only those tasks' parts (the
    same values as in the whole supernet); `gather`, see `SupernetViT`. `say` hears where pretrained
    weights came from and what was adapted; `pretrained` False leaves them to `load_pretrained`
    (ZeRO-3 builds the supernet partitioned, and the pretrained ViT must not be); `centres`, the rows
    of each Partial FC task's centres to build (`ufo.layout.centres_of`)."""
    torch.manual_seed(cfg.train.seed)
    model = SupernetViT.from_config(cfg, held, gather, centres)
    if from_timm is not None:
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": str(from_timm)})})
    if pretrained:
        load_pretrained(model, cfg, gather, say)
    return model


def load_pretrained(model: SupernetViT, cfg: UfoConfig, gather: Gather | None = None,
                    say: Callable[[str], None] | None = None) -> None:
    """`model.pretrained`'s weights into the supernet (nothing when the config names none); the source
    and what was adapted are said and kept as `model.pretrained_note`."""
    if not cfg.model.pretrained:
        return
    weights = pretrained_vit(cfg.model)
    load_vit_weights(model, weights.state, weights.source, gather)
    model.pretrained_note = f"{cfg.model.pretrained} from {weights.source}" + \
        "".join(f"; {change}" for change in weights.changes)
    if say:
        say(f"pretrained: {model.pretrained_note}")


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


def load_vit_weights(model: SupernetViT, vit_state: dict[str, torch.Tensor], source: str,
                     gather: Gather | None = None) -> None:
    """A plain timm ViT state dict (of the config's geometry) into the supernet: shared parts by name,
    every FFN from the block's MLP; one module at a time through `gather` (ZeRO-3)."""
    mapped = supernet_state_from_vit(vit_state, model)
    expected = {k: v for k, v in model.named_parameters() if not k.startswith("heads.")}
    missing = [k for k in expected if k not in mapped and not k.startswith("path_logits.")]
    if missing:
        raise CheckpointError(f"{source}: not a ViT of this config's architecture: it lacks {missing[0]}"
                              + (f" and {len(missing) - 1} more keys" if len(missing) > 1 else ""))
    gather = gather or (lambda params: contextlib.nullcontext())
    for name, module in model.named_modules():
        params = [(f"{name}.{p}" if name else p, t) for p, t in module.named_parameters(recurse=False)]
        params = [(n, t) for n, t in params if n in mapped]
        if not params:
            continue
        with gather([t for _, t in params]), torch.no_grad():
            for key, tensor in params:
                if mapped[key].shape != tensor.shape:
                    raise CheckpointError(f"{source}: {key} has shape {tuple(mapped[key].shape)} but the config's "
                                          f"model needs {tuple(tensor.shape)} (check model.embed_dim, depth, "
                                          "mlp_ratio)")
                tensor.copy_(mapped[key])


def read_state_dict_file(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors file or a torch file (.pth/.pt/.bin), read without pickle code."""
    if not file.is_file():
        raise CheckpointError(f"{file}: no such weights file")
    try:
        if file.suffix == ".safetensors":
            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{file}: cannot read weights ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{file}: not a state dict of tensors")
    return state


def save_supernet(model: SupernetViT, cfg: UfoConfig, out: str | Path, step: int = 0,
                  overwrite: bool = False) -> Path:
    """Write the supernet as one safetensors file, atomically (temp file, fsync, rename)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: exists; pass --overwrite to replace it")
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; name a file such as {out / 'supernet.safetensors'}")
    metadata = {"format": FORMAT, "ufo_version": ufo.__version__, "step": str(step),
                "config": json.dumps(cfg.to_dict())}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_file(out) as tmp:
        save_file(state, tmp, metadata=metadata)
    return out


HASHED_BELOW = 4 << 20  # files smaller than this get a SHA-256 in the marker (ufo's own rank files, small models)


def save_training_checkpoint(engine, directory: Path, step: int, meta: dict, rank_state: dict, rank: int,
                             keep: int, extra: Callable[[Path], None] | None = None) -> Path:
    """Save a DeepSpeed checkpoint of every rank, then mark it complete; keep the newest `keep` (and
    every task's best, `ufo.best`).

    A rank whose write fails (a full disk, say) makes every rank fail: the step's directory is
    removed, older checkpoints are kept, and the error names the path and the OS's reason. `extra`
    writes the rank's further files into the step's directory before the marker (the EMA's).
    """
    import torch.distributed as dist

    tag = f"step{step:08d}"
    where = directory / tag
    error = ""
    try:
        # DeepSpeed's own `latest` is written before all ranks finish: ufo's marker replaces it
        engine.save_checkpoint(str(directory), tag=tag, client_state={"ufo": meta}, save_latest=False)
    except (OSError, RuntimeError) as e:
        error = write_failure(where, e)
        dist.barrier()  # the one DeepSpeed's save ends with, where the ranks whose writes went well wait
    if not error:
        try:
            with atomic_file(where / f"ufo_rank{rank:05d}.pt") as tmp:
                torch.save(rank_state, tmp)
            if extra is not None:
                extra(where)
        except (OSError, RuntimeError) as e:
            error = write_failure(where, e)
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)  # every rank learns whether all wrote their part
    failed = next((e for e in errors if e), "")
    if rank == 0:
        if failed:
            shutil.rmtree(where, ignore_errors=True)
        else:
            try:
                with atomic_file(where / MARKER) as tmp:
                    tmp.write_text(json.dumps({"format": TRAIN_FORMAT, "tag": tag, "step": step,
                                               "ufo_version": ufo.__version__, **meta,
                                               "files": _inventory(where)}, indent=1))
            except OSError as e:
                failed = write_failure(where / MARKER, e)
                shutil.rmtree(where, ignore_errors=True)
        if not failed:
            protected = best_tags(directory)  # each task's best (train.keep_best) stays
            for old in complete_checkpoints(directory)[:-keep]:
                if old.name not in protected:
                    shutil.rmtree(old)
    flag = [failed]
    dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        raise CheckpointError(f"checkpoint at step {step} not written: {flag[0]} (the newest complete "
                              "checkpoint is kept)")
    return where


def write_failure(path: Path, error: BaseException) -> str:
    """What went wrong writing `path`: the OS's reason where it has one. (torch's writer reports a full
    disk as `unexpected pos ...`: a filesystem with no room left is named as such.)"""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.filename or path}: {error.strerror}"
    try:
        fs = os.statvfs(path.parent if not path.exists() else path)
        if fs.f_bavail * fs.f_frsize < (1 << 20):
            return f"{path}: No space left on device ({fs.f_bavail * fs.f_frsize} bytes free)"
    except OSError:
        pass
    text = str(error).strip().splitlines()
    return f"{path}: {type(error).__name__}: {text[0] if text else ''}"


def _inventory(step_dir: Path) -> dict[str, dict]:
    """Every file of a step directory (but the marker) with its size, and a SHA-256 of the small ones."""
    files = {}
    for file in sorted(step_dir.rglob("*")):
        if file.is_file() and file.name != MARKER and not file.name.startswith("."):
            entry = {"bytes": file.stat().st_size}
            if entry["bytes"] < HASHED_BELOW:
                entry["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
            files[file.relative_to(step_dir).as_posix()] = entry
    return files


def _marker(step_dir: Path) -> dict:
    """A step's marker, or CheckpointError saying why it is not one."""
    try:
        marker = json.loads((step_dir / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{step_dir / MARKER}: unreadable marker ({type(e).__name__})") from None
    if not isinstance(marker, dict) or not isinstance(marker.get("step"), int):
        raise CheckpointError(f"{step_dir / MARKER}: malformed marker (not an object with an integer step)")
    return marker


def damage(step_dir: Path) -> str:
    """Why a marked step directory cannot be used ('' if it is whole): a file its marker lists is
    missing, of another size, or (small files) of another content; a rank's state file missing."""
    try:
        marker = _marker(step_dir)
    except CheckpointError as e:
        return str(e)
    files = marker.get("files")
    if files is None:  # written by an older ufo: at least every rank's own file
        files = {f"ufo_rank{r:05d}.pt": {} for r in range(int(marker.get("world_size", 1)))}
    if not isinstance(files, dict):
        return f"{step_dir / MARKER}: malformed marker (files is not an object)"
    for name, want in files.items():
        file = step_dir / name
        if not file.is_file():
            return f"{file}: missing"
        size = file.stat().st_size
        if "bytes" in want and size != want["bytes"]:
            return f"{file}: {size} bytes, the marker says {want['bytes']} (truncated or replaced)"
        if "sha256" in want and hashlib.sha256(file.read_bytes()).hexdigest() != want["sha256"]:
            return f"{file}: its content differs from what was written (SHA-256)"
    return ""


def complete_checkpoints(directory: Path) -> list[Path]:
    """Marked (complete) training checkpoints under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for marker in directory.glob(f"step*/{MARKER}"):
        try:
            found.append((_marker(marker.parent)["step"], marker.parent))
        except CheckpointError:
            continue  # a marker is written atomically; an unreadable one is not ours
    return [path for _, path in sorted(found)]


def clean_checkpoints(directory: Path, say=None) -> None:
    """Before a run starts: remove step directories without a marker (a save that died) and the
    temporary files of writes that died; report each."""
    say = say or _warn
    if not directory.is_dir():
        return
    for step_dir in sorted(directory.glob("step*")):
        if step_dir.is_dir() and not (step_dir / MARKER).exists():
            shutil.rmtree(step_dir, ignore_errors=True)
            say(f"removed {step_dir}: an unfinished checkpoint (no {MARKER})")
    for parent in [directory, *sorted(p for p in directory.glob("step*") if p.is_dir())]:
        remove_stale(parent)


def _warn(line: str) -> None:
    print(f"ufo: warning: {line}", file=sys.stderr)


def rng_state() -> dict:
    """The generators' states as tensors and plain values (what a weights-only load reads back)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                   cached), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    """Put back what `rng_state` took."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def read_rank_state(tag_dir: Path, rank: int) -> dict:
    file = tag_dir / f"ufo_rank{rank:05d}.pt"
    if not file.is_file():
        raise CheckpointError(f"{tag_dir}: has no state for rank {rank} (was it written by as many ranks?)")
    return safe_load(file)


def safe_load(file: Path, mmap: bool = False) -> dict:
    """A torch file unpickled with `weights_only=True`: tensors and plain values, and the few DeepSpeed
    classes its ZeRO files hold, allowed by name; anything else is refused before it can run."""
    from torch.serialization import safe_globals

    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    try:
        with safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL (\S+)|Unsupported (?:global|operand)[^.]*", str(e))
        raise CheckpointError(f"{file}: refused: it holds pickled objects beyond tensors and plain values "
                              f"({what.group(0) if what else 'not a weights-only file'}); reading it could "
                              "run code") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        text = str(e).strip().splitlines()
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {text[0] if text else ''})") from None


def check_step_files(tag_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Open every torch file of a step directory the way `safe_load` does (memory-mapped: only the
    pickles are read), before DeepSpeed, whose loader unpickles anything, opens them. Rank r of
    `world` checks every world-th file; the caller gathers the verdicts."""
    for i, file in enumerate(sorted(tag_dir.glob("*.pt"))):
        if i % world == rank:
            safe_load(file, mmap=True)


def find_training_checkpoint(path: Path, say=None) -> Path | None:
    """The checkpoint a path names: a marked step directory, else the newest whole one under it (or
    OUT/checkpoints); each damaged newer one is skipped with a line saying what is wrong."""
    say = say or _warn
    if (path / MARKER).is_file():
        return path
    for directory in (path / "checkpoints", path):
        if not directory.is_dir():
            continue
        for marker in sorted(directory.glob(f"step*/{MARKER}"), reverse=True):
            why = damage(marker.parent)
            if not why:
                return marker.parent
            say(f"skipping checkpoint {marker.parent.name}: {why}")
        if any(directory.glob(f"step*/{MARKER}")):
            raise CheckpointError(f"{directory}: every checkpoint in it is damaged (above); move it away to "
                                  "start afresh, or name a step directory to read")
    return None


def read_checkpoint(path: str | Path, tasks: Sequence[str] | None = None) -> Checkpoint:
    """Read any supernet checkpoint as its config and consolidated fp32 state dict: of every task,
    or of the shared parts and `tasks` only (a task-sharded checkpoint then reads only their files)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.is_dir():
        tag_dir = find_training_checkpoint(path)
        if tag_dir is None:
            raise CheckpointError(f"{path}: holds no complete training checkpoint (a step directory with "
                                  f"{MARKER}), nor is it the .safetensors file that `ufo init` writes")
        return _read_training_checkpoint(tag_dir, tasks)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({str(e).splitlines()[0]})") from None
    if metadata.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ufo supernet checkpoint (no '{FORMAT}' metadata); "
                              "write one with `ufo init`")
    try:
        raw = json.loads(metadata["config"])
        step = int(metadata.get("step", 0))
    except (KeyError, ValueError):
        raise CheckpointError(f"{path}: its embedded config is damaged") from None
    cfg = config_from_dict(raw, source=f"{path} (embedded config)")
    return Checkpoint(path, cfg, _only(state, cfg, tasks), step, metadata.get("ufo_version", "unknown"))


def _only(state: dict[str, torch.Tensor], cfg: UfoConfig, tasks: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """The shared tensors and those of `tasks` (None: all; a task the checkpoint lacks selects nothing)."""
    if tasks is None:
        return state
    return {k: v for k, v in state.items() if task_of(k) in (None, *tasks)}


def _read_training_checkpoint(tag_dir: Path, tasks: Sequence[str] | None = None) -> Checkpoint:
    marker = _marker(tag_dir)
    if not isinstance(marker.get("config"), dict):
        raise CheckpointError(f"{tag_dir / MARKER}: damaged marker (no config)")
    raw, step = marker["config"], marker["step"]
    why = damage(tag_dir)
    if why:
        raise CheckpointError(f"{tag_dir}: damaged checkpoint: {why}")
    cfg = config_from_dict(raw, source=f"{tag_dir} (embedded config)")
    tasks = None if tasks is None else [t for t in tasks if t in cfg.tasks]
    try:
        if marker.get("zero_stage", 0) in (0, 1, 2):
            state = _read_module_files(tag_dir, marker, cfg, list(cfg.tasks) if tasks is None else list(tasks))
        else:  # ZeRO-3: the module files hold placeholders; the weights are in the shards
            check_step_files(tag_dir)  # before DeepSpeed's loader, which unpickles anything
            import_deepspeed()
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
            # its tensors are views of one flat buffer: give each its own storage, as model files have
            state = {k: v.clone() for k, v in _only(state, cfg, tasks).items()}
        # every branch read only the shared parts and `tasks`
    except (OSError, RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise CheckpointError(f"{tag_dir}: cannot consolidate the DeepSpeed checkpoint "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return Checkpoint(tag_dir, cfg, state, step, marker.get("ufo_version", "unknown"))


# DeepSpeed names a task-sharded rank's task parameters as experts:
# PREFIX.deepspeed_moe.experts.deepspeed_experts.ID.rest
EXPERT_INFIX = re.compile(r"\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)")


def canonical_name(name: str) -> str:
    """A parameter's supernet name, without DeepSpeed's expert infix."""
    return EXPERT_INFIX.sub("", name)


def _load(file: Path) -> dict:
    """A DeepSpeed checkpoint file, memory-mapped (only what is read is paged in), with no pickled code."""
    if not file.is_file():
        raise CheckpointError(f"{file.parent}: lacks {file.name} (an incomplete copy of the checkpoint?)")
    return safe_load(file, mmap=True)


def _read_module_files(tag_dir: Path, marker: dict, cfg: UfoConfig, tasks: list[str]) -> dict[str, torch.Tensor]:
    """The shared parts and `tasks` of a ZeRO 0-2 checkpoint, reading only the files that hold them.

    Module weights: rank 0's model states (every task's under replicated placement, the shared
    parts under task_sharded, where DeepSpeed's expert files `layer_L_expert_I_...` hold task I's
    (config order) FFN-task MLPs and head). Under fp32 they are the weights; under bf16 the fp32
    masters replace them, assembled from the fragment maps of the ZeRO shards of the ranks that
    partition each parameter: every rank for shared parameters (and every parameter when
    replicated), the task's ranks for a sharded task's. (DeepSpeed's zero_to_fp32 cannot read
    expert checkpoints, and loads every shard whole.) Files are memory-mapped: what is not read
    is never paged in.
    """
    names = list(cfg.tasks)
    sharded = marker.get("placement") == "task_sharded"
    state = _only(dict(_load(tag_dir / "mp_rank_00_model_states.pt")["module"]), cfg, tasks)
    for task in tasks if sharded else ():
        files = sorted(tag_dir.glob(f"layer_*_expert_{names.index(task)}_mp_rank_00_model_states.pt"))
        if not files:
            raise CheckpointError(f"{tag_dir}: has no expert files of task {task} "
                                  f"(layer_*_expert_{names.index(task)}_mp_rank_00_model_states.pt)")
        for file in files:
            state.update({canonical_name(k): v for k, v in _load(file).items()})
    if sharded:  # Partial FC centres: ufo's own files, a shard per rank
        state.update({name: entry["param"] for name, entry in read_centres(tag_dir, cfg, tasks).items()})
    if marker.get("precision", "fp32") == "fp32":
        return state  # the module's weights are the fp32 weights
    untrained = untrained_names(cfg, tasks)
    if marker.get("zero_stage", 0) == 0:  # DeepSpeed's bf16/fp16 optimizer keeps the masters whole, by position
        masters = _load(tag_dir / "mp_rank_00_model_states.pt")["optimizer"]["fp32_groups"]
        names = marker.get("param_group_names")
        if not names or [len(g) for g in names] != [len(g) for g in masters]:
            raise CheckpointError(f"{tag_dir}: its marker does not name the optimizer's fp32 master weights "
                                  "(written by an older ufo?); cannot consolidate")
        for group_names, group in zip(names, masters):
            for key, master in zip(group_names, group):
                if key in state:
                    state[key] = master.view(state[key].shape)
        return state
    pieces: dict[str, list[torch.Tensor]] = {}
    for key, shard, group, fragment in zero_fragments(tag_dir, marker, state):
        flat = shard["single_partition_of_fp32_groups"][group]
        pieces.setdefault(key, []).append(flat.narrow(0, fragment.start, fragment.numel))
    for key, tensor in state.items():
        if key in untrained:
            continue  # no master weights: as the module saved it
        flat = torch.cat(pieces.get(key, [torch.zeros(0)]))
        if flat.numel() != tensor.numel():
            raise CheckpointError(f"{tag_dir}: the ZeRO shards hold {flat.numel()} of the {tensor.numel()} "
                                  f"values of {key} (an incomplete copy of the checkpoint?)")
        state[key] = flat.view(tensor.shape).clone()
    return state


CENTRES_FORMAT = "ufo-partial-fc-centres"


def centres_file(rank: int) -> str:
    return f"centres_rank{rank:05d}.safetensors"


def save_centres(engine, centres: Mapping[str, nn.Parameter], tag_dir: Path, rank: int) -> None:
    """The Partial FC centre shards a rank holds (`placement.sharded_centres`), written by that rank:
    each one's fp32 master and optimizer state (`NAME/exp_avg`, ...), its rows in the metadata.
    DeepSpeed's files hold none of them: its module files would give every rank the first's shard,
    and under ZeRO-0 only each task's first rank writes its optimizer."""
    from ufo.ds_masters import full_fp32, full_optimizer_state

    tensors, rows = {}, {}
    for name, param in centres.items():
        tensors[name] = full_fp32(param).detach().float().cpu().contiguous()
        for key, value in full_optimizer_state(engine, param).items():
            tensors[f"{name}/{key}"] = value.cpu().contiguous()
        rows[name] = list(param.ufo_rows)
    if tensors:
        with atomic_file(tag_dir / centres_file(rank)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": CENTRES_FORMAT, "rows": json.dumps(rows)})


def _centre_files(tag_dir: Path, ranks: Sequence[int] | None = None) -> Iterator[tuple[str, int, dict]]:
    """(name, first row, {"param": weights, state key: tensor}) of every shard in a step's centre files
    (of `ranks` only, if given)."""
    files = sorted(tag_dir.glob("centres_rank*.safetensors")) if ranks is None else \
        [tag_dir / centres_file(r) for r in ranks]
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                metadata = f.metadata() or {}
                if metadata.get("format") != CENTRES_FORMAT:
                    raise CheckpointError(f"{file}: not a ufo Partial FC centres file")
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            rows = json.loads(metadata["rows"])
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{file}: unreadable Partial FC centres ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        for name, (start, count) in rows.items():
            entry = {"param": tensors[name]}
            entry.update({key.split("/", 1)[1]: t for key, t in tensors.items() if key.startswith(name + "/")})
            if entry["param"].shape[0] != count:
                raise CheckpointError(f"{file}: {name} holds {entry['param'].shape[0]} rows, its metadata says {count}")
            yield name, int(start), entry


def read_centres(tag_dir: Path, cfg: UfoConfig, tasks: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The whole centres of each Partial FC task of `tasks` from its ranks' shards: {name: {"param":
    weights, state key: optimizer state}} (the rows put back in order; a gap is an error)."""
    wanted = {t for t in tasks if cfg.tasks[t].partial_fc is not None}
    pieces: dict[str, list[tuple[int, dict]]] = {}
    for name, start, entry in _centre_files(tag_dir) if wanted else ():
        if task_of(name) in wanted:
            pieces.setdefault(name, []).append((start, entry))
    out = {}
    for task in wanted:
        name = f"heads.{task}.margin.weight"
        parts = sorted(pieces.get(name, []), key=lambda p: p[0])
        covered = 0
        for start, entry in parts:
            if start != covered:
                break
            covered += entry["param"].shape[0]
        if covered != cfg.tasks[task].num_classes or not parts:
            raise CheckpointError(f"{tag_dir}: its centre files ({centres_file(0).replace('00000', 'NNNNN')}) hold "
                                  f"rows 0-{covered} of the {cfg.tasks[task].num_classes} of {name} (an incomplete copy "
                                  "of the checkpoint?)")
        keys = set.intersection(*(set(entry) for _, entry in parts))
        out[name] = {key: torch.cat([entry[key] for _, entry in parts]) for key in keys}
    return out


def load_centres(engine, centres: Mapping[str, nn.Parameter], tag_dir: Path, rank: int) -> None:
    """A rank's own centre shards back from the step it wrote (resuming on the same ranks): weights
    (fp32 masters and working copies) and optimizer state."""
    from ufo.ds_masters import set_full_fp32, set_full_optimizer_state

    if not centres:
        return
    saved = {name: (start, entry) for name, start, entry in _centre_files(tag_dir, [rank])}
    for name, param in centres.items():
        if name not in saved or (saved[name][0], saved[name][1]["param"].shape[0]) != tuple(param.ufo_rows):
            raise CheckpointError(f"{tag_dir / centres_file(rank)}: does not hold rows {param.ufo_rows} of {name}")
        entry = saved[name][1]
        value = entry["param"].to(param.device)
        with torch.no_grad():
            param.copy_(value.to(param.dtype))
        set_full_fp32(param, value)
        set_full_optimizer_state(engine, param, {k: v for k, v in entry.items() if k != "param"})


def with_ema(ckpt: Checkpoint) -> Checkpoint:
    """The checkpoint with the moving average of its weights (train.ema: `ema.safetensors` beside it)
    in place of them; buffers and frozen parameters stay as saved."""
    ema = read_ema(ckpt.path)
    if not ema:
        raise CheckpointError(f"{ckpt.path}: no ema.safetensors (trained without train.ema)")
    return replace(ckpt, state_dict={k: ema.get(k, v).to(v.dtype) for k, v in ckpt.state_dict.items()})


def zero_fragments(tag_dir: Path, marker: dict, keys: Container[str]) -> Iterator[tuple[str, dict, int, Any]]:
    """Every fragment of the `keys` parameters in a ZeRO 1/2 checkpoint's partitions, in the order that
    puts each parameter together: (key, the rank's optimizer state dict, its group, the fragment's
    start and numel). Ranks ascend (partitions are in rank order, in the world and in a task's group);
    a task-sharded task's parameters come from its own ranks' files only."""
    world = range(marker["world_size"])
    sharded = marker.get("placement") == "task_sharded"
    groups = {task: tuple(ranks) for task, ranks in marker["layout_groups"].items()} if sharded else {}
    for rank in world:
        file = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        bf16 = tag_dir / f"bf16_{file}"  # DeepSpeed's name under bf16
        shard = _load(bf16 if bf16.is_file() else tag_dir / file)["optimizer_state_dict"]
        for group, mapping in enumerate(shard["param_slice_mappings"]):
            for name, fragment in mapping.items():
                key = canonical_name(name)
                if key in keys and rank in groups.get(task_of(key), world):
                    yield key, shard, group, fragment


def untrained_names(cfg: UfoConfig, tasks: Sequence[str]) -> set[str]:
    """The supernet's tensors the optimizer does not hold: buffers (a BNNeck's running statistics) and
    frozen parameters (its bias)."""
    with torch.device("meta"):
        model = SupernetViT.from_config(cfg, list(tasks))
    return {n for n, _ in model.named_buffers()} | {n for n, p in model.named_parameters() if not p.requires_grad}


def task_of(name: str) -> str | None:
    """The task a supernet tensor belongs to (its FFN-task MLPs, its head, its learned path logits), or
    None for shared parts."""
    parts = name.split(".")
    if parts[0] in ("heads", "path_logits") and len(parts) > 1:
        return parts[1]
    if len(parts) > 4 and parts[0] == "blocks" and parts[2] == "mlp" and parts[3] == "task":
        return parts[4]
    return None


def trained_path(ckpt: Checkpoint, task: str) -> tuple[str, str]:
    """The path a checkpoint's task trained toward, and where it comes from: a learned run's is the
    likelier choice of each block by its path logits ("learned"), any other the configured one ("config")."""
    logits = ckpt.state_dict.get(f"path_logits.{task}.logits")
    if logits is None:
        return ckpt.config.path_of(task), "config"
    return "".join("T" if t > s else "S" for s, t in logits.float().tolist()), "learned"


def load_supernet(ckpt: Checkpoint, held: Sequence[str] | None = None, config: UfoConfig | None = None) -> SupernetViT:
    """Rebuild the supernet of a checkpoint with its weights (only the `held` tasks' parts, if given).

    With `config` (a run that starts from this checkpoint), the supernet that config builds, taking
    what it needs from the checkpoint (e.g. only the FFNs on its paths, `model.ffns`). The model is
    built without memory and takes the checkpoint's tensors as they are (no copy).
    """
    cfg = config or ckpt.config
    with torch.device("meta"):
        model = SupernetViT.from_config(cfg, held)
    expected = model.state_dict()
    whose = "its own config" if config is None else "the config"
    missing = [k for k in expected if k not in ckpt.state_dict]
    unexpected = [k for k in ckpt.state_dict if k not in expected and task_of(k) not in ckpt.config.tasks
                  and not (config is not None and ".mlp." in k)]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has an unknown tensor {unexpected[0]}"
        raise CheckpointError(f"{ckpt.path}: does not match {whose}: it {what}")
    for key, tensor in expected.items():
        if ckpt.state_dict[key].shape != tensor.shape:
            raise CheckpointError(f"{ckpt.path}: {key} has shape {tuple(ckpt.state_dict[key].shape)}, "
                                  f"{whose} needs {tuple(tensor.shape)}")
    model.load_state_dict({k: ckpt.state_dict[k] for k in expected}, strict=True, assign=True)
    return model
