"""The panel's workflow without Qt: layers -> annotations, input checks, tags, classes, accepting,
edit tracking, autosave, and the training generator the panel runs in a worker (its prediction
pipeline: test_pipeline.py)."""

import numpy as np
import pytest
from napari.components import ViewerModel
from napari.layers import Layer

from napari_protoseg.plugin.layers import annotation_layers
from napari_protoseg.annotations.project import ClassInfo, read_project
from napari_protoseg.annotations.synthetic import SAMPLE_CLASSES, generate_sample
from napari_protoseg.plugin.session import (
    CHECKPOINT_FILE,
    MODEL_FILE,
    PREDICTION_CONFIDENCE,
    PREDICTION_INSTANCES,
    PREDICTION_SEMANTIC,
    PreviewTarget,
    Session,
    SessionError,
    model_info_text,
    prediction_settings,
    training_run,
)
from napari_protoseg.model.network import ModelConfig
from napari_protoseg.prediction.pipeline import PredictionPiece, prediction_run
from napari_protoseg.training.engine import TrainConfig

TINY = TrainConfig(steps=6, batch_size=2, crop_size=64,
                   model=ModelConfig(base_width=4, depth=2, embed_dim=8, prototypes_per_class=2),
                   pseudo_label_warmup=1000, checkpoint_every=0)


@pytest.fixture(scope="module")
def sample():
    return generate_sample(shape=(3, 96, 96), seed=1)


@pytest.fixture(scope="module")
def model(sample):
    *_, last = training_run(sample.image, sample.annotations, TINY)
    return last.event.model


def sample_viewer(sample, with_annotations=True):
    viewer = ViewerModel()
    viewer.add_image(sample.image, name="EM")
    if with_annotations:
        for data, meta, kind in annotation_layers(sample.annotations):
            viewer.add_layer(Layer.create(data, meta, kind))
    return viewer


@pytest.fixture(autouse=True)
def projects_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOSEG_PROJECTS_DIR", str(tmp_path / "projects"))
    return tmp_path / "projects"


# ------------------------------------------------------------------------------ gathering


def test_the_session_takes_the_class_table_from_the_layers_and_gathers_exactly_what_they_hold(sample):
    session = Session(sample_viewer(sample))
    assert session.classes == SAMPLE_CLASSES
    image, annotations = session.training_input()
    assert image is session.image_layer().data
    assert annotations.equals(sample.annotations)


def test_an_image_without_annotation_layers_starts_with_a_background_and_an_object_class(sample):
    session = Session(sample_viewer(sample, with_annotations=False))
    assert [(c.name, c.instances) for c in session.classes] == [("background", False), ("object", True)]


# ------------------------------------------------------------------------------ bad input


def test_no_image_says_to_open_one():
    with pytest.raises(SessionError, match="There is no image. Open an EM image"):
        Session(ViewerModel()).training_input()


def test_an_rgb_image_is_refused_with_a_way_out():
    viewer = ViewerModel()
    viewer.add_image(np.zeros((64, 64, 3), np.uint8), name="photo", rgb=True)
    with pytest.raises(SessionError, match="'photo' is an RGB colour image.*Split RGB"):
        Session(viewer).training_input()


def test_annotation_layers_of_another_shape_are_named_with_both_shapes(sample):
    viewer = sample_viewer(sample)
    viewer.layers.remove("Masks")
    viewer.add_labels(np.zeros((3, 48, 48), np.uint16), name="Masks")
    with pytest.raises(SessionError) as err:
        Session(viewer).training_input()
    message = str(err.value)
    assert "'Masks' layer has shape (3, 48, 48) but the image 'EM' has shape (3, 96, 96)" in message
    assert "choose the image they were drawn on" in message


def test_no_annotations_says_what_to_draw(sample):
    session = Session(sample_viewer(sample, with_annotations=False))
    for role in ("masks", "boxes", "points"):
        session.ensure_annotation_layer(role)
    with pytest.raises(SessionError, match="nothing is annotated yet. Paint a few strokes"):
        session.training_input()


def test_a_single_class_asks_for_a_second_one(sample):
    session = Session(sample_viewer(sample, with_annotations=False))
    session.remove_class(2)
    session.ensure_annotation_layer("masks").data[0, 5:10, 5:10] = 1
    with pytest.raises(SessionError, match="(?s)only one class.*Add a class"):
        session.training_input()


def test_a_model_for_other_classes_is_refused_with_the_differences(sample, model):
    session = Session(sample_viewer(sample))
    assert session.check_model(model) is model
    session.rename_class(4, "synaptic vesicle")
    with pytest.raises(SessionError, match="(?s)trained for other classes.*'vesicle' in the model but 'synaptic vesicle'.*'Train on current labels'"):
        session.check_model(model)


def test_invalid_drawings_are_listed_by_layer_and_item(sample):
    viewer = sample_viewer(sample)
    viewer.layers["Points"].features["class"] = [42] * len(viewer.layers["Points"].data)
    with pytest.raises(SessionError, match="Some annotations cannot be used:\n- Points layer, item 1: class 42"):
        Session(viewer).annotations()


# --------------------------------------------------------------------------- drawing, classes


def test_the_drawing_class_is_the_label_feature_and_colour_of_new_annotations(sample):
    session = Session(sample_viewer(sample, with_annotations=False))
    mito = session.add_class("mitochondrion", instances=True, color="#00ff00")
    masks, boxes, points = (session.activate(role) for role in ("masks", "boxes", "points"))
    session.set_drawing_class(mito.id)
    assert masks.selected_label == mito.id and masks.mode == "paint"
    boxes.add_rectangles(np.array([[1, 10, 10], [1, 10, 30], [1, 30, 30], [1, 30, 10]]))
    points.add(np.array([[2, 40, 40]]))
    assert list(boxes.features["class"]) == [mito.id] and list(points.features["class"]) == [mito.id]
    np.testing.assert_allclose(boxes.edge_color[0], [0, 1, 0, 1])
    np.testing.assert_allclose(points.face_color[0], [0, 1, 0, 1])
    _, annotations = session.annotations()
    assert annotations.boxes[["z", "class"]].tolist() == [(1, mito.id)]
    assert annotations.points[["z", "y", "x", "class"]].tolist() == [(2, 40, 40, mito.id)]


def test_recolouring_and_renaming_a_class_updates_every_layer(sample):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    session.recolor_class(4, "#123456")
    expected = np.array([0x12, 0x34, 0x56]) / 255
    np.testing.assert_allclose(viewer.layers["Masks"].colormap.map(np.array([4]))[0][:3], expected, atol=1e-2)
    boxes = viewer.layers["Boxes"]
    vesicle_boxes = np.asarray(boxes.features["class"]) == 4
    assert vesicle_boxes.any()
    np.testing.assert_allclose(boxes.edge_color[vesicle_boxes][:, :3], np.tile(expected, (vesicle_boxes.sum(), 1)),
                               atol=1e-2)
    session.rename_class(3, "mito")
    assert "+ mito" in list(viewer.layers["Tags"].features["label"])
    for name in ("Masks", "Boxes", "Points", "Tags"):
        stored = viewer.layers[name].metadata["protoseg"]["classes"]
        assert [c["name"] for c in stored] == ["cytoplasm", "membrane", "mito", "vesicle"]
        assert stored[3]["color"] == "#123456"


def test_a_class_in_use_cannot_be_removed_but_an_unused_one_can(sample):
    session = Session(sample_viewer(sample))
    with pytest.raises(SessionError, match="'vesicle' is used in the annotations"):
        session.remove_class(4)
    extra = session.add_class("synapse")
    session.remove_class(extra.id)
    assert session.class_ids == [1, 2, 3, 4]


def test_duplicate_or_empty_class_names_are_refused(sample):
    session = Session(sample_viewer(sample))
    with pytest.raises(SessionError, match="already a class called 'membrane'"):
        session.rename_class(1, "membrane")
    with pytest.raises(SessionError, match="needs a name"):
        session.rename_class(1, "  ")


# ------------------------------------------------------------------------------------ tags


def test_tags_of_a_plane_and_of_a_region_are_set_read_and_forgotten(sample):
    session = Session(sample_viewer(sample, with_annotations=False))
    session.set_tag(2, "present", z=1)
    session.set_tag(1, "absent", z=1)
    session.set_tag(2, "absent", z=2, region=(0, 0, 40, 50))
    assert session.tag_states(1) == {1: "absent", 2: "present"}
    assert session.tag_states(2) == {1: "unknown", 2: "unknown"}
    assert session.tag_states(2, (0, 0, 40, 50)) == {1: "unknown", 2: "absent"}
    session.set_tag(2, "absent", z=1)  # changing a tag replaces it
    session.set_tag(1, "unknown", z=1)  # "unknown" removes it
    _, annotations = session.annotations()
    rows = sorted(annotations.tags.tolist())
    assert rows == [(1, 2, False, -1, -1, -1, -1), (2, 2, False, 0, 0, 40, 50)]
    assert sorted(session.annotation_layer("tags").features["label"]) == ["\u2212 object", "\u2212 object"]


# --------------------------------------------------------------------------------- geometry


def test_the_current_plane_and_the_visible_region_follow_the_view(sample):
    viewer = sample_viewer(sample, with_annotations=False)
    session = Session(viewer)
    viewer.dims.set_current_step(0, 2)
    assert session.current_plane() == 2
    viewer.reset_view()
    assert session.visible_region() == (0, 0, 96, 96)
    viewer.scene.camera.zoom *= 4
    viewer.scene.camera.center = (2, 30, 60)
    y0, x0, y1, x1 = session.visible_region()
    assert y0 <= 30 < y1 and x0 <= 60 < x1 and (y1 - y0) < 60 and (x1 - x0) < 60


# ------------------------------------------------------------------------- review, accepting


def _predicted_plane(session, z=1):
    """Write a fake prediction of plane z: cytoplasm, a membrane line and two mitochondria."""
    semantic = np.ones((96, 96), np.uint16)
    semantic[40:42, :] = 2
    semantic[10:20, 10:20] = 3
    semantic[60:70, 60:80] = 3
    instances = np.zeros((96, 96), np.uint32)
    instances[10:20, 10:20] = 1
    instances[60:70, 60:80] = 2
    session.write_prediction(PredictionPiece(z, (0, 0), semantic, instances, np.full((96, 96), 0.9, np.float32), 1, 1))
    return semantic


def test_predictions_arrive_in_three_layers_of_the_image_shape_with_unique_instance_ids(sample):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    _predicted_plane(session, z=1)
    _predicted_plane(session, z=2)
    for name in (PREDICTION_SEMANTIC, PREDICTION_INSTANCES, PREDICTION_CONFIDENCE):
        assert viewer.layers[name].data.shape == (3, 96, 96)
    instances = viewer.layers[PREDICTION_INSTANCES].data
    assert set(np.unique(instances[1])) == {0, 1, 2} and set(np.unique(instances[2])) == {0, 3, 4}
    assert viewer.layers[PREDICTION_SEMANTIC].colormap.map(np.array([3]))[0][:3] == pytest.approx(
        [0x55 / 255, 0xA8 / 255, 0x68 / 255], abs=1e-2)


def test_review_layers_made_ahead_stay_hidden_until_their_first_prediction_is_redrawn(sample):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    active = viewer.layers.selection.active
    for step in session.review_layer_steps():
        step()
    layers = [viewer.layers[name] for name in (PREDICTION_SEMANTIC, PREDICTION_INSTANCES, PREDICTION_CONFIDENCE)]
    assert all(not layer.visible and not np.any(layer.data) for layer in layers)
    assert viewer.layers.selection.active is active  # the user's layer stays the one drawn on
    assert session.review_layer_steps() == []  # made once: nothing more to make
    viewer.dims.set_current_step(0, 1)
    piece = PredictionPiece(1, (0, 0), np.full((96, 96), 3, np.uint16), np.ones((96, 96), np.uint32),
                            np.full((96, 96), 0.9, np.float32), 1, 1)
    changed = session.write_prediction(piece, redraw=False)
    assert changed == [PREDICTION_SEMANTIC, PREDICTION_INSTANCES, PREDICTION_CONFIDENCE]
    assert np.all(layers[0].data[1] == 3) and not any(layer.visible for layer in layers)
    for name in changed:
        session.redraw_prediction(name)
    assert [layer.visible for layer in layers] == [True, True, False]  # confidence is shown on demand
    layers[0].visible = False  # the user hides a prediction: the next one leaves it hidden
    for name in session.write_prediction(piece, redraw=False):
        session.redraw_prediction(name)
    assert [layer.visible for layer in layers] == [False, True, False]


def test_a_plane_out_of_view_is_written_without_redrawing_and_shown_at_the_end(sample):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    viewer.dims.set_current_step(0, 0)
    piece = PredictionPiece(2, (0, 0), np.full((96, 96), 3, np.uint16), np.ones((96, 96), np.uint32),
                            np.full((96, 96), 0.9, np.float32), 1, 1)
    assert session.write_prediction(piece, redraw=False) == []
    assert np.all(viewer.layers[PREDICTION_SEMANTIC].data[2] == 3)
    assert not viewer.layers[PREDICTION_SEMANTIC].visible
    for step in session.showing_steps():
        step()
    assert viewer.layers[PREDICTION_SEMANTIC].visible and not viewer.layers[PREDICTION_CONFIDENCE].visible


def test_painting_a_prediction_marks_it_edited_until_it_is_predicted_again(sample):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    _predicted_plane(session)
    assert session.prediction_layers_edited() == []
    viewer.layers[PREDICTION_INSTANCES].paint((1, 50, 50), 7)
    assert session.prediction_layers_edited() == [PREDICTION_INSTANCES]
    _predicted_plane(session)
    assert session.prediction_layers_edited() == []


def test_accepting_the_plane_copies_the_corrected_prediction_into_masks(sample):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    semantic = _predicted_plane(session, z=1)
    viewer.dims.set_current_step(0, 1)
    instances = viewer.layers[PREDICTION_INSTANCES]
    instances.data[1][instances.data[1] == 2] = 0  # the user erases the second mitochondrion
    instances.data[1, 30:36, 30:36] = 9  # and paints a new one where cytoplasm was predicted
    masks_before = viewer.layers["Masks"].data.copy()
    written = session.accept()
    masks = viewer.layers["Masks"].data
    assert written == int(np.count_nonzero(masks[1]))
    assert np.all(masks[1, 10:20, 10:20] == 3) and np.all(masks[1, 30:36, 30:36] == 3)
    assert np.all(masks[1, 60:70, 60:80] == 0)  # the erased object is not annotated as mitochondrion
    assert np.all(masks[1, 40:42, :] == 2) and masks[1, 0, 0] == 1
    np.testing.assert_array_equal(masks[[0, 2]], masks_before[[0, 2]])
    assert semantic[60, 60] == 3  # the semantic layer itself was not changed by accepting


def test_accepting_only_the_selected_instance_leaves_the_rest_of_the_masks_alone(sample):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    _predicted_plane(session, z=1)
    viewer.dims.set_current_step(0, 1)
    masks_before = viewer.layers["Masks"].data.copy()
    viewer.layers[PREDICTION_INSTANCES].selected_label = 2
    written = session.accept(selected_only=True)
    changed = viewer.layers["Masks"].data != masks_before
    assert written == 200 and changed.sum() == 200
    assert np.all(viewer.layers["Masks"].data[1, 60:70, 60:80] == 3)
    with pytest.raises(SessionError, match="Instance 5 is not in plane 1"):
        session.accept(selected_only=True, instance_ids=[5])


def test_accepting_without_a_prediction_says_to_predict_first(sample):
    with pytest.raises(SessionError, match="no prediction to accept yet"):
        Session(sample_viewer(sample)).accept()


# ------------------------------------------------------------------------------- autosave


def test_saving_writes_a_project_folder_that_reads_back_the_same(sample, projects_dir):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    session.recolor_class(1, "#abcdef")
    assert session.dirty
    folder = session.save_project()
    assert folder == projects_dir / "EM" and not session.dirty
    project = read_project(folder)
    np.testing.assert_array_equal(project.image, sample.image)
    assert project.annotations.classes[0].color == "#abcdef"
    _, annotations = session.annotations()
    assert project.annotations.equals(annotations)
    # The folder is remembered with the image; a second image of the same name gets its own folder.
    assert session.project_folder() == folder
    other = ViewerModel()
    other.add_image(sample.image, name="EM")
    assert Session(other).project_folder() == projects_dir / "EM-2"


def test_edits_of_any_annotation_layer_mark_the_project_for_autosave(sample):
    viewer = sample_viewer(sample)
    session = Session(viewer)
    session.watch_annotation_layers()
    session.save_project()
    viewer.layers["Masks"].paint((0, 5, 5), 2)
    assert session.dirty
    session.dirty = False
    viewer.layers["Points"].add(np.array([[1, 5, 5]]))
    assert session.dirty


# ---------------------------------------------------------------------- background runs


def test_a_training_run_saves_first_previews_the_region_asked_for_and_ends_with_the_model(sample, tmp_path):
    session = Session(sample_viewer(sample))
    session.set_project_folder(tmp_path / "project")
    image, annotations = session.training_input()
    target = PreviewTarget(every_seconds=0.0)
    target.set(1, (10, 20, 50, 70))
    updates = list(training_run(image, annotations, TINY, snapshot=session.snapshot(), preview=target))
    assert updates[0].saved == tmp_path / "project"
    events = [u for u in updates if u.event is not None]
    assert [u.event.step for u in events] == [1, 2, 3, 4, 5, 6, 6]
    previews = [u for u in events if u.event.preview is not None]
    assert previews and all(u.preview_at == (1, (10, 20, 50, 70)) for u in previews)
    assert previews[0].event.preview.shape == (40, 50)
    # The preview's picture is drawn on the worker thread: napari's event loop only shows it.
    assert all(u.preview_picture.shape == (40, 50, 3) and u.preview_picture.dtype == np.uint8 for u in previews)
    last = updates[-1]
    assert last.event.finished and last.event.model is not None
    assert last.model_file == tmp_path / "project" / MODEL_FILE and last.model_file.is_file()
    assert (tmp_path / "project" / CHECKPOINT_FILE).is_file()


def test_a_stopped_run_keeps_its_checkpoint_and_continue_resumes_it(sample, tmp_path):
    session = Session(sample_viewer(sample))
    session.set_project_folder(tmp_path / "project")
    image, annotations = session.training_input()
    steps = []
    updates = training_run(image, annotations, TINY, snapshot=session.snapshot(), stop=lambda: len(steps) >= 2)
    for update in updates:
        if update.event is not None:
            steps.append(update.event.step)
            last = update.event
    assert last.stopped and last.step == 2 and last.model is not None
    session.set_model(last.model)
    session.resumable_checkpoint = last.checkpoint
    resume, initial = session.continue_plan()
    assert resume == tmp_path / "project" / CHECKPOINT_FILE and initial is None
    resumed = [u.event.step for u in training_run(image, annotations, TINY, resume=resume) if u.event]
    assert resumed[0] == 3 and resumed[-1] == TINY.steps


def test_continue_without_a_model_says_to_train_first(sample):
    with pytest.raises(SessionError, match="no model yet. Click 'Train on current labels'"):
        Session(sample_viewer(sample)).continue_plan()


def test_the_model_info_says_classes_annotation_counts_and_steps(model):
    text = model_info_text(model, "Loaded from m.protoseg.pt")
    assert "Loaded from m.protoseg.pt" in text
    assert "Trained 6 step(s)" in text
    assert "Classes: cytoplasm, membrane, mitochondrion (instances), vesicle" in text
    totals = model.training_info["totals"]
    assert f"{totals['mask_pixels']} mask pixels, {totals['boxes']} boxes" in text
    assert "Planes annotated: 0-2" in text
    assert model_info_text(None).startswith("No model yet")


def test_a_class_table_loaded_with_two_classes_of_the_same_name_is_refused(sample):
    session = Session(sample_viewer(sample))
    with pytest.raises(SessionError, match="used twice"):
        session.class_table.set([ClassInfo(1, "a"), ClassInfo(2, "a")])


def test_a_single_2d_image_goes_through_training_prediction_and_accepting(tmp_path):
    plane = generate_sample(shape=(96, 96), seed=3)
    session = Session(sample_viewer(plane))
    session.set_project_folder(tmp_path / "plane")
    image, annotations = session.training_input()
    assert image.ndim == 2 and session.current_plane() is None
    *_, last = training_run(image, annotations, TINY, snapshot=session.snapshot(image, annotations))
    session.set_model(last.event.model)
    (piece,) = prediction_run(session.check_model(), image, "plane", settings=prediction_settings())
    assert piece.z is None and piece.semantic.shape == (96, 96)
    session.write_prediction(piece)
    assert session.viewer.layers[PREDICTION_SEMANTIC].data.shape == (96, 96)
    session.set_tag(1, "present", z=None)
    assert session.tag_states(None)[1] == "present"
    expected = session.viewer.layers[PREDICTION_SEMANTIC].data.astype(int)
    expected[(expected == 3) & (session.viewer.layers[PREDICTION_INSTANCES].data == 0)] = 0  # dropped specks
    written = session.accept()
    masks = session.viewer.layers["Masks"].data
    assert written == np.count_nonzero(expected) > 0
    np.testing.assert_array_equal(masks[expected > 0], expected[expected > 0])
    assert read_project(tmp_path / "plane").annotations.image_shape == (96, 96)


# ------------------------------------------------------------------------ learning the stack


def test_learning_the_stack_keeps_its_encoder_in_the_project_folder_and_goes_on_from_it(tmp_path):
    from napari_protoseg.model.encoder import load_encoder
    from napari_protoseg.model.network import ModelConfig
    from napari_protoseg.plugin.session import STACK_ENCODER_FILE, stack_encoder, stack_learning_run
    from napari_protoseg.pretraining.engine import PretrainConfig

    image = generate_sample(shape=(2, 96, 96), seed=4).image
    config = PretrainConfig(batch_size=2, model=ModelConfig(base_width=4, depth=2, embed_dim=8), device="cpu")
    calls = iter(range(1000))
    updates = list(stack_learning_run(image, tmp_path, config, start_from=None, budget_minutes=0.05,
                                      stop=lambda: next(calls) >= 4))
    last = updates[-1]
    assert last.stopped and last.saved == tmp_path / STACK_ENCODER_FILE and last.saved.is_file()
    encoder, seconds = stack_encoder(tmp_path, config.model)
    assert encoder is not None and 0 < seconds == pytest.approx(last.seconds)
    updates = list(stack_learning_run(image, tmp_path, config, start_from=None, budget_minutes=0.05))
    assert updates[-1].finished and updates[-1].seconds >= 3.0 > seconds  # went on until its 3 s were spent
    again = list(stack_learning_run(image, tmp_path, config, start_from=None, budget_minutes=0.05))
    assert len(again) == 1 and again[0].finished and again[0].step == 0  # a spent budget is not repeated
    assert load_encoder(tmp_path / STACK_ENCODER_FILE).provenance["stack_learning_seconds"] >= 3.0
    assert stack_encoder(tmp_path, ModelConfig(base_width=8, depth=2, embed_dim=8)) == (None, 0.0)  # another size
    (tmp_path / STACK_ENCODER_FILE).write_bytes(b"damaged")
    assert stack_encoder(tmp_path, config.model) == (None, 0.0)  # learnt afresh rather than failing


def test_training_starts_from_the_stack_encoder_once_there_is_one(sample, tmp_path):
    from napari_protoseg.model.encoder import Encoder, save_encoder
    from napari_protoseg.model.network import ModelConfig, ProtoSegNet
    from napari_protoseg.plugin.session import STACK_ENCODER_FILE

    session = Session(sample_viewer(sample), TrainConfig(encoder="shipped"))
    session.set_project_folder(tmp_path / "project")
    assert session.training_encoder() == "shipped"
    kept = tmp_path / "project" / STACK_ENCODER_FILE
    save_encoder(kept, Encoder.from_network(ProtoSegNet(ModelConfig(n_classes=1, base_width=4))))
    assert session.training_encoder() == "shipped"  # learnt for another network size: not used
    save_encoder(kept, Encoder.from_network(ProtoSegNet(ModelConfig(n_classes=1))))
    assert session.training_encoder() == str(kept)
