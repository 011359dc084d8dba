"""MLflow tracking with a real store (sqlite), read back with MlflowClient."""

from __future__ import annotations

import socket

import pytest
from mlflow import MlflowClient

from test_train import tiny_run
from ufo.config import config_from_dict
from ufo.tracking import flatten, metric_name
from ufo.train import train


def tracked_run(tmp_path, **train_keys) -> dict:
    raw = tiny_run(tmp_path, ("face", "digits"), layout="mixed", **train_keys)
    raw["tracking"] = {"experiment": "tests", "run_name": "tiny", "tags": {"owner": "ci"}}
    return raw


def the_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_a_training_run_is_tracked(tmp_path):
    raw = tracked_run(tmp_path, steps=4, weighting={"name": "uncertainty"})
    lines: list[str] = []
    train(config_from_dict(raw, "test"), log=lines.append)
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny"
    assert run.data.tags["owner"] == "ci" and run.data.tags["ufo.layout"] == "mixed"
    assert run.data.params["train.weighting.name"] == "uncertainty"
    assert run.data.params["tasks.face.kind"] == "retrieval"
    for task in ("face", "digits"):  # every step's loss and weight, and the learned log-variance
        for key in ("loss", "weight", "log_variance"):
            assert [m.step for m in client.get_metric_history(run.info.run_id, f"{key}/{task}")] == [1, 2, 3, 4]
    weights = client.get_metric_history(run.info.run_id, "weight/face")
    assert weights[0].value == 1.0 and weights[-1].value != 1.0  # exp(-s), s learned
    assert "eval/face/recall_1" in run.data.metrics and "eval/digits/top1" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "config.yaml", "history.jsonl", "weighting.png", "metrics.json"}
    assert any(f"mlflow: started run {run.info.run_id}" in line for line in lines)


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    raw = tracked_run(tmp_path, steps=3, warmup_steps=0)
    train(config_from_dict(raw, "test"), log=lambda _: None)
    raw["train"]["steps"] = 5
    lines: list[str] = []
    train(config_from_dict(raw, "test"), log=lines.append)
    client, run = the_run(tmp_path)  # one run, not two
    assert any(f"continues run {run.info.run_id}" in line for line in lines)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/digits")] == [1, 2, 3, 4, 5]
    assert run.info.status == "FINISHED"


def test_an_unreachable_server_never_stops_training(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    raw = tracked_run(tmp_path, steps=3)
    raw["tracking"]["uri"] = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    result = train(config_from_dict(raw, "test"), log=lines.append)
    assert result.step == 3 and result.metrics["digits"]["samples"] > 0
    text = "\n".join(lines)
    assert "mlflow: warning" in text and "training goes on" in text
    assert "could not log" in text  # reported at the end, with what was lost


def test_flatten_and_metric_names():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None, "e": {}}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None",
                                                                        "e": "{}"}
    assert metric_name("eval/face/recall@1") == "eval/face/recall_1"


@pytest.mark.parametrize("uri", ["sqlite:///{tmp}/elsewhere.db"])
def test_tracking_uri_from_the_config(tmp_path, uri):
    raw = tracked_run(tmp_path, steps=1)
    raw["tracking"]["uri"] = uri.format(tmp=tmp_path)
    train(config_from_dict(raw, "test"), log=lambda _: None)
    client = MlflowClient(uri.format(tmp=tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1 and not (tmp_path / "run" / "mlflow.db").exists()
    assert runs[0].info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
