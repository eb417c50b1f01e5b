"""WinCLIP (Jeong et al., CVPR 2023, "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation").

A frozen CLIP (anomalib: open_clip ViT-B-16-plus-240, laion400m_e31) compares image embeddings with a
compositional prompt ensemble ("a photo of a flawless bottle." ... "a photo of the damaged bottle.").
Zero-shot: the anomalous-class probability of the whole image and of every k x k window of patch
tokens (scales 2 and 3), windows aggregated per patch by harmonic mean, scales by harmonic mean.
Few-shot (k_shot > 0): the patch tokens and window embeddings of k normal reference images form a
memory; half the cosine distance to the nearest memory entry is averaged with the zero-shot score.

No gradient training: zero-shot has an empty recipe, few-shot one Collect stage that draws the
references. The model directory holds the CLIP weights, the text embeddings and the memory.
"""

from __future__ import annotations

import hashlib
import warnings
from typing import Iterable

import torch
import torch.nn.functional as F

from ... import distributed
from ...errors import ConfigError
from ...progress import progress_bar
from ..base import AnomalyModel, AnomalyOutput, register_model
from .clip import (CLIP_MEAN, CLIP_MODEL, CLIP_PRETRAINED, CLIP_STD, build_clip, clip_config, load_clip_weights,
                   open_clip_module, patch_tokens, resolve_clip_weights, run_tower, window_embeddings)
from .prompting import prompt_ensemble
from .scoring import class_scores, harmonic_aggregation, visual_association, window_indices

TEMPERATURE = 0.07  # anomalib's (CLIP's) softmax temperature
DEFAULT_CLASS_NAME = "object"  # anomalib's fallback when neither the user nor the data names a class
_REFERENCE_CHUNK = 8  # reference images embedded per pass


def _int_in(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@register_model
class WinClip(AnomalyModel):
    name = "winclip"
    default_backbone = None  # CLIP through open_clip, not a timm backbone
    input_mean, input_std = CLIP_MEAN, CLIP_STD
    # anomalib's WinClip arguments; clip_model / clip_pretrained are its module constants BACKBONE and
    # PRETRAINED, made settings so tests (and users) can pick another open_clip ViT.
    # tests/test_zoo.py: a tiny offline instance (a 2-layer ViT, random weights)
    test_preset = {"clip_model": {"embed_dim": 16,
                                  "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 8,
                                                 "head_width": 16},
                                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                               "layers": 1}}}
    pretrained_prefixes = ("clip.",)  # the CLIP is never trained: left out of the workers' digests
    defaults = {"class_name": None, "k_shot": 0, "scales": [2, 3], "clip_model": CLIP_MODEL,
                "clip_pretrained": CLIP_PRETRAINED}
    # The paper's shot counts and the window scales it ablates.
    search_space = {
        "k_shot": {"choice": [0, 1, 2, 4]},
        "scales": {"choice": [[2, 3], [2], [3], [2, 3, 4]]},
    }

    @classmethod
    def check_weights(cls, backbone, weights, settings) -> None:
        resolve_clip_weights(settings["clip_model"], settings["clip_pretrained"], weights)

    def __init__(self, backbone: str | None = None, layers: Iterable[str] | None = None, **kwargs):
        if backbone is not None or layers:
            raise ConfigError("winclip has no timm backbone or layers; pick the CLIP with --set clip_model=NAME")
        super().__init__(None, None, **kwargs)
        s = self.settings
        self._check_setting("class_name", s["class_name"] is None or (isinstance(s["class_name"], str)
                                                                     and s["class_name"].strip() != ""),
                            "a non-empty string (the object's name in the prompts) or null")
        # config.json records the name the prompts were built from.
        s["class_name"] = s["class_name"] or DEFAULT_CLASS_NAME
        self._check_setting("k_shot", _int_in(s["k_shot"], 0), "an integer >= 0 (reference images)")
        self._check_setting("clip_pretrained", isinstance(s["clip_pretrained"], str),
                            "an open_clip pretrained tag such as 'laion400m_e31'")
        self._check_setting("clip_model", isinstance(s["clip_model"], (str, dict)),
                            "an open_clip model name or config dict")
        cfg = clip_config(s["clip_model"])
        # Find the weights before building a 200M-parameter CLIP: offline, fail in well under a second.
        path = resolve_clip_weights(s["clip_model"], s["clip_pretrained"], self.weights) if self.pretrained else None
        self.clip = build_clip(cfg, self.seed)
        if path is not None:
            load_clip_weights(self.clip, path, f"clip_model={s['clip_model']!r}")
        self.clip_size = tuple(int(v) for v in self.clip.visual.image_size)
        self.grid = tuple(int(v) for v in self.clip.visual.grid_size)
        scales = s["scales"]
        self._check_setting("scales", isinstance(scales, (list, tuple)) and len(scales) > 0
                            and all(_int_in(k, 1) and k <= min(self.grid) for k in scales),
                            f"a non-empty list of window sizes in patches, each in [1, {min(self.grid)}]")
        s["scales"] = [int(k) for k in scales]
        for i, kernel in enumerate(s["scales"]):  # fixed by the grid: not saved
            self.register_buffer(f"windows_{i}", window_indices(self.grid, kernel), persistent=False)
        # Filled by the fit or on first use; placeholders until then (artifact.load_state_resizing).
        self.register_buffer("text_embeddings", torch.empty(0))  # (2, E): normal, anomalous
        self.register_buffer("reference_patches", torch.empty(0))  # (K, P, width)
        for i in range(len(s["scales"])):
            self.register_buffer(f"reference_windows_{i}", torch.empty(0))  # (K, n_windows, E)

    # -- pieces ----------------------------------------------------------------------------------
    @property
    def k_shot(self) -> int:
        return int(self.settings["k_shot"])

    @property
    def windows(self) -> list[torch.Tensor]:
        return [getattr(self, f"windows_{i}") for i in range(len(self.settings["scales"]))]

    @property
    def reference_windows(self) -> list[torch.Tensor]:
        return [getattr(self, f"reference_windows_{i}") for i in range(len(self.settings["scales"]))]

    def train(self, mode: bool = True):
        # CLIP stays in eval mode: WinCLIP never trains it (and patch dropout must stay off).
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def prepare_text(self) -> torch.Tensor:
        """The averaged (normal, anomalous) prompt-ensemble embeddings, computed once on this device."""
        if self.text_embeddings.numel() == 0:
            normal, anomalous = prompt_ensemble(self.settings["class_name"])
            tokens = open_clip_module().tokenize(normal + anomalous, context_length=self.clip.context_length)
            tokens = tokens.to(self.device)
            embedded = torch.cat([self.clip.encode_text(chunk) for chunk in tokens.split(64)])
            # anomalib averages the raw (unnormalized) prompt embeddings of each class.
            self.text_embeddings = torch.stack([embedded[: len(normal)].mean(0), embedded[len(normal):].mean(0)])
        return self.text_embeddings

    def to_clip_size(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP's ViT has a fixed grid (240 px for ViT-B-16-plus-240); other input sizes are resized
        bicubically as anomalib's pre-processor does. Resizing is linear, so it commutes with the
        normalization already applied."""
        if tuple(images.shape[-2:]) == self.clip_size:
            return images
        return F.interpolate(images, size=self.clip_size, mode="bicubic", align_corners=False, antialias=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """-> image embeddings (B, E), window embeddings per scale [(B, n_windows, E)], patch tokens
        (B, P, width) (normalized transformer outputs, not projected, as anomalib uses them)."""
        visual = self.clip.visual
        tokens = patch_tokens(visual, self.to_clip_size(images))
        image_embeddings, patches = run_tower(visual, tokens)
        windows = [window_embeddings(visual, tokens, w) for w in self.windows]
        return image_embeddings, windows, patches

    # -- few-shot memory -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_references(self, images: torch.Tensor) -> None:
        """Fill the few-shot memory from (K, 3, H, W) normalized reference images."""
        if images.shape[0] == 0:
            raise ValueError("winclip: no reference images")
        parts = [self.encode(chunk.to(self.device)) for chunk in images.split(_REFERENCE_CHUNK)]
        self.reference_patches = torch.cat([p[2] for p in parts])
        for i in range(len(self.settings["scales"])):
            setattr(self, f"reference_windows_{i}", torch.cat([p[1][i] for p in parts]))

    @torch.no_grad()
    def collect_references(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        """Draw k_shot reference images from the training split, seeded and independent of how it is
        sharded: every image gets a key, a keyed hash (seed) of its pixel bytes, and the references are
        the k images with the smallest keys over all workers -- a uniform random sample of the split
        for a given seed, the same for any worker count, shard order or batch size (the decoded images
        are bitwise equal wherever they are decoded). Each worker keeps its own k smallest, the
        candidates are all-gathered, every worker takes the same k (ties: rank order)."""
        self.eval()
        k = self.k_shot
        keys, kept = torch.empty(0, dtype=torch.int64), None
        for images in progress_bar(batches, desc="winclip references", enabled=progress):
            cpu = images.detach().to("cpu", torch.float32).contiguous()
            batch_keys = torch.tensor([image_key(img, self.seed) for img in cpu], dtype=torch.int64)
            keys, kept = torch.cat([keys, batch_keys]), cpu if kept is None else torch.cat([kept, cpu])
            order = torch.sort(keys, stable=True).indices[:k]
            keys, kept = keys[order], kept[order]
        if kept is None:  # an empty shard still takes part in the gathers
            kept = torch.empty(0, 3, self.image_size, self.image_size)
        all_keys = distributed.all_gather_rows(keys)
        all_images = distributed.all_gather_rows(kept)
        if all_keys.numel() == 0:
            raise ValueError("winclip: the training split has no images to draw references from")
        if all_keys.numel() < k:
            warnings.warn(f"winclip: k_shot={k} but the training split has {all_keys.numel()} images; "
                          f"using them all", stacklevel=2)
        chosen = torch.sort(all_keys, stable=True).indices[:k]
        self.set_references(all_images[chosen])
        # Every worker embedded the same images; rank 0's result is taken so that the fitted tensors are
        # bitwise equal even where kernels are not deterministic (the runner compares digests).
        self.reference_patches = distributed.broadcast(self.reference_patches)
        for i, memory in enumerate(self.reference_windows):
            setattr(self, f"reference_windows_{i}", distributed.broadcast(memory))

    def recipe(self):
        from ..recipe import Collect

        # On the worker's device, so the model directory holds the text embeddings (rank 0's, see above).
        self.text_embeddings = distributed.broadcast(self.prepare_text())
        return [Collect("references", self.collect_references)] if self.k_shot else []

    def fit(self, batches: Iterable[torch.Tensor], progress: bool = False) -> None:
        """The recipe in one call (for callers of the memory-bank interface)."""
        self.prepare_text()
        if self.k_shot:
            self.collect_references(batches, progress)

    # -- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> AnomalyOutput:
        if self.k_shot and self.reference_patches.numel() == 0:
            raise RuntimeError(f"winclip: k_shot={self.k_shot} but no reference images were collected: "
                               f"fit it (its recipe's Collect stage) or load a trained model first")
        text = self.prepare_text()
        image_embeddings, windows, patches = self.encode(images)
        batch = images.shape[0]
        image_scores = class_scores(image_embeddings, text, TEMPERATURE)  # (B,)
        # Zero-shot: the whole image is one more scale; scales are combined by harmonic mean.
        maps = [image_scores.view(-1, 1, 1).expand(batch, *self.grid)]
        maps += [harmonic_aggregation(class_scores(emb, text, TEMPERATURE), idx, self.grid)
                 for emb, idx in zip(windows, self.windows)]
        score_map = len(maps) / (1.0 / torch.stack(maps)).sum(dim=0)
        if self.k_shot:
            few = [visual_association(patches, self.reference_patches.flatten(0, 1)).view(batch, *self.grid)]
            few += [harmonic_aggregation(visual_association(emb, memory.flatten(0, 1)), idx, self.grid)
                    for emb, memory, idx in zip(windows, self.reference_windows, self.windows)]
            few_map = torch.stack(few).mean(dim=0)  # few-shot scales: arithmetic mean (anomalib)
            score_map = (score_map + few_map) / 2
            image_scores = (image_scores + few_map.amax(dim=(-2, -1))) / 2
        anomaly_map = F.interpolate(score_map.unsqueeze(1), size=images.shape[-2:], mode="bilinear",
                                    align_corners=False)[:, 0]
        return AnomalyOutput(score=image_scores, anomaly_map=anomaly_map)


def image_key(image: torch.Tensor, seed: int) -> int:
    """A 63-bit keyed hash of a CPU image's bytes: a seeded random order of images by content."""
    digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=8, key=str(int(seed)).encode()).digest()
    return int.from_bytes(digest, "big") >> 1  # fits int64
