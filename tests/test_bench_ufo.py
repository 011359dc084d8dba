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

    raw = tiny_run(tmp_path, ("face", "person", "digits"))
    config = tmp_path / "c.yaml"
    config.write_text(__import__("yaml").safe_dump(raw))
    out = tmp_path / "bench"
    assert main(["bench", "ufo", str(config), "--tasks", "person,nobody", "--out", str(out)]) == 2
    assert "--tasks: nobody: not a task of the config (its tasks: digits, face, person)" in capsys.readouterr().err
    assert main(["bench", "ufo", str(config), "--steps", "3", "--out", str(out), "--tasks", "person,digits",
                 "--eval-every", "2", "--settings", "alone,hard,learned,learned_both"]) in (0, None)
    text = capsys.readouterr().out
    assert "person rank1" in text and "digits top1" in text and "task alone (plain ViT)" in text
    assert "each task at its best of the evaluations every 2 steps" in text
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
    best = json.loads((out / "hard" / "checkpoints" / "best.json").read_text())
    for task, cell in result["settings"]["hard"]["tasks"].items():  # each task at its best step of 2 and 3
        assert cell["best_step"] == best[task]["step"] in (2, 3) and cell["primary"] == best[task]["value"]
        assert cell["primary"] >= cell["last"]
    # the run's diagnostics, read every step of 3 (ten readings a run at least): shares of the shared
    # gradient, by the step's weights; speed = the last step's loss / the first's (a tenth of 3 steps)
    diagnosis = result["settings"]["hard"]["diagnosis"]
    history = [json.loads(line) for line in (out / "hard" / "history.jsonl").read_text().splitlines()]
    assert sum("shared_grad_norm" in h for h in history) == 3 and set(diagnosis["cosine"]) == {"digits-person"}
    assert abs(sum(diagnosis["share"].values()) - 1) < 1e-9
    assert diagnosis["speed"]["person"] == history[-1]["loss"]["person"] / history[0]["loss"]["person"]
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


def test_seeds_and_lrs_make_a_cell_of_means_at_each_settings_best_lr():
    """`--seeds`/`--lrs` bookkeeping on given results: runs named per lr and seed, each setting at its
    best lr (mean over its tasks and seeds), mean and standard deviation per cell, a difference from
    the task alone beyond both spreads marked, a gradient-norm spike flagged."""
    import statistics

    from ufo.bench.ufo import SPIKE, _ufo_table, format_ufo_bench, repeated, spike

    base = {"train": {"lr": 1e-3, "seed": 3, "out_dir": "/o/hard"}, "tracking": {"run_name": "hard"}}
    runs = repeated({"hard": base}, seeds=2, lrs=[5e-4, 1e-3])
    assert list(runs) == ["hard-lr0.0005-seed0", "hard-lr0.0005-seed1", "hard-lr0.001-seed0", "hard-lr0.001-seed1"]
    assert runs["hard-lr0.001-seed1"]["train"] == {"lr": 1e-3, "seed": 4, "out_dir": "/o/hard-lr0.001-seed1"}
    assert list(repeated({"hard": base})) == ["hard"]  # one seed, the config's lr: the names of before

    def entry(base, lr, seed, **primary):
        return {"base": base, "lr": lr, "seed": seed, "s_per_step": 1.0, "late_samples_per_s": 1.0, "spike": 1.0,
                "tasks": {t: {"primary": v, "path": "SS"} for t, v in primary.items()}}

    settings = {
        "alone-a-s0": entry("alone-a", 1e-3, 0, a=0.80), "alone-a-s1": entry("alone-a", 1e-3, 1, a=0.82),
        "alone-b-s0": entry("alone-b", 1e-3, 0, b=0.50), "alone-b-s1": entry("alone-b", 1e-3, 1, b=0.52),
        "hard-lo-s0": entry("hard", 5e-4, 0, a=0.60, b=0.40), "hard-lo-s1": entry("hard", 5e-4, 1, a=0.62, b=0.42),
        "hard-hi-s0": entry("hard", 1e-3, 0, a=0.20, b=0.50), "hard-hi-s1": entry("hard", 1e-3, 1, a=0.30, b=0.60),
    }
    settings["hard-hi-s1"]["spike"] = 40.0
    r = {"steps": 10, "tasks": ["a", "b"], "metrics": {"a": "top1", "b": "top1"}, "settings": settings, "seeds": 2,
         "lrs": [5e-4, 1e-3]}
    r.update(_ufo_table(r))
    assert r["chosen_lr"] == {"alone-a": 1e-3, "alone-b": 1e-3, "hard": 5e-4}  # 0.51 beats 0.40
    assert r["table"]["hard"] == {"a": statistics.mean([0.60, 0.62]), "b": statistics.mean([0.40, 0.42])}
    assert abs(r["table_std"]["hard"]["a"] - statistics.stdev([0.60, 0.62])) < 1e-12
    assert r["beyond_spread"]["hard"] == {"a": True, "b": True}  # 0.61 vs 0.81 and 0.41 vs 0.51, spreads ~0.014
    assert r["unstable"] == {"hard-hi-s1": 40.0} and SPIKE <= 40.0
    text = format_ufo_bench(r)
    assert "mean of 2 seeds" in text and "0.6100 +- 0.0141*" in text and "hard 0.0005" in text
    assert "unstable: hard-hi-s1" in text
    records = [{"step": s, "global_grad_norm": n} for s, n in enumerate([9.0, 1.0, 1.2, 0.9, 30.0, 1.1], 1)]
    assert spike(records, warmup=1) == 30.0 / 1.1 and spike(records[:2], warmup=0) == 0.0


def test_a_setting_under_another_weighting_is_a_setting_of_its_own(tiny_cfg, tmp_path):
    from ufo.bench.ufo import labels, ufo_settings
    from ufo.errors import ConfigError

    runs = ufo_settings(tiny_cfg, 3, tmp_path, ["hard", "hard+uncertainty", "fixed+dwa"])
    assert runs["hard+uncertainty"]["train"]["weighting"] == {"name": "uncertainty"}
    assert runs["hard+uncertainty"]["train"]["out_dir"] == str(tmp_path / "hard+uncertainty")
    assert {t["path"] for t in runs["hard+uncertainty"]["tasks"].values()} == {"S" * tiny_cfg.model.depth}
    assert runs["hard"]["train"]["weighting"]["name"] == tiny_cfg.train.weighting.name
    assert labels({"fixed+dwa": {}, "hard": {}}) == {"hard": "hard sharing (all S)", "fixed+dwa": "UFO, fixed paths, dwa"}
    with pytest.raises(ConfigError, match="alone\\+dwa: a weighting applies to"):
        ufo_settings(tiny_cfg, 3, tmp_path, ["alone+dwa"])


def test_causes_name_what_the_diagnostics_show_for_each_gap():
    """Each task below its alone run beyond the seeds' spread gets the causes its runs' diagnostics
    show (slow, outweighed by whom, conflicting with whom, or none) and the knob for each; a task
    within the spread gets none."""
    from ufo.bench.ufo import KNOBS, _ufo_table, format_ufo_bench

    def entry(base, seed, diagnosis, **primary):
        return {"base": base, "lr": 1e-3, "seed": seed, "s_per_step": 1.0, "late_samples_per_s": 1.0, "spike": 1.0,
                "tasks": {t: {"primary": v, "path": "SS"} for t, v in primary.items()}, "diagnosis": diagnosis}

    alone_a = {"speed": {"a": 0.30}, "share": {"a": 1.0}, "cosine": {}}
    alone_b = {"speed": {"b": 0.50}, "share": {"b": 1.0}, "cosine": {}}
    hard = {"speed": {"a": 0.90, "b": 0.50}, "share": {"a": 0.10, "b": 0.90}, "cosine": {"a-b": -0.20}}
    fixed = {"speed": {"a": 0.32, "b": 0.49}, "share": {"a": 0.45, "b": 0.55}, "cosine": {"a-b": 0.10}}
    settings = {f"{b}-s{k}": entry(b, k, d, **v) for b, d, v in (
        ("alone-a", alone_a, {"a": 0.80}), ("alone-b", alone_b, {"b": 0.50}),
        ("hard", hard, {"a": 0.40, "b": 0.51}), ("fixed", fixed, {"a": 0.60, "b": 0.50})) for k in (0, 1)}
    settings["fixed-s1"]["tasks"]["a"]["primary"] = 0.62  # a spread, still far below 0.80
    settings["alone-a-s1"]["tasks"]["a"]["primary"] = 0.81
    r = {"steps": 10, "tasks": ["a", "b"], "metrics": {"a": "top1", "b": "top1"}, "settings": settings, "seeds": 2,
         "lrs": []}
    r.update(_ufo_table(r))
    hard_a = r["causes"]["hard"]["a"]["causes"]
    assert hard_a == {"slow": {"speed": 0.90, "alone": 0.30}, "outweighed": {"share": 0.10, "even": 0.5, "by": {"b": 0.90}},
                      "conflict": {"b": -0.20}}
    assert r["causes"]["hard"]["a"]["knobs"] == [KNOBS["slow"], KNOBS["outweighed"], KNOBS["conflict"]]
    assert "b" not in r["causes"]["hard"]  # 0.51 against 0.50 alone: no gap
    assert r["causes"]["fixed"]["a"]["causes"] == {"none": True}
    text = format_ufo_bench(r)
    assert "hard / a (-0.405): slow (loss at 0.90 of its first, alone 0.30); outweighed (10% of the shared gradient, " \
           "even 50%; b 90%); conflict (cosine b -0.20)" in text
    assert "fixed / a (-0.195): none of the three" in text


def test_bench_ufo_trains_runs_at_once_each_in_a_process_of_its_own(tmp_path):
    """--jobs 2: the runs trained two at a time as `ufo train` processes (their output in OUT/<run>.log;
    the first alone until its first step), then measured as one after the other would be."""
    import json

    from test_train import tiny_run
    from ufo.bench.ufo import bench_ufo
    from ufo.config import config_from_dict

    cfg = config_from_dict(tiny_run(tmp_path, ("person", "digits")), "t")
    said = []
    result = bench_ufo(cfg, 2, tmp_path / "bench", ["alone"], log=said.append, jobs=2)
    assert result["table"]["alone"].keys() == {"person", "digits"}
    assert any("(2 of 2 at once)" in line for line in said), said
    for name in ("alone-person", "alone-digits"):
        assert "step 2/2" in (tmp_path / "bench" / f"{name}.log").read_text()
        marker = json.loads(next((tmp_path / "bench" / name / "checkpoints").glob("step*/ufo.json")).read_text())
        assert marker["step"] == 2
