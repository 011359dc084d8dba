"""A task's eval sets from its config and manifests, and `ufo eval` on a checkpoint, on the subnet
exported from it (timm alone) and on two ranks: the same numbers as the protocol computed by hand."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_train import LAUNCHER_ENV
from tiny import TINY
from ufo.checkpoint import init_supernet, load_supernet, read_checkpoint, save_supernet
from ufo.cli import main
from ufo.config import config_from_dict
from ufo.data import open_source, task_loader, write_task_shards
from ufo.errors import ConfigError, DataError
from ufo.data.shards import eval_sets
from ufo.evaluate import evaluate_task
from ufo.export import export_subnet
from ufo.metrics import reid


def persons(root: Path, classes: int = 6) -> dict[str, str]:
    """A small synthetic re-identification set: train, query and gallery splits, 4 cameras."""
    if not root.exists():
        source = open_source("synth:persons", "person", classes=classes, samples=4 * classes, image_size=16, seed=2)
        write_task_shards(source, "person", root, kind="retrieval", maxcount=40, log=lambda _: None)
    return {part: str(root / part) for part in ("train", "query", "gallery")}


def config(tmp_path: Path, **person) -> dict:
    raw = copy.deepcopy(TINY)
    raw["model"]["ffns"] = "all"
    raw["tasks"]["person"].update(person)
    return raw


def test_eval_sets_follow_the_config_and_the_shards_manifest(tmp_path):
    data = persons(tmp_path / "persons")
    (reid_set,) = eval_sets(config_from_dict(config(tmp_path, eval_shards={"query": data["query"],
                                                                          "gallery": data["gallery"]}), "t"),
                            "person")
    assert reid_set.protocol == "reid" and reid_set.parts == {"query": data["query"], "gallery": data["gallery"]}
    # one directory: its manifest names the protocol, and reid needs a query and a gallery
    with pytest.raises(DataError, match=r"^tasks\.person\.eval_shards: the reid protocol takes a query and a "):
        eval_sets(config_from_dict(config(tmp_path, eval_shards=data["gallery"]), "t"), "person")
    # named sets, each measured on its own, by the protocol the config names
    named = eval_sets(config_from_dict(config(tmp_path, eval_shards={"cam_a": data["query"], "cam_b": data["gallery"]},
                                              protocol="retrieval"), "t"), "person")
    assert [(s.name, s.protocol, s.key("recall@1")) for s in named] == [
        ("cam_a", "retrieval", "cam_a/recall@1"), ("cam_b", "retrieval", "cam_b/recall@1")]
    with pytest.raises(ConfigError, match=r"tasks\.digits\.protocol: the reid protocol measures embeddings"):
        raw = config(tmp_path)
        raw["tasks"]["digits"]["protocol"] = "reid"
        config_from_dict(raw, "t")


def test_a_reid_part_without_cameras_counts_its_samples_as_bad(tmp_path):
    source = open_source("synth:instances", "person", classes=3, samples=12, image_size=16)
    write_task_shards(source, "person", tmp_path / "plain", kind="retrieval", maxcount=40, log=lambda _: None)
    cfg = config_from_dict(config(tmp_path), "t")
    lines: list[str] = []
    loader = task_loader(cfg, "person", train=False, spec=str(tmp_path / "plain"), protocol="reid", batch_size=5,
                         log=lines.append)
    with pytest.raises(DataError, match=r"^task person: no sample of the epoch could be used \(.*\.tar: no integer "
                                        r"'camera' in its \.json\)$"):
        list(loader)
    assert "skipped 12 bad samples" in lines[-1]


@pytest.fixture(params=[16], ids=["square"])
def checkpoint_and_subnet(tmp_path, request):
    data = persons(tmp_path / "persons")
    cfg = config_from_dict(config(tmp_path, eval_shards={"query": data["query"], "gallery": data["gallery"]},
                                  img_size=request.param), "t")
    ckpt = save_supernet(init_supernet(cfg), cfg, tmp_path / "ckpt" / "supernet.safetensors")
    export_subnet(ckpt, "person", tmp_path / "subnet", log=lambda _: None)
    return ckpt, tmp_path / "subnet", data


def by_hand(ckpt: Path, data: dict[str, str]) -> dict[str, float]:
    """The reid protocol on the supernet's outputs for the task's configured path, read part by part."""
    checkpoint = read_checkpoint(ckpt)
    supernet = load_supernet(checkpoint).eval()
    parts = {}
    for role in ("query", "gallery"):
        outs, ids, cams = [], [], []
        for batch in task_loader(checkpoint.config, "person", train=False, spec=data[role], protocol="reid",
                                 batch_size=7):
            with torch.no_grad():
                outs.append(supernet.forward_task(batch["images"], "person", "STST"))
            ids.append(batch["labels"])
            cams.append(batch["meta"][:, 0])
        parts[role] = (torch.cat(outs), torch.cat(ids), torch.cat(cams))
    (q, qi, qc), (g, gi, gc) = parts["query"], parts["gallery"]
    return reid(q, qi, qc, g, gi, gc)


@pytest.mark.parametrize("checkpoint_and_subnet", [16, [16, 8]], ids=["square", "16x8"], indirect=True)
def test_ufo_eval_measures_a_checkpoint_and_its_deployed_subnet_alike(checkpoint_and_subnet, tmp_path, capsys):
    ckpt, subnet, data = checkpoint_and_subnet
    expected = by_hand(ckpt, data)
    assert expected["queries"] == 24 and 0 < expected["map"] < 1  # every query has a match in another camera
    assert main(["eval", str(ckpt), "--task", "person"]) == 0
    out = capsys.readouterr().out
    assert "by reid" in out and "rank1" in out and "minp" in out
    report = json.loads((ckpt.parent / "eval-person.json").read_text())
    assert report["path"] == "STST" and report["sets"]["person"]["protocol"] == "reid"
    for key in ("rank1", "rank5", "rank10", "map", "minp", "queries"):
        assert report["metrics"][key] == pytest.approx(expected[key], abs=1e-6), key
    # the exported subnet, loaded with timm alone: its own checkpoint's config has the eval shards
    # only in a training run's marker, so they are named here
    assert main(["eval", str(subnet), "--task", "person", "--shards", f"query={data['query']}",
                 "--shards", f"gallery={data['gallery']}", "--batch-size", "5"]) == 0
    deployed = json.loads((subnet / "eval-person.json").read_text())
    assert deployed["evaluated"] == "subnet" and deployed["path"] == "STST"
    for key in ("rank1", "map", "minp"):
        assert deployed["metrics"][key] == pytest.approx(expected[key], abs=1e-5), key
    # another protocol on the same images, chosen on the command line
    assert main(["eval", str(subnet), "--task", "person", "--shards", data["gallery"], "--protocol", "retrieval",
                 "--out", str(tmp_path / "r.json")]) == 0
    assert "recall@1" in json.loads((tmp_path / "r.json").read_text())["metrics"]


@pytest.mark.parametrize("argv,message", [
    (["--task", "face"], "is the subnet of task 'person', not 'face'"),
    ([ "--task", "person"], "no eval shards"),
    (["--task", "person", "--shards", "query=/nowhere/q"], "takes exactly the keys query and gallery"),
])
def test_ufo_eval_errors_are_one_line(checkpoint_and_subnet, capsys, argv, message):
    _, subnet, _ = checkpoint_and_subnet
    assert main(["eval", str(subnet), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.dist
def test_ufo_eval_on_two_ranks_equals_one_process(checkpoint_and_subnet, tmp_path):
    ckpt, _, data = checkpoint_and_subnet
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    torchrun = Path(sys.executable).with_name("torchrun")
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 400),
                          "-m", "ufo.cli", "eval", str(ckpt), "--task", "person", "--batch-size", "4",
                          "--out", str(tmp_path / "two.json")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 ranks" in run.stdout
    two = json.loads((tmp_path / "two.json").read_text())["metrics"]
    expected = by_hand(ckpt, data)
    for key in ("rank1", "map", "minp", "queries", "gallery"):
        assert two[key] == pytest.approx(expected.get(key, two[key]), abs=1e-6), key
    assert two["gallery"] == sum(json.loads((Path(data["gallery"]) / "manifest.json").read_text())[k]
                                 for k in ("samples",))


def test_evaluate_task_gathers_every_ranks_share(tmp_path):
    """Two ranks' shares, gathered by hand, measure what one process measures (the training loop's path)."""
    data = persons(tmp_path / "persons")
    cfg = config_from_dict(config(tmp_path, eval_shards={"query": data["query"], "gallery": data["gallery"]}), "t")
    supernet = init_supernet(cfg).eval()

    def forward(images):
        return supernet.forward_task(images, "person", "STST")

    second: list = []  # rank 1's share of each part, in the order the parts are read

    def keep(mine):
        second.append(mine)
        return None  # rank 1 does not measure

    def gather(mine):
        return [mine, second[gathered.pop(0)]]

    gathered = [0, 1]
    with torch.no_grad():
        whole = evaluate_task(cfg, "person", forward, batch_size=4)
        assert evaluate_task(cfg, "person", forward, rank=1, group_size=2, gather=keep, batch_size=4) is None
        merged = evaluate_task(cfg, "person", forward, rank=0, group_size=2, gather=gather, batch_size=4)
    assert len(second) == 2 and 0 < len(second[0][1]) < whole["queries"]  # rank 1 read a share, not all
    for key in ("rank1", "map", "minp", "queries", "gallery"):
        assert merged[key] == pytest.approx(whole[key], abs=1e-6), key


def test_ufo_eval_of_a_subnet_finds_its_runs_eval_shards_from_any_directory(tmp_path, monkeypatch, capsys):
    from test_train import tiny_run
    from ufo.train import train

    raw = tiny_run(tmp_path, ("digits",), steps=1, eval_every=0)
    raw["train"]["out_dir"] = "run"  # relative, as a config usually says: the run and export start in tmp_path
    monkeypatch.chdir(tmp_path)
    train(config_from_dict(raw, "test"), log=lambda _: None)
    assert main(["export", "run", "--task", "digits", "--out", "subnet", "--format", "safetensors"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "subnet"), "--task", "digits"]) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "subnet" / "eval-digits.json").read_text())
    assert report["evaluated"] == "subnet" and "top1" in report["metrics"]
