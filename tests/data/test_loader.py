import itertools
from collections import Counter

import pytest
import torch

from ufo.data import MixedLoader, TaskLoader
from ufo.errors import DataError

from shardtools import members_of, write_synth, write_tar


def loader(spec, transform, **kw):
    kw.setdefault("batch_size", 4)
    return TaskLoader("shapes", str(spec), transform=transform["train"], num_classes=5, **kw)


def epoch_keys(ld):
    return [b["keys"] for b in ld]


@pytest.mark.parametrize("group_size,workers,batch", [(2, 2, 4), (2, 2, 64), (3, 2, 5), (1, 0, 8)])
def test_exact_mode_reads_every_sample_once_with_equal_batch_counts(shards, transform, group_size, workers, batch):
    seen, counts = Counter(), []
    for rank in range(group_size):
        ld = loader(shards, transform, rank_in_group=rank, group_size=group_size, num_workers=workers,
                    batch_size=batch)
        batches = list(ld)
        counts.append(len(batches))
        assert len(batches) == ld.batches_per_epoch
        assert all(0 < len(b["labels"]) <= batch for b in batches)
        assert all(b["images"].shape[1:] == (3, 16, 16) for b in batches)
        seen.update(k for b in batches for k in b["keys"])
    assert len(set(counts)) == 1
    assert len(seen) == 50 and set(seen.values()) == {1}


def test_fewer_shards_than_ranks_times_workers(tmp_path, transform):
    one = write_synth(tmp_path / "one", samples=9, maxcount=100)
    seen, counts = Counter(), []
    for rank in range(2):
        batches = list(loader(one, transform, rank_in_group=rank, group_size=2, num_workers=3, batch_size=2))
        counts.append(len(batches))
        seen.update(k for b in batches for k in b["keys"])
    assert counts == [3, 3] and len(seen) == 9 and set(seen.values()) == {1}


def test_very_uneven_shards_give_equal_batch_counts(tmp_path, transform):
    big = write_synth(tmp_path / "big", samples=40, maxcount=40)
    small = write_synth(tmp_path / "small", samples=3, maxcount=1, task="shapes")
    spec = [str(p) for p in sorted(big.glob("*.tar")) + sorted(small.glob("*.tar"))]
    counts, seen = [], Counter()
    for rank in range(2):
        ld = TaskLoader("shapes", spec, batch_size=6, transform=transform["eval"], rank_in_group=rank,
                        group_size=2, num_workers=2)
        batches = list(ld)
        counts.append(len(batches))
        seen.update(k for b in batches for k in b["keys"])
    assert counts[0] == counts[1] == 4
    assert sum(seen.values()) == 43


def test_resampled_mode(shards, transform):
    counts = []
    for rank in range(2):
        ld = loader(shards, transform, rank_in_group=rank, group_size=2, num_workers=2, mode="resampled")
        batches = list(ld)
        counts.append(len(batches))
        assert all(len(b["labels"]) == 4 for b in batches)
        assert len(list(ld)) == ld.batches_per_epoch  # a second epoch, as long
    assert counts == [7, 7]  # ceil(ceil(50 / 2) / 4)


def test_same_seed_same_batches_and_epochs_differ(shards, transform):
    a = loader(shards, transform, num_workers=2, seed=5)
    b = loader(shards, transform, num_workers=2, seed=5)
    first_a, first_b = list(a), list(b)
    for x, y in zip(first_a, first_b):
        assert x["keys"] == y["keys"] and torch.equal(x["images"], y["images"])
    assert [x["keys"] for x in first_a] != epoch_keys(a)  # epoch 1 is another order


@pytest.mark.parametrize("workers,stop", [(0, 3), (2, 5), (3, 7), (2, 13), (2, 16)])
def test_restoring_a_position_continues_where_it_stopped(shards, transform, workers, stop):
    straight = loader(shards, transform, num_workers=workers, seed=2)
    expected = list(straight) + list(straight)  # two epochs
    interrupted = loader(shards, transform, num_workers=workers, seed=2)
    got = []
    for batch in itertools.chain(interrupted, interrupted):
        got.append(batch)
        if len(got) == stop:
            break
    state = interrupted.state_dict()
    assert state == dict(zip(("epoch", "batches"), divmod(stop, 13)))
    resumed = loader(shards, transform, num_workers=workers, seed=2)
    resumed.load_state_dict(state)
    while len(got) < len(expected):
        got += list(resumed)
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    for x, y in zip(got, expected):
        assert torch.equal(x["images"], y["images"])  # augmentation replayed exactly


def test_plain_tarfile_shards_read_the_same(shards, tmp_path, transform):
    plain = tmp_path / "plain"
    plain.mkdir()
    for shard in sorted(shards.glob("*.tar")):
        write_tar(plain / shard.name, members_of(shard))
    ours = [(b["keys"], b["labels"].tolist(), b["images"]) for b in loader(shards, transform, num_workers=2)]
    theirs = [(b["keys"], b["labels"].tolist(), b["images"])
              for b in loader(plain / "shapes-{000000..000007}.tar", transform, num_workers=2)]
    assert [x[:2] for x in ours] == [x[:2] for x in theirs]
    assert all(torch.equal(x[2], y[2]) for x, y in zip(ours, theirs))


def test_bad_samples_are_skipped_counted_and_reported(tmp_path, transform):
    src = write_synth(tmp_path / "src", samples=30, maxcount=10)
    bad = tmp_path / "bad"
    bad.mkdir()
    first = members_of(src / "shapes-000000.tar")
    # shard 0: one undecodable image, one sample without a label
    broken_key = first[2][0].split(".")[0]
    unlabeled_key = first[5][0].split(".")[0]
    edited = [(n, b"not a png" if n == f"{broken_key}.png" else d) for n, d in first
              if n != f"{unlabeled_key}.cls"]
    write_tar(bad / "shapes-000000.tar", edited)
    write_tar(bad / "shapes-000001.tar", members_of(src / "shapes-000001.tar"))
    # shard 2: cut in the middle of a member
    data = (src / "shapes-000002.tar").read_bytes()
    (bad / "shapes-000002.tar").write_bytes(data[: len(data) // 2 + 100])
    messages = []
    counts, seen = [], Counter()
    for rank in range(2):
        ld = TaskLoader("shapes", str(bad / "shapes-*.tar"), batch_size=4, transform=transform["eval"],
                        rank_in_group=rank, group_size=2, num_workers=2, log=messages.append, shuffle_buffer=0)
        batches = list(ld)
        counts.append(len(batches))
        seen.update(k for b in batches for k in b["keys"])
    assert counts[0] == counts[1]
    assert broken_key not in seen and unlabeled_key not in seen
    assert 15 <= sum(seen.values()) < 28 and set(seen.values()) == {1}
    text = "\n".join(messages)
    assert f"shapes-000000.tar, key {broken_key}: undecodable image" in text or \
        f"shapes-000000.tar, key {unlabeled_key}: missing label" in text
    assert "shapes-000002.tar" in text and "unreadable" in text
    summaries = [m for m in messages if "skipped" in m and "bad samples" in m]
    assert summaries and all("epoch 0" in m for m in summaries)


def test_every_shard_unreadable_is_one_clear_error(tmp_path, transform):
    for i in range(2):
        (tmp_path / f"t-{i}.tar").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match=r"task shapes: every shard is unreadable \(2 shards; .*t-0.tar"):
        loader(tmp_path / "t-*.tar", transform, log=lambda _: None)


def test_one_unreadable_shard_is_left_out_with_a_warning(shards, transform):
    (shards / "shapes-000003.tar").write_bytes(b"\0\1garbage")
    messages = []
    ld = TaskLoader("shapes", str(shards / "shapes-*.tar"), batch_size=4, transform=transform["eval"],
                    log=messages.append)
    assert any("shapes-000003.tar is unreadable" in m for m in messages)
    assert sum(len(b["keys"]) for b in ld) == 43


def test_saved_position_from_another_plan_is_refused(shards, transform):
    ld = loader(shards, transform)
    with pytest.raises(DataError, match="does not fit an epoch"):
        ld.load_state_dict({"epoch": 0, "batches": 99})


def test_mixed_batches_hold_a_contiguous_slice_of_every_task(tmp_path, transform):
    a = write_synth(tmp_path / "a", task="shapes", samples=20)
    b = write_synth(tmp_path / "b", task="items", generator="instances", samples=7)
    loaders = {"shapes": TaskLoader("shapes", str(a), batch_size=4, transform=transform["train"]),
               "items": TaskLoader("items", str(b), batch_size=2, transform=transform["train"])}
    mixed = MixedLoader(loaders)
    batches = list(mixed)
    assert len(batches) == 5  # the longer task's epoch; items runs on into its next epoch
    for batch in batches:
        assert [task for task, _ in batch["slices"]] == ["shapes", "items"]
        sizes = [n for _, n in batch["slices"]]
        assert batch["images"].shape[0] == len(batch["labels"]) == sum(sizes)
        assert all(k.startswith("shapes_") for k in batch["keys"][: sizes[0]])
        assert all(k.startswith("items_") for k in batch["keys"][sizes[0]:])
    assert mixed.state_dict()["tasks"]["items"] == {"epoch": 1, "batches": 1}
    assert mixed.state_dict()["tasks"]["shapes"] == {"epoch": 1, "batches": 0}


def test_tasks_of_their_own_input_sizes_come_as_a_tensor_per_task(tmp_path):
    from ufo.config import config_from_dict
    from ufo.data import task_loader

    a = write_synth(tmp_path / "a", task="shapes", samples=20)
    b = write_synth(tmp_path / "b", task="items", generator="instances", samples=7)
    cfg = config_from_dict({"model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "num_heads": 2},
                            "tasks": {"shapes": {"kind": "classification", "num_classes": 5, "shards": str(a)},
                                      "items": {"kind": "retrieval", "num_classes": 7, "shards": str(b),
                                                "img_size": [16, 8]}},
                            "data": {"num_workers": 0}}, "test")
    loaders = {t: task_loader(cfg, t, batch_size=4 if t == "shapes" else 2) for t in cfg.tasks}
    assert loaders["items"].input_shape == (3, 16, 8)
    for batch in MixedLoader(loaders):
        shapes, items = batch["images"]  # one per task, in config order
        assert [x.shape[0] for x in batch["images"]] == [n for _, n in batch["slices"]]
        assert shapes.shape[1:] == (3, 16, 16) and items.shape[1:] == (3, 16, 8)
    # an empty batch (every sample bad) keeps its task's shape: every rank runs the same sub-batches
    from ufo.data.loader import _TaskStream

    assert _TaskStream(loaders["items"], 0, 0)._decode([], 0, [])["images"].shape == (0, 3, 16, 8)
    # tasks of one size share one batch tensor, as before
    same = config_from_dict({**cfg.to_dict(), "tasks": {**cfg.to_dict()["tasks"], "items": {
        **cfg.to_dict()["tasks"]["items"], "img_size": 16}}}, "test")
    loaders = {t: task_loader(same, t, batch_size=2) for t in same.tasks}
    assert next(iter(MixedLoader(loaders)))["images"].shape == (4, 3, 16, 16)


def test_pipe_specs_in_resampled_mode(shards, transform):
    spec = f"pipe:cat {shards}/shapes-{{000000..000007}}.tar"
    with pytest.raises(DataError, match="exact mode needs every shard's sample count"):
        loader(spec, transform)
    ld = loader(spec, transform, mode="resampled", samples_per_epoch=20, num_workers=2)
    batches = list(ld)
    assert len(batches) == 5 and all(len(b["keys"]) == 4 for b in batches)
    assert all(k.startswith("shapes_") for b in batches for k in b["keys"])


def _keys(loaders) -> list[str]:
    return [k for loader in loaders for batch in loader for k in batch["keys"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_epoch_resplit_over_another_number_of_ranks_reads_every_sample_once(tmp_path, workers):
    import itertools

    from ufo.data import TaskLoader

    out = write_synth(tmp_path / "s", samples=61, maxcount=9)

    def loaders(group):
        return [TaskLoader("shapes", str(out), batch_size=4, transform=lambda im: torch.zeros(1), rank_in_group=r,
                           group_size=group, num_workers=workers, seed=5, shuffle_buffer=6, num_classes=5)
                for r in range(group)]

    first = loaders(2)
    seen = []
    for loader in first:  # 3 batches on each of 2 ranks, then the job stops
        seen += [k for batch in itertools.islice(iter(loader), 3) for k in batch["keys"]]
    saved = first[0].state_dict()
    assert saved == {"epoch": 0, "batches": 3}
    second = loaders(3)  # resumed on 3 ranks: 1 batch each, then stopped again
    for loader in second:
        loader.load_state_dict(saved, group_size=2)
        seen += [k for batch in itertools.islice(iter(loader), 1) for k in batch["keys"]]
    again = second[1].state_dict()
    assert again["splits"] == [[2, 3]] and again["batches"] == 1
    last = loaders(1)  # and finished on 1 rank
    last[0].load_state_dict(again, group_size=3)
    seen += _keys(last)
    assert sorted(seen) == sorted(_keys(loaders(1)))  # every sample of the epoch, each once
    assert len(seen) == 61
    assert last[0].epoch == 1 and last[0].splits == [] and len(last[0]) == len(loaders(1)[0])


def test_a_damaged_shard_without_a_manifest_is_counted_in_exact_mode_with_a_plain_reason(tmp_path, transform):
    # no manifest: the sample count is what can be read, so nothing is `missing`; the damage itself counts
    src = write_synth(tmp_path / "src", samples=20, maxcount=10)
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (src / "shapes-000000.tar").read_bytes()
    (bad / "shapes-000000.tar").write_bytes(data[: len(data) // 2 + 100])
    write_tar(bad / "shapes-000001.tar", members_of(src / "shapes-000001.tar"))
    messages: list[str] = []
    loader = TaskLoader("shapes", str(bad / "shapes-*.tar"), batch_size=4, transform=transform["eval"],
                        log=messages.append, shuffle_buffer=0)
    assert loader.mode == "exact"
    read = sum(len(b["labels"]) for b in loader)
    assert loader.bad_samples["unreadable"] >= 1, (read, loader.bad_samples)
    assert "missing" not in loader.bad_samples
    text = "\n".join(messages)
    assert "unreadable: " in text and "<" not in text and " @ " not in text, text


def test_a_tasks_augmentation_overrides_the_datas_and_random_erasing_erases(tmp_path):
    from ufo.config import config_from_dict
    from ufo.data.loader import augmentation, build_transform

    cfg = config_from_dict({"model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "num_heads": 2},
                            "data": {"hflip": 0.0, "scale": [1.0, 1.0]},
                            "tasks": {"person": {"kind": "retrieval", "num_classes": 5,
                                                 "augment": {"re_prob": 1.0, "hflip": 0.5}},
                                      "digits": {"kind": "classification", "num_classes": 5, "hflip": 0.0}}},
                           "test")
    assert augmentation(cfg, "person") == {"scale": (1.0, 1.0), "hflip": 0.5, "color_jitter": None,
                                           "auto_augment": None, "re_prob": 1.0}
    assert augmentation(cfg, "digits")["re_prob"] == 0.0
    from PIL import Image

    image = Image.new("RGB", (16, 16), (128, 128, 128))
    torch.manual_seed(0)
    erased = build_transform(cfg, "person", train=True)(image)
    plain = build_transform(cfg, "digits", train=True)(image)
    assert torch.allclose(plain, torch.full_like(plain, plain[0, 0, 0]))  # a flat image stays flat
    assert (erased != plain).any() and erased.std() > 0.1  # a rectangle of noise
    assert not any("Erasing" in type(t).__name__ for t in build_transform(cfg, "person", train=False).transforms)


def test_mixup_and_cutmix_mix_a_classification_batch_into_soft_targets_seeded(tmp_path):
    from ufo.config import config_from_dict
    from ufo.data import task_loader

    out = write_synth(tmp_path / "shapes", samples=28, maxcount=30)  # 4 batches of 7: odd ones
    raw = {"model": {"img_size": 16, "patch_size": 4, "embed_dim": 32, "num_heads": 2},
           "data": {"num_workers": 0, "shuffle_buffer": 0},
           "tasks": {"shapes": {"kind": "classification", "num_classes": 5, "shards": str(out),
                                "label_smoothing": 0.1, "augment": {"mixup": 0.8}}},
           "train": {"micro_batch_size": 7}}
    batches = list(task_loader(config_from_dict(raw, "test"), "shapes"))
    again = list(task_loader(config_from_dict(raw, "test"), "shapes"))
    plain = list(task_loader(config_from_dict({**raw, "tasks": {"shapes": {**raw["tasks"]["shapes"], "augment": {}}}},
                                              "test"), "shapes"))
    assert [len(b["labels"]) for b in batches] == [7, 7, 7, 7]

    def smoothed(labels):
        return torch.nn.functional.one_hot(labels, 5).float() * 0.9 + 0.1 / 5

    lams = []
    for b, a, p in zip(batches, again, plain):
        assert torch.equal(b["images"], a["images"]) and torch.equal(b["targets"], a["targets"])  # seeded per batch
        assert torch.equal(b["labels"], p["labels"])  # the hard labels stay (counts, accuracy)
        assert b["targets"].shape == (len(b["labels"]), 5)
        assert torch.allclose(b["targets"].sum(dim=1), torch.ones(len(b["labels"])))
        # timm's mixup targets: lam of each row's smoothed one-hot plus 1 - lam of its pair's (i, 5 - i)
        y = b["labels"][:-1]
        own, pair = smoothed(y), smoothed(y.flip(0))
        lam = float(((b["targets"][:-1] - pair) * (own - pair)).sum() / (own - pair).pow(2).sum().clamp_min(1e-12))
        assert torch.allclose(b["targets"][:-1], lam * own + (1 - lam) * pair, atol=1e-6)
        lams.append(lam)
        assert b["targets"][-1].argmax() == b["labels"][-1] and b["targets"][-1].max() == pytest.approx(0.92)
        assert not torch.equal(b["images"][:-1], p["images"][:-1]) and torch.equal(b["images"][-1], p["images"][-1])
    assert "targets" not in plain[0]
    assert min(lams) < 0.95 and len(set(lams)) == 4  # a lam drawn per batch
