"""Self-supervised pretraining and encoder files: objectives that learn, files that round-trip and
refuse what does not fit with a clear message, and training that starts from an encoder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from napari_protoseg.annotations.synthetic import generate_sample
from napari_protoseg.model.encoder import (
    Encoder,
    EncoderFileError,
    apply_encoder,
    load_encoder,
    save_encoder,
    shipped_encoder_path,
)
from napari_protoseg.model.network import ModelConfig, ProtoSegNet
from napari_protoseg.pretraining.engine import PretrainConfig, pretrain
from napari_protoseg.training.engine import TrainConfig, train

SMALL = ModelConfig(base_width=4, depth=2, embed_dim=8, prototypes_per_class=2)


@pytest.fixture(scope="module")
def sample():
    return generate_sample(shape=(3, 128, 128), seed=5)


def _run(sample, objective, steps, **changes):
    config = PretrainConfig(objective=objective, steps=steps, batch_size=2, crop_size=64, shift=32, model=SMALL,
                            device="cpu", **changes)
    return list(pretrain([sample.image], config))


@pytest.mark.parametrize("objective", ["contrastive", "masked"])
def test_each_objective_decreases_on_the_synthetic_sample(sample, objective):
    events = _run(sample, objective, 100)
    losses = np.array([e.loss for e in events])
    assert events[-1].finished and events[-1].encoder is not None and events[-1].step == 100
    assert np.isfinite(losses).all()
    assert losses[-15:].mean() < 0.95 * losses[:15].mean()


def test_a_stopped_run_still_gives_its_encoder(sample):
    calls = iter(range(100))
    events = list(pretrain([sample.image], PretrainConfig(objective="masked", steps=50, batch_size=2, crop_size=64,
                                                          shift=32, model=SMALL, device="cpu"),
                           stop=lambda: next(calls) >= 5))
    last = events[-1]
    assert last.stopped and not last.finished and last.step == 5 and last.encoder is not None


def test_small_images_are_pretrained_on_smaller_crops():
    tiny = generate_sample(shape=(2, 96, 96), seed=1)
    events = list(pretrain([tiny.image], PretrainConfig(steps=3, batch_size=2, model=SMALL, device="cpu")))
    assert events[-1].finished


def _encoder(config=SMALL, seed=0, provenance=None) -> Encoder:
    torch.manual_seed(seed)
    return Encoder.from_network(ProtoSegNet(replace(config, n_classes=1)), provenance or {"data": "test"})


def test_an_encoder_round_trips_through_its_file_with_its_provenance(tmp_path):
    encoder = _encoder(provenance={"data": "synthetic", "licence": "CC BY", "steps": 3})
    path = save_encoder(tmp_path / "enc", encoder)
    assert path.name == "enc.safetensors"
    loaded = load_encoder(path)
    assert loaded.architecture == encoder.architecture and loaded.provenance == encoder.provenance
    assert set(loaded.state_dict) == set(encoder.state_dict)
    assert all(k.startswith(("backbone.", "head.")) for k in loaded.state_dict)
    for key, value in encoder.state_dict.items():
        assert torch.equal(loaded.state_dict[key], value), key
    net = ProtoSegNet(replace(SMALL, n_classes=4, n_instance_classes=1))
    prototypes = net.prototypes.detach().clone()
    apply_encoder(net, loaded)
    for key, value in encoder.state_dict.items():
        assert torch.equal(net.state_dict()[key], value), key
    assert torch.equal(net.prototypes, prototypes)  # the project's part keeps its own weights


def test_a_single_section_encoder_starts_a_2_5d_network_as_the_section_alone():
    encoder = _encoder()
    flat = ProtoSegNet(replace(SMALL, n_classes=2))
    deep = ProtoSegNet(replace(SMALL, n_classes=2, in_channels=3))
    apply_encoder(flat, encoder)
    apply_encoder(deep, encoder)
    flat.eval(), deep.eval()
    x = torch.rand(1, 1, 64, 64)
    neighbours = torch.cat([torch.rand(1, 1, 64, 64), x, torch.rand(1, 1, 64, 64)], dim=1)
    with torch.no_grad():
        assert torch.allclose(flat.backbone_features(x), deep.backbone_features(neighbours), atol=1e-5)


def test_a_mismatched_or_bad_encoder_file_gets_a_clear_message(tmp_path):
    wide = save_encoder(tmp_path / "wide", _encoder(replace(SMALL, base_width=8)))
    with pytest.raises(EncoderFileError, match="pretrained for another network \\(width 8.*than this one \\(width 4"):
        apply_encoder(ProtoSegNet(replace(SMALL, n_classes=2)), load_encoder(wide))
    with pytest.raises(EncoderFileError, match="does not exist.*protoseg pretrain"):
        load_encoder(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(EncoderFileError, match="not a readable encoder file"):
        load_encoder(junk)
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(EncoderFileError, match="not a napari-protoseg encoder"):
        load_encoder(foreign)
    newer = tmp_path / "newer.safetensors"
    encoder = _encoder()
    save_file(encoder.state_dict, str(newer), metadata={
        "format": "napari-protoseg encoder", "format_version": "99",
        "architecture": json.dumps(encoder.architecture), "provenance": "{}"})
    with pytest.raises(EncoderFileError, match="newer napari-protoseg"):
        load_encoder(newer)


def test_training_starts_from_the_encoder_it_is_given(sample, tmp_path):
    encoder = _encoder(seed=3)
    path = save_encoder(tmp_path / "enc", encoder)
    config = TrainConfig(steps=1, batch_size=2, crop_size=64, model=SMALL, pseudo_label_warmup=1000,
                         checkpoint_every=0, learning_rate=0.0, weight_decay=0.0, encoder=str(path), device="cpu")
    *_, last = train(sample.image, sample.annotations, config)
    state = last.model.net.state_dict()
    for key, value in encoder.state_dict.items():
        if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(state[key], value), key
    assert last.model.training_info["encoder"] == str(path)
    mismatched = replace(config, model=replace(SMALL, base_width=8))
    with pytest.raises(EncoderFileError, match="pretrained for another network"):
        next(train(sample.image, sample.annotations, mismatched))


def test_the_package_ships_an_encoder_for_the_default_network_with_its_attribution():
    encoder = load_encoder("shipped")
    assert load_encoder(shipped_encoder_path()).architecture == encoder.architecture
    net = ProtoSegNet(replace(TrainConfig().model, n_classes=3, n_instance_classes=1))
    apply_encoder(net, encoder)
    assert encoder.provenance["attribution"] == "EM data: Janelia FlyEM, neuroproof_examples, CC BY"
    assert encoder.provenance["objective"] in ("contrastive", "masked") and encoder.provenance["steps"] > 0
    assert shipped_encoder_path().stat().st_size < 8_000_000


def test_the_shipped_setting_starts_other_network_sizes_from_random_weights(sample):
    """The package ships an encoder for its default network only: other sizes train as before."""
    config = TrainConfig(steps=1, batch_size=2, crop_size=64, model=SMALL, pseudo_label_warmup=1000,
                         checkpoint_every=0, encoder="shipped", device="cpu")
    *_, last = train(sample.image, sample.annotations, config)
    assert last.model.training_info["encoder"] is None
