"""Distillation runs: a timm student of any architecture trained on one task from a teacher, the task's
exported subnet or a supernet checkpoint on the task's path (`distill:` in the config; `ufo distill`).

A distillation run is a plain run: the same loader, engine, loop, checkpoints, evaluation, tracking and
export; only the model differs (`ufo.model.student.Student`). Here: the teacher read from its files, the
student's backbone made by timm at the task's input size, the student rebuilt from a checkpoint, the
deployed timm model of a trained student, and the config `ufo distill` runs.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from torch import nn

from ufo.checkpoint import Checkpoint, load_supernet, read_checkpoint, trained_path
from ufo.config import UfoConfig, config_from_dict, load_config
from ufo.errors import CheckpointError, ConfigError, UfoError
from ufo.model.heads import build_head, fold_bnneck
from ufo.model.student import Student
from ufo.pretrained import is_file
from ufo.subnet import load_subnet, subnet_config


class PathTeacher(nn.Module):
    """A supernet as a teacher: the task on its path (the deployed output: logits, normalized embedding)."""

    def __init__(self, supernet: nn.Module, task: str, path: str):
        super().__init__()
        self.supernet, self.task, self.path = supernet, task, path

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.supernet.forward_task(images, self.task, self.path)


def is_subnet_dir(path: Path) -> bool:
    """An exported subnet's directory (config.json), not a run or step directory (ufo.json, checkpoints)."""
    return path.is_dir() and (path / "config.json").is_file() and not (path / "ufo.json").is_file() \
        and not (path / "checkpoints").is_dir()


def load_teacher(cfg: UfoConfig) -> tuple[nn.Module, str]:
    """The run's teacher, frozen, in eval mode, and what it is (for the log)."""
    d, task = cfg.distill, next(iter(cfg.tasks))
    where = Path(d.teacher)
    if not where.exists():
        raise ConfigError(f"distill.teacher: {where}: no such subnet directory or checkpoint")
    if is_subnet_dir(where):
        teacher, config = load_subnet(where)
        if config["ufo"]["task"] != task:
            raise ConfigError(f"distill.teacher: {where} is the subnet of task {config['ufo']['task']!r}, "
                              f"not {task!r}")
        what = f"subnet {where} (path {config['ufo'].get('path')})"
    else:
        try:
            ckpt = read_checkpoint(where, tasks=[task])
        except CheckpointError as e:
            raise ConfigError(f"distill.teacher: {e}") from None
        if task not in ckpt.config.tasks:
            raise ConfigError(f"distill.teacher: {ckpt.path} has no task {task!r} "
                              f"(tasks: {', '.join(ckpt.config.tasks)})")
        if ckpt.config.distill is not None:
            raise ConfigError(f"distill.teacher: {ckpt.path} is a student's checkpoint; export it "
                              "(`ufo export`) and give the subnet directory")
        path = (d.path or trained_path(ckpt, task)[0]).upper()
        teacher = PathTeacher(load_supernet(ckpt, held=[task]), task, path)
        what = f"supernet {ckpt.path} step {ckpt.step}, path {path}"
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval(), what


def _output_width(model: nn.Module, cfg: UfoConfig, who: str) -> int:
    """What `model` gives for one image of the task's size: its output width; a one-line error if it
    cannot take the task's images."""
    task = next(iter(cfg.tasks))
    h, w = cfg.size_of(task)
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(torch.zeros(1, cfg.model.in_chans, h, w))
    except Exception as e:  # any layer that cannot take that size, in the model's own words
        raise ConfigError(f"{who} cannot take task {task}'s {h}x{w} images "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        model.train(was)
    return out.shape[-1]


def student_args(cfg: UfoConfig) -> dict[str, Any]:
    """The timm arguments that make the run's student at the task's input size: `distill.student_args`,
    `in_chans`, and `img_size` for the models that take one (ViTs; a CNN takes any size)."""
    d, task = cfg.distill, next(iter(cfg.tasks))
    h, w = cfg.size_of(task)
    args = {"in_chans": cfg.model.in_chans, **d.student_args}
    if "img_size" not in d.student_args and _takes_img_size(d.student):
        args["img_size"] = h if h == w else [h, w]
    return args


def _takes_img_size(name: str) -> bool:
    with torch.device("meta"):
        try:
            timm.create_model(name, pretrained=False, num_classes=0, img_size=32)
        except TypeError:
            return False
        except Exception:  # another size rule of the model (a window that does not divide 32, ...)
            return True
    return True


def student_backbone(cfg: UfoConfig, pretrained: bool = True, meta: bool = False) -> nn.Module:
    """The student's timm model with no classifier (`num_classes=0`: its pooled features), made at the
    task's input size; from `distill.pretrained` (timm's released weights, by name through its hub
    cache, or a file) unless `pretrained` is False (a resumed run takes its checkpoint's)."""
    d = cfg.distill
    if d.student not in timm.list_models() and d.student.split(".")[0] not in timm.list_models():
        near = difflib.get_close_matches(d.student, timm.list_models(), n=3, cutoff=0.6)
        raise ConfigError(f"distill.student: {d.student!r} is not a timm model"
                          + (f" (did you mean {', '.join(near)}?)" if near else " (`timm.list_models()` lists them)"))
    kwargs: dict[str, Any] = {}
    if pretrained and d.pretrained and not meta:
        kwargs["pretrained"] = True
        if isinstance(d.pretrained, str):
            if not is_file(d.pretrained) or not Path(d.pretrained).is_file():
                raise ConfigError(f"distill.pretrained: {d.pretrained}: no such weights file")
            kwargs["pretrained_cfg_overlay"] = {"file": str(Path(d.pretrained).resolve())}
    torch.manual_seed(cfg.train.seed)  # the same student on every rank
    try:
        if meta:
            with torch.device("meta"):
                return timm.create_model(d.student, num_classes=0, **student_args(cfg))
        backbone = timm.create_model(d.student, num_classes=0, **kwargs, **student_args(cfg))
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"distill.student_args: timm cannot make {d.student} with "
                          f"{student_args(cfg)} ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    except (RuntimeError, OSError) as e:  # no released weights here (offline, no cache), a bad file
        if not kwargs.get("pretrained"):
            raise
        raise ConfigError(f"distill.pretrained: timm could not load {d.student}'s weights "
                          f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); give a weights file, "
                          "or false") from None
    _output_width(backbone, cfg, f"distill.student: {d.student}")
    return backbone


def build_student(cfg: UfoConfig, say=print, pretrained: bool = True) -> Student:
    """The run's student with its teacher: the teacher's output width is the student head's (its
    logits' classes, or its embedding size)."""
    teacher, what = load_teacher(cfg)
    width = _output_width(teacher, cfg, "distill.teacher")
    backbone = student_backbone(cfg, pretrained=pretrained)
    if cfg.train.activation_checkpointing and hasattr(backbone, "set_grad_checkpointing"):
        backbone.set_grad_checkpointing(True)  # timm's: every block recomputed in the backward
    student = _assemble(cfg, backbone, width, teacher)
    say(f"distill: student {cfg.distill.student} ({sum(p.numel() for p in student.parameters()):,} parameters) "
        f"from teacher {what} ({sum(p.numel() for p in teacher.parameters()):,})")
    return student


def _assemble(cfg: UfoConfig, backbone: nn.Module, width: int, teacher: nn.Module | None) -> Student:
    task, tc = next(iter(cfg.tasks.items()))
    if tc.kind == "classification" and width != tc.num_classes:
        raise ConfigError(f"distill.teacher: gives {width} logits, task {task} has {tc.num_classes} classes")
    head_cfg = tc if tc.kind == "classification" else tc.model_copy(update={"embedding_dim": width})
    torch.manual_seed(cfg.train.seed + 1)
    head = build_head(head_cfg, backbone.num_features)
    return Student(backbone, task, tc.kind, head, cfg.distill, teacher)


def load_student(ckpt: Checkpoint) -> Student:
    """A trained student from its run's checkpoint (without its teacher: for evaluation and export)."""
    cfg = ckpt.config
    task, tc = next(iter(cfg.tasks.items()))
    backbone = student_backbone(cfg, meta=True)
    width = tc.num_classes if tc.kind == "classification" else ckpt.state_dict[f"heads.{task}.embed.weight"].shape[0]
    with torch.device("meta"):
        student = _assemble(cfg, backbone, width, None)
    expected = student.state_dict()
    missing = [k for k in expected if k not in ckpt.state_dict]
    if missing:
        raise CheckpointError(f"{ckpt.path}: does not match its student {cfg.distill.student}: it lacks {missing[0]}")
    student.load_state_dict({k: ckpt.state_dict[k] for k in expected}, strict=True, assign=True)
    return student.eval()


def deployed_student(student: Student, cfg: UfoConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The trained student as one timm model: `timm.create_model(student, num_classes=width, **args)`
    with the task head's deployed layer as its classifier (a BNNeck folded in), and those arguments."""
    task = student.task
    head = student.heads[task]
    layer = head.fc if student.kind == "classification" else head.embed
    weight, bias = layer.weight.detach(), layer.bias.detach()
    if getattr(head, "neck", None) is not None:
        weight, bias = fold_bnneck(weight, bias, head.neck.state_dict())
    args = {"num_classes": weight.shape[0], **student_args(cfg)}
    with torch.device("meta"):
        model = timm.create_model(cfg.distill.student, **args)
    classifier = model.pretrained_cfg.get("classifier") or "head"
    state = dict(student.backbone.state_dict())
    state[f"{classifier}.weight"], state[f"{classifier}.bias"] = weight, bias
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise UfoError(f"{cfg.distill.student}: its classifier ({classifier}) does not take the head's layer "
                       f"({str(e).splitlines()[0]})") from None
    return model.eval(), args


def distill_config(teacher: str | Path, task: str, student: str, out: str | Path | None = None,
                   config: str | Path | None = None, overrides: Sequence[str] = ()) -> UfoConfig:
    """The config `ufo distill` runs: the teacher's run config (a checkpoint's own; a subnet's source
    run's, or `config`), its one task `task`, `distill.teacher` and `.student` set, `train.out_dir`
    `out`; then `overrides` (dotted key=value, as `ufo train` takes them)."""
    teacher = Path(teacher)
    if config is not None:
        raw = load_config(config).to_dict()
    elif is_subnet_dir(teacher):
        source = subnet_config(teacher)["ufo"].get("source_checkpoint")
        marker = Path(source or "") / "ufo.json"
        if not source or not marker.is_file():
            raise ConfigError(f"{teacher}: its source checkpoint ({source}) is not here to give the task's data; "
                              "give --config CONFIG (the run's config: its tasks' shards)")
        raw = json.loads(marker.read_text())["config"]
    else:
        raw = read_checkpoint(teacher, tasks=[task]).config.to_dict()
    if task not in raw["tasks"]:
        raise ConfigError(f"--task {task}: the teacher's config has no such task (tasks: {', '.join(raw['tasks'])})")
    raw["tasks"] = {task: {k: v for k, v in raw["tasks"][task].items() if k not in ("elastic", "partial_fc")}}
    raw["distill"] = {**(raw.get("distill") or {}), "teacher": str(teacher.resolve()), "student": student}
    train = raw.setdefault("train", {})
    train.update(path_policy="fixed", init=None, weighting={"name": "static"}, placement="auto")
    train["out_dir"] = str(out) if out is not None else f"runs/distill-{task}-{student.replace('/', '_')}"
    cfg = config_from_dict(raw, f"ufo distill {teacher}", overrides)
    student_backbone(cfg, pretrained=False)  # the student exists and takes the task's images: said now, not later
    return cfg
