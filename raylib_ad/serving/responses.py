"""A prediction (TrainedModel.predict's dict) -> the JSON the API returns."""

from __future__ import annotations

import base64
from typing import Any

from raylib_ad.serving.models import ModelInfo


def prediction_response(prediction: dict[str, Any], info: ModelInfo, with_map: bool = False,
                        filename: str | None = None, size: tuple[int, int] | None = None) -> dict[str, Any]:
    """{score, normalized_score, is_anomalous, threshold, model: {name, version}[, anomaly_map_png]}.
    A model directory without stats.json has no threshold: those three fields are null then."""
    out: dict[str, Any] = {}
    if filename is not None:
        out["filename"] = filename
    # PREDICTION_FIELDS, the names TrainedModel.predict and `raylib-ad predict` use too.
    out.update({
        "score": float(prediction["score"]),
        "normalized_score": _float_or_none(prediction.get("normalized_score")),
        "is_anomalous": _bool_or_none(prediction.get("is_anomalous")),
        "threshold": _float_or_none(prediction.get("threshold")),
        "model": info.public(),
    })
    if "boxes" in prediction:  # region models (R-KDE): the boxes behind the score, in the image's pixels
        out["boxes"] = prediction["boxes"]
    if with_map:
        out["anomaly_map_png"] = map_png_base64(prediction, size)
    return out


def score_group(jobs: list[tuple[Any, Any, bool, str | None]]) -> list[dict[str, Any]]:
    """(slot, RGB array, with_map, filename) jobs of ONE category -> their responses, from one forward pass.
    (Here rather than in app.py: Serve pickles the deployment class by value, and a helper defined beside
    it would not travel with it.)"""
    trained, info = jobs[0][0].snapshot()  # one model for the whole group, even if a reload lands meanwhile
    predictions = trained.predict([array for _, array, _, _ in jobs], with_maps=any(m for _, _, m, _ in jobs))
    return [prediction_response(p, info, with_map, name, size=(array.shape[1], array.shape[0]))
            for p, (_, array, with_map, name) in zip(predictions, jobs)]


def map_png_base64(prediction: dict[str, Any], size: tuple[int, int] | None = None) -> str | None:
    """The anomaly map as a base64 PNG (jet colours, 0..1 = normalized scores, the threshold 0.5 outlined in
    white), at `size` (the request image's (width, height)) or the model's input size. Raw-map min/max
    scaling, no outline, when the model has no stats; None if it has no map."""
    from raylib_ad.postprocess.plots import anomaly_map_png

    amap = prediction.get("normalized_map")
    if amap is not None:
        png = anomaly_map_png(amap, vmin=0.0, vmax=1.0, size=size, threshold=0.5)
    elif prediction.get("anomaly_map") is not None:
        png = anomaly_map_png(prediction["anomaly_map"], size=size)
    else:
        return None
    return base64.b64encode(png).decode("ascii")


def _float_or_none(value) -> float | None:
    return None if value is None else float(value)


def _bool_or_none(value) -> bool | None:
    return None if value is None else bool(value)
