"""`ufo bench elastic` (ufo/bench/elastic.py)."""


def test_bench_elastic_compares_inherited_and_scratch_sizes(tmp_path):
    from test_train import tiny_run
    from ufo.bench.elastic import bench_elastic, format_elastic_bench
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
