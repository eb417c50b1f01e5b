"""Multi-layer feature extractor over any timm backbone, with layers chosen by timm's module names."""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Sequence

import timm
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ...errors import ConfigError
from .weights import resolve_weights


def feature_layers(backbone: str) -> tuple[list[str], list[int]]:
    """timm's feature module names for `backbone` (e.g. layer1..layer4, or blocks.1/2/4/6) and strides."""
    names, strides, _, _ = _probe(backbone)
    return list(names), list(strides)


def backbone_mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input normalization the backbone was pretrained with (timm's pretrained config)."""
    _, _, mean, std = _probe(backbone)
    return mean, std


@functools.lru_cache(maxsize=64)
def _probe(backbone: str) -> tuple[tuple[str, ...], tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
    """Layer names, strides and normalization of a backbone, from a weightless instance (cached)."""
    try:
        model = timm.create_model(backbone, pretrained=False, features_only=True)
    except RuntimeError as err:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"unknown backbone '{backbone}': {err}") from err
    cfg = model.pretrained_cfg
    return (tuple(model.feature_info.module_name()), tuple(model.feature_info.reduction()),
            tuple(cfg.get("mean", (0.485, 0.456, 0.406))), tuple(cfg.get("std", (0.229, 0.224, 0.225))))


def module_layer(backbone: str, layer: str) -> tuple[int, int, int]:
    """A layer given as any module path of the backbone's timm features net that is not one of its feature
    layers (e.g. `blocks.5.8`, tf_efficientnet_b5's last 304-channel block at stride 32, the layer anomalib's
    CS-Flow takes from torchvision's EfficientNet-B5 as `features.6.8`): (channels, stride, index of the
    first feature layer whose forward runs it). Raises ConfigError naming the choices when it is neither."""
    names = list(_probe(backbone)[0])
    try:
        return _module_geometry(backbone, layer)
    except (AttributeError, KeyError) as err:
        raise ConfigError(
            f"layer '{layer}' is not a feature layer of backbone '{backbone}' nor a module of it; choose from "
            f"{names}, or give a module path of timm's '{backbone}' (a block, e.g. 'blocks.5.8')"
        ) from err


@functools.lru_cache(maxsize=64)
def _module_geometry(backbone: str, layer: str) -> tuple[int, int, int]:
    model = timm.create_model(backbone, pretrained=False, features_only=True).eval()
    module = model.get_submodule(layer)  # AttributeError when there is no such module
    names = model.feature_info.module_name()
    order = [name for name, _ in model.named_modules()]
    position = order.index(layer)
    covering = next((i for i, f in enumerate(names)
                     if layer == f or layer.startswith(f + ".") or order.index(f) > position), None)
    if covering is None:
        raise KeyError(layer)
    seen = {}
    handle = module.register_forward_hook(lambda _m, _i, out: seen.setdefault("out", out))
    side = 256
    with torch.no_grad():
        model(torch.zeros(1, 3, side, side))
    handle.remove()
    out = seen.get("out")
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise KeyError(layer)  # not a module with a (B, C, h, w) output
    return int(out.shape[1]), int(round(side / out.shape[-1])), covering


class FeatureExtractor(nn.Module):
    """Returns {layer_name: feature map} for the requested layers.

    pretrained=True loads ImageNet weights from a local file, an offline package, or timm's hub
    (see components/weights.py); it never silently falls back to random weights.
    """

    def __init__(
        self,
        backbone: str,
        layers: Sequence[str],
        pretrained: bool = True,
        weights: str | None = None,
        requires_grad: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.layers = list(layers)
        names = list(_probe(backbone)[0])
        if not self.layers:
            raise ConfigError(f"no layers given for backbone '{backbone}'; choose from {names}")
        # Layers that are not timm feature layers but modules of the net (module_layer) are read with a
        # forward hook during the pass that runs to the first feature layer covering them.
        self.hooked = {layer: module_layer(backbone, layer) for layer in self.layers if layer not in names}
        out_indices = tuple(sorted({names.index(layer) for layer in self.layers if layer not in self.hooked}
                                   | {geometry[2] for geometry in self.hooked.values()}))
        kwargs = dict(features_only=True, out_indices=out_indices)
        if pretrained:
            path = resolve_weights(backbone, weights)
            kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=path) if path else {})
        self.model = timm.create_model(backbone, **kwargs)
        self._truncate_after(max(out_indices))
        info = self.model.feature_info
        self.out_layers = [names[i] for i in out_indices]  # what the timm net returns, in order
        channels, strides = dict(zip(self.out_layers, info.channels())), dict(zip(self.out_layers, info.reduction()))
        for layer, (c, stride, _) in self.hooked.items():
            channels[layer], strides[layer] = c, stride
        self.channels = {layer: channels[layer] for layer in self.layers}
        self.strides = {layer: strides[layer] for layer in self.layers}
        cfg = self.model.pretrained_cfg
        self.mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(cfg.get("std", (0.229, 0.224, 0.225)))
        # channels_last runs these convnets ~1.6x faster on CPU (measured: tf_efficientnet_lite0,
        # 256 px, 1 thread, 93 -> 57 ms/image) and is what tensor cores prefer on GPU.
        self.model.to(memory_format=torch.channels_last)
        self.requires_grad_(requires_grad)
        self.trainable = requires_grad
        self.train()  # timm builds in train mode; a frozen extractor must start (and stay) in eval mode
        # A frozen extractor runs a copy with batch norm folded into the convolutions (built on first use,
        # rebuilt whenever the weights change; not a submodule: it is in no state_dict).
        self.__dict__["_folded"] = None

    # On CPU a frozen extractor runs chunks of about this many input pixels (two 256 px images): a whole
    # batch of 32 at 256 px streams ~200 MB per early layer through memory, two images stay in cache.
    # Measured (tf_efficientnet_lite0 to blocks.4, 1 thread): 64 ms/image at batch 32, 35 at 8, 25 at 2.
    cpu_chunk_pixels = 2 * 256 * 256

    def _truncate_after(self, last_index: int) -> None:
        # EfficientNet-style feature nets run every block even when the last requested feature comes
        # early; dropping the unused tail saves up to a third of the forward pass.
        blocks = getattr(self.model, "blocks", None)
        names = self.model.feature_info.module_name()
        last = names[-1] if last_index >= len(names) else names[last_index]
        if isinstance(blocks, nn.Sequential) and last.startswith("blocks."):
            keep = int(last.split(".")[1]) + 1
            self.model.blocks = blocks[:keep]
            for attr in ("conv_head", "bn2"):
                if hasattr(self.model, attr):
                    setattr(self.model, attr, nn.Identity())

    def train(self, mode: bool = True):
        # A frozen backbone stays in eval mode so batch-norm statistics never drift during training.
        super().train(mode and self.trainable)
        return self

    def __getstate__(self):
        return {**self.__dict__, "_folded": None}  # a derived copy: rebuilt on first use, never pickled

    def _run(self, model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
        """The requested layers' maps, in the order of self.layers: the timm net's outputs, and the hooked
        module layers' outputs from the same pass (hooks on `model`, which may be the folded copy)."""
        if not self.hooked:
            return list(model(images))
        seen: dict[str, torch.Tensor] = {}
        handles = [model.get_submodule(layer).register_forward_hook(
            lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out)) for layer in self.hooked]
        try:
            outputs = dict(zip(self.out_layers, model(images)))
        finally:
            for handle in handles:
                handle.remove()
        outputs.update(seen)
        return [outputs[layer] for layer in self.layers]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = images.contiguous(memory_format=torch.channels_last)
        if self.trainable:
            return dict(zip(self.layers, self._run(self.model, images)))
        with torch.no_grad():
            if torch.jit.is_tracing() or torch.compiler.is_compiling():
                # A traced graph (ONNX export) keeps the backbone's own weights and one pass over any batch.
                return dict(zip(self.layers, self._run(self.model, images)))
            model = self._inference_model(images)
            chunk = len(images)
            if images.device.type == "cpu" and images.dim() == 4:
                chunk = max(1, self.cpu_chunk_pixels // (images.shape[-1] * images.shape[-2]))
            if chunk >= len(images):
                features = self._run(model, images)
            else:
                parts = [self._run(model, images[i : i + chunk]) for i in range(0, len(images), chunk)]
                features = [torch.cat(maps) for maps in zip(*parts)]
        return dict(zip(self.layers, features))

    # -- batch-norm folding (frozen extractors) ----------------------------------------------------
    def _weights_key(self) -> tuple:
        # Identity and in-place version of every weight: load_state_dict (copy_), .to() and in-place edits
        # all change it, so a stale folded copy is never used.
        return tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in
                     (*self.model.parameters(), *self.model.buffers()))

    def _inference_model(self, images: torch.Tensor) -> nn.Module:
        """The backbone to run for a frozen forward: a copy with every convolution's batch norm folded into
        its weights (one pass over memory instead of two per layer: ~1.4x faster on CPU, measured 64 -> 41
        ms/image at batch 32), identical up to float rounding. Falls back to the backbone itself when a
        folded copy does not reproduce it (a network whose batch norm is not applied to the preceding
        convolution's output)."""
        key = self._weights_key()
        cached = self.__dict__["_folded"]
        if cached is not None and cached[0] == key:
            return cached[1]
        model = self.model
        with torch.inference_mode(False), torch.no_grad():
            folded = _fold_batch_norms(self.model)
            if folded is not None:
                probe = images[:1]
                ref, out = self._run(self.model, probe), self._run(folded, probe)
                if all(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(a.abs().max()) + 1e-6)
                       for a, b in zip(ref, out)):
                    model = folded
                else:
                    warnings.warn(f"{self.backbone}: batch norm folding changed the features; running unfolded")
        self.__dict__["_folded"] = (key, model)
        return model


def _fold_batch_norms(model: nn.Module) -> nn.Module | None:
    """An eval-mode copy of `model` with each BatchNorm2d that directly follows a Conv2d sibling folded into
    that convolution (timm's BatchNormAct2d keeps its activation); None when there is nothing to fold."""
    folded = copy.deepcopy(model).eval()
    count = 0

    def visit(module: nn.Module) -> None:
        nonlocal count
        names = list(module._modules)
        for conv_name, bn_name in zip(names, names[1:]):
            conv, bn = module._modules[conv_name], module._modules[bn_name]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                    and bn.track_running_stats and bn.running_mean is not None
                    and bn.num_features == conv.out_channels):
                module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
                # timm's BatchNormAct2d = batch norm, then its dropout and activation: those stay.
                tail = [getattr(bn, name) for name in ("drop", "act") if isinstance(getattr(bn, name, None), nn.Module)]
                module._modules[bn_name] = nn.Sequential(*tail) if tail else nn.Identity()
                count += 1
        for child in module._modules.values():
            if child is not None:
                visit(child)

    visit(folded)
    if count == 0:
        return None
    return folded.to(memory_format=torch.channels_last).requires_grad_(False)
