"""Batch scoring on Ray Data: a pool of model replicas scoring image sets of any size (`raylib-ad predict
--out FILE.parquet`, batch.py) and labelled splits (split.py, what train and the sweep's tests use).

    inputs.py        files, folders, globs, manifests -> paths (no Ray)
    payload.py       a model directory as bytes for the object store, and back into a model
    replica.py       the decode stage and the ModelReplica actor (no Ray needed to call them)
    pipeline.py      the Ray Data pipelines and the replica pool's resources
    parquet_sink.py  FILE.parquet in resumable parts
"""
