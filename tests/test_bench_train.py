"""`ufo bench train` (ufo/bench/train.py)."""

import pytest


@pytest.mark.dist
def test_bench_train_compares_with_a_plain_vit_and_measures_memory(tiny_cfg):
    from ufo.bench.train import bench_train, format_train_bench

    result = bench_train(tiny_cfg, steps=1, world=2, memory_config=tiny_cfg, stages=[3], checkpointing=(1,))
    assert result["supernet"]["params"] > result["plain"]["params"] > 0
    assert result["ratio"] == result["supernet"]["samples_per_s"] / result["plain"]["samples_per_s"]
    assert list(result["memory"]) == ["3, checkpointing 1"]  # (checkpointing 0 keys the row "3")
    assert len(result["memory"]["3, checkpointing 1"]["peak_bytes_per_rank"]) == 2
    assert "ZeRO 3, checkpointing 1: peak" in format_train_bench(result)
