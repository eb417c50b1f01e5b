"""The category list of each dataset kind: what `--categories all` means for it.

The lists are the datasets' own (and anomalib's: src/anomalib/data/datasets/image/<dataset>.py).
"""

from __future__ import annotations

from ..errors import ConfigError
from .mvtec import MVTEC_CATEGORIES

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
MVTEC_AD2_CATEGORIES = ("can", "fabric", "fruit_jelly", "rice", "sheet_metal", "vial", "wallplugs", "walnuts")
MVTEC_LOCO_CATEGORIES = ("breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors")
KOLEKTOR_CATEGORY = "kolektor"
MAGNETIC_TILE_CATEGORY = "magnetic_tile"

DATASET_CATEGORIES: dict[str, tuple[str, ...]] = {
    "mvtec": MVTEC_CATEGORIES,
    "visa": VISA_CATEGORIES,
    "mvtec_ad2": MVTEC_AD2_CATEGORIES,
    "mvtec_loco": MVTEC_LOCO_CATEGORIES,
    "kolektor": (KOLEKTOR_CATEGORY,),
    "magnetic_tile": (MAGNETIC_TILE_CATEGORY,),
    # The synthetic generator makes any category name; "all" borrows MVTec AD's fifteen.
    "synthetic": MVTEC_CATEGORIES,
    # Video datasets (data/video.py): ShanghaiTech's categories are its scenes.
    "synthetic_video": ("shapes",),
    "ucsd_ped2": ("UCSDped2",),
    "avenue": ("avenue",),
    "shanghaitech": tuple(f"{scene:02d}" for scene in range(1, 14)),
}

# Datasets that are a single category: --category may be left out.
SINGLE_CATEGORY = {data: names[0] for data, names in DATASET_CATEGORIES.items() if len(names) == 1}


def dataset_categories(data: str) -> tuple[str, ...]:
    """Every category of dataset kind ``data`` (`--categories all`); ConfigError for kinds without a list."""
    try:
        return DATASET_CATEGORIES[data]
    except KeyError:
        listed = ", ".join(DATASET_CATEGORIES)
        raise ConfigError(f"--categories all: --data {data} has no fixed category list (datasets that have one: "
                          f"{listed}); name the categories, c1,c2,...") from None

