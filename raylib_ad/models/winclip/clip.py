"""The CLIP side of WinCLIP: building an open_clip model, finding its weights, and running its image
tower on whole images and on sliding windows of patch tokens.

Weights come from, in order:
1. an explicit file (``weights=PATH`` / ``--weights PATH``) in open_clip's checkpoint format
   (a state dict, optionally under "state_dict"; .pt/.pth/.bin or .safetensors);
2. ``$RAYLIB_AD_WEIGHTS_DIR/<clip_model>.{safetensors,pt,pth,bin}``
   (default: ``ViT-B-16-plus-240.pt``; ``<clip_model>-<tag>.*`` and open_clip's release file name,
   ``vit_b_16_plus_240-laion400m_e31-8fb26589.pt``, are found there too);
3. open_clip's copy in the local huggingface cache, then the hub itself when it answers and
   $RAYLIB_AD_OFFLINE is not set.
Offline with none of these, WeightsUnavailableError names the ways out. open_clip is imported lazily,
so the rest of the zoo imports without it.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ConfigError, WeightsUnavailableError

CLIP_MODEL = "ViT-B-16-plus-240"  # anomalib's BACKBONE
CLIP_PRETRAINED = "laion400m_e31"  # anomalib's PRETRAINED tag
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN / STD
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def open_clip_module():
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("WinCLIP needs open_clip: pip install open-clip-torch") from err
    return open_clip


def clip_config(clip_model: str | dict[str, Any]) -> dict[str, Any]:
    """open_clip's model config for a registered name, or a config dict given directly (tests, custom
    towers: it is stored in config.json, so a model directory rebuilds without registering anything)."""
    if isinstance(clip_model, dict):
        cfg = copy.deepcopy(clip_model)
    else:
        cfg = open_clip_module().get_model_config(clip_model)
        if cfg is None:
            raise ConfigError(f"winclip: setting clip_model={clip_model!r} is not an open_clip model config; "
                              f"expected a name from open_clip.list_models() or a config dict")
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    missing += [k for k in ("vision_cfg", "text_cfg") if k in cfg and not isinstance(cfg[k], dict)]
    towers = [cfg[k] for k in ("vision_cfg", "text_cfg") if isinstance(cfg.get(k), dict)]
    foreign = [k for k in ("timm_model_name", "hf_model_name") if any(t.get(k) for t in towers)]
    foreign += ["custom_text"] if cfg.get("custom_text") else []
    if missing or foreign:
        raise ConfigError(f"winclip: setting clip_model={clip_model!r} is not usable: "
                          f"expected an open_clip ViT CLIP config (embed_dim, vision_cfg, text_cfg; no timm/hf "
                          f"towers); missing {missing}, unsupported {foreign}")
    return cfg


def build_clip(cfg: dict[str, Any], seed: int) -> nn.Module:
    """A randomly initialised open_clip CLIP drawn from `seed` alone, frozen and in eval mode."""
    open_clip = open_clip_module()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            clip = open_clip.CLIP(**cfg)
        except (TypeError, ValueError, AssertionError) as err:
            raise ConfigError(f"winclip: setting clip_model does not build an open_clip CLIP: {err}") from err
    visual = clip.visual
    # The window trick re-runs the ViT on subsets of its own patch tokens; it needs open_clip's ViT with
    # a class token read-out (anomalib's ViT-B-16-plus-240 is one).
    ok = (hasattr(visual, "conv1") and getattr(visual, "attn_pool", None) is None
          and getattr(visual, "pool_type", None) in ("tok", "avg")
          and not getattr(visual, "final_ln_after_pool", False))
    if not ok:
        raise ConfigError("winclip: setting clip_model must be an open_clip ViT with token or average pooling "
                          "(no attentional pooler)")
    clip.requires_grad_(False)
    return clip.eval()


def load_clip_weights(clip: nn.Module, path: str, description: str) -> None:
    open_clip = open_clip_module()
    try:
        open_clip.load_checkpoint(clip, path, strict=True)
    except (RuntimeError, KeyError, ValueError, OSError) as err:
        raise WeightsUnavailableError(
            f"{path} is not an open_clip checkpoint for {description}: {str(err).splitlines()[0]}") from err


def resolve_clip_weights(clip_model: str | dict, tag: str, weights: str | None) -> str:
    """A local checkpoint file for `clip_model` (downloading it into the hub cache when online)."""
    description = _describe(clip_model, tag)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsUnavailableError(f"CLIP weights file for {description} not found: {path}")
        return str(path)
    name = clip_model if isinstance(clip_model, str) else None
    pretrained_cfg = _pretrained_cfg(name, tag)
    env_dir = os.environ.get("RAYLIB_AD_WEIGHTS_DIR")
    if env_dir and name:
        for candidate in weight_file_names(name, tag, pretrained_cfg):
            if (Path(env_dir) / candidate).is_file():
                return str(Path(env_dir) / candidate)
    if pretrained_cfg:
        cached = _in_hub_cache(pretrained_cfg)
        if cached:
            return cached
        if _may_download():
            return open_clip_module().download_pretrained(pretrained_cfg)
    raise WeightsUnavailableError(_offline_message(clip_model, tag, pretrained_cfg))


def weight_file_names(name: str, tag: str, pretrained_cfg: dict | None = None) -> list[str]:
    """File names looked for in $RAYLIB_AD_WEIGHTS_DIR, preferred first."""
    names = [f"{name}{s}" for s in _SUFFIXES] + [f"{name}-{tag}{s}" for s in _SUFFIXES]
    url = (pretrained_cfg or {}).get("url") or ""
    if url:
        names.append(url.rsplit("/", 1)[-1])
    return names


def _describe(clip_model: str | dict, tag: str) -> str:
    return f"open_clip '{clip_model}' ({tag})" if isinstance(clip_model, str) else "the custom CLIP config"


def _pretrained_cfg(name: str | None, tag: str) -> dict | None:
    if not name or not tag:
        return None
    return open_clip_module().get_pretrained_cfg(name, tag) or None


def _in_hub_cache(pretrained_cfg: dict) -> str | None:
    hub = (pretrained_cfg.get("hf_hub") or "").rstrip("/")
    if not hub:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    model_id, filename = (hub, None) if hub.count("/") == 1 else hub.rsplit("/", 1)
    for candidate in ([filename] if filename else list(_HUB_FILES)):
        found = try_to_load_from_cache(model_id, candidate)
        if isinstance(found, str):
            return found
    return None


def _may_download() -> bool:
    if os.environ.get("RAYLIB_AD_OFFLINE", "") not in ("", "0"):
        return False
    from ..components.weights import _hub_reachable

    return _hub_reachable()


def _offline_message(clip_model: str | dict, tag: str, pretrained_cfg: dict | None) -> str:
    description = _describe(clip_model, tag)
    lines = [f"pretrained CLIP weights for {description} are not available: no local copy was found and "
             f"the hub cannot be used (offline, or $RAYLIB_AD_OFFLINE is set). Ways out:",
             "  - pass a local open_clip checkpoint: --weights PATH (or weights=PATH)"]
    if pretrained_cfg:
        hub = (pretrained_cfg.get("hf_hub") or "").rstrip("/")
        sources = [f"https://huggingface.co/{hub}" if hub else "", pretrained_cfg.get("url") or ""]
        lines[-1] += f", e.g. from {' or '.join(s for s in sources if s)};"
    else:
        lines[-1] += ";"
    if isinstance(clip_model, str):
        lines.append(f"  - put it at $RAYLIB_AD_WEIGHTS_DIR/{clip_model}.pt (or .safetensors/.pth/.bin);")
        lines.append(f"  - fill the huggingface cache on a machine with network: python -c \"import open_clip; "
                     f"open_clip.create_model('{clip_model}', pretrained='{tag}')\" and copy ~/.cache/huggingface;")
    lines.append("  - serve or evaluate a model directory written earlier: it holds the CLIP weights;")
    lines.append("  - build a random CLIP (pipeline checks only, meaningless scores): --set pretrained=false.")
    return "\n".join(lines)


# --- running the image tower ------------------------------------------------------------------------

def patch_tokens(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1 + P, width): class token and patch tokens with positions added, before the
    transformer (the tensor anomalib taps with a hook on patch_dropout)."""
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # (B, P, width)
    cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
    return torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)


def run_tower(visual: nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Finish the ViT on (N, L, width) token sequences -> (projected pooled embedding (N, E),
    normalized output tokens without the class token (N, L - 1, width))."""
    x = visual.ln_pre(visual.patch_dropout(tokens))
    # open_clip >= 2.26 runs its transformer batch-first and transposes itself when it is not; older
    # versions expect (L, N, D). anomalib permutes unconditionally, which under its allowed 2.26.0 makes
    # windows attend to each other; here each window is its own sequence on every version.
    if getattr(visual.transformer, "batch_first", None) is None:
        x = visual.transformer(x.transpose(0, 1)).transpose(0, 1)
    else:
        x = visual.transformer(x)
    x = visual.ln_post(x)
    pooled = x[:, 0] if visual.pool_type == "tok" else x[:, 1:].mean(dim=1)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return pooled, x[:, 1:]


def window_embeddings(visual: nn.Module, tokens: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """(B, 1 + P, width) tokens, (n_windows, k*k) patch indices -> (B, n_windows, E): the ViT run on the
    class token plus each window's patch tokens (positions kept), read out like a whole image."""
    batch, n_windows = tokens.shape[0], windows.shape[0]
    index = torch.cat([windows.new_zeros(n_windows, 1), windows + 1], dim=1)  # class token first
    selected = tokens[:, index].flatten(0, 1)  # (B * n_windows, 1 + k*k, width)
    pooled, _ = run_tower(visual, selected)
    return pooled.view(batch, n_windows, -1)
