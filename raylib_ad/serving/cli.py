"""`raylib-ad serve`: the same application as `serve run serve/config.yaml`, configured by flags."""

from __future__ import annotations

import argparse
import signal
import sys
import time

from raylib_ad.serving.settings import MiB


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("what to serve")
    src.add_argument("--model-dir", action="append", default=[], metavar="CATEGORY=DIR",
                     help="serve this model directory (written by train: OUT/model) as CATEGORY; repeatable")
    src.add_argument("--registry", action="store_true",
                     help="also serve the 'champion' version of models:/raylib_ad-<dataset>-<category>")
    src.add_argument("--dataset", help="the <dataset> of the registered names (with --registry)")
    src.add_argument("--tracking-uri", help="MLflow registry (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    src.add_argument("--champion-ttl-s", type=float, default=10.0,
                     help="replicas look for a new version at most this often (default 10)")
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument("--request-timeout-s", type=float, default=30.0, help="end-to-end limit per request")
    http.add_argument("--max-body-mb", type=float, default=20.0, help="request body limit (multipart included)")
    http.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="width x height limit per image")
    http.add_argument("--max-files", type=int, default=32, help="files per multipart request")
    rep = parser.add_argument_group("replicas")
    rep.add_argument("--device", default="auto", help="auto (cuda when the replica has a GPU), cpu, cuda:N")
    rep.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per replica (fractional is fine)")
    rep.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica")
    rep.add_argument("--min-replicas", type=int, default=1)
    rep.add_argument("--max-replicas", type=int, default=2)
    rep.add_argument("--target-ongoing-requests", type=float, default=16)
    rep.add_argument("--max-batch-size", type=int, default=16)
    rep.add_argument("--batch-wait-timeout-s", type=float, default=0.01)
    rep.add_argument("--torch-threads", type=int, help="torch intra-op threads per replica (default: Ray's)")


def run_serve(args: argparse.Namespace) -> int:
    """Start (or join: RAY_ADDRESS) a Ray cluster, deploy, and serve until Ctrl-C or SIGTERM (exit 0, one line)."""
    from raylib_ad.serving.app import build_application
    from raylib_ad.serving.settings import ServeSettings

    settings = ServeSettings.from_dict({  # checked before Ray starts: a typo costs no cluster start
        "model_dirs": args.model_dir, "registry": args.registry, "dataset": args.dataset,
        "tracking_uri": args.tracking_uri, "champion_ttl_s": args.champion_ttl_s, "device": args.device,
        "max_body_bytes": int(args.max_body_mb * MiB), "max_image_pixels": args.max_image_pixels,
        "max_files": args.max_files, "max_batch_size": args.max_batch_size,
        "batch_wait_timeout_s": args.batch_wait_timeout_s, "torch_threads": args.torch_threads,
    })
    app = build_application(settings.to_dict(),
                    ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
                    autoscaling_config={"min_replicas": args.min_replicas, "max_replicas": args.max_replicas,
                                        "target_ongoing_requests": args.target_ongoing_requests})
    import ray
    from ray import serve

    try:
        # serve.start runs ray.init, whose native failure-signal handler prints a stack dump on SIGTERM
        # and whose Python one exits 15 from wherever it lands: ours replaces both once Ray is up.
        serve.start(http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s})
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        serve.run(app, name="raylib_ad", route_prefix="/", blocking=False)
        print(f"raylib-ad serve: http://{args.host}:{args.port}/v1/categories (docs at /docs); Ctrl-C or "
              f"SIGTERM stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        stopped_by = "Ctrl-C"
    except _Stop:
        stopped_by = "SIGTERM"
    except SystemExit as exit_:  # Ray's own SIGTERM handler, during startup
        if exit_.code != signal.SIGTERM:
            raise
        stopped_by = "SIGTERM"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM does not cut the shutdown short
        serve.shutdown()
        ray.shutdown()
    print(f"raylib-ad serve: stopped ({stopped_by}); the applications and replicas are shut down", file=sys.stderr,
          flush=True)
    return 0


class _Stop(Exception):
    """Raised in the main thread by SIGTERM: ends the serving loop like Ctrl-C."""


def _stop_on_sigterm(signum, frame) -> None:
    raise _Stop()
