"""Opening and saving project folders in a real napari viewer."""

import numpy as np
import pytest

from napari_protoseg.annotations.project import AnnotationSet, ClassInfo, read_annotations, read_project, write_project


@pytest.fixture
def project_folder(tmp_path, stack_annotations):
    image = np.random.default_rng(0).integers(0, 255, stack_annotations.image_shape, dtype=np.uint8)
    return write_project(tmp_path / "cells", image, stack_annotations)


def test_opening_a_project_folder_shows_image_and_one_layer_per_annotation_type(make_napari_viewer, project_folder):
    viewer = make_napari_viewer()
    viewer.open(str(project_folder), plugin="napari-protoseg")
    assert [layer.name for layer in viewer.layers] == ["cells", "Masks", "Boxes", "Points", "Tags"]
    masks = viewer.layers["Masks"]
    assert masks.data.shape == (3, 20, 30)
    np.testing.assert_allclose(masks.colormap.map(np.array([3]))[0][:3], [0x55 / 255, 0xA8 / 255, 0x68 / 255], atol=1e-2)
    assert list(viewer.layers["Boxes"].features["class"]) == [3, 3]
    assert list(viewer.layers["Tags"].features["label"]) == ["+ mitochondrion", "\u2212 cytoplasm"]


def test_a_dropped_project_folder_is_offered_to_protoseg_and_remembered_choice_opens_it(
        make_napari_viewer, project_folder):
    import npe2
    from napari.settings import get_settings

    viewer = make_napari_viewer()
    compatible = npe2.PluginManager.instance().iter_compatible_readers([str(project_folder)])
    assert "napari-protoseg" in {r.plugin_name for r in compatible}
    # napari's reader dialog offers every compatible reader and can remember the choice for folders.
    settings = get_settings().plugins
    remembered = dict(settings.extension2reader)
    settings.extension2reader = {"*/": "napari-protoseg"}
    try:
        viewer.open(str(project_folder), plugin=None)  # what a drop or File > Open does
    finally:
        settings.extension2reader = remembered
    assert "Masks" in viewer.layers


def test_the_reader_ignores_folders_that_are_not_projects(tmp_path):
    from napari_protoseg.plugin.io import get_reader

    (tmp_path / "image.tif").write_bytes(b"")
    assert get_reader(str(tmp_path)) is None
    assert get_reader(str(tmp_path / "image.tif")) is None


def test_saving_the_layers_writes_the_folder_back_without_loss(make_napari_viewer, project_folder, tmp_path, stack_annotations):
    viewer = make_napari_viewer()
    viewer.open(str(project_folder), plugin="napari-protoseg")
    out = tmp_path / "saved"
    viewer.layers.save(str(out), plugin="napari-protoseg")
    assert read_annotations(out).equals(stack_annotations)
    np.testing.assert_array_equal(read_project(out).image, read_project(project_folder).image)


def test_edits_made_in_napari_are_saved(make_napari_viewer, project_folder, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(project_folder), plugin="napari-protoseg")
    viewer.layers["Masks"].data[1, 0:3, 0:3] = 2
    points = viewer.layers["Points"]
    points.feature_defaults["class"] = 3
    points.add(np.array([[1, 7, 9]]))
    viewer.layers["Boxes"].selected_data = {0}
    viewer.layers["Boxes"].remove_selected()
    out = tmp_path / "edited"
    viewer.layers.save(str(out), plugin="napari-protoseg")
    saved = read_annotations(out)
    assert np.count_nonzero(saved.masks[1] == 2) == 9
    assert (1, 7, 9, 3) in saved.points[["z", "y", "x", "class"]].tolist()
    assert len(saved.boxes) == 1


def test_an_invalid_project_folder_gives_a_message_not_a_crash(make_napari_viewer, project_folder):
    (project_folder / "points.csv").write_text("z,y,x,class\n0,1,1,42\n")
    viewer = make_napari_viewer()
    errors = []
    from napari.utils.notifications import notification_manager

    notification_manager.notification_ready.connect(lambda n: errors.append(n.message))
    viewer.open(str(project_folder), plugin="napari-protoseg")
    assert len(viewer.layers) == 0
    assert any("points.csv, row 1: class 42 is not in classes.json" in m for m in errors)


def test_the_sample_opens_the_image_together_with_its_annotation_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-protoseg", "synthetic_em")
    assert [layer.name for layer in viewer.layers] == ["EM (synthetic)", "Masks", "Boxes", "Points", "Tags"]
    assert viewer.layers["Masks"].data.shape == viewer.layers["EM (synthetic)"].data.shape == (8, 512, 512)
    assert len(viewer.layers["Boxes"].data) > 0 and len(viewer.layers["Points"].data) > 0
    assert viewer.dims.axis_labels == ("z", "y", "x")


def test_a_project_with_only_masks_opens_with_empty_box_point_and_tag_layers(make_napari_viewer, tmp_path):
    masks = np.zeros((2, 16, 16), np.uint8)
    masks[0, 2:6, 2:6] = 1
    annotations = AnnotationSet((2, 16, 16), [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=masks)
    folder = write_project(tmp_path / "masks-only", np.zeros((2, 16, 16), np.uint8), annotations)
    viewer = make_napari_viewer()
    viewer.open(str(folder), plugin="napari-protoseg")
    assert [layer.name for layer in viewer.layers] == ["masks-only", "Masks", "Boxes", "Points", "Tags"]
    assert [len(viewer.layers[name].data) for name in ("Boxes", "Points", "Tags")] == [0, 0, 0]
