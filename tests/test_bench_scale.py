"""`ufo bench scale` (ufo/bench/scale.py)."""

import pytest


@pytest.mark.dist
def test_bench_scale_counts_what_each_placement_holds_and_sends(tiny_cfg):
    from ufo.bench.scale import bench_scale, format_scale_bench

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


@pytest.mark.dist
def test_bench_partial_fc_holds_a_kth_of_the_centres_per_rank(tiny_cfg):
    from ufo.bench.scale import bench_partial_fc, format_partial_fc_bench

    result = bench_partial_fc(tiny_cfg, classes=1001, ranks=(2,), steps=2, heads=("partial_fc",))
    (row,) = result["rows"]
    width = result["embedding_dim"]
    assert row["centres"] == 501 * width  # the larger shard of 1001 over 2 (a dense head: 1001 on each)
    assert row["weight_bytes"] == 501 * width * 4
    assert row["optimizer_bytes"] == 3 * row["weight_bytes"]  # fp32 master and Adam's moments, its own alone
    assert "partial_fc" in format_partial_fc_bench(result)
