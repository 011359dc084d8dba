"""sampler pk (ufo/data/sampler.py through TaskLoader): P identities x K samples a batch, on every rank
and worker; every sample in every epoch; resume exact, and on another number of ranks."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from shardtools import write_synth
from ufo.data import TaskLoader
from ufo.errors import DataError


@pytest.fixture
def persons(tmp_path):
    """60 samples of 7 identities, in shards of 11."""
    out = write_synth(tmp_path / "persons", task="person", samples=60, classes=7, generator="instances",
                      maxcount=11)
    return out


def loader(shards, transform, rank=0, ranks=1, workers=0, batch=8, k=4, **kw):
    return TaskLoader("person", str(shards), batch_size=batch, transform=transform["eval"], rank_in_group=rank,
                      group_size=ranks, num_workers=workers, seed=5, sampler="pk", instances=k, **kw)


def labels_of(shards) -> dict[str, int]:
    import tarfile

    out = {}
    for shard in sorted(shards.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".cls"):
                    out[m.name[:-4]] = int(tar.extractfile(m).read())
    return out


def test_every_batch_of_every_rank_and_worker_holds_p_identities_of_k_and_the_epoch_covers_every_sample(
        persons, transform):
    truth = labels_of(persons)
    seen: Counter = Counter()
    counts = []
    for rank in range(2):
        ld = loader(persons, transform, rank, ranks=2, workers=2)
        batches = list(ld)
        counts.append(len(batches))
        for b in batches:
            ids = Counter(b["labels"].tolist())
            assert len(ids) == 2 and set(ids.values()) == {4}, ids  # P = 8 / 4 = 2 identities, K = 4 each
            assert all(truth[k] == y for k, y in zip(b["keys"], b["labels"].tolist()))
            seen.update(b["keys"])
    assert counts[0] == counts[1]  # every rank takes the same number of batches
    assert set(seen) == set(truth)  # every sample of the epoch, some twice (the fills)
    assert len(truth) == 60


def test_a_resumed_loader_continues_with_the_batches_of_the_straight_run(persons, transform):
    straight = [b["keys"] for b in loader(persons, transform, workers=2)]
    first = loader(persons, transform, workers=2)
    stream = iter(first)
    taken = [next(stream)["keys"] for _ in range(3)]
    state = json.loads(json.dumps(first.state_dict()))
    again = loader(persons, transform, workers=2)
    again.load_state_dict(state)
    assert taken + [b["keys"] for b in again] == straight
    # the next epoch is another plan
    assert [b["keys"] for b in again] != straight


def test_resuming_on_another_number_of_ranks_continues_with_the_batches_not_taken(persons, transform):
    two = [loader(persons, transform, rank, ranks=2) for rank in range(2)]
    streams = [iter(ld) for ld in two]
    taken = [next(s)["keys"] for _ in range(2) for s in streams]  # each rank took 2 batches
    states = [json.loads(json.dumps(ld.state_dict())) for ld in two]
    assert states[0] == states[1]
    three = [loader(persons, transform, rank, ranks=3) for rank in range(3)]
    for ld in three:
        ld.load_state_dict(states[0], group_size=2)
    rest = [b["keys"] for ld in three for b in ld]
    plan = [b["keys"] for b in loader(persons, transform, ranks=1)]  # one rank takes the plan in order
    assert sorted(map(tuple, taken)) == sorted(map(tuple, plan[:4]))  # the old ranks took the plan's first 4
    assert {tuple(k) for k in plan[4:]} <= {tuple(k) for k in rest}  # the new ones take every other one
    assert set(k for b in taken + rest for k in b) == set(labels_of(persons))


def test_pk_refuses_what_it_cannot_sample(persons, transform):
    with pytest.raises(DataError, match="batch size 10 is not a multiple of 4"):
        loader(persons, transform, batch=10)
    with pytest.raises(DataError, match="needs 8 identities a batch .* its shards hold 7"):
        loader(persons, transform, batch=16, k=2)
