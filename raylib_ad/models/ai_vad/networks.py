"""The four pretrained networks of AI-VAD, built as anomalib builds them ("full") or as small random
networks of the same families ("tiny", for tests and smoke runs), and where their weights come from.

Full networks (anomalib's): torchvision Mask R-CNN ResNet-50 FPN v2 (COCO), Keypoint R-CNN ResNet-50 FPN
(COCO), RAFT large (C_T_SKHT_V2), and the image tower of CLIP ViT-B/16 (OpenAI) through open_clip.
Weights of each, in order of preference:
1. its setting: detector_weights / keypoint_weights / flow_weights / clip_weights = PATH;
2. ``$RAYLIB_AD_WEIGHTS_DIR/<fixed name>`` (FILE_NAMES below, or torchvision's own file name;
   for CLIP ``ViT-B-16.{safetensors,pt,pth,bin}``, ``ViT-B-16-openai.*`` or OpenAI's ``ViT-B-16.pt``);
3. torch's hub cache (``~/.cache/torch/hub/checkpoints``) / the huggingface cache for CLIP;
4. a download, when the host answers and $RAYLIB_AD_OFFLINE is not set.
Offline with none of these: one WeightsUnavailableError naming every missing file and the ways out.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import WeightsUnavailableError

# setting -> (file name looked for in $RAYLIB_AD_WEIGHTS_DIR, torchvision weights enum path)
FILE_NAMES = {
    "detector_weights": "maskrcnn_resnet50_fpn_v2.pth",
    "keypoint_weights": "keypointrcnn_resnet50_fpn.pth",
    "flow_weights": "raft_large.pth",
    "clip_weights": "ViT-B-16.pt",
}
_TORCHVISION_URLS = {  # the DEFAULT weights anomalib asks torchvision for
    "detector_weights": "https://download.pytorch.org/models/maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
    "keypoint_weights": "https://download.pytorch.org/models/keypointrcnn_resnet50_fpn_coco-fc266e95.pth",
    "flow_weights": "https://download.pytorch.org/models/raft_large_C_T_SKHT_V2-ff5fadd5.pth",
}
_DESCRIPTION = {
    "detector_weights": "Mask R-CNN ResNet-50 FPN v2 (COCO)",
    "keypoint_weights": "Keypoint R-CNN ResNet-50 FPN (COCO)",
    "flow_weights": "RAFT large (C_T_SKHT_V2)",
    "clip_weights": "CLIP ViT-B/16 (OpenAI, open_clip format)",
}
CLIP_MODEL, CLIP_TAG = "ViT-B-16", "openai"  # anomalib: clip.load("ViT-B/16")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DOWNLOAD_HOST = ("download.pytorch.org", 443)

# Tiny networks: same families and code paths, a few thousand parameters each.
TINY_CLIP = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16}}


# --- weights ----------------------------------------------------------------------------------------

def _offline() -> bool:
    return os.environ.get("RAYLIB_AD_OFFLINE", "") not in ("", "0")


def _reachable(host: tuple[str, int], timeout: float = 1.5) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _find_torchvision(setting: str, explicit: str | None, download: bool) -> str | None:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"ai_vad: {setting}={explicit!r}: no such file "
                                          f"(expected the {_DESCRIPTION[setting]} state dict)")
        return str(path)
    url_name = _TORCHVISION_URLS[setting].rsplit("/", 1)[-1]
    env_dir = os.environ.get("RAYLIB_AD_WEIGHTS_DIR")
    if env_dir:
        stem = FILE_NAMES[setting].rsplit(".", 1)[0]
        for name in (f"{stem}.pth", f"{stem}.pt", f"{stem}.safetensors", url_name):
            if (Path(env_dir) / name).is_file():
                return str(Path(env_dir) / name)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / url_name
    if cached.is_file():
        return str(cached)
    if not _offline() and _reachable(_DOWNLOAD_HOST):
        if not download:
            return "(download)"
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(_TORCHVISION_URLS[setting], str(cached), progress=False)
        return str(cached)
    return None


def _find_clip(explicit: str | None, download: bool) -> str | None:
    from ..winclip.clip import _in_hub_cache, _may_download, _pretrained_cfg, open_clip_module, weight_file_names

    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"ai_vad: clip_weights={explicit!r}: no such file "
                                          f"(expected an open_clip checkpoint of {CLIP_MODEL})")
        return str(path)
    cfg = _pretrained_cfg(CLIP_MODEL, CLIP_TAG)
    env_dir = os.environ.get("RAYLIB_AD_WEIGHTS_DIR")
    if env_dir:
        for name in weight_file_names(CLIP_MODEL, CLIP_TAG, cfg):
            if (Path(env_dir) / name).is_file():
                return str(Path(env_dir) / name)
    if cfg:
        cached = _in_hub_cache(cfg)
        if cached:
            return cached
        if _may_download():
            return open_clip_module().download_pretrained(cfg) if download else "(download)"
    return None


def resolve_all(settings: dict[str, Any], download: bool = True) -> dict[str, str]:
    """setting -> local file for each full network; raises one error naming every missing file."""
    found, missing = {}, []
    for setting in FILE_NAMES:
        path = (_find_clip(settings.get(setting), download) if setting == "clip_weights"
                else _find_torchvision(setting, settings.get(setting), download))
        if path is None:
            missing.append(setting)
        else:
            found[setting] = path
    if missing:
        raise WeightsUnavailableError(_offline_message(missing))
    return found


def _offline_message(missing: list[str]) -> str:
    lines = ["ai_vad: pretrained weights are not available for: "
             + ", ".join(_DESCRIPTION[m] for m in missing)
             + " (no local copy, and the download hosts cannot be used: offline or $RAYLIB_AD_OFFLINE). Ways out:"]
    for setting in missing:
        source = _TORCHVISION_URLS.get(setting, "https://huggingface.co/timm/vit_base_patch16_clip_224.openai")
        lines.append(f"  - {_DESCRIPTION[setting]}: --set {setting}=PATH, or put it at "
                     f"$RAYLIB_AD_WEIGHTS_DIR/{FILE_NAMES[setting]} (from {source});")
    lines.append("  - or fill torch's hub cache (~/.cache/torch/hub/checkpoints) and the huggingface cache on a "
                 "machine with network by building the networks once there, and copy them;")
    lines.append("  - serve or evaluate a model directory written earlier: it holds every network's weights;")
    lines.append("  - pipeline checks only (meaningless scores): --set pretrained=false (random full networks) "
                 "or --set networks=tiny (small random networks).")
    return "\n".join(lines)


def _read(path: str) -> dict[str, torch.Tensor]:
    from ..components.weights import read_state_dict

    return read_state_dict(path)


def _load(module: nn.Module, path: str, setting: str) -> None:
    try:
        module.load_state_dict(_read(path), strict=True)
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise WeightsUnavailableError(f"ai_vad: {path} is not a {_DESCRIPTION[setting]} state dict "
                                      f"({setting}): {str(err).splitlines()[0]}") from err


# --- builders ---------------------------------------------------------------------------------------

def _tiny_backbone() -> nn.Module:
    body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU())
    body.out_channels = 16
    return body


def _tiny_detection_kwargs(image_size: int) -> dict[str, Any]:
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    return dict(min_size=image_size, max_size=image_size,
                rpn_anchor_generator=AnchorGenerator(((8, 16, 32),), ((0.5, 1.0, 2.0),)),
                rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20, box_detections_per_img=10,
                box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_head=TwoMLPHead(16 * 49, 32))


def build_detector(kind: str, image_size: int, box_score_thresh: float) -> nn.Module:
    """anomalib: maskrcnn_resnet50_fpn_v2(box_score_thresh=..., rpn_nms_thresh=0.3), COCO's 91 classes."""
    from torchvision.models import detection

    if kind == "full":
        return detection.maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=91,
                                                  box_score_thresh=box_score_thresh, rpn_nms_thresh=0.3)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    kwargs = _tiny_detection_kwargs(image_size)
    return detection.MaskRCNN(_tiny_backbone(), num_classes=None, box_score_thresh=box_score_thresh,
                              rpn_nms_thresh=0.3, box_predictor=FastRCNNPredictor(32, 91),
                              mask_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                              mask_head=MaskRCNNHeads(16, [16], 1), mask_predictor=MaskRCNNPredictor(16, 16, 91),
                              **kwargs)


def build_keypoint_model(kind: str, image_size: int) -> nn.Module:
    """anomalib: keypointrcnn_resnet50_fpn (COCO persons, 17 keypoints); only its transform, backbone and
    keypoint head are run, on the given boxes."""
    from torchvision.models import detection

    if kind == "full":
        return detection.keypointrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2,
                                                   num_keypoints=17)
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
    from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
    from torchvision.ops import MultiScaleRoIAlign

    return detection.KeypointRCNN(_tiny_backbone(), num_classes=None, box_predictor=FastRCNNPredictor(32, 2),
                                  keypoint_roi_pool=MultiScaleRoIAlign(["0"], 14, 2),
                                  keypoint_head=KeypointRCNNHeads(16, [16]),
                                  keypoint_predictor=KeypointRCNNPredictor(16, 17),
                                  **_tiny_detection_kwargs(image_size))


def build_raft(kind: str) -> nn.Module:
    from torchvision.models.optical_flow import raft_large
    from torchvision.models.optical_flow.raft import BottleneckBlock, _raft

    if kind == "full":
        return raft_large(weights=None)
    return _raft(feature_encoder_layers=(8, 8, 12, 16, 16), feature_encoder_block=BottleneckBlock,
                 feature_encoder_norm_layer=nn.InstanceNorm2d, context_encoder_layers=(8, 8, 12, 16, 24),
                 context_encoder_block=BottleneckBlock, context_encoder_norm_layer=None,
                 corr_block_num_levels=2, corr_block_radius=1, motion_encoder_corr_layers=(16,),
                 motion_encoder_flow_layers=(8, 8), motion_encoder_out_channels=18,
                 recurrent_block_hidden_state_size=16, recurrent_block_kernel_size=(3,),
                 recurrent_block_padding=(1,), flow_head_hidden_size=16, use_mask_predictor=False)


def build_clip_visual(kind: str, weights: str | None) -> nn.Module:
    """The image tower of an open_clip CLIP (the text tower is never used by AI-VAD, so it is not kept)."""
    from ..winclip.clip import open_clip_module

    open_clip = open_clip_module()
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if kind == "tiny":
        return _build_vision_tower(TINY_CLIP["embed_dim"], CLIPVisionCfg(**TINY_CLIP["vision_cfg"]))
    cfg = open_clip.get_model_config(CLIP_MODEL)
    if weights is None:
        # OpenAI's weights were trained with QuickGELU (open_clip's pretrained config says so).
        return _build_vision_tower(cfg["embed_dim"], CLIPVisionCfg(**cfg["vision_cfg"]), quick_gelu=True)
    clip = open_clip.CLIP(**cfg, quick_gelu=True)
    try:
        # OpenAI's own ViT-B-16.pt is a TorchScript archive, which torch.load refuses with weights_only;
        # open_clip reads its state dict through torch.jit.load (no pickled code is run).
        open_clip.load_checkpoint(clip, weights, strict=True, weights_only=not _is_torchscript(weights))
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise WeightsUnavailableError(f"ai_vad: {weights} is not an open_clip {CLIP_MODEL} checkpoint "
                                      f"(clip_weights): {str(err).splitlines()[0]}") from err
    return clip.visual


def _is_torchscript(path: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def build_networks(kind: str, image_size: int, box_score_thresh: float, seed: int,
                   weights: dict[str, str] | None) -> dict[str, nn.Module]:
    """All four networks, random ones drawn from `seed` alone, then the pretrained weights if given."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nets = {"detector": build_detector(kind, image_size, box_score_thresh),
                "keypoints": build_keypoint_model(kind, image_size),
                "raft": build_raft(kind),
                "clip": build_clip_visual(kind, (weights or {}).get("clip_weights"))}
    if weights:
        _load(nets["detector"], weights["detector_weights"], "detector_weights")
        _load(nets["keypoints"], weights["keypoint_weights"], "keypoint_weights")
        _load(nets["raft"], weights["flow_weights"], "flow_weights")
    for net in nets.values():
        net.requires_grad_(False)
        net.eval()
    return nets
