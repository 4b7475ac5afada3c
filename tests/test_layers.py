"""Conversion between annotation sets and napari layer data, both ways, for planes and stacks."""

import numpy as np
import pytest

from napari_protoseg.plugin.layers import (
    annotation_layers,
    annotations_from_layers,
    boxes_to_shapes,
    classes_from_metadata,
    labels_colormap,
    layer_metadata,
    shapes_to_boxes,
    table_to_tags,
    tags_to_table,
)
from napari_protoseg.annotations.project import ProjectError


def from_layer_tuples(annotations, layers):
    masks, boxes, points, tags = layers
    return annotations_from_layers(
        annotations.image_shape, annotations.classes, masks=masks[0],
        boxes=(boxes[0], boxes[1]["features"]), points=(points[0], points[1]["features"]),
        tags=(tags[0], tags[1]["features"]))


@pytest.mark.parametrize("fixture", ["stack_annotations", "plane_annotations"])
def test_layers_round_trip_to_the_same_annotations(request, fixture):
    annotations = request.getfixturevalue(fixture)
    layers = annotation_layers(annotations)
    assert [layer[1]["name"] for layer in layers] == ["Masks", "Boxes", "Points", "Tags"]
    assert [layer[2] for layer in layers] == ["labels", "shapes", "points", "shapes"]
    assert from_layer_tuples(annotations, layers).equals(annotations)


def test_layer_data_has_the_image_dimensionality(stack_annotations, plane_annotations):
    for annotations in (stack_annotations, plane_annotations):
        masks, boxes, points, tags = annotation_layers(annotations)
        ndim = len(annotations.image_shape)
        assert masks[0].shape == annotations.image_shape
        assert all(r.shape == (4, ndim) for r in boxes[0] + tags[0])
        assert points[0].shape == (len(annotations.points), ndim)


def test_box_rectangle_borders_lie_between_pixels(stack_annotations):
    data, _ = boxes_to_shapes(stack_annotations.boxes[:1], is_stack=True)
    # box z=1, [2, 10) x [3, 12): pixel centres 2..9 and 3..11 inside, borders half a pixel out
    np.testing.assert_allclose(data[0][:, 0], 1)
    assert data[0][:, 1].min() == 1.5 and data[0][:, 1].max() == 9.5
    assert data[0][:, 2].min() == 2.5 and data[0][:, 2].max() == 11.5


def test_a_hand_drawn_rectangle_takes_the_pixels_whose_centres_it_covers():
    drawn = [np.array([[10.2, 3.9], [10.2, 8.0], [20.7, 8.0], [20.7, 3.9]])]
    boxes = shapes_to_boxes(drawn, {"class": [1]}, (32, 32))
    assert boxes[["y0", "x0", "y1", "x1"]].tolist() == [(11, 4, 21, 9)]


def test_points_are_rounded_to_the_nearest_pixel(classes):
    annotations = annotations_from_layers((10, 10), classes, points=(np.array([[2.4, 7.6]]), {"class": [1]}))
    assert annotations.points[["y", "x", "exhaustive"]].tolist() == [(2, 8, True)]


def test_tags_table_round_trip_keeps_whole_plane_tags(stack_annotations):
    table = tags_to_table(stack_annotations.tags)
    assert table["y0"] == [None, 0]
    np.testing.assert_array_equal(table_to_tags(table), stack_annotations.tags)


def test_a_rectangle_across_planes_is_refused_with_its_item_number(classes):
    slanted = np.array([[0, 0, 0], [0, 0, 4], [1, 4, 4], [1, 4, 0]], float)
    with pytest.raises(ProjectError, match="Boxes layer, item 1: spans several planes"):
        annotations_from_layers((2, 8, 8), classes, boxes=([slanted], {"class": [3]}))


def test_an_ellipse_in_the_boxes_layer_is_refused(classes):
    ellipse = np.array([[0, 0], [0, 4], [4, 4], [4, 0]], float)
    with pytest.raises(ProjectError, match="item 1: is a ellipse; boxes must be rectangles"):
        annotations_from_layers((8, 8), classes, boxes=([ellipse], {"class": [3]}), box_shape_types=["ellipse"])


def test_problems_found_in_layers_name_the_layer_not_a_file(classes):
    with pytest.raises(ProjectError) as info:
        annotations_from_layers((8, 8), classes, points=(np.array([[1, 1], [50, 1]]), {"class": [9, 1]}))
    messages = [str(p) for p in info.value.problems]
    assert messages[0].startswith("Points layer, item 1: class 9 is not in classes.json")
    assert messages[1].startswith("Points layer, item 2: point (y=50, x=1) is outside")


def test_masks_layer_of_the_wrong_shape_is_refused(classes):
    with pytest.raises(ProjectError, match=r"Masks layer: has shape \(8, 9\) but the image has shape \(8, 8\)"):
        annotations_from_layers((8, 8), classes, masks=np.ones((8, 9), np.uint8))


def test_points_without_class_feature_are_refused(classes):
    with pytest.raises(ProjectError, match="has no 'class' feature"):
        annotations_from_layers((8, 8), classes, points=(np.array([[1, 1]]), {}))


def test_class_colours_drive_the_masks_colormap(classes):
    colormap = labels_colormap(classes)
    assert colormap[0] == "transparent"
    assert colormap[3] == "#55a868"
    assert colormap[1] == classes[0].display_color()


def test_the_class_table_travels_in_layer_metadata_and_a_broken_one_is_ignored(classes):
    assert classes_from_metadata(layer_metadata("masks", classes)) == classes
    assert classes_from_metadata({}) is None
    assert classes_from_metadata({"protoseg": {"role": "masks", "classes": [{"id": 1}]}}) is None
    assert classes_from_metadata({"protoseg": {"role": "masks", "classes": [{"id": 0, "name": "x"}]}}) is None
