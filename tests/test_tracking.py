"""MLflow tracking with a real store (sqlite), read back with MlflowClient."""

from __future__ import annotations

import socket

import pytest
from mlflow import MlflowClient

from test_train import tiny_run
from ufo.config import config_from_dict
from ufo.config import flatten
from ufo.tracking import metric_name
from ufo.train import train


def tracked_run(tmp_path, **train_keys) -> dict:
    raw = tiny_run(tmp_path, ("face", "digits"), layout="mixed", **{"plots": True, **train_keys})
    raw["tracking"] = {"experiment": "tests", "run_name": "tiny", "tags": {"owner": "ci"}}
    return raw


def the_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


def test_a_training_run_is_tracked(tmp_path):
    raw = tracked_run(tmp_path, steps=4, weighting={"name": "uncertainty"}, path_policy="sample")
    raw["tracking"]["system_metrics_every"] = 0.2
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
    assert "system/cpu_utilization_percentage" in run.data.metrics  # MLflow's system metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "task_blocks/face")] == [1, 2, 3, 4]
    assert run.data.tags["ufo.path.face"] == "SSTT" and run.data.tags["ufo.path_policy"] == "sample"
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
    raw["tracking"].update(uri=f"http://127.0.0.1:{port}", flush_timeout=1)
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


def test_export_logs_the_subnets_to_the_training_run(tmp_path):
    from ufo.cli import main

    raw = tracked_run(tmp_path, steps=2)
    train(config_from_dict(raw, "test"), log=lambda _: None)
    assert main(["export", str(tmp_path / "run"), "--all-tasks", "--out", str(tmp_path / "subnets")]) in (0, None)
    client, run = the_run(tmp_path)
    files = {a.path for a in client.list_artifacts(run.info.run_id, "subnets/digits")}
    assert {"subnets/digits/config.json", "subnets/digits/model.safetensors"} <= files
    assert run.data.metrics["export/digits/max_abs_diff/safetensors"] <= 1e-5
    assert run.data.tags["ufo.export.face.path"] == "SSTT"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free localhost port; yields (uri, start, stop)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri, procs = f"http://127.0.0.1:{port}", []

    def start() -> None:
        procs.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "server-artifacts")],
            stdout=open(tmp_path / "server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=1).read() == b"OK":
                    return
            except OSError:
                time.sleep(0.3)
        pytest.fail("mlflow server did not start:\n" + (tmp_path / "server.log").read_text()[-2000:])

    def stop() -> None:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    start()
    yield uri, start, stop
    stop()


def test_a_real_server_going_down_mid_run_loses_nothing(tmp_path, mlflow_server):
    import sys
    import time

    import yaml

    from test_train import launch

    uri, start, stop = mlflow_server
    raw = tracked_run(tmp_path, steps=30, log_every=1, warmup_steps=0)
    raw["tracking"].update(uri=uri, system_metrics_every=0)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = launch([sys.executable, "-m", "ufo.cli", "train", str(config)], tmp_path / "train.log")
    log = tmp_path / "train.log"
    deadline = time.time() + 300
    while "step 5/" not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    stop()  # the server dies mid-run; training must not notice beyond a warning
    while "step 20/" not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    start()  # back (before the end, or while the run's end retries): what was refused meanwhile is logged
    assert run.wait(timeout=300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "mlflow: warning" in text and "could not log" not in text, text[-3000:]
    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(found.info.run_id, "loss/face")] == list(range(1, 31))
    assert "config.yaml" in {a.path for a in client.list_artifacts(found.info.run_id)}


def test_search_logs_to_the_training_run(tmp_path):
    from ufo.cli import main

    raw = tracked_run(tmp_path, steps=2, path_policy="sample")  # one-shot training: every FFN, searchable
    train(config_from_dict(raw, "test"), log=lambda _: None)
    assert main(["search", str(tmp_path / "run"), "--task", "digits", "--budget-evals", "4"]) in (0, None)
    assert (tmp_path / "run" / "search-digits.json").is_file()
    client, run = the_run(tmp_path)
    assert 0.0 <= run.data.metrics["search/digits/best/top1"] <= 1.0
    assert "search/digits/trained/top1" in run.data.metrics
    assert len(run.data.tags["ufo.search.digits.best_path"]) == 4
    assert {a.path for a in client.list_artifacts(run.info.run_id, "search")} == {"search/search-digits.json"}


def test_a_registered_subnet_loads_back_and_predicts_offline(tmp_path, monkeypatch):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mlflow
    import numpy as np
    import onnxruntime
    import torch

    from ufo.cli import main
    from ufo.subnet import load_subnet

    raw = tracked_run(tmp_path, steps=2)
    train(config_from_dict(raw, "test"), log=lambda _: None)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    assert main(["export", str(tmp_path / "run"), "--task", "face", "--out", str(tmp_path / "face"),
                 "--format", "safetensors,onnx", "--register", "tiny-face"]) in (0, None)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # registering left the process's store as it was
    store = f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    client, run = the_run(tmp_path)
    version = client.get_model_version("tiny-face", "1")
    assert version.run_id == run.info.run_id
    assert version.tags["ufo.task"] == "face" and version.tags["ufo.path"] == "SSTT"
    assert float(version.tags["ufo.max_abs_diff.onnx"]) <= 1e-5
    subnet, _ = load_subnet(tmp_path / "face")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = subnet(x).numpy()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)  # for models:/ URIs here, undone after the test
    model = mlflow.pyfunc.load_model("models:/tiny-face/1")
    assert model.metadata.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 16, 16)
    assert np.abs(model.predict(x.numpy()) - want).max() <= 1e-5
    # the onnx flavour: the ONNX file as exported, run by onnxruntime
    local = Path(mlflow.artifacts.download_artifacts("models:/tiny-face/1", dst_path=str(tmp_path / "dl")))
    session = onnxruntime.InferenceSession(str(local / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": x.numpy()})[0] - want).max() <= 1e-5
    # `mlflow models predict`, offline, in this environment
    (tmp_path / "input.json").write_text(json.dumps({"inputs": x.numpy().tolist()}))
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store}
    cli = subprocess.run([str(Path(sys.executable).with_name("mlflow")), "models", "predict", "-m", "models:/tiny-face/1",
                          "-i", str(tmp_path / "input.json"), "-t", "json", "-o", str(tmp_path / "out.json"),
                          "--env-manager", "local"], capture_output=True, text=True, env=env, timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    got = np.array(json.loads((tmp_path / "out.json").read_text())["predictions"], dtype=np.float32)
    assert np.abs(got - want).max() <= 1e-5
    # a name the registry refuses is one line, and the subnet on disk stays
    assert main(["export", str(tmp_path / "run"), "--task", "face", "--out", str(tmp_path / "face2"),
                 "--register", "bad/name"]) == 2
    assert (tmp_path / "face2" / "model.safetensors").is_file()


def test_the_pretrained_start_is_a_parameter_and_a_tag(tmp_path):
    from safetensors.torch import save_file
    from timm.models.vision_transformer import VisionTransformer

    from ufo.model import vit_args

    raw = tracked_run(tmp_path, steps=1)
    vit = VisionTransformer(**vit_args(config_from_dict(raw, "test").model), num_classes=0)
    save_file(dict(vit.state_dict()), str(tmp_path / "vit.safetensors"))
    raw["model"]["pretrained"] = str(tmp_path / "vit.safetensors")  # a plain timm ViT of the config's shape
    lines: list[str] = []
    train(config_from_dict(raw, "test"), log=lines.append)
    _, run = the_run(tmp_path)
    note = f"{tmp_path / 'vit.safetensors'} from {tmp_path / 'vit.safetensors'}"
    assert f"pretrained: {note}" in lines
    assert run.data.tags["ufo.pretrained"] == note
    assert run.data.params["model.pretrained"] == str(tmp_path / "vit.safetensors")
    # resuming takes the checkpoint's weights: the pretrained file is not read again, nor needed
    (tmp_path / "vit.safetensors").unlink()
    raw["train"]["steps"] = 2
    lines = []
    assert train(config_from_dict(raw, "test"), log=lines.append).step == 2
    assert not any(line.startswith("pretrained:") for line in lines)
