from types import SimpleNamespace

import numpy as np
import pytest
import torch

from napari_protoseg.annotations.project import AnnotationSet, ClassInfo


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The panel gives PyTorch all cores but one for good; later tests get the usual count back
    (the number of threads changes the order of float sums, so results would depend on test order)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_training_clock(monkeypatch):
    """``install(tick)`` makes the training engine's clock advance ``tick`` seconds at every reading
    (one reading a step when no preview is asked for), so time limits are tested without waiting."""
    from napari_protoseg.training import engine as training

    def install(tick: float) -> None:
        clock = SimpleNamespace(now=0.0)

        def perf_counter() -> float:
            clock.now += tick
            return clock.now

        monkeypatch.setattr(training, "time", SimpleNamespace(perf_counter=perf_counter))

    return install


class _RunsCodeWhenUnpickled:
    """Unpickling it calls ``open(marker, "w")``: the marker file appears where a loader runs code from a pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def code_running_checkpoint(tmp_path):
    """``write(state)`` saves ``state`` with an object whose unpickling would create a marker file (as in a
    checkpoint that stores Python objects); returns (checkpoint path, marker path)."""

    def write(state: dict):
        path, marker = tmp_path / "handed-over.ckpt", tmp_path / "code-ran"
        torch.save({**state, "numpy_rng": _RunsCodeWhenUnpickled(marker)}, path)
        return path, marker

    return write


@pytest.fixture
def classes():
    return [ClassInfo(1, "cytoplasm"), ClassInfo(2, "membrane", color="#dd8452"),
            ClassInfo(3, "mitochondrion", instances=True, color="#55a868")]


@pytest.fixture
def stack_annotations(classes):
    """A small (3, 20, 30) stack with every annotation type."""
    masks = np.zeros((3, 20, 30), np.uint8)
    masks[0, 2:5, 3:9] = 1
    masks[0, 10:12, :] = 2
    masks[2, 5:9, 5:9] = 3
    return AnnotationSet(
        image_shape=(3, 20, 30), classes=classes, masks=masks,
        boxes=[(1, 2, 3, 10, 12, 3, True), (1, 12, 14, 19, 29, 3, True)],
        points=[(0, 4, 5, 1, True), (2, 6, 6, 3, False)],
        tags=[(0, 3, True, -1, -1, -1, -1), (1, 1, False, 0, 0, 10, 10)],
    )


@pytest.fixture
def plane_annotations(classes):
    """A single (16, 24) plane with every annotation type."""
    masks = np.zeros((16, 24), np.uint8)
    masks[1:4, 1:4] = 3
    return AnnotationSet(
        image_shape=(16, 24), classes=classes, masks=masks,
        boxes=[(0, 5, 5, 9, 12, 3, False)],
        points=[(0, 10, 10, 2, True)],
        tags=[(0, 1, True, -1, -1, -1, -1), (0, 3, False, 8, 0, 16, 12)],
    )


@pytest.fixture
def version_1_train_config():
    """``TrainConfig().to_dict()`` as napari-protoseg wrote it before configurations had a version
    (commit 3746550): flat, the network's fields at the top level, its 2.5D input as ``context``."""
    return {"steps": 1800, "batch_size": 4, "crop_size": 192, "learning_rate": 0.003, "weight_decay": 0.0001,
            "max_grad_norm": 5.0, "context": 0, "base_width": 8, "depth": 4, "embed_dim": 32,
            "prototypes_per_class": 5, "temperature": 0.05, "tag_pooling": "mean", "negative_eps": 1e-06,
            "negative_only_weight": 0.1, "filter_sigmas": [], "mask_share": 0.9, "balance_classes": 0.0,
            "weight_contrastive": 0.1, "weight_ce": 1.0, "weight_pseudo_label": 0.0, "pseudo_label_threshold": 0.8,
            "pseudo_label_warmup": 120, "seed": 0, "device": "auto", "checkpoint_every": 100,
            "instance_heads": True, "instance_embed_dim": 64, "input_scale": 2, "localization_context": 4,
            "embedding_context": 4, "instance_coordinates": 0.0625, "weight_localization": 1.0,
            "weight_embedding": 1.0, "instance_backbone_grad": 0.0, "unpointed_negatives": True, "point_spread": 5,
            "point_spread_tolerance": 0.1, "point_spread_halfway": True, "time_limit": None}


@pytest.fixture
def as_version_1():
    """``as_version_1(train_config)``: a ``TrainConfig.to_dict()`` in the flat layout of version 1
    (every field kept; the network's fields at the top level, ``in_channels`` as ``context``)."""
    def flatten(train_config: dict) -> dict:
        # The encoder fields came with version 3: a version-1 file has no such field.
        data = {k: v for k, v in train_config.items()
                if k not in ("config_version", "model", "encoder", "encoder_learning_rate")}
        model = train_config["model"]
        data["context"] = model["in_channels"] // 2
        data.update({k: v for k, v in model.items() if k not in ("n_classes", "n_instance_classes", "in_channels",
                                                                "norm")})
        return data

    return flatten
