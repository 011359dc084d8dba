"""INT8 subnets: an exported subnet's ONNX graph quantised by onnxruntime, statically (activation
ranges calibrated on the task's own images) or dynamically, and what it costs in the task's metric,
measured by the task's protocol against the fp32 graph.

onnxruntime's recipe (onnxruntime.ai/docs/performance/model-optimizations/quantization.html):
`quant_pre_process` (shape inference, graph optimisation), then QDQ with unsigned 8-bit activations
and signed 8-bit per-channel weights; `reduce_range` (7-bit weights) on CPUs without VNNI, where
8-bit products can saturate.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ufo.config import UfoConfig
from ufo.data.loader import task_loader
from ufo.data.shards import eval_sets
from ufo.errors import DataError, ExportError
from ufo.evaluate import evaluate_task, primary
from ufo.metrics import PRIMARY
from ufo.subnet import onnx_forward

MODES = ("auto", "static", "dynamic")
OPS = ["Conv", "MatMul", "Gemm"]  # the products that hold the model's weights and time; norms, softmax stay fp32
Log = Callable[[str], None]


@dataclass(frozen=True)
class Int8Options:
    """How a subnet is quantised and how much of its metric it may lose (the config's `export` keys)."""

    mode: str = "auto"
    calibration: str | None = None  # shards; None: the task's train shards
    samples: int = 256
    max_drop: float = 0.02

    @classmethod
    def of(cls, export, **given) -> "Int8Options":
        """The config's `export` settings, with the `given` ones that are not None over them."""
        unknown = set(given) - {"mode", "calibration", "samples", "max_drop"}
        if unknown:
            raise TypeError(f"unknown INT8 settings: {', '.join(sorted(unknown))}")
        base = cls(export.int8, export.calibration, export.calibration_samples, export.int8_max_drop)
        options = cls(**{**base.__dict__, **{k: v for k, v in given.items() if v is not None}})
        if options.mode not in MODES:
            raise ExportError(f"--int8 {options.mode}: choose from {', '.join(MODES)}")
        if not options.max_drop >= 0:
            raise ExportError(f"--int8-max-drop {options.max_drop:g}: give a loss >= 0 of the task's primary metric")
        if options.samples < 1:
            raise ExportError(f"--calibration-samples {options.samples}: give 1 or more")
        return options


@dataclass
class Int8Check:
    """The task's primary metric of the fp32 and the INT8 graph on its eval sets, by its protocol."""

    metric: str
    fp32: float
    int8: float
    mode: str
    calibration: str | None  # the shards static quantisation read (None: dynamic)
    calibration_samples: int

    @property
    def drop(self) -> float:
        return self.fp32 - self.int8

    def as_dict(self) -> dict:
        return {"metric": self.metric, "fp32": self.fp32, "int8": self.int8, "drop": self.drop, "mode": self.mode,
                "calibration": self.calibration, "calibration_samples": self.calibration_samples}


def calibration_batches(cfg: UfoConfig, task: str, spec: str | None, samples: int,
                        batch_size: int = 32) -> tuple[str, Iterator[np.ndarray]]:
    """The images static quantisation calibrates on: `spec`, else the task's train shards, read in
    order with the eval transform (what deployment sees), `samples` of them at most."""
    spec = spec or cfg.tasks[task].shards
    protocol = "classification" if cfg.tasks[task].kind == "classification" else "retrieval"
    try:
        loader = task_loader(cfg, task, train=False, spec=spec, protocol=protocol, batch_size=batch_size,
                             num_workers=0, log=lambda _: None)
        stream = iter(loader)
        first = next(stream)  # read now: data that is not there is refused before anything is written
    except (DataError, FileNotFoundError, StopIteration, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else "no images"
        raise ExportError(f"task {task}: static INT8 needs calibration images and {spec} gives none here "
                          f"({reason}); give --calibration SHARDS, or --int8 dynamic") from None

    def batches() -> Iterator[np.ndarray]:
        seen, batch = 0, first
        while batch is not None and seen < samples:  # only the batches the samples need are read
            images = batch["images"][:samples - seen].float().numpy()
            if len(images):
                yield images
            seen += len(images)
            batch = next(stream, None)

    return str(spec), batches()


def resolved_mode(mode: str, fp32: Path) -> str:
    """`auto`: dynamic for a transformer (the graph has a Softmax: attention), static for the others,
    as onnxruntime's documentation recommends; measured so in docs/benchmarks.md (static QDQ ran a
    ViT subnet slower than fp32 on the development CPU, dynamic faster, with the same metric)."""
    if mode != "auto":
        return mode
    import onnx

    ops = {node.op_type for node in onnx.load(str(fp32), load_external_data=False).graph.node}
    return "dynamic" if "Softmax" in ops else "static"


def quantize_onnx(fp32: Path, out: Path, mode: str, calibration: Iterator[np.ndarray] | None = None) -> None:
    """`fp32`'s graph quantised to INT8 at `out`: static (QDQ, calibrated on `calibration`) or dynamic."""
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        if mode == "dynamic":
            with _quiet():
                quantize_dynamic(prepared, out, weight_type=QuantType.QInt8, per_channel=True,
                                 reduce_range=not _vnni(), op_types_to_quantize=OPS)
            return

        class Reader(CalibrationDataReader):
            def get_next(self):
                images = next(calibration, None)
                return None if images is None else {"images": images}

        with _quiet():
            quantize_static(prepared, out, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=not _vnni(), activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=OPS)


@contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantiser warns through the root logger about each tensor it leaves alone."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _vnni() -> bool:
    """Whether this CPU multiplies 8-bit integers with VNNI (no saturation of u8 x s8 products)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags or "asimddp" in flags


def int8_subnet(cfg: UfoConfig, task: str, fp32: Path, out: Path, options: Int8Options = Int8Options(),
                verify: bool = True, log: Log = print) -> Int8Check | None:
    """Quantise the fp32 graph `fp32` of `task`'s subnet to `out`, and (`verify`) measure both on the
    task's eval sets (from `cfg`) by its protocol. Returns the check (None without `verify`)."""
    mode = resolved_mode(options.mode, fp32)
    sets = eval_sets(cfg, task) if verify else []
    if verify and not sets:
        raise ExportError(f"task {task}: INT8 is verified by the task's protocol on its eval sets and "
                          f"tasks.{task}.eval_shards is not set; give --no-verify to write it unmeasured")
    source, batches = calibration_batches(cfg, task, options.calibration, options.samples) if mode == "static" else (None, None)
    counted = _Counted(batches) if batches is not None else None
    quantize_onnx(fp32, out, mode, counted)
    if not verify:
        return None
    with torch.no_grad():
        before = evaluate_task(cfg, task, onnx_forward(fp32), num_workers=0, sets=sets)
        after = evaluate_task(cfg, task, onnx_forward(out), num_workers=0, sets=sets)
    check = Int8Check(sets[0].key(PRIMARY[sets[0].protocol]) if len(sets) == 1 else "mean primary",
                      primary(sets, before), primary(sets, after), mode, source, counted.n if counted else 0)
    log(f"  {task:<12} INT8 ({mode}{f', calibrated on {check.calibration_samples} images' if counted else ''}): "
        f"{check.metric} {check.fp32:.4f} fp32 -> {check.int8:.4f} int8 (drop {check.drop:+.4f})")
    return check


class _Counted:
    """An iterator of calibration batches that counts the images it gave."""

    def __init__(self, batches: Iterator[np.ndarray]):
        self.batches, self.n = batches, 0

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        images = next(self.batches)
        self.n += len(images)
        return images
