import pytest

from ufo.bench import bench_data, bench_jpeg, bench_model, format_data_bench, format_jpeg_bench, format_model_bench
from ufo.config import load_config
from ufo.data import open_source, write_task_shards


def test_bench_model_reports_both_models(tiny_cfg):
    result = bench_model(tiny_cfg, batch_per_task=2, steps=2, warmup=1)
    assert result["batch"] == 6 and result["paths"] == {t: tiny_cfg.path_of(t) for t in tiny_cfg.tasks}
    assert result["supernet_s_per_step"] > 0 and result["plain_s_per_step"] > 0
    assert result["ratio"] == result["supernet_s_per_step"] / result["plain_s_per_step"]
    assert "ratio supernet/plain" in format_model_bench(result)


def test_bench_data_reports_rates_and_ratios(tmp_path, tiny_config_file):
    overrides = []
    for task, num_classes in [("face", 20), ("person", 15), ("digits", 10)]:
        source = open_source("synth:instances", task, classes=num_classes, samples=24, image_size=16)
        write_task_shards(source, task, tmp_path / task, kind="retrieval", log=lambda _: None)
        overrides.append(f"tasks.{task}.shards={tmp_path / task}")
    cfg = load_config(tiny_config_file, overrides + ["train.micro_batch_size=4"])
    result = bench_data(cfg, workers=[0], batches=2)
    for task in cfg.tasks:
        t = result["tasks"][task]
        assert t["loader_samples_per_s"][0] > 0 and t["train_step_samples_per_s"] > 0
        assert t["ratio"][0] == t["loader_samples_per_s"][0] / t["train_step_samples_per_s"]
    assert "decoded samples/s" in format_data_bench(result)


def test_bench_data_times_photos_as_shipped_and_resized(tmp_path, tiny_cfg):
    result = bench_jpeg(tiny_cfg, tmp_path, side=64, samples=6, photo_size=(200, 120))
    shipped, fitted = result["sets"]["as shipped"], result["sets"]["max-side 64"]
    assert shipped["image_size"] == [200, 120] and fitted["image_size"] == [64, 38]  # stored by --max-side
    assert fitted["bytes_per_image"] < shipped["bytes_per_image"]
    for s in (shipped, fitted):
        assert s["decode_ms"] > 0 and s["augment_ms"] > 0 and s["loader_samples_per_s_per_core"] > 0
    assert result["cores_per_v100"] == result["vit_b_v100_samples_per_s"] / fitted["loader_samples_per_s_per_core"]
    assert "max-side 64" in format_jpeg_bench(result)
    # a config without shards still gets the JPEG figures; the loader part says what it skipped
    assert "no task has shards (face, person, digits)" in format_data_bench(bench_data(tiny_cfg, workers=[0]))


@pytest.mark.dist
def test_bench_train_compares_with_a_plain_vit_and_measures_memory(tiny_cfg):
    from ufo.bench import bench_train, format_train_bench

    result = bench_train(tiny_cfg, steps=1, world=2, memory_config=tiny_cfg, stages=[3])
    assert result["supernet"]["params"] > result["plain"]["params"] > 0
    assert result["ratio"] == result["supernet"]["samples_per_s"] / result["plain"]["samples_per_s"]
    assert len(result["memory"][3]["peak_bytes_per_rank"]) == 2
    assert "ZeRO 3: peak" in format_train_bench(result)


def test_bench_weighting_trains_each_strategy_and_compares(tmp_path, capsys):
    import yaml

    from test_train import tiny_run
    from ufo.cli import main

    raw = tiny_run(tmp_path, ("face", "digits"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    args = ["bench", "weighting", str(config), "--strategies", "equal,dwa", "--steps", "2",
            "--out", str(tmp_path / "bench"), "--set", "model.depth=2", "--set", "tasks.face.path=ST",
            "--set", "tasks.digits.path=ST"]
    assert main(args) in (0, None)
    text = capsys.readouterr().out
    assert "equal" in text and "dwa" in text and "recall@1" in text and "top1" in text
    assert (tmp_path / "bench" / "weighting.png").stat().st_size > 1000
    result = __import__("json").loads((tmp_path / "bench" / "weighting.json").read_text())
    assert result["strategies"]["equal"]["final_weight"] == {"face": 0.5, "digits": 0.5}
    assert set(result["strategies"]["dwa"]["eval"]) == {"face", "digits"}
    assert main(args) == 2  # the runs are there: refused, nothing replaced
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--strategies", "equal", "--overwrite"]) in (0, None)


def test_bench_elastic_compares_inherited_and_scratch_sizes(tmp_path):
    from test_train import tiny_run
    from ufo.bench import bench_elastic, format_elastic_bench
    from ufo.config import config_from_dict

    cfg = config_from_dict(tiny_run(tmp_path, ("face", "digits")), "test")
    result = bench_elastic(cfg, steps=2, out=tmp_path / "bench", log=lambda _: None)
    for task in ("face", "digits"):
        sizes = result["tasks"][task]["sizes"]
        assert [s["fraction"] for s in sizes] == [0.25, 0.5, 1.0]
        assert sizes[0]["params"] < sizes[1]["params"] < sizes[2]["params"]
        assert sizes[2]["depth"] == 4 and sizes[2]["mlp_ratio"] == 2.0
        assert all(0.0 <= s["elastic"] <= 1.0 and 0.0 <= s["scratch"] <= 1.0 for s in sizes)
    assert "recall@1" in format_elastic_bench(result) and (tmp_path / "bench" / "elastic.json").is_file()


@pytest.mark.dist
def test_bench_scale_counts_what_each_placement_holds_and_sends(tiny_cfg):
    from ufo.bench import bench_scale, format_scale_bench

    result = bench_scale(tiny_cfg, task_counts=(2,), ranks_per_task=1, steps=2, projections={"tiny": tiny_cfg})
    rows = {r["placement"]: r for r in result["rows"]}
    # the tasks' paths take FFN-shared in the same blocks: a sharded rank holds exactly the plain ViT
    # (model.ffns: on_path builds no FFN off the paths), a replicated one every task's FFN-task besides
    assert rows["plain"]["params"] == rows["task_sharded"]["params"] < rows["replicated"]["params"]
    # one rank per task: a task's gradients go nowhere, so task_sharded sends about what the plain ViT does
    assert 0 < rows["task_sharded"]["sent_bytes"] < 1.1 * rows["plain"]["sent_bytes"] < rows["replicated"]["sent_bytes"]
    # (ZeRO-1 gives both placements the same optimizer share: (S + T P) / (k T) = S / W + P / k)
    assert all(r["optimizer_bytes"] > 0 for r in rows.values())
    assert rows["plain"]["ratio"]["param_bytes"] == 1.0
    projected = result["projected"]["tiny"]
    assert projected["memory_ratio"]["task_sharded"] < projected["memory_ratio"]["replicated"]
    assert "task_sharded" in format_scale_bench(result)


def test_bench_ufo_trains_each_setting_as_a_run_and_compares_them(tmp_path, capsys):
    import json

    from mlflow import MlflowClient
    from timm.models.vision_transformer import VisionTransformer

    from test_train import tiny_run
    from ufo.checkpoint import read_checkpoint
    from ufo.cli import main
    from ufo.config import config_from_dict
    from ufo.model import subnet_args

    raw = tiny_run(tmp_path, ("person", "digits"))
    config = tmp_path / "c.yaml"
    config.write_text(__import__("yaml").safe_dump(raw))
    out = tmp_path / "bench"
    assert main(["bench", "ufo", str(config), "--steps", "3", "--out", str(out),
                 "--settings", "alone,hard,learned,learned_both"]) in (0, None)
    text = capsys.readouterr().out
    assert "person rank1" in text and "digits top1" in text and "task alone (plain ViT)" in text
    assert "once settled, a learned step runs at" in text
    result = json.loads((out / "ufo.json").read_text())
    assert set(result["table"]) == {"alone", "hard", "learned", "learned_both"}
    assert all(set(row) == {"person", "digits"} for row in result["table"].values())
    # a task alone is a plain ViT of its subnet's size: one task, FFN-shared only, and its head
    alone = read_checkpoint(out / "alone-digits")
    assert list(alone.config.tasks) == ["digits"] and alone.config.path_of("digits") == "SSSS"
    cfg = config_from_dict(raw, "t")
    plain = VisionTransformer(**subnet_args(cfg, "digits"))
    assert sum(t.numel() for t in alone.state_dict.values()) == sum(p.numel() for p in plain.parameters())
    assert result["settings"]["hard"]["tasks"]["person"]["path"] == "SSSS"
    assert result["settings"]["learned_both"]["open_blocks"] == {"person": 4, "digits": 4}  # never decided
    assert (out / "ufo.png").stat().st_size > 1000
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("ufo-bench-bench")
                                                             .experiment_id])}
    assert {"bench-ufo", "hard", "learned", "alone-person"} <= set(runs)
    assert runs["bench-ufo"].data.metrics["hard/person/rank1"] == result["table"]["hard"]["person"]


@pytest.mark.dist
def test_bench_ufo_runs_each_setting_under_a_launcher(tmp_path):
    import json
    import os

    from test_train import LAUNCHER_ENV, tiny_run
    from ufo.bench import bench_ufo
    from ufo.config import config_from_dict

    raw = tiny_run(tmp_path, ("person", "digits"))
    cfg = config_from_dict(raw, "t")
    saved = {k: os.environ.pop(k) for k in LAUNCHER_ENV if k in os.environ}  # an in-process run's, not ours
    try:
        result = bench_ufo(cfg, 2, tmp_path / "bench", ["fixed"], log=lambda _: None,
                           launcher=f"torchrun --nproc_per_node 2 --master_port {29700 + os.getpid() % 200}")
    finally:
        os.environ.update(saved)
    assert (tmp_path / "bench" / "fixed.yaml").is_file()  # the setting's config, as the launcher ran it
    marker = json.loads(next((tmp_path / "bench" / "fixed" / "checkpoints").glob("step*/ufo.json")).read_text())
    assert marker["world_size"] == 2
    assert set(result["table"]["fixed"]) == {"person", "digits"}
