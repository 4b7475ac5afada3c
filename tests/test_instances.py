"""Plain instance decoders and 3D linking."""

import numpy as np
import pytest

from napari_protoseg.instances import link_planes, plain_instances


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
