"""The one prediction pipeline (napari_protoseg.prediction.pipeline): its settings, the pieces the
panel receives plane by plane, and the same labels in the panel and from ``protoseg predict``."""

from dataclasses import replace

import numpy as np
import pytest
import tifffile
from skimage.segmentation import relabel_sequential

from napari_protoseg import cli
from napari_protoseg.model.file import load_model, save_model
from napari_protoseg.plugin.session import (PREDICTION_CONFIDENCE, PREDICTION_INSTANCES, PREDICTION_SEMANTIC, Session,
                                            prediction_settings, training_run)
from napari_protoseg.prediction import DECODERS, DEFAULT_DECODER
from napari_protoseg.prediction import pipeline
from napari_protoseg.prediction.decoders import min_object_sizes
from napari_protoseg.prediction.pipeline import DecoderSettings, PredictionError, predict_instances, prediction_run

# The session tests' tiny model of the synthetic sample, its viewer and project folder.
from test_session import TINY, model, projects_dir, sample, sample_viewer  # noqa: E402, F401, F811


# ------------------------------------------------------------------------------ settings


def test_the_settings_default_to_what_protoseg_predict_did_before_they_existed():
    assert DecoderSettings() == DecoderSettings(decoder="components", min_size=None, merge_similarity=0.5,
                                                shape_seeds=False, split_depth=2.0, link_3d=False, min_overlap=0.3,
                                                tta=False)
    assert DecoderSettings().decoder == DEFAULT_DECODER and DECODERS == ("wise", "components", "watershed")


def test_an_unknown_decoder_is_named_with_the_choices():
    with pytest.raises(PredictionError, match="unknown instance decoder 'magic'; choose one of wise, components, "
                                              "watershed"):
        DecoderSettings(decoder="magic")


@pytest.mark.parametrize("similarity", [0, 0.0, 1, 1.0, 1.5, -0.2, float("nan"), "0.5", True])
def test_the_merge_similarity_is_a_similarity_strictly_between_0_and_1(similarity):
    with pytest.raises(PredictionError, match="merge_similarity must be between 0 and 1"):
        DecoderSettings(decoder="wise", merge_similarity=similarity)


def test_merging_can_be_switched_off_and_any_similarity_inside_0_1_is_taken():
    assert DecoderSettings(merge_similarity=None).merge_similarity is None
    assert DecoderSettings(merge_similarity=0.01).merge_similarity == 0.01
    assert DecoderSettings(merge_similarity=np.float32(0.9)).merge_similarity == np.float32(0.9)


@pytest.mark.parametrize("field, value, message", [
    ("min_size", -1, "min_size must be a whole number of pixels"),
    ("min_size", 2.5, "min_size must be a whole number of pixels"),
    ("min_size", {3: -4}, "min_size of class 3 must be a whole number"),
    ("min_size", {"mito": 4}, "the keys are class ids"),
    ("split_depth", 0, "split_depth must be a positive number"),
    ("min_overlap", 1.5, "min_overlap must be a share between 0 and 1"),
    ("link_3d", "yes", "link_3d must be True or False"),
    ("tta", 1, "tta must be True or False"),
])
def test_other_bad_settings_say_what_is_wrong(field, value, message):
    with pytest.raises(PredictionError, match=message):
        DecoderSettings(**{field: value})


def test_the_settings_do_not_change_with_the_dict_they_were_given():
    floors = {3: 40}
    settings = DecoderSettings(min_size=floors)
    floors[3] = 1
    assert settings.min_size == {3: 40}
    with pytest.raises(AttributeError):
        settings.decoder = "wise"


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("tta", [False, True])
def test_the_panel_decodes_with_the_settings_of_protoseg_predict_linking_a_whole_stack(model, decoder, tta):
    """The panel's settings are those of ``protoseg predict --instance-decoder D [--tta] --link-3d``."""
    assert prediction_settings(decoder, tta) == cli._decoder_settings(model, decoder, link_3d=True, tta=tta)
    assert replace(prediction_settings(decoder, tta), link_3d=False) == cli._decoder_settings(model, decoder, tta=tta)


# ------------------------------------------------------------- the panel and protoseg predict


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, model):
    return save_model(tmp_path_factory.mktemp("model") / "model.protoseg.pt", model)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, sample):
    path = tmp_path_factory.mktemp("image") / "image.tif"
    tifffile.imwrite(path, sample.image, photometric="minisblack")
    return path


@pytest.mark.parametrize("decoder", DECODERS)
def test_the_panel_and_protoseg_predict_give_identical_labels(decoder, sample, model_file, image_file, tmp_path):
    """The whole stack predicted as the panel does it (pieces written into the review layers by
    Session.write_prediction, the linked piece last) and by ``protoseg predict``: the same classes,
    confidence and instance ids, per plane (the panel's layer before the linked piece) and linked
    into 3D objects; a single plane gets the CLI's objects of that plane, numbered from 1."""
    model = load_model(model_file)
    session = Session(sample_viewer(sample))
    per_plane = None
    for piece in prediction_run(model, sample.image, "stack", settings=prediction_settings(decoder)):
        if piece.linked_instances is not None:
            per_plane = np.array(session.viewer.layers[PREDICTION_INSTANCES].data)
        session.write_prediction(piece)
    layers = session.viewer.layers
    written = {}
    for link in ([], ["--link-3d"]):
        out = tmp_path / f"cli{len(link)}"
        assert cli.main(["predict", str(model_file), str(image_file), "--out", str(out), "--device", "cpu",
                         "--instance-decoder", decoder, *link]) == 0
        written[bool(link)] = out
    np.testing.assert_array_equal(layers[PREDICTION_SEMANTIC].data, tifffile.imread(written[False] / "semantic.tif"))
    np.testing.assert_array_equal(layers[PREDICTION_CONFIDENCE].data,
                                  tifffile.imread(written[False] / "confidence.tif"))
    by_plane = tifffile.imread(written[False] / "instances.tif")
    assert per_plane is not None and per_plane.max() > 0
    np.testing.assert_array_equal(per_plane, by_plane)
    np.testing.assert_array_equal(layers[PREDICTION_INSTANCES].data, tifffile.imread(written[True] / "instances.tif"))
    (piece,) = prediction_run(model, sample.image, "plane", z=1, settings=prediction_settings(decoder))
    np.testing.assert_array_equal(piece.semantic, layers[PREDICTION_SEMANTIC].data[1])
    np.testing.assert_array_equal(piece.instances, relabel_sequential(by_plane[1])[0])


def test_the_whole_image_gathers_the_pieces_the_panel_receives(sample, model):
    settings = DecoderSettings(decoder="wise", link_3d=True)
    pieces = list(prediction_run(model, sample.image, "stack", settings=settings))
    gathered = predict_instances(model, sample.image, settings)
    np.testing.assert_array_equal(gathered.labels, pieces[-1].linked_instances)
    for piece in pieces[:-1]:
        np.testing.assert_array_equal(gathered.classes[piece.z], piece.semantic)
        np.testing.assert_array_equal(gathered.confidence[piece.z], piece.confidence)
    assert gathered.linked_3d and gathered.planes_done == 3 and not gathered.stopped


# ------------------------------------------------------------------------ pieces, per plane


@pytest.mark.parametrize("scope, expected_pieces", [("plane", 1), ("region", 1), ("stack", 4)])
def test_prediction_runs_give_class_ids_instances_and_confidence_per_plane(sample, model, scope, expected_pieces):
    pieces = list(prediction_run(model, sample.image, scope, z=1, region=(8, 16, 40, 56),
                                 settings=prediction_settings()))
    assert len(pieces) == expected_pieces
    first = pieces[0]
    expected_shape = (32, 40) if scope == "region" else (96, 96)
    assert first.semantic.shape == first.instances.shape == first.confidence.shape == expected_shape
    assert first.origin == ((8, 16) if scope == "region" else (0, 0))
    assert set(np.unique(first.semantic)) <= {1, 2, 3, 4}
    assert np.all(first.semantic[first.instances > 0] == 3)  # only mitochondria have instances
    if scope == "stack":
        assert [p.z for p in pieces[:3]] == [0, 1, 2]
        assert pieces[-1].linked_instances.shape == (3, 96, 96)


def test_progress_is_reported_after_each_plane(sample, model):
    reported = []
    pieces = list(prediction_run(model, sample.image, "stack", progress=lambda done, total: reported.append((done, total))))
    assert reported == [(1, 3), (2, 3), (3, 3)] and [(p.done, p.total) for p in pieces] == reported


def test_a_stopped_stack_prediction_ends_between_planes(sample, model):
    pieces = []
    for piece in prediction_run(model, sample.image, "stack", settings=prediction_settings(),
                                stop=lambda: len(pieces) >= 1):
        pieces.append(piece)
    assert [p.z for p in pieces] == [0]  # and no linked piece over planes that were not predicted


def test_every_prediction_gets_its_instances_from_the_one_decoding_function(sample, model, monkeypatch):
    calls = []

    def fake_decoder(model, class_map, settings, maps=None, origin=(0, 0)):
        calls.append((class_map.shape, origin, settings.decoder))
        return np.full(class_map.shape, 5, np.uint32)

    monkeypatch.setattr(pipeline, "decode_instances", fake_decoder)
    pieces = list(prediction_run(model, sample.image, "region", z=2, region=(0, 0, 32, 48),
                                 settings=DecoderSettings(decoder="components")))
    assert calls == [((32, 48), (0, 0), "components")]
    assert np.all(pieces[0].instances == 5)
    predict_instances(model, sample.image, DecoderSettings(decoder="watershed"))
    assert calls[1:] == [((96, 96), (0, 0), "watershed")] * 3


def test_the_wise_decoder_is_given_every_setting(sample, model, monkeypatch):
    """The panel's 'wise' objects merge alike seeds as the command line's do (the bug this pipeline
    fixed: the panel called the decoder without the merge similarity)."""
    asked = []
    real = pipeline.wise_instances
    monkeypatch.setattr(pipeline, "wise_instances", lambda *a, **k: asked.append(k) or real(*a, **k))
    next(prediction_run(model, sample.image, "plane", z=1, settings=prediction_settings("wise")))
    assert asked == [{"min_size": min_object_sizes(model), "merge_similarity": 0.5, "shape_seeds": False,
                      "split_depth": 2.0}]
    settings = DecoderSettings(decoder="wise", min_size=7, merge_similarity=None, shape_seeds=True, split_depth=3.0)
    next(prediction_run(model, sample.image, "region", z=1, region=(0, 0, 40, 40), settings=settings))
    assert asked[1] == {"min_size": 7, "merge_similarity": None, "shape_seeds": True, "split_depth": 3.0}


def test_the_learned_wise_decoder_gives_instances_of_the_region_inside_instance_classes(sample, model):
    assert model.has_instance_heads
    piece = next(prediction_run(model, sample.image, "region", z=1, region=(8, 16, 72, 80),
                                settings=prediction_settings("wise")))
    assert piece.instances.dtype == np.uint32 and piece.instances.shape == (64, 64)
    instance_ids = [c.id for c in model.classes if c.instances]
    assert not np.any(piece.instances[~np.isin(piece.semantic, instance_ids)])
    ids = np.unique(piece.instances)
    assert list(ids[ids > 0]) == list(range(1, len(ids[ids > 0]) + 1))  # consecutive ids


def test_the_wise_decoder_predicts_a_whole_plane_once(sample, model, monkeypatch):
    """For a plane, the 'wise' decoder's instance maps also give the semantic prediction (the same
    classes as predict_plane): the network runs over the plane once, not twice."""
    from napari_protoseg.prediction.tiling import predict_plane

    expected = predict_plane(model, sample.image, 1)
    passes = []
    real_maps = pipeline.predict_instance_maps_of_planes
    for name in ("predict_planes", "predict_region", "predict_instance_maps"):
        monkeypatch.setattr(pipeline, name, lambda *a, **k: passes.append("plane"))
    monkeypatch.setattr(pipeline, "predict_instance_maps_of_planes",
                        lambda *a, **k: passes.append("maps") or real_maps(*a, **k))
    piece = next(prediction_run(model, sample.image, "plane", z=1, settings=prediction_settings("wise")))
    assert passes == ["maps"]
    np.testing.assert_array_equal(piece.semantic, expected.classes)
    np.testing.assert_allclose(piece.confidence, expected.confidence, atol=1e-6)
    instance_ids = [c.id for c in model.classes if c.instances]
    assert not np.any(piece.instances[~np.isin(piece.semantic, instance_ids)])


def test_the_wise_decoder_explains_that_it_needs_instance_heads_before_predicting(sample):
    *_, last = training_run(sample.image, sample.annotations, replace(TINY, steps=1, instance_heads=False))
    with pytest.raises(PredictionError, match="needs a model with instance heads, which only a model trained with "
                                              "a class flagged as instances has"):
        prediction_run(last.event.model, sample.image, "plane", z=0, settings=prediction_settings("wise"))


def test_bad_scopes_planes_regions_and_class_maps_are_refused_when_the_run_is_made(sample, model):
    with pytest.raises(PredictionError, match="scope must be one of plane, region, stack"):
        prediction_run(model, sample.image, "volume")
    with pytest.raises(PredictionError, match="give the plane z of the 3-plane stack"):
        prediction_run(model, sample.image, "plane", z=3)
    with pytest.raises(PredictionError, match="holds no pixel"):
        prediction_run(model, sample.image, "region", z=0, region=(100, 0, 120, 10))
    with pytest.raises(PredictionError, match="class_map has shape"):
        prediction_run(model, sample.image, class_map=np.zeros((3, 10, 10), np.uint8))
