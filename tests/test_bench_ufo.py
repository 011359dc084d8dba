"""`ufo bench ufo` (ufo/bench/ufo.py)."""

import pytest


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
    from ufo.bench.ufo import bench_ufo
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
