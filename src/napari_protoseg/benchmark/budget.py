"""The annotation-budget benchmark (protocol: ``BENCHMARK.md`` of the shared data folder).

Simulates the annotations of each setting from the dense labels of sections 0-9, writes each as an
annotation project folder, trains through the same entry point as the napari panel
(:func:`napari_protoseg.training.engine.train`), predicts sections 10-19 and reports per-class IoU, mIoU,
mitochondrion instance AP50, annotation time, training time, prediction throughput and memory,
next to an ilastik-style random-forest peer trained on the same annotations.

Run it with ``protoseg benchmark DATA_DIR`` (``--quick`` for the small CI variant).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_protoseg.prediction.decoders import (DEFAULT_MIN_SIZE, MIN_SIZE_SHARE, annotated_min_size, min_size_from_p10, plain_instances,
                        sizes_at_points)
from napari_protoseg.evaluation.instances import decoder_figures
from napari_protoseg.evaluation.metrics import (TOUCHING_GAP, TOUCHING_MIN_AREA, class_iou, connected_instances,
                                                instance_figures, instance_scores)
from napari_protoseg.annotations.project import AnnotationSet, ClassInfo, empty_boxes, empty_points, empty_tags, read_project, write_project

CLASS_NAMES = {1: "cytoplasm", 2: "membrane", 3: "mitochondrion", 4: "synapse", 5: "glia/extracellular"}
OBJECT_CLASSES = (3, 4, 5)
STUFF_CLASSES = (1, 2)
MITOCHONDRION = 3
SETTINGS = ("full", "masks", "masks+tags", "masks+boxes", "masks+points", "mixed", "points-only")
TRAIN_SECTIONS = range(0, 10)
TEST_SECTIONS = range(10, 20)
# Validation runs (for choosing defaults without reading a test section) train on the top rows of the
# training sections and score the bottom VALIDATION_SHARE of their rows.
VALIDATION_SHARE = 0.25

# Cost model of BENCHMARK.md, in seconds.
DENSE_MASK_SECONDS_PER_MEGAPIXEL = 90 * 60 / (1024 * 1024) * 1e6
BOX_SECONDS = 7.0
POINT_SECONDS = 2.0
TAG_SECONDS = 1.0  # per class per tile
STUFF_POINTS = 20
TAG_GRID = 4

BENCHMARK_CLASSES = [
    ClassInfo(1, "cytoplasm", False, "#4c72b0"),
    ClassInfo(2, "membrane", False, "#dd8452"),
    ClassInfo(3, "mitochondrion", True, "#55a868"),
    ClassInfo(4, "synapse", False, "#c44e52"),
    ClassInfo(5, "glia/extracellular", False, "#8172b3"),
]

FOUR_CONNECTED = ndi.generate_binary_structure(2, 1)


# ------------------------------------------------------------------------ simulated annotations


def _objects(plane: np.ndarray, class_id: int) -> tuple[np.ndarray, int]:
    """4-connected components of one class in one section."""
    return ndi.label(plane == class_id, structure=FOUR_CONNECTED)


def simulate_boxes(semantic: np.ndarray, sections) -> np.ndarray:
    """A tight, exhaustive box around every object of every object class."""
    rows = []
    for z in sections:
        for cid in OBJECT_CLASSES:
            labels, _ = _objects(semantic[z], cid)
            for sl in ndi.find_objects(labels):
                if sl is not None:
                    rows.append((z, sl[0].start, sl[1].start, sl[0].stop, sl[1].stop, cid, True))
    return np.array(rows, dtype=empty_boxes().dtype) if rows else empty_boxes()


def simulate_points(semantic: np.ndarray, sections, rng: np.random.Generator, object_classes=OBJECT_CLASSES,
                    stuff_classes=STUFF_CLASSES, stuff_points: int = STUFF_POINTS) -> np.ndarray:
    """One point at a random pixel of every object (4-connected component of an object class) of
    each section, exhaustive, and ``stuff_points`` random points per stuff class and section."""
    rows = []
    for z in sections:
        for cid in object_classes:
            labels, n = _objects(semantic[z], cid)
            if n == 0:
                continue
            order = np.argsort(labels, axis=None, kind="stable")
            sorted_labels = labels.reshape(-1)[order]
            starts = np.searchsorted(sorted_labels, np.arange(1, n + 1))
            ends = np.searchsorted(sorted_labels, np.arange(1, n + 1), side="right")
            picks = order[starts + (rng.random(n) * (ends - starts)).astype(np.int64)]
            ys, xs = np.unravel_index(picks, labels.shape)
            rows += [(z, int(y), int(x), cid, True) for y, x in zip(ys, xs)]
        for cid in stuff_classes:
            ys, xs = np.nonzero(semantic[z] == cid)
            if len(ys):
                pick = rng.choice(len(ys), size=min(stuff_points, len(ys)), replace=False)
                rows += [(z, int(ys[i]), int(xs[i]), cid, False) for i in pick]
    return np.array(rows, dtype=empty_points().dtype) if rows else empty_points()


def simulate_tags(semantic: np.ndarray, sections, grid: int = TAG_GRID) -> np.ndarray:
    """Present/absent tags for every class on each tile of a grid x grid tiling."""
    rows = []
    h, w = semantic.shape[1:]
    ty, tx = h // grid, w // grid
    for z in sections:
        for i in range(grid):
            for j in range(grid):
                y0, x0 = i * ty, j * tx
                y1, x1 = (h if i == grid - 1 else y0 + ty), (w if j == grid - 1 else x0 + tx)
                present = set(np.unique(semantic[z, y0:y1, x0:x1]).tolist())
                rows += [(z, cid, cid in present, y0, x0, y1, x1) for cid in CLASS_NAMES]
    return np.array(rows, dtype=empty_tags().dtype) if rows else empty_tags()


def simulate_setting(setting: str, semantic: np.ndarray, seed: int = 0) -> AnnotationSet:
    """The annotations of one benchmark setting, from the dense labels of the training sections."""
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; choose from {SETTINGS}")
    rng = np.random.default_rng(seed)
    n = semantic.shape[0]
    masks = np.zeros_like(semantic, dtype=np.uint8)
    boxes, points, tags = empty_boxes(), empty_points(), empty_tags()
    later = range(1, n)
    if setting == "full":
        masks[:] = semantic
    elif setting != "points-only":
        masks[0] = semantic[0]
    if setting == "masks+tags":
        tags = simulate_tags(semantic, later)
    elif setting == "masks+boxes":
        boxes = simulate_boxes(semantic, later)
    elif setting == "masks+points":
        points = simulate_points(semantic, later, rng)
    elif setting == "mixed":
        thirds = np.array_split(np.arange(1, n), 3)
        tags = simulate_tags(semantic, thirds[0].tolist())
        boxes = simulate_boxes(semantic, thirds[1].tolist())
        points = simulate_points(semantic, thirds[2].tolist(), rng)
    elif setting == "points-only":
        points = simulate_points(semantic, range(n), rng)
    return AnnotationSet(image_shape=semantic.shape, classes=BENCHMARK_CLASSES,
                         masks=masks if masks.any() else None, boxes=boxes, points=points, tags=tags)


def annotation_seconds(annotations: AnnotationSet) -> float:
    """Estimated annotation time from the cost model of BENCHMARK.md."""
    mask_planes = 0.0
    if annotations.masks is not None:
        labelled = np.count_nonzero(annotations.masks.reshape(annotations.n_planes, -1), axis=1)
        mask_planes = float(labelled.sum())
    return (mask_planes / 1e6 * DENSE_MASK_SECONDS_PER_MEGAPIXEL
            + BOX_SECONDS * len(annotations.boxes) + POINT_SECONDS * len(annotations.points)
            + TAG_SECONDS * len(annotations.tags))


# ------------------------------------------------------------------------------ measurements


def reset_peak_memory() -> bool:
    """Restart the peak-memory count of this process (Linux ``/proc/self/clear_refs``; also the
    CUDA peak). False where the operating system cannot, then :func:`peak_memory_mb` keeps
    reporting the peak since the process started."""
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
    except Exception:  # pragma: no cover - a broken CUDA set-up must not stop the benchmark
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mb() -> float:
    """Peak resident memory of this process (since the last :func:`reset_peak_memory`), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def gpu_peak_memory_mb() -> float | None:
    """Peak CUDA memory allocated by PyTorch since the last reset, in MiB (None without CUDA)."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.max_memory_allocated() / 2**20
    except Exception:  # pragma: no cover
        pass
    return None


@dataclass
class BenchmarkData:
    """The shared data set: raw sections, dense semantic labels and mitochondrion instances."""

    raw: np.ndarray
    semantic: np.ndarray
    mito_instances: np.ndarray

    @classmethod
    def load(cls, folder: str | Path, crop: int | None = None) -> BenchmarkData:
        import tifffile

        folder = Path(folder)
        data = [tifffile.imread(folder / name) for name in ("raw.tif", "semantic.tif", "mito_instances.tif")]
        if crop is not None:
            data = [np.ascontiguousarray(d[:, :crop, :crop]) for d in data]
        return cls(*data)


# ------------------------------------------------------------------------------- the peer


@dataclass(frozen=True)
class RFConfig:
    """The random-forest peer. The defaults follow ``BENCHMARK.md`` (sigma 1-16, five scales);
    :data:`QUICK_RF` is the lighter variant of ``--quick`` runs only."""

    n_estimators: int = 100
    max_depth: int = 20
    sigma_min: float = 1.0
    sigma_max: float = 16.0
    num_sigma: int = 5
    max_pixels: int = 200_000

    def to_dict(self) -> dict:
        return asdict(self)


QUICK_RF = RFConfig(n_estimators=30, num_sigma=3, max_pixels=50_000)


def rf_features(image: np.ndarray, config: RFConfig = RFConfig()) -> np.ndarray:
    """ilastik-style features of one section: intensity, edges and texture at sigma 1-16."""
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(image, intensity=True, edges=True, texture=True,
                                     sigma_min=config.sigma_min, sigma_max=config.sigma_max,
                                     num_sigma=config.num_sigma).astype(np.float32)


def rf_label_planes(annotations: AnnotationSet) -> np.ndarray:
    """The pixels the peer can use: mask pixels and point pixels (boxes and tags say nothing about
    single pixels), as a (Z, Y, X) class map with 0 = unlabelled."""
    labels = np.zeros(annotations.image_shape, dtype=np.uint8)
    if annotations.masks is not None:
        labels[:] = annotations.masks
    pts = annotations.points
    labels[pts["z"], pts["y"], pts["x"]] = pts["class"]
    return labels


def train_random_forest(raw: np.ndarray, annotations: AnnotationSet, config: RFConfig = RFConfig(),
                        seed: int = 0):
    """A random forest on the pixels a setting labels directly (masks and points).

    At most ``config.max_pixels`` labelled pixels are drawn uniformly (seeded) from all labelled
    pixels; features are computed plane by plane and only the drawn pixels are kept."""
    from sklearn.ensemble import RandomForestClassifier

    labels = rf_label_planes(annotations)
    flat = np.flatnonzero(labels)
    if len(flat) == 0:
        raise ValueError("the annotations label no pixel directly; the random forest has nothing to learn from")
    if len(flat) > config.max_pixels:
        flat = np.sort(np.random.default_rng(seed).choice(flat, config.max_pixels, replace=False))
    zs, ys, xs = np.unravel_index(flat, labels.shape)
    feats = []
    for z in np.unique(zs):
        sel = zs == z
        feats.append(rf_features(raw[z], config)[ys[sel], xs[sel]])
    x, y = np.concatenate(feats), labels[zs, ys, xs]
    forest = RandomForestClassifier(n_estimators=config.n_estimators, max_depth=config.max_depth,
                                    n_jobs=-1, random_state=seed)
    forest.fit(x, y)
    return forest


def predict_random_forest(forest, raw: np.ndarray, config: RFConfig = RFConfig()) -> np.ndarray:
    out = np.zeros(raw.shape, dtype=np.uint8)
    for z in range(raw.shape[0]):
        f = rf_features(raw[z], config)
        out[z] = forest.predict(f.reshape(-1, f.shape[-1])).reshape(raw.shape[1:])
    return out


def _json_clean(value):
    """NumPy scalars to Python, NaN/inf to None (JSON has no NaN), recursively."""
    if isinstance(value, dict):
        return {str(k): _json_clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_clean(v) for v in value]
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_json(path: Path, results: dict) -> None:
    Path(path).write_text(json.dumps(_json_clean(results), indent=1) + "\n")


# -------------------------------------------------------------------------------- the runner

DATASET_CITATION = (
    'Gerhard S, Funke J, Martel J, Cardona A, Fetter R (2013), "Segmented anisotropic ssTEM dataset of '
    'neural tissue", figshare, doi:10.6084/m9.figshare.856713 (via the GitHub repository '
    "unidesigner/groundtruth-drosophila-vnc); licence CC BY-NC-SA 3.0"
)
QUICK_SETTINGS = ("masks", "full", "mixed")
QUICK_CROP = 256
QUICK_STEPS = 60
QUICK_CROP_SIZE = 128
QUICK_BATCH_SIZE = 8

# (setting, name, TrainConfig changes, the network's nested under "model": TrainConfig.with_changes).
# A variant whose configuration equals the main run of its setting reuses that run instead of
# training again.
_EVERY_PAIR_ALIKE = "classes without a positive in a crop pushed down at full weight (the previous default)"
ABLATIONS = (
    ("masks", "defaults (half resolution, 1800 steps of 4 crops of 192 px)", {}),
    ("masks", "full resolution, 720 steps (about the same time)", {"model": {"input_scale": 1}, "steps": 720}),
    ("masks", "8 crops of 128 px per step (the previous default)", {"crop_size": 128, "batch_size": 8}),
    ("masks", _EVERY_PAIR_ALIKE, {"negative_only_weight": 1.0}),
    ("mixed", "defaults (9 of 10 crops on masks, no pseudo-label term, 1800 steps)", {}),
    ("mixed", "3 of 4 crops on masks (the previous default)", {"mask_share": 0.75}),
    ("mixed", "pseudo-label term, 900 steps (about the same time)", {"weight_pseudo_label": 0.5, "steps": 900}),
    ("mixed", "without cross-entropy", {"weight_ce": 0.0}),
    ("mixed", "crop types drawn uniformly", {"mask_share": None}),
    ("masks+tags", "tag pooling: mean", {"tag_pooling": "mean"}),
    ("masks+tags", "tag pooling: max", {"tag_pooling": "max"}),
    ("masks+tags", "tag pooling: smoothmax", {"tag_pooling": "smoothmax"}),
    ("masks+tags", _EVERY_PAIR_ALIKE, {"negative_only_weight": 1.0}),
    ("full", "defaults", {}),
    ("full", "full resolution, 720 steps (about the same time)", {"model": {"input_scale": 1}, "steps": 720}),
    ("full", "class-balanced cross-entropy", {"balance_classes": 1.0}),
    ("full", "instance losses also train the backbone", {"instance_backbone_grad": True}),
    ("full", "filter bank, sigmas 1 to 16 (the previous default)", {"model": {"filter_sigmas": [1.0, 2.5, 6.3, 16.0]}}),
    ("points-only", "defaults (points spread up to 5 px and halfway to their neighbours, unpointed regions negative)", {}),
    ("points-only", "points spread 5 px whatever their neighbours (the previous default)", {"point_spread_halfway": False}),
    ("points-only", "each point teaches its pixel only (the previous default)",
     {"point_spread": 0, "unpointed_negatives": False}),
)
TARGET_MIXED_FRACTION = 0.90
TARGET_EXTRA_GAIN = 0.05
TARGET_PEER_MARGIN = 0.10
_TOLERANCE = 1e-9  # 0.60 - 0.50 must count as a gain of 0.10
COMMAND = "protoseg benchmark DATA_DIR --out OUT_DIR"
PLOT_FILE = "miou_vs_time.png"
DOCS_RESULTS_FILE = "benchmark-results.json"  # next to docs/benchmarks.md
DOCS_IMAGES = "images"  # the plot's folder next to docs/benchmarks.md


def benchmark_config(quick: bool = False, config_overrides: dict | None = None, seed: int = 0):
    """The :class:`~napari_protoseg.training.engine.TrainConfig` of a benchmark run.

    Full runs use the plugin's defaults for the CPU on every device (1800 steps also where the plugin
    would train :data:`~napari_protoseg.training.engine.CUDA_STEPS` on a CUDA GPU), so that runs compare
    across machines and the ablations' step counts keep their meaning. Quick runs train
    ``QUICK_STEPS`` steps on ``QUICK_BATCH_SIZE`` crops of ``QUICK_CROP_SIZE``. When the number of
    steps differs from the default and the overrides do not set ``pseudo_label_warmup``, the warm-up
    keeps its default share of the steps, so the pseudo-label term acts for the same share of training.
    """
    from napari_protoseg.training.engine import TrainConfig, warmup_for_steps

    default = TrainConfig()
    changes: dict = {"checkpoint_every": 0, "seed": seed}
    if quick:
        changes.update(steps=QUICK_STEPS, crop_size=QUICK_CROP_SIZE, batch_size=QUICK_BATCH_SIZE)
    changes.update(config_overrides or {})
    steps = int(changes.get("steps", default.steps))
    if steps != default.steps and "pseudo_label_warmup" not in (config_overrides or {}):
        changes["pseudo_label_warmup"] = warmup_for_steps(default, steps)
    return default.with_changes(changes)


def _scores(prediction: np.ndarray, truth: np.ndarray, truth_instances: np.ndarray) -> dict:
    ious = class_iou(prediction, truth, CLASS_NAMES)
    inst = instance_scores(connected_instances(prediction, MITOCHONDRION), truth_instances)
    return {
        "iou": {CLASS_NAMES[c]: v for c, v in ious.items()},
        "miou": float(np.nanmean(list(ious.values()))),
        "mito_ap50": inst["ap50"], "mito_matched_iou": inst["matched_iou"],
        "mito_tp": inst["tp"], "mito_fp": inst["fp"], "mito_fn": inst["fn"],
    }


def _environment() -> dict:
    import os

    import torch

    env = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "numpy": np.__version__}
    for name in ("sklearn", "skimage", "scipy"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover
            env[name] = None
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    env["source_commit"] = source_commit()
    return env


def source_commit() -> str | None:
    """The git commit of the source checkout this module runs from (``+modified`` when its tracked
    files differ from it), or None outside a checkout: an editable install's version string does
    not change with later commits."""
    import subprocess

    root = _source_root()
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+modified" if dirty else "")


@dataclass
class BenchmarkSplit:
    """What a run trains on (``train``: raw and dense labels the settings are simulated from) and
    what it scores (``test``), with a description for the results."""

    train: BenchmarkData
    test: BenchmarkData
    description: dict


def benchmark_split(data: BenchmarkData, validation: bool = False, recount_instances: bool = False) -> BenchmarkSplit:
    """The protocol's split: train on sections 0-9, score sections 10-19. ``validation``: train on
    the top rows of sections 0-9 and score their bottom :data:`VALIDATION_SHARE` of rows, without
    reading sections 10-19 (for choosing defaults; BENCHMARK.md forbids tuning on the test sections).
    Instances of a scored region cut from whole sections (``validation`` or ``recount_instances``,
    e.g. cropped sections) are its own 4-connected mitochondrion components."""
    needed = TRAIN_SECTIONS.stop if validation else TEST_SECTIONS.stop
    if data.raw.shape[0] < needed:
        raise ValueError(f"the data holds {data.raw.shape[0]} sections; the protocol needs {needed}")
    train_sections = slice(TRAIN_SECTIONS.start, TRAIN_SECTIONS.stop)
    described = [TRAIN_SECTIONS.start, TRAIN_SECTIONS.stop - 1]
    if validation:
        height = data.raw.shape[1]
        cut = height - int(round(height * VALIDATION_SHARE))
        train_rows, test_rows = slice(0, cut), slice(cut, height)

        def part(rows: slice) -> BenchmarkData:
            semantic = np.ascontiguousarray(data.semantic[train_sections, rows])
            return BenchmarkData(np.ascontiguousarray(data.raw[train_sections, rows]), semantic,
                                 connected_instances(semantic, MITOCHONDRION))

        return BenchmarkSplit(part(train_rows), part(test_rows), {
            "split": "validation", "train_sections": described, "train_rows": [0, cut - 1],
            "test_sections": described, "test_rows": [cut, height - 1]})
    test_sections = slice(TEST_SECTIONS.start, TEST_SECTIONS.stop)
    test_semantic = data.semantic[test_sections]
    # Cropping can cut an instance in two; relabel the crop's components then (the file's ids are the
    # same 4-connected components of class 3 on whole sections).
    test_instances = connected_instances(test_semantic, MITOCHONDRION) if recount_instances else data.mito_instances[test_sections]
    return BenchmarkSplit(
        BenchmarkData(data.raw[train_sections], data.semantic[train_sections], data.mito_instances[train_sections]),
        BenchmarkData(data.raw[test_sections], test_semantic, test_instances),
        {"split": "test", "train_sections": described, "test_sections": [TEST_SECTIONS.start, TEST_SECTIONS.stop - 1]})


def _prepare_project(setting: str, train: BenchmarkData, out_dir: Path, seed: int):
    """Simulate, write as a project folder and read back: what the plugin would train on."""
    ann = simulate_setting(setting, train.semantic, seed=seed)
    folder = out_dir / "projects" / setting
    write_project(folder, train.raw, ann)
    project = read_project(folder)
    if not project.annotations.equals(ann):
        raise RuntimeError(f"the project folder {folder} does not read back the annotations written to it")
    return project, folder


PREVIEW_EVERY_SECONDS = 5.0
PREVIEW_SIZE = 512


def preview_region(plane_shape: tuple[int, int], size: int = PREVIEW_SIZE) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1): the centred ``size`` square (or less, on smaller planes) a user would watch
    during training."""
    h, w = plane_shape
    sy, sx = min(size, h), min(size, w)
    y0, x0 = (h - sy) // 2, (w - sx) // 2
    return y0, x0, y0 + sy, x0 + sx


def _load_average() -> float | None:
    """The machine's 1-minute load average (other work slows the timings down), where known."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # pragma: no cover - not on every platform
        return None


def preview_summary(timeline: list, at_seconds: float = 30.0) -> dict:
    """When the first live preview came, its mIoU at ``at_seconds`` (the latest preview by then) and
    at the end, and when the preview first reached 90 % of its final mIoU."""
    if not timeline:
        return {"first_seconds": None, "miou_at": None, "final_miou": None, "seconds_to_90pct": None}
    times = [t for t, _ in timeline]
    mious = [m for _, m in timeline]
    by_then = [m for t, m in timeline if t <= at_seconds]
    final = mious[-1]
    reached = [t for t, m in timeline if m >= 0.9 * final]
    return {"first_seconds": times[0], "miou_at": by_then[-1] if by_then else None, "final_miou": final,
            "seconds_to_90pct": reached[0] if reached else None}


def _run_protoseg(project, test: tuple, config, label: str, progress, preview_truth: np.ndarray | None = None,
                  instances: bool = False) -> dict:
    """Train through the plugin's entry point, predict the test sections, score.

    With ``preview_truth`` (the dense labels of the last training section), the live preview of
    :func:`preview_region` of that section is requested as the panel does, and its mIoU over time
    is recorded (``preview_timeline``: [seconds since training started, mIoU]). ``instances``: also
    decode mitochondrion instances with every decoder and score them.
    """
    from napari_protoseg.prediction.tiling import predict_volume
    from napari_protoseg.training.engine import PreviewRequest, train

    raw_test, sem_test, inst_test = test
    reset_peak_memory()
    every = max(1, config.steps // 5)
    preview = None
    timeline = []
    if preview_truth is not None:
        z = project.image.shape[0] - 1
        y0, x0, y1, x1 = preview_region(preview_truth.shape)
        preview = PreviewRequest(z, y0, x0, y1, x1, every_seconds=PREVIEW_EVERY_SECONDS)
        truth_region = preview_truth[y0:y1, x0:x1]
    load_before = _load_average()
    start = time.perf_counter()
    last = None
    for event in train(project.image, project.annotations, config, preview=preview):
        last = event
        if event.preview is not None:
            ious = class_iou(event.preview, truth_region, CLASS_NAMES)
            timeline.append([round(time.perf_counter() - start, 2), float(np.nanmean(list(ious.values())))])
        if event.model is None and (event.step % every == 0 or event.step == 1):
            total = event.losses.get("total", float("nan"))
            progress(f"  {label}: step {event.step}/{event.total_steps}  loss {total:.3f}  "
                     f"{event.elapsed:.0f} s (eta {event.eta:.0f} s)")
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    prediction = predict_volume(last.model, raw_test)
    predict_seconds = time.perf_counter() - start
    result = _scores(np.asarray(prediction.classes), sem_test, inst_test)
    result.update(train_seconds=train_seconds, predict_seconds=predict_seconds,
                  throughput_mpx_s=raw_test.size / predict_seconds / 1e6, peak_memory_mb=peak_memory_mb(),
                  gpu_peak_memory_mb=gpu_peak_memory_mb(), device=last.device, steps=last.step,
                  final_losses=last.losses, preview_timeline=timeline,
                  load_average=[load_before, _load_average()])
    if instances:
        result["instances"] = decoder_figures(last.model, raw_test, np.asarray(prediction.classes), inst_test,
                                              MITOCHONDRION)
        progress(f"  {label}: mito AP50 by decoder: " + ", ".join(
            f"{name} {figures['ap50']:.3f}" for name, figures in result["instances"].items()))
    progress(f"  {label}: mIoU {result['miou']:.3f}  mito AP50 {result['mito_ap50']:.3f}  "
             f"train {train_seconds:.0f} s  predict {result['throughput_mpx_s']:.2f} MPx/s  "
             f"peak {result['peak_memory_mb']:.0f} MiB  ({last.device})")
    return result


def _run_peer(project, test: tuple, rf: RFConfig, seed: int, label: str, progress) -> dict:
    raw_test, sem_test, inst_test = test
    reset_peak_memory()
    start = time.perf_counter()
    forest = train_random_forest(project.image, project.annotations, rf, seed=seed)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    prediction = predict_random_forest(forest, raw_test, rf)
    predict_seconds = time.perf_counter() - start
    result = _scores(prediction, sem_test, inst_test)
    # The peer's components with the size floor protoseg's decoders use (from the same annotations, or
    # where only points mark mitochondria from the method's own objects at them), so the instance table
    # compares decoders, not whether specks are dropped; the main table's AP50 is raw.
    min_size = peer_min_size(forest, project, rf)
    components = plain_instances(prediction, [MITOCHONDRION], method="components", min_size=min_size)
    result["instances"] = {"components": {**instance_figures(components, inst_test), "min_size": min_size}}
    result.update(train_seconds=train_seconds, predict_seconds=predict_seconds,
                  throughput_mpx_s=raw_test.size / predict_seconds / 1e6, peak_memory_mb=peak_memory_mb(),
                  device="cpu", training_pixels=int(min(np.count_nonzero(rf_label_planes(project.annotations)),
                                                        rf.max_pixels)))
    progress(f"  {label}: mIoU {result['miou']:.3f}  mito AP50 {result['mito_ap50']:.3f}  "
             f"train {train_seconds:.0f} s  predict {result['throughput_mpx_s']:.2f} MPx/s")
    return result


def peer_min_size(forest, project, rf: RFConfig = RFConfig()) -> int:
    """The size floor of the peer's mitochondria by the rule of protoseg's decoders: from the
    annotated objects, or, where only points mark them, from the peer's own objects at the points
    (:func:`~napari_protoseg.prediction.decoders.sizes_at_points`)."""
    learnt = sizes_at_points(lambda zs: predict_random_forest(forest, project.image[zs], rf), project.annotations)
    p10 = learnt.get(str(MITOCHONDRION), {}).get("p10")
    return min_size_from_p10(p10) if p10 else annotated_min_size(project.annotations, MITOCHONDRION)


def evaluate_targets(settings: dict) -> list[dict]:
    """The targets of the issue, measured against their thresholds (``met`` None = not measured)."""
    def miou(name, method="protoseg"):
        entry = settings.get(name)
        return None if entry is None else entry[method]["miou"]

    out = []
    full, mixed = miou("full"), miou("mixed")
    ratio = None if full is None or mixed is None or not full else mixed / full
    out.append({"target": "`mixed` mIoU >= 90 % of `full` mIoU", "measured": ratio,
                "measured_text": "not run" if ratio is None else f"{100 * ratio:.1f} % ({mixed:.3f} / {full:.3f})",
                "threshold_text": f">= {100 * TARGET_MIXED_FRACTION:.0f} %",
                "met": None if ratio is None else bool(ratio >= TARGET_MIXED_FRACTION - _TOLERANCE)})
    base = miou("masks")
    for name in ("masks+tags", "masks+boxes", "masks+points"):
        value = miou(name)
        gain = None if value is None or base is None else value - base
        out.append({"target": f"`{name}` beats `masks` by >= {TARGET_EXTRA_GAIN:.2f} mIoU", "measured": gain,
                    "measured_text": "not run" if gain is None else f"{gain:+.3f} ({value:.3f} vs {base:.3f})",
                    "threshold_text": f">= +{TARGET_EXTRA_GAIN:.2f}",
                    "met": None if gain is None else bool(gain >= TARGET_EXTRA_GAIN - _TOLERANCE)})
    for name, entry in settings.items():
        gain = entry["protoseg"]["miou"] - entry["peer"]["miou"]
        out.append({"target": f"`{name}` beats the random-forest peer by >= {TARGET_PEER_MARGIN:.2f} mIoU",
                    "measured": gain,
                    "measured_text": f"{gain:+.3f} ({entry['protoseg']['miou']:.3f} vs {entry['peer']['miou']:.3f})",
                    "threshold_text": f">= +{TARGET_PEER_MARGIN:.2f}",
                    "met": bool(gain >= TARGET_PEER_MARGIN - _TOLERANCE)})
    out += evaluate_instance_targets(settings)
    return out


def _check_dependencies() -> None:
    """Fail before hours of training, not after, when the peer or the plot cannot run."""
    missing = []
    for module, package in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ImportError(f"the benchmark needs {' and '.join(missing)}; install them with "
                          "pip install 'napari-protoseg[benchmark]'")


def _pretrain_on_training_part(raw: np.ndarray, config, minutes: float, out_dir: Path, results: dict, progress):
    """Self-supervised pretraining on the training part's raw pixels, from ``config.encoder``; the
    configuration to train with from the encoder it wrote (its time recorded in ``results``)."""
    from napari_protoseg.model.encoder import load_encoder, save_encoder
    from napari_protoseg.pretraining.engine import PretrainConfig, pretrain

    init = load_encoder(config.encoder) if config.encoder is not None else None
    pretrain_config = PretrainConfig(time_limit=60.0 * minutes, steps=1_000_000, seed=config.seed,
                                     model=replace(config.model, in_channels=1), device=config.device)
    progress(f"pretraining on the training part ({' x '.join(map(str, raw.shape))}) for {minutes:g} min, "
             f"from {config.encoder or 'random weights'}")
    *_, last = pretrain([raw], pretrain_config, init=init, report_every=10_000,
                        provenance={"data": "benchmark training part (raw pixels only)"})
    path = save_encoder(out_dir / "stack-encoder.safetensors", last.encoder)
    results["pretraining"] = {"minutes": minutes, "seconds": last.elapsed, "steps": last.step,
                              "objective": pretrain_config.objective, "started_from": config.encoder,
                              "reads": "raw pixels of the training part only", "encoder": str(path)}
    progress(f"  pretrained {last.step} steps in {last.elapsed:.0f} s -> {path}")
    return config.with_changes({"encoder": str(path)})


def run_benchmark(data_dir, out_dir, settings=None, quick: bool = False, ablations: bool | None = None,
                  seed: int = 0, config_overrides: dict | None = None, progress=print, *,
                  docs_path: str | Path | None = None, command: str | None = None,
                  ablation_settings=None, validation: bool = False, pretrain_minutes: float | None = None) -> dict:
    """Run the annotation-budget benchmark of ``BENCHMARK.md`` and write its outputs.

    ``settings``: the settings to run (default: all of :data:`SETTINGS`; :data:`QUICK_SETTINGS`
    with ``quick``). ``quick``: sections cropped to ``QUICK_CROP`` pixels, ``QUICK_STEPS`` training
    steps on ``QUICK_CROP_SIZE`` crops and the lighter peer :data:`QUICK_RF`. ``ablations``: the
    ablation runs of :data:`ABLATIONS` (default: on for full runs, off for quick ones), only those of
    ``ablation_settings`` if given. ``validation``: train and score on the split of
    :func:`benchmark_split` that reads no test section (for choosing defaults; never the docs).
    ``config_overrides``: :class:`~napari_protoseg.training.engine.TrainConfig` fields (e.g. ``steps``; the
    network's nested under ``"model"``, e.g. ``{"model": {"base_width": 16}}``).
    ``pretrain_minutes``: first pretrain the encoder on the raw pixels of the training part for
    that long (self-supervised, from the configuration's encoder), then train every run from it;
    BENCHMARK.md lets pretraining read sections 0-9, never sections 10-19 (the validation split: the
    training rows only).
    Writes ``results.json``, ``benchmarks.md``, ``miou_vs_time.png`` and one project folder per
    setting (``projects/<setting>``) into ``out_dir``, and the Markdown also to ``docs_path`` if
    given. Returns the results as written to ``results.json`` (which has null where this dict has NaN,
    e.g. the IoU of a class absent from both prediction and truth). mIoU is the mean over the classes
    present in the test sections or the prediction (all five on the whole sections).
    """
    from napari_protoseg import __version__
    from napari_protoseg.training.engine import PreviewRequest

    _check_dependencies()
    if validation and docs_path is not None:
        raise ValueError("a validation run scores training sections; it cannot be the report in the docs")
    wall_start = time.perf_counter()
    settings = list(dict.fromkeys(settings if settings is not None else (QUICK_SETTINGS if quick else SETTINGS)))
    for name in settings:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; choose from {', '.join(SETTINGS)}")
    ablations = (not quick) if ablations is None else bool(ablations)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = benchmark_config(quick, config_overrides, seed)
    rf = QUICK_RF if quick else RFConfig()
    crop = QUICK_CROP if quick else None

    progress(f"benchmark: loading {data_dir}" + (f" (quick: sections cropped to {crop} x {crop})" if quick else "")
             + (" (validation: scoring the bottom rows of sections 0-9, not sections 10-19)" if validation else ""))
    try:
        split = benchmark_split(BenchmarkData.load(data_dir, crop=crop), validation, recount_instances=crop is not None)
    except ValueError as error:
        raise ValueError(f"{data_dir}: {error}") from None
    sem_test, inst_test = split.test.semantic, split.test.mito_instances
    test = (split.test.raw, sem_test, inst_test)

    results: dict = {
        "benchmark": "napari-protoseg annotation-budget benchmark (BENCHMARK.md)",
        "napari_protoseg_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command, "quick": quick, "seed": seed, "complete": False,
        "data": {"folder": str(data_dir), "train_shape": list(split.train.raw.shape),
                 "test_shape": list(split.test.raw.shape), "crop": crop, **split.description,
                 "citation": DATASET_CITATION},
        "cost_model_seconds": {"dense_mask_1024x1024": 90 * 60, "box": BOX_SECONDS, "point": POINT_SECONDS,
                               "tag_per_class_per_tile": TAG_SECONDS},
        "train_config": config.to_dict(), "peer_config": rf.to_dict(),
        "peer_note": ("quick run: lighter peer than the protocol's (fewer trees, scales and training pixels)"
                      if quick else "peer as in BENCHMARK.md"),
        "environment": _environment(), "settings": {}, "shared_peer_fits": {}, "ablations": [],
        "preview": {"every_seconds": PREVIEW_EVERY_SECONDS, "max_time_share": PreviewRequest.max_time_share},
    }
    if pretrain_minutes:
        config = _pretrain_on_training_part(split.train.raw, config, pretrain_minutes, out_dir, results, progress)
        results["train_config"] = config.to_dict()
        save_json(out_dir / "results.json", results)
    tested = {}  # (setting, config json) -> protoseg result, for ablations that repeat a main run
    peer_fits: dict[str, tuple[str, dict]] = {}  # fingerprint of the peer's training pixels -> (setting, result)
    projects = {}
    for i, name in enumerate(settings, 1):
        progress(f"[{i}/{len(settings)}] {name}: simulating annotations and writing the project folder")
        project, folder = _prepare_project(name, split.train, out_dir, seed)
        projects[name] = project
        totals = project.annotations.summary()["totals"]
        minutes = annotation_seconds(project.annotations) / 60
        progress(f"  {name}: {totals['mask_pixels']} mask px, {totals['boxes']} boxes, {totals['points']} points, "
                 f"{totals['tags']} tags -> {minutes:.1f} min of annotation (cost model)")
        entry = {"project": str(folder), "annotation_totals": totals, "annotation_minutes": minutes}
        entry["protoseg"] = _run_protoseg(project, test, config, f"{name} protoseg", progress,
                                          preview_truth=split.train.semantic[-1],
                                          instances=name in INSTANCE_SETTINGS)
        tested[(name, json.dumps(config.to_dict(), sort_keys=True))] = entry["protoseg"]
        key = hashlib.sha1(rf_label_planes(project.annotations).tobytes()).hexdigest()
        if key in peer_fits:
            first, peer = peer_fits[key]
            entry["peer"] = {**peer, "shared_fit_with": first}
            results["shared_peer_fits"].setdefault(first, []).append(name)
            progress(f"  {name} peer: same training pixels as `{first}` (the peer ignores boxes and tags) "
                     f"-> same random-forest fit, mIoU {peer['miou']:.3f}")
        else:
            peer = _run_peer(project, test, rf, seed, f"{name} peer", progress)
            peer_fits[key] = (name, peer)
            entry["peer"] = {**peer, "shared_fit_with": None}
        results["settings"][name] = entry
        save_json(out_dir / "results.json", results)

    if ablations:
        for setting, variant, changes in ABLATIONS:
            if ablation_settings is not None and setting not in ablation_settings:
                continue
            cfg = config.with_changes(changes)
            key = (setting, json.dumps(cfg.to_dict(), sort_keys=True))
            row = {"setting": setting, "variant": variant, "changes": changes}
            if key in tested:
                row.update(protoseg=tested[key], reused_main_run=True)
                progress(f"ablation {setting} / {variant}: same configuration as the main run, reused")
            elif cfg.to_dict() == config.to_dict() and setting not in settings:
                # The main run of that setting, done in another part of a split run: --merge adds it.
                progress(f"ablation {setting} / {variant}: is the main run of `{setting}`; merge with that run")
                continue
            else:
                progress(f"ablation {setting} / {variant}: training")
                if setting not in projects:
                    projects[setting], _ = _prepare_project(setting, split.train, out_dir, seed)
                row.update(protoseg=_run_protoseg(projects[setting], test, cfg, f"{setting} {variant}", progress),
                           reused_main_run=False)
                tested[key] = row["protoseg"]
            results["ablations"].append(row)
            save_json(out_dir / "results.json", results)

    counts = np.bincount(sem_test.ravel(), minlength=len(CLASS_NAMES) + 1)
    results["reference"] = {"all_cytoplasm": _scores(np.ones_like(sem_test), sem_test, inst_test),
                            "test_class_shares": {CLASS_NAMES[c]: counts[c] / sem_test.size for c in CLASS_NAMES}}
    results["targets"] = evaluate_targets(results["settings"])
    results["wall_seconds"] = time.perf_counter() - wall_start
    results["complete"] = True
    written = write_report(results, out_dir, docs_path)
    for target in results["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        progress(f"target: {target['target'].replace('`', '')}: {target['measured_text']} "
                 f"(threshold {target['threshold_text']}) -> {verdict}")
    progress(f"benchmark finished in {results['wall_seconds'] / 60:.1f} min; wrote " + ", ".join(map(str, written)))
    return results


# ----------------------------------------------------------------------------- instances

INSTANCE_SETTINGS = ("points-only", "masks+points", "mixed", "full")
TARGET_POINTS_ONLY_AP50 = 0.70
TARGET_AP50_OVER_PEER = 0.20
def dense_label_ceiling(settings: dict) -> list[str]:
    """Markdown lines setting the targets against `full`, the upper bound of every other setting.

    Every other setting's annotations are simulated from `full`'s dense masks of the same sections,
    so what `full` gains over `masks` (and its mitochondrion AP50) is about what weak labels can be
    expected to reach. Empty when `full` or `masks` did not run.
    """
    full, masks = settings.get("full"), settings.get("masks")
    if not full or not masks:
        return []
    gain = full["protoseg"]["miou"] - masks["protoseg"]["miou"]
    text = (f"Upper bound: every other setting's annotations are simulated from `full`'s dense masks of "
            f"the same sections. Here `full` scores {full['protoseg']['miou']:.3f} mIoU, {gain:+.3f} against "
            f"`masks`; a weak setting that beats `masks` by {TARGET_EXTRA_GAIN:.2f} would have to learn "
            f"{'more than' if gain < TARGET_EXTRA_GAIN else 'about as much as'} the dense masks it was "
            "simulated from teach.")
    inst = full["protoseg"].get("instances", {})
    if inst:
        decoders = ", ".join(f"{decoder} {figures['ap50']:.3f}" for decoder, figures in inst.items())
        text += (f" Mitochondrion AP50 from `full` (by decoder: {decoders}) bounds the "
                 f"{TARGET_POINTS_ONLY_AP50:.2f} asked of `points-only`.")
    return [text, ""]


def evaluate_instance_targets(settings: dict) -> list[dict]:
    """The instance targets: `points-only` AP50 (WISE decoder) >= 0.7 and >= the peer's connected
    components + 0.2; the WISE decoder beats the plain (watershed) decoder on touching objects."""
    entry = settings.get("points-only")
    inst = (entry or {}).get("protoseg", {}).get("instances", {})
    wise = inst.get("wise")
    peer = (entry or {}).get("peer", {}).get("instances", {}).get("components")
    out = [{"target": f"`points-only` mito AP50 (WISE decoder) >= {TARGET_POINTS_ONLY_AP50:.2f}",
            "measured": None if wise is None else wise["ap50"],
            "measured_text": "not run" if wise is None else f"{wise['ap50']:.3f}",
            "threshold_text": f">= {TARGET_POINTS_ONLY_AP50:.2f}",
            "met": None if wise is None else bool(wise["ap50"] >= TARGET_POINTS_ONLY_AP50 - _TOLERANCE)}]
    gain = None if wise is None or peer is None else wise["ap50"] - peer["ap50"]
    out.append({"target": f"`points-only` mito AP50 (WISE) beats the peer's connected components by >= "
                          f"{TARGET_AP50_OVER_PEER:.2f}", "measured": gain,
                "measured_text": "not run" if gain is None else f"{gain:+.3f} ({wise['ap50']:.3f} vs {peer['ap50']:.3f})",
                "threshold_text": f">= +{TARGET_AP50_OVER_PEER:.2f}",
                "met": None if gain is None else bool(gain >= TARGET_AP50_OVER_PEER - _TOLERANCE)})
    for name in INSTANCE_SETTINGS:
        inst = settings.get(name, {}).get("protoseg", {}).get("instances", {})
        if "wise" not in inst or "watershed" not in inst:
            continue
        a, b = inst["wise"]["touching_recall"], inst["watershed"]["touching_recall"]
        measured = None if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) else a - b
        out.append({"target": f"`{name}`: WISE decoder beats the plain decoder where mitochondria touch",
                    "measured": measured,
                    "measured_text": "no touching mitochondria in the test sections (on the synthetic sample: "
                                     "benchmark-touching.md)" if measured is None else
                    f"{measured:+.3f} (recall of touching objects {a:.3f} vs {b:.3f})",
                    "threshold_text": "> 0", "met": None if measured is None else bool(measured > 0)})
    return out


def _touching_count_text(results: dict) -> str:
    counts = {figures.get("touching_objects") for entry in results["settings"].values()
              for figures in entry.get("protoseg", {}).get("instances", {}).values()}
    counts.discard(None)
    if len(counts) != 1:
        return "the number of such objects differs between runs."
    count = counts.pop()
    return ("the test sections hold none, so no decoder can be compared there; `protoseg benchmark-touching` "
            "compares them on the synthetic sample, where many touch (benchmark-touching.md)." if count == 0 else
            f"the test sections hold {count}.")


def render_instance_markdown(results: dict) -> list[str]:
    """The mitochondrion-instance table (settings of :data:`INSTANCE_SETTINGS` that have instance figures)."""
    rows = []
    for setting in INSTANCE_SETTINGS:
        entry = results["settings"].get(setting)
        if not entry:
            continue
        for method, label in (("protoseg", "protoseg"), ("peer", "random forest")):
            for decoder, figures in entry.get(method, {}).get("instances", {}).items():
                rows.append(f"| `{setting}` | {label} | {decoder} | {_f(figures['ap50'])} | "
                            f"{_f(figures['matched_iou'])} | {_f(figures.get('touching_recall'))} | "
                            f"{figures['tp']} / {figures['fp']} / {figures['fn']} |")
    if not rows:
        return []
    peer_sizes = [entry.get("peer", {}).get("instances", {}).get("components", {}).get("min_size")
                  for entry in results["settings"].values() if entry.get("peer", {}).get("instances")]
    rule = (f"objects smaller than {MIN_SIZE_SHARE:g} of the annotated mitochondria's 10th-percentile area "
            f"(at least {DEFAULT_MIN_SIZE} px; where only points mark them, of the method's own objects at the "
            "training points that hold one point each)")
    if peer_sizes and all(size is not None for size in peer_sizes):
        size_rule = (f"Every decoder, the peer's included, drops {rule}; the main table's AP50 keeps every speck.")
    else:
        size_rule = (f"protoseg's decoders drop {rule}; the peer's components keep every speck, as in the table "
                     "above.")
    return ["## Mitochondrion instances", "",
            "Per test section, a predicted instance matches a true one at IoU >= 0.5; AP50 = TP / (TP + FP + FN); "
            "matched IoU = mean IoU of the matches. Decoders: `wise` (the class map's connected parts, each split by "
            "embedding similarity where two or more blobs of the localization map fall in it, blobs whose pixels embed alike "
            "kept as one object), `watershed` (distance-transform split of the "
            "class map), `components` (4-connected components; the peer's only option). " + size_rule + " Touching recall: share of "
            f"true mitochondria within {TOUCHING_GAP} px of another that are matched (objects under {TOUCHING_MIN_AREA} px, "
            f"which no decoder keeps, are label specks and do not count); " + _touching_count_text(results), "",
            "| setting | method | decoder | AP50 | matched IoU | touching recall | TP / FP / FN |",
            "| --- | --- | --- | --- | --- | --- | --- |", *rows, ""]


# --------------------------------------------------------------------------------- reporting


def _f(value, digits: int = 3) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _preview_pacing_text(results: dict) -> str:
    """How often the run asked for previews, as its results record it."""
    pacing = results.get("preview")
    if not pacing:  # runs before the pacing was recorded previewed every PREVIEW_EVERY_SECONDS, whatever it cost
        return f"every {PREVIEW_EVERY_SECONDS:g} s"
    return (f"every {pacing['every_seconds']:g} s, less often where previews would take over "
            f"{pacing['max_time_share']:.0%} of the training time")


def _is_validation(results: dict) -> bool:
    return results.get("data", {}).get("split") == "validation"


def render_markdown(results: dict, plot: str = PLOT_FILE) -> str:
    """The Markdown report of a benchmark run (its tables, targets, ablations and provenance), showing
    the plot of mIoU against annotation time from the relative path ``plot``."""
    quick = results["quick"]
    env = results["environment"]
    names = list(CLASS_NAMES.values())
    lines = ["# Benchmark: segmentation quality against annotation time", ""]
    if results.get("partial"):
        missing = [n for n in SETTINGS if n not in results["settings"]]
        done = {(row["setting"], row["variant"]) for row in results["ablations"]}
        missing_ablations = [f"`{s}` / {v}" for s, v, _ in ABLATIONS if (s, v) not in done]
        lines += ["> **Partial results**: merged from runs that did not cover the whole protocol"
                  + (f" (missing settings: {', '.join(f'`{n}`' for n in missing)})" if missing else "")
                  + f"; {len(results['ablations'])} of {len(ABLATIONS)} ablations"
                  + (f" (missing: {'; '.join(missing_ablations)})" if missing_ablations else "") + ".", ""]
    validation = _is_validation(results)
    if validation:
        d = results["data"]
        lines += [f"> **Validation run**: trained on rows {d['train_rows'][0]}-{d['train_rows'][1]} of sections "
                  f"{d['train_sections'][0]}-{d['train_sections'][1]} and scored on their rows "
                  f"{d['test_rows'][0]}-{d['test_rows'][1]}; no test section was read. It serves to choose "
                  "defaults; it is not the benchmark, and \"sections 10-19\" below means those rows.", ""]
    if results.get("pretraining"):
        p = results["pretraining"]
        lines += [f"> **Stack pretraining**: before training, the encoder learnt the raw pixels of the training "
                  f"part without labels ({p['objective']} objective, {p['steps']} steps in {p['seconds'] / 60:.1f} min, "
                  f"from {p['started_from'] or 'random weights'}); every run below starts from it.", ""]
    if quick:
        lines += ["> **Quick run** (CI smoke test): sections cropped to "
                  f"{results['data']['crop']} x {results['data']['crop']} pixels, "
                  f"{results['train_config']['steps']} training steps, lighter random-forest peer. "
                  "Its figures say only that the pipeline works; they are not the benchmark.", ""]
    lines += [
        "Protocol: train on sections 0-9 of the Drosophila larval VNC ssTEM stack with the simulated "
        "annotations of each setting (written as an annotation project folder and trained through the "
        "same entry point as the plugin's *Train* button), predict sections 10-19, compare with the "
        "dense expert labels. Peer: an ilastik-style random-forest pixel classifier (scikit-image "
        "`multiscale_basic_features` + scikit-learn `RandomForestClassifier`) trained on the pixels each "
        "setting labels directly (masks and points). Annotation time comes from the cost model: dense "
        "mask of a 1024 x 1024 section 90 min, box 7 s, point 2 s, tag 1 s per class per tile. "
        "Self-supervised pretraining, where a run uses it, reads only the raw pixels of sections 0-9 and "
        "public EM that is not benchmark data (the shipped encoder: FIB-SEM of the fly medulla), never "
        "sections 10-19.", "",
        f"Regenerate: `{COMMAND}` (or `python -m napari_protoseg.benchmark.budget DATA_DIR --out OUT_DIR`) with "
        "DATA_DIR the folder of `raw.tif`, `semantic.tif` and `mito_instances.tif`. It writes `results.json` "
        "(every figure, configuration, timing, device, version and date), `benchmarks.md` and "
        "`miou_vs_time.png` into OUT_DIR; the complete run, from a source checkout, also rewrites "
        "`docs/benchmarks.md`, `docs/benchmark-results.json` and `docs/images/miou_vs_time.png` (as does "
        "`--merge` of runs that together cover the protocol). One run is one seed, and runs of the same "
        "code at other seeds differ by up to 0.05 mIoU: `--seeds 0 1 2` runs each seed and writes the mean "
        "and spread over them (`seeds.md`, `seeds.json`); `--summarize-seeds RESULTS_JSON ...` makes that "
        "summary of runs already done.", "",
        "## Results", "",
        "| setting | method | annotation (min) | " + " | ".join(f"IoU {n}" for n in names)
        + " | mIoU | mito AP50 (raw) | mito matched IoU (raw) | train (s) | predict (MPx/s) | peak memory (MiB) |",
        "|" + " --- |" * (14),
    ]
    notes = []
    for setting, entry in results["settings"].items():
        for method, label in (("protoseg", "protoseg"), ("peer", "random forest")):
            r = entry[method]
            shared = r.get("shared_fit_with")
            train_s = f"{r['train_seconds']:.0f}"
            if shared:
                train_s = f"(= `{shared}`)"
                label += "*"
            lines.append(
                f"| `{setting}` | {label} | {entry['annotation_minutes']:.1f} | "
                + " | ".join(_f(r["iou"][n]) for n in names)
                + f" | **{_f(r['miou'])}** | {_f(r['mito_ap50'])} | {_f(r['mito_matched_iou'])} | {train_s} | "
                f"{_f(r['throughput_mpx_s'], 2)} | {r['peak_memory_mb']:.0f} |")
    if results.get("shared_peer_fits"):
        for first, others in results["shared_peer_fits"].items():
            listed = " and ".join(f"`{o}`" for o in others)
            verb = "give" if len(others) > 1 else "gives"
            notes.append(f"\\* The peer sees only masks and points, so {listed} {verb} it exactly the training "
                         f"pixels of `{first}`: one random-forest fit serves them all "
                         "(its train time is counted once).")
    ref = results.get("reference", {}).get("all_cytoplasm")
    if ref:
        notes.append(f"Reference: predicting every pixel as cytoplasm gives mIoU {_f(ref['miou'])}.")
    notes.append("Train time includes building the training crops (protoseg) or features (peer); prediction "
                 "throughput includes feature computation for the peer. Peak memory is the peak resident "
                 "memory of the benchmark process during that setting's training and prediction (it includes "
                 "the loaded data set and the Python/PyTorch runtime).")
    loads = [v for entry in results["settings"].values() for v in (entry["protoseg"].get("load_average") or [])
             if v is not None]
    if loads:
        notes.append(f"Machine load (1-minute load average at the start and end of each training): "
                     f"{min(loads):.1f} to {max(loads):.1f} on {env.get('cpu_count')} cores; above the core count, "
                     "other work shared the CPU and the times are longer than on an idle machine.")
    commit = f" (commit {env['source_commit']})" if env.get("source_commit") else ""
    runs = [part for part in results.get("merged_from") or [] if isinstance(part, dict)]
    notes.append(f"Device: {_device_line(results)}. napari-protoseg {results['napari_protoseg_version']}{commit}, "
                 f"PyTorch {env['torch']}, scikit-learn {env.get('sklearn')}, scikit-image {env.get('skimage')}; "
                 f"{_run_time_text(results, runs)}; seed {results['seed']}.")
    if len({part.get("date") for part in runs}) > 1:
        notes.append("The merged parts ran at different times, possibly on machines of different speed: "
                     "compare train times and prediction throughput within one part only.")
    for part in results.get("merged_from") or []:
        if isinstance(part, dict) and "settings" in part:  # merges before versions were recorded hold only dates
            done = [f"`{name}`" for name in part["settings"]] + part["ablations"]
            commit = f" (commit {part['source_commit']})" if part.get("source_commit") else ""
            wall = part.get("wall_seconds")
            took = f", {wall / 60:.0f} min" if wall is not None else ""
            notes.append(f"Merged part: napari-protoseg {part['napari_protoseg_version']}{commit}, run {part['date']}"
                         f"{took}: " + (", ".join(done) if done else "nothing finished") + ".")
    cfg = results["train_config"]
    notes.append(f"Training: {cfg['steps']} steps, batch {cfg['batch_size']}, crops {cfg['crop_size']} px "
                 "(present tags wider than a crop get steps of their own with fewer, larger crops that hold "
                 "the tagged regions, about as many pixels in all), "
                 f"learning rate {cfg['learning_rate']}, pseudo-label warm-up {cfg['pseudo_label_warmup']} steps, "
                 f"tag pooling {cfg['tag_pooling']}. Peer: {results['peer_config']['n_estimators']} trees, depth "
                 f"{results['peer_config']['max_depth']}, {results['peer_config']['num_sigma']} scales (sigma "
                 f"{results['peer_config']['sigma_min']:g}-{results['peer_config']['sigma_max']:g}), at most "
                 f"{results['peer_config']['max_pixels']} training pixels. "
                 f"{results['peer_note'][:1].upper()}{results['peer_note'][1:]}.")
    notes.append("mIoU: mean IoU over the classes present in the test sections or the prediction. "
                 "Mito AP50 and matched IoU in this table: every 4-connected component of the predicted class map "
                 "per section is an instance, however small, so specks count as false positives; AP50 = TP / "
                 "(TP + FP + FN) at IoU >= 0.5. The decoders of the plugin drop objects smaller than a size learnt "
                 "from the annotations: the section *Mitochondrion instances* scores those.")
    lines += [""] + [n + "\n" for n in notes]
    lines += [f"Data: {results['data']['citation']}.", ""]
    lines += render_instance_markdown(results)

    timelines = {name: entry["protoseg"].get("preview_timeline") for name, entry in results["settings"].items()}
    if any(timelines.values()):
        lines += ["## Interactivity: live preview and training time", "",
                  "While training, the panel predicts the region in view every few seconds. Here a preview "
                  f"is asked for {_preview_pacing_text(results)}; the "
                  f"view is the central {PREVIEW_SIZE} x {PREVIEW_SIZE} region of the last training section "
                  "(section 9), scored against its expert labels (dense only in `full`; in the other settings "
                  "that section has sparse or no annotations). Times count from the start of training, "
                  "including setting up the crops; the default budget targets are a first useful preview "
                  "within 30 s and a whole default run on this 10 x 1024 x 1024 stack within 5 min. The benchmark "
                  "trains its fixed step count so that runs compare; the panel stops a run at 5 min by default "
                  "(TrainConfig.time_limit), doing fewer steps where the machine is slower.", "",
                  "| setting | first preview (s) | preview mIoU at 30 s | final preview mIoU | "
                  "90 % of final reached at (s) | whole run (s) |", "|" + " --- |" * 6]
        for name, timeline in timelines.items():
            if not timeline:
                continue
            ps = preview_summary(timeline)
            lines.append(f"| `{name}` | {_f(ps['first_seconds'], 1)} | {_f(ps['miou_at'])} | "
                         f"{_f(ps['final_miou'])} | {_f(ps['seconds_to_90pct'], 0)} | "
                         f"{results['settings'][name]['protoseg']['train_seconds']:.0f} |")
        lines.append("")

    lines += ["## Targets", "", "| target | measured | threshold | verdict |", "| --- | --- | --- | --- |"]
    for t in results.get("targets") or evaluate_targets(results["settings"]):
        verdict = {True: "met", False: "**not met**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured_text']} | {t['threshold_text']} | {verdict} |")
    lines.append("")
    lines += dense_label_ceiling(results["settings"])

    if results["ablations"]:
        lines += ["## Ablations", "",
                  "| setting | variant | " + " | ".join(f"IoU {n}" for n in names)
                  + " | mIoU | mito AP50 (raw) | train (s) |", "|" + " --- |" * 10]
        for row in results["ablations"]:
            r = row["protoseg"]
            variant = row["variant"] + (" (main run)" if row.get("reused_main_run") else "")
            lines.append(f"| `{row['setting']}` | {variant} | " + " | ".join(_f(r["iou"][n]) for n in names)
                         + f" | **{_f(r['miou'])}** | {_f(r['mito_ap50'])} | {r['train_seconds']:.0f} |")
        if any(row.get("reused_main_run") for row in results["ablations"]):
            lines += ["", "Train time: a main run's includes its live previews; the other ablation runs ask for none."]
        lines.append("")
    lines += [f"![mIoU against annotation time]({plot})", ""]
    return "\n".join(lines)


def _device_line(results: dict) -> str:
    env = results["environment"]
    devices = sorted({e["protoseg"]["device"] for e in results["settings"].values()})
    where = ", ".join(devices) or "?"
    if env.get("cuda_device"):
        where += f" ({env['cuda_device']})"
    return f"protoseg on {where}, peer on CPU; {env['cpu_count']} CPU cores, {env['platform']}"


def _crowded(x: float, y: float, placed: list[tuple[float, float]]) -> bool:
    """Whether a label above the marker at (x, y) would run into one already above a marker nearby
    (within 0.15 decades of annotation time and 0.03 mIoU)."""
    return any(abs(math.log10(x / px)) < 0.15 and abs(y - py) < 0.03 for px, py in placed)


def plot_miou_vs_time(results: dict, path: str | Path) -> None:
    """mIoU against estimated annotation time, one marker per setting, protoseg and the peer."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), dpi=120)
    ax = fig.add_subplot()
    if not results["settings"]:  # an --ablations-only run: nothing to plot against annotation time
        ax.text(0.5, 0.5, "no settings in this run (ablations only)", ha="center", va="center")
        ax.set_axis_off()
        fig.savefig(path)
        return
    for entry in results["settings"].values():  # a faint line pairs each setting's two markers
        ax.plot([entry["annotation_minutes"]] * 2, [entry["protoseg"]["miou"], entry["peer"]["miou"]],
                color="#cccccc", linewidth=1, zorder=1)
    placed_above: list[tuple[float, float]] = []  # labels written above their marker
    for method, label, marker, color in (("protoseg", "napari-protoseg", "o", "#1f77b4"),
                                         ("peer", "random forest (peer)", "s", "#7f7f7f")):
        xs, ys = [], []
        for setting, entry in results["settings"].items():
            x, y = entry["annotation_minutes"], entry[method]["miou"]
            xs.append(x)
            ys.append(y)
            if method == "protoseg":
                below = _crowded(x, y, placed_above)
                ax.annotate(setting, (x, y), textcoords="offset points", fontsize=8,
                            xytext=(5, -11) if below else (5, 4))
                if not below:
                    placed_above.append((x, y))
        ax.scatter(xs, ys, marker=marker, color=color, label=label, zorder=4 if method == "protoseg" else 3)
    ref = results.get("reference", {}).get("all_cytoplasm")
    if ref:
        ax.axhline(ref["miou"], color="#d62728", linestyle=":", linewidth=1, label="everything cytoplasm")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    # Label minor ticks 2, 5, 20, 50, ... only, so the axis stays readable over several decades.
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if v > 0 and f"{v:.0e}"[0] in "25" else ""))
    ax.set_xlabel("estimated annotation time (minutes, log scale)")
    ax.set_ylabel("mIoU on validation rows of sections 0-9" if _is_validation(results) else "mIoU on sections 10-19")
    title = "mIoU against annotation time"
    if _is_validation(results):
        title += " (VALIDATION run)"
    if results["quick"]:
        title += " (QUICK run: cropped, short training)"
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------- command line


def _runs_of(part: dict) -> list[dict]:
    """The runs a ``results.json`` comes from: its own, or those it was merged from (a merge of a
    merge keeps every run's version, date and wall time)."""
    if part.get("merged_from"):
        return [run if isinstance(run, dict) else {"date": run} for run in part["merged_from"]]
    return [{"date": part.get("date"), "napari_protoseg_version": part.get("napari_protoseg_version"),
             "source_commit": part.get("environment", {}).get("source_commit"),
             "wall_seconds": part.get("wall_seconds"),
             "settings": list(part["settings"]),
             "ablations": [f"{row['setting']} / {row['variant']}" for row in part.get("ablations", [])]}]


def _run_time_text(results: dict, runs: list[dict]) -> str:
    """When the run was and how long it took; ``runs``: the runs a merged result comes from."""
    wall = results.get("wall_seconds")
    when = f"merged from {len(runs)} runs (below)" if len(runs) > 1 else f"run {results['date']}"
    if wall is None:
        return f"{when}, total time not recorded (a part was stopped before its end, or merged without its time)"
    return f"{when}, {wall / 60:.0f} min in all"


def merge_results(parts: list[dict]) -> dict:
    """One result from the ``results.json`` of runs that each did some of the settings and ablations.

    A long benchmark can thus run in parts (``--settings ... --no-ablations`` in one session, the
    rest in another) and still give the one report; a part that was interrupted contributes the
    settings and ablations it finished (each is saved as soon as it is done). All parts must have the same training
    configuration, quick flag and seed; settings and ablation rows are taken from the part that ran
    them (a later part wins a repeated one). The merged result is ``complete`` only when it holds
    every setting and every ablation of the protocol.
    """
    if not parts:
        raise ValueError("nothing to merge")
    from napari_protoseg.training.engine import TrainConfig

    # Each part's configuration in today's format, meaning what it meant in its run (an older part's
    # flat one, or one without the options added since).
    parts = [{**part, "train_config": json.loads(json.dumps(TrainConfig.from_dict(part["train_config"]).to_dict()))}
             for part in parts]
    first = parts[0]
    for part in parts[1:]:
        if _is_validation(part) != _is_validation(first):
            raise ValueError("a validation run and a run scored on the test sections cannot be merged")
    for key in ("train_config", "quick", "seed"):
        for part in parts[1:]:
            if part.get(key) != first.get(key):
                raise ValueError(f"the parts differ in {key}: {first.get(key)!r} vs {part.get(key)!r}; "
                                 "only runs of the same configuration can be merged")
    merged = json.loads(json.dumps(first))
    merged["settings"], merged["ablations"], merged["shared_peer_fits"] = {}, [], {}
    rows: dict[tuple[str, str], dict] = {}
    for part in parts:  # a run that was interrupted still gives the settings and ablations it finished
        merged["settings"].update(part["settings"])
        for row in part.get("ablations", []):
            rows[(row["setting"], row["variant"])] = row
    ordered = [name for name in SETTINGS if name in merged["settings"]]
    merged["settings"] = {name: merged["settings"][name] for name in ordered}
    for name, entry in merged["settings"].items():
        first_fit = entry["peer"].get("shared_fit_with")
        if first_fit and first_fit in merged["settings"]:
            merged["shared_peer_fits"].setdefault(first_fit, []).append(name)
        elif first_fit:  # the setting it shared with is not in the merge: its own fit, then
            entry["peer"]["shared_fit_with"] = None
    config = TrainConfig.from_dict(merged["train_config"])
    for setting, variant, changes in ABLATIONS:
        is_main_run = config.with_changes(changes) == config
        if is_main_run and (setting, variant) not in rows and setting in merged["settings"]:
            rows[(setting, variant)] = {"setting": setting, "variant": variant, "changes": changes,
                                        "protoseg": merged["settings"][setting]["protoseg"], "reused_main_run": True}
    merged["ablations"] = [rows[(s, v)] for s, v, _ in ABLATIONS if (s, v) in rows]
    merged["targets"] = evaluate_targets(merged["settings"])
    merged["merged_from"] = [run for part in parts for run in _runs_of(part)]
    walls = [run.get("wall_seconds") for run in merged["merged_from"]]
    # An interrupted part never wrote its wall time: the total is then unknown, not the others' sum.
    merged["wall_seconds"] = sum(walls) if all(w is not None for w in walls) else None
    merged["complete"] = len(merged["settings"]) == len(SETTINGS) and len(merged["ablations"]) == len(ABLATIONS)
    merged["partial"] = not merged["complete"]
    return merged


def write_report(results: dict, out_dir: str | Path, docs_path: str | Path | None = None) -> list[Path]:
    """Write ``results.json``, ``benchmarks.md`` and the plot into ``out_dir``; with ``docs_path`` also
    the Markdown there, with ``benchmark-results.json`` next to it and the plot in ``images/`` beside
    it (how ``docs/`` holds them). Returns the paths written."""
    out_dir = Path(out_dir)
    save_json(out_dir / "results.json", results)
    (out_dir / "benchmarks.md").write_text(render_markdown(results))
    plot_miou_vs_time(results, out_dir / PLOT_FILE)
    written = [out_dir / "results.json", out_dir / "benchmarks.md", out_dir / PLOT_FILE]
    if docs_path is not None:
        docs_path = Path(docs_path)
        (docs_path.parent / DOCS_IMAGES).mkdir(parents=True, exist_ok=True)
        docs_path.write_text(render_markdown(results, plot=f"{DOCS_IMAGES}/{PLOT_FILE}"))
        shutil.copyfile(out_dir / "results.json", docs_path.parent / DOCS_RESULTS_FILE)
        shutil.copyfile(out_dir / PLOT_FILE, docs_path.parent / DOCS_IMAGES / PLOT_FILE)
        written += [docs_path, docs_path.parent / DOCS_RESULTS_FILE, docs_path.parent / DOCS_IMAGES / PLOT_FILE]
    return written


def write_merged(result_files: list[str | Path], out_dir: str | Path, docs_path: str | Path | None = None,
                 progress=print, docs_even_if_partial: bool = False) -> dict:
    """Merge the ``results.json`` files of partial runs and write the report like a single run; the
    Markdown goes to ``docs_path`` too when the merge is complete (or ``docs_even_if_partial``: it
    then says which settings and ablations are missing)."""
    parts = [json.loads(Path(f).read_text()) for f in result_files]
    merged = merge_results(parts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(merged, out_dir, docs_path if merged["complete"] or docs_even_if_partial else None)
    progress(f"merged {len(parts)} runs: {len(merged['settings'])} of {len(SETTINGS)} settings, "
             f"{len(merged['ablations'])} of {len(ABLATIONS)} ablations"
             + ("" if merged["complete"] or docs_even_if_partial else " (incomplete: docs not rewritten)"))
    return merged


def _source_root() -> Path:
    """Where the repository root is when this module runs from a source checkout (src layout)."""
    return Path(__file__).resolve().parents[2]


def _repository_docs() -> Path | None:
    """docs/benchmarks.md of the source checkout this module runs from, if it runs from one."""
    root = _source_root()
    if (root / "pyproject.toml").is_file() and (root / "docs").is_dir():
        return root / "docs" / "benchmarks.md"
    return None


__all__ = [
    "ABLATIONS", "BenchmarkData", "BenchmarkSplit", "INSTANCE_SETTINGS", "QUICK_SETTINGS", "RFConfig", "SETTINGS", "annotation_seconds",
    "benchmark_config", "benchmark_split", "evaluate_instance_targets", "evaluate_targets", "merge_results",
    "predict_random_forest", "render_instance_markdown", "render_markdown", "run_benchmark", "simulate_setting",
    "train_random_forest",
]

