"""`ufo bench data` (ufo/bench/data.py)."""

from ufo.bench.data import bench_data, bench_jpeg, format_data_bench, format_jpeg_bench
from ufo.config import load_config
from ufo.data import open_source, write_task_shards


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
