"""MLflow logging for a finished training run. Logging happens after the model directory and
metrics.json are on disk, and any tracking failure is reported, never raised: an unreachable tracking
server must not cost a trained model."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse


def tracking_uri(base_dir: str | os.PathLike | None = None) -> str:
    """MLFLOW_TRACKING_URI if set, else a sqlite store in the working directory (the plain file store
    is refused by recent MLflow)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    base = Path(base_dir or os.getcwd()).resolve()
    return f"sqlite:///{base / 'mlflow.db'}"


SQLITE = "sqlite:///"
SUBMIT_DIR_ENV = "RAYLIB_AD_SUBMIT_DIR"  # the directory `ray job submit` ran in, when a job is told it
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray for the driver of a submitted job


def absolute_sqlite_uri(uri: str, base_dir: str | os.PathLike) -> str:
    """``sqlite:///mlflow.db`` (a path relative to the process's directory) -> the same file under
    ``base_dir``; absolute sqlite paths and every other URI are returned unchanged."""
    if uri.startswith(SQLITE) and not uri[len(SQLITE):].startswith("/") and ":memory:" not in uri:
        return SQLITE + str((Path(base_dir) / uri[len(SQLITE):]).resolve())
    return uri


def in_ray_job_copy(environ: dict[str, str] | None = None) -> bool:
    """True in the driver of a job submitted with a working_dir: its directory is Ray's temporary copy
    of that directory, deleted with the Ray session, so nothing relative to it survives the job."""
    import json

    raw = (os.environ if environ is None else environ).get(RAY_JOB_CONFIG_ENV)
    try:
        return bool(raw) and bool((json.loads(raw).get("runtime_env") or {}).get("working_dir"))
    except (ValueError, AttributeError):
        return False


def job_tracking_uri(environ: dict[str, str] | None = None, cwd: str | os.PathLike | None = None
                     ) -> tuple[str, str | None]:
    """(tracking URI, warning or None) for a `ray job submit` driver.

    MLFLOW_TRACKING_URI wins; a relative sqlite path in it, and the default ./mlflow.db, are taken
    relative to $RAYLIB_AD_SUBMIT_DIR when that is set. Otherwise, inside Ray's temporary copy of
    the working dir, they would be deleted with the session: the warning says so and how to fix it.
    """
    environ = os.environ if environ is None else environ
    cwd = Path(cwd or os.getcwd())
    uri = environ.get("MLFLOW_TRACKING_URI") or f"{SQLITE}mlflow.db"
    base = environ.get(SUBMIT_DIR_ENV)
    resolved = absolute_sqlite_uri(uri, base or cwd)
    if base or resolved == uri or not in_ray_job_copy(environ):
        return resolved, None
    return resolved, (
        f"[raylib_ad] WARNING: the MLflow store {resolved} is inside Ray's temporary copy of the working "
        f"directory and is deleted with the Ray session. Give the job an absolute store, e.g. "
        f"--runtime-env-json '{{\"env_vars\": {{\"MLFLOW_TRACKING_URI\": \"sqlite:///'$PWD'/mlflow.db\"}}}}' "
        f"(README.md, \"On a Ray cluster\").")


def _server_reachable(uri: str, timeout: float = 3.0) -> bool:
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif value is not None:
        out[prefix] = value if isinstance(value, (int, float, str, bool)) else str(value)


def _start_run(mlflow, uri: str, experiment: str, run_name: str, params: dict[str, Any],
               tags: dict[str, str] | None, parent_run_id: str | None = None):
    """An active MLflow run in `experiment` with `params` logged (flattened, values cut at 500 chars)."""
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment)
    flat: dict[str, Any] = {}
    _flatten("", params, flat)
    run = mlflow.start_run(run_name=run_name, tags=tags or {}, parent_run_id=parent_run_id)
    try:
        mlflow.log_params({k: str(v)[:500] for k, v in flat.items()})
    except Exception:
        mlflow.end_run(status="FAILED")  # never leave a half-open run active in this process
        raise
    return run


def log_training_run(
    *,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    model_dir: str | os.PathLike | None,
    artifacts: list[str | os.PathLike],
    tags: dict[str, str] | None = None,
    uri: str | None = None,
    history: list[dict[str, Any]] | None = None,
    parent_run_id: str | None = None,
) -> str | None:
    """Log one run; returns its run id, or None (with a message on stderr) if tracking failed.
    `parent_run_id` nests it under a sweep's parent run; `model_dir=None` logs no model (a sweep logs
    model directories only for the trials it evaluated on the test split)."""
    uri = uri or tracking_uri()
    if not _server_reachable(uri):
        print(f"[raylib_ad] MLflow tracking server {uri} is unreachable; the trained model is safe in "
              f"{model_dir} and was not logged.", file=sys.stderr)
        return None
    try:
        import mlflow

        with _start_run(mlflow, uri, experiment, run_name, params, tags, parent_run_id) as run:
            mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
            for record in history or []:  # per-epoch curves of gradient-trained models
                step = int(record["epoch"])
                mlflow.log_metrics({f"epoch_{k}": float(v) for k, v in record.items()
                                    if isinstance(v, (int, float)) and k != "epoch"}, step=step)
            if model_dir is not None:
                mlflow.log_artifacts(str(model_dir), artifact_path="model")
            for path in artifacts:
                if Path(path).is_file():
                    mlflow.log_artifact(str(path), artifact_path="plots" if str(path).endswith(".png") else None)
            return run.info.run_id
    except Exception as err:  # tracking must never lose the model
        print(f"[raylib_ad] MLflow logging to {uri} failed ({type(err).__name__}: {err}); the trained model "
              f"is safe in {model_dir}.", file=sys.stderr)
        return None


def start_parent_run(*, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                     uri: str | None = None) -> str | None:
    """Create (and end) a sweep's parent run; trials nest under it by id, so a resumed sweep keeps
    adding to the same parent. Returns its id, or None (reported on stderr) if tracking failed."""
    uri = uri or tracking_uri()
    if not _server_reachable(uri):
        print(f"[raylib_ad] MLflow tracking server {uri} is unreachable; the sweep is not logged.", file=sys.stderr)
        return None
    try:
        import mlflow

        with _start_run(mlflow, uri, experiment, run_name, params, tags) as run:
            return run.info.run_id
    except Exception as err:  # tracking must never stop a sweep
        print(f"[raylib_ad] MLflow logging to {uri} failed ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def log_to_run(run_id: str, *, metrics: dict[str, float] | None = None, artifacts: list[str | os.PathLike] = (),
               uri: str | None = None) -> bool:
    """Add metrics and files to an existing run (a sweep's parent, once the sweep is done)."""
    uri = uri or tracking_uri()
    try:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        for key, value in (metrics or {}).items():
            client.log_metric(run_id, key, float(value))
        for path in artifacts:
            if Path(path).is_file():
                client.log_artifact(run_id, str(path), artifact_path="plots" if str(path).endswith(".png") else None)
        return True
    except Exception as err:  # tracking must never lose results already on disk
        print(f"[raylib_ad] MLflow logging to {uri} failed ({type(err).__name__}: {err})", file=sys.stderr)
        return False


# Options that steer the command line, not the run: left out of a run's params.
CLI_PLUMBING = ("progress", "verbose", "overwrite", "mlflow", "experiment", "local_ray")
PATH_OPTIONS = ("root", "out", "split_file", "weights")  # written as absolute paths
# Relative to --root, so that the same folder option means the same thing on another machine: left as given.
ROOT_RELATIVE = ("normal_dir", "abnormal_dir", "mask_dir")


def run_params(options: dict[str, Any]) -> dict[str, Any]:
    """A run's params from its options: the user's choices, paths made absolute, CLI plumbing left out."""
    params = {k: v for k, v in options.items() if k not in CLI_PLUMBING}
    for key in PATH_OPTIONS:
        if params.get(key):
            params[key] = str(Path(params[key]).expanduser().resolve())
    return params


class TrainingRun:
    """An MLflow run opened when training starts and closed when it ends, so that its start, end and
    duration are the fit's. Tracking failures are reported once, never raised: the run then is None and
    every later call does nothing. Uses MlflowClient (no process-global active run)."""

    def __init__(self, *, experiment: str, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                 uri: str | None = None):
        self.uri = uri or tracking_uri()
        self.run_id: str | None = None
        self._client = None
        if not _server_reachable(self.uri):
            print(f"[raylib_ad] MLflow tracking server {self.uri} is unreachable; the run is not logged (the model "
                  "and metrics are written to the output directory as always).", file=sys.stderr)
            return
        try:
            from mlflow import MlflowClient

            client = MlflowClient(tracking_uri=self.uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
            run = client.create_run(experiment_id, run_name=run_name, tags=tags or {})
            self._client, self.run_id = client, run.info.run_id
            self.log_params(params)
        except Exception as err:  # tracking must never stop training
            self._fail(err)

    def _fail(self, err: Exception) -> None:
        print(f"[raylib_ad] MLflow logging to {self.uri} failed ({type(err).__name__}: {err}); the run's files are "
              "in its output directory.", file=sys.stderr)
        if self._client is not None and self.run_id is not None:
            try:
                self._client.set_terminated(self.run_id, status="FAILED")
            except Exception:  # noqa: BLE001 - already reporting a failure
                pass
        self._client, self.run_id = None, None

    def log_params(self, params: dict[str, Any]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Param

        flat: dict[str, Any] = {}
        _flatten("", params, flat)
        try:
            items = [Param(k, str(v)[:500]) for k, v in flat.items()]
            for start in range(0, len(items), 100):
                self._client.log_batch(self.run_id, params=items[start : start + 100])
        except Exception as err:
            self._fail(err)

    def finish(self, *, metrics: dict[str, Any], model_dir: str | os.PathLike | None,
               artifacts: list[str | os.PathLike] = (), history: list[dict[str, Any]] | None = None,
               params: dict[str, Any] | None = None) -> str | None:
        """Log the results and end the run (FINISHED). Returns the run id, or None if tracking failed."""
        if self._client is None:
            return None
        from mlflow.entities import Metric

        try:
            if params:
                self.log_params(params)
                if self._client is None:
                    return None
            now = int(time_ms())
            rows = [Metric(k, float(v), now, 0) for k, v in metrics.items()
                    if isinstance(v, (int, float)) and not isinstance(v, bool)]
            for record in history or []:  # per-epoch curves of gradient-trained models
                step = int(record["epoch"])
                rows += [Metric(f"epoch_{k}", float(v), now, step) for k, v in record.items()
                         if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"]
            for start in range(0, len(rows), 1000):
                self._client.log_batch(self.run_id, metrics=rows[start : start + 1000])
            if model_dir is not None:
                self._client.log_artifacts(self.run_id, str(model_dir), artifact_path="model")
            for path in artifacts:
                if Path(path).is_file():
                    self._client.log_artifact(self.run_id, str(path),
                                              artifact_path="plots" if str(path).endswith(".png") else None)
            self._client.set_terminated(self.run_id, status="FINISHED")
            return self.run_id
        except Exception as err:
            self._fail(err)
            return None

    def fail(self) -> None:
        """End the run as FAILED (training raised or was interrupted)."""
        if self._client is None:
            return
        try:
            self._client.set_terminated(self.run_id, status="FAILED")
        except Exception:  # noqa: BLE001 - the training error is the one to report
            pass
        self._client, self.run_id = None, None


def time_ms() -> int:
    import time

    return int(time.time() * 1000)
