"""`ufo bench data`: each task's loader against what a training step consumes, per worker count;
and JPEG shards on one core (decode and augmentation apart, as shipped and with --max-side).
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ufo.config import UfoConfig, config_from_dict
from ufo.data import endless, task_loader, write_task_shards
from ufo.data.loader import build_transform
from ufo.data.sources import RawSample, Source
from ufo.model import SupernetViT, TaskSlice


def bench_data(cfg: UfoConfig, workers: Sequence[int] = (0, 1, 2), batches: int = 20) -> dict[str, Any]:
    """Decoded samples/s of each task's train loader per worker count, against what one training
    step of the supernet (fwd+bwd+AdamW on one task's micro-batch, as a task-parallel rank runs)
    consumes per second."""
    result: dict[str, Any] = {"micro_batch_size": cfg.train.micro_batch_size, "configured_workers": cfg.data.num_workers, "tasks": {},
                              "without_shards": [t for t, c in cfg.tasks.items() if c.shards is None]}
    with_shards = [t for t, c in cfg.tasks.items() if c.shards is not None]
    if not with_shards or not workers:
        return result
    torch.manual_seed(cfg.train.seed)
    model = SupernetViT.from_config(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    m = cfg.model
    for task in with_shards:
        batch = cfg.batch_of(task)
        images = torch.randn(batch, m.in_chans, m.img_size, m.img_size)
        labels = torch.randint(cfg.tasks[task].num_classes, (batch,))
        slices = [TaskSlice(task, cfg.path_of(task), batch)]

        def train_step() -> None:
            model(images, slices, labels)[0].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(2):
            train_step()
        start = time.perf_counter()
        for _ in range(5):
            train_step()
        consume = 5 * batch / (time.perf_counter() - start)
        rates = {}
        for w in workers:
            loader = task_loader(cfg, task, num_workers=w, log=lambda _: None)
            stream = endless(loader)
            next(stream)  # worker start-up is not throughput
            start, samples = time.perf_counter(), 0
            for _ in range(batches):
                samples += len(next(stream)["labels"])
            rates[w] = samples / (time.perf_counter() - start)
            del stream
        result["tasks"][task] = {"micro_batch_size": batch, "train_step_samples_per_s": consume,
                                 "loader_samples_per_s": rates,
                                 "ratio": {w: r / consume for w, r in rates.items()}}
    result["target"] = 3.0
    return result


# what one GPU's training step of ViT-B/16 at 224 px takes in, from the literature: DeiT-B trained
# 300 ImageNet epochs (1.28 M images) in 53 h on 8 V100s (Touvron et al. 2021, sec. 5.2 and table 1):
# 300 * 1.28e6 / (53 * 3600) / 8 = 252 images/s per V100; a newer GPU in bf16 takes several times that
VIT_B_V100_SAMPLES_PER_S = 252


def photo(rng, width: int, height: int):
    """A photo-like RGB image: smooth regions and edges (low-frequency noise upsampled) with fine
    grain, which JPEG compresses about as it does a photograph (a pure-noise image would decode far
    slower, a flat one far faster)."""
    coarse = Image.fromarray(rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def bench_jpeg(cfg: UfoConfig, work: Path, side: int = 224, samples: int = 128,
               photo_size: tuple[int, int] = (1024, 768), task: str | None = None) -> dict[str, Any]:
    """One core's samples/s on JPEG shards: photos as a dataset ships them (`photo_size`, quality 90)
    written as they are and with `--max-side side`; per sample, the decode (PIL) and the augmentation
    (the task's timm train transform) timed apart, and the loader end to end."""
    task = task or next(iter(cfg.tasks))
    rng = np.random.default_rng(cfg.train.seed)
    photos = []
    for _ in range(16):  # 16 distinct photos, reused: the encoder sees what it would, the bench stays quick
        out = io.BytesIO()
        photo(rng, *photo_size).save(out, format="JPEG", quality=90)
        photos.append(out.getvalue())
    source = Source(f"{samples} photo-like {photo_size[0]}x{photo_size[1]} JPEGs", None, ["a", "b"],
                    list(range(samples)), [i % 2 for i in range(samples)],
                    lambda i: RawSample(photos[i % len(photos)], "jpg", i % 2, {"index": i}))
    transform = build_transform(cfg, task, train=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # per core
    result: dict[str, Any] = {"task": task, "samples": samples, "photo_size": list(photo_size),
                              "img_size": cfg.model.img_size, "sets": {}}
    try:
        for name, max_side in (("as shipped", None), (f"max-side {side}", side)):
            directory = work / name.replace(" ", "-")
            write_task_shards(source, task, directory, kind="classification", maxcount=samples, overwrite=True,
                              max_side=max_side, log=lambda _: None)

            with tarfile.open(next(directory.glob("*.tar"))) as tar:
                blobs = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
            start = time.perf_counter()
            decoded = [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs]
            decode = (time.perf_counter() - start) / len(blobs)
            start = time.perf_counter()
            for img in decoded:
                transform(img)
            augment = (time.perf_counter() - start) / len(blobs)
            raw = cfg.to_dict()
            raw["tasks"][task]["shards"] = str(directory)

            loader = task_loader(config_from_dict(raw, "bench"), task, num_workers=0, log=lambda _: None)
            start, n = time.perf_counter(), 0
            for batch in loader:
                n += len(batch["labels"])
            end_to_end = n / (time.perf_counter() - start)
            result["sets"][name] = {"image_size": list(decoded[0].size), "bytes_per_image": sum(map(len, blobs)) / len(blobs),
                                    "decode_ms": decode * 1e3, "augment_ms": augment * 1e3,
                                    "loader_samples_per_s_per_core": end_to_end}
    finally:
        torch.set_num_threads(threads)
    per_core = result["sets"][f"max-side {side}"]["loader_samples_per_s_per_core"]
    result["vit_b_v100_samples_per_s"] = VIT_B_V100_SAMPLES_PER_S
    result["cores_per_v100"] = VIT_B_V100_SAMPLES_PER_S / per_core
    return result


def format_jpeg_bench(r: dict[str, Any]) -> str:
    lines = [f"ufo bench data: JPEG shards, one core ({r['samples']} samples of task {r['task']}; photos "
             f"{r['photo_size'][0]}x{r['photo_size'][1]}, trained at {r['img_size']} px)",
             f"  {'shards':<16}{'stored as':>12}{'KB/image':>10}{'decode ms':>11}{'augment ms':>12}{'samples/s':>11}"]
    for name, s in r["sets"].items():
        size = f"{s['image_size'][0]}x{s['image_size'][1]}"
        lines.append(f"  {name:<16}{size:>12}{s['bytes_per_image'] / 1024:>10.1f}{s['decode_ms']:>11.2f}"
                     f"{s['augment_ms']:>12.2f}{s['loader_samples_per_s_per_core']:>11.0f}")
    lines.append(f"  one V100 trains ViT-B/16 at 224 px on ~{r['vit_b_v100_samples_per_s']} images/s (DeiT, Touvron "
                 f"et al. 2021): {r['cores_per_v100']:.1f} cores per V100 keep it fed from max-side shards")
    return "\n".join(lines)


def format_data_bench(r: dict[str, Any]) -> str:
    if not r["tasks"]:
        return (f"ufo bench data: no task has shards ({', '.join(r['without_shards'])}): loader throughput "
                "per worker count skipped")
    workers = list(next(iter(r["tasks"].values()))["loader_samples_per_s"])
    head = "".join(f"{f'{w} workers':>22}" for w in workers)
    lines = [f"ufo bench data: micro-batch {r['micro_batch_size']}, decoded samples/s (ratio to the training "
             f"step's consumption; target >= {r['target']:g})",
             f"  {'task':<12}{'train step':>12}{head}"]
    for task, t in r["tasks"].items():
        cells = "".join(f"{t['loader_samples_per_s'][w]:>13.0f} ({t['ratio'][w]:5.1f}x)" for w in workers)
        lines.append(f"  {task:<12}{t['train_step_samples_per_s']:>12.0f}{cells}")
    w = r["configured_workers"]
    if w in workers:
        worst = min(t["ratio"][w] for t in r["tasks"].values())
        verdict = "meets" if worst >= r["target"] else "MISSES"
        lines.append(f"  with data.num_workers = {w}: worst ratio {worst:.1f}x ({verdict} the target)")
    return "\n".join(lines)
