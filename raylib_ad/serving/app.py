"""The Ray Serve application: one deployment, a FastAPI ingress, every category.

    POST /v1/categories/{category}/predict[?map=true]   raw image bytes, or multipart with several files;
                                                        for a video model one clip: a video file, or its
                                                        frames as multipart files (video_predict.py)
    POST /v1/categories/{category}/reload               check for a new version now (this replica)
    GET  /v1/categories                                 what can be served, with versions
    GET  /healthz                                       liveness; the categories loaded on this replica
    GET  /docs                                          OpenAPI

A replica keeps up to RAYLIB_AD_SERVE_MAX_MODELS (8) categories loaded (`serve.multiplexed`, LRU,
keyed by category) and scores images in batches (`serve.batch`), grouped by category so one forward
pass covers every image of a category in the batch. Everything that does not need Ray lives beside this
file; this module is the glue. `serve/app.py` re-exports `build_app` for `serve run serve/config.yaml`.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from raylib_ad.serving.decode import decode_image, read_body
from raylib_ad.serving.errors import BadRequest, PayloadTooLarge, ServingError
from raylib_ad.serving.models import Catalog, ModelSlot, resolve_device
from raylib_ad.serving.responses import score_group
from raylib_ad.serving.settings import ServeSettings
from raylib_ad.video_predict import clip_length_of, clip_response

# Read when the replica imports this module; set it in the deployment's runtime_env to change it.
MAX_MODELS_PER_REPLICA = int(os.environ.get("RAYLIB_AD_SERVE_MAX_MODELS", "8"))

api = FastAPI(title="raylib_ad", version="1",
              description="Visual anomaly detection: the champion model of each product category over HTTP.")


@api.exception_handler(ServingError)
async def _serving_error(request: Request, err: ServingError) -> JSONResponse:
    return JSONResponse(status_code=err.status, content={"detail": err.message})


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_IMAGE_BODY = {"requestBody": {"required": True, "content": {
    "image/png": _BINARY, "image/jpeg": _BINARY, "application/octet-stream": _BINARY,
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
}}}


@serve.deployment(
    name="AnomalyDetector",
    # Fractional CPUs: on a 2-core machine whole-CPU replicas starve everything else (docs/design.md).
    ray_actor_options={"num_cpus": 0.5},
    max_ongoing_requests=64,
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16},
)
@serve.ingress(api)
class AnomalyDetector:
    def __init__(self, settings: dict[str, Any]):
        self.settings = ServeSettings.from_dict(settings)
        if self.settings.torch_threads:
            import torch

            torch.set_num_threads(self.settings.torch_threads)
        self.device = resolve_device(self.settings.device)
        self.catalog = Catalog(self.settings)
        # The multiplex cache owns the slots; this weak view only reports what is loaded.
        self._loaded: weakref.WeakValueDictionary[str, ModelSlot] = weakref.WeakValueDictionary()
        self._score.set_max_batch_size(self.settings.max_batch_size)
        self._score.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)

    # ---- models -------------------------------------------------------------------------------------
    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def _slot(self, category: str) -> ModelSlot:
        slot = await asyncio.to_thread(ModelSlot.open, category, self.catalog, self.device,
                                       self.settings.champion_ttl_s)
        self._loaded[category] = slot
        return slot

    async def _known_slot(self, category: str) -> ModelSlot:
        if category not in self._loaded:  # a first load (or after eviction): an unknown category is answered
            await asyncio.to_thread(self.catalog.require, category)  # 404 here, not as a failed model load
        return await self._slot(category)

    async def _current_slot(self, category: str) -> ModelSlot:
        slot = await self._known_slot(category)
        if not slot.is_fresh():  # at most every champion_ttl_s: ask the catalog whether the version moved
            await asyncio.to_thread(slot.refresh)
        return slot

    # ---- API ----------------------------------------------------------------------------------------
    @api.get("/healthz", summary="Liveness, and the categories loaded on the replica that answers")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "loaded": sorted(self._loaded.keys())}

    @api.get("/v1/categories", summary="Categories that can be served, with their current versions")
    async def categories(self) -> dict[str, Any]:
        infos = await asyncio.to_thread(self.catalog.list)
        out = []
        for info in infos:
            slot = self._loaded.get(info.category)
            loaded = slot.info if slot is not None else None
            out.append({"category": info.category, "source": info.source, "name": info.name,
                        "version": info.version, "loaded_version": loaded.version if loaded else None})
        return {"categories": out}

    @api.post("/v1/categories/{category}/predict", openapi_extra=_IMAGE_BODY,
              summary="Score one image (raw bytes) or several (multipart); a list for multipart. A video "
                      "model's category takes one clip (a video file, or frames as multipart files) and "
                      "answers per-frame scores")
    async def predict(self, category: str, request: Request,
                      with_map: bool = Query(False, alias="map", description="add anomaly_map_png (base64)")):
        body = await read_body(request.stream(), self.settings.max_body_bytes, request.headers.get("content-length"))
        multipart = request.headers.get("content-type", "").startswith("multipart/form-data")
        files = await self._form_files(request, body) if multipart else [(None, body)]
        slot = await self._current_slot(category)
        if clip_length_of(slot.snapshot()[0]) is not None:  # a video model: the payload is one clip
            return await asyncio.to_thread(clip_response, slot, files, self.settings.max_image_pixels, with_map)
        arrays = await asyncio.gather(*(
            asyncio.to_thread(decode_image, data, self.settings.max_image_pixels,
                              f"file {name!r}" if name is not None else "request body")
            for name, data in files))
        results = await asyncio.gather(*(self._score((slot, array, with_map, name))
                                         for (name, _), array in zip(files, arrays)))
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results if multipart else results[0]

    @api.post("/v1/categories/{category}/reload",
              summary="Check the category's current version now and load it if it moved (this replica)")
    async def reload(self, category: str) -> dict[str, Any]:
        slot = await self._known_slot(category)
        before = slot.info
        changed = await asyncio.to_thread(slot.refresh, True)
        return {"category": category, "changed": changed, "previous": before.public() if before else None,
                "model": slot.info.public()}

    async def _form_files(self, request: Request, body: bytes) -> list[tuple[str, bytes]]:
        """The file parts of a multipart body already read (and size-checked) by read_body."""
        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=self.settings.max_files)
        except (StarletteHTTPException, MultiPartException) as err:
            message = getattr(err, "detail", None) or getattr(err, "message", str(err))
            if "Too many files" in message:
                raise PayloadTooLarge(f"more than {self.settings.max_files} files in one request (max_files)") from None
            raise BadRequest(f"multipart body cannot be parsed: {message}") from None
        except Exception as err:  # python-multipart's own parse errors: the body is the client's
            raise BadRequest(f"multipart body cannot be parsed: {type(err).__name__}: {err}") from None
        files = []
        for field, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or field, await value.read()))
        await form.close()
        if not files:
            raise BadRequest("multipart body has no file parts; send images as files, e.g. curl -F files=@part.png")
        return files

    # ---- batched scoring ----------------------------------------------------------------------------
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _score(self, jobs: list[tuple[ModelSlot, Any, bool, str | None]]) -> list[Any]:
        """Requests for different categories can share a batch: one forward pass per category."""
        groups: dict[str, list[int]] = {}
        for index, (slot, *_rest) in enumerate(jobs):
            groups.setdefault(slot.category, []).append(index)
        results: list[Any] = [None] * len(jobs)
        for indices in groups.values():
            try:
                outputs = await asyncio.to_thread(score_group, [jobs[i] for i in indices])
            except Exception as err:  # returned, not raised: the other categories' requests still succeed
                outputs = [err] * len(indices)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results


def build_app(args: dict[str, Any] | None = None):
    """Application builder for `serve run serve/config.yaml` (its `args:`); Serve wants exactly one
    parameter here. Deployment options (replicas, CPUs, GPUs) come from the config's `deployments:`."""
    return build_application(args)


def build_application(args: dict[str, Any] | None = None, **deployment_options: Any):
    """The application, with deployment options (ray_actor_options, autoscaling_config, ...) as
    `raylib-ad serve` passes them. Settings are checked here, on the driver, and the tracking URI is
    pinned here: replicas do not share the driver's working directory, where the default ./mlflow.db is."""
    settings = ServeSettings.from_dict(args)
    if settings.registry and not settings.tracking_uri:
        from raylib_ad.tracking.mlflow_run import tracking_uri

        settings = ServeSettings.from_dict({**settings.to_dict(), "tracking_uri": tracking_uri()})
    deployment = AnomalyDetector.options(**deployment_options) if deployment_options else AnomalyDetector
    return deployment.bind(settings.to_dict())
