"""The training engine: it learns, it is deterministic, it stops and resumes, and crops keep
their annotations aligned with the pixels."""

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_protoseg.training.crops import CropSampler
from napari_protoseg.model.inputs import Normalization
from napari_protoseg.prediction.tiling import predict_volume
from napari_protoseg.annotations.project import AnnotationSet, ClassInfo, ProjectError
from napari_protoseg.annotations.synthetic import generate_sample
from napari_protoseg.evaluation.metrics import class_iou
from napari_protoseg.model.migration import CONFIG_VERSION, ConfigVersionError
from napari_protoseg.model.network import ModelConfig
from napari_protoseg.training.engine import CUDA_STEPS, TrainConfig, check_training_input, default_train_config, train

FAST = dict(batch_size=4, crop_size=64, model=ModelConfig(base_width=4, depth=2, embed_dim=8), checkpoint_every=0)


@pytest.fixture(scope="module")
def small_sample():
    return generate_sample((4, 128, 128), seed=3)


def last_event(events):
    event = None
    for event in events:
        pass
    return event


def mean_iou(prediction, truth, class_ids):
    """The mean IoU of the classes in either map."""
    return float(np.nanmean(list(class_iou(prediction, truth, class_ids).values())))


def test_a_short_training_beats_an_untrained_model_by_a_clear_margin(small_sample):
    config = TrainConfig(steps=80, pseudo_label_warmup=40, **FAST)
    ids = small_sample.annotations.class_ids
    untrained = last_event(train(small_sample.image, small_sample.annotations,
                                 TrainConfig(steps=0, **FAST))).model
    trained = last_event(train(small_sample.image, small_sample.annotations, config)).model
    before = mean_iou(predict_volume(untrained, small_sample.image).classes, small_sample.semantic, ids)
    after = mean_iou(predict_volume(trained, small_sample.image).classes, small_sample.semantic, ids)
    # Measured: about 0.05 untrained and 0.3 after 80 steps of this tiny net on 4 x 128 x 128.
    assert after > before + 0.15, (before, after)


def test_a_cuda_gpu_gets_more_default_steps_and_the_cpu_keeps_its_budget(monkeypatch):
    """More steps than the CPU's where training will run on CUDA (same pseudo-label warm-up share);
    the CPU, an unavailable device and explicit changes keep what they ask for."""
    cpu = default_train_config("cpu")
    assert cpu == TrainConfig(device="cpu")
    assert default_train_config("cpu", steps=7, seed=3).steps == 7
    if not torch.cuda.is_available():
        assert default_train_config("auto").steps == TrainConfig().steps
        assert default_train_config("cuda").steps == TrainConfig().steps  # training says it is unavailable
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = default_train_config("auto")
    assert gpu.steps == CUDA_STEPS > TrainConfig().steps and gpu.device == "auto"
    assert gpu.pseudo_label_warmup / gpu.steps == pytest.approx(TrainConfig().pseudo_label_warmup / TrainConfig().steps)
    assert default_train_config("cuda", steps=50).steps == 50
    assert default_train_config("cpu").steps == TrainConfig().steps


def test_training_is_deterministic_on_cpu(small_sample):
    config = TrainConfig(steps=6, pseudo_label_warmup=3, device="cpu", **FAST)
    a = [e.losses for e in train(small_sample.image, small_sample.annotations, config)]
    b = [e.losses for e in train(small_sample.image, small_sample.annotations, config)]
    assert a == b


def test_a_checkpoint_resumes_to_the_same_state_as_an_uninterrupted_run(small_sample, tmp_path):
    config = TrainConfig(steps=8, pseudo_label_warmup=2, device="cpu", **FAST)
    straight = last_event(train(small_sample.image, small_sample.annotations, config)).model

    calls = iter(range(100))
    stopped = last_event(train(small_sample.image, small_sample.annotations, config,
                               checkpoint_path=tmp_path / "run.ckpt", stop=lambda: next(calls) >= 4))
    assert stopped.stopped and stopped.step == 4 and stopped.checkpoint == str(tmp_path / "run.ckpt")
    resumed = last_event(train(small_sample.image, small_sample.annotations, resume=tmp_path / "run.ckpt"))
    assert resumed.finished and resumed.step == 8
    for key, value in straight.net.state_dict().items():
        torch.testing.assert_close(resumed.model.net.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_resuming_refuses_a_checkpoint_that_would_run_code(small_sample, tmp_path, code_running_checkpoint):
    """A checkpoint holding pickled Python objects (an older version's, or a crafted one) is refused with
    a message, never unpickled: the code its unpickling would run does not run."""
    config = TrainConfig(steps=4, device="cpu", **FAST)
    calls = iter(range(100))
    last_event(train(small_sample.image, small_sample.annotations, config,
                     checkpoint_path=tmp_path / "run.ckpt", stop=lambda: next(calls) >= 2))
    path, marker = code_running_checkpoint(torch.load(tmp_path / "run.ckpt", weights_only=True))
    with pytest.raises(ProjectError, match="written by an older version of napari-protoseg") as refused:
        last_event(train(small_sample.image, small_sample.annotations, resume=path))
    assert str(path) in str(refused.value) and "could run code" in str(refused.value)
    assert "Retrain" in str(refused.value)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what resuming did before: unpickling runs the code
    assert marker.exists()


def test_closing_the_generator_keeps_the_last_checkpoint(small_sample, tmp_path):
    config = TrainConfig(steps=50, device="cpu", **FAST)
    events = train(small_sample.image, small_sample.annotations, config, checkpoint_path=tmp_path / "c.ckpt")
    for event in events:
        if event.step == 3:
            break
    events.close()
    state = torch.load(tmp_path / "c.ckpt", weights_only=True)
    assert state["step"] == 3


def test_progress_events_report_eta_losses_and_a_preview(small_sample):
    from napari_protoseg.training.engine import PreviewRequest

    config = TrainConfig(steps=3, **FAST)
    events = list(train(small_sample.image, small_sample.annotations, config,
                        preview=PreviewRequest(z=1, y0=10, x0=20, y1=60, x1=90, every_seconds=0)))
    assert [e.step for e in events] == [1, 2, 3, 3]
    assert events[0].eta > 0 and events[-1].eta == 0
    assert set(events[0].losses) >= {"total", "contrastive", "mask", "box", "point", "tag", "negative", "ce"}
    assert events[0].preview.shape == (50, 70)
    assert set(np.unique(events[0].preview)) <= set(small_sample.annotations.class_ids)
    assert events[-1].finished and events[-1].model is not None


def test_preview_interval_caps_the_time_previews_take():
    from napari_protoseg.training.engine import preview_interval

    assert preview_interval(5.0, 0.2, 0.1) == 5.0  # cheap previews: as often as asked
    assert preview_interval(5.0, 1.2, 0.1) == pytest.approx(10.8)  # 1.2 s of every 12 s
    assert preview_interval(0.0, 0.3, 1.0) == 0.0  # no cap
    with pytest.raises(ValueError, match="max_time_share"):
        preview_interval(5.0, 1.0, 0.0)


def test_slow_previews_come_less_often(small_sample, monkeypatch):
    """A preview that takes long does not slow training down by more than its time share."""
    from napari_protoseg.training import engine as training_module
    from napari_protoseg.training.engine import PreviewRequest

    real = training_module.predict_region

    def slow_region(*args, **kwargs):
        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(training_module, "predict_region", slow_region)
    config = TrainConfig(steps=6, **FAST)

    def previews(share):
        request = PreviewRequest(z=1, y0=10, x0=20, y1=60, x1=90, every_seconds=0, max_time_share=share)
        return sum(e.preview is not None for e in train(small_sample.image, small_sample.annotations, config,
                                                         preview=request))

    assert previews(1.0) == 6  # uncapped: one per step, as asked
    # capped at 1 %: each 0.3 s preview is followed by at least 29.7 s without one
    assert previews(0.01) == 1


@pytest.mark.parametrize("change, message", [
    (lambda image, ann: (image, AnnotationSet(ann.image_shape, ann.classes)), "nothing is annotated yet"),
    (lambda image, ann: (image, AnnotationSet(ann.image_shape, ann.classes[:1], masks=(ann.masks == 1).astype(np.uint8))),
     "only one class"),
    (lambda image, ann: (image[:, :, :-1], ann), "but the image has shape"),
    (lambda image, ann: (np.zeros((64, 64, 3), np.uint8), ann), "RGB"),
])
def test_bad_training_input_is_refused_with_a_message(small_sample, change, message):
    image, annotations = change(small_sample.image, small_sample.annotations)
    assert any(message in str(p) for p in check_training_input(image, annotations))
    with pytest.raises(ProjectError, match=message):
        next(train(image, annotations, TrainConfig(steps=1, **FAST)))


def test_crops_keep_boxes_points_and_tags_aligned_with_the_pixels():
    """After random crops, rotations and flips, every point still lies on its class in the mask,
    every whole box is tight around its object, and tag regions cover what they say."""
    semantic = np.ones((2, 40, 50), np.uint8)
    semantic[:, 5:12, 8:20] = 2
    semantic[:, 25:33, 30:37] = 2
    boxes = [(z, 5, 8, 12, 20, 2, True) for z in range(2)] + [(z, 25, 30, 33, 37, 2, True) for z in range(2)]
    points = [(1, 7, 10, 2, True), (1, 30, 5, 1, False)]
    tags = [(0, 2, True, 0, 0, 20, 24), (0, 2, False, 20, 0, 40, 25)]
    annotations = AnnotationSet((2, 40, 50), [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=None,
                                boxes=boxes, points=points, tags=tags)
    image = semantic.astype(np.float32)
    sampler = CropSampler(image, annotations, Normalization(0.0, 2.0), crop_size=32, jitter=False)
    rng = np.random.default_rng(0)
    for _ in range(30):
        x, t = sampler.sample(4, rng)
        truth = (x[:, 0] * 2).round().long() - 1  # the image is the class map: index 0 or 1
        for b, c, y, xx in t.points.tolist():
            assert truth[b, y, xx] == c
        for b, c, y0, x0, y1, x1, whole in t.boxes.tolist():
            region = truth[b, y0:y1, x0:x1] == c
            if whole:
                assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()
                assert region.all()
        for b, c, present, y0, x0, y1, x1 in t.tags.tolist():
            assert bool((truth[b, y0:y1, x0:x1] == c).any()) == bool(present)


@pytest.mark.parametrize("steps", [1, 2, 10])
def test_any_step_count_trains(small_sample, steps):
    event = last_event(train(small_sample.image, small_sample.annotations, TrainConfig(steps=steps, **FAST)))
    assert event.finished and event.step == steps


# ------------------------------------------------------------------ instance heads (WISE-Net)


def points_only(sample, stuff_points=10, seed=0):
    """One exhaustive point at a random pixel of every mitochondrion, ``stuff_points`` random points
    of every other class per plane (the benchmark's points-only setting, on the synthetic sample)."""
    from napari_protoseg.annotations.project import POINT_DTYPE

    rng = np.random.default_rng(seed)
    rows = []
    for z in range(sample.image.shape[0]):
        instances = sample.instances[z]
        for i in np.unique(instances[instances > 0]):
            ys, xs = np.nonzero(instances == i)
            j = rng.integers(len(ys))
            rows.append((z, ys[j], xs[j], 3, True))
        for cid in (1, 2, 4):
            ys, xs = np.nonzero(sample.semantic[z] == cid)
            for j in rng.choice(len(ys), size=min(stuff_points, len(ys)), replace=False):
                rows.append((z, ys[j], xs[j], cid, False))
    return AnnotationSet(sample.image.shape, sample.annotations.classes, points=np.array(rows, POINT_DTYPE))


@pytest.fixture(scope="module")
def mito_sample():
    return generate_sample((4, 256, 256), seed=1)


# Seeded decoding of the true mitochondrion mask (ground-truth grouping, the model's seeds) after
# 120 steps from points only: measured AP50 0.47 (7 of 15 mitochondria get exactly one seed) before
# the class-balanced sampling and cross-entropy; since then at least 0.25 with 2 threads and 0.20
# with 1 (the thread count changes float sums, hence the training run);
# 0.0 with weight_localization=0 (checked by hand: no blobs, no seeds; kept out of the suite to save
# a second training run). The floor is above what a map without blobs (0), with one blob per
# plane (< 0.1) or with fragments everywhere could reach. (At this budget the learned embedding does
# not group pixels yet, so the full WISE decoding is not what is tested here.)
SEED_AP50_FLOOR = 0.15


def seed_ap50(model, sample):
    from napari_protoseg.evaluation.metrics import instance_scores
    from napari_protoseg.prediction.tiling import predict_instance_maps
    from napari_protoseg.prediction.decoders import wise_instances

    labels = []
    for z in range(sample.image.shape[0]):
        maps = predict_instance_maps(model, sample.image, z)
        truth = sample.instances[z]
        grouping = np.stack([truth == i for i in range(int(truth.max()) + 1)]).astype(np.float32)
        labels.append(wise_instances(np.where(truth > 0, 3, 1), maps.localization, grouping, [3]))
    return instance_scores(np.stack(labels), sample.instances)["ap50"]


def test_training_from_points_only_puts_one_seed_on_each_mitochondrion(mito_sample):
    """The localization head trained jointly from points alone separates the sample's mitochondria:
    its blobs give one seed per object."""
    config = TrainConfig(steps=120, batch_size=4, crop_size=128, model=ModelConfig(base_width=4, depth=3, embed_dim=16),
                         checkpoint_every=0, pseudo_label_warmup=24, device="cpu")
    event = last_event(train(mito_sample.image, points_only(mito_sample), config))
    assert event.model.has_instance_heads and event.model.instance_class_ids == [3]
    assert {"localization", "embedding", "loc_point", "loc_split_global"} <= set(event.losses)
    assert all(np.isfinite(v) for v in event.losses.values())
    ap50 = seed_ap50(event.model, mito_sample)
    assert ap50 >= SEED_AP50_FLOOR, ap50


def test_continuing_a_model_without_heads_adds_them(small_sample):
    plain = last_event(train(small_sample.image, small_sample.annotations,
                             TrainConfig(steps=1, instance_heads=False, **FAST))).model
    assert not plain.has_instance_heads
    more = last_event(train(small_sample.image, small_sample.annotations, TrainConfig(steps=1, **FAST),
                            initial_model=plain)).model
    assert more.has_instance_heads and more.net is not plain.net
    assert set(plain.net.state_dict()) < set(more.net.state_dict())  # the semantic part is carried over


@pytest.mark.parametrize("share", [None, 0.0, 0.5, 1.0])
def test_mask_share_sets_how_often_crops_centre_on_mask_pixels(share):
    """With masks, boxes, points and tags present, ``mask_share`` is the share of mask anchors;
    without it the four types are drawn alike (a quarter each)."""
    masks = np.zeros((2, 40, 40), np.uint8)
    masks[0, :20] = 1
    masks[0, 20:] = 2
    annotations = AnnotationSet((2, 40, 40), [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=masks,
                                boxes=[(1, 5, 5, 15, 15, 2, True)], points=[(1, 30, 30, 1, False)],
                                tags=[(1, 2, True, 0, 0, 20, 20)])
    sampler = CropSampler(np.zeros((2, 40, 40), np.float32), annotations, Normalization(0.0, 1.0),
                          crop_size=32, mask_share=share)
    rng = np.random.default_rng(0)
    kinds = [sampler.pick_anchor(rng).kind for _ in range(4000)]
    want = 0.25 if share is None else share
    assert abs(kinds.count("mask") / len(kinds) - want) < 0.03
    if share != 1.0:
        others = [kinds.count(k) for k in ("box", "point", "tag")]
        assert max(others) - min(others) < 0.06 * len(kinds)


def test_mask_share_outside_0_to_1_is_refused():
    annotations = AnnotationSet((1, 8, 8), [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=np.ones((1, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="mask_share"):
        CropSampler(np.zeros((1, 8, 8), np.float32), annotations, Normalization(0.0, 1.0), mask_share=1.5)
    with pytest.raises(ValueError, match="point_spread"):
        CropSampler(np.zeros((1, 8, 8), np.float32), annotations, Normalization(0.0, 1.0), point_spread=-1)


def _network_built(sample, config):
    """The network configuration a run of ``config`` builds for ``sample``'s project (no step done)."""
    return last_event(train(sample.image, sample.annotations, replace(config, steps=0))).model.net.config


def test_a_config_written_before_a_field_existed_keeps_the_behaviour_of_then(small_sample, version_1_train_config):
    """Resuming an old checkpoint must not switch on what was added since (filter bank, heads...)."""
    today = TrainConfig().to_dict()
    old = {k: v for k, v in version_1_train_config.items() if k not in (
        "filter_sigmas", "mask_share", "balance_classes", "instance_heads", "instance_backbone_grad",
        "localization_context", "unpointed_negatives", "point_spread", "input_scale", "embedding_context",
        "instance_coordinates")}
    config = TrainConfig.from_dict(old)
    assert config.model.input_scale == 1  # full resolution, as then
    assert _network_built(small_sample, config).input_scale == 1
    assert TrainConfig().model.input_scale == 2 and _network_built(small_sample, TrainConfig(**FAST)).input_scale == 2
    assert config.model.filter_sigmas == () and config.mask_share is None and config.balance_classes == 0.0
    assert not config.unpointed_negatives and config.point_spread == 0
    assert not config.instance_heads and config.instance_backbone_grad and config.model.localization_context == 0
    new = _network_built(small_sample, TrainConfig(**FAST))  # a project with an instance class
    assert new.n_instance_classes == 1 and new.localization_context == 4  # new models get the context head
    without_heads = _network_built(small_sample, TrainConfig(instance_heads=False, **FAST))
    assert without_heads.n_instance_classes == 0 and without_heads.localization_context == 0
    assert config.model.embedding_context == 0 and config.model.instance_coordinates == 0.0  # the plain embedding head
    assert new.embedding_context == 4 and new.instance_coordinates == 1 / 16  # new models: spatial, with context
    assert TrainConfig.from_dict(today) == TrainConfig()


def test_an_old_flat_config_loads_as_the_config_it_meant(version_1_train_config, as_version_1):
    """A training configuration of version 1 (flat: the network's fields at its top level, as
    checkpoints, model files and benchmark results up to commit 3746550 hold it) loads as today's
    nested one it meant; extra keys were ignored then and are now."""
    assert TrainConfig.from_dict(version_1_train_config) == TrainConfig()
    assert as_version_1(TrainConfig().to_dict()) == version_1_train_config
    flat = {**version_1_train_config, "context": 1, "base_width": 16, "filter_sigmas": [1.0, 2.5], "steps": 50,
            "input_scale": 1, "no_longer_an_option": 3}
    config = TrainConfig.from_dict(flat)
    assert config == TrainConfig(steps=50, model=ModelConfig(in_channels=3, base_width=16, filter_sigmas=(1.0, 2.5),
                                                             input_scale=1))
    custom = TrainConfig(seed=4, model=ModelConfig(in_channels=5, depth=3, norm="group", localization_context=2))
    assert TrainConfig.from_dict(as_version_1(custom.to_dict())) == custom
    assert TrainConfig.from_dict(custom.to_dict()) == custom  # today's nested form, with its version
    nested_without_version = {k: v for k, v in custom.to_dict().items() if k != "config_version"}
    assert TrainConfig.from_dict(nested_without_version) == custom


def test_a_config_of_an_unknown_future_version_is_refused_with_a_clear_message():
    newer = CONFIG_VERSION + 1
    data = {**TrainConfig().to_dict(), "config_version": newer}
    with pytest.raises(ConfigVersionError,
                       match=f"newer napari-protoseg.*version {newer}.*reads up to version {CONFIG_VERSION}.*Update"):
        TrainConfig.from_dict(data)
    for bad in (0, "2", True):
        with pytest.raises(ConfigVersionError, match="not a whole number"):
            TrainConfig.from_dict({**TrainConfig().to_dict(), "config_version": bad})
    with pytest.raises(ValueError, match="lacks the keys \\['steps'\\]"):  # today's format holds every field
        TrainConfig.from_dict({k: v for k, v in TrainConfig().to_dict().items() if k != "steps"})
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict({**TrainConfig().to_dict(), "stepz": 3})


def test_the_network_in_a_training_config_is_for_any_project():
    """TrainConfig.model leaves the project's part (classes, instance classes) to training, and
    changes reach the nested network by name."""
    with pytest.raises(ValueError, match="n_classes"):
        TrainConfig(model=ModelConfig(n_classes=3))
    with pytest.raises(ValueError, match="in_channels must be odd"):
        TrainConfig(model=ModelConfig(in_channels=2))
    changed = TrainConfig().with_changes({"steps": 720, "model": {"input_scale": 1, "filter_sigmas": [2.0]}})
    assert changed == TrainConfig(steps=720, model=ModelConfig(input_scale=1, filter_sigmas=(2.0,)))
    assert TrainConfig().with_changes({"model": {"input_scale": 2}}) == TrainConfig()
    with pytest.raises(ValueError, match="unknown training option.*model.input_scal"):
        TrainConfig().with_changes({"model": {"input_scal": 1}})


def test_a_checkpoint_written_before_configuration_versions_resumes_as_it_meant(small_sample, tmp_path,
                                                                                 as_version_1):
    """A checkpoint of version 1 (flat training configuration, no version) resumes to the same state
    as an uninterrupted run, as one of today's does."""
    config = TrainConfig(steps=6, pseudo_label_warmup=2, device="cpu", **FAST)
    straight = last_event(train(small_sample.image, small_sample.annotations, config)).model
    calls = iter(range(100))
    last_event(train(small_sample.image, small_sample.annotations, config, checkpoint_path=tmp_path / "run.ckpt",
                     stop=lambda: next(calls) >= 3))
    state = torch.load(tmp_path / "run.ckpt", weights_only=False)
    assert state["config_version"] == state["train_config"]["config_version"] == CONFIG_VERSION
    del state["config_version"]
    state["train_config"] = as_version_1(state["train_config"])
    torch.save(state, tmp_path / "old.ckpt")
    resumed = last_event(train(small_sample.image, small_sample.annotations, resume=tmp_path / "old.ckpt"))
    assert resumed.finished and resumed.step == 6
    for key, value in straight.net.state_dict().items():
        torch.testing.assert_close(resumed.model.net.state_dict()[key], value, rtol=0, atol=0, msg=key)
    state["config_version"] = CONFIG_VERSION + 1
    torch.save(state, tmp_path / "future.ckpt")
    with pytest.raises(ProjectError, match="cannot be resumed.*newer napari-protoseg"):
        next(train(small_sample.image, small_sample.annotations, resume=tmp_path / "future.ckpt"))


def _tile_tags(shape=(2, 1024, 1024), tile=256, whole_plane=False):
    """A mask on plane 0 and present/absent tags on ``tile`` x ``tile`` tiles of plane 1 (the
    benchmark's masks+tags setting), optionally with a whole-plane present tag."""
    masks = np.zeros(shape, np.uint8)
    masks[0] = 1
    masks[0, :, : shape[2] // 2] = 2
    tags = [(1, 2, (y + x) % 2 == 0, y, x, y + tile, x + tile)
            for y in range(0, shape[1], tile) for x in range(0, shape[2], tile)]
    if whole_plane:
        tags.append((1, 1, True, -1, -1, -1, -1))
    return AnnotationSet(shape, [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=masks, tags=tags)


def _sampler(annotations, crop=128, mask_share=0.5):
    return CropSampler(np.zeros(annotations.image_shape, np.float32), annotations, Normalization(0.0, 1.0),
                       crop_size=crop, mask_share=mask_share)


def test_present_tags_wider_than_a_crop_get_larger_crops_in_steps_of_about_the_same_pixels():
    from napari_protoseg.training.crops import present_tag_sides

    no_tags = AnnotationSet((2, 1024, 1024), [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=_tile_tags().masks)
    assert _sampler(no_tags).tag_crop_size == 128 and _sampler(no_tags).tag_step_plan(8) == (8, 0.0)
    tiles = _sampler(_tile_tags())
    assert tiles.tag_crop_size == 256
    n_tag, probability = tiles.tag_step_plan(8)
    # 2 crops of 256 hold the pixels of 8 of 128, so tag steps come as often as a crop picks such a tag.
    assert n_tag == 2 and probability == pytest.approx(tiles.tag_anchor_share) and 0 < probability < 1
    assert _sampler(_tile_tags(tile=200)).tag_crop_size == 208  # rounded up to 16
    assert _sampler(_tile_tags(tile=200)).tag_step_plan(8)[0] == 3  # 8 * (128/208)^2 = 3
    assert _sampler(_tile_tags(), crop=384).tag_anchor_share == 0.0  # ordinary crops hold the tiles already
    # A whole 1024 x 1024 plane exceeds the largest tag crop: that tag cannot be used, the others still are.
    assert _sampler(_tile_tags(whole_plane=True)).tag_crop_size == 256
    assert sorted(set(present_tag_sides(_tile_tags(whole_plane=True)).tolist())) == [256, 1024]
    # On small planes a whole-plane tag fits in a crop of the plane.
    assert _sampler(_tile_tags((2, 300, 300), tile=100, whole_plane=True)).tag_crop_size == 300


def test_tag_steps_cost_about_the_pixels_of_an_ordinary_step_and_carry_their_tags_whole():
    """The demo's case: whole 512 x 512 planes tagged present. One 512-px crop is twice the pixels
    of 8 crops of 128, so tag steps come only as often as gives the tags their share of the pixels
    (here half: masks and tags are the two types), which keeps a run's time near that of ordinary
    steps; ordinary steps keep their 128-px crops. (Growing every crop to 512 px doubled it.)"""
    masks = np.zeros((4, 512, 512), np.uint8)
    masks[0, :, :256], masks[0, :, 256:] = 1, 2
    tags = [(z, 2, True, -1, -1, -1, -1) for z in (1, 2, 3)]
    sampler = _sampler(AnnotationSet((4, 512, 512), [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=masks, tags=tags))
    rng = np.random.default_rng(0)
    pixels, sizes, tag_rows = [], set(), 0
    for _ in range(400):
        x, targets = sampler.sample(8, rng)
        pixels.append(x.shape[0] * x.shape[-1] * x.shape[-2])
        sizes.add((x.shape[0], x.shape[-1]))
        if x.shape[-1] == 512:
            tag_rows += int((targets.tags[:, 2] == 1).sum())
        else:
            assert int((targets.tags[:, 2] == 1).sum()) == 0  # a 128-px crop cannot hold a whole plane
    assert sizes == {(8, 128), (1, 512)}
    assert tag_rows > 0
    pixels = np.array(pixels)
    assert sampler.tag_anchor_share == pytest.approx(0.5)
    assert pixels[pixels == 512 ** 2].sum() / pixels.sum() == pytest.approx(0.5, abs=0.07)
    assert pixels.mean() < 1.5 * 8 * 128 ** 2


def test_present_tags_reach_the_loss_when_their_regions_are_larger_than_the_crop():
    """Present tags on 256 x 256 tiles never fit a 128-pixel crop; they were once silently dropped.
    Tag steps carry them whole."""
    sampler = _sampler(_tile_tags())
    rng = np.random.default_rng(0)
    assert sum(int((sampler.sample(8, rng)[1].tags[:, 2] == 1).sum()) for _ in range(20)) > 0


def test_present_tags_too_large_for_any_crop_are_named_in_a_note():
    from napari_protoseg.training.engine import training_notes

    assert training_notes(_tile_tags()) == []  # 256-px tiles fit a crop
    notes = training_notes(_tile_tags(whole_plane=True))  # a whole 1024 x 1024 plane does not
    assert len(notes) == 1 and notes[0].startswith("1 'present' tag(s)") and "Zoom in" in notes[0]
    assert training_notes(_tile_tags((2, 300, 300), tile=100, whole_plane=True)) == []  # small planes fit whole


def _points(rows):
    from napari_protoseg.annotations.project import empty_points

    return np.array(rows, dtype=empty_points().dtype)


def test_a_point_spreads_over_the_look_alike_pixels_within_its_radius_only():
    from napari_protoseg.training.crops import point_regions

    volume = np.zeros((1, 30, 30), np.float32)
    volume[0, 5:25, 5:15] = 1.0  # the clicked object: bright, 20 x 10
    points = _points([(0, 15, 7, 3, True)])  # near the object's left edge: the radius reaches past it
    regions = point_regions(volume, points, {1: 0, 3: 1}, radius=4, tolerance=0.2, smoothing=0)
    yy, xx = np.nonzero(regions[0] == 1)
    assert ((yy - 15) ** 2 + (xx - 7) ** 2 <= 16).all()  # inside the radius
    assert (volume[0][regions[0] == 1] == 1.0).all() and xx.min() == 5  # up to the edge, never past it
    assert (regions == 1).sum() > 20 and (regions == 0).sum() == 0 and regions[0, 15, 7] == 1
    assert (point_regions(volume, points, {1: 0, 3: 1}, radius=0, tolerance=0.2) == -1).all()
    assert (regions == 1).sum() == 43  # the disk's pixels at x >= 5
    volume[0, :, 10:15] = 0.9  # the object's right part is a little darker: the tolerance decides
    narrow = point_regions(volume, points, {1: 0, 3: 1}, radius=4, tolerance=0.05, smoothing=0)
    assert np.nonzero(narrow[0] == 1)[1].max() == 9
    wide = point_regions(volume, points, {1: 0, 3: 1}, radius=4, tolerance=0.15, smoothing=0)
    assert np.nonzero(wide[0] == 1)[1].max() == 11


def test_an_exhaustive_point_spreads_at_most_halfway_to_its_nearest_neighbour_of_its_class():
    from napari_protoseg.training.crops import point_radii, point_regions

    points = _points([(0, 10, 10, 5, True), (0, 10, 16, 5, True),  # 6 px apart: radius 3 each
                      (0, 30, 10, 5, True),                         # 20 px from the nearest: radius 5
                      (0, 10, 13, 1, True),                         # another class: no neighbour of its own
                      (0, 12, 10, 2, False), (0, 12, 12, 2, False), # not exhaustive: may be one object
                      (1, 10, 12, 5, True)])                        # another plane: alone there
    assert point_radii(points, 5).tolist() == [3, 3, 5, 5, 5, 5, 5]
    assert point_radii(points, 5, halfway=False).tolist() == [5] * 7
    assert point_radii(points, 2).tolist() == [2] * 7  # never wider than the radius
    volume = np.ones((2, 40, 40), np.float32)
    specks = _points([(0, 10, 10, 5, True), (0, 10, 12, 5, True)])  # 2 px apart: 1 px each
    regions = point_regions(volume, specks, {5: 0}, radius=5, tolerance=0.1, smoothing=0)
    assert (regions == 0).sum() == 9  # two disks of radius 1 (5 pixels each, 1 shared), not of 5
    wide = point_regions(volume, specks, {5: 0}, radius=5, tolerance=0.1, smoothing=0, halfway=False)
    assert (wide == 0).sum() > 80


def test_pixels_claimed_by_points_of_two_classes_teach_nothing():
    from napari_protoseg.training.crops import point_regions

    volume = np.ones((1, 20, 20), np.float32)
    points = _points([(0, 10, 6, 1, False), (0, 10, 12, 2, False)])
    regions = point_regions(volume, points, {1: 0, 2: 1}, radius=4, tolerance=0.1, smoothing=0)
    yy, xx = np.mgrid[:20, :20]
    both = ((yy - 10) ** 2 + (xx - 6) ** 2 <= 16) & ((yy - 10) ** 2 + (xx - 12) ** 2 <= 16)
    assert both.any() and (regions[0][both] == -1).all()
    assert regions[0, 10, 4] == 0 and regions[0, 10, 14] == 1


def test_spread_points_reach_the_crops_as_mask_pixels_but_never_over_a_mask():
    masks = np.zeros((1, 32, 32), np.uint8)
    masks[0, :, :4] = 1  # a strip of class 1 the spread of the class-2 point below would reach
    annotations = AnnotationSet((1, 32, 32), [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=masks,
                                points=[(0, 16, 5, 2, True)])
    sampler = CropSampler(np.ones((1, 32, 32), np.float32), annotations, Normalization(0.0, 1.0), crop_size=32,
                          augment=False, point_spread=3)
    _, targets = sampler.sample(1, np.random.default_rng(0))
    mask = targets.mask[0].numpy()
    assert (mask[:, :4] == 0).all()  # the user's mask wins
    assert mask[16, 5] == 1 and mask[16, 7] == 1 and mask[16, 9] == -1  # index 1 within 3 px of the point
    plain = CropSampler(np.ones((1, 32, 32), np.float32), annotations, Normalization(0.0, 1.0), crop_size=32,
                        augment=False)
    assert (plain.sample(1, np.random.default_rng(0))[1].mask[0].numpy()[:, 4:] == -1).all()


def test_the_negative_terms_eps_and_negative_only_weight_reach_the_loss(small_sample, monkeypatch):
    import napari_protoseg.training.engine as training_module

    seen = []
    original = training_module.total_loss

    def spy(*args, **kwargs):
        seen.append((kwargs["eps"], kwargs["negative_only_weight"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(training_module, "total_loss", spy)
    last_event(train(small_sample.image, small_sample.annotations,
                     TrainConfig(steps=2, device="cpu", negative_eps=0.5, negative_only_weight=0.3, **FAST)))
    assert seen == [(0.5, 0.3), (0.5, 0.3)]
    assert TrainConfig.from_dict({}).negative_eps == TrainConfig().negative_eps == 1e-6  # older runs: as before
    assert TrainConfig.from_dict({}).negative_only_weight == 1.0  # older runs weighted every pair alike


def test_planned_steps_fit_the_time_limit_at_the_pace_so_far():
    from napari_protoseg.training.engine import PACE_STEPS, planned_steps

    # 40 steps in 20 s: 0.5 s a step, 280 s left of 300 -> 560 more
    assert planned_steps(1800, 40, 40, 20.0, 300.0) == 600
    assert planned_steps(500, 40, 40, 20.0, 300.0) == 500  # fits: never more than asked
    assert planned_steps(1800, 5, 5, 20.0, 300.0) == 1800  # too few steps timed to judge the pace
    assert planned_steps(1800, 5, 5, 300.0, 300.0) == 5  # time is up: stop where it is
    assert planned_steps(1800, PACE_STEPS, PACE_STEPS, 299.9, 300.0) == PACE_STEPS  # never below the steps done


def test_a_time_limit_ends_training_within_it_with_the_learning_rate_decayed(small_sample, tmp_path,
                                                                             fake_training_clock):
    """With a limit that the asked steps would overrun, training plans fewer steps, ends them within the
    limit with a fully decayed learning rate and records what it did; without a limit nothing changes."""
    fake_training_clock(1.0)  # 1 s a step
    config = TrainConfig(steps=200, device="cpu", time_limit=30.0, **FAST)
    events = list(train(small_sample.image, small_sample.annotations, config, checkpoint_path=tmp_path / "c.ckpt"))
    last = events[-1]
    assert last.finished and last.time_limited and not last.stopped
    assert last.step == last.total_steps == 30  # 30 s at 1 s a step
    assert last.requested_steps == 200  # what was asked, for the message that the limit cut the run
    assert events[0].total_steps == 200  # the pace is measured first
    assert last.model.training_info["train_config"]["steps"] == last.step
    schedule = torch.load(tmp_path / "c.ckpt", weights_only=True)["scheduler"]
    assert schedule["lr_lambdas"][0]["steps"] == 30
    assert schedule["_last_lr"][0] == pytest.approx(0.05 * config.learning_rate)  # the end of the cosine

    fake_training_clock(0.01)
    quick = last_event(train(small_sample.image, small_sample.annotations, replace(config, steps=25)))
    assert quick.step == 25 and quick.finished and not quick.time_limited and quick.requested_steps == 25


def test_a_time_limited_run_resumes_to_its_planned_steps(small_sample, tmp_path, fake_training_clock):
    fake_training_clock(0.5)
    config = TrainConfig(steps=200, device="cpu", time_limit=20.0, **FAST)
    calls = iter(range(1000))
    stopped = last_event(train(small_sample.image, small_sample.annotations, config,
                               checkpoint_path=tmp_path / "run.ckpt", stop=lambda: next(calls) >= 25))
    assert stopped.stopped and stopped.step == 25 and stopped.total_steps < 200
    state = torch.load(tmp_path / "run.ckpt", weights_only=True)
    assert state["train_config"]["steps"] == stopped.total_steps
    resumed = last_event(train(small_sample.image, small_sample.annotations, resume=tmp_path / "run.ckpt"))
    assert resumed.finished and resumed.step == stopped.total_steps == 40  # 0.5 s a step: 20 + 10 s / 0.5


def test_a_version_2_config_starts_from_random_weights_as_it_did():
    """Version 2 had no 'encoder': such files trained from random weights, and still mean that."""
    data = TrainConfig(encoder="shipped").to_dict()
    data["config_version"] = 2
    del data["encoder"]
    assert TrainConfig.from_dict(data).encoder is None
