"""`ufo bench model` (ufo/bench/model.py)."""

from ufo.bench.model import bench_model, format_model_bench


def test_bench_model_reports_both_models_eager_and_compiled(tiny_cfg):
    result = bench_model(tiny_cfg, batch_per_task=2, steps=2, warmup=1, compile=True)
    assert result["batch"] == 6 and result["paths"] == {t: tiny_cfg.path_of(t) for t in tiny_cfg.tasks}
    assert result["supernet_s_per_step"] > 0 and result["plain_s_per_step"] > 0
    assert result["ratio"] == result["supernet_s_per_step"] / result["plain_s_per_step"]
    compiled = result["compiled"]
    assert compiled["ratio"] == compiled["supernet_s_per_step"] / compiled["plain_s_per_step"]
    assert result["compile_speedup"] == result["supernet_s_per_step"] / compiled["supernet_s_per_step"]
    text = format_model_bench(result)
    assert "ratio supernet/plain" in text and "compiled (train.compile): supernet" in text
