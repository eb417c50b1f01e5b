"""Datasets as manifests (one pyarrow row per image) and the decoding of their images."""

from .categories import DATASET_CATEGORIES, SINGLE_CATEGORY, dataset_categories
from .layouts import (
    DATA_KINDS,
    IMAGE_EXTENSIONS,
    build_manifest,
    folder_manifest,
    magnetic_tile_manifest,
    mvtec_manifest,
    seeded_split,
    split_file_manifest,
)
from .manifest import MANIFEST_SCHEMA, VIDEO_MANIFEST_SCHEMA, make_manifest, split_counts, validate_manifest
from .mvtec import MVTEC_CATEGORIES, ensure_mvtec
from .public_layouts import kolektor_manifest, mvtec_ad2_manifest, mvtec_loco_manifest, visa_manifest
from .synthetic import ensure_synthetic
from .synthetic_video import ensure_synthetic_video
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchDecoder,
    decode_all,
    load_image,
    load_mask,
    normalize,
)
from .video import VIDEO_DATA_KINDS, cached_frames, iter_video_frames, video_manifest

__all__ = [
    "DATASET_CATEGORIES",
    "DATA_KINDS",
    "IMAGE_EXTENSIONS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MANIFEST_SCHEMA",
    "MVTEC_CATEGORIES",
    "VIDEO_DATA_KINDS",
    "VIDEO_MANIFEST_SCHEMA",
    "SINGLE_CATEGORY",
    "BatchDecoder",
    "build_manifest",
    "cached_frames",
    "dataset_categories",
    "decode_all",
    "ensure_mvtec",
    "ensure_synthetic",
    "ensure_synthetic_video",
    "folder_manifest",
    "iter_video_frames",
    "kolektor_manifest",
    "load_image",
    "load_mask",
    "magnetic_tile_manifest",
    "make_manifest",
    "mvtec_ad2_manifest",
    "mvtec_loco_manifest",
    "mvtec_manifest",
    "normalize",
    "seeded_split",
    "split_counts",
    "split_file_manifest",
    "validate_manifest",
    "video_manifest",
    "visa_manifest",
]
