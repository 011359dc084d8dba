"""MLflow tracking of a training run, on rank 0: the config as params, per-step metrics, artifacts.

Every MLflow call runs on one background thread, so a slow or unreachable tracking server never
stops or slows training: what fails is kept and retried, and what still could not be logged is
reported when the run ends. The store is MLflow's own: `tracking.uri`, else MLFLOW_TRACKING_URI,
else an embedded sqlite store beside the run (`OUT/mlflow.db`, artifacts in `OUT/mlartifacts`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from ufo.config import UfoConfig
from ufo.errors import ExportError
from ufo.subnet import FILES, load_subnet

Log = Callable[[str], None]
BATCH_METRICS, BATCH_PARAMS = 1000, 100  # MLflow's limits per log_batch call
MAX_BACKLOG = 1_000_000  # metrics kept for retry while the store is unreachable; older ones are dropped
_STOP = object()


def tracking_uri(cfg: UfoConfig, out: Path) -> str:
    """Where the run is tracked: the config's URI, MLFLOW_TRACKING_URI, or sqlite under the run's directory."""
    return cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(out / 'mlflow.db').resolve()}"


def metric_name(name: str) -> str:
    """MLflow metric names allow letters, digits, `_ - . /` and spaces (`recall@1` -> `recall_1`)."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", name)


class Tracker:
    """One MLflow run, fed without blocking: `log_metrics`, `set_tags`, `log_artifact`, then `close`.

    With `run_id` (from a checkpoint) it continues that run, so a resumed training run's steps go
    on in the same run instead of starting a new one.
    """

    def __init__(self, cfg: UfoConfig, out: Path, run_id: str | None = None, say: Log = print,
                 params: Mapping[str, Any] | None = None, artifacts: tuple | list = (), wait_s: float = 15.0):
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        # bounded retries inside one MLflow call: ours are the ones that matter
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.uri, self.out, self.say = tracking_uri(cfg, out), out, say
        self.experiment, self.run_name, self.tags = cfg.tracking.experiment, cfg.tracking.run_name, cfg.tracking.tags
        self.run_id: str | None = run_id
        self.resumed = run_id is not None
        self._first = [("params", dict(params or {}))] + [("artifact", str(a), None) for a in artifacts]
        self._queue: queue.Queue = queue.Queue()
        self._backlog: list[tuple] = []
        self._started = threading.Event()
        self._error: str | None = None  # the latest failure
        self._dropped = 0
        self._client = None
        self._system_every = cfg.tracking.system_metrics_every
        self.patience = cfg.tracking.flush_timeout  # how long the end of a run retries what the store refused
        self._monitor = None
        self._thread = threading.Thread(target=self._work, name="ufo-mlflow", daemon=True)
        self._thread.start()
        self._queue.put(("start",))
        if self._started.wait(wait_s) and self.run_id:
            verb = "continues" if self.resumed else "started"
            say(f"mlflow: {verb} run {self.run_id} (experiment {self.experiment}) in {self.uri}")
        else:
            say(f"mlflow: warning: no run in {self.uri} yet ({self._last_error()}); training goes on, "
                "logging is retried")

    # --- called by the training loop; none of these waits for MLflow ---

    def log_metrics(self, step: int, metrics: Mapping[str, float | None]) -> None:
        stamp = int(time.time() * 1000)
        self._queue.put(("metrics", [(metric_name(k), float(v), stamp, step) for k, v in metrics.items()
                                     if v is not None]))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._queue.put(("tags", {k: str(v) for k, v in tags.items()}))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", str(path), artifact_path))

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> bool:
        """Flush, set the run's status, and report what could not be logged. True when all was logged."""
        self._queue.put(("status", status))
        self._queue.put(_STOP)
        self._thread.join(max(timeout, self.patience + 30))
        left = self._backlog + [op for op in _drain(self._queue) if op is not _STOP]
        metrics = sum(len(op[1]) for op in left if op[0] == "metrics") + self._dropped
        others = sum(1 for op in left if op[0] != "metrics")
        if self._thread.is_alive() or left or self._dropped:
            self.say(f"mlflow: warning: could not log {metrics} metric values and {others} other records to "
                     f"{self.uri} ({self._last_error()})")
            return False
        return True

    # --- the background thread ---

    def _work(self) -> None:
        failures, next_try, give_up = 0, 0.0, None
        while True:
            wait = None if failures == 0 else max(0.0, next_try - time.monotonic())
            try:
                self._take(self._queue.get(timeout=wait))
            except queue.Empty:
                pass
            for op in _drain(self._queue):
                self._take(op)
            if self._stop_seen and give_up is None:  # the run ended: one try now, then every 2 s
                give_up, next_try = time.monotonic() + self.patience, time.monotonic()
            if failures and time.monotonic() < next_try:
                continue  # backing off: new records wait in the backlog
            try:
                self._start()
                self._watch_system()
                self._flush()
                failures = 0
            except Exception as e:  # any MLflow, network or disk failure: warn, keep the backlog, retry
                failures += 1
                next_try = time.monotonic() + (2.0 if self._stop_seen else min(30.0, 2.0 ** failures))
                self._note(e)
            self._started.set()  # the first attempt is over, successful or not
            if self._stop_seen and (failures == 0 or time.monotonic() > give_up):
                if self._monitor is not None:
                    try:
                        self._monitor.finish()
                    except Exception as e:
                        self._note(e)
                return

    _stop_seen = False

    def _take(self, op) -> None:
        if op is _STOP:
            self._stop_seen = True
            return
        if op[0] == "start":  # only wakes the thread up
            return
        self._backlog.append(op)
        if op[0] == "metrics":
            waiting = sum(len(o[1]) for o in self._backlog if o[0] == "metrics")
            while waiting > MAX_BACKLOG:
                first = next(i for i, o in enumerate(self._backlog) if o[0] == "metrics")
                waiting -= len(self._backlog[first][1])
                self._dropped += len(self._backlog.pop(first)[1])

    def _start(self) -> None:
        if self._client is not None and self.run_id is not None:
            return
        from mlflow import MlflowClient

        self._client = MlflowClient(self.uri)
        client = self._client
        if self.run_id is not None:
            try:
                client.get_run(self.run_id)
                client.update_run(self.run_id, status="RUNNING")
                return
            except Exception as e:
                self.say(f"mlflow: warning: run {self.run_id} is not in {self.uri} ({_first_line(e)}); "
                         "starting a new run")
                self.run_id, self.resumed = None, False
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            location = None
            if self.uri.startswith("sqlite:///"):  # else MLflow puts artifacts under the working directory
                location = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
            experiment_id = client.create_experiment(self.experiment, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        run = client.create_run(experiment_id, run_name=self.run_name, tags=dict(self.tags))
        self.run_id = run.info.run_id
        self._backlog[:0] = self._first  # a new run: the config as params and artifact, before anything else

    def _watch_system(self) -> None:
        """MLflow's own system metrics (CPU, memory, disk, network, GPUs) into the run, every few seconds."""
        if self._monitor is not None or not self._system_every:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=self._system_every,
                                             resume_logging=self.resumed, tracking_uri=self.uri)
        self._monitor.start()

    def _flush(self) -> None:
        from mlflow.entities import Metric, Param, RunTag

        client, run = self._client, self.run_id
        while self._backlog:
            op = self._backlog[0]
            if op[0] == "metrics":
                count = 0  # one log_batch for every queued metric op, in chunks
                while count < len(self._backlog) and self._backlog[count][0] == "metrics":
                    count += 1
                values = [Metric(*v) for o in self._backlog[:count] for v in o[1]]
                for i in range(0, len(values), BATCH_METRICS):
                    client.log_batch(run, metrics=values[i:i + BATCH_METRICS], synchronous=True)
                del self._backlog[:count]
                continue
            if op[0] == "params":
                items = [Param(k, v) for k, v in op[1].items()]
                for i in range(0, len(items), BATCH_PARAMS):
                    client.log_batch(run, params=items[i:i + BATCH_PARAMS], synchronous=True)
            elif op[0] == "tags":
                client.log_batch(run, tags=[RunTag(k, v) for k, v in op[1].items()], synchronous=True)
            elif op[0] == "artifact":
                if Path(op[1]).is_dir():
                    client.log_artifacts(run, op[1], op[2])
                elif Path(op[1]).is_file():
                    client.log_artifact(run, op[1], op[2])
            elif op[0] == "status":
                client.set_terminated(run, status=op[1])
            self._backlog.pop(0)

    def _note(self, error: Exception) -> None:
        if self._error is None:
            self.say(f"mlflow: warning: {_first_line(error)}; training goes on, logging is retried")
        self._error = _first_line(error)

    def _last_error(self) -> str:
        return self._error or "no answer yet"


def _drain(q: queue.Queue) -> list:
    ops = []
    while True:
        try:
            ops.append(q.get_nowait())
        except queue.Empty:
            return ops


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _checkpoint_run(checkpoint: Path, uri: str | None = None, say: Log = print):
    """The MLflow client, run id and step of the run that trained a checkpoint (from its marker), or None.

    The store: `uri` where the invocation names one, else the marker's, followed only where it is a
    local store that already exists (a marker is a file anyone who can write the checkpoint can
    change: it must not make this process create stores or send requests elsewhere)."""
    marker = checkpoint / "ufo.json"
    try:
        meta = json.loads(marker.read_text()) if marker.is_file() else {}
    except ValueError:
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    run_id, named = meta.get("mlflow_run_id"), meta.get("mlflow_uri")
    if not run_id or not isinstance(run_id, str) or not (uri or named):
        return None
    if uri is None:
        if not isinstance(named, str) or not existing_local_store(named):
            say(f"mlflow: not logging to {str(named)[:200]!s}, the store {marker} names: it is not a local store "
                "that exists here (pass --track URI to log there)")
            return None
        uri = named
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    from mlflow import MlflowClient

    return MlflowClient(uri), run_id, int(meta.get("step", 0))


def existing_local_store(uri: str) -> bool:
    """Whether `uri` is a store on this host's filesystem that exists: an sqlite file, or a file store."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).is_file()
    if uri.startswith("file:"):
        from urllib.parse import urlparse
        from urllib.request import url2pathname

        return Path(url2pathname(urlparse(uri).path)).is_dir()
    return "://" not in uri and Path(uri).is_dir()


def log_export(checkpoint: Path, exports: list, say: Log = print, uri: str | None = None) -> str | None:
    """Log exported subnets (their directories and verification figures) to the MLflow run that trained
    the checkpoint, named in its marker (the store: see `_checkpoint_run`). Returns the run id, or None
    where there is none or it failed."""
    found = _checkpoint_run(checkpoint, uri, say)
    if found is None:
        return None
    client, run_id, step = found
    try:
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        for e in exports:
            client.log_artifacts(run_id, str(e.out_dir), f"subnets/{e.task}")
            metrics = [Metric(metric_name(f"export/{e.task}/max_abs_diff/{fmt}"), d, stamp, step)
                       for fmt, d in e.max_abs_diff.items()]
            metrics.append(Metric(f"export/{e.task}/params", float(e.param_count), stamp, step))
            if e.int8:  # the task's metric of the fp32 and INT8 graphs, and what quantisation lost
                metrics += [Metric(metric_name(f"export/{e.task}/int8/{key}"), value, stamp, step)
                            for key, value in (("fp32", e.int8.fp32), ("int8", e.int8.int8), ("drop", e.int8.drop))]
            client.log_batch(run_id, metrics=metrics,
                             tags=[RunTag(f"ufo.export.{e.task}.path", e.path),
                                   RunTag(f"ufo.export.{e.task}.dir", str(Path(e.out_dir).resolve()))])
    except Exception as e:  # the subnets are written and verified; tracking them is a bonus
        say(f"mlflow: warning: could not log the export to run {run_id} ({_first_line(e)})")
        return None
    say(f"mlflow: logged {len(exports)} subnet{'s' if len(exports) != 1 else ''} to run {run_id}")
    return run_id


def register_subnets(checkpoint: Path, exports: list, name: str, say: Log = print, uri: str | None = None) -> list:
    """Each exported subnet as an MLflow model in the checkpoint's run (`subnet-TASK`), registered in
    the model registry as `name` (one task) or `name-TASK` (several): the deployed module (timm's ViT
    and the embedding's normalization) as a pytorch flavour in torch.export's pt2 format (a graph and
    its tensors: loading it runs no pickled code), the ONNX file as an onnx flavour where it was
    exported, a python_function flavour over the pytorch one, the input/output signature (batch size
    free) and an input example; the task, path, parameters and verification figures as the version's
    tags. Returns the model versions; errors are one line and leave the subnet on disk as it is."""
    found = _checkpoint_run(checkpoint, uri, say)
    if found is None:
        raise ExportError(f"--register {name}: no MLflow store to register in: the checkpoint's marker names no "
                          "local store that exists here; pass --track URI (an sqlite:/// store has a registry)")
    client, run_id, _ = found
    with _process_store(client._tracking_client.tracking_uri):
        return [_register_one(e, client, run_id, checkpoint, name if len(exports) == 1 else f"{name}-{e.task}", say)
                for e in exports]


@contextlib.contextmanager
def _process_store(uri: str):
    """MLflow's process-wide store set to `uri` for the calls inside (`mlflow.register_model` and the
    flavours take no client), then put back as it was: MLflow also writes it into the environment
    (MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI), where later runs in this process would follow it."""
    import mlflow

    before = {key: os.environ.get(key) for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _register_one(e, client, run_id: str, checkpoint: Path, registered: str, say: Log):
    """One subnet logged as an MLflow model in the run and registered (see `register_subnets`)."""
    import tempfile

    import mlflow
    import mlflow.pytorch
    import onnx
    import torch
    from mlflow.models import Model, infer_signature

    module, config = load_subnet(e.out_dir)
    c, size = config["model_args"].get("in_chans", 3), config["model_args"].get("img_size", 224)
    h, w = (size, size) if isinstance(size, int) else size  # an int, or [height, width]
    example = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = module(example)
    signature = infer_signature(example.numpy(), output.numpy())
    tags = {"ufo.task": e.task, "ufo.kind": e.kind, "ufo.path": e.path, "ufo.params": str(e.param_count),
            "ufo.output": config["ufo"]["output"], "ufo.source_checkpoint": str(checkpoint),
            **{f"ufo.max_abs_diff.{fmt}": f"{d:.3g}" for fmt, d in e.max_abs_diff.items()},
            **({"ufo.int8": f"{e.int8.metric} {e.int8.fp32:.4f} fp32 -> {e.int8.int8:.4f} int8 ({e.int8.mode})"}
               if e.int8 else {})}
    onnx_file = Path(e.out_dir) / FILES["onnx"]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / "model"
            mlflow.pytorch.save_model(module, str(local), serialization_format="pt2", signature=signature,
                                      input_example=example.numpy(),
                                      pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "onnxruntime",
                                                        "numpy"])
            if onnx_file.is_file():
                (local / "onnx").mkdir()
                (local / "onnx" / "model.onnx").write_bytes(onnx_file.read_bytes())
                model = Model.load(str(local / "MLmodel"))
                model.add_flavor("onnx", onnx_version=onnx.__version__, data="onnx/model.onnx",
                                 providers=["CPUExecutionProvider"], onnx_session_options=None, code=None)
                model.save(str(local / "MLmodel"))
            (local / "config.json").write_bytes((Path(e.out_dir) / "config.json").read_bytes())
            artifact = f"subnet-{e.task}"
            client.log_artifacts(run_id, str(local), artifact)
        version = mlflow.register_model(f"runs:/{run_id}/{artifact}", registered, tags=tags)
    except Exception as error:  # noqa: BLE001 - one line, the subnet on disk is untouched
        raise ExportError(f"--register {registered}: MLflow refused the model ({_first_line(error)})") from None
    say(f"mlflow: registered {e.task} as model {registered!r} version {version.version} "
        f"(flavours pytorch{', onnx' if onnx_file.is_file() else ''}, python_function; run {run_id})")
    return version


def log_search(checkpoint: Path, result, file: Path, say: Log = print, uri: str | None = None) -> str | None:
    """Log a path search (best and baseline values, the result file) to the checkpoint's MLflow run."""
    found = _checkpoint_run(checkpoint, uri, say)
    if found is None:
        return None
    client, run_id, step = found
    try:
        from mlflow.entities import Metric, RunTag

        stamp, task = int(time.time() * 1000), result.task
        metrics = [Metric(metric_name(f"search/{task}/best/{result.metric}"), result.best, stamp, step)]
        metrics += [Metric(metric_name(f"search/{task}/{name}/{result.metric}"), b["value"], stamp, step)
                    for name, b in result.baselines.items()]
        client.log_batch(run_id, metrics=metrics, tags=[RunTag(f"ufo.search.{task}.best_path", result.best_path)])
        client.log_artifact(run_id, str(file), "search")
    except Exception as e:
        say(f"mlflow: warning: could not log the search to run {run_id} ({_first_line(e)})")
        return None
    say(f"mlflow: logged the search to run {run_id}")
    return run_id
