import hashlib

import numpy as np
import pytest
from PIL import Image

from ufo.data import open_source, resolve_shards, write_task_shards
from ufo.errors import DataError

from shardtools import manifest, members_of, write_synth


def test_writes_standard_shards_and_a_manifest(shards):
    m = manifest(shards)
    files = sorted(p.name for p in shards.iterdir())
    assert files == ["manifest.json"] + [f"shapes-{i:06d}.tar" for i in range(8)]
    assert [s["samples"] for s in m["shards"]] == [7] * 7 + [1] and m["samples"] == 50
    assert m["task"] == "shapes" and m["kind"] == "classification" and m["num_classes"] == 5
    assert sum(m["class_counts"].values()) == 50
    for s in m["shards"]:
        assert hashlib.sha256((shards / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    names = [name for name, _ in members_of(shards / "shapes-000000.tar")]
    assert names[:3] == ["shapes_0000000.cls", "shapes_0000000.json", "shapes_0000000.png"]


def test_shards_are_shuffled_not_class_sorted(tmp_path):
    out = write_synth(tmp_path / "s", samples=40, maxcount=40, classes=4)
    labels = [int(data) for name, data in members_of(out / "shapes-000000.tar") if name.endswith(".cls")]
    assert sorted(labels) != labels and len(set(labels[:10])) > 1


def test_eval_split_is_stratified_and_disjoint(tmp_path):
    out = write_synth(tmp_path / "s", samples=100, classes=5, eval_fraction=0.2)
    train, held = manifest(out / "train"), manifest(out / "eval")
    assert train["samples"] == 80 and held["samples"] == 20 and held["split"] == "eval"
    assert all(n == 4 for n in held["class_counts"].values())
    keys = lambda d: {n.split(".")[0] for f in d.glob("*.tar") for n, _ in members_of(f)}  # noqa: E731
    train_images = {data for f in (out / "train").glob("*.tar") for n, data in members_of(f) if n.endswith("png")}
    eval_images = {data for f in (out / "eval").glob("*.tar") for n, data in members_of(f) if n.endswith("png")}
    assert len(keys(out / "train")) == 80 and not train_images & eval_images


def test_refuses_a_non_empty_output_and_keeps_it(tmp_path, shards):
    before = sorted(p.name for p in shards.iterdir())
    source = open_source("synth:shapes", "shapes", classes=3, samples=5, image_size=16)
    with pytest.raises(DataError, match="exists and is not empty; pass --overwrite"):
        write_task_shards(source, "shapes", shards, kind="classification", log=lambda _: None)
    assert sorted(p.name for p in shards.iterdir()) == before
    write_task_shards(source, "shapes", shards, kind="classification", overwrite=True, log=lambda _: None)
    assert manifest(shards)["samples"] == 5
    assert [p.name for p in shards.parent.iterdir() if p.name.startswith(".")] == []


def test_a_failing_source_leaves_nothing(tmp_path):
    source = open_source("synth:shapes", "shapes", classes=3, samples=20, image_size=16)
    real = source.load

    def load(item):
        if item == 15:
            raise OSError("disk went away")
        return real(item)

    source.load = load
    with pytest.raises(OSError):
        write_task_shards(source, "shapes", tmp_path / "out", kind="classification", maxcount=4, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_npz_source(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (12, 10, 10, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(12) % 3)
    source = open_source(str(tmp_path / "d.npz"), "t")
    assert source.classes == ["0", "1", "2"] and len(source.items) == 12
    sample = source.load(4)
    assert sample.label == 1 and sample.ext == "png"
    np.testing.assert_array_equal(np.asarray(Image.open(__import__("io").BytesIO(sample.image))), images[4])


def test_npz_without_labels(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match="no array 'labels'"):
        open_source(str(tmp_path / "d.npz"), "t")


def test_image_folder_source_keeps_the_original_bytes(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "imgs" / name / f"{i}.jpg")
    source = open_source(str(tmp_path / "imgs"), "pets")
    assert source.classes == ["cat", "dog"] and source.labels == [0, 0, 0, 1, 1, 1]
    sample = source.load(source.items[4])
    assert sample.ext == "jpg" and sample.image == (tmp_path / "imgs" / "dog" / "1.jpg").read_bytes()


def test_sklearn_digits_is_real_data():
    source = open_source("sklearn:digits", "digits", image_size=16)
    assert len(source.items) == 1797 and source.classes == [str(d) for d in range(10)]
    image = np.asarray(Image.open(__import__("io").BytesIO(source.load(0).image)))
    assert image.shape == (16, 16, 3) and image.max() > 100


def test_synthetic_tasks_differ_between_tasks():
    a = open_source("synth:instances", "face", classes=5, samples=5, image_size=16)
    b = open_source("synth:instances", "person", classes=5, samples=5, image_size=16)
    assert a.load(0).image != b.load(0).image
    assert a.load(0).image == open_source("synth:instances", "face", classes=5, samples=5, image_size=16).load(0).image


def test_unknown_source(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        open_source(str(tmp_path / "nothing"), "t")
    with pytest.raises(DataError, match="unknown generator"):
        open_source("synth:clouds", "t")


def test_resolve_patterns_and_directories(shards):
    by_dir = resolve_shards(str(shards), "shapes")
    by_brace = resolve_shards(str(shards / "shapes-{000000..000007}.tar"), "shapes")
    by_glob = resolve_shards(str(shards / "shapes-*.tar"), "shapes")
    assert [s.url for s in by_dir] == [s.url for s in by_brace] == [s.url for s in by_glob]
    assert [s.samples for s in by_glob] == [7] * 7 + [1]
    assert resolve_shards("pipe:cat x-{0..2}.tar", "t")[2].samples is None
    with pytest.raises(DataError, match="task t: shards .* match no shard file"):
        resolve_shards(str(shards / "nope-*.tar"), "t")


def test_label_counts_from_the_manifest_or_the_tars(shards, tmp_path):
    import shutil

    from ufo.data import label_counts

    from_manifest = label_counts(str(shards), "shapes")
    assert dict(from_manifest) == {int(k): v for k, v in manifest(shards)["class_counts"].items()}
    bare = tmp_path / "bare"  # the same tars without their manifest: counted from the `.cls` members
    bare.mkdir()
    for tar in shards.glob("*.tar"):
        shutil.copy(tar, bare / tar.name)
    assert label_counts(str(bare / "*.tar"), "shapes") == from_manifest
    with pytest.raises(DataError, match="is remote and has no manifest"):
        label_counts("pipe:cat x-{0..1}.tar", "shapes")
