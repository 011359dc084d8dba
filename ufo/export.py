"""The pruning step: a supernet checkpoint -> one task's deployable subnet, a plain timm ViT.

The output directory holds `model.safetensors` (timm's key names, the task head as `head`),
`config.json` (timm's `model_args` and preprocessing; the task, kind, path, parameter count and
verification figures under "ufo"), and optionally `model.onnx` and `model.torchscript.pt`.
Every format is checked against the supernet before the directory appears; a failed export
leaves nothing behind and never touches an existing directory.
"""

from __future__ import annotations

import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import timm
import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from timm.models._hub import save_config_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import ufo
from ufo.atomic import atomic_dir
from ufo.checkpoint import Checkpoint, load_supernet, read_checkpoint, trained_path, write_failure
from ufo.config import UfoConfig
from ufo.distill import deployed_student, load_student
from ufo.errors import ExportError
from ufo.model import SupernetViT, narrow_attention, postprocess, subnet_args, subnet_state_dict
from ufo.pretrained import timm_name
from ufo.quantize import Int8Check, Int8Options, int8_subnet
from ufo.subnet import FILES, DeployedSubnet, timm_subnet

FORMATS = ("safetensors", "onnx", "torchscript", "onnx-int8")
Log = Callable[[str], None]


@dataclass
class SubnetExport:
    """What one export wrote and how closely each format matched the supernet."""

    task: str
    kind: str
    path: str
    out_dir: Path
    param_count: int
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    path_from: str = "config"  # the configured path, a run's "learned" one, or one "given" (--path)
    int8: Int8Check | None = None  # onnx-int8, verified: the task's metric of the fp32 and INT8 graphs


def export_subnet(checkpoint: str | Path | Checkpoint, task: str, out: str | Path, path: str | None = None,
                  formats: Sequence[str] | None = None, overwrite: bool = False, verify: bool | None = None,
                  atol: float | None = None, log: Log = print, depth: int | None = None,
                  mlp_ratio: float | None = None, int8: dict | None = None,
                  num_heads: int | None = None) -> SubnetExport:
    """Export `task`'s subnet (on its configured path, or `path`) from a supernet checkpoint to `out`;
    with `depth`, `mlp_ratio` and/or `num_heads`, the smaller elastic subnet (first blocks, first FFN
    units, first attention heads);
    `int8`: the onnx-int8 format's settings over the config's `export` ones (mode, calibration,
    samples, max_drop)."""
    if not isinstance(checkpoint, Checkpoint):
        _refuse_existing(Path(out), overwrite)
    # only the shared parts and this task are read (a task-sharded checkpoint: only their files)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint, tasks=[task])
    cfg = ckpt.config
    _check_task(cfg, task)
    if cfg.distill is not None:
        if path or depth or mlp_ratio or num_heads:
            raise ExportError(f"{ckpt.path}: a student has no paths or elastic sizes: export it whole")
        formats, verify, atol = _resolve(cfg, formats, verify, atol)
        _refuse_existing(Path(out), overwrite)
        return export_student(ckpt, task, Path(out), formats, verify, atol, log,
                              Int8Options.of(cfg.export, **(int8 or {})) if "onnx-int8" in formats else None)
    path, path_from = _check_path(cfg, task, path), "given"
    if path is None:  # a learned run's own path, else the configured one
        path, path_from = trained_path(ckpt, task)
    elastic = _check_elastic(cfg, depth, mlp_ratio, num_heads)
    formats, verify, atol = _resolve(cfg, formats, verify, atol)
    quantized = Int8Options.of(cfg.export, **(int8 or {})) if "onnx-int8" in formats else None
    out = Path(out)
    _refuse_existing(out, overwrite)
    supernet = load_supernet(ckpt, held=[task]).eval()
    missing = supernet.lacks(task, path)
    if missing:
        raise ExportError(f"{ckpt.path}: --path {path}: {missing}")
    source, step = ckpt.path, ckpt.step
    with _writing(out) as tmp:
        written = _write_subnet(supernet, ckpt, task, path, tmp, out, formats, verify, log, elastic)
        written.result.path_from = path_from
        # let go of the checkpoint's tensors (memory-mapped pages) before verification loads the files
        del supernet, ckpt
        return _finish_subnet(written, source, step, cfg, formats, atol, log, quantized)


def export_all_tasks(checkpoint: str | Path | Checkpoint, out: str | Path, formats: Sequence[str] | None = None,
                     overwrite: bool = False, verify: bool | None = None, atol: float | None = None,
                     log: Log = print, int8: dict | None = None) -> list[SubnetExport]:
    """Export every task's subnet on its configured path (a learned run's: its learned path), one
    sub-directory per task under `out` (onnx-int8: each calibrated on its own task's images)."""
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    cfg = ckpt.config
    if cfg.distill is not None:  # a student's run: its one task
        (task,) = cfg.tasks
        return [export_subnet(ckpt, task, Path(out) / task, formats=formats, overwrite=overwrite, verify=verify,
                              atol=atol, log=log, int8=int8)]
    formats, verify, atol = _resolve(cfg, formats, verify, atol)
    quantized = Int8Options.of(cfg.export, **(int8 or {})) if "onnx-int8" in formats else None
    if quantized and quantized.calibration:
        raise ExportError("--calibration applies to one --task; with --all-tasks each task calibrates on its "
                          "own train shards")
    out = Path(out)
    _refuse_existing(out, overwrite)
    supernet = load_supernet(ckpt).eval()
    done = []
    with _writing(out) as tmp:
        for task in cfg.tasks:
            path, path_from = trained_path(ckpt, task)
            written = _write_subnet(supernet, ckpt, task, path, tmp / task, out / task, formats, verify, log)
            written.result.path_from = path_from
            done.append(_finish_subnet(written, ckpt.path, ckpt.step, cfg, formats, atol, log, quantized))
    return done


@contextmanager
def _writing(out: Path) -> Iterator[Path]:
    """`atomic_dir(out)`, where a write that fails (a full disk) is one line naming the path and the OS's
    reason: nothing is left behind and what `out` held before stays."""
    try:
        with atomic_dir(out) as tmp:
            yield tmp
    except OSError as e:
        raise ExportError(f"{out}: the subnet was not written: {write_failure(out, e)}") from None
    except RuntimeError as e:  # torch's and ONNX's writers report a full disk in their own words
        reason = write_failure(out, e)
        if "No space left on device" not in reason:
            raise
        raise ExportError(f"{out}: the subnet was not written: {reason}") from None


def build_subnet(supernet: SupernetViT, cfg: UfoConfig, task: str, path: str,
                 elastic: "Elastic | None" = None) -> VisionTransformer:
    """The timm ViT of `task` on `path` (an elastic size, if given), created by timm's factory, with the
    supernet's weights."""
    e = elastic or Elastic()
    args = subnet_args(cfg, task, e.depth, e.mlp_ratio, e.num_heads)
    with torch.device("meta"):  # the subnet takes the supernet's tensors, no copy
        vit = timm.create_model(_architecture(cfg), pretrained=False, weight_init="skip", **args)
        if e.num_heads:
            narrow_attention(vit, e.num_heads, cfg.model.embed_dim // cfg.model.num_heads)
    state = subnet_state_dict(supernet.state_dict(), task, path, supernet.heads[task].deployed, e.depth,
                              e.hidden(cfg), (e.num_heads, cfg.model.num_heads) if e.num_heads else None)
    if vit.patch_embed.grid_size != supernet.patch_embed.grid_size:
        # the task's own input size: the position embedding resampled as the supernet resamples it in
        # every forward (timm's dynamic image size), once, so the subnet is a plain fixed-size ViT
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=list(vit.patch_embed.grid_size),
                                                    old_size=list(supernet.patch_embed.grid_size),
                                                    num_prefix_tokens=0 if supernet.no_embed_class
                                                    else supernet.num_prefix_tokens)
    vit.load_state_dict(state, strict=True, assign=True)
    return vit.eval()


@dataclass
class _Written:
    """A subnet's files in `tmp`, and what its verification and config.json still need."""

    result: SubnetExport
    tmp: Path
    final: Path
    args: dict
    preprocessing: dict
    elastic: "Elastic"
    images: torch.Tensor | None = None  # verification inputs and the supernet's outputs on them
    reference: torch.Tensor | None = None


def _write_subnet(supernet: SupernetViT, ckpt: Checkpoint, task: str, path: str, tmp: Path, final: Path,
                  formats: Sequence[str], verify: bool, log: Log, elastic: "Elastic | None" = None) -> _Written:
    """Write the subnet's files and take the supernet's outputs its verification compares with; the
    supernet is not needed after this (a single-task export lets go of the checkpoint before verifying)."""
    cfg = ckpt.config
    e = elastic or Elastic()
    vit = build_subnet(supernet, cfg, task, path, e)
    args = subnet_args(cfg, task, e.depth, e.mlp_ratio, e.num_heads)
    # what timm's arguments cannot say, in config.json before verification rebuilds the subnet from it
    attention = {"attention": _attention(cfg, e)} if e.num_heads else {}
    return _write_model(vit, args, attention, cfg, task, path, tmp, final, formats, verify, e,
                        lambda x: supernet.forward_task(x, task, path, e.depth, e.hidden(cfg), e.num_heads))


def _write_model(vit: nn.Module, args: dict, ufo_early: dict, cfg: UfoConfig, task: str, path: str, tmp: Path,
                 final: Path, formats: Sequence[str], verify: bool, e: "Elastic",
                 reference: Callable[[torch.Tensor], torch.Tensor]) -> _Written:
    """Write a deployable timm model's files (safetensors, config.json, ONNX, TorchScript) and take the
    outputs of what it came from (`reference`) that its verification compares with."""
    kind = cfg.tasks[task].kind
    params = sum(p.numel() for p in vit.parameters())
    preprocessing = dict(input_size=[cfg.model.in_chans, *cfg.size_of(task)],
                         mean=list(cfg.data.mean), std=list(cfg.data.std),
                         interpolation=cfg.data.interpolation, crop_pct=cfg.data.crop_pct)
    tmp.mkdir(parents=True, exist_ok=True)
    write_safetensors(vit.state_dict(), tmp / FILES["safetensors"])  # what timm's save_for_hf writes, streamed
    save_config_for_hf(vit, str(tmp / "config.json"), model_args=args, data_config=preprocessing)
    if ufo_early:
        config = json.loads((tmp / "config.json").read_text())
        config["ufo"] = ufo_early
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    deployed = DeployedSubnet(vit, normalize=(kind == "retrieval")).eval()
    if "onnx" in formats or "onnx-int8" in formats:  # INT8 is quantised from the fp32 graph
        _write_onnx(deployed, tmp / FILES["onnx"], cfg, task)
    if "torchscript" in formats:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(deployed).save(str(tmp / FILES["torchscript"]))
    written = _Written(SubnetExport(task, kind, path, final, params), tmp, final, args, preprocessing, e)
    if verify:
        written.images = torch.randn(4, cfg.model.in_chans, *cfg.size_of(task),
                                     generator=torch.Generator().manual_seed(cfg.train.seed))
        with torch.no_grad():
            written.reference = reference(written.images)
    return written


def export_student(ckpt: Checkpoint, task: str, out: Path, formats: Sequence[str], verify: bool, atol: float,
                   log: Log, int8: Int8Options | None = None) -> SubnetExport:
    """A distillation run's student as a deployable timm model (`distill.student` with the task head's
    deployed layer as its classifier), verified like a subnet against the trained student."""
    cfg = ckpt.config
    student = load_student(ckpt)
    model, args = deployed_student(student, cfg)
    source, step = ckpt.path, ckpt.step
    early = {"student": {"architecture": cfg.distill.student, "teacher": cfg.distill.teacher}}
    with _writing(out) as tmp:
        written = _write_model(model, args, early, cfg, task, "", tmp, out, formats, verify, Elastic(),
                               lambda x: student.forward_task(x, task))
        written.result.path_from = "student"
        return _finish_subnet(written, source, step, cfg, formats, atol, log, int8, early)


def _finish_subnet(w: _Written, ckpt_path: Path, step: int, cfg: UfoConfig, formats: Sequence[str], atol: float,
                   log: Log, int8: Int8Options | None = None, extra: dict | None = None) -> SubnetExport:
    """Verify every written format against the supernet's outputs (INT8: by the task's metric against
    the fp32 graph), then complete config.json."""
    result, e, task, kind, path = w.result, w.elastic, w.result.task, w.result.kind, w.result.path
    if w.reference is not None:
        exact = [fmt for fmt in formats if fmt != "onnx-int8"] + (["onnx"] if int8 and "onnx" not in formats else [])
        for fmt in exact:  # the fp32 graph INT8 is made from is checked first
            diff = _max_abs_diff(fmt, w.tmp, kind, w.images, w.reference)
            if not diff <= atol:  # also catches NaN
                raise ExportError(f"{task}: the exported {fmt} subnet differs from the supernet by {diff:.3g} "
                                  f"(> atol {atol:g}); nothing was written to {w.final}")
            if fmt in formats:
                result.max_abs_diff[fmt] = diff
    if int8:
        result.int8 = int8_subnet(cfg, task, w.tmp / FILES["onnx"], w.tmp / FILES["onnx-int8"], int8,
                                  verify=w.reference is not None, log=log)
        if result.int8 and not result.int8.drop <= int8.max_drop:
            raise ExportError(f"{task}: INT8 loses {result.int8.drop:.4f} of {result.int8.metric} against fp32 "
                              f"(> int8_max_drop {int8.max_drop:g}); nothing was written to {w.final} (try "
                              f"--int8 dynamic, more --calibration-samples, or a larger --int8-max-drop)")
        if "onnx" not in formats:
            (w.tmp / FILES["onnx"]).unlink()

    config = json.loads((w.tmp / "config.json").read_text())
    config["model_args"] = w.args
    config["pretrained_cfg"]["tag"] = f"ufo_{task}"
    config["pretrained_cfg"].pop("license", None)
    config["ufo"] = dict(
        task=task, kind=kind, path=(path[:e.depth] if e.depth else path) or None, path_from=result.path_from,
        param_count=result.param_count,
        elastic={"depth": e.depth, "mlp_ratio": e.mlp_ratio, "num_heads": e.num_heads, "supernet_path": path}
        if e else None,
        attention=_attention(cfg, e),
        output="l2-normalized embedding" if kind == "retrieval" else "logits",
        postprocess="l2_normalize" if kind == "retrieval" else None,
        preprocessing=w.preprocessing, files={fmt: FILES[fmt] for fmt in formats},
        verification={"max_abs_diff": result.max_abs_diff, "atol": atol,
                      **({"int8": result.int8.as_dict()} if result.int8 else {})} if w.reference is not None else None,
        source_checkpoint=str(Path(ckpt_path).resolve()), source_step=step, ufo_version=ufo.__version__,
        **(extra or {}),
    )
    (w.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if "safetensors" not in formats:
        (w.tmp / FILES["safetensors"]).unlink()
    checks = "  ".join([f"{fmt} max|diff| {d:.2e}" for fmt, d in result.max_abs_diff.items()]
                       + ([f"int8 {result.int8.metric} drop {result.int8.drop:+.4f}"] if result.int8 else []))
    size = f" depth {e.depth or cfg.model.depth} mlp_ratio {e.mlp_ratio or cfg.model.mlp_ratio:g}" \
        f" heads {e.num_heads or cfg.model.num_heads}" if e else ""
    learned = " (learned)" if result.path_from == "learned" else ""
    what = f"student {cfg.distill.student}" if cfg.distill is not None else f"path {path}{learned}{size}"
    log(f"  {task:<12} {kind:<14} {what}  {result.param_count / 1e6:8.3f} M params  "
        f"{checks or 'not verified'}")
    return result


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(state: dict[str, torch.Tensor], file: Path) -> None:
    """A safetensors file (the format's header, then each tensor's bytes in turn) written tensor by
    tensor from the tensors' own memory: safetensors' save_file first copies every tensor into one
    buffer, a second copy of the model."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for tensor in state.values():
            if tensor.numel():
                f.write(memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()))


def _write_onnx(deployed: DeployedSubnet, file: Path, cfg: UfoConfig, task: str) -> None:
    try:
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError:
        raise ExportError("ONNX export needs the onnx extra: pip install 'ufo[onnx]'") from None
    example = torch.zeros(2, cfg.model.in_chans, *cfg.size_of(task))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(deployed, (example,), dynamo=True, verbose=False, external_data=False,
                                    input_names=["images"], output_names=["output"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},))
        program.save(str(file))


def _max_abs_diff(fmt: str, directory: Path, kind: str, images: torch.Tensor, reference: torch.Tensor) -> float:
    """Load one written format with no ufo code and compare its output on `images`."""
    if fmt == "safetensors":
        config = json.loads((directory / "config.json").read_text())
        vit = timm_subnet(config)  # timm alone, holding only the file's tensors
        vit.load_state_dict(load_file(directory / FILES["safetensors"]), strict=True, assign=True)
        with torch.no_grad():
            output = postprocess(vit.eval()(images), kind)
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(directory / FILES["onnx"]), providers=["CPUExecutionProvider"])
        output = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated but still the TorchScript loader
            module = torch.jit.load(str(directory / FILES["torchscript"]))
        with torch.no_grad():
            output = module(images)
    if output.shape != reference.shape:
        return float("inf")
    return (output - reference).abs().max().item()


def _architecture(cfg: UfoConfig) -> str:
    """A timm architecture name for config.json: the pretrained model's (its definition holds what
    model_args cannot, a LayerNorm epsilon), else a plain ViT's (every argument is in model_args)."""
    name = timm_name(cfg.model)
    if name:
        return name
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(cfg.model.embed_dim, "base")
    return f"vit_{size}_patch16_224"


@dataclass(frozen=True)
class Elastic:
    """An elastic subnet size: the first `depth` blocks, FFNs of `mlp_ratio`, the first `num_heads`
    attention heads (None: the supernet's)."""

    depth: int | None = None
    mlp_ratio: float | None = None
    num_heads: int | None = None

    def __bool__(self) -> bool:
        return any(v is not None for v in (self.depth, self.mlp_ratio, self.num_heads))

    def hidden(self, cfg: UfoConfig) -> int | None:
        return None if self.mlp_ratio is None else int(cfg.model.embed_dim * self.mlp_ratio)


def _attention(cfg: UfoConfig, e: Elastic) -> dict | None:
    """config.json's `ufo.attention` of a subnet with fewer heads: each keeps the supernet's head width
    (`narrow_attention`); None where timm's arguments alone build the attention."""
    return {"num_heads": e.num_heads, "head_dim": cfg.model.embed_dim // cfg.model.num_heads} if e.num_heads \
        else None


def _check_elastic(cfg: UfoConfig, depth: int | None, mlp_ratio: float | None,
                   num_heads: int | None = None) -> Elastic:
    m = cfg.model
    if depth is not None and not 1 <= depth <= m.depth:
        raise ExportError(f"--depth {depth}: the supernet has {m.depth} blocks; give 1..{m.depth}")
    if mlp_ratio is not None and not (0 < mlp_ratio <= m.mlp_ratio and int(m.embed_dim * mlp_ratio) >= 1):
        raise ExportError(f"--mlp-ratio {mlp_ratio:g}: the supernet's FFNs have mlp_ratio {m.mlp_ratio:g}; "
                          f"give a ratio in (0, {m.mlp_ratio:g}]")
    if num_heads is not None and not (1 <= num_heads <= m.num_heads and m.embed_dim % num_heads == 0):
        raise ExportError(f"--num-heads {num_heads}: the supernet's attention has {m.num_heads} heads; give "
                          f"1..{m.num_heads} dividing embed_dim {m.embed_dim}")
    return Elastic(depth, mlp_ratio, None if num_heads == m.num_heads else num_heads)


def _check_task(cfg: UfoConfig, task: str) -> None:
    if task not in cfg.tasks:
        raise ExportError(f"unknown task {task!r}; this checkpoint has: {', '.join(cfg.tasks)}")


def _check_path(cfg: UfoConfig, task: str, path: str | None) -> str | None:
    if path is None:
        return None
    given, path = path, path.strip().upper()
    if set(path) - {"S", "T"} or not path:
        raise ExportError(f"--path {given!r}: a path is one letter per block, S (shared) or T (task)")
    if len(path) != cfg.model.depth:
        raise ExportError(f"--path {given}: has {len(path)} blocks but the supernet has depth {cfg.model.depth}")
    return path


def _resolve(cfg: UfoConfig, formats: Sequence[str] | None, verify: bool | None,
             atol: float | None) -> tuple[tuple[str, ...], bool, float]:
    formats = tuple(cfg.export.formats if formats is None else formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ExportError(f"--format {','.join(formats)}: choose from {', '.join(FORMATS)}")
    verify = cfg.export.verify if verify is None else verify
    return formats, verify, cfg.export.atol if atol is None else atol


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise ExportError(f"{out}: exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a directory")
