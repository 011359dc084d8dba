"""`ufo data write --from KIND:DIR` on small fixtures built in each dataset's exact on-disk layout."""

import io
import json
import tarfile

import pytest
from PIL import Image

from ufo.cli import main

LAYOUTS = {
    "market1501": (("bounding_box_train", "query", "bounding_box_test"), "{pid:04d}_c{cam}s1_{n:06d}_00.jpg"),
    "dukemtmc": (("bounding_box_train", "query", "bounding_box_test"), "{pid:04d}_c{cam}_f{n:07d}.jpg"),
    "veri776": (("image_train", "image_query", "image_test"), "{pid:04d}_c{cam:03d}_{n:08d}_0.jpg"),
}


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (16, 32), (seed * 37 % 255, seed * 91 % 255, 40)).save(out, format="JPEG")
    return out.getvalue()


def build(root, kind):
    """3 training identities x 2 cameras x 2 images; queries of identities 7 and 9 in camera 1; a gallery
    of both in cameras 1 and 2, one distractor (identity 0) and one junk image (identity -1)."""
    (train, query, gallery), name = LAYOUTS[kind]
    n = 0
    for folder, entries in ((train, [(p, c) for p in (2, 5, 11) for c in (1, 2) for _ in range(2)]),
                            (query, [(7, 1), (9, 1)]),
                            (gallery, [(7, 1), (7, 2), (9, 1), (9, 2), (0, 3)])):
        (root / folder).mkdir(parents=True)
        for pid, cam in entries:
            n += 1
            (root / folder / name.format(pid=pid, cam=cam, n=n)).write_bytes(jpeg(n))
    (root / gallery / f"-1_c1s1_{n + 1:06d}_00.jpg").write_bytes(jpeg(n + 1))  # junk: dropped
    (root / gallery / "Thumbs.db").write_bytes(b"not an image")


def samples(directory):
    out = []
    for shard in sorted(directory.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    label = int(tar.extractfile(member.name[:-4] + "cls").read())
                    out.append((label, meta))
    return out


@pytest.mark.parametrize("kind", list(LAYOUTS))
def test_reid_datasets_are_written_with_their_own_splits_identities_and_cameras(tmp_path, kind, capsys):
    build(tmp_path / "raw", kind)
    assert main(["data", "write", "--task", "person", "--from", f"{kind}:{tmp_path / 'raw'}",
                 "--out", str(tmp_path / "out")]) == 0
    manifests = {split: json.loads((tmp_path / "out" / split / "manifest.json").read_text())
                 for split in ("train", "query", "gallery")}
    assert {m["protocol"] for m in manifests.values()} == {"reid"}
    assert [manifests[s]["samples"] for s in ("train", "query", "gallery")] == [12, 2, 5]  # junk dropped
    assert manifests["train"]["num_classes"] == 3 and manifests["gallery"]["labels"] == "identity"
    train = samples(tmp_path / "out" / "train")
    assert sorted({label for label, _ in train}) == [0, 1, 2]  # training identities relabelled
    assert {m["identity"] for _, m in train} == {2, 5, 11} and {m["camera"] for _, m in train} == {1, 2}
    gallery = samples(tmp_path / "out" / "gallery")
    assert sorted((m["identity"], m["camera"]) for _, m in gallery) == [(0, 3), (7, 1), (7, 2), (9, 1), (9, 2)]
    assert all(label == m["identity"] and m["split"] == "gallery" for label, m in gallery)
    assert all(m["file"].startswith(LAYOUTS[kind][0][2] + "/") for _, m in gallery)
    # the inspector does not take gallery identities for classes out of range
    assert main(["data", "inspect", str(tmp_path / "out" / "gallery")]) == 0


def test_a_directory_that_is_not_the_layout_is_refused_naming_what_it_expected(tmp_path, capsys):
    build(tmp_path / "raw", "market1501")
    (tmp_path / "raw" / "query").rename(tmp_path / "raw" / "queries")
    assert main(["data", "write", "--task", "person", "--from", f"market1501:{tmp_path / 'raw'}",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"ufo data: error: --from market1501:{tmp_path / 'raw'}: not the market1501 layout: "
                   f"no folder {tmp_path / 'raw' / 'query'}")
    (tmp_path / "raw" / "queries").rename(tmp_path / "raw" / "query")
    (tmp_path / "raw" / "query" / "holiday.jpg").write_bytes(jpeg(1))
    assert main(["data", "write", "--task", "person", "--from", f"market1501:{tmp_path / 'raw'}",
                 "--out", str(tmp_path / "out")]) == 2
    assert "holiday.jpg: not a market1501 image name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_msmt17_from_its_list_files(tmp_path, capsys):
    root = tmp_path / "MSMT17"
    lists = {"list_train.txt": [], "list_val.txt": [], "list_query.txt": [], "list_gallery.txt": []}
    n = 0
    for listing, folder, entries in (("list_train.txt", "train", [(0, 1), (0, 2), (1, 3)]),
                                     ("list_val.txt", "train", [(2, 1)]),
                                     ("list_query.txt", "test", [(3000, 4)]),
                                     ("list_gallery.txt", "test", [(3000, 5), (3001, 4)])):
        for pid, cam in entries:
            n += 1
            rel = f"{pid:04d}/{pid:04d}_{cam:03d}_01_0303morning_{n:04d}_0.jpg"
            (root / folder / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / folder / rel).write_bytes(jpeg(n))
            lists[listing].append(f"{rel} {pid}")
    for listing, lines in lists.items():
        (root / listing).write_text("\n".join(lines) + "\n")
    assert main(["data", "write", "--task", "person", "--from", f"msmt17:{root}", "--out", str(tmp_path / "out")]) == 0
    assert [json.loads((tmp_path / "out" / s / "manifest.json").read_text())["samples"]
            for s in ("train", "query", "gallery")] == [4, 1, 2]  # val joins train
    gallery = samples(tmp_path / "out" / "gallery")
    assert sorted((m["identity"], m["camera"]) for _, m in gallery) == [(3000, 5), (3001, 4)]
    (root / "list_query.txt").write_text("0000/0000_004.jpg\n")
    assert main(["data", "write", "--task", "person", "--from", f"msmt17:{root}", "--out", str(tmp_path / "o2")]) == 2
    assert "list_query.txt: line '0000/0000_004.jpg' is not `relpath pid`" in capsys.readouterr().err


def test_stanford_online_products_from_its_split_files(tmp_path, capsys):
    root = tmp_path / "Stanford_Online_Products"
    rows = {"Ebay_train.txt": [(1, 1, 1), (2, 1, 1), (3, 4, 2), (4, 4, 2)],
            "Ebay_test.txt": [(5, 11319, 3), (6, 11319, 3), (7, 11320, 3)]}
    for listing, entries in rows.items():
        lines = ["image_id class_id super_class_id path"]
        for image, cls, sup in entries:
            rel = f"bicycle_final/{cls}_{image}.JPG"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(jpeg(image))
            lines.append(f"{image} {cls} {sup} {rel}")
        (root / listing).write_text("\n".join(lines) + "\n")
    assert main(["data", "write", "--task", "products", "--from", f"sop:{root}", "--out", str(tmp_path / "out")]) == 0
    test = json.loads((tmp_path / "out" / "test" / "manifest.json").read_text())
    assert test["protocol"] == "retrieval" and test["samples"] == 3
    assert sorted(label for label, _ in samples(tmp_path / "out" / "train")) == [0, 0, 1, 1]
    assert sorted(label for label, _ in samples(tmp_path / "out" / "test")) == [11319, 11319, 11320]
    (root / "Ebay_test.txt").unlink()
    assert main(["data", "write", "--task", "products", "--from", f"sop:{root}", "--out", str(tmp_path / "o2")]) == 2
    assert f"not the sop layout: no file {root / 'Ebay_test.txt'}" in capsys.readouterr().err


def write_face_pack(root, identities: list[int], classes: int):
    """A train.rec/.idx/property as InsightFace's tools write them with mxnet: record 0 a header whose
    labels give the image records' range, then one record per image (label: its identity)."""
    import pickle

    from ufo.data.recordio import pack, write_record

    root.mkdir(parents=True)
    lines = []
    with open(root / "train.rec", "wb") as f:
        lines.append(f"0\t{write_record(f, pack([len(identities) + 1.0, len(identities) + 1.0 + classes], b''))}")
        for i, identity in enumerate(identities, 1):
            lines.append(f"{i}\t{write_record(f, pack([float(identity)], jpeg(i), id_=i))}")
    (root / "train.idx").write_text("\n".join(lines) + "\n")
    (root / "property").write_text(f"{classes},112,112\n")
    pairs = [jpeg(100 + n) for n in range(6)]
    with open(root / "lfw.bin", "wb") as f:
        pickle.dump((pairs, [True, False, True]), f, protocol=2)


def test_an_insightface_pack_and_its_verification_sets(tmp_path, capsys):
    write_face_pack(tmp_path / "faces", [0, 0, 1, 2, 2, 2], classes=3)
    assert main(["data", "write", "--task", "face", "--from", f"insightface:{tmp_path / 'faces'}",
                 "--out", str(tmp_path / "out")]) == 0
    train = json.loads((tmp_path / "out" / "train" / "manifest.json").read_text())
    assert train["samples"] == 6 and train["num_classes"] == 3 and train["class_counts"] == {"0": 2, "1": 1, "2": 3}
    lfw = json.loads((tmp_path / "out" / "lfw" / "manifest.json").read_text())
    assert lfw["protocol"] == "verification" and lfw["labels"] == "pair" and lfw["samples"] == 6
    pairs = sorted((m["pair"], m["member"], m["same"]) for _, m in samples(tmp_path / "out" / "lfw"))
    assert pairs == [(0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False), (2, 0, True), (2, 1, True)]
    # the images are the pack's own bytes
    with tarfile.open(sorted((tmp_path / "out" / "train").glob("*.tar"))[0]) as tar:
        images = {tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")}
    assert images == {jpeg(i) for i in range(1, 7)}


def test_a_verification_set_that_would_run_code_is_refused(tmp_path, capsys):
    import os
    import pickle

    write_face_pack(tmp_path / "faces", [0, 1], classes=2)
    proof = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    (tmp_path / "faces" / "agedb_30.bin").write_bytes(pickle.dumps(([b"x", b"y"], [Evil()]), protocol=2))
    assert main(["data", "write", "--task", "face", "--from", f"insightface:{tmp_path / 'faces'}",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "agedb_30.bin: refused: the pickle names posix.system" in err and len(err.strip().splitlines()) == 1
    assert not proof.exists() and not (tmp_path / "out").exists()


def test_a_cut_record_file_is_one_line(tmp_path, capsys):
    write_face_pack(tmp_path / "faces", [0, 1, 1], classes=2)
    rec = tmp_path / "faces" / "train.rec"
    rec.write_bytes(rec.read_bytes()[:-100])
    assert main(["data", "write", "--task", "face", "--from", f"insightface:{tmp_path / 'faces'}",
                 "--out", str(tmp_path / "out")]) == 2
    assert "train.rec: record at byte" in capsys.readouterr().err


def test_max_side_stores_large_images_resized_and_keeps_small_ones_as_they_are(tmp_path, capsys):
    build(tmp_path / "raw", "market1501")
    query = tmp_path / "raw" / "query"
    big = sorted(query.glob("*.jpg"))[0]
    out = io.BytesIO()
    Image.effect_noise((300, 150), 60).convert("RGB").save(out, format="JPEG", quality=90)  # a wide "photo"
    big.write_bytes(out.getvalue())
    small = sorted(query.glob("*.jpg"))[1].read_bytes()
    assert main(["data", "write", "--task", "person", "--from", f"market1501:{tmp_path / 'raw'}",
                 "--out", str(tmp_path / "out"), "--max-side", "64"]) == 0
    assert json.loads((tmp_path / "out" / "query" / "manifest.json").read_text())["max_side"] == 64
    stored = {}
    with tarfile.open(next((tmp_path / "out" / "query").glob("*.tar"))) as tar:
        for member in tar.getmembers():
            if member.name.endswith(".jpg"):
                meta = json.loads(tar.extractfile(member.name[:-3] + "json").read())
                stored[meta["file"]] = tar.extractfile(member).read()
    resized = Image.open(io.BytesIO(stored[f"query/{big.name}"]))
    assert resized.format == "JPEG" and resized.size == (64, 32)  # the longer side at 64, the aspect kept
    assert stored[f"query/{sorted(query.glob('*.jpg'))[1].name}"] == small  # 16 x 32 fits: its bytes as they were
    # an image that cannot be read is one line naming the dataset's file
    big.write_bytes(b"\xff\xd8 not a jpeg")
    assert main(["data", "write", "--task", "person", "--from", f"market1501:{tmp_path / 'raw'}",
                 "--out", str(tmp_path / "o2"), "--max-side", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"query/{big.name}: not a readable image" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o2").exists()  # nothing half-written is left


def test_synthetic_persons_are_a_query_gallery_task_with_cameras(tmp_path, capsys):
    assert main(["data", "write", "--task", "persons", "--from", "synth:persons", "--classes", "5", "--samples", "40",
                 "--image-size", "16", "--out", str(tmp_path / "out")]) == 0
    train, query, gallery = (samples(tmp_path / "out" / s) for s in ("train", "query", "gallery"))
    assert json.loads((tmp_path / "out" / "query" / "manifest.json").read_text())["protocol"] == "reid"
    assert {label for label, _ in train} == set(range(5)) and {m["camera"] for _, m in train} == {0, 1, 2, 3}
    # every test identity once per camera in the query; the gallery holds each in other cameras too
    assert sorted((m["identity"], m["camera"]) for _, m in query) == [(i, c) for i in range(5, 10) for c in range(4)]
    assert {m["identity"] for _, m in gallery} == set(range(5, 10))
    for identity in range(5, 10):
        assert len({m["camera"] for _, m in gallery if m["identity"] == identity}) >= 2
    assert all(label == m["identity"] for label, m in query + gallery)
