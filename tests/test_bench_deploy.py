"""`ufo bench deploy` (ufo/bench/deploy.py): every row measured as `ufo eval` measures it, on real exports,
student runs and onnxruntime sessions."""

from __future__ import annotations

import json

import pytest

from ufo.bench.deploy import default_students, format_deploy_bench, parse_student
from ufo.errors import UfoError


def test_bench_deploy_tabulates_every_way_to_deploy_a_task(tmp_path):
    from test_train import tiny_run
    from ufo.bench.deploy import bench_deploy
    from ufo.checkpoint import init_supernet, save_supernet
    from ufo.config import config_from_dict
    from ufo.evaluate import eval_target

    raw = tiny_run(tmp_path, ("digits",))
    raw["model"]["ffns"] = "all"
    raw["tasks"]["digits"]["elastic"] = {"num_heads": [1]}  # trained at one head of two: no "(untrained)"
    cfg = config_from_dict(raw, "t")
    ckpt = save_supernet(init_supernet(cfg), cfg, tmp_path / "s.safetensors")
    out = tmp_path / "bench"
    result = bench_deploy(ckpt, "digits", out, ["test_vit:depth=1,embed_dim=8,num_heads=1,patch_size=4"], steps=2,
                          log=lambda _: None, track_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    rows = result["rows"]
    assert list(rows)[:4] == ["supernet (task path)", "subnet", "subnet depth 2 (untrained)", "subnet heads 1"]
    assert {"student1-distilled", "student1-alone"} <= set(rows) and list(rows)[-1] == f"{result['best']} INT8 (dynamic)"
    assert rows["subnet"]["metric"] == pytest.approx(rows["supernet (task path)"]["metric"])  # the same model
    assert rows["subnet heads 1"]["params"] < rows["subnet"]["params"]
    assert rows["student1-alone"]["params"] == rows["student1-distilled"]["params"] < rows["subnet"]["params"]
    shards = raw["tasks"]["digits"]["eval_shards"]
    for name in ("subnet", "student1-distilled"):  # what `ufo eval` says of the exported graph
        onnx = f"{rows[name]['dir']}/model.onnx"
        assert rows[name]["metric"] == pytest.approx(eval_target(onnx, "digits", shards, log=lambda _: None)["primary"])
        assert 0 < rows[name]["ms_b1"] and 0 < rows[name]["ms_b32"]
    assert "logits_weight: 1.0" in (out / "student1-distilled" / "config.yaml").read_text()
    assert "logits_weight: 0.0" in (out / "student1-alone" / "config.yaml").read_text()  # trained alone
    assert result["distillation_beats_alone"]["test_vit:depth=1,embed_dim=8,num_heads=1,patch_size=4"] == \
        pytest.approx(rows["student1-distilled"]["metric"] - rows["student1-alone"]["metric"])
    assert json.loads((out / "deploy.json").read_text())["best"] == result["best"]
    assert (out / "deploy.png").stat().st_size > 1000 and "INT8" in format_deploy_bench(result)
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("ufo-bench-deploy").experiment_id])
    assert run.data.metrics["subnet/metric"] == pytest.approx(rows["subnet"]["metric"])


def test_student_specs_and_defaults():
    assert parse_student("resnet18") == ("resnet18", {})
    assert parse_student("vit_tiny_patch16_224:depth=3,embed_dim=64,mlp_ratio=2.5") == \
        ("vit_tiny_patch16_224", {"depth": 3, "embed_dim": 64, "mlp_ratio": 2.5})
    with pytest.raises(UfoError, match=r"^--student resnet18:depth: give NAME or NAME:key=value"):
        parse_student("resnet18:depth")

    class M:
        depth, embed_dim, num_heads, patch_size, mlp_ratio = 6, 128, 4, 4, 2.0

    class C:
        model = M

    assert default_students(C) == [
        "vit_tiny_patch16_224:depth=3,embed_dim=64,num_heads=2,patch_size=4,mlp_ratio=2",
        "vit_tiny_patch16_224:depth=3,embed_dim=32,num_heads=2,patch_size=4,mlp_ratio=2"]
