"""Where a `ray job submit` driver logs its MLflow run (no Ray started: the job environment is faked)."""

import json

from raylib_ad.tracking.mlflow_run import absolute_sqlite_uri, in_ray_job_copy, job_tracking_uri

JOB = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}})}


def test_relative_sqlite_is_anchored_other_uris_are_not(tmp_path):
    assert absolute_sqlite_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    for uri in (f"sqlite:///{tmp_path}/m.db", "http://head:5000", "databricks", "sqlite:///:memory:"):
        assert absolute_sqlite_uri(uri, "/elsewhere") == uri


def test_job_copy_is_detected_only_with_a_working_dir():
    assert in_ray_job_copy(JOB)
    assert not in_ray_job_copy({})
    assert not in_ray_job_copy({"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {}})})
    assert not in_ray_job_copy({"RAY_JOB_CONFIG_JSON_ENV_VAR": "not json"})


def test_a_job_logs_where_it_is_told_and_warns_when_the_run_would_be_lost(tmp_path):
    copy = tmp_path / "ray_session" / "working_dir_files"
    told = f"sqlite:///{tmp_path}/user/mlflow.db"
    assert job_tracking_uri({**JOB, "MLFLOW_TRACKING_URI": told}, copy) == (told, None)
    assert job_tracking_uri({**JOB, "MLFLOW_TRACKING_URI": "http://head:5000"}, copy) == ("http://head:5000", None)
    # The submitting directory, when passed, anchors relative sqlite URIs and the default store.
    submit = {**JOB, "RAYLIB_AD_SUBMIT_DIR": str(tmp_path / "user")}
    assert job_tracking_uri(submit, copy) == (told, None)
    assert job_tracking_uri({**submit, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"}, copy) == (told, None)
    # Neither: the store would sit in Ray's temporary copy; say so, naming the fix.
    uri, warning = job_tracking_uri(JOB, copy)
    assert uri == f"sqlite:///{copy}/mlflow.db"
    assert "deleted with the Ray session" in warning and "MLFLOW_TRACKING_URI" in warning
    # Outside a job, the working directory is the user's own: no warning.
    assert job_tracking_uri({}, tmp_path) == (f"sqlite:///{tmp_path}/mlflow.db", None)


def test_a_training_run_spans_the_fit_and_its_params_are_the_users_options(tmp_path, monkeypatch):
    import time

    from mlflow import MlflowClient

    from raylib_ad.options import TrainOptions
    from raylib_ad.tracking.mlflow_run import TrainingRun, run_params

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = TrainOptions(model="padim", root="datasets", out="runs/x", progress=False, verbose=True)
    tracked = TrainingRun(experiment="e", run_name="padim", params=run_params(options.to_dict()), uri=uri)
    time.sleep(1.0)  # the fit
    run_id = tracked.finish(metrics={"image_auroc": 0.9, "random_weights": True}, model_dir=None,
                            history=[{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "train_loss": 0.4}],
                            params={"layers": ["layer1"]})
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.end_time - run.info.start_time >= 1000
    params = run.data.params
    assert not {"progress", "verbose", "overwrite", "mlflow", "local_ray"} & set(params)
    assert params["root"] == str(tmp_path / "datasets") and params["out"] == str(tmp_path / "runs" / "x")
    assert params["model"] == "padim" and params["layers"] == "['layer1']"
    assert run.data.metrics["image_auroc"] == 0.9
    assert [m.step for m in client.get_metric_history(run_id, "epoch_train_loss")] == [1, 2]


def test_a_failed_training_ends_its_run_as_failed(tmp_path):
    from mlflow import MlflowClient

    from raylib_ad.tracking.mlflow_run import TrainingRun

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = TrainingRun(experiment="e", run_name="r", params={}, uri=uri)
    run_id = tracked.run_id
    tracked.fail()
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FAILED"
