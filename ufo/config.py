"""The run's configuration: one typed, frozen schema loaded from YAML with dotted overrides.

Every section has defaults that run. A config error is raised once, at load, as one line
naming the file and the dotted key (`configs/demo.yaml: tasks.face.path: ...`).
"""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ufo.errors import ConfigError

TASK_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
PATH_CHARS = frozenset("ST")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


class ModelConfig(Section):
    """The supernet's ViT architecture (timm `VisionTransformer` arguments) and its initialisation."""

    img_size: int = Field(32, gt=0)
    patch_size: int = Field(4, gt=0)
    in_chans: int = Field(3, gt=0)
    embed_dim: int = Field(128, gt=0)
    depth: int = Field(6, gt=0)
    num_heads: int = Field(4, gt=0)
    mlp_ratio: float = Field(4.0, gt=0)
    qkv_bias: bool = True
    init_values: float | None = None  # LayerScale; None leaves it out, as in timm
    global_pool: Literal["token", "avg"] = "token"
    # timm's other ViT variants: register tokens, no position embedding on the prefix tokens (DINOv2
    # with registers), a norm before the blocks (CLIP), a norm after pooling (fc_norm; None: timm's
    # rule, with avg pooling), the FFN activation and the LayerNorm epsilon (CLIP: 1e-5)
    reg_tokens: int = Field(0, ge=0)
    no_embed_class: bool = False
    pre_norm: bool = False
    fc_norm: bool | None = None
    act_layer: Literal["gelu", "gelu_tanh", "quick_gelu"] = "gelu"
    norm_eps: float = Field(1e-6, gt=0)
    # the supernet's start: a timm model name with its pretrained tag (vit_base_patch16_224.mae),
    # loaded by timm's own pretrained machinery (the Hugging Face cache; `pretrained_file` for a local
    # file of that model), or a path to a plain timm ViT state dict (.safetensors/.pth/.bin). With a
    # name, the architecture keys above come from timm's definition of it (see ufo/pretrained.py);
    # img_size, patch_size (resampled by timm) and depth (the first blocks) may differ.
    pretrained: str | None = None
    pretrained_file: str | None = None
    drop_path_rate: float = Field(0.0, ge=0, lt=1)
    # FFN-task MLPs start as copies of FFN-shared (UFO), or with their own random init.
    task_ffn_init: Literal["copy_shared", "random"] = "copy_shared"
    # which FFNs the supernet builds. all: FFN-shared and every FFN-task in every block; on_path:
    # only those on the tasks' configured paths (a block's FFN-shared if some task takes S there,
    # a task's FFN-task where it takes T), the rest never get a gradient under train.path_policy:
    # fixed; auto: on_path under the fixed policy, else all (path search needs all)
    ffns: Literal["auto", "all", "on_path"] = "auto"


class ElasticConfig(Section):
    """Elastic sizes a task trains besides the full one: every step it runs one of them, by the
    sandwich rule (largest, smallest, a random one in between, in turn)."""

    depths: tuple[int, ...] = ()  # prefixes of the blocks, e.g. [2, 4, 6]
    mlp_ratios: tuple[float, ...] = ()  # FFN hidden widths as ratios of model.embed_dim, e.g. [1.0, 2.0, 4.0]
    num_heads: tuple[int, ...] = ()  # attention heads kept (the first ones, each as wide as the supernet's), e.g. [6, 9]


class AugmentConfig(Section):
    """A task's own training augmentation: each key set here replaces `data`'s for this task."""

    scale: tuple[float, float] | None = None
    hflip: float | None = Field(None, ge=0, le=1)
    color_jitter: float | None = None
    auto_augment: str | None = None
    re_prob: float | None = Field(None, ge=0, le=1)  # random erasing: the re-id recipe's 0.5
    # classification only: timm's Mixup on each training batch (alpha of the Beta distribution; 0 off;
    # both set: one or the other per batch, half and half), with soft targets and their cross-entropy
    mixup: float = Field(0.0, ge=0)
    cutmix: float = Field(0.0, ge=0)


class TripletConfig(Section):
    """Batch-hard triplet loss beside the ID loss (Hermans et al. 2017, as fast-reid's
    `MODEL.LOSSES.TRI`): on the embedding before the neck, mined within a rank's slice of the task."""

    weight: float = Field(1.0, ge=0)  # fast-reid's TRI.SCALE
    margin: float = Field(0.3, ge=0)  # 0: the soft margin, log(1 + exp(d_ap - d_an))
    norm_feat: bool = False  # cosine distances of L2-normalized embeddings instead of Euclidean ones


class PartialFcConfig(Section):
    """Partial FC (InsightFace arcface_torch's PartialFC_V2): a margin softmax task's class centres
    split over its ranks, the softmax normalised across the shards, negatives sampled."""

    # the share of each rank's centres a step computes logits for: every positive (a class in the
    # step's batch of the task's ranks), then random negatives up to int(sample_rate * shard rows)
    sample_rate: float = Field(1.0, gt=0, le=1)


class TaskConfig(Section):
    """One learning problem: its kind, classes, loss weight, path, head and data."""

    kind: Literal["classification", "retrieval"]
    num_classes: int = Field(gt=1)
    weight: float = Field(1.0, ge=0)
    # One letter per block: S = FFN-shared, T = this task's FFN-task. Default: lower half S.
    path: str | None = None
    # retrieval: the deployed embedding's size (default: model.embed_dim) and the margin softmax
    embedding_dim: int | None = Field(None, gt=0)
    margin: Literal["cosface", "arcface"] = "cosface"
    margin_scale: float = Field(30.0, gt=0)
    margin_value: float = Field(0.35, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    id_loss_weight: float = Field(1.0, ge=0)  # the margin softmax's (ID loss) weight; 0 with a triplet: triplet only
    triplet: TripletConfig | None = None  # retrieval: batch-hard triplet loss beside the ID loss
    # retrieval: `bnneck` puts a BatchNorm1d (bias frozen) after the embedding: the triplet loss reads
    # the embedding before it, the ID loss and the deployed embedding after it (folded into the
    # subnet's head at export)
    neck: Literal["none", "bnneck"] = "none"
    # retrieval: the margin softmax's centres sharded over the task's ranks (train.layout task_parallel,
    # placement task_sharded); see PartialFcConfig
    partial_fc: PartialFcConfig | None = None
    # training batches: `random` (shuffled samples), or `pk`: P identities x K (`instances`) samples each,
    # P = the micro-batch / K (fast-reid's identity sampler; `ufo/data/sampler.py`)
    sampler: Literal["random", "pk"] = "random"
    instances: int = Field(4, gt=0)
    # samples of this task per rank per micro-step (default train.micro_batch_size), in either layout
    micro_batch_size: int | None = Field(None, gt=0)
    # this task's input size: an int (square) or [height, width] (people: [256, 128]); default
    # model.img_size. The supernet's position embedding stays at model.img_size's grid and is
    # resampled to the task's (timm's dynamic image size); the task's subnet takes it resampled.
    img_size: int | tuple[int, int] | None = None
    # WebDataset shards: a directory (its manifest.json, else its *.tar), a brace/glob pattern,
    # or pipe:/URL specs that webdataset opens
    shards: str | None = None
    # one evaluation set (a directory or pattern as `shards`); {query: ..., gallery: ...} for the
    # reid protocol; or named sets, each measured and reported on its own ({lfw: ..., cfp_fp: ...})
    eval_shards: str | dict[str, str] | None = None
    # how the eval sets are measured (`ufo/evaluate.py`); default: the sets' manifest, else by kind
    # (classification: top-1/5; retrieval: leave-one-out Recall@K and mAP)
    protocol: Literal["classification", "retrieval", "reid", "verification"] | None = None
    flip_test: bool = False  # embed each eval image plus its mirror (the faces' flip test)
    # resampled mode on shards whose sample counts are unknown (no manifest, not local)
    samples_per_epoch: int | None = Field(None, gt=0)
    ranks: int | None = Field(None, gt=0)  # task_parallel: ranks serving this task (default: by weight)
    ffn_lr_scale: float = Field(1.0, ge=0)  # this task's FFN-task MLPs' lr as a fraction of the run's
    hflip: float | None = Field(None, ge=0, le=1)  # overrides data.hflip for this task (as augment.hflip)
    augment: AugmentConfig = AugmentConfig()  # this task's training augmentation, over data's
    elastic: ElasticConfig | None = None  # elastic depth / FFN width training (None: full size only)

    def recipe(self, micro_batch_size: int, size: tuple[int, int]) -> str:
        """How the task trains, in a few words (`ufo info`)."""
        parts = [f"{size[0]}x{size[1]} px", f"batch {micro_batch_size}" + (f" = {micro_batch_size // self.instances} identities x "
                                                f"{self.instances}" if self.sampler == "pk" else " random")]
        if self.kind == "classification":
            parts.append("cross-entropy" + (f" (smoothing {self.label_smoothing:g})" if self.label_smoothing else ""))
        else:
            if self.id_loss_weight:
                parts.append(f"{self.margin} x{self.id_loss_weight:g}")
            if self.triplet is not None and self.triplet.weight:
                margin = f"margin {self.triplet.margin:g}" if self.triplet.margin else "soft margin"
                parts.append(f"triplet ({margin}) x{self.triplet.weight:g}")
            if self.neck != "none":
                parts.append(self.neck)
            if self.partial_fc is not None:
                parts.append(f"partial FC (sample rate {self.partial_fc.sample_rate:g})")
        own = {k: v for k, v in self.augment.model_dump().items() if v is not None and v != 0.0}
        if own:
            parts.append("augment " + " ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in own.items()))
        return ", ".join(parts)

    @field_validator("path")
    @classmethod
    def _path_letters(cls, path: str | None) -> str | None:
        if path is not None:
            path = path.strip().upper()
            bad = set(path) - PATH_CHARS
            if bad or not path:
                raise ValueError(f"a path is a string of S (shared) and T (task) per block, got {path!r}")
        return path


class EmaConfig(Section):
    """An exponential moving average of the weights (timm's ModelEmaV3 semantics; ufo/ema.py)."""

    decay: float = Field(0.9998, ge=0, lt=1)
    every: int = Field(1, gt=0)  # optimizer steps between updates
    warmup: bool = False  # timm's warmup: decay 1 - (1 + step)^(-3/4) until it reaches `decay`


class DataConfig(Section):
    """How shards are read, and the preprocessing shared by training, evaluation and export."""

    # exact: every sample once per epoch across the task's ranks; resampled: shards drawn with
    # replacement, endless. Both give every rank the same number of batches per epoch.
    mode: Literal["exact", "resampled"] = "exact"
    num_workers: int = Field(2, ge=0)
    shuffle_buffer: int = Field(1000, ge=0)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bicubic"
    crop_pct: float = Field(1.0, gt=0, le=1)
    # training augmentation (timm.data.create_transform); a task may override each (tasks.<t>.augment)
    scale: tuple[float, float] = (0.6, 1.0)
    hflip: float = Field(0.5, ge=0, le=1)
    color_jitter: float | None = None
    auto_augment: str | None = None
    re_prob: float = Field(0.0, ge=0, le=1)  # random erasing (timm's RandomErasing, per-pixel noise)


WEIGHTING_PARAMS = {  # which strategies read which keys of train.weighting
    "alpha": ("gradnorm", "lbtw"),
    "lr": ("uncertainty", "gradnorm"),
    "temperature": ("dwa",),
    "window": ("dwa",),
    "gamma": ("dtp",),
    "smoothing": ("dtp",),
}


class WeightingConfig(Section):
    """How the tasks' losses are weighted into the total loss (`ufo/weighting.py`).

    equal: mean of the losses; static: tasks.*.weight; initial: 1 / the task's first loss;
    prior: 1 / the entropy of the task's label frequencies; realtime: 1 / the current loss;
    gradnorm_static: 1 / the norm of the task's gradient on the shared representation;
    uncertainty: learned log-variances (Kendall 2018); gradnorm: learned weights balancing
    gradient norms (Chen 2018); dwa: Dynamic Weight Average (Liu 2019); lbtw: (L / L0)^alpha
    (Liu 2019); dtp: focal weights of a smoothed accuracy (Guo 2018).
    """

    name: Literal["equal", "static", "initial", "prior", "realtime", "gradnorm_static", "uncertainty",
                  "gradnorm", "dwa", "lbtw", "dtp"] = "static"
    alpha: float | None = Field(None, ge=0)  # gradnorm: restoring force (1.5); lbtw: exponent (0.5)
    lr: float = Field(0.025, gt=0)  # uncertainty, gradnorm: Adam learning rate of the learned weights
    temperature: float = Field(2.0, gt=0)  # dwa: softmax temperature
    window: int = Field(20, gt=0)  # dwa: optimizer steps per window (its "epoch")
    gamma: float = Field(1.0, ge=0)  # dtp: focusing exponent
    smoothing: float = Field(0.5, gt=0, le=1)  # dtp: weight of the newest accuracy in its moving average
    # gradnorm: L0 is the mean of each task's first `initial_steps` losses (1: Chen et al.'s first
    # step; one step's loss can be tiny, and weights collapse toward the task that had it)
    initial_steps: int = Field(10, gt=0)
    # lbtw: rescale the weights to sum to the number of tasks every step (what the authors' code
    # does); false: (L / L0)^alpha as the paper writes it
    normalize: bool = False


class Temperature(Section):
    start: float = Field(5.0, gt=0)  # VIMER-UFO's constant temperature
    end: float = Field(1.0, gt=0)  # annealed geometrically from start to end over train.steps


class PathLearning(Section):
    """`train.path_policy: learned`: per task and block, logits for [FFN-shared, FFN-task], sampled
    with Gumbel noise and made hard (straight-through), trained with the network."""

    lr: float = Field(0.05, gt=0)  # the logits' own learning rate (peak, on the run's schedule)
    weight_decay: float = Field(0.0, ge=0)
    temperature: Temperature = Temperature()
    # a task's block is decided (frozen; from then on only the chosen FFN runs) once the run is past
    # decide_after steps and the choice's probability is at least `confidence`
    decide_after: int = Field(100, ge=0)
    confidence: float = Field(0.9, gt=0.5, le=1)
    # added to the objective per expected task-specific block of each task: a task that gains
    # nothing from its own FFN falls back to the shared one (a smaller multi-task deployment)
    task_block_cost: float = Field(0.0, ge=0)


class TrainConfig(Section):
    """The training loop: steps, optimizer and schedule, paths, evaluation and checkpoints."""

    seed: int = 0
    out_dir: str = "runs/demo"  # checkpoints, metrics and the resolved config; reruns resume here
    init: str | None = None  # a supernet checkpoint to start from (`ufo init`), else a seeded init
    steps: int = Field(300, gt=0)  # optimizer steps
    micro_batch_size: int = Field(32, gt=0)  # samples per rank per micro-step (per task in mixed)
    gradient_accumulation_steps: int = Field(1, gt=0)
    # activation checkpointing: 0 off; k: every k-th block (0, k, 2k, ...) keeps only its input and runs
    # again in the backward (1 or true: every block); torch's non-reentrant checkpoint, any ZeRO stage
    activation_checkpointing: int = Field(0, ge=0)
    # an exponential moving average of the weights, evaluated beside them, checkpointed, exported with --ema
    ema: EmaConfig | None = None
    # torch.compile each block's attention and FFNs (in place, dynamic shapes: slices change sizes every step)
    compile: bool = False
    # task_parallel: each rank serves one task; mixed: each micro-batch holds every task;
    # auto: task_parallel when there are at least as many ranks as tasks
    layout: Literal["auto", "task_parallel", "mixed"] = "auto"
    # where task parameters live. replicated: every rank holds every task's FFN-task MLPs and head;
    # task_sharded: a rank holds the shared parts and its own task only (task_parallel layout; ZeRO 0-2);
    # auto: task_sharded in task_parallel where the engine supports it, else replicated
    placement: Literal["auto", "replicated", "task_sharded"] = "auto"
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1)  # sgd only
    lr: float = Field(1e-3, gt=0)  # peak learning rate, reached after warmup_steps
    min_lr_ratio: float = Field(0.01, ge=0, le=1)  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = Field(20, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float | None = Field(None, gt=0, le=1)  # layer-wise lr decay (None: off)
    gradient_clipping: float = Field(1.0, ge=0)  # max global grad norm; 0 turns clipping off
    # fixed: each task's configured path; sample: every step each task draws its path (one-shot
    # supernet training), each block task-specific with probability path_sample_p; learned: each
    # task's path is learned with the network (train.path)
    path_policy: Literal["fixed", "sample", "learned"] = "fixed"
    path_sample_p: float = Field(0.5, ge=0, le=1)
    path: PathLearning = PathLearning()
    # the FFN-shared MLPs' lr as a fraction of the run's (0 freezes them, as VIMER-UFO's released config)
    shared_ffn_lr_scale: float = Field(1.0, ge=0)
    log_every: int = Field(10, gt=0)
    # every k-th step, per task: loss against its first, gradient norm on the shared parameters, and the
    # cosine between every pair of tasks' shared gradients (ufo/diagnostics.py; costs a backward per task
    # then); 0: off. The global gradient norm is recorded every step whatever this is
    diagnostics_every: int = Field(100, ge=0)
    eval_every: int = Field(0, ge=0)  # 0: evaluate at the end only
    eval_batch_size: int = Field(128, gt=0)
    checkpoint_every: int = Field(0, ge=0)  # 0: at the end (and on SIGTERM/SIGUSR1) only
    keep_checkpoints: int = Field(3, gt=0)
    # keep each task's best checkpoint (its headline eval metric's peak; ufo/best.py) besides the newest
    keep_best: bool = False
    # the run's PNGs at its end (losses and weights, diagnostics, learned paths): off for sweeps of short runs
    plots: bool = True
    # seconds a collective (and so every rank) waits for a rank that is hung, stopped or cut off
    # before the job fails: long enough for the slowest checkpoint save or evaluation of rank 0
    collective_timeout: float = Field(600, gt=0)
    weighting: WeightingConfig = WeightingConfig()


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # fp16 uses dynamic loss scaling (CUDA only)
    # merged last into the DeepSpeed config ufo builds, for anything DeepSpeed offers
    # (e.g. {zero_optimization: {offload_optimizer: {device: cpu}}})
    overrides: dict[str, Any] = {}


class TrackingConfig(Section):
    """MLflow, on rank 0 (`ufo/tracking.py`)."""

    enabled: bool = True
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite under train.out_dir
    experiment: str = "ufo"
    run_name: str | None = None
    tags: dict[str, str] = {}
    system_metrics_every: float = Field(10.0, ge=0)  # seconds between CPU/memory/GPU samples; 0: off
    flush_timeout: float = Field(30.0, ge=0)  # seconds the end of a run retries what the store refused


class ExportConfig(Section):
    formats: tuple[Literal["safetensors", "onnx", "torchscript", "onnx-int8"], ...] = ("safetensors",)
    verify: bool = True
    atol: float = Field(1e-5, gt=0)  # largest |subnet - supernet| accepted by verification
    # onnx-int8: static (activation ranges calibrated on the task's images), dynamic (ranges per batch), or
    # auto: dynamic for transformers, static for the others (onnxruntime's advice; docs/export.md)
    int8: Literal["auto", "static", "dynamic"] = "auto"
    calibration: str | None = None  # static INT8's images: shards (default: the task's train shards)
    calibration_samples: int = Field(256, gt=0)
    int8_max_drop: float = Field(0.02, ge=0)  # largest loss of the primary metric, INT8 against fp32


class DistillConfig(Section):
    """A distillation run: a student, any timm model, trained on the run's one task from a teacher (the
    task's exported subnet, or a supernet checkpoint on the task's path), by the losses its kind's
    literature uses (ufo/model/losses.py), beside the task's own loss on labels."""

    teacher: str  # an exported subnet directory, or a supernet checkpoint (a run, step directory or file)
    student: str  # a timm model name: vit_tiny_patch16_224, resnet50, mobilenetv3_large_100, ...
    student_args: dict[str, Any] = {}  # timm.create_model arguments (depth=, embed_dim=, ...)
    # the student's start: False (timm's initialisation), True (timm's released weights by name, through
    # its hub cache), or a weights file (.safetensors / .pth)
    pretrained: bool | str = False
    path: str | None = None  # a checkpoint teacher's path (default: the task's trained path)
    task_weight: float = Field(1.0, ge=0)  # the task's own loss on labels
    temperature: float = Field(4.0, gt=0)  # classification: of both softmaxes (timm/DeiT soft distillation)
    logits_weight: float = Field(1.0, ge=0)  # classification: KL(teacher || student) at the temperature, x T^2
    embedding_weight: float = Field(1.0, ge=0)  # retrieval: |student - teacher|^2 of the L2-normalized embeddings
    relation_weight: float = Field(1.0, ge=0)  # retrieval: PKT, the rows of the batch's similarity matrices (fast-reid)


class UfoConfig(Section):
    """A whole run: model, tasks, data, train, deepspeed, tracking, export; `distill` makes it a
    distillation run."""

    model: ModelConfig = ModelConfig()
    tasks: dict[str, TaskConfig]
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    tracking: TrackingConfig = TrackingConfig()
    export: ExportConfig = ExportConfig()
    distill: DistillConfig | None = None

    def path_of(self, task: str) -> str:
        """The task's configured path (always set once loaded)."""
        return self.tasks[task].path  # type: ignore[return-value]

    def batch_of(self, task: str) -> int:
        """The task's micro-batch per rank: its own, else `train.micro_batch_size`."""
        return self.tasks[task].micro_batch_size or self.train.micro_batch_size

    def size_of(self, task: str) -> tuple[int, int]:
        """The task's input (height, width): its own img_size, else `model.img_size`."""
        size = self.tasks[task].img_size or self.model.img_size
        return (size, size) if isinstance(size, int) else tuple(size)  # type: ignore[return-value]

    def dynamic_size(self) -> bool:
        """Whether some task's input size is not model.img_size (the supernet resamples its position
        embedding per input size)."""
        return any(self.size_of(t) != (self.model.img_size,) * 2 for t in self.tasks)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-able data (what checkpoints and MLflow store)."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _check_distill(cfg: UfoConfig, fail: Callable[..., ConfigError]) -> None:
    """A distillation run: one task, trained the plain way (a fixed path, its own loss, full size)."""
    d, t = cfg.distill, cfg.train
    if len(cfg.tasks) != 1:
        raise fail("tasks", f"a distillation run trains one task's student; this config has {len(cfg.tasks)} "
                            f"({', '.join(cfg.tasks)})", related="distill")
    (name, task), = cfg.tasks.items()
    if t.path_policy != "fixed" or t.init:
        raise fail("train.path_policy" if t.path_policy != "fixed" else "train.init",
                   "a student has no paths and starts from distill.pretrained", related="distill")
    if task.elastic is not None:
        raise fail(f"tasks.{name}.elastic", "a student trains at its own size only", related="distill")
    if t.weighting.name != "static":
        raise fail("train.weighting.name", "one task: its losses are weighted by distill.*_weight",
                   related="distill")
    if task.partial_fc is not None:
        raise fail(f"tasks.{name}.partial_fc", "a student's head is dense (its centres are not sharded)",
                   related="distill")
    if d.path is not None and (len(d.path) != cfg.model.depth or set(d.path.upper()) - {"S", "T"}):
        raise fail("distill.path", f"{d.path!r} is not {cfg.model.depth} letters of S/T (the teacher's model.depth)")


def sharding_unsupported(cfg: UfoConfig) -> str:
    """Why the engine cannot shard this config's tasks, or ''."""
    d = cfg.deepspeed
    if cfg.distill is not None:
        return "a distillation run trains one student on one task: there is nothing to shard"
    if d.zero_stage == 3:
        return ("DeepSpeed refuses expert parameters under ZeRO-3, so every rank holds every task's FFN-task MLPs "
                "and heads (partitioned over the world)")
    if d.precision == "fp16":
        return ("fp16's overflow check runs over expert-parallel groups that cannot hold one rank of every task; "
                "use bf16")
    if d.zero_stage == 0 and d.precision != "fp32":
        return (f"{d.precision} under ZeRO-0 computes its gradient norm over expert-parallel groups that cannot "
                "hold one rank of every task; use ZeRO-1 (same weights per rank, sharded optimizer state)")
    return ""


def ffns_on_path(cfg: UfoConfig) -> bool:
    """Whether the supernet builds only the FFNs on its tasks' configured paths (`model.ffns`)."""
    return cfg.model.ffns == "on_path" or (cfg.model.ffns == "auto" and cfg.train.path_policy == "fixed")


def default_path(depth: int) -> str:
    """Lower blocks shared, upper blocks task-specific: the usual starting point."""
    return "S" * ((depth + 1) // 2) + "T" * (depth // 2)


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> UfoConfig:
    """Load a YAML config file and apply `KEY=VALUE` dotted overrides."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(raw, source=str(path), overrides=overrides)


def config_from_dict(raw: Mapping[str, Any], source: str, overrides: Sequence[str] = ()) -> UfoConfig:
    """Validate a raw mapping (from YAML or a checkpoint); `source` names it in errors."""
    raw = json.loads(json.dumps(raw))  # a deep, plain copy we may edit
    defined = set(raw.get("tasks") or {}) if isinstance(raw.get("tasks"), dict) else set()
    overridden = {}
    for item in overrides:
        key, value = _parse_override(item, source)
        _set_dotted(raw, key, value, source)
        overridden[key] = item
        parts = key.split(".")
        if parts[0] == "tasks" and len(parts) > 2 and parts[1] not in defined:
            # `--set tasks.NAME.x=...` on a task the file does not define is almost always a typo
            raise ConfigError(f"{source}: tasks.{parts[1]}: no such task (defined: {', '.join(sorted(defined))}; "
                              f"add one whole: --set 'tasks.{parts[1]}={{kind: ..., num_classes: ...}}') "
                              f"(from --set {item})")
        if parts == ["tasks"] and isinstance(value, dict):
            defined = set(value)
        elif parts[0] == "tasks" and len(parts) == 2:
            defined.add(parts[1])
    try:
        cfg = UfoConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_describe(e, source, overridden)) from None
    return _check(cfg, source, overridden)


def _parse_override(item: str, source: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{source}: --set {item!r}: expected KEY=VALUE with a dotted key, e.g. model.depth=6")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(raw: dict, key: str, value: Any, source: str) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise ConfigError(f"{source}: --set {key}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _describe(error: ValidationError, source: str, overridden: Mapping[str, str]) -> str:
    first = error.errors()[0]
    loc = [str(p) for p in first["loc"]]
    key = ".".join(loc) or "(top level)"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        known = _known_keys(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        if close:
            msg += f" (did you mean {'.'.join(loc[:-1] + close)}?)"
        elif known:
            msg += f" (known: {', '.join(sorted(known))})"
    elif first["type"] == "missing":
        msg = "required key is missing"
    else:
        msg = first["msg"]
        if "input" in first and not isinstance(first["input"], (dict, list)):
            msg += f", got {first['input']!r}"
    more = len(error.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {key}: {msg}{_from_override(key, overridden)}{tail}"


def _known_keys(parent: list[str]) -> list[str]:
    """Field names of the section at `parent` (task names themselves are free keys)."""
    if not parent:
        return list(UfoConfig.model_fields)
    if parent[0] == "tasks":
        if len(parent) == 3 and parent[2] == "elastic":
            return list(ElasticConfig.model_fields)
        return list(TaskConfig.model_fields) if len(parent) == 2 else []
    field = UfoConfig.model_fields.get(parent[0])
    section = field.annotation if field else None
    if section is not None and not isinstance(section, type):  # an optional section (distill): its model
        section = next((a for a in get_args(section) if isinstance(a, type) and issubclass(a, BaseModel)), None)
    if len(parent) == 1 and isinstance(section, type) and issubclass(section, BaseModel):
        return list(section.model_fields)
    if parent == ["train", "weighting"]:
        return list(WeightingConfig.model_fields)
    return []


def _from_override(key: str, overridden: Mapping[str, str]) -> str:
    for okey, item in overridden.items():
        if key == okey or key.startswith(okey + ".") or okey.startswith(key + "."):
            return f" (from --set {item})"
    return ""


def _check(cfg: UfoConfig, source: str, overridden: Mapping[str, str]) -> UfoConfig:
    """Checks across keys; fills each task's default path."""

    def fail(key: str, msg: str, related: str = "") -> ConfigError:
        hint = _from_override(key, overridden) or (_from_override(related, overridden) if related else "")
        return ConfigError(f"{source}: {key}: {msg}{hint}")

    if cfg.model.pretrained or cfg.model.pretrained_file or cfg.model.norm_eps != 1e-6:
        from ufo.pretrained import resolve_architecture  # imports timm: a config that names no model need not

        try:
            cfg = cfg.model_copy(update={"model": resolve_architecture(cfg.model)})
        except ConfigError as e:
            key, _, msg = str(e).partition(": ")
            raise fail(key, msg) from None
    m = cfg.model
    if m.img_size % m.patch_size:
        raise fail("model.patch_size", f"img_size {m.img_size} is not a multiple of patch_size {m.patch_size}")
    if m.embed_dim % m.num_heads:
        raise fail("model.num_heads", f"embed_dim {m.embed_dim} does not split into {m.num_heads} heads "
                                      f"(head dim {m.embed_dim / m.num_heads:g} is not an integer)")
    if not cfg.tasks:
        raise fail("tasks", "define at least one task")
    w = cfg.train.weighting
    for key in sorted(WEIGHTING_PARAMS):  # a resolved config holds every default: only other values count
        if w.name not in WEIGHTING_PARAMS[key] and getattr(w, key) != WeightingConfig.model_fields[key].default:
            raise fail(f"train.weighting.{key}", f"is read by {' and '.join(WEIGHTING_PARAMS[key])} only, "
                                                 f"not by {w.name}", related="train.weighting.name")
    if cfg.train.placement == "task_sharded":
        if cfg.train.layout == "mixed":
            raise fail("train.placement", "task_sharded needs train.layout task_parallel (or auto), not mixed",
                       related="train.layout")
        why = sharding_unsupported(cfg)
        if why:
            raise fail("train.placement", f"task_sharded is not possible here: {why}; set train.placement: "
                                          "replicated or auto", related="deepspeed.zero_stage")
    if m.ffns == "on_path" and cfg.train.path_policy != "fixed":
        raise fail("model.ffns", f"on_path builds only the FFNs on the configured paths, but train.path_policy "
                                 f"{cfg.train.path_policy} takes others; set model.ffns: all or auto",
                   related="train.path_policy")
    if cfg.train.compile and cfg.deepspeed.zero_stage == 3:
        raise fail("train.compile", "not under ZeRO-3: its parameter hooks would run inside the compiled modules; "
                                    "use ZeRO 0-2 or leave train.compile off", related="deepspeed.zero_stage")
    if cfg.distill is not None:
        _check_distill(cfg, fail)
    if cfg.train.keep_best:
        unmeasured = [name for name, task in cfg.tasks.items() if not task.eval_shards]
        if unmeasured:
            raise fail(f"tasks.{unmeasured[0]}.eval_shards", "train.keep_best keeps each task's best checkpoint by its "
                                                            "eval metric: set every task's eval_shards",
                       related="train.keep_best")
    tasks = {}
    for name, task in cfg.tasks.items():
        key = f"tasks.{name}"
        if not TASK_NAME.match(name):
            raise fail(key, "task names are lower-case letters, digits and _, starting with a letter")
        path = task.path or default_path(m.depth)
        if len(path) != m.depth:
            raise fail(f"{key}.path", f"path {path!r} has {len(path)} blocks but model.depth is {m.depth}",
                       related="model.depth")
        for side in (task.img_size,) if isinstance(task.img_size, int) else task.img_size or ():
            if side <= 0 or side % m.patch_size:
                raise fail(f"{key}.img_size", f"{side} is not a positive multiple of model.patch_size "
                                              f"{m.patch_size}", related="model.patch_size")
        if task.kind == "classification" and task.embedding_dim is not None:
            raise fail(f"{key}.embedding_dim",
                       "only retrieval tasks have an embedding; remove it or set kind: retrieval")
        if task.kind == "classification" and (task.triplet is not None or task.neck != "none"):
            which = "triplet" if task.triplet is not None else "neck"
            raise fail(f"{key}.{which}", "the triplet loss and the BNNeck are for retrieval tasks (embeddings); "
                                         "remove it or set kind: retrieval")
        if task.kind != "classification" and (task.augment.mixup or task.augment.cutmix):
            which = "mixup" if task.augment.mixup else "cutmix"
            raise fail(f"{key}.augment.{which}", "mixes classes into soft targets: for classification tasks only "
                                                 "(a retrieval task's margin softmax and triplet need one identity "
                                                 "a sample)")
        if task.sampler == "pk" and cfg.batch_of(name) % task.instances:
            raise fail(f"{key}.instances", f"sampler pk takes P identities x K = {task.instances} samples a batch; "
                                           f"the micro-batch {cfg.batch_of(name)} is not a multiple of it",
                       related=f"{key}.micro_batch_size" if task.micro_batch_size else "train.micro_batch_size")
        if task.id_loss_weight == 0 and (task.triplet is None or task.triplet.weight == 0):
            raise fail(f"{key}.id_loss_weight", "with the ID loss off (0) the task needs a triplet loss "
                                                "(tasks.<t>.triplet with a weight > 0)")
        if task.elastic is not None:
            bad_depth = [d for d in task.elastic.depths if not 1 <= d <= m.depth]
            if bad_depth:
                raise fail(f"{key}.elastic.depths", f"depth {bad_depth[0]} is not in 1..{m.depth} (model.depth)")
            bad_ratio = [r for r in task.elastic.mlp_ratios
                         if not (0 < r <= m.mlp_ratio and int(m.embed_dim * r) >= 1)]
            if bad_ratio:
                raise fail(f"{key}.elastic.mlp_ratios", f"ratio {bad_ratio[0]:g} is not in (0, {m.mlp_ratio:g}] "
                                                         "(model.mlp_ratio)")
            bad_heads = [n for n in task.elastic.num_heads if not 1 <= n <= m.num_heads or m.embed_dim % n]
            if bad_heads:
                raise fail(f"{key}.elastic.num_heads", f"{bad_heads[0]} heads: give 1..{m.num_heads} (model.num_heads) "
                                                        f"dividing model.embed_dim {m.embed_dim} (timm sizes a ViT's "
                                                        "attention by embed_dim // num_heads before ufo narrows it)")
        if task.protocol is not None and (task.protocol == "classification") != (task.kind == "classification"):
            raise fail(f"{key}.protocol", f"the {task.protocol} protocol measures "
                                          f"{'logits' if task.protocol == 'classification' else 'embeddings'}, "
                                          f"but a {task.kind} task gives "
                                          f"{'logits' if task.kind == 'classification' else 'embeddings'}")
        if isinstance(task.eval_shards, dict):
            bad = [n for n in task.eval_shards if not TASK_NAME.match(n)]
            if bad or not task.eval_shards:
                raise fail(f"{key}.eval_shards", f"eval set names are lower-case letters, digits and _, "
                                                 f"starting with a letter; got {bad[0] if bad else 'none'!r}")
        if task.partial_fc is not None:
            if task.kind != "retrieval" or not task.id_loss_weight:
                raise fail(f"{key}.partial_fc", "shards a margin softmax's class centres: for retrieval tasks with "
                                                "the ID loss on (id_loss_weight > 0)")
            if cfg.train.layout == "mixed" or cfg.train.placement == "replicated":
                which = "train.layout" if cfg.train.layout == "mixed" else "train.placement"
                raise fail(f"{key}.partial_fc", f"shards the centres over the task's own ranks: needs train.layout "
                                                f"task_parallel and train.placement task_sharded (or auto), not "
                                                f"{getattr(cfg.train, which.split('.')[1])}", related=which)
            why = sharding_unsupported(cfg)
            if why:
                raise fail(f"{key}.partial_fc", f"needs train.placement task_sharded, not possible here: {why}",
                           related="deepspeed.zero_stage")
        if task.kind == "retrieval" and task.margin == "arcface" and task.margin_value >= 3.14159:
            raise fail(f"{key}.margin_value", "an ArcFace margin is an angle in radians below pi")
        tasks[name] = task.model_copy(update={"path": path})
    return cfg.model_copy(update={"tasks": tasks})


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted MLflow params (`train.weighting.name`); lists and empty maps as JSON."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            text = json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)
            flat[name] = text[:6000]
    return flat


# what a task's data position (epoch, batches taken) was planned from: after a change, the position
# no longer names the same samples (all tasks' for a run-wide key, the task's own for a task's key)
DATA_PLAN_KEYS = ("train.micro_batch_size", "train.seed", "data.mode", "data.shuffle_buffer", "data.num_workers")
TASK_DATA_PLAN_KEYS = ("shards", "samples_per_epoch", "micro_batch_size", "sampler", "instances")


def config_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Dotted key -> (saved value, value now) of every setting that differs between two resolved configs."""
    before, after = flatten(saved), flatten(now)
    return {key: (before.get(key, "(unset)"), after.get(key, "(unset)"))
            for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)}


def data_plan_changes(changes: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, list[str]]:
    """Task -> the changed keys that move its data position (see DATA_PLAN_KEYS)."""
    out: dict[str, list[str]] = {}
    for key in changes:
        if key in DATA_PLAN_KEYS:
            for task in tasks:
                out.setdefault(task, []).append(key)
        parts = key.split(".")
        if len(parts) == 3 and parts[0] == "tasks" and parts[1] in tasks and parts[2] in TASK_DATA_PLAN_KEYS:
            out.setdefault(parts[1], []).append(key)
    return out
