"""The synthetic EM sample: determinism, plausible ground truth, and sparse annotations that agree
with it. Most checks use a small (4, 256, 256) stack; only the pixel-share and count checks use
the default (8, 512, 512) stack that the plugin ships."""

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_protoseg.annotations import synthetic as sample
from napari_protoseg.annotations.project import NO_REGION, read_project, write_project
from napari_protoseg.plugin.sample_data import napari_sample
from napari_protoseg.annotations.synthetic import (
    SAMPLE_CLASSES,
    SyntheticSample,
    generate_sample,
    sparse_annotations,
)

SMALL = (4, 256, 256)
CYTOPLASM, MEMBRANE, MITO, VESICLE = 1, 2, 3, 4


@pytest.fixture(scope="module")
def small():
    return generate_sample(SMALL, seed=0)


@pytest.fixture(scope="module")
def default():
    return generate_sample()


def _components(mask):
    """4-connected components of a plane mask: (labels, slices)."""
    lab, _ = ndi.label(mask)
    return lab, ndi.find_objects(lab)


def _mito_components(sem_plane, inst_plane):
    """Bounding boxes (y0, x0, y1, x1) of the per-plane mitochondrion instances."""
    out = set()
    for i, sl in enumerate(ndi.find_objects(np.where(sem_plane == MITO, inst_plane, 0)), start=1):
        if sl is not None:
            out.add((sl[0].start, sl[1].start, sl[0].stop, sl[1].stop))
    return out


# ------------------------------------------------------------------------------ determinism


def test_same_seed_gives_bit_identical_output(small):
    again = generate_sample(SMALL, seed=0)
    assert np.array_equal(small.image, again.image)
    assert np.array_equal(small.semantic, again.semantic)
    assert np.array_equal(small.instances, again.instances)
    assert small.annotations.equals(again.annotations)


def test_different_seeds_give_different_samples(small):
    other = generate_sample(SMALL, seed=1)
    assert not np.array_equal(small.image, other.image)
    assert not np.array_equal(small.semantic, other.semantic)


def test_invalid_shapes_are_refused():
    with pytest.raises(ValueError):
        generate_sample((2, 3, 64, 64))
    with pytest.raises(ValueError):
        generate_sample((4, 16, 16))


# ---------------------------------------------------------------------------- ground truth


def test_shapes_and_dtypes(small):
    assert isinstance(small, SyntheticSample)
    assert small.image.shape == small.semantic.shape == small.instances.shape == SMALL
    assert small.image.dtype == np.uint8
    assert small.semantic.dtype == np.uint8
    assert small.instances.dtype in (np.uint16, np.uint32)
    assert small.annotations.image_shape == SMALL
    assert small.annotations.classes == SAMPLE_CLASSES


def test_every_pixel_is_labelled_and_every_class_occurs_in_every_plane(small):
    assert set(np.unique(small.semantic)) == {1, 2, 3, 4}
    for z in range(SMALL[0]):
        assert set(np.unique(small.semantic[z])) == {1, 2, 3, 4}


def test_class_pixel_shares_are_plausible(default):
    share = {c: float(np.mean(default.semantic == c)) for c in (1, 2, 3, 4)}
    assert 0.10 <= share[MEMBRANE] <= 0.25, share
    assert 0.03 <= share[MITO] <= 0.15, share
    assert 0.005 <= share[VESICLE] <= 0.05, share
    assert share[CYTOPLASM] > 0.5, share


def test_mitochondria_per_plane_and_their_sizes_are_plausible(default):
    for z in range(default.semantic.shape[0]):
        ids = np.unique(default.instances[z])
        ids = ids[ids > 0]
        assert 10 <= len(ids) <= 25, (z, len(ids))
    # Length of the longest profile axis (from second moments) of a middle plane's mitochondria.
    inst = default.instances[4]
    lengths = []
    for i in np.unique(inst[inst > 0]):
        yy, xx = np.nonzero(inst == i)
        if len(yy) >= 200:
            evals = np.linalg.eigvalsh(np.cov(np.vstack([yy, xx])))
            lengths.append(4 * np.sqrt(evals[-1]))
    assert 40 <= np.median(lengths) <= 150


def test_mito_instances_are_the_4_connected_components_of_class_3_per_plane(small):
    for z in range(SMALL[0]):
        inst, sem = small.instances[z], small.semantic[z]
        assert np.array_equal(inst > 0, sem == MITO)
        lab, n = ndi.label(sem == MITO)   # 4-connectivity
        ids = np.unique(inst[inst > 0])
        assert list(ids) == list(range(1, n + 1)), "ids are 1..n in every plane"
        # Each component holds exactly one id and each id exactly one component.
        pairs = np.unique(np.stack([lab[lab > 0], inst[lab > 0]]), axis=1)
        assert pairs.shape[1] == n


def test_some_mitochondria_touch_each_other(small, default):
    """Two instances within 1 px of each other (only a 1 px gap in the ground truth apart)."""
    def touching_pairs(instances):
        found = 0
        for plane in instances:
            lab = plane.astype(np.int64)
            big = ndi.grey_dilation(lab, size=(3, 3))
            small_ = -ndi.grey_dilation(-np.where(lab > 0, lab, 1 << 40), size=(3, 3))
            found += int(np.any((big > 0) & (small_ < 1 << 40) & (big != small_)))
        return found

    assert touching_pairs(small.instances) >= 1
    assert touching_pairs(default.instances) >= 2


def test_mitochondria_continue_across_sections(small):
    """Most mitochondria overlap one in the next section, so they can be linked in 3D."""
    linked = total = 0
    for z in range(SMALL[0] - 1):
        a, b = small.instances[z], small.instances[z + 1]
        for i in np.unique(a[a > 0]):
            mask = a == i
            total += 1
            overlap = np.bincount(b[mask], minlength=1)[1:]
            if overlap.size and overlap.max() >= 0.3 * mask.sum():
                linked += 1
    assert total and linked / total >= 0.5


def test_image_is_rendered_from_the_labels(small):
    """Membranes darkest, mitochondria darker than cytoplasm, vesicles darker than cytoplasm."""
    img, sem = small.image.astype(float), small.semantic
    mean = {c: img[sem == c].mean() for c in (1, 2, 3, 4)}
    assert mean[MEMBRANE] + 30 < mean[MITO] < mean[CYTOPLASM] - 20, mean
    assert mean[VESICLE] < mean[CYTOPLASM] - 10, mean
    assert img.std() > 20   # real contrast, not a flat image


# ----------------------------------------------------------------------- sparse annotations


def test_sparse_annotations_validate_and_contain_every_type(small, default):
    for s in (small, default):
        ann = s.annotations
        ann.check()
        assert ann.masks is not None and np.any(ann.masks)
        assert len(ann.boxes) and len(ann.points) and len(ann.tags)


def test_annotation_types_go_to_their_planes_and_the_last_plane_is_left_free(default):
    ann = default.annotations
    assert np.flatnonzero(ann.masks.reshape(8, -1).any(axis=1)).tolist() == [0]
    assert sorted(set(ann.tags["z"].tolist())) == [1, 2]
    assert sorted(set(ann.boxes["z"].tolist())) == [3, 4]
    assert sorted(set(ann.points["z"].tolist())) == [5, 6]
    whole = ann.tags[ann.tags["y0"] == NO_REGION]
    assert sorted(set(whole["z"].tolist())) == [2] and len(whole) == 4
    assert ann.summary()["planes_annotated"] == list(range(7))


def test_scribbles_never_disagree_with_the_ground_truth(small, default):
    for s in (small, default):
        masks, sem = s.annotations.masks, s.semantic
        drawn = masks > 0
        assert np.array_equal(masks[drawn], sem[drawn])
        assert set(np.unique(masks[drawn])) == {1, 2, 3, 4}, "every class is scribbled"
        # Thin strokes: a small part of the plane.
        assert drawn.sum() < 0.05 * drawn[0].size


def test_boxes_are_tight_around_one_object_and_exhaustive(small):
    ann, sem, inst = small.annotations, small.semantic, small.instances
    assert set(ann.boxes["class"].tolist()) == {MITO, VESICLE}
    assert ann.boxes["exhaustive"].all()
    for z in sorted(set(ann.boxes["z"].tolist())):
        for cid in (MITO, VESICLE):
            rows = ann.boxes[(ann.boxes["z"] == z) & (ann.boxes["class"] == cid)]
            boxes = {(int(b["y0"]), int(b["x0"]), int(b["y1"]), int(b["x1"])) for b in rows}
            if cid == MITO:
                truth = _mito_components(sem[z], inst[z])
            else:
                truth = {(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
                         for sl in _components(sem[z] == VESICLE)[1]}
            assert len(boxes) == len(rows), "one box per object"
            assert boxes == truth


def test_points_lie_inside_their_class_and_mark_every_mitochondrion_once(small):
    ann, sem, inst = small.annotations, small.semantic, small.instances
    p = ann.points
    assert np.array_equal(sem[p["z"], p["y"], p["x"]], p["class"])
    assert set(p["class"].tolist()) == {1, 2, 3, 4}
    assert np.array_equal(p["exhaustive"], p["class"] == MITO)
    for z in sorted(set(p["z"].tolist())):
        mito = p[(p["z"] == z) & (p["class"] == MITO)]
        ids = inst[z, mito["y"], mito["x"]]
        assert sorted(ids.tolist()) == sorted(np.unique(inst[z][inst[z] > 0]).tolist())
        for cid in (CYTOPLASM, MEMBRANE, VESICLE):
            assert ((p["z"] == z) & (p["class"] == cid)).sum() == 10


def test_tags_agree_with_the_ground_truth(small):
    ann, sem = small.annotations, small.semantic
    assert len(ann.tags)
    for t in ann.tags:
        plane = sem[t["z"]]
        if t["y0"] != NO_REGION:
            plane = plane[t["y0"]:t["y1"], t["x0"]:t["x1"]]
        assert bool(np.any(plane == t["class"])) == bool(t["present"])
    # 4 planes: tags on plane 1, for 4 classes on 4 tiles plus 4 whole-plane tags.
    assert set(ann.tags["z"].tolist()) == {1}
    assert (ann.tags["y0"] != NO_REGION).sum() == 16 and (ann.tags["y0"] == NO_REGION).sum() == 4


def test_sparse_annotations_can_be_derived_from_any_dense_ground_truth(small):
    """The same dense labels and seed give the same annotations; another seed other points."""
    a = sparse_annotations(small.semantic, small.instances, seed=5)
    b = sparse_annotations(small.semantic, small.instances, seed=5)
    c = sparse_annotations(small.semantic, small.instances, seed=6)
    a.check()
    assert a.equals(b)
    assert not a.equals(c)


@pytest.mark.parametrize("nz", [1, 2, 3, 5, 16])
def test_other_stack_depths_get_valid_annotations(nz):
    s = generate_sample((nz, 96, 96), seed=3)
    ann = s.annotations
    ann.check()
    planes = ann.summary()["planes_annotated"]
    assert 0 in planes
    if nz >= 5:
        assert nz - 1 not in planes, "the last plane is kept for evaluation"
    if nz >= 4:
        assert len(ann.boxes) and len(ann.tags)
    assert len(ann.points)


def test_a_2d_shape_gives_a_single_plane_with_scribbles_and_points():
    s = generate_sample((256, 256), seed=2)
    assert s.image.shape == s.semantic.shape == s.instances.shape == (256, 256)
    ann = s.annotations
    ann.check()
    assert ann.image_shape == (256, 256) and not ann.is_stack
    assert ann.masks.shape == (256, 256)
    drawn = ann.masks > 0
    assert np.array_equal(ann.masks[drawn], s.semantic[drawn])
    assert len(ann.points) and np.all(ann.points["z"] == 0)
    assert np.array_equal(s.semantic[ann.points["y"], ann.points["x"]], ann.points["class"])
    assert set(np.unique(s.semantic)) == {1, 2, 3, 4}


def test_sample_round_trips_through_a_project_folder(small, tmp_path):
    write_project(tmp_path / "proj", small.image, small.annotations)
    project = read_project(tmp_path / "proj")
    assert np.array_equal(project.image, small.image)
    assert project.annotations.equals(small.annotations)


def test_napari_sample_returns_the_image_then_the_annotation_layers(small, monkeypatch):
    monkeypatch.setattr(sample, "generate_sample", lambda *a, **k: small)
    layers = napari_sample()
    data, meta, kind = layers[0]
    assert kind == "image" and meta["name"] == "EM (synthetic)"
    assert data is small.image
    assert {layer[2] for layer in layers[1:]} >= {"labels", "shapes", "points"}
