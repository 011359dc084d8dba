import json

from PIL import Image

from ufo.cli import main
from ufo.data.inspect import inspect_shards

from shardtools import members_of, write_synth, write_tar


def test_counts_per_shard_and_class_and_a_contact_sheet(shards, tmp_path):
    report = inspect_shards(str(shards), sheet=tmp_path / "sheet.png")
    assert report.samples == 50 and [s.samples for s in report.shards] == [7] * 7 + [1]
    assert sum(report.classes.values()) == 50 and len(report.classes) == 5
    assert report.problems == [] and report.manifest["task"] == "shapes"
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.size[0] > 6 * 48 and sheet.size[1] >= 5 * 48


def test_finds_problems_in_shards_without_a_manifest(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    members = members_of(shards / "shapes-000000.tar")
    key_a, key_b = members[0][0].split(".")[0], members[3][0].split(".")[0]
    write_tar(bad / "x-000000.tar", [(n, b"junk" if n == f"{key_a}.png" else d) for n, d in members
                                     if n != f"{key_b}.cls"])
    data = (shards / "shapes-000001.tar").read_bytes()
    (bad / "x-000001.tar").write_bytes(data[: len(data) // 2 + 50])
    report = inspect_shards(str(bad / "x-{000000..000001}.tar"), sheet=None)
    text = "\n".join(report.problems)
    assert f"key {key_a}: undecodable image" in text and f"key {key_b}: missing label" in text
    assert "x-000001.tar: unreadable after key" in text
    assert report.manifest is None


def test_manifest_mismatch_is_a_problem(shards):
    (shards / "shapes-000007.tar").unlink()
    write_tar(shards / "shapes-000006.tar", members_of(shards / "shapes-000005.tar")[:6])
    text = "\n".join(inspect_shards(str(shards)).problems)
    assert "shapes-000007.tar: listed in the manifest but missing" in text
    assert "shapes-000006.tar: manifest says 7 samples, found 2" in text


def test_cli_write_and_inspect(tmp_path, capsys):
    out = tmp_path / "digits"
    assert main(["data", "write", "--task", "digits", "--from", "sklearn:digits", "--out", str(out),
                 "--maxcount", "500", "--image-size", "16", "--eval-fraction", "0.1"]) == 0
    assert main(["data", "inspect", str(out / "train"), "--sheet", str(tmp_path / "s.png"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 3)[-1])
    held = json.loads((out / "eval" / "manifest.json").read_text())["samples"]
    assert report["samples"] == 1797 - held and 170 < held < 190 and len(report["classes"]) == 10
    assert (tmp_path / "s.png").exists()


def test_cli_inspect_exits_1_on_problems(tmp_path, capsys):
    src = write_synth(tmp_path / "s", samples=5, maxcount=5)
    members = members_of(src / "shapes-000000.tar")
    write_tar(tmp_path / "b.tar", [(n, d) for n, d in members if not n.endswith(".cls")])
    assert main(["data", "inspect", str(tmp_path / "b.tar"), "--no-sheet"]) == 1
    assert "missing label" in capsys.readouterr().out


def test_cli_write_refuses_existing(shards, capsys):
    assert main(["data", "write", "--task", "shapes", "--from", "synth:shapes", "--out", str(shards)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_labels_outside_the_manifests_classes_are_a_problem(tmp_path):
    out = write_synth(tmp_path / "s", classes=5)
    meta = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**meta, "num_classes": 3}))
    text = "\n".join(inspect_shards(str(out)).problems)
    assert "labels outside the manifest's 3 classes (0..2): 3, 4" in text
