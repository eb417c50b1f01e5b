"""Video datasets as manifests: one row per scored frame, carrying the clip of frames that ends at it.

A video model (AnomalyModel.clip_length = T) scores frame t from frames t-T+1 .. t, so a video of n frames
gives n-T+1 rows (anomalib's clips: T frames, one frame apart, target = the last frame); the first T-1
frames appear only as history. Each row has the usual manifest columns for the scored frame (path, its
mask, the frame-level label) plus `clip`, the T frame files oldest first.

Video files (.avi, .mp4, ...) are decoded once with PyAV, on the driver while the manifest is built, into a
frame cache (video_frames.py: $RAYLIB_AD_CACHE/video_frames/..., default ~/.cache/raylib_ad/...), so workers
read frames like any image file. Masks that come as arrays (Avenue's .mat volumes, ShanghaiTech's .npy) are
written once to $RAYLIB_AD_CACHE/video_masks the same way.

Layouts (anomalib's, src/anomalib/data/datasets/video/):
  ucsd_ped2     <root>/UCSDped2/Train/Train001/001.tif, Test/Test001/001.tif, Test/Test001_gt/001.bmp
  avenue        <root>[/avenue]/training_videos/01.avi, testing_videos/01.avi,
                ground_truth_demo/testing_label_mask/1_label.mat (volLabel) or 1_label/<frame>.png
  shanghaitech  <root>[/shanghaitech]/training/videos/01_001.avi (or training/frames/01_001/*.jpg),
                testing/frames/01_0014/*.jpg, testing/test_frame_mask/01_0014.npy,
                testing/test_pixel_mask/01_0014.npy; the category is the scene, 01 .. 13
  synthetic_video  <root>/<category>/{train,test}/<video>/000.png or <video>.avi, test/<video>_gt/000.png
                (synthetic_video.py generates it)
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
from PIL import Image

from ..errors import ConfigError, DataError
from .manifest import ANOMALOUS, GOOD, NORMAL, file_problems, format_problems, make_manifest
from .video_frames import VideoLimitError, cached_frames, cached_masks, iter_video_frames

__all__ = ["VIDEO_DATA_KINDS", "Video", "VideoLimitError", "cached_frames", "cached_masks", "iter_video_frames",
           "video_manifest"]

VIDEO_DATA_KINDS = ("synthetic_video", "ucsd_ped2", "avenue", "shanghaitech")
VIDEO_EXTENSIONS = (".avi", ".mp4", ".mov", ".mkv", ".mpg", ".mpeg", ".m4v", ".webm")
FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ANOMALOUS_DEFECT = "anomalous"  # the defect name where a dataset does not tell anomaly kinds apart
GT_SUFFIX = "_gt"  # UCSD's mask folders: Test001 -> Test001_gt


@dataclass
class Video:
    """One video of a split: its frames in time order and, for a test video, a label and mask per frame."""

    source: Path  # the frame folder or video file (named in messages)
    split: str
    frames: list[Path]
    labels: list[int] | None = None  # None: every frame normal
    masks: list[Path | None] | None = None  # per frame; None where the frame has no anomalous pixel
    defect: str = ANOMALOUS_DEFECT  # the defect name of the anomalous frames


# --- manifest ------------------------------------------------------------------------------------------


def video_manifest(data: str, root: str | os.PathLike, category: str | None, clip_length: int | None) -> pa.Table:
    """Manifest for video dataset kind ``data`` (one of VIDEO_DATA_KINDS), clips of ``clip_length`` frames."""
    if data not in VIDEO_DATA_KINDS:
        raise ConfigError(f"unknown video dataset kind data={data!r}; choices: {', '.join(VIDEO_DATA_KINDS)}")
    if not isinstance(clip_length, int) or isinstance(clip_length, bool) or clip_length < 1:
        raise ConfigError(f"--data {data} is a video dataset: it needs a video model's clip_length (an integer >= 1), "
                          f"got {clip_length!r}; image models cannot train on it")
    if data == "synthetic_video":
        from .synthetic_video import DEFAULT_CATEGORY, GENERATOR_FILE, ensure_synthetic_video

        category = category or DEFAULT_CATEGORY
        base = Path(root).absolute() / category
        if not (base / GENERATOR_FILE).is_file():  # a finished set is used as made (any sizes); else the default
            base = ensure_synthetic_video(root, category)
        return folder_videos_manifest(base, category, clip_length, ("train", "test"), defect_of=_kind_of)
    if data == "ucsd_ped2":
        category = category or "UCSDped2"
        base = Path(root).absolute() / category
        if not (base / "Train").is_dir() and not (base / "Test").is_dir():
            raise DataError(_layout_error("UCSD Ped", base, f"{base}/Train/Train001/001.tif, {base}/Test/Test001/"
                                          f"001.tif with masks {base}/Test/Test001_gt/001.bmp"))
        return folder_videos_manifest(base, category, clip_length, ("Train", "Test"))
    if data == "avenue":
        return avenue_manifest(root, clip_length, category or "avenue")
    if category is None:
        raise ConfigError("--data shanghaitech needs a category: the scene, 01 .. 13")
    return shanghaitech_manifest(root, category, clip_length)


def folder_videos_manifest(base: Path, category: str, clip_length: int, split_dirs: tuple[str, str],
                           defect_of: Callable[[str], str] | None = None) -> pa.Table:
    """<base>/<train dir>/<video>/ (frames) or <video>.avi; <base>/<test dir>/ likewise, each test video with
    <video>_gt/, one mask per frame (a frame is anomalous when its mask has a nonzero pixel)."""
    problems: list[str] = []
    videos = _split_videos(base / split_dirs[0], "train", problems)
    videos += _split_videos(base / split_dirs[1], "test", problems, with_masks=True, defect_of=defect_of)
    return clips_manifest(videos, category, clip_length, problems)


def clips_manifest(videos: list[Video], category: str, clip_length: int, problems: list[str]) -> pa.Table:
    """Rows for every frame that ends a full clip; one DataError with every problem found so far and since."""
    rows: list[dict] = []
    for video in videos:
        n = len(video.frames)
        if n < clip_length:
            problems.append(f"video {video.source} has {n} frame(s); the model needs clips of {clip_length} frames")
        for lst, what in ((video.labels, "labels"), (video.masks, "masks")):
            if lst is not None and len(lst) != n:
                problems.append(f"video {video.source} has {n} frames but {len(lst)} frame {what}")
        if problems:
            continue
        for t in range(clip_length - 1, n):
            label = video.labels[t] if video.labels is not None else NORMAL
            mask = video.masks[t] if video.masks is not None and label == ANOMALOUS else None
            rows.append({"path": str(video.frames[t]), "mask_path": str(mask) if mask else None, "label": label,
                         "defect": video.defect if label == ANOMALOUS else GOOD, "category": category,
                         "split": video.split, "clip": [str(p) for p in video.frames[t - clip_length + 1 : t + 1]]})
    if problems:
        raise DataError(format_problems(problems + file_problems(rows)))
    return make_manifest(rows)


def _split_videos(folder: Path, split: str, problems: list[str], *, with_masks: bool = False,
                  defect_of: Callable[[str], str] | None = None) -> list[Video]:
    if not folder.is_dir():
        problems.append(f"folder does not exist: {folder}")
        return []
    videos = []
    for entry in sorted(folder.iterdir(), key=lambda p: _natural(p.name)):
        if entry.name.startswith(".") or entry.name.endswith(GT_SUFFIX):
            continue
        if entry.is_dir():
            frames = frames_in(entry)
            if not frames:
                continue  # e.g. UCSD's folders of other files
            video = Video(entry, split, frames)
        elif entry.suffix.lower() in VIDEO_EXTENSIONS:
            try:
                video = Video(entry, split, cached_frames(entry))
            except DataError as exc:
                problems.append(str(exc))
                continue
        else:
            continue
        if with_masks:
            gt = folder / f"{entry.stem if entry.is_file() else entry.name}{GT_SUFFIX}"
            if not gt.is_dir():
                problems.append(f"missing masks for video {entry}: expected the folder {gt} with one mask per frame")
                continue
            video.labels, video.masks = _mask_folder(gt, problems)
            if defect_of is not None:
                video.defect = defect_of(entry.stem)
        videos.append(video)
    if not videos:
        problems.append(f"no videos in {folder}: expected frame folders (<video>/000.png, any of "
                        f"{', '.join(FRAME_EXTENSIONS)}) or video files ({', '.join(VIDEO_EXTENSIONS)})")
    return videos


def _kind_of(video_name: str) -> str:
    """Synthetic test videos are named <kind>_<index> (wrong_way_0): the kind is the defect."""
    return video_name.rsplit("_", 1)[0] if "_" in video_name else ANOMALOUS_DEFECT


# --- CUHK Avenue ----------------------------------------------------------------------------------------


def avenue_manifest(root: str | os.PathLike, clip_length: int, category: str = "avenue") -> pa.Table:
    """CUHK Avenue: training_videos/*.avi (normal), testing_videos/*.avi with per-frame masks from
    ground_truth_demo/testing_label_mask/<n>_label.mat (`volLabel`, one mask per frame; 01.avi -> 1_label)
    or, as anomalib converts them, a folder <n>_label/ of one mask image per frame."""
    base = _dataset_dir(root, category, "training_videos")
    if not (base / "training_videos").is_dir() and not (base / "testing_videos").is_dir():
        raise DataError(_layout_error("CUHK Avenue", base, f"{base}/training_videos/01.avi, {base}/testing_videos/"
                                      f"01.avi, {base}/ground_truth_demo/testing_label_mask/1_label.mat"))
    gt_dir = base / "ground_truth_demo" / "testing_label_mask"
    problems: list[str] = []
    videos = []
    for split, folder in (("train", base / "training_videos"), ("test", base / "testing_videos")):
        files = _video_files(folder, problems)
        for path in files:
            try:
                video = Video(path, split, cached_frames(path))
            except DataError as exc:
                problems.append(str(exc))
                continue
            if split == "test":
                stem = path.stem.lstrip("0") or "0"
                mat, folder_masks = gt_dir / f"{stem}_label.mat", gt_dir / f"{stem}_label"
                if folder_masks.is_dir():
                    video.labels, video.masks = _mask_folder(folder_masks, problems)
                elif mat.is_file():
                    try:
                        video.labels, video.masks = cached_masks(mat, lambda m=mat: _avenue_volume(m))
                    except DataError as exc:
                        problems.append(str(exc))
                        continue
                else:
                    problems.append(f"missing labels for test video {path}: expected {mat} or the folder "
                                    f"{folder_masks}")
                    continue
            videos.append(video)
    return clips_manifest(videos, category, clip_length, problems)


def _avenue_volume(mat: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        cells = loadmat(str(mat))["volLabel"]
        return np.stack([np.asarray(m) for m in cells.ravel()])
    except Exception as exc:  # scipy raises many types for a file that is not a MATLAB volume
        raise DataError(f"cannot read Avenue labels {mat}: {type(exc).__name__}: {exc} (expected a .mat file "
                        "with volLabel, a 1 x frames cell array of masks)") from exc


# --- ShanghaiTech Campus ---------------------------------------------------------------------------------


def shanghaitech_manifest(root: str | os.PathLike, scene: str, clip_length: int) -> pa.Table:
    """ShanghaiTech Campus, one scene: training videos training/videos/<scene>_*.avi (also anomalib's
    training/converted_videos, or decoded training/frames/<scene>_*/), test frame folders
    testing/frames/<scene>_*/ with frame labels testing/test_frame_mask/<video>.npy and pixel masks
    testing/test_pixel_mask/<video>.npy (frames x H x W)."""
    scene = f"{int(scene):02d}" if str(scene).isdigit() else str(scene)
    base = _dataset_dir(root, "shanghaitech", "testing")
    if not (base / "training").is_dir() and not (base / "testing").is_dir():
        raise DataError(_layout_error("ShanghaiTech", base, f"{base}/training/videos/{scene}_001.avi, {base}/testing/"
                                      f"frames/{scene}_0014/000.jpg, {base}/testing/test_frame_mask/{scene}_0014.npy"))
    problems: list[str] = []
    videos = []
    train = base / "training"
    folders = [d for d in sorted((train / "frames").glob(f"{scene}_*")) if d.is_dir() and frames_in(d)]
    if folders:
        videos += [Video(d, "train", frames_in(d)) for d in folders]
    else:
        source = next((d for d in (train / "videos", train / "converted_videos") if d.is_dir()), train / "videos")
        for path in _video_files(source, problems, pattern=f"{scene}_*"):
            try:
                videos.append(Video(path, "train", cached_frames(path)))
            except DataError as exc:
                problems.append(str(exc))
    test = base / "testing"
    folders = [d for d in sorted((test / "frames").glob(f"{scene}_*")) if d.is_dir() and frames_in(d)]
    if not folders:
        problems.append(f"no test videos of scene {scene}: expected frame folders {test / 'frames' / scene}_*/")
    for folder in folders:
        video = Video(folder, "test", frames_in(folder))
        frame_mask = test / "test_frame_mask" / f"{folder.name}.npy"
        pixel_mask = test / "test_pixel_mask" / f"{folder.name}.npy"
        try:
            if pixel_mask.is_file():
                video.labels, video.masks = cached_masks(pixel_mask, lambda p=pixel_mask: _npy(p, 3))
            if frame_mask.is_file():
                video.labels = [int(v > 0) for v in _npy(frame_mask, 1)]
        except DataError as exc:
            problems.append(str(exc))
            continue
        if video.labels is None:
            problems.append(f"missing labels for test video {folder}: expected {frame_mask} or {pixel_mask}")
            continue
        videos.append(video)
    return clips_manifest(videos, scene, clip_length, problems)


def _npy(path: Path, ndim: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, OSError, ... for a file that is not an array
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
    if array.ndim != ndim:
        raise DataError(f"{path} has shape {array.shape}; expected {ndim} dimension(s)"
                        + (" (frames x height x width)" if ndim == 3 else " (one label per frame)"))
    return array


# --- helpers -------------------------------------------------------------------------------------------


def frames_in(folder: Path) -> list[Path]:
    """Frame images of a folder in time order (natural order: 2.jpg before 10.jpg); dot files skipped."""
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS
                   and not p.name.startswith(".") and p.is_file()), key=lambda p: _natural(p.name))


def _mask_folder(folder: Path, problems: list[str]) -> tuple[list[int], list[Path | None]]:
    """Labels and masks from a folder of one mask image per frame (anomalous: any nonzero pixel)."""
    masks = frames_in(folder)

    def label(path: Path) -> int | str:
        try:
            with Image.open(path) as im:
                return int(im.convert("L").getbbox() is not None)
        except Exception as exc:  # PIL raises many types for corrupt files
            return f"mask cannot be decoded: {path} ({type(exc).__name__}: {exc})"

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = list(pool.map(label, masks))
    problems += [f for f in found if isinstance(f, str)]
    labels = [f if isinstance(f, int) else NORMAL for f in found]
    return labels, [m if v else None for m, v in zip(masks, labels)]


def _video_files(folder: Path, problems: list[str], pattern: str = "*") -> list[Path]:
    if not folder.is_dir():
        problems.append(f"folder does not exist: {folder}")
        return []
    files = sorted((p for p in folder.glob(pattern) if p.suffix.lower() in VIDEO_EXTENSIONS
                    and not p.name.startswith(".")), key=lambda p: _natural(p.name))
    if not files:
        problems.append(f"no video files ({pattern}{'/'.join(VIDEO_EXTENSIONS)}) in {folder}")
    return files


def _dataset_dir(root: str | os.PathLike, name: str, marker: str) -> Path:
    """`root` itself when it holds the dataset, else root/<name> (anomalib's datasets/<name>)."""
    root = Path(root).absolute()
    return root if (root / marker).is_dir() or not (root / name).is_dir() else root / name


def _layout_error(dataset: str, base: Path, expected: str) -> str:
    if base.is_dir():
        found = sorted(p.name for p in base.iterdir())[:8]
        seen = f"it holds {', '.join(found)}" if found else "it is empty"
    else:
        seen = "it does not exist"
    return f"{dataset}: {base} is not in the {dataset} layout ({seen}); expected {expected}"


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]
