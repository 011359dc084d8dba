"""INT8 subnets: onnxruntime's static (calibrated) and dynamic quantisation of an exported subnet, verified
by the task's protocol against the fp32 graph, measured again by `ufo eval` on the INT8 file; and the
refusals (no calibration images, no eval set, a loss beyond the accepted drop: nothing written)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import onnx
import pytest
import torch

from tiny import TINY
from ufo.checkpoint import init_supernet, save_supernet
from ufo.cli import main
from ufo.config import config_from_dict
from ufo.data import open_source, task_loader, write_task_shards
from ufo.errors import ExportError
from ufo.export import export_subnet


def digits_checkpoint(root: Path, steps: int = 150) -> Path:
    """A supernet whose digits task is trained a little (plain torch, a few seconds): a classifier
    well above chance, so that what quantisation loses shows in its accuracy."""
    source = open_source("sklearn:digits", "digits", image_size=16)
    write_task_shards(source, "digits", root / "digits", kind="classification", maxcount=400, eval_fraction=0.2,
                      log=lambda _: None)
    raw = copy.deepcopy(TINY)
    raw["tasks"] = {"digits": {**raw["tasks"]["digits"], "shards": str(root / "digits" / "train"),
                               "eval_shards": str(root / "digits" / "eval")}}
    cfg = config_from_dict(raw, "t")
    model = init_supernet(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # the eval transform: no random crops, a classifier in a few dozen steps
    loader = task_loader(cfg, "digits", train=False, spec=cfg.tasks["digits"].shards, protocol="classification",
                         batch_size=64, num_workers=0)
    torch.manual_seed(0)
    step = 0
    while step < steps:
        for batch in loader:
            logits = model.forward_task(batch["images"], "digits", "TSSS")
            loss = torch.nn.functional.cross_entropy(logits, batch["labels"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    return save_supernet(model.eval(), cfg, root / "ckpt" / "supernet.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    return digits_checkpoint(tmp_path_factory.mktemp("int8"))


def quantized_ops(file: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(file)).graph.node}


def test_static_int8_is_calibrated_on_the_tasks_images_and_measured_by_its_protocol(trained, tmp_path, capsys):
    out = tmp_path / "subnet"
    assert main(["export", str(trained), "--task", "digits", "--out", str(out), "--format",
                 "safetensors,onnx-int8", "--int8", "static", "--calibration-samples", "100"]) == 0
    assert "int8 top1 drop" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.int8.onnx", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    check = config["ufo"]["verification"]["int8"]
    assert config["ufo"]["files"] == {"safetensors": "model.safetensors", "onnx-int8": "model.int8.onnx"}
    assert check["mode"] == "static" and check["calibration_samples"] == 100
    assert check["calibration"].endswith("digits/train") and check["metric"] == "top1"
    assert check["fp32"] > 0.5  # trained: the drop is measured on a classifier, not on chance
    assert check["drop"] == pytest.approx(check["fp32"] - check["int8"]) and check["drop"] <= 0.02
    # weights and activations are integers in the graph (QDQ), and it is a quarter of the fp32 size or so
    assert {"QuantizeLinear", "DequantizeLinear"} <= quantized_ops(out / "model.int8.onnx")
    # `ufo eval` runs the INT8 graph with onnxruntime: the number export verified
    assert main(["eval", str(out / "model.int8.onnx"), "--task", "digits",
                 "--shards", str(trained.parent.parent / "digits" / "eval")]) == 0
    report = json.loads((out / "eval-digits-model.int8.json").read_text())
    assert report["evaluated"] == "subnet model.int8.onnx (onnxruntime)"
    assert report["metrics"]["top1"] == pytest.approx(check["int8"], abs=1e-9)
    # and the fp32 subnet of the same directory, by timm: export's fp32 figure
    assert main(["eval", str(out), "--task", "digits", "--shards", str(trained.parent.parent / "digits" / "eval")]) == 0
    assert json.loads((out / "eval-digits.json").read_text())["metrics"]["top1"] == pytest.approx(check["fp32"])


def test_dynamic_int8_needs_no_calibration_and_bad_calibration_is_refused_leaving_nothing(trained, tmp_path):
    # auto (the default): a transformer's graph (it has a Softmax) is quantised dynamically
    result = export_subnet(trained, "digits", tmp_path / "dynamic", formats=["onnx", "onnx-int8"],
                           int8={"calibration": "/nowhere"}, log=lambda _: None)
    assert result.int8.mode == "dynamic" and result.int8.calibration is None and result.int8.drop <= 0.02
    assert "DynamicQuantizeLinear" in quantized_ops(tmp_path / "dynamic" / "model.int8.onnx")
    assert set(result.max_abs_diff) == {"onnx"}  # the fp32 graph, kept as asked, checked to 1e-5 first
    # calibrated on blank images, the activations' ranges are wrong for real ones: beyond the accepted
    # drop, the export fails and leaves nothing; an existing directory is left as it was
    blank = tmp_path / "blank"
    write_task_shards(open_source("synth:shapes", "digits", classes=10, samples=40, image_size=16, difficulty=0.0),
                      "digits", blank, kind="classification", maxcount=40, log=lambda _: None)
    with pytest.raises(ExportError, match=r"^digits: INT8 loses 0\.\d+ of top1 against fp32 \(> int8_max_drop "
                                          r"0\.02\); nothing was written to .*bad"):
        export_subnet(trained, "digits", tmp_path / "bad", formats=["onnx-int8"],
                      int8={"mode": "static", "calibration": str(blank), "samples": 8}, log=lambda _: None)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


@pytest.mark.parametrize("argv,message", [
    (["--int8", "static", "--calibration", "/nowhere/shards"],
     r"task digits: static INT8 needs calibration images and /nowhere/shards gives none here \(.*\); give "
     r"--calibration SHARDS, or --int8 dynamic"),
    (["--int8", "dynamic", "--int8-max-drop", "-1"], r"--int8-max-drop -1: give a loss >= 0"),
])
def test_int8_refusals_are_one_line(trained, tmp_path, capsys, argv, message):
    assert main(["export", str(trained), "--task", "digits", "--out", str(tmp_path / "o"), "--format", "onnx-int8",
                 *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_int8_without_an_eval_set_is_refused_unless_not_verified(trained, tmp_path):
    raw = copy.deepcopy(TINY)
    raw["model"]["ffns"] = "all"
    raw["tasks"]["digits"]["shards"] = str(trained.parent.parent / "digits" / "train")
    cfg = config_from_dict(raw, "t")
    ckpt = save_supernet(init_supernet(cfg), cfg, tmp_path / "ckpt" / "s.safetensors")
    with pytest.raises(ExportError, match=r"^task digits: INT8 is verified by the task's protocol on its eval sets "
                                          r"and tasks\.digits\.eval_shards is not set; give --no-verify to write it unmeasured$"):
        export_subnet(ckpt, "digits", tmp_path / "o", formats=["onnx-int8"], int8={"mode": "static"},
                      log=lambda _: None)
    result = export_subnet(ckpt, "digits", tmp_path / "o", formats=["onnx-int8"], int8={"mode": "static"},
                           verify=False, log=lambda _: None)
    assert result.int8 is None and (tmp_path / "o" / "model.int8.onnx").is_file()
    assert not (tmp_path / "o" / "model.onnx").exists()  # the fp32 graph was only the quantiser's input
