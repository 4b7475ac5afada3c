"""Plain instance decoders and 3D linking."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_protoseg.prediction.decoders import link_planes, plain_instances


def _disc(shape, cy, cx, r):
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_components_give_one_id_per_separate_object_of_instance_classes_only():
    classes = np.ones((64, 64), np.uint8)
    classes[_disc(classes.shape, 15, 15, 6)] = 3
    classes[_disc(classes.shape, 45, 45, 6)] = 3
    classes[_disc(classes.shape, 15, 45, 6)] = 2  # not an instance class
    labels = plain_instances(classes, [3], method="components")
    assert labels.dtype == np.uint32
    assert set(np.unique(labels)) == {0, 1, 2}
    assert np.all(labels[classes != 3] == 0)


def test_watershed_splits_touching_discs_that_components_merge():
    classes = np.zeros((64, 96), np.uint8)
    classes[_disc(classes.shape, 32, 30, 14) | _disc(classes.shape, 32, 56, 14)] = 3
    assert len(np.unique(plain_instances(classes, [3], method="components"))) == 2  # bg + 1 merged
    split = plain_instances(classes, [3], method="watershed")
    assert len(np.unique(split)) == 3
    assert split[32, 22] != split[32, 64]


def test_small_objects_are_dropped_and_ids_are_unique_over_planes():
    stack = np.zeros((2, 32, 32), np.uint8)
    stack[:, 5:15, 5:15] = 3
    stack[1, 25:27, 25:27] = 3  # 4 pixels
    labels = plain_instances(stack, [3], method="components", min_size=10)
    assert labels[0, 10, 10] != labels[1, 10, 10]
    assert labels[1, 26, 26] == 0
    with pytest.raises(ValueError, match="unknown instance decoder"):
        plain_instances(stack, [3], method="magic")


def test_link_planes_joins_overlapping_objects_of_neighbouring_planes():
    planes = np.zeros((3, 40, 40), np.uint32)
    planes[0, 5:15, 5:15] = 1
    planes[1, 7:17, 6:16] = 4  # overlaps object 1 of plane 0
    planes[1, 25:35, 25:35] = 2  # new object
    planes[2, 26:36, 24:34] = 9  # continues plane 1's object 2
    planes[2, 0:4, 0:4] = 3  # new
    linked = link_planes(planes)
    assert linked[0, 10, 10] == linked[1, 10, 10]
    assert linked[1, 30, 30] == linked[2, 30, 30]
    assert linked[1, 30, 30] != linked[0, 10, 10]
    assert len(np.unique(linked)) == 4  # background + three 3D objects


def test_link_planes_continues_an_object_into_one_object_only():
    planes = np.zeros((2, 20, 40), np.uint32)
    planes[0, 5:15, 5:35] = 1
    planes[1, 5:15, 5:18] = 1
    planes[1, 5:15, 22:35] = 2
    linked = link_planes(planes)
    assert linked[1, 10, 10] != linked[1, 10, 30]
    assert linked[0, 10, 10] in (linked[1, 10, 10], linked[1, 10, 30])


# ------------------------------------------------------------------------------ WISE decoder

from napari_protoseg.prediction.decoders import PixelEmbeddings, wise_instances  # noqa: E402
from napari_protoseg.prediction.pipeline import DecoderSettings, PredictionError, predict_instances  # noqa: E402


def _touching_discs(shape=(64, 96)):
    """Two overlapping discs of class 3 (one merged region), a blob on each centre, an embedding
    that tells them apart, background embedded at the origin."""
    a, b = _disc(shape, 32, 30, 14), _disc(shape, 32, 56, 14)
    classes = np.ones(shape, np.uint8)
    classes[a | b] = 3
    localization = np.full((1, *shape), 0.05, np.float32)
    localization[0][_disc(shape, 32, 30, 3)] = 0.9
    localization[0][_disc(shape, 32, 56, 3)] = 0.9
    embedding = np.zeros((2, *shape), np.float32)
    embedding[0][a] = 3.0
    embedding[1][b & ~a] = 3.0
    return classes, localization, embedding, a, b


def test_wise_decoding_separates_two_touching_discs_given_one_seed_each():
    classes, localization, embedding, a, b = _touching_discs()
    assert len(np.unique(plain_instances(classes, [3], method="components"))) == 2  # merged
    labels = wise_instances(classes, localization, embedding, [3])
    assert labels.dtype == np.uint32 and set(np.unique(labels)) == {0, 1, 2}
    left, right = labels[32, 30], labels[32, 56]
    assert left != right and left > 0 and right > 0
    assert np.all(labels[a] == left) and np.all(labels[b & ~a] == right)
    assert np.all(labels[classes != 3] == 0)


def test_wise_decoding_keeps_a_region_whole_without_a_second_blob_and_seeds_parts_no_blob_reaches():
    classes, localization, embedding, a, b = _touching_discs()
    localization[0][_disc(classes.shape, 32, 56, 3)] = 0.05  # only the left blob remains
    labels = wise_instances(classes, localization, embedding, [3])
    assert set(np.unique(labels)) == {0, 1}
    assert np.all(labels[a | b] == 1)  # one seed in the merged part: one object, nothing dropped
    # No blob at all: the semantic region's parts still become objects, one each.
    classes[:, 42:46] = 1  # cut the merged region into two parts
    labels = wise_instances(classes, np.zeros_like(localization), embedding, [3])
    assert len(np.unique(labels[classes == 3])) == 2 and np.all(labels[classes == 3] > 0)


def test_wise_decoding_with_background_seeds_drops_region_pixels_that_resemble_background():
    classes, localization, embedding, a, b = _touching_discs()
    embedding[:, 20:26, 20:40] = 0.0  # part of disc a looks like background
    labels = wise_instances(classes, localization, embedding, [3], background_seeds=100)
    assert np.all(labels[20:26, 20:40] == 0)
    assert labels[32, 30] > 0 and labels[32, 56] > 0
    assert np.all(wise_instances(classes, localization, embedding, [3])[classes == 3] > 0)  # off by default
    # The right disc, with no blob of its own, joins the left object, but looks like background.
    localization[0][_disc(classes.shape, 32, 56, 3)] = 0.05
    labels = wise_instances(classes, localization, embedding, [3], background_seeds=100)
    assert labels[32, 30] > 0 and np.all(labels[b & ~a] == 0)


def test_seeds_the_embedding_finds_alike_merge_into_one_object():
    """merge_similarity: blobs of one part whose seeds are more similar than the threshold are one
    object (fragments of the localization map); seeds the embedding tells apart stay two."""
    classes, localization, embedding, a, b = _touching_discs()
    apart = wise_instances(classes, localization, embedding, [3], merge_similarity=0.5)
    assert apart[32, 30] != apart[32, 56] and apart[32, 30] > 0 and apart[32, 56] > 0
    alike = embedding.copy()
    alike[1][b & ~a] = 0.0
    alike[0][a | b] = 3.0  # both discs embedded alike: one object
    merged = wise_instances(classes, localization, alike, [3], merge_similarity=0.5)
    assert set(np.unique(merged[a | b])) == {1} and merged.max() == 1
    split = wise_instances(classes, localization, alike, [3])  # without merging: every blob is an object
    assert len(np.unique(split[a | b])) == 2


def test_shape_seeds_find_a_touching_object_no_blob_marked_where_the_embedding_tells_it_apart():
    """shape_seeds: the distance transform's maxima propose seeds too (one per round part), so a
    disc without a blob of its own is still found where the embedding tells it from its neighbour;
    where the embedding says one object, merging keeps it whole."""
    classes, localization, embedding, a, b = _touching_discs()
    localization[0][_disc(classes.shape, 32, 56, 3)] = 0.05  # only the left disc has a blob
    assert len(np.unique(wise_instances(classes, localization, embedding, [3])[a | b])) == 1
    found = wise_instances(classes, localization, embedding, [3], shape_seeds=True, merge_similarity=0.5)
    assert found[32, 30] != found[32, 56] and found[32, 30] > 0 and found[32, 56] > 0
    alike = embedding.copy()
    alike[1][b & ~a] = 0.0
    alike[0][a | b] = 3.0
    whole = wise_instances(classes, localization, alike, [3], shape_seeds=True, merge_similarity=0.5)
    assert set(np.unique(whole[a | b])) == {1}


def test_a_spatial_pixel_embedding_adds_the_positions_to_its_stored_offsets():
    offsets = np.zeros((3, 2, 5), np.float32)
    offsets[2] = 7.0
    flat = np.array([0, 4, 6, 9])
    embeddings = PixelEmbeddings((2, 5), flat, offsets.reshape(3, -1)[:, flat].T.astype(np.float16), coordinates=0.5)
    np.testing.assert_allclose(embeddings.at(np.array([4, 9])), [[0.0, 2.0, 7.0], [0.5, 2.0, 7.0]])
    assert embeddings.values.dtype == np.float16  # the offsets, small whatever the plane's size


def test_sparse_pixel_embeddings_decode_like_the_dense_array():
    classes, localization, embedding, *_ = _touching_discs()
    kept = ndi.binary_dilation(classes == 3, iterations=8)
    flat = np.flatnonzero(kept)
    sparse = PixelEmbeddings(classes.shape, flat, embedding.reshape(2, -1)[:, flat].T.astype(np.float16))
    np.testing.assert_array_equal(wise_instances(classes, localization, sparse, [3]),
                                  wise_instances(classes, localization, embedding, [3]))
    with pytest.raises(ValueError, match="not kept"):
        sparse.at(np.array([0]))


def test_wise_decoding_checks_its_inputs():
    classes, localization, embedding, *_ = _touching_discs()
    with pytest.raises(ValueError, match="localization must be"):
        wise_instances(classes, localization, embedding, [3, 4])
    with pytest.raises(ValueError, match="one plane"):
        wise_instances(classes[None], localization, embedding, [3])
    with pytest.raises(ValueError, match="merge_similarity"):
        wise_instances(classes, localization, embedding, [3], merge_similarity=1.0)


class _ModelWithoutHeads:
    has_instance_heads = False
    instance_class_ids = [3]


def test_predict_instances_decodes_a_given_class_map_and_links_planes_on_request():
    stack = np.zeros((2, 40, 40), np.uint8)
    stack[:, 5:15, 5:15] = 3
    stack[1, 25:35, 25:35] = 3
    image = np.zeros(stack.shape, np.uint8)
    per_plane = predict_instances(_ModelWithoutHeads(), image, class_map=stack)
    assert per_plane.decoder == "components" and not per_plane.linked_3d
    assert per_plane.labels[0, 10, 10] != per_plane.labels[1, 10, 10]
    linked = predict_instances(_ModelWithoutHeads(), image, DecoderSettings(decoder="components", link_3d=True),
                               class_map=stack)
    assert linked.linked_3d and linked.labels[0, 10, 10] == linked.labels[1, 10, 10]
    assert len(np.unique(linked.labels)) == 3
    with pytest.raises(PredictionError, match="needs a model with instance heads"):
        predict_instances(_ModelWithoutHeads(), image, DecoderSettings(decoder="wise"), class_map=stack)
    with pytest.raises(PredictionError, match="unknown instance decoder"):
        predict_instances(_ModelWithoutHeads(), image, DecoderSettings(decoder="magic"), class_map=stack)


def test_watershed_keeps_an_elongated_unevenly_wide_object_whole():
    """A mitochondrion-like ellipse with a wavy outline has many shallow ridge maxima: one object."""
    yy, xx = np.mgrid[:80, :200]
    wobble = 1 + 0.06 * np.sin(xx / 5.0)
    classes = np.zeros((80, 200), np.uint8)
    classes[((yy - 40) / (22 * wobble)) ** 2 + ((xx - 100) / 90) ** 2 <= 1] = 3
    labels = plain_instances(classes, [3], method="watershed")
    assert len(np.unique(labels)) == 2


from napari_protoseg.prediction.decoders import (annotated_min_size, annotated_object_areas, min_object_sizes,  # noqa: E402
                                       object_area_summary, min_size_from_p10)
from napari_protoseg.annotations.project import AnnotationSet, ClassInfo  # noqa: E402


def _annotations_with_objects():
    classes = [ClassInfo(1, "cytoplasm"), ClassInfo(3, "mitochondrion", instances=True)]
    masks = np.zeros((2, 64, 64), np.int64)
    masks[0, 2:12, 2:12] = 3  # 100 px
    masks[0, 20:40, 20:40] = 3  # 400 px
    masks[0, 50:60, 2:60] = 1
    boxes = np.array([(1, 0, 0, 20, 10, 3, True)], dtype=[("z", int), ("y0", int), ("x0", int), ("y1", int),
                                                           ("x1", int), ("class", int), ("exhaustive", bool)])
    return AnnotationSet((2, 64, 64), classes, masks=masks, boxes=boxes)


def test_object_areas_come_from_mask_components_and_the_ellipses_of_boxes():
    ann = _annotations_with_objects()
    assert sorted(annotated_object_areas(ann, 3)) == [100, 157, 400]  # the 20 x 10 box holds pi/4 of 200 px
    summary = object_area_summary(ann)
    assert set(summary) == {"3"}  # cytoplasm is no instance class
    assert summary["3"]["count"] == 3 and summary["3"]["median"] == 157


def test_annotations_give_the_same_size_floor_as_a_model_trained_on_them():
    """The benchmark filters the random-forest peer's objects with this, so both sides drop the same specks."""
    ann = _annotations_with_objects()
    p10 = float(np.percentile(annotated_object_areas(ann, 3), 10))
    assert annotated_min_size(ann, 3) == min_size_from_p10(p10) == max(16, int(0.5 * p10))
    model = _ModelWithSizes(object_area_summary(ann)["3"]["p10"])
    assert min_object_sizes(model) == {3: annotated_min_size(ann, 3)}
    assert annotated_min_size(ann, 1) == max(16, int(0.5 * np.percentile(annotated_object_areas(ann, 1), 10)))
    points_only = AnnotationSet((2, 64, 64), ann.classes)
    assert annotated_min_size(points_only, 3) == 16  # nothing outlined: the default


class _ModelWithSizes(_ModelWithoutHeads):
    def __init__(self, p10):
        self.training_info = {"object_areas": {"3": {"count": 5, "p10": p10, "median": 2 * p10}}}


def test_decoders_drop_objects_far_smaller_than_the_annotated_ones():
    assert min_object_sizes(_ModelWithSizes(1000.0)) == {3: 500}
    assert min_object_sizes(_ModelWithSizes(20.0)) == {3: 16}  # never below the default
    assert min_object_sizes(_ModelWithoutHeads()) == {3: 16}  # points only: nothing says how large
    classes = np.zeros((1, 80, 80), np.uint8)
    classes[0, 5:25, 5:35] = 3  # 600 px: kept
    classes[0, 50:60, 50:60] = 3  # 100 px: a fragment far below half the annotated objects
    labels = predict_instances(_ModelWithSizes(1000.0), np.zeros_like(classes), DecoderSettings(decoder="components"),
                               class_map=classes).labels
    assert labels[0, 10, 10] > 0 and labels[0, 55, 55] == 0
    kept_without_sizes = predict_instances(_ModelWithoutHeads(), np.zeros_like(classes),
                                           DecoderSettings(decoder="components"), class_map=classes).labels
    assert kept_without_sizes[0, 55, 55] > 0
    explicit = predict_instances(_ModelWithSizes(1000.0), np.zeros_like(classes),
                                 DecoderSettings(decoder="components", min_size=50), class_map=classes).labels
    assert explicit[0, 55, 55] > 0


def _points(rows):
    from napari_protoseg.annotations.project import empty_points

    return np.array(rows, dtype=empty_points().dtype)


def test_areas_at_points_are_the_class_components_holding_exactly_one_point():
    from napari_protoseg.prediction.decoders import areas_at_points

    class_map = np.ones((2, 40, 40), np.uint8)
    class_map[0, 2:12, 2:12] = 3  # 100 px, one point
    class_map[0, 20:30, 20:35] = 3  # 150 px, two points: objects run together, or not an object
    class_map[1, 5:9, 5:9] = 3  # 16 px, one point
    points = _points([(0, 5, 5, 3, True), (0, 22, 22, 3, True), (0, 28, 33, 3, True), (1, 6, 6, 3, True),
                      (1, 30, 30, 3, True),  # the map says cytoplasm here: marks nothing
                      (0, 0, 39, 1, False)])  # another class
    assert sorted(areas_at_points(class_map, points, 3)) == [16, 100]
    assert sorted(areas_at_points(class_map[0], points[:3], 3)) == [100]  # a single plane
    assert len(areas_at_points(class_map, points[:0], 3)) == 0


def test_sizes_at_points_come_from_a_methods_own_objects_for_classes_only_points_mark():
    from napari_protoseg.prediction.decoders import sizes_at_points

    classes = [ClassInfo(1, "cytoplasm"), ClassInfo(3, "mitochondrion", instances=True),
               ClassInfo(4, "vesicle", instances=True)]
    masks = np.zeros((12, 40, 40), np.uint8)
    masks[0, 30:38, 30:38] = 4  # vesicles are outlined: their size comes from the mask
    points = _points([(z, 10, 10, 3, True) for z in range(12)] + [(5, 12, 12, 3, True), (5, 1, 1, 4, True)])
    ann = AnnotationSet((12, 40, 40), classes, masks=masks, points=points)
    asked = []

    def predict_planes(zs):
        asked.append(list(zs))
        maps = np.ones((len(zs), 40, 40), np.uint8)
        for i, z in enumerate(zs):
            maps[i, 5:11 + z, 5:15] = 3  # plane z: a (z + 6) x 10 object at the point
        return maps

    sizes = sizes_at_points(predict_planes, ann, max_planes=3)
    assert asked == [[0, 1, 5]]  # plane 5 holds two points; then the first planes
    assert set(sizes) == {"3"} and sizes["3"]["source"] == "predicted at points"
    # plane 5's object holds both of its points, so it is no object's size: planes 0 and 1 give 60 and 70 px
    assert sizes["3"]["count"] == 2 and sizes["3"]["median"] == 65.0
    assert sizes_at_points(predict_planes, AnnotationSet((12, 40, 40), classes, masks=masks)) == {}


def test_a_model_trained_on_points_only_records_the_size_of_its_objects_at_them(monkeypatch):
    """The trainer learns the size floor of a class only points mark from the model's own objects at
    the points, so its decoders drop specks far smaller than what it finds there."""
    from napari_protoseg.training import engine as training
    from napari_protoseg.prediction.tiling import PlanePrediction
    from napari_protoseg.model.network import ModelConfig
    from napari_protoseg.training.engine import TrainConfig, train

    sample_classes = [ClassInfo(1, "cytoplasm"), ClassInfo(3, "mitochondrion", instances=True)]
    points = _points([(0, 10, 10, 3, True), (1, 40, 40, 3, True), (0, 50, 50, 1, False), (1, 5, 60, 1, False)])
    ann = AnnotationSet((2, 64, 64), sample_classes, points=points)
    image = np.random.default_rng(0).integers(0, 255, (2, 64, 64)).astype(np.uint8)

    def object_of_400_px(model, volume, z, device=None):
        classes = np.ones((64, 64), np.uint8)
        classes[z * 30:z * 30 + 20, z * 30:z * 30 + 20] = 3
        return PlanePrediction(np.zeros((2, 64, 64), np.float32), classes, np.ones((64, 64), np.float32), [1, 3])

    monkeypatch.setattr(training, "predict_plane", object_of_400_px)
    config = TrainConfig(steps=2, batch_size=2, crop_size=32, model=ModelConfig(base_width=4, depth=2, embed_dim=8),
                         checkpoint_every=0, device="cpu")
    *_, last = train(image, ann, config)
    areas = last.model.training_info["object_areas"]["3"]
    assert areas["count"] == 2 and areas["p10"] == 400.0 and areas["source"] == "predicted at points"
    assert min_object_sizes(last.model) == {3: 200}
