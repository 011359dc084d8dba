"""`ufo bench weighting` (ufo/bench/weighting.py)."""


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
