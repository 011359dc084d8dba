import json
import subprocess
import sys
from pathlib import Path

import pytest

from ufo.cli import main

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_init_info_export(tmp_path, capsys, tiny_config_file):
    ckpt = tmp_path / "s.safetensors"
    code, out, _ = run(capsys, "init", tiny_config_file, "--out", ckpt, "--set", "train.seed=5",
                       "--set", "model.ffns=all")  # every FFN: export takes another path below
    assert code == 0 and f"wrote {ckpt}" in out
    code, out, _ = run(capsys, "info", tiny_config_file)
    assert code == 0 and "supernet total" in out and "subnet face on path SSTT" in out
    code, out, _ = run(capsys, "export", ckpt, "--task", "person", "--out", tmp_path / "person",
                       "--path", "TTTT", "--format", "safetensors,torchscript")
    assert code == 0 and "verified against the supernet" in out
    config = json.loads((tmp_path / "person" / "config.json").read_text())
    assert config["ufo"]["path"] == "TTTT" and set(config["ufo"]["files"]) == {"safetensors", "torchscript"}
    code, out, _ = run(capsys, "export", ckpt, "--all-tasks", "--out", tmp_path / "all")
    assert code == 0 and sorted(p.name for p in (tmp_path / "all").iterdir()) == ["digits", "face", "person"]


@pytest.mark.parametrize("argv,message", [
    (["export", "{ckpt}", "--task", "cars", "--out", "{tmp}/o"], "unknown task 'cars'"),
    (["export", "{ckpt}", "--task", "face", "--path", "SS", "--out", "{tmp}/o"], "has 2 blocks"),
    (["export", "{tmp}/missing.safetensors", "--task", "face", "--out", "{tmp}/o"], "no such checkpoint"),
    (["export", "{ckpt}", "--task", "face", "--format", "pickle", "--out", "{tmp}/o"], "choose from"),
    (["export", "{ckpt}", "--all-tasks", "--path", "SSSS", "--out", "{tmp}/o"],
     "--path and --path-from apply to one --task"),
    (["init", "{cfg}", "--out", "{ckpt}"], "exists; pass --overwrite"),
    (["init", "{cfg}", "--out", "{tmp}/x.safetensors", "--set", "model.depth=2"], "tasks.face.path"),
    (["info", "{tmp}/none.yaml"], "no such config file"),
    (["search", "{on_path}", "--task", "face"], "holds only the FFNs on its configured paths"),
])
def test_errors_are_one_line(tmp_path, capsys, tiny_config_file, tiny_checkpoint, argv, message):
    from ufo.checkpoint import init_supernet, save_supernet
    from ufo.config import load_config

    cfg = load_config(tiny_config_file)
    on_path = save_supernet(init_supernet(cfg), cfg, tmp_path / "on_path.safetensors")
    argv = [a.format(ckpt=tiny_checkpoint, tmp=tmp_path, cfg=tiny_config_file, on_path=on_path) for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"ufo {argv[0]}: error: ") and message in err
    assert not (tmp_path / "o").exists()


def test_console_script_runs(tmp_path):
    ufo = Path(sys.executable).with_name("ufo")
    result = subprocess.run([ufo, "info", REPO / "configs" / "demo.yaml"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "subnet persons" in result.stdout


def test_info_prints_each_tasks_training_recipe(capsys, tiny_config_file):
    code, out, _ = run(capsys, "info", tiny_config_file, "--set", "tasks.person.sampler=pk", "--set",
                       "tasks.person.instances=4", "--set", "tasks.person.neck=bnneck", "--set",
                       "tasks.person.triplet.margin=0.3", "--set", "train.micro_batch_size=32",
                       "--set", "tasks.person.img_size=[16, 8]")
    assert code == 0
    assert "person       16x8 px, batch 32 = 8 identities x 4, cosface x1, triplet (margin 0.3) x1, bnneck" in out, out
    assert "  start: random (seed 3)" in out
    assert "digits       16x16 px, batch 32 random, cross-entropy" in out
