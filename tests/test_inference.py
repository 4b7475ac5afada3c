"""Tests of tiled prediction (napari_protoseg.prediction.tiling); tiny networks, pure NumPy/PyTorch, no Qt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from napari_protoseg.prediction import tiling as inference
from napari_protoseg.model.inputs import Normalization, plane_with_context
from napari_protoseg.prediction.tiling import (
    PlanePrediction,
    predict_plane,
    predict_region,
    predict_volume,
    receptive_radius,
    tile_layout,
)
from napari_protoseg.model.network import ModelConfig, ProtoSegNet
from napari_protoseg.model.file import TrainedModel
from napari_protoseg.annotations.project import ClassInfo

CLASSES = [ClassInfo(1, "cytoplasm"), ClassInfo(3, "membrane"), ClassInfo(7, "mitochondrion")]
# The plain full-resolution network without context heads that these tests were written for (a
# bare ModelConfig's defaults before configuration version 2).
PLAIN = dict(input_scale=1, localization_context=0, embedding_context=0, instance_coordinates=0.0)


def make_model(norm="group", context=0, depth=2, classes=CLASSES, seed=0, input_scale=1) -> TrainedModel:
    torch.manual_seed(seed)
    config = ModelConfig(n_classes=len(classes), in_channels=2 * context + 1, base_width=4, depth=depth,
                         embed_dim=8, norm=norm, **{**PLAIN, "input_scale": input_scale})
    net = ProtoSegNet(config)
    with torch.no_grad():  # BatchNorm running statistics that are not the identity
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return TrainedModel(net=net.eval(), classes=list(classes), normalization=Normalization(20.0, 220.0),
                        context=context)


def smooth_image(shape, seed=0, sigma=2.0) -> np.ndarray:
    """A blurred noise image in 0..255 (uint8), EM-like enough to give varied predictions."""
    rng = np.random.default_rng(seed)
    sig = (0,) * (len(shape) - 2) + (sigma, sigma)
    image = ndi.gaussian_filter(rng.random(shape), sig)
    image = (image - image.min()) / (image.max() - image.min())
    return (image * 255).astype(np.uint8)


def direct_probabilities(model: TrainedModel, channels: np.ndarray) -> np.ndarray:
    """The network applied to a whole (2k+1, Y, X) input at once: the untiled reference."""
    x = torch.from_numpy(model.normalization(channels)[None])
    with torch.no_grad():
        return torch.softmax(model.net.eval()(x)["logits"], dim=1)[0].numpy()


def check_prediction(pred: PlanePrediction, class_ids=(1, 3, 7)):
    probs = pred.probabilities
    assert probs.dtype == np.float32 and pred.confidence.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    lut = np.asarray(class_ids)
    np.testing.assert_array_equal(pred.classes, lut[np.argmax(probs, axis=0)])
    np.testing.assert_array_equal(pred.confidence, probs.max(axis=0))
    assert pred.confidence.min() >= 1.0 / len(class_ids) - 1e-6 and pred.confidence.max() <= 1.0 + 1e-6


# ------------------------------------------------------------------------------ geometry


@pytest.mark.parametrize("depth", [1, 2])
def test_receptive_radius_matches_input_gradients(depth):
    model = make_model(norm="batch", depth=depth)
    net = model.net
    radius = 0
    for offset in range(2 ** depth):  # the pooling grid makes the reach depend on the position
        x = torch.randn(1, 1, 128, 128, requires_grad=True)
        c = 64 + offset
        net(x)["logits"][0, :, c, c].sum().backward()
        ys, xs = np.nonzero(x.grad[0, 0].numpy())
        radius = max(radius, np.abs(ys - c).max(), np.abs(xs - c).max())
    assert radius == receptive_radius(model.net.config)
    assert receptive_radius(ModelConfig(n_classes=2, depth=3, **PLAIN)) == 51
    assert receptive_radius(ModelConfig(n_classes=2, depth=4, **PLAIN)) == 107


@pytest.mark.parametrize("depth", [1, 2])
def test_receptive_radius_of_a_half_resolution_network_matches_input_gradients(depth):
    """At input_scale 2 the reach doubles, plus one network pixel for the bilinear upsampling."""
    model = make_model(norm="batch", depth=depth, input_scale=2)
    radius = 0
    for offset in range(2 * 2 ** depth):  # pooling grid of the input scale and of the U-Net
        x = torch.randn(1, 1, 160, 160, requires_grad=True)
        c = 80 + offset
        model.net(x)["logits"][0, :, c, c].sum().backward()
        ys, xs = np.nonzero(x.grad[0, 0].numpy())
        radius = max(radius, np.abs(ys - c).max(), np.abs(xs - c).max())
    assert radius == receptive_radius(model.net.config) == 2 * (7 * 2 ** depth - 4)


def test_tile_layout_covers_with_overlap():
    for length in list(range(1, 200, 7)) + [511, 512, 513, 1000, 1024, 1025, 4097]:
        for tile, overlap, multiple in [(512, 64, 8), (64, 16, 4), (100, 10, 4), (64, 60, 8), (32, 0, 8)]:
            ys, _, (th, _) = tile_layout((length, 5), tile, overlap, multiple)
            if length <= max(2 * multiple, tile // multiple * multiple):
                assert ys == [0] and th == length
                continue
            assert th % multiple == 0 and th <= max(tile, 2 * multiple)
            assert all(y % multiple == 0 for y in ys)
            assert ys[0] == 0 and ys[-1] + th >= length and ys[-1] + th - length < multiple
            gaps = np.diff(ys)
            assert (gaps > 0).all()
            assert (th - gaps >= min(overlap, th - multiple)).all()  # consecutive tiles overlap enough


def test_tile_is_shrunk_to_the_tile_count():
    # 1024 needs 3 tiles of 512 at overlap 64; 3 tiles of 384 do the same job with less work.
    ys, xs, size = tile_layout((1024, 1024), 512, 64, 8)
    assert size == (384, 384) and ys == [0, 320, 640]


def test_window_is_positive_and_flat_at_image_border():
    w = inference._window(100, 64, True, True)
    assert w.min() > 0 and w.max() == 1
    np.testing.assert_allclose(w, w[::-1])
    assert (w[:16] <= 1e-5).all()  # outer quarter of the overlap: the neighbour takes over
    flat = inference._window(100, 64, False, False)
    assert (flat == 1).all()


# ----------------------------------------------------------------- tiled vs untiled


@pytest.mark.parametrize("shape", [(200, 260), (203, 257)])
@pytest.mark.parametrize("tile,overlap", [(128, 96), (64, 32), (100, 40)])
def test_tiled_equals_whole_image_prediction(shape, tile, overlap):
    """With BatchNorm (running statistics in eval mode) the network is local, with a receptive
    radius of 23 px at depth 2. Tiles start on the network's pooling grid and the window gives a
    tile's outer quarter of the overlap ~zero weight, so with overlap / 4 >= 23 the tiled result is
    the whole-image forward up to float rounding; smaller overlaps leave only the (tiny) influence
    of the farthest pixels of the receptive field."""
    model = make_model(norm="batch")
    image = smooth_image(shape)
    ys, xs, _ = tile_layout(shape, tile, overlap, 4)
    assert len(ys) > 1 and len(xs) > 2
    pred = predict_plane(model, image, tile=tile, overlap=overlap)
    reference = direct_probabilities(model, image[None])
    tolerance = 1e-5 if overlap >= 4 * 23 else 1e-3
    assert np.abs(pred.probabilities - reference).max() < tolerance
    check_prediction(pred)


@pytest.mark.parametrize("shape", [(300, 420), (303, 417)])
def test_tiled_equals_whole_image_prediction_at_half_resolution(shape):
    """A network at input_scale 2 places its tiles on its own grid (2 x 2 ** depth), so tiles with
    overlap / 4 >= its receptive radius (2 x 24 px) give the whole-image forward."""
    model = make_model(norm="batch", input_scale=2)
    assert model.net.multiple == 8
    overlap = 4 * receptive_radius(model.net.config)
    image = smooth_image(shape)
    ys, xs, _ = tile_layout(shape, 256, overlap, 8)
    assert len(ys) > 1 and len(xs) > 2
    pred = predict_plane(model, image, tile=256, overlap=overlap)
    reference = direct_probabilities(model, image[None])
    assert reference.shape[-2:] == shape
    assert np.abs(pred.probabilities - reference).max() < 1e-5
    check_prediction(pred)


def test_no_seams_with_groupnorm_tiles():
    """GroupNorm normalises with each tile's statistics, so tiles disagree a little; the blending
    must not show this as jumps at tile borders (pasting tiles side by side does)."""
    model = make_model(norm="group")
    image = smooth_image((128, 320), sigma=3)
    pred = predict_plane(model, image, tile=96, overlap=32)
    _, xs, (_, tw) = tile_layout(image.shape, 96, 32, 4)

    def column_jumps(probs):
        return np.abs(np.diff(probs, axis=2)).mean(axis=(0, 1))

    jumps = column_jumps(pred.probabilities)
    typical = np.median(jumps)
    edges = sorted({x - 1 for x in xs[1:]} | {x + tw - 1 for x in xs[:-1]})
    assert jumps[edges].max() < 1.6 * typical
    assert jumps[8:-8].max() < 2.5 * typical  # (the image border itself has strong effects)
    # The same measure does see seams when tiles are pasted without overlap.
    pasted = np.concatenate([direct_probabilities(model, image[None, :, x:x + 64])
                             for x in range(0, 320, 64)], axis=2)
    pasted_jumps = column_jumps(pasted)
    assert pasted_jumps[[63, 127, 191, 255]].mean() > 2 * np.median(pasted_jumps)


@pytest.mark.parametrize("shape", [(40, 56), (37, 21), (5, 7), (1, 9)])
def test_image_smaller_than_tile(shape):
    model = make_model()
    image = smooth_image(shape)
    pred = predict_plane(model, image, tile=64, overlap=16)
    assert pred.probabilities.shape == (3, *shape)
    np.testing.assert_allclose(pred.probabilities, direct_probabilities(model, image[None]), atol=1e-6)
    check_prediction(pred)


def test_one_axis_longer_than_tile():
    model = make_model(norm="batch")
    image = smooth_image((30, 301))
    pred = predict_plane(model, image, tile=128, overlap=96)
    assert pred.classes.shape == (30, 301)
    np.testing.assert_allclose(pred.probabilities, direct_probabilities(model, image[None]), atol=1e-5)


def test_batch_size_does_not_change_the_result():
    model = make_model()
    image = smooth_image((150, 170))
    a = predict_plane(model, image, tile=64, overlap=16, batch_size=1)
    b = predict_plane(model, image, tile=64, overlap=16, batch_size=7)
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-4)  # other conv kernels


# ------------------------------------------------------------------- 3D and 2.5D context


@pytest.mark.parametrize("z", [0, 1, 3, 4])
def test_stack_plane_with_context(z):
    model = make_model(context=1)
    volume = smooth_image((5, 48, 40))
    pred = predict_plane(model, volume, z=z, tile=64, overlap=16)
    reference = direct_probabilities(model, plane_with_context(volume, z, 1))
    np.testing.assert_allclose(pred.probabilities, reference, atol=1e-6)
    check_prediction(pred)


def test_plane_with_context_model_on_2d_image():
    model = make_model(context=2)
    image = smooth_image((40, 44))
    pred = predict_plane(model, image, tile=64, overlap=16)
    np.testing.assert_allclose(pred.probabilities, direct_probabilities(model, plane_with_context(image, 0, 2)),
                               atol=1e-6)


def test_tiled_stack_with_context_equals_whole():
    model = make_model(norm="batch", context=1)
    volume = smooth_image((3, 150, 130))
    pred = predict_plane(model, volume, z=2, tile=128, overlap=96)
    reference = direct_probabilities(model, plane_with_context(volume, 2, 1))
    assert np.abs(pred.probabilities - reference).max() < 1e-5


def test_argument_checks():
    model = make_model()
    volume = smooth_image((3, 20, 20))
    with pytest.raises(ValueError, match="give the plane index z"):
        predict_plane(model, volume)
    with pytest.raises(ValueError, match="outside the stack"):
        predict_plane(model, volume, z=3)
    with pytest.raises(ValueError, match="2D plane"):
        predict_plane(model, volume[0], z=1)
    with pytest.raises(ValueError, match="shape"):
        predict_plane(model, np.zeros((2, 3, 20, 20)), z=0)
    with pytest.raises(ValueError, match="smaller than the tile"):
        predict_plane(model, volume[0], tile=32, overlap=32)
    with pytest.raises(ValueError, match="batch_size"):
        predict_volume(model, volume, batch_size=0)


# ------------------------------------------------------------------------- class ids


def test_class_ids_not_indices():
    model = make_model()
    pred = predict_plane(model, smooth_image((60, 70)), tile=64, overlap=16)
    assert pred.classes.dtype == np.uint8
    assert set(np.unique(pred.classes)) <= {1, 3, 7}
    assert len(np.unique(pred.classes)) >= 2  # the test image does give several classes
    assert pred.class_ids == [1, 3, 7]
    check_prediction(pred)


def test_large_class_ids_use_wider_dtype():
    classes = [ClassInfo(2, "a"), ClassInfo(300, "b")]
    model = make_model(classes=classes)
    pred = predict_plane(model, smooth_image((30, 30)), tile=64, overlap=16)
    assert pred.classes.dtype == np.uint16
    assert set(np.unique(pred.classes)) <= {2, 300}


def test_train_mode_is_restored():
    model = make_model()
    model.net.train()
    predict_plane(model, smooth_image((20, 20)), tile=64, overlap=16)
    assert model.net.training
    model.net.eval()
    predict_plane(model, smooth_image((20, 20)), tile=64, overlap=16)
    assert not model.net.training


def test_prediction_does_not_track_gradients():
    model = make_model()
    before = [p.detach().clone() for p in model.net.parameters()]
    predict_plane(model, smooth_image((20, 20)), tile=64, overlap=16)
    assert all(p.grad is None for p in model.net.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.net.parameters()))


# -------------------------------------------------------------------------- regions


def test_region_matches_whole_plane():
    model = make_model(norm="batch", context=1)
    volume = smooth_image((3, 240, 200))
    whole = predict_plane(model, volume, z=1, tile=128, overlap=96)
    region = predict_region(model, volume, 1, 100, 90, 160, 170, tile=128, overlap=96)
    assert region.origin == (100, 90)
    assert region.probabilities.shape == (3, 60, 80)
    sub = whole.probabilities[:, 100:160, 90:170]
    assert np.abs(region.probabilities - sub).max() < 1e-5
    np.testing.assert_array_equal(region.classes, whole.classes[100:160, 90:170])
    check_prediction(region)


def test_region_with_groupnorm_is_close_to_whole_plane():
    model = make_model(norm="group")
    image = smooth_image((200, 200))
    whole = predict_plane(model, image, tile=128, overlap=64)
    region = predict_region(model, image, None, 60, 70, 140, 150, tile=128, overlap=64)
    agree = (region.classes == whole.classes[60:140, 70:150]).mean()
    assert agree > 0.9


def test_region_is_clipped_to_the_image():
    model = make_model()
    image = smooth_image((50, 60))
    region = predict_region(model, image, None, -10, 40, 20, 100, margin=0)
    assert region.origin == (0, 40) and region.classes.shape == (20, 20)
    with pytest.raises(ValueError, match="no pixel"):
        predict_region(model, image, None, 60, 0, 80, 10)


class RecordingArray:
    """A lazy (Z, Y, X) array: records what is read; converting it whole is an error."""

    def __init__(self, data: np.ndarray):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.reads = []

    def __getitem__(self, key):
        part = self.data[key]
        self.reads.append((key, part.size))
        return part

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole lazy volume was converted to an array")


def test_region_reads_only_region_and_margin():
    model = make_model(context=1)
    volume = RecordingArray(smooth_image((6, 400, 400)))
    pred = predict_region(model, volume, 3, 100, 120, 150, 160, margin=20, tile=64, overlap=16)
    assert pred.classes.shape == (50, 40)
    assert {key[0] for key, _ in volume.reads} == {2, 3, 4}
    assert max(size for _, size in volume.reads) <= 90 * 80


# --------------------------------------------------------------------------- volumes


def test_volume_in_memory_equals_plane_predictions():
    model = make_model(context=1)
    volume = smooth_image((4, 70, 90))
    calls = []
    result = predict_volume(model, volume, progress=lambda d, t: calls.append((d, t)), tile=64,
                            overlap=16, keep_probabilities=True)
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert result.complete and not result.stopped and result.planes_done == 4
    assert result.classes.shape == volume.shape and result.classes.dtype == np.uint8
    assert result.probabilities.shape == (3, 4, 70, 90)
    for z in range(4):
        plane = predict_plane(model, volume, z=z, tile=64, overlap=16)
        np.testing.assert_array_equal(result.classes[z], plane.classes)
        np.testing.assert_array_equal(result.confidence[z], plane.confidence)
        np.testing.assert_array_equal(result.probabilities[:, z], plane.probabilities)


def test_volume_of_a_2d_image():
    model = make_model()
    image = smooth_image((70, 150))
    calls = []
    result = predict_volume(model, image, progress=lambda d, t: calls.append((d, t)), tile=64, overlap=16)
    plane = predict_plane(model, image, tile=64, overlap=16)
    assert calls == [(1, 1)]
    assert result.probabilities is None
    np.testing.assert_array_equal(result.classes, plane.classes)
    np.testing.assert_array_equal(result.confidence, plane.confidence)


def test_dask_input_equals_numpy():
    da = pytest.importorskip("dask.array")
    model = make_model(context=1)
    volume = smooth_image((3, 80, 100))
    expected = predict_volume(model, volume, tile=64, overlap=16)
    lazy = da.from_array(volume, chunks=(1, 40, 50))
    got = predict_volume(model, lazy, tile=64, overlap=16)
    np.testing.assert_array_equal(got.classes, expected.classes)
    np.testing.assert_array_equal(got.confidence, expected.confidence)
    plane = predict_plane(model, lazy, z=0, tile=64, overlap=16)
    np.testing.assert_array_equal(plane.classes, expected.classes[0])


@pytest.mark.parametrize("cache", [True, False])
def test_lazy_volume_is_read_plane_by_plane(monkeypatch, cache):
    if not cache:  # planes too big to hold: read row band by row band
        monkeypatch.setattr(inference, "_PLANE_CACHE_BYTES", 0)
    model = make_model(context=1)
    data = smooth_image((5, 150, 60))
    lazy = RecordingArray(data)
    got = predict_volume(model, lazy, tile=64, overlap=16)
    expected = predict_volume(model, data, tile=64, overlap=16)
    np.testing.assert_array_equal(got.classes, expected.classes)
    plane_size = 150 * 60
    assert all(isinstance(key, tuple) or np.ndim(key) == 0 for key, _ in lazy.reads)
    assert max(size for _, size in lazy.reads) <= plane_size
    if cache:
        assert len(lazy.reads) == 5  # each plane read once, whole
    else:
        assert max(size for _, size in lazy.reads) < plane_size


def test_zarr_output_round_trip(tmp_path):
    zarr = pytest.importorskip("zarr")
    model = make_model(context=1)
    volume = smooth_image((3, 70, 90))
    expected = predict_volume(model, volume, tile=64, overlap=16, keep_probabilities=True)
    out = tmp_path / "prediction.zarr"
    result = predict_volume(model, volume, out=out, tile=64, overlap=16, keep_probabilities=True)
    assert result.group is not None
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group["classes"][:], expected.classes)
    np.testing.assert_array_equal(group["confidence"][:], expected.confidence)
    np.testing.assert_array_equal(group["probabilities"][:], expected.probabilities)
    assert group["classes"].dtype == np.uint8
    info = group.attrs["napari_protoseg"]
    assert info["complete"] is True and info["planes_done"] == 3 and info["planes_total"] == 3
    assert [c["id"] for c in info["classes"]] == [1, 3, 7]
    # A second run into the same group replaces the arrays and drops the stale probabilities.
    predict_volume(model, volume[:, :50], out=out, tile=64, overlap=16)
    group = zarr.open_group(str(out), mode="r")
    assert group["classes"].shape == (3, 50, 90) and "probabilities" not in group


def test_zarr_output_into_group_and_lazy_input(tmp_path):
    zarr = pytest.importorskip("zarr")
    model = make_model()
    volume = smooth_image((2, 60, 50))
    source = zarr.open_array(str(tmp_path / "image.zarr"), mode="w", shape=volume.shape,
                             chunks=(1, 32, 32), dtype=volume.dtype)
    source[:] = volume
    group = zarr.group(store=zarr.storage.MemoryStore())
    result = predict_volume(model, source, out=group, tile=64, overlap=16)
    expected = predict_volume(model, volume, tile=64, overlap=16)
    np.testing.assert_array_equal(result.classes[:], expected.classes)
    np.testing.assert_array_equal(group["confidence"][:], expected.confidence)


def test_zarr_output_of_tall_plane_is_written_in_chunk_rows(tmp_path):
    """Rows arrive in bands of the tile stride; they are buffered to whole 1024-row chunks."""
    zarr = pytest.importorskip("zarr")
    model = make_model()
    image = smooth_image((2100, 24))
    expected = predict_volume(model, image, tile=256, overlap=32, keep_probabilities=True)
    predict_volume(model, image, out=tmp_path / "tall.zarr", tile=256, overlap=32, keep_probabilities=True)
    group = zarr.open_group(str(tmp_path / "tall.zarr"), mode="r")
    assert group["classes"].chunks == (1024, 24)
    np.testing.assert_array_equal(group["classes"][:], expected.classes)
    np.testing.assert_array_equal(group["probabilities"][:], expected.probabilities)


def test_stop_between_planes(tmp_path):
    zarr = pytest.importorskip("zarr")
    model = make_model()
    volume = smooth_image((5, 40, 40))
    done = []
    result = predict_volume(model, volume, out=tmp_path / "p.zarr", progress=lambda d, t: done.append(d),
                            stop=lambda: len(done) >= 2, tile=64, overlap=16)
    assert result.stopped and not result.complete and result.planes_done == 2
    full = predict_volume(model, volume, tile=64, overlap=16)
    classes = result.classes[:]
    np.testing.assert_array_equal(classes[:2], full.classes[:2])
    assert (classes[2:] == 0).all()  # 0 = not predicted
    info = zarr.open_group(str(tmp_path / "p.zarr"), mode="r").attrs["napari_protoseg"]
    assert info["complete"] is False and info["planes_done"] == 2


def test_stop_inside_a_plane():
    model = make_model()
    image = smooth_image((300, 40))
    checks = []

    def stop():
        checks.append(1)
        return len(checks) > 2  # before the plane, before tile row 1: go on; then stop

    result = predict_volume(model, image, stop=stop, tile=64, overlap=16)
    assert result.stopped and result.planes_done == 0
    rows_done = np.nonzero(result.classes.any(axis=1))[0]
    assert 0 < len(rows_done) < 300  # the finished rows of the first tile row are kept


def test_stop_before_start():
    model = make_model()
    result = predict_volume(model, smooth_image((2, 20, 20)), stop=lambda: True)
    assert result.stopped and result.planes_done == 0 and (result.classes == 0).all()


# ------------------------------------------------------------------------- instance outputs


def make_instance_model(seed=0, norm="batch", coordinates=0.0) -> TrainedModel:
    torch.manual_seed(seed)
    classes = [ClassInfo(1, "cytoplasm"), ClassInfo(3, "membrane"), ClassInfo(7, "mitochondrion", instances=True)]
    config = ModelConfig(n_classes=3, base_width=4, depth=2, embed_dim=8, norm=norm, n_instance_classes=1,
                         instance_embed_dim=4, **{**PLAIN, "instance_coordinates": coordinates})
    return TrainedModel(net=ProtoSegNet(config).eval(), classes=classes, normalization=Normalization(20.0, 220.0))


@pytest.mark.parametrize("coordinates", [0.0, 0.25])
def test_instance_maps_are_tiled_like_the_semantic_prediction_and_match_a_whole_plane_forward(coordinates):
    """predict_instance_maps blends localization and embedding with the semantic windows: its
    classes equal predict_plane's, and with BatchNorm and enough overlap every output equals a
    forward pass over the whole plane; embeddings are kept on the instance class and a ring around it.
    A spatial embedding's positions count from the plane's corner in every tile."""
    from napari_protoseg.prediction.tiling import predict_instance_maps

    model = make_instance_model(coordinates=coordinates)
    image = smooth_image((2, 150, 300), seed=4)
    with torch.no_grad():  # prototypes that split the plane between classes 1 and 7 (an untrained net says 1 class)
        e = model.net(torch.from_numpy(model.normalization(image[1][None, None])))["embedding"][0].reshape(8, -1)
        mean = e.mean(1)
        u = torch.linalg.svd(e - mean[:, None], full_matrices=False)[0][:, 0]
        u = u - (u @ mean) / (mean @ mean) * mean
        model.net.prototypes[0] = -u
        model.net.prototypes[1] = -mean
        model.net.prototypes[2] = u
    maps = predict_instance_maps(model, image, 1, tile=128, overlap=96)  # overlap / 4 >= receptive radius 23
    semantic = predict_plane(model, image, 1, tile=128, overlap=96)
    np.testing.assert_array_equal(maps.classes, semantic.classes)
    np.testing.assert_allclose(maps.confidence, semantic.confidence, atol=1e-6)
    with torch.no_grad():
        whole = model.net(torch.from_numpy(model.normalization(image[1][None, None])))
    # (Except the last row and column: tiles reaching past the image's bottom/right edge show the
    # heads' 3x3 convolution the reflected image where a whole-plane forward has zero padding.)
    np.testing.assert_allclose(maps.localization[:, :-1, :-1],
                               torch.sigmoid(whole["localization"])[0, :, :-1, :-1].numpy(), atol=1e-5)
    region = maps.classes == 7
    assert region.any() and maps.embedding.available()[region].all()
    assert maps.embedding.available()[ndi.binary_dilation(region, iterations=3)].all()
    assert not maps.embedding.available().all()  # far from the class: not kept
    flat = np.flatnonzero(region[:-1, :-1])
    flat = (flat // (region.shape[1] - 1)) * region.shape[1] + flat % (region.shape[1] - 1)
    expected = whole["instance_embedding"][0].numpy().reshape(4, -1)[:, flat].T
    np.testing.assert_allclose(maps.embedding.at(flat), expected, atol=1e-2)  # float16 storage


class _BlobNet(torch.nn.Module):
    """A stand-in network with instance heads: class index 2 where the (normalised) input is above
    0.5, localization blobs where it is above 0.7, embedding = pixel coordinates / 8."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig(n_classes=3, base_width=4, depth=2, embed_dim=8, n_instance_classes=1,
                                  instance_embed_dim=2, **PLAIN)
        self.multiple = 4
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, instance_batch=None):
        v = x[:, :1]
        logits = torch.cat([10 * (0.5 - v), torch.full_like(v, -5.0), 10 * (v - 0.5)], dim=1)
        h, w = x.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype), indexing="ij")
        coords = torch.stack([yy, xx])[None].expand(len(x), 2, h, w) / 8
        return {"logits": logits, "embedding": logits, "localization": 20 * (v - 0.7), "instance_embedding": coords}


def test_predict_instances_with_the_wise_decoder_gives_unique_ids_on_the_instance_class_only():
    from napari_protoseg.prediction.pipeline import DecoderSettings, predict_instances

    classes = [ClassInfo(1, "cytoplasm"), ClassInfo(3, "membrane"), ClassInfo(7, "mitochondrion", instances=True)]
    model = TrainedModel(net=_BlobNet(), classes=classes, normalization=Normalization(0.0, 255.0))
    image = smooth_image((3, 64, 80), seed=5, sigma=4.0)
    result = predict_instances(model, image, DecoderSettings(decoder="wise", min_size=4), tile=128, overlap=16)
    assert result.decoder == "wise" and result.labels.shape == image.shape and result.labels.dtype == np.uint32
    assert np.all(result.classes[result.labels > 0] == 7)
    ids = [set(np.unique(p[p > 0]).tolist()) for p in result.labels]
    assert all(ids) and ids[0].isdisjoint(ids[1]) and ids[1].isdisjoint(ids[2])
    # Every part of the class region is an object, or one per blob where it holds several.
    for z in range(3):
        parts, n_parts = ndi.label(image[z] / 255.0 > 0.5)
        blobs, _ = ndi.label(image[z] / 255.0 > 0.7)
        most = sum(max(1, len(np.unique(blobs[(parts == p) & (blobs > 0)]))) for p in range(1, n_parts + 1))
        large = int(np.count_nonzero(np.bincount(parts.ravel())[1:] >= 4))
        assert large <= len(ids[z]) <= most, (z, large, len(ids[z]), most)
    linked = predict_instances(model, image, DecoderSettings(decoder="wise", min_size=4, link_3d=True), tile=128,
                               overlap=16)
    assert linked.linked_3d and len(np.unique(linked.labels)) <= len(np.unique(result.labels))
    plane = predict_instances(model, image[0], DecoderSettings(decoder="wise", min_size=4), tile=128, overlap=16)
    np.testing.assert_array_equal(plane.labels > 0, result.labels[0] > 0)
    # unasked, even a model with instance heads gets the decoder the benchmark measures best
    assert predict_instances(model, image[0], tile=128, overlap=16).decoder == "components"
    with pytest.raises(ValueError, match="no instance heads"):
        inference.predict_instance_maps(make_model(), image, 0)


# ----------------------------------------------------------------- test-time augmentation


def _square_symmetry(array: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """``array`` (..., H, W) mirrored left-right, then turned ``turns`` quarter turns (as the TTA)."""
    array = array[..., ::-1] if mirror else array
    return np.ascontiguousarray(np.rot90(array, turns, axes=(-2, -1)))


def _square_symmetry_undone(array: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    array = np.rot90(array, -turns, axes=(-2, -1))
    return np.ascontiguousarray(array[..., ::-1] if mirror else array)


def test_test_time_augmentation_averages_the_eight_symmetries_of_the_square():
    """tta=True is the mean of the softmax over the 8 rotated/mirrored inputs, each turned back:
    tiled (BatchNorm, overlap / 4 >= receptive radius) it equals that mean of whole-image forwards."""
    model = make_model(norm="batch")
    image = smooth_image((200, 260), seed=3)
    pred = predict_plane(model, image, tile=128, overlap=96, tta=True)
    expected = np.mean([_square_symmetry_undone(direct_probabilities(model, _square_symmetry(image, t, m)[None]), t, m)
                        for t, m in inference.TTA_TRANSFORMS], axis=0)
    assert len(inference.TTA_TRANSFORMS) == 8
    np.testing.assert_allclose(pred.probabilities, expected, atol=1e-5)
    check_prediction(pred)
    plain = predict_plane(model, image, tile=128, overlap=96)
    assert np.abs(plain.probabilities - pred.probabilities).max() > 1e-3  # it is not the plain pass


@pytest.mark.parametrize("turns,mirror", [(1, False), (2, False), (3, False), (0, True), (1, True)])
def test_test_time_augmentation_makes_the_prediction_turn_with_the_image(turns, mirror):
    """A rotated or mirrored image gets the rotated or mirrored prediction with tta (one tile, so the
    tiling is symmetric too); the plain pass of an untrained network does not."""
    model = make_model()
    image = smooth_image((96, 64), seed=1)
    moved = _square_symmetry(image, turns, mirror)
    with_tta = predict_plane(model, moved, tta=True).probabilities
    np.testing.assert_allclose(with_tta, _square_symmetry(predict_plane(model, image, tta=True).probabilities,
                                                          turns, mirror), atol=1e-5)
    plain = predict_plane(model, moved).probabilities
    assert np.abs(plain - _square_symmetry(predict_plane(model, image).probabilities, turns, mirror)).max() > 1e-3


def test_test_time_augmentation_reaches_volumes_regions_and_instance_maps():
    """predict_volume, predict_region and predict_instance_maps pass tta on: their classes are the
    tta classes of predict_plane; without tta every function keeps the plain pass."""
    from napari_protoseg.prediction.tiling import predict_instance_maps

    model = make_instance_model()
    image = smooth_image((2, 96, 128), seed=6)
    planes = [predict_plane(model, image, z, tta=True) for z in range(2)]
    volume = predict_volume(model, image, tta=True, keep_probabilities=True)
    for z in range(2):
        np.testing.assert_allclose(volume.probabilities[:, z], planes[z].probabilities, atol=1e-6)
    region = predict_region(model, image, 1, 0, 0, 96, 128, tta=True)
    np.testing.assert_allclose(region.probabilities, planes[1].probabilities, atol=1e-6)
    maps = predict_instance_maps(model, image, 1, tta=True)
    np.testing.assert_array_equal(maps.classes, planes[1].classes)
    np.testing.assert_allclose(maps.confidence, planes[1].confidence, atol=1e-6)
    plain = predict_volume(model, image, keep_probabilities=True)
    assert np.abs(plain.probabilities - volume.probabilities).max() > 1e-3
