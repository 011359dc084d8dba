"""The task-grouped loader: one pipeline per (task, rank in the task's group), and the mixed batch.

Every rank computes the same epoch plan from (shards, group size, batch size, seed, epoch):

- `exact`: the epoch's samples (shards in a seeded order) are cut into one contiguous range per
  rank of the group, sizes differing by at most one; each rank's range is cut into the same
  number of batches, `ceil(ceil(N / ranks) / batch_size)`, of near-equal size (never above
  `batch_size`). So every sample is read once per epoch across the group and every rank yields
  the same number of batches, whatever the shard sizes.
- `resampled`: each rank's workers draw shards with replacement from a seeded generator; the
  epoch is the same number of full batches on every rank.

Inside a rank, batch j of the epoch comes from DataLoader worker j mod W; each worker reads one
contiguous block. Raw samples are shuffled by a seeded buffer before decoding, and each batch's
augmentation is seeded by (seed, epoch, rank, batch), so a run restored from a saved position
(epoch, batches consumed) continues with exactly the batches the uninterrupted run would get.
Bad samples (unreadable member, undecodable image, missing or bad label) are skipped, counted
per shard and reported; a batch with skipped samples is shorter, never refilled.
"""

from __future__ import annotations

import io
import json
import math
import random
import re
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ufo.config import UfoConfig
from ufo.data.sampler import SampleRef, index_shards, pk_plan, rank_batches, read_sample
from ufo.data.shards import Shard, probe_shard, resolve_shards
from ufo.errors import DataError
from ufo.metrics import META_KEYS, default_protocol

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def augmentation(cfg: UfoConfig, task: str) -> dict[str, Any]:
    """The task's training augmentation: `data`'s keys, with what `tasks.<task>.augment` (and the
    older `tasks.<task>.hflip`) sets in their place."""
    d, tc = cfg.data, cfg.tasks[task]
    out = {"scale": d.scale, "hflip": d.hflip, "color_jitter": d.color_jitter, "auto_augment": d.auto_augment,
           "re_prob": d.re_prob}
    if tc.hflip is not None:
        out["hflip"] = tc.hflip
    out.update({k: v for k, v in tc.augment.model_dump().items() if v is not None and k not in ("mixup", "cutmix")})
    return out


def batch_mixer(cfg: UfoConfig, task: str) -> Callable | None:
    """timm's Mixup for the task's training batches (mixup and/or cutmix), or None: it mixes a batch's
    images in place and turns its labels into soft targets (with the task's label smoothing)."""
    tc = cfg.tasks[task]
    a = tc.augment
    if not (a.mixup or a.cutmix):
        return None
    return Mixup(mixup_alpha=a.mixup, cutmix_alpha=a.cutmix, label_smoothing=tc.label_smoothing,
                 num_classes=tc.num_classes)


def build_transform(cfg: UfoConfig, task: str, train: bool) -> Callable:
    """timm's train or eval transform for a task, from the data and model sections and its augmentation."""
    m, d = cfg.model, cfg.data
    a = augmentation(cfg, task)
    return create_transform(
        input_size=(m.in_chans, *cfg.size_of(task)), is_training=train, scale=a["scale"],
        hflip=a["hflip"], vflip=0.0, color_jitter=a["color_jitter"] or 0.0, auto_augment=a["auto_augment"],
        re_prob=a["re_prob"], re_mode="pixel", re_count=1,
        interpolation=d.interpolation, mean=d.mean, std=d.std, crop_pct=d.crop_pct,
    )


def balanced(n: int, parts: int) -> list[int]:
    """n split into `parts` sizes that differ by at most one (larger ones first)."""
    return [n // parts + (i < n % parts) for i in range(parts)]


@dataclass(frozen=True)
class Segment:
    url: str
    skip: int
    take: int


def batches_per_epoch(samples: int, group_size: int, batch_size: int) -> int:
    return max(1, math.ceil(math.ceil(samples / group_size) / batch_size))


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch for one batch's augmentation, leaving the caller's RNGs as they were."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


class _TaskStream(IterableDataset):
    """What each DataLoader worker runs: its share of one rank's epoch."""

    def __init__(self, loader: "TaskLoader", epoch: int, skip: int):
        self.task, self.shards, self.mode = loader.task, loader.shards, loader.mode
        self.rank, self.group_size, self.batch_size = loader.rank_in_group, loader.group_size, loader.batch_size
        self.seed, self.transform, self.num_classes = loader.seed, loader.transform, loader.num_classes
        self.shuffle_buffer, self.num_workers = loader.shuffle_buffer, max(1, loader.num_workers)
        self.total, self.nb = loader.samples_per_epoch, loader.batches_per_epoch
        self.epoch, self.skip, self.meta_keys, self.mixer = epoch, skip, loader.meta_keys, loader.mixer
        self.input_shape = loader.input_shape
        # exact mode: this rank's samples of the epoch, as positions in the epoch's order (None: its
        # contiguous share; a list after a resume on another number of ranks, see `TaskLoader.resplit`)
        self.positions = loader.plan_positions()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        # after `skip` consumed batches the DataLoader's worker 0 must deliver batch `skip`
        worker = ((info.id if info else 0) + self.skip) % self.num_workers
        mine = list(range(worker, self.nb, self.num_workers))  # this worker's batches, in epoch order
        problems: list[tuple[str, str | None, str]] = []
        sizes = self._sizes()
        raw = self._raw(worker, mine, sizes, problems)
        if self.shuffle_buffer > 1:
            raw = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer,
                              seed=_seed(self.seed, self.epoch, self.rank, worker, 1))(raw)
        for j in mine:
            chunk = list(islice(raw, sizes[j]))
            if self.mode == "exact" and mine and j == mine[-1]:
                for _ in raw:  # run the last shard's reading to its end: what its damage cost counts here
                    pass
            if j < self.skip:  # consumed before the saved position: read, not decoded
                problems.clear()
                continue
            yield self._decode(chunk, j, problems)

    def _sizes(self) -> list[int]:
        if self.mode == "resampled":
            return [self.batch_size] * self.nb
        if self.positions is not None:
            return balanced(len(self.positions), self.nb)
        return balanced(balanced(self.total, self.group_size)[self.rank], self.nb)

    def _raw(self, worker: int, mine: Sequence[int], sizes: Sequence[int],
             problems: list) -> Iterator[dict]:
        if self.mode == "resampled":
            rng = random.Random(_seed(self.seed, self.epoch, self.rank, worker, 2))
            while True:
                yield from self._read(Segment(rng.choice(self.shards).url, 0, 1 << 62), problems)
        order = epoch_order(self.shards, self.seed, self.epoch)
        start = sum(sizes[k] for j in range(worker) for k in range(j, self.nb, self.num_workers))
        length = sum(sizes[j] for j in mine)
        if self.positions is None:
            start += sum(balanced(self.total, self.group_size)[: self.rank])
            for segment in _segments(order, start, length):
                yield from self._read(segment, problems)
            return
        wanted = self.positions[start:start + length]  # ascending: read the span, keep what is wanted
        if not wanted:
            return
        keep, at = set(wanted), wanted[0]
        for segment in _segments(order, wanted[0], wanted[-1] + 1 - wanted[0]):
            for sample in self._read(segment, problems):
                if at in keep:
                    yield sample
                at += 1

    def _read(self, segment: Segment, problems: list) -> Iterator[dict]:
        errors: list[str] = []

        def unreadable(exn: Exception) -> bool:
            errors.append(f"unreadable: {reason_of(exn)}")
            return True

        samples = wds.tarfile_samples([{"url": segment.url}], handler=unreadable)
        read = 0
        for sample in islice(samples, segment.skip, segment.skip + segment.take):
            read += 1
            yield sample
        if self.mode == "exact" and read < segment.take:  # the plan promised more than the tar holds
            # each planned sample that never came is counted once, as missing, whatever the tar's error
            problems += [(segment.url, None, f"{error} (counted as missing)") for error in errors]
            why = "missing: the shard ends early or holds fewer samples than its manifest says"
            problems += [(segment.url, None, why)] * (segment.take - read)
        else:  # every planned sample came (a shard without a manifest, counted to its damage): the tail is lost
            problems += [(segment.url, None, error) for error in errors]

    def _decode(self, chunk: list[dict], index: int, problems: list) -> dict:
        images, labels, keys, metas = [], [], [], []
        with _seeded(_seed(self.seed, self.epoch, self.rank, index, 4)):
            for sample in chunk:
                try:
                    meta = self._meta(sample)
                    image, label = self._sample(sample)
                except ValueError as e:
                    problems.append((sample.get("__url__", "?"), sample.get("__key__"), str(e)))
                    continue
                images.append(image)
                labels.append(label)
                keys.append(sample["__key__"])
                metas.append(meta)
        batch = {
            "task": self.task, "epoch": self.epoch, "index": index, "keys": keys,
            "images": torch.stack(images) if images else torch.empty(0, *self.input_shape),
            "labels": torch.tensor(labels, dtype=torch.long), "problems": list(problems),
        }
        if self.meta_keys:
            batch["meta"] = torch.tensor(metas, dtype=torch.long).reshape(len(metas), len(self.meta_keys))
        if self.mixer is not None and len(images) >= 2:
            with _seeded(_seed(self.seed, self.epoch, self.rank, index, 5)):
                # timm mixes pairs (i, B-1-i) of an even batch: an odd batch's last sample stays as it is
                even = len(images) - len(images) % 2
                mixed, targets = batch["images"][:even].clone(), batch["labels"][:even]
                mixed, soft = self.mixer(mixed, targets)
                batch["images"][:even] = mixed
                batch["targets"] = torch.cat([soft, self.mixer_targets(batch["labels"][even:])])
        problems.clear()
        return batch

    def mixer_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Unmixed labels as the mixer's soft targets (its label smoothing only)."""
        return mixup_target(labels, self.mixer.num_classes, 1.0, self.mixer.label_smoothing)

    def _meta(self, sample: dict) -> list[int]:
        if not self.meta_keys:
            return []
        try:
            meta = json.loads(sample["json"])
        except KeyError:
            raise ValueError(f"no .json (the evaluation needs {', '.join(self.meta_keys)})") from None
        except (ValueError, UnicodeDecodeError):
            raise ValueError("bad .json") from None
        values = []
        for key in self.meta_keys:
            value = meta.get(key) if isinstance(meta, dict) else None
            if isinstance(value, bool) or (isinstance(value, int) and not isinstance(value, bool)):
                values.append(int(value))
            else:
                raise ValueError(f"no integer {key!r} in its .json (the evaluation needs it)")
        return values

    def _sample(self, sample: dict) -> tuple[torch.Tensor, int]:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise ValueError("no image member (.png/.jpg/...)")
        if "cls" not in sample:
            raise ValueError("missing label (.cls)")
        try:
            label = int(sample["cls"].decode().strip())
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"bad label {sample['cls'][:20]!r}") from None
        if label < 0 or (self.num_classes is not None and label >= self.num_classes):
            raise ValueError(f"label {label} outside 0..{(self.num_classes or 0) - 1}")
        try:
            image = Image.open(io.BytesIO(sample[ext]))
            image = image.convert("RGB")
        except Exception as e:
            raise ValueError(f"undecodable image ({type(e).__name__})") from None
        return self.transform(image), label


class _PKStream(_TaskStream):
    """sampler pk: each worker's share of one rank's batches, read from the index by seeking."""

    def __init__(self, loader: "TaskLoader", epoch: int, skip: int):
        super().__init__(loader, epoch, skip)
        self.batches = loader.pk_refs()

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.skip) % self.num_workers
        problems: list[tuple[str, str | None, str]] = []
        files: dict = {}
        try:
            for j in range(worker, self.nb, self.num_workers):
                if j < self.skip:  # consumed before the saved position
                    continue
                chunk = []
                for ref in self.batches[j]:
                    try:
                        chunk.append(read_sample(ref, files))
                    except OSError as e:
                        problems.append((ref.shard, ref.key, f"unreadable: {reason_of(e)}"))
                yield self._decode(chunk, j, problems)
        finally:
            for f in files.values():
                f.close()


def category(reason: str) -> str:
    """The kind of a bad sample's reason, for counting: `unreadable`, `bad label`, `undecodable image`..."""
    if reason.startswith("bad label"):
        return "bad label"
    if reason.startswith("label ") and "outside" in reason:
        return "label outside the classes"
    return reason.split(" (")[0].split(":")[0]


def reason_of(error: BaseException) -> str:
    """An exception as a short reason: the innermost message, without object reprs or addresses."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args and isinstance(error.args[0], str) else str(error)
    # object reprs (`<_io.BufferedReader name='...'>`, `<... at 0x7f...>`) and what points at them (`@`)
    text = re.sub(r"\s*@?\s*<[A-Za-z_][\w.]*(?: [^<>]*)?>", "", text.strip().splitlines()[0] if text.strip() else "")
    text = text.strip(" ,:@")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def epoch_order(shards: Sequence[Shard], seed: int, epoch: int) -> list[Shard]:
    """The shards in an epoch's (seeded) order: the epoch's samples are theirs, in this order."""
    order = list(shards)
    random.Random(_seed(seed, epoch, 3)).shuffle(order)
    return order


def _segments(shards: Sequence[Shard], start: int, length: int) -> list[Segment]:
    """The pieces of shards that hold samples [start, start + length) of the ordered epoch."""
    segments, offset = [], 0
    for shard in shards:
        count = shard.samples or 0
        lo, hi = max(start, offset), min(start + length, offset + count)
        if lo < hi:
            segments.append(Segment(shard.url, lo - offset, hi - lo))
        offset += count
    return segments


class TaskLoader:
    """Batches of one task for one rank of the task's group; `for batch in loader` is one epoch."""

    def __init__(self, task: str, shards: str | Sequence[str] | Sequence[Shard], *, batch_size: int,
                 transform: Callable, rank_in_group: int = 0, group_size: int = 1, num_workers: int = 0,
                 seed: int = 0, mode: str = "exact", shuffle_buffer: int = 1000, num_classes: int | None = None,
                 samples_per_epoch: int | None = None, meta_keys: Sequence[str] = (), sampler: str = "random",
                 instances: int = 4, mixer: Callable | None = None, input_shape: Sequence[int] = (),
                 log: Log = _stderr):
        if not 0 <= rank_in_group < group_size:
            raise ValueError(f"rank_in_group {rank_in_group} is not in a group of {group_size}")
        if mode not in ("exact", "resampled"):
            raise ValueError(f"mode {mode!r}: choose exact or resampled")
        self.task, self.mode, self.log = task, mode, log
        self.rank_in_group, self.group_size, self.batch_size = rank_in_group, group_size, batch_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.transform, self.num_classes, self.mixer = transform, num_classes, mixer
        self.input_shape = tuple(input_shape)  # (C, H, W) of the transform's images: an empty batch's shape
        # integer fields of each sample's .json an evaluation protocol needs (camera, pair, ...): a batch's
        # "meta" is their (n, len) tensor; a sample without one of them is a bad sample
        self.meta_keys = tuple(meta_keys)
        if shards and isinstance(next(iter(shards)), Shard):
            found = list(shards)  # type: ignore[arg-type]
        else:
            found = resolve_shards(shards, task)  # type: ignore[arg-type]
        self.shards = self._readable(found)
        unknown = [s.url for s in self.shards if s.samples is None]
        if unknown and mode == "exact":
            raise DataError(f"task {task}: exact mode needs every shard's sample count, and {unknown[0]} has none "
                            "(no manifest.json beside it); use data.mode: resampled")
        if unknown and samples_per_epoch is None:
            raise DataError(f"task {task}: the sample count of {unknown[0]} is unknown (no manifest.json); "
                            f"set tasks.{task}.samples_per_epoch")
        known = sum(s.samples or 0 for s in self.shards)
        self.samples_per_epoch = samples_per_epoch if mode == "resampled" and samples_per_epoch else known
        if self.samples_per_epoch < group_size:
            raise DataError(f"task {task}: {self.samples_per_epoch} samples cannot feed {group_size} ranks")
        self.full_batches_per_epoch = batches_per_epoch(self.samples_per_epoch, group_size, batch_size)
        self.epoch, self.position = 0, 0
        # earlier splits of the current epoch, [group size, batches every rank of it consumed], oldest first:
        # set by a resume on another number of ranks; this rank's share is then of what they left
        self.splits: list[tuple[int, int]] = []
        self._warned: set[str] = set()
        self.bad_samples: Counter = Counter()  # reason -> samples skipped since this loader was made
        self._epoch_problems: Counter = Counter()
        self._epoch_samples = 0
        # sampler pk: P identities x K (`instances`) samples a batch, from an index of the shards
        # (`ufo/data/sampler.py`); `pk_offset`: the plan's batches taken by earlier splits of the epoch
        self.sampler, self.instances, self.pk_offset = sampler, instances, 0
        if sampler == "pk":
            self._index_for_pk()
        elif sampler != "random":
            raise ValueError(f"sampler {sampler!r}: choose random or pk")

    def _index_for_pk(self) -> None:
        if self.batch_size % self.instances:
            raise DataError(f"task {self.task}: sampler pk takes batches of P identities x K = {self.instances} "
                            f"samples; the batch size {self.batch_size} is not a multiple of {self.instances}")
        self._refs, self._labels, skipped = index_shards(self.task, self.shards)
        self.bad_samples.update(skipped)
        identities = len(set(self._labels))
        if identities < self.batch_size // self.instances:
            raise DataError(f"task {self.task}: sampler pk needs {self.batch_size // self.instances} identities a "
                            f"batch ({self.batch_size} / K {self.instances}); its shards hold {identities}")
        self._plans: dict[int, list[list[int]]] = {}

    def _pk_plan(self) -> list[list[int]]:
        if self.epoch not in self._plans:
            self._plans = {self.epoch: pk_plan(self._labels, self.batch_size // self.instances, self.instances,
                                               self.seed, self.epoch)}
        return self._plans[self.epoch]

    def _pk_batches(self) -> list[int]:
        return rank_batches(len(self._pk_plan()), self.group_size, self.rank_in_group, self.pk_offset)

    def pk_refs(self) -> list[list[SampleRef]]:
        """sampler pk: this rank's batches of the current epoch, as the samples to read."""
        plan = self._pk_plan()
        return [[self._refs[i] for i in plan[b]] for b in self._pk_batches()]

    def _readable(self, shards: list[Shard]) -> list[Shard]:
        """Local shards that cannot be opened are left out with a warning; all of them: an error."""
        good, bad = [], []
        for shard in shards:
            if shard.local:
                error = probe_shard(shard.url)
                if error:
                    bad.append((shard.url, error))
                    continue
            good.append(shard)
        for url, error in bad:
            self.log(f"ufo data: warning: task {self.task}: shard {url} is unreadable ({error}); left out")
        if not good:
            url, error = bad[0]
            raise DataError(f"task {self.task}: every shard is unreadable ({len(bad)} shards; {url}: {error})")
        return good

    @property
    def batches_per_epoch(self) -> int:
        """Batches of the current epoch (the same on every rank of the group)."""
        if self.sampler == "pk":
            return len(self._pk_batches())
        if not self.splits:
            return self.full_batches_per_epoch
        return batches_per_epoch(len(self._remaining()), self.group_size, self.batch_size)

    def state_dict(self) -> dict[str, Any]:
        """The position: epoch and batches of it already consumed (and the epoch's earlier splits)."""
        if self.position == self.batches_per_epoch:  # finished, though the epoch has not been closed yet
            return {"epoch": self.epoch + 1, "batches": 0}
        state: dict[str, Any] = {"epoch": self.epoch, "batches": self.position}
        if self.splits:
            state["splits"] = [list(split) for split in self.splits]
        if self.pk_offset:
            state["pk_offset"] = self.pk_offset
        return state

    def load_state_dict(self, state: Mapping[str, Any], group_size: int | None = None) -> None:
        """Continue from a saved position; `group_size`: the number of ranks that saved it, where it is not
        this loader's (a resume on another number of ranks).

        Exact mode: the rest of the interrupted epoch is what every rank of the old split had not yet
        taken (each rank's unread batches, found by replaying its plan and shuffle on sample
        positions), divided afresh among the new ranks; so every sample of the epoch is read once,
        as in an uninterrupted epoch, only by other ranks and in another order. Later epochs are
        planned for the new ranks from their start. Resampled mode draws shards with replacement:
        the position carries on.
        """
        splits = [(int(g), int(b)) for g, b in state.get("splits", [])]
        self.splits, self.epoch, self.position = splits, int(state["epoch"]), int(state["batches"])
        self.pk_offset = int(state.get("pk_offset", 0))
        if self.sampler == "pk" and group_size is not None and group_size != self.group_size and self.position:
            # the old ranks took the plan's first `position` x `group_size` batches after the offset
            self.pk_offset, self.position = self.pk_offset + self.position * group_size, 0
        elif group_size is not None and group_size != self.group_size and self.mode == "exact" and self.position:
            before = self.group_size
            self.group_size = group_size  # the plan of the ranks that saved the position
            self.splits, self.position = splits + [(group_size, self.position)], 0
            self.group_size = before
        if not 0 <= self.position <= self.batches_per_epoch:
            self.splits, self.position = [], 0
            raise DataError(f"task {self.task}: saved position {dict(state)} does not fit an epoch of "
                            f"{self.batches_per_epoch} batches (did the shards or batch size change?)")

    def plan_positions(self) -> list[int] | None:
        """This rank's positions in the current epoch's order after a resplit (None: its plain share)."""
        if self.mode != "exact" or not self.splits:
            return None
        remaining = self._remaining()
        start = sum(balanced(len(remaining), self.group_size)[: self.rank_in_group])
        return remaining[start:start + balanced(len(remaining), self.group_size)[self.rank_in_group]]

    def _remaining(self) -> list[int]:
        """The current epoch's sample positions that its earlier splits left unread, ascending."""
        key = (self.epoch, tuple(self.splits))
        if getattr(self, "_left", (None,))[0] != key:
            self._left = (key, self._replay())
        return self._left[1]

    def _replay(self) -> list[int]:
        left = list(range(self.samples_per_epoch))
        for group, taken in self.splits:
            read: set[int] = set()
            for rank in range(group):
                read.update(self._taken(left, group, rank, taken))
            left = [p for p in left if p not in read]
        return left

    def _taken(self, left: list[int], group: int, rank: int, taken: int) -> list[int]:
        """The positions rank `rank` of `group` ranks read in its first `taken` batches, planned over
        `left`: its share cut into batches, its workers' blocks and their shuffles replayed."""
        nb = batches_per_epoch(len(left), group, self.batch_size)
        start = sum(balanced(len(left), group)[:rank])
        mine = left[start:start + balanced(len(left), group)[rank]]
        sizes = balanced(len(mine), nb)
        workers = max(1, self.num_workers)
        read, offset = [], 0
        for worker in range(workers):
            batches = list(range(worker, nb, workers))
            block = mine[offset:offset + sum(sizes[j] for j in batches)]
            offset += len(block)
            stream: Iterator[int] = iter(block)
            if self.shuffle_buffer > 1:
                stream = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer,
                                     seed=_seed(self.seed, self.epoch, rank, worker, 1))(stream)
            read += list(islice(stream, sum(sizes[j] for j in batches if j < taken)))
        return read

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        stream = (_PKStream if self.sampler == "pk" else _TaskStream)(self, self.epoch, self.position)
        # its own generator: a DataLoader otherwise draws its seed from the global torch RNG, which
        # would make the trainer's randomness (drop path) depend on when epochs start
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, generator=torch.Generator())
        for batch in loader:
            self.position += 1
            self._epoch_samples += len(batch["labels"])
            self._note(batch.pop("problems"))
            yield batch
        if self.position != self.batches_per_epoch:
            raise RuntimeError(f"task {self.task}: epoch {self.epoch} gave {self.position} batches, "
                               f"planned {self.batches_per_epoch}")
        self._end_epoch()

    def _note(self, problems: list[tuple[str, str | None, str]]) -> None:
        for shard, key, reason in problems:
            self._epoch_problems[(shard, reason.split(" (")[0])] += 1
            if not reason.endswith("(counted as missing)"):
                self.bad_samples[category(reason)] += 1
            if shard not in self._warned:
                self._warned.add(shard)
                where = f"{shard}, key {key}" if key else shard
                self.log(f"ufo data: warning: task {self.task}: {where}: {reason} "
                         "(skipped; further problems in this shard are counted)")

    def _end_epoch(self) -> None:
        if self._epoch_problems:
            total = sum(self._epoch_problems.values())
            shards = len({shard for shard, _ in self._epoch_problems})
            reasons = Counter()
            for (_, reason), n in self._epoch_problems.items():
                reasons[reason] += n
            detail = ", ".join(f"{n} {reason}" for reason, n in reasons.most_common())
            self.log(f"ufo data: task {self.task} epoch {self.epoch}: skipped {total} bad samples "
                     f"in {shards} shard{'s' if shards > 1 else ''} ({detail})")
            if self._epoch_samples == 0:
                (shard, reason), _ = self._epoch_problems.most_common(1)[0]
                raise DataError(f"task {self.task}: no sample of the epoch could be used ({shard}: {reason})")
        self.epoch, self.position, self.splits, self.pk_offset = self.epoch + 1, 0, [], 0
        self._epoch_problems.clear()
        self._epoch_samples = 0


class MixedLoader:
    """The `mixed` layout: each batch is a contiguous slice of every task, from the per-task loaders.

    An epoch is the longest task's epoch; shorter tasks run on into their next epochs.
    """

    def __init__(self, loaders: Mapping[str, TaskLoader]):
        self.loaders = dict(loaders)
        self.batches_per_epoch = max(len(loader) for loader in self.loaders.values())
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches": self.position,
                "tasks": {task: loader.state_dict() for task, loader in self.loaders.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["batches"])
        for task, loader in self.loaders.items():
            loader.load_state_dict(state["tasks"][task])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        streams = {task: endless(loader) for task, loader in self.loaders.items()}
        while self.position < self.batches_per_epoch:
            parts = [next(stream) for stream in streams.values()]
            self.position += 1
            yield {
                "images": self._images(parts),
                "labels": torch.cat([p["labels"] for p in parts]),
                "slices": [(p["task"], len(p["labels"])) for p in parts],
                "keys": [k for p in parts for k in p["keys"]],
                "targets": {p["task"]: p["targets"] for p in parts if "targets" in p},
                "epoch": self.epoch, "index": self.position - 1,
            }
        self.epoch, self.position = self.epoch + 1, 0


    @staticmethod
    def _images(parts: list[dict]) -> torch.Tensor | list[torch.Tensor]:
        """The tasks' images as one batch, or one tensor per task when their input sizes differ (the
        supernet runs each size as a sub-batch)."""
        shaped = [p["images"] for p in parts if p["images"].ndim == 4]
        if len({x.shape[1:] for x in shaped}) > 1:
            return [p["images"] for p in parts]
        return torch.cat(shaped) if shaped else torch.empty(0)  # empty: every task's slice


def endless(loader: TaskLoader | MixedLoader) -> Iterator[dict[str, Any]]:
    """Batches epoch after epoch (the loader's position advances as they are taken)."""
    while True:
        yield from loader


def task_loader(cfg: UfoConfig, task: str, *, rank_in_group: int = 0, group_size: int = 1, train: bool = True,
                batch_size: int | None = None, num_workers: int | None = None, spec: str | None = None,
                protocol: str | None = None, log: Log = _stderr) -> TaskLoader:
    """A TaskLoader configured from the run's config: train shards, or one eval part (`spec`, default
    the task's eval_shards when they are one set) in eval order with the metadata its protocol needs."""
    t = cfg.tasks[task]
    if spec is None:
        spec = t.shards if train else t.eval_shards
        if isinstance(spec, dict):
            raise DataError(f"task {task}: tasks.{task}.eval_shards has several parts; read them one by one")
    if spec is None:
        raise DataError(f"task {task}: tasks.{task}.{'shards' if train else 'eval_shards'} is not set")
    protocol = protocol or default_protocol(t.kind)
    return TaskLoader(
        task, spec, batch_size=batch_size or cfg.batch_of(task), transform=build_transform(cfg, task, train),
        rank_in_group=rank_in_group, group_size=group_size,
        num_workers=cfg.data.num_workers if num_workers is None else num_workers,
        seed=cfg.train.seed, mode=cfg.data.mode if train else "exact",
        shuffle_buffer=cfg.data.shuffle_buffer if train else 0,
        # an evaluation split's labels are its own identities or pair indices, not the training classes
        num_classes=t.num_classes if train or protocol == "classification" else None,
        samples_per_epoch=t.samples_per_epoch if train else None,
        meta_keys=() if train else META_KEYS[protocol], sampler=t.sampler if train else "random",
        instances=t.instances, mixer=batch_mixer(cfg, task) if train else None,
        input_shape=(cfg.model.in_chans, *cfg.size_of(task)), log=log)
