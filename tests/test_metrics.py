"""The segmentation figures (napari_protoseg.evaluation.metrics) that the demo, the benchmark and the
tests share: by hand on small maps, and against brute-force oracles on random label maps."""

import math

import numpy as np
import pytest
from oracles import random_instance_maps, reference_instance_scores, reference_touching_objects, reference_touching_recall

from napari_protoseg.evaluation.instances import decoder_figures
from napari_protoseg.evaluation.metrics import (
    TOUCHING_MIN_AREA,
    class_iou,
    connected_instances,
    instance_figures,
    instance_scores,
    touching_objects,
    touching_recall,
)
from napari_protoseg.prediction.decoders import DEFAULT_MIN_SIZE


def test_class_iou_by_hand():
    truth = np.array([[[1, 1, 2, 2], [1, 1, 3, 3]]])
    assert class_iou(truth, truth, (1, 2, 3)) == {1: 1.0, 2: 1.0, 3: 1.0}
    pred = np.array([[[1, 1, 1, 2], [1, 1, 3, 1]]])
    iou = class_iou(pred, truth, (1, 2, 3, 4))
    assert iou[1] == pytest.approx(4 / 6)  # 4 shared, 6 in the union
    assert iou[2] == pytest.approx(1 / 2)
    assert iou[3] == pytest.approx(1 / 2)
    assert np.isnan(iou[4])  # absent from both


def square(img, z, y, x, h, w, value):
    img[z, y:y + h, x:x + w] = value


def test_instance_scores_perfect():
    truth = np.zeros((2, 40, 40), np.int32)
    square(truth, 0, 2, 2, 10, 10, 1)
    square(truth, 0, 20, 20, 5, 5, 2)
    square(truth, 1, 2, 2, 10, 10, 1)
    s = instance_scores(truth.copy(), truth)
    assert (s["tp"], s["fp"], s["fn"]) == (3, 0, 0)
    assert s["ap50"] == 1.0 and s["matched_iou"] == 1.0


def test_instance_scores_one_false_positive_and_one_false_negative():
    truth = np.zeros((1, 40, 40), np.int32)
    square(truth, 0, 2, 2, 10, 10, 1)
    square(truth, 0, 20, 20, 5, 5, 2)
    fp = truth.copy()
    square(fp, 0, 30, 2, 4, 4, 7)  # an extra object (non-consecutive id on purpose)
    s = instance_scores(fp, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (2, 1, 0) and s["ap50"] == pytest.approx(2 / 3)
    fn = truth.copy()
    fn[fn == 2] = 0  # one object missed
    s = instance_scores(fn, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 1) and s["ap50"] == pytest.approx(1 / 2)
    assert s["matched_iou"] == 1.0


def test_instance_scores_shifted_object():
    truth = np.zeros((1, 30, 30), np.int32)
    square(truth, 0, 0, 0, 10, 10, 1)
    pred = np.zeros_like(truth)
    square(pred, 0, 0, 2, 10, 10, 1)  # IoU 80 / 120
    s = instance_scores(pred, truth)
    assert s["tp"] == 1 and s["matched_iou"] == pytest.approx(80 / 120)
    square(pred, 0, 0, 0, 30, 30, 0)
    square(pred, 0, 0, 6, 10, 10, 1)  # IoU 40 / 160 < 0.5: one FP and one FN
    s = instance_scores(pred, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (0, 1, 1) and s["ap50"] == 0.0 and s["matched_iou"] == 0.0


@pytest.mark.parametrize("cut, expected_iou", [(6, 0.6), (5, 0.5)])
def test_instance_scores_split_object(cut, expected_iou):
    """An object split in two: the larger part matches (if IoU >= 0.5), the other is a false
    positive; an exact half-half split must not match the one true object twice."""
    truth = np.zeros((1, 20, 20), np.int32)
    square(truth, 0, 0, 0, 10, 10, 1)
    pred = np.zeros_like(truth)
    square(pred, 0, 0, 0, 10, cut, 1)
    square(pred, 0, 0, cut, 10, 10 - cut, 2)
    s = instance_scores(pred, truth)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert s["ap50"] == pytest.approx(0.5) and s["matched_iou"] == pytest.approx(expected_iou)


def test_instance_scores_empty_sections():
    truth = np.zeros((2, 10, 10), np.int32)
    pred = np.zeros_like(truth)
    assert np.isnan(instance_scores(pred, truth)["ap50"])
    pred[1, 2:4, 2:4] = 1
    assert instance_scores(pred, truth)["fp"] == 1


def test_connected_instances_are_four_connected_per_section():
    cls = np.zeros((2, 8, 8), np.uint8)
    cls[0, 0:2, 0:2] = 3
    cls[0, 2:4, 2:4] = 3  # touches the first only diagonally
    cls[1, 0:2, 0:2] = 3
    cls[1, 5, 5] = 1
    inst = connected_instances(cls, 3)
    assert inst[0].max() == 2 and inst[1].max() == 1
    assert inst[1, 5, 5] == 0


def test_touching_recall_counts_only_objects_close_to_another():
    truth = np.zeros((1, 20, 40), np.int32)
    truth[0, 5:15, 2:10] = 1
    truth[0, 5:15, 11:19] = 2  # one pixel from object 1: both touch
    truth[0, 5:15, 28:36] = 3  # far away
    merged = np.where(truth > 0, 1, 0)
    merged[0, 5:15, 10] = 1  # a plain decoder that merges the touching pair
    split = truth.copy()
    assert touching_objects(truth) == [{1, 2}]
    a = instance_figures(merged, truth)
    b = instance_figures(split, truth)
    assert a["touching_objects"] == b["touching_objects"] == 2
    assert a["touching_recall"] == 0.0 and b["touching_recall"] == 1.0
    assert b["ap50"] == 1.0 and a["ap50"] == pytest.approx(0 / 4)  # merged pair + far object as one: all miss


def test_label_specks_do_not_count_as_touching_objects():
    """Specks under TOUCHING_MIN_AREA px (no decoder keeps them) neither touch nor make a real object touch."""
    truth = np.zeros((1, 20, 40), np.int32)
    truth[0, 5:15, 2:10] = 1
    truth[0, 5, 11] = 2  # a 1 px speck next to object 1
    truth[0, 17, 20] = 3
    truth[0, 17, 21:23] = 4  # two specks side by side
    truth[0, 5:15, 28:36] = 5
    assert TOUCHING_MIN_AREA == DEFAULT_MIN_SIZE
    assert touching_objects(truth) == [set()]
    assert touching_objects(truth, min_area=1) == [{1, 2, 3, 4}]
    figures = instance_figures(truth, truth)
    assert figures["touching_objects"] == 0 and np.isnan(figures["touching_recall"])


def test_instance_figures_score_only_the_objects_of_the_class_asked_for(monkeypatch):
    """With two instance classes, the other class's objects are not false positives of this one."""
    import types

    import napari_protoseg.prediction.pipeline as pipeline

    classes = np.zeros((1, 20, 40), np.uint8)
    classes[0, 5:15, 2:10] = 3
    classes[0, 5:15, 20:30] = 4
    truth = (classes == 3).astype(np.int32)

    def fake_predict(model, image, settings, class_map=None, **kwargs):
        labels = np.zeros(classes.shape, np.uint32)
        labels[classes == 3], labels[classes == 4] = 1, 2
        return pipeline.InstancePrediction(labels, None, None, settings.decoder, False, 1, 1)

    monkeypatch.setattr(pipeline, "predict_instances", fake_predict)
    model = types.SimpleNamespace(instance_class_ids=[3, 4], has_instance_heads=False)
    figures = decoder_figures(model, np.zeros(classes.shape, np.float32), classes, truth, class_id=3)
    assert set(figures) == {"watershed", "components"}
    assert all(f["tp"] == 1 and f["fp"] == 0 and f["fn"] == 0 for f in figures.values())
    assert decoder_figures(model, classes, classes, truth, class_id=5) == {}


# ------------------------------------------------------------------------------- against oracles


def _alike(a, b) -> bool:
    return (math.isnan(a) and math.isnan(b)) if isinstance(a, float) and math.isnan(a) else a == b


@pytest.mark.parametrize("kind", [0, 1, 2])
def test_instance_scores_equal_the_brute_force_oracle(kind):
    """Random maps of blobs, rectangles (touching, cut) and pixel noise (many IoUs of exactly 0.5),
    also against the truth with every other column's objects given other ids (halves of objects)."""
    rng = np.random.default_rng(kind)
    for _ in range(40):
        shape = (int(rng.integers(1, 4)), int(rng.integers(8, 40)), int(rng.integers(8, 40)))
        truth = random_instance_maps(rng, shape, kind)
        halves = truth.copy()
        halves[:, :, ::2] = np.where(halves[:, :, ::2] > 0, halves[:, :, ::2] + 50, 0)
        for predicted in (random_instance_maps(rng, shape, kind), halves):
            for threshold in (0.5, 0.3, 0.7):
                got = instance_scores(predicted, truth, threshold)
                want = reference_instance_scores(predicted, truth, threshold)
                assert got.keys() == want.keys() and all(_alike(got[k], want[k]) for k in want), (got, want)


@pytest.mark.parametrize("kind", [0, 1])
def test_touching_objects_and_recall_equal_the_brute_force_oracle(kind):
    rng = np.random.default_rng(10 + kind)
    for _ in range(30):
        truth = random_instance_maps(rng, (2, 32, 32), kind)
        predicted = truth.copy()
        predicted[:, :, ::3] = 0  # objects thinned, some below IoU 0.5
        for gap, min_area in ((2, 1), (1, 1), (3, 4), (2, TOUCHING_MIN_AREA)):
            assert touching_objects(truth, gap, min_area) == reference_touching_objects(truth, gap, min_area)
            recall, count = touching_recall(predicted, truth, gap, 0.5, min_area)
            want_recall, want_count = reference_touching_recall(predicted, truth, gap, 0.5, min_area)
            assert count == want_count and _alike(recall, want_recall)
