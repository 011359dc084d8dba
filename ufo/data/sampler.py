"""Identity-balanced (PK) sampling: every batch holds P identities with K samples each.

As fast-reid's identity samplers (`fastreid/data/samplers/triplet_sampler.py`) and VIMER-UFO's
re-id configs: a triplet loss mined within a batch needs positives in it. Streaming shards cannot
be read by identity, so the task's local shards are indexed once (each sample's tar members,
their offsets, and its label) and samples are then read by seeking.

The epoch's plan is the same on every rank and worker, from (seed, epoch): each identity's samples
shuffled and cut into groups of K (the last group, and an identity with fewer than K samples,
filled by drawing its own samples again, as fast-reid does); batches of P groups of P distinct
identities drawn at random among those with groups left; once fewer than P identities have groups
left, a batch is filled with fresh groups of other identities. So every indexed sample is in the
epoch's batches at least once (some twice: the fills). The group's ranks take the plan's batches
round robin (rank r of G: batches r, r + G, ...), wrapping around to give every rank the same
count; a position (batches each rank took) names the first batches of the plan that were taken,
so a resume on another number of ranks continues with the batches not yet taken.
"""

from __future__ import annotations

import math
import random
import tarfile
from dataclasses import dataclass
from typing import Sequence

from webdataset.tariterators import base_plus_ext

from ufo.data.shards import Shard
from ufo.errors import DataError


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie in its shard: (extension, data offset, size) each."""

    shard: str
    key: str
    members: tuple[tuple[str, int, int], ...]


def index_shards(task: str, shards: Sequence[Shard]) -> tuple[list[SampleRef], list[int], dict[str, int]]:
    """Every sample of the local shards with its label (`.cls`), and what could not be indexed, by reason."""
    refs, labels, bad = [], [], {}
    for shard in shards:
        if not shard.local:
            raise DataError(f"task {task}: sampler pk reads samples by identity, which needs local shards; "
                            f"{shard.url} is not a local file")
        members: dict[str, list[tuple[str, int, int]]] = {}
        order: list[str] = []
        try:
            with tarfile.open(shard.url, mode="r:") as tar:
                for info in tar:
                    if not info.isreg():
                        continue
                    key, ext = base_plus_ext(info.name)
                    if key is None:
                        continue
                    if key not in members:
                        members[key] = []
                        order.append(key)
                    members[key].append((ext, info.offset_data, info.size))
        except (tarfile.TarError, OSError, EOFError):
            bad["unreadable"] = bad.get("unreadable", 0) + 1  # what was indexed before the damage is kept
        with open(shard.url, "rb") as f:
            for key in order:
                found = {ext: (offset, size) for ext, offset, size in members[key]}
                if "cls" not in found:
                    bad["missing label (.cls)"] = bad.get("missing label (.cls)", 0) + 1
                    continue
                f.seek(found["cls"][0])
                try:
                    label = int(f.read(found["cls"][1]).decode().strip())
                except (ValueError, UnicodeDecodeError):
                    bad["bad label"] = bad.get("bad label", 0) + 1
                    continue
                refs.append(SampleRef(shard.url, key, tuple(members[key])))
                labels.append(label)
    return refs, labels, bad


def pk_plan(labels: Sequence[int], identities: int, instances: int, seed: int, epoch: int) -> list[list[int]]:
    """The epoch's batches, each `identities` (P) groups of `instances` (K) sample indices of one identity."""
    rng = random.Random(f"pk:{seed}:{epoch}")
    by_id: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        by_id.setdefault(label, []).append(i)
    pids = sorted(by_id)

    def fresh(pid: int) -> list[int]:
        return [rng.choice(by_id[pid]) for _ in range(instances)]

    groups: dict[int, list[list[int]]] = {}
    for pid in pids:
        samples = list(by_id[pid])
        rng.shuffle(samples)
        cut = [samples[i:i + instances] for i in range(0, len(samples), instances)]
        cut[-1] = cut[-1] + [rng.choice(by_id[pid]) for _ in range(instances - len(cut[-1]))]
        groups[pid] = cut
    batches = []
    left = [pid for pid in pids if groups[pid]]  # identities with groups left, in order
    while left:
        chosen = rng.sample(left, min(identities, len(left)))
        batch = [groups[pid].pop() for pid in chosen]
        if len(chosen) < identities:  # the epoch's last batches: filled with fresh groups of others
            taken = set(chosen)
            others = [pid for pid in pids if pid not in taken]
            batch += [fresh(pid) for pid in rng.sample(others, identities - len(chosen))]
        if any(not groups[pid] for pid in chosen):
            left = [pid for pid in left if groups[pid]]
        batches.append([i for group in batch for i in group])
    return batches


def rank_batches(plan_size: int, group_size: int, rank: int, offset: int = 0) -> list[int]:
    """The plan indices rank `rank` of `group_size` takes, after the first `offset` were taken: round
    robin, wrapping around so that every rank of the group takes the same number."""
    count = max(1, math.ceil((plan_size - offset) / group_size))
    return [(offset + rank + group_size * i) % plan_size for i in range(count)]


def read_sample(ref: SampleRef, files: dict) -> dict:
    """The sample's members as webdataset gives them (`__key__`, `__url__`, extension -> bytes);
    `files` keeps this reader's open shards."""
    f = files.get(ref.shard)
    if f is None:
        f = files[ref.shard] = open(ref.shard, "rb")
    sample = {"__key__": ref.key, "__url__": ref.shard}
    for ext, offset, size in ref.members:
        f.seek(offset)
        sample[ext] = f.read(size)
    return sample
