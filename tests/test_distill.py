"""Distillation runs (ufo/distill.py, ufo/model/student.py): a timm student trained on one task from the
task's subnet or the supernet's path, by real DeepSpeed engines on 2 ranks: one step equals one process
(the student's gradients exact), resume equals the straight run, the exported student reloaded by timm
alone equals the trained one, `ufo eval` measures it; the distillation losses by hand; one-line refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from test_train import tiny_run
from tiny import TINY
from ufo.checkpoint import init_supernet, read_checkpoint, save_supernet
from ufo.cli import main
from ufo.config import config_from_dict
from ufo.distill import build_student, load_student
from ufo.errors import UfoError
from ufo.layout import make_layout
from ufo.model import TaskSlice
from ufo.model.losses import kd_embedding, kd_logits, kd_relation

VIT = {"student": "test_vit", "student_args": {"depth": 2, "embed_dim": 16, "num_heads": 2, "patch_size": 4}}


def teacher_and_data(root: Path) -> tuple[Path, dict]:
    """A supernet checkpoint of the tiny config's tasks (the teacher) and their shards."""
    raw = tiny_run(root, ("face", "digits"))
    raw["model"]["ffns"] = "all"
    cfg = config_from_dict(raw, "teacher")
    return save_supernet(init_supernet(cfg), cfg, root / "teacher" / "supernet.safetensors"), raw


def distill_run(raw: dict, teacher: Path, task: str, out: Path, student: dict = VIT, **train) -> dict:
    """The teacher's run config as a distillation run of `task`: one plain SGD step by default."""
    run = copy.deepcopy(raw)
    run["tasks"] = {task: run["tasks"][task]}
    run["distill"] = {"teacher": str(teacher), **student, "temperature": 2.0, "relation_weight": 3.0}
    run["train"].update({"out_dir": str(out), "steps": 1, "optimizer": "sgd", "momentum": 0.0, "lr": 0.5,
                         "warmup_steps": 0, "min_lr_ratio": 1.0, "weight_decay": 0.0, "gradient_clipping": 0.0,
                         "eval_every": 0, **train})
    return run


def reference_step(raw: dict, world: int) -> dict[str, torch.Tensor]:
    """One SGD step of one process on every rank's batch: each rank's rows summed (the relation loss
    relates a rank's own rows, as fast-reid relates each GPU's), over the step's samples."""
    from ufo.train import _make_loader

    cfg = config_from_dict(raw, "reference")
    (task,) = cfg.tasks
    layout = make_layout(cfg, world)
    batches = [next(iter(_make_loader(cfg, layout, rank))) for rank in range(world)]
    student = build_student(cfg, say=lambda _: None).train()
    total = sum(len(b["labels"]) for b in batches)
    loss = sum(student(b["images"], [TaskSlice(task, "", len(b["labels"]))], b["labels"], reduction="sum")[0]
               for b in batches) / total
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= cfg.train.lr * p.grad
    return dict(student.named_parameters())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One pair of ranks trains: a step of each task kind (ZeRO 1 and 3), and a 4-step run straight and in
    two halves (the second resumes the first's checkpoint)."""
    root = tmp_path_factory.mktemp("distill")
    teacher, raw = teacher_and_data(root)
    configs = {  # a constant lr: the first half's schedule is the straight run's
        "digits": distill_run(raw, teacher, "digits", root / "digits"),
        "face": distill_run(raw, teacher, "face", root / "face"),
        "straight": distill_run(raw, teacher, "digits", root / "straight", steps=4, lr=0.05),
        "half": distill_run(raw, teacher, "digits", root / "resumed", steps=2, lr=0.05),
        "resumed": distill_run(raw, teacher, "digits", root / "resumed", steps=4, lr=0.05),
    }
    configs["face"]["deepspeed"] = {"zero_stage": 3}
    configs["digits"]["deepspeed"] = {"zero_stage": 1}
    out = root / "ranks"
    return root, teacher, raw, configs, dict(zip(configs, _train(configs, out)))


def _train(configs: dict, out: Path) -> list[list[dict]]:
    raws = list(configs.values())
    import os

    import torch.multiprocessing as mp

    from test_train import _rank_main

    port = 29000 + (os.getpid() + 411) % 1000
    mp.start_processes(_rank_main, args=(2, port, raws, str(out)), nprocs=2, start_method="spawn")
    return [[torch.load(out / str(i) / f"params{r}.pt") for r in range(2)] for i in range(len(raws))]


@pytest.mark.dist
@pytest.mark.parametrize("task", ["digits", "face"])
def test_a_two_rank_distillation_step_equals_one_process(runs, task):
    _, _, _, configs, trained = runs
    expected = reference_step(configs[task], 2)
    replicas = trained[task]
    moved = 0
    for name, want in expected.items():
        for rank, params in enumerate(replicas):
            diff = (params[name] - want.detach()).abs().max().item()
            assert diff < 2e-5, f"{name} on rank {rank} differs by {diff}"
        moved += int((want.grad.abs().max() > 0).item())
    assert moved > len(expected) // 2
    assert not any(name.startswith(("_teacher", "teacher")) for name in replicas[0])  # never trained or saved
    ckpt = read_checkpoint(configs[task]["train"]["out_dir"])
    for name, want in expected.items():
        assert (ckpt.state_dict[name] - want.detach()).abs().max().item() < 2e-5, name


@pytest.mark.dist
def test_a_resumed_distillation_equals_the_straight_run_and_its_export_is_a_timm_model(runs, tmp_path, capsys):
    root, _, _, configs, trained = runs
    straight, resumed = trained["straight"], trained["resumed"]
    for name, want in straight[0].items():
        assert torch.equal(resumed[0][name], want), name
    # the exported student: timm alone rebuilds it, and it gives what the trained student gives
    assert main(["export", str(root / "straight"), "--task", "digits", "--out", str(tmp_path / "student"),
                 "--format", "safetensors,onnx"]) == 0
    assert "student test_vit" in capsys.readouterr().out
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["architecture"] == "test_vit" and config["ufo"]["student"]["architecture"] == "test_vit"
    vit = timm.create_model(config["architecture"], **config["model_args"])
    vit.load_state_dict(load_file(tmp_path / "student" / "model.safetensors"), strict=True)
    student = load_student(read_checkpoint(root / "straight"))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert (vit.eval()(x) - student.forward_task(x, "digits")).abs().max() <= 1e-5
    assert config["ufo"]["verification"]["max_abs_diff"]["onnx"] <= 1e-5
    # `ufo eval` measures the student's run and its export alike
    eval_shards = configs["straight"]["tasks"]["digits"]["eval_shards"]
    assert main(["eval", str(root / "straight"), "--task", "digits"]) == 0
    assert main(["eval", str(tmp_path / "student"), "--task", "digits", "--shards", eval_shards]) == 0
    run = json.loads((root / "straight" / "eval-digits.json").read_text())
    exported = json.loads((tmp_path / "student" / "eval-digits.json").read_text())
    assert run["evaluated"].startswith("student test_vit") and run["metrics"]["top1"] == exported["metrics"]["top1"]


def test_a_cnn_student_with_batchnorm_trains_resumes_and_exports(tmp_path):
    """A CNN (timm's test_efficientnet: BatchNorm, `classifier`) from an exported subnet teacher, in one
    process: two steps, then two more resumed, then exported; BatchNorm statistics checkpointed."""
    teacher, raw = teacher_and_data(tmp_path)
    from ufo.export import export_subnet

    export_subnet(teacher, "face", tmp_path / "face-subnet", log=lambda _: None)
    student = {"student": "test_efficientnet", "student_args": {}}
    run = distill_run(raw, tmp_path / "face-subnet", "face", tmp_path / "cnn", student, steps=2, lr=0.01)
    from ufo.train import train

    first = train(config_from_dict(run, "t"), log=lambda _: None)
    assert first.step == 2
    run["train"]["steps"] = 3
    lines: list[str] = []
    assert train(config_from_dict(run, "t"), log=lines.append).step == 3
    assert any("resum" in line for line in lines), lines
    ckpt = read_checkpoint(tmp_path / "cnn")
    assert any(k.endswith("running_mean") for k in ckpt.state_dict)
    result = export_subnet(ckpt, "face", tmp_path / "cnn-out", formats=["safetensors", "onnx"], log=lambda _: None)
    assert result.max_abs_diff["safetensors"] <= 1e-5 and result.max_abs_diff["onnx"] <= 1e-5
    config = json.loads((tmp_path / "cnn-out" / "config.json").read_text())
    assert config["model_args"]["num_classes"] == 24  # the teacher's embedding width: face's embedding_dim
    assert "classifier.weight" in load_file(tmp_path / "cnn-out" / "model.safetensors")
    from ufo.export import export_all_tasks
    from ufo.search import search_path

    (every,) = export_all_tasks(ckpt, tmp_path / "all", log=lambda _: None)  # its one task
    assert every.out_dir == tmp_path / "all" / "face" and every.max_abs_diff["safetensors"] <= 1e-5
    with pytest.raises(UfoError, match=r"is a distilled student \(test_efficientnet\): it has no paths"):
        search_path(ckpt, "face")


def test_the_distillation_losses_by_hand():
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    T = 3.0
    by_hand = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean") * T * T  # timm, DeiT
    assert kd_logits(s, t, T) == pytest.approx(by_hand.item(), rel=1e-5)
    assert kd_logits(s, t, T, "sum") == pytest.approx(5 * by_hand.item(), rel=1e-5)
    cos = F.cosine_similarity(s, t, dim=-1)
    assert kd_embedding(s, t) == pytest.approx((2 - 2 * cos).mean().item(), rel=1e-5)
    assert kd_embedding(t, t).item() == pytest.approx(0.0, abs=1e-6) and kd_relation(t, t).item() == pytest.approx(0.0, abs=1e-6)

    def pkt(output, target, eps=1e-7):  # fast-reid's pkt_loss, as its FastDistill trainer computes it
        o, g = F.normalize(output, dim=1), F.normalize(target, dim=1)
        os_, ts = (o @ o.T + 1) / 2, (g @ g.T + 1) / 2
        os_, ts = os_ / os_.sum(1, keepdim=True), ts / ts.sum(1, keepdim=True)
        return torch.mean(ts * torch.log((ts + eps) / (os_ + eps)))

    assert kd_relation(s, t).item() == pytest.approx(5 * pkt(s, t).item(), rel=1e-5)  # per row, not per entry


@pytest.mark.parametrize("argv,message", [
    (["--student", "resnet51"], r"distill\.student: 'resnet51' is not a timm model \(did you mean .*resnet50"),
    (["--student", "vit_tiny_patch16_224", "--set", "distill.student_args={img_size: 224}"],
     r"distill\.student: vit_tiny_patch16_224 cannot take task digits's 16x16 images \(AssertionError: "),
    (["--student", "test_vit", "--task", "shapes"], r"--task shapes: the teacher's config has no such task"),
])
def test_distill_refusals_are_one_line(tmp_path, capsys, argv, message):
    import re

    raw = copy.deepcopy(TINY)
    cfg = config_from_dict(raw, "t")
    teacher = save_supernet(init_supernet(cfg), cfg, tmp_path / "t.safetensors")
    task = [] if "--task" in argv else ["--task", "digits"]
    assert main(["distill", str(teacher), *task, *argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_student_starts_from_timms_released_weights_by_name_offline(tmp_path):
    """`distill.pretrained: true`: timm's own loader finds the student's released weights in the Hugging
    Face cache (offline, as on a cluster node), resampled to the task's input size; not in the cache:
    one line naming the key."""
    import subprocess
    import sys

    from test_pretrained import offline_hub
    from test_train import REPO

    name = "test_vit.r160_in1k"
    env = offline_hub(tmp_path / "hf", name)
    teacher, raw = teacher_and_data(tmp_path)
    run = distill_run(raw, teacher, "digits", tmp_path / "run", {"student": name, "pretrained": True})
    (tmp_path / "c.json").write_text(json.dumps(run))
    run["distill"]["student"] = "test_vit2.r160_in1k"  # a student whose weights are not in the cache
    (tmp_path / "missing.json").write_text(json.dumps(run))
    probe = ("import json, sys; from ufo.config import config_from_dict; from ufo.distill import student_backbone\n"
             "from ufo.errors import ConfigError\n"
             "b = student_backbone(config_from_dict(json.load(open(sys.argv[1])), 't'))\n"
             "print(json.dumps([float(b.blocks[0].attn.qkv.weight[0, 0]), list(b.pos_embed.shape)]))\n"
             "try:\n    student_backbone(config_from_dict(json.load(open(sys.argv[2])), 't'))\n"
             "except ConfigError as e:\n    print(e)\n")
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "c.json"), str(tmp_path / "missing.json")],
                          capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    blob = tmp_path / "hf" / "hub" / f"models--timm--{name}" / "snapshots" / ("0" * 40) / "model.safetensors"
    found, missing = done.stdout.strip().splitlines()[-2:]
    value, shape = json.loads(found)
    assert value == pytest.approx(load_file(blob)["blocks.0.attn.qkv.weight"][0, 0].item(), abs=1e-7)
    assert shape == [1, 2, 64]  # 10 x 10 patches of 160 px resampled to the task's 16 px: one, and the class token
    assert missing.startswith("distill.pretrained: timm could not load test_vit2.r160_in1k's weights (")
