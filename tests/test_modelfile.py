"""Tests of model files (napari_protoseg.model.file): round trip and every bad-file case; no Qt."""

from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
import pytest
import torch

from napari_protoseg import __version__
from napari_protoseg.model.inputs import Normalization
from napari_protoseg.model.migration import CONFIG_VERSION
from napari_protoseg.model.network import ModelConfig, ProtoSegNet
from napari_protoseg.model.file import (
    FORMAT,
    FORMAT_VERSION,
    ModelFileError,
    TrainedModel,
    check_model_classes,
    load_model,
    save_model,
)
from napari_protoseg.annotations.project import ClassInfo

CLASSES = [ClassInfo(1, "cytoplasm"), ClassInfo(3, "membrane", color="#dd8452"),
           ClassInfo(7, "mitochondrion", instances=True, color="#55a868")]
# The plain full-resolution network without context heads that these tests were written for (a
# bare ModelConfig's defaults before configuration version 2).
PLAIN = dict(input_scale=1, localization_context=0, embedding_context=0, instance_coordinates=0.0)


def make_model(context=0, norm="group", classes=CLASSES, seed=0, filter_sigmas=()) -> TrainedModel:
    torch.manual_seed(seed)
    config = ModelConfig(n_classes=len(classes), in_channels=2 * context + 1, base_width=4, depth=2,
                         embed_dim=8, norm=norm, filter_sigmas=filter_sigmas, **PLAIN)
    net = ProtoSegNet(config)
    with torch.no_grad():  # non-trivial running statistics, so they are checked too
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return TrainedModel(net=net, classes=list(classes), normalization=Normalization(10.0, 200.0),
                        context=context, training_info={"steps": 12, "loss": [1.5, np.float32(0.75)],
                                                        "counts": {"boxes": np.int64(3)}})


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    path = save_model(tmp_path / "m.protoseg.pt", model)
    return model, path


def payload_of(path):
    return torch.load(path, weights_only=True)


def write_payload(path, payload):
    torch.save(payload, path)
    return path


def expect_error(path, *words):
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    message = str(info.value)
    assert str(path) in message
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("context,norm,filter_sigmas", [(0, "group", ()), (1, "batch", ()), (1, "group", (1.0, 3.0))])
def test_round_trip_gives_identical_outputs(tmp_path, context, norm, filter_sigmas):
    model = make_model(context=context, norm=norm, filter_sigmas=filter_sigmas)
    path = save_model(tmp_path / "model.protoseg.pt", model)
    loaded = load_model(path)
    x = torch.rand(2, 2 * context + 1, 24, 40)
    model.net.eval()
    with torch.no_grad():
        a = model.net(x)
        b = loaded.net(x)
    assert torch.equal(a["logits"], b["logits"])
    assert torch.equal(a["embedding"], b["embedding"])
    assert not loaded.net.training
    assert loaded.classes == model.classes
    assert loaded.class_ids == [1, 3, 7]
    assert loaded.classes[1].color == "#dd8452" and loaded.classes[2].instances
    assert loaded.normalization == model.normalization
    assert loaded.context == context
    assert loaded.net.config == model.net.config
    assert loaded.training_info == {"steps": 12, "loss": [1.5, 0.75], "counts": {"boxes": 3}}


def test_file_layout(saved):
    model, path = saved
    payload = payload_of(path)
    assert set(payload) == {"format", "format_version", "config", "state_dict"}
    assert payload["format"] == FORMAT and payload["format_version"] == 1  # no instance heads: version 1
    config = json.loads(payload["config"])
    assert config["napari_protoseg_version"] == __version__
    assert config["model"] == model.net.config.to_dict()
    assert config["classes"] == [c.to_json() for c in CLASSES]
    assert config["normalization"] == {"low": 10.0, "high": 200.0}
    assert config["context"] == 0
    assert config["config_version"] == CONFIG_VERSION  # the format of "model" (napari_protoseg.model.migration)
    assert set(payload["state_dict"]) == set(model.net.state_dict())


def test_save_is_atomic_and_overwrites(tmp_path, saved):
    model, path = saved
    other = make_model(seed=1)
    save_model(path, other)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    loaded = load_model(path)
    assert torch.equal(loaded.net.prototypes, other.net.prototypes)


def test_save_failure_leaves_old_file_and_no_temp(tmp_path, saved, monkeypatch):
    model, path = saved
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(path, make_model(seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_any_extension_and_str_path(tmp_path):
    path = save_model(str(tmp_path / "weights.bin"), make_model())
    assert load_model(str(path)).class_ids == [1, 3, 7]


def test_save_rejects_folder_and_missing_parent(tmp_path):
    with pytest.raises(ValueError, match="folder"):
        save_model(tmp_path, make_model())
    with pytest.raises(ValueError, match="does not exist"):
        save_model(tmp_path / "nope" / "m.protoseg.pt", make_model())


def test_save_rejects_unserialisable_training_info(tmp_path):
    model = make_model()
    model.training_info = {"thing": object()}
    with pytest.raises(ValueError, match="training_info"):
        save_model(tmp_path / "m.protoseg.pt", model)


def test_load_does_not_touch_global_rng(saved):
    _, path = saved
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_model(path)
    assert torch.equal(torch.rand(3), expected)


def test_trained_model_checks_consistency():
    net = ProtoSegNet(ModelConfig(n_classes=3, base_width=4, depth=1, embed_dim=8, **PLAIN))
    with pytest.raises(ValueError, match="3 outputs but 2 classes"):
        TrainedModel(net, CLASSES[:2], Normalization(0, 1))
    with pytest.raises(ValueError, match="needs 3"):
        TrainedModel(net, CLASSES, Normalization(0, 1), context=1)


# ------------------------------------------------------------------------ bad files


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.protoseg.pt", "does not exist")


def test_folder(tmp_path):
    expect_error(tmp_path, "folder")


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "notes.protoseg.pt"
    path.write_text("hello, I am text")
    expect_error(path, "not a PyTorch file", "damaged")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.protoseg.pt"
    path.write_bytes(b"")
    expect_error(path, "not a PyTorch file")


def test_truncated_file(saved):
    _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expect_error(path, "damaged")


def test_corrupted_bytes(saved):
    _, path = saved
    data = bytearray(path.read_bytes())
    # Garble the middle of the archive (tensor data and the zip directory's neighbourhood).
    for i in range(len(data) // 3, len(data) - 30, 97):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError):
        load_model(path)


def test_zip_that_is_not_torch(tmp_path):
    path = tmp_path / "archive.protoseg.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a model")
    expect_error(path, "not a PyTorch file")


class Custom:
    """A Python object a weights-only load must refuse."""


def test_pickle_with_python_objects(tmp_path):
    path = tmp_path / "pickled.protoseg.pt"
    torch.save({"format": FORMAT, "obj": Custom()}, path)
    expect_error(path, "Python objects")


def test_other_torch_content(tmp_path):
    expect_error(write_payload(tmp_path / "t.pt", torch.zeros(3)), "not a napari-protoseg model")
    expect_error(write_payload(tmp_path / "l.pt", [1, 2]), "not a napari-protoseg model")


def test_bare_state_dict(tmp_path):
    path = write_payload(tmp_path / "sd.pt", make_model().net.state_dict())
    expect_error(path, "bare network weights", "save_model")


def test_wrong_format_key(tmp_path, saved):
    _, path = saved
    payload = payload_of(path)
    payload["format"] = "cellpose model"
    expect_error(write_payload(path, payload), "not a napari-protoseg model", "cellpose")
    payload.pop("format")
    expect_error(write_payload(path, payload), "not a napari-protoseg model")


def test_newer_format_version(saved):
    _, path = saved
    payload = payload_of(path)
    payload["format_version"] = FORMAT_VERSION + 1
    config = json.loads(payload["config"])
    config["napari_protoseg_version"] = "9.9.9"
    payload["config"] = json.dumps(config)
    message = expect_error(write_payload(path, payload), "newer napari-protoseg 9.9.9", "update")
    assert f"version {FORMAT_VERSION + 1}" in message


def test_a_file_written_before_configuration_versions_loads_as_the_network_it_held(tmp_path):
    """A model file without a configuration version whose network configuration lacks the fields
    added since (as files of older releases are) loads as the network it was: full resolution, the
    plain heads; its weights fit and give the same outputs."""
    model = make_instance_model()
    path = save_model(tmp_path / "old.protoseg.pt", model)
    payload = payload_of(path)
    config = json.loads(payload["config"])
    del config["config_version"]
    for key in ("localization_context", "input_scale", "embedding_context", "instance_coordinates", "filter_sigmas"):
        del config["model"][key]
    payload["config"] = json.dumps(config)
    loaded = load_model(write_payload(path, payload))
    assert loaded.net.config == model.net.config
    assert (loaded.config.input_scale, loaded.config.localization_context, loaded.config.embedding_context,
            loaded.config.instance_coordinates, loaded.config.filter_sigmas) == (1, 0, 0, 0.0, ())
    x = torch.randn(1, 1, 24, 24)
    model.net.eval()
    with torch.no_grad():
        a, b = model.net(x), loaded.net(x)
    for key in ("logits", "localization", "instance_embedding"):
        assert torch.equal(a[key], b[key]), key


def test_a_newer_configuration_version_asks_for_an_update(saved):
    _, path = saved
    payload = payload_of(path)
    config = json.loads(payload["config"])
    config["config_version"] = CONFIG_VERSION + 1
    payload["config"] = json.dumps(config)
    message = expect_error(write_payload(path, payload), "newer napari-protoseg",
                           f"configuration version {CONFIG_VERSION + 1}",
                           "update napari-protoseg")
    assert "damaged" not in message
    config["config_version"] = "2"
    payload["config"] = json.dumps(config)
    expect_error(write_payload(path, payload), "configuration version '2' is not a whole number")


@pytest.mark.parametrize("version", [0, "1", None, True])
def test_invalid_format_version(saved, version):
    _, path = saved
    payload = payload_of(path)
    payload["format_version"] = version
    expect_error(write_payload(path, payload), "format version")


def test_config_not_json(saved):
    _, path = saved
    payload = payload_of(path)
    payload["config"] = "{not json"
    expect_error(write_payload(path, payload), "not valid JSON")
    payload["config"] = "[1, 2]"
    expect_error(write_payload(path, payload), "JSON object")
    payload["config"] = {"model": {}}
    expect_error(write_payload(path, payload), "configuration is missing or not text")


@pytest.mark.parametrize("key", ["model", "classes", "normalization", "context"])
def test_config_missing_key(saved, key):
    _, path = saved
    payload = payload_of(path)
    config = json.loads(payload["config"])
    config.pop(key)
    payload["config"] = json.dumps(config)
    expect_error(write_payload(path, payload), "lacks the key", key)


def test_training_info_is_optional(saved):
    _, path = saved
    payload = payload_of(path)
    config = json.loads(payload["config"])
    config.pop("training_info")
    config.pop("napari_protoseg_version")
    payload["config"] = json.dumps(config)
    assert load_model(write_payload(path, payload)).training_info == {}


@pytest.mark.parametrize("edit,words", [
    (lambda c: c["model"].update(base_width=0), ["network configuration is invalid", "base_width"]),
    (lambda c: c["model"].update(colour="red"), ["network configuration is invalid", "unknown"]),
    (lambda c: c.update(model=[1]), ["'model' must be an object"]),
    (lambda c: c.update(classes={"id": 1}), ["class table"]),
    (lambda c: c["classes"][1].update(id=1), ["class table is invalid", "used twice"]),
    (lambda c: c["classes"][0].update(name=""), ["class table is invalid", "name"]),
    (lambda c: c["classes"][0].pop("name"), ["class table"]),
    (lambda c: c.update(normalization={"low": 5}), ["normalisation"]),
    (lambda c: c.update(normalization={"low": 5, "high": 5}), ["normalisation"]),
    (lambda c: c.update(normalization="x"), ["normalisation"]),
    (lambda c: c.update(context=-1), ["context"]),
    (lambda c: c.update(context=1), ["input channel", "context 1 needs 3"]),
    (lambda c: c.update(training_info=[1]), ["training_info"]),
])
def test_invalid_config_values(saved, edit, words):
    _, path = saved
    payload = payload_of(path)
    config = json.loads(payload["config"])
    edit(config)
    payload["config"] = json.dumps(config)
    expect_error(write_payload(path, payload), *words)


def test_class_count_of_config_vs_network(saved):
    _, path = saved
    payload = payload_of(path)
    config = json.loads(payload["config"])
    config["classes"].append({"id": 9, "name": "extra"})
    payload["config"] = json.dumps(config)
    expect_error(write_payload(path, payload), "lists 4 class(es)", "3 outputs")


def test_class_count_of_config_vs_prototypes(saved):
    _, path = saved
    payload = payload_of(path)
    config = json.loads(payload["config"])
    config["classes"].append({"id": 9, "name": "extra"})
    config["model"]["n_classes"] = 4
    payload["config"] = json.dumps(config)
    expect_error(write_payload(path, payload), "prototypes for 3 class(es)", "lists 4")


def test_state_dict_missing_and_unexpected_keys(saved):
    _, path = saved
    payload = payload_of(path)
    state = payload["state_dict"]
    key = next(k for k in state if k.startswith("backbone.stem"))
    state.pop(key)
    state["extra.weight"] = torch.zeros(2)
    expect_error(write_payload(path, payload), "do not match", "1 missing", key, "1 unexpected",
                 "extra.weight")


def test_state_dict_wrong_shapes(saved):
    _, path = saved
    payload = payload_of(path)
    config = json.loads(payload["config"])
    config["model"]["base_width"] = 8  # the weights are of a base_width=4 network
    payload["config"] = json.dumps(config)
    expect_error(write_payload(path, payload), "do not match", "other shapes")


def test_state_dict_not_tensors(saved):
    _, path = saved
    payload = payload_of(path)
    payload["state_dict"] = {"prototypes": [1, 2, 3]}
    expect_error(write_payload(path, payload), "names to tensors")
    payload.pop("state_dict")
    expect_error(write_payload(path, payload), "no network weights")


def test_state_dict_with_nan(saved):
    _, path = saved
    payload = payload_of(path)
    payload["state_dict"]["prototypes"][0, 0, 0] = float("nan")
    expect_error(write_payload(path, payload), "NaN", "Retrain")


def test_no_traceback_chain_from_torch(tmp_path):
    path = tmp_path / "junk.protoseg.pt"
    path.write_bytes(os.urandom(2000))
    with pytest.raises(ModelFileError) as info:
        load_model(path)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_load_to_explicit_device(saved):
    _, path = saved
    loaded = load_model(path, device=torch.device("cpu"))
    assert loaded.device.type == "cpu"
    with pytest.raises(ValueError, match="unknown device"):
        load_model(path, device="tpu")


def test_load_from_bytes_written_elsewhere(tmp_path, saved):
    # A copy of a model file (e.g. sent by a colleague) loads the same.
    _, path = saved
    buffer = io.BytesIO(path.read_bytes())
    copy = tmp_path / "copy.protoseg.pt"
    copy.write_bytes(buffer.getvalue())
    assert load_model(copy).class_ids == [1, 3, 7]


# ---------------------------------------------------------------- class compatibility


def test_check_model_classes_compatible():
    model = make_model()
    assert check_model_classes(model, CLASSES) == []
    # Order, colours and the instances flag do not matter.
    shuffled = [ClassInfo(7, "mitochondrion"), ClassInfo(1, "cytoplasm", color="#000000"),
                ClassInfo(3, "membrane", instances=True)]
    assert check_model_classes(model, shuffled) == []
    assert check_model_classes(model.classes, shuffled) == []


def test_check_model_classes_differences():
    model = make_model()
    project = [ClassInfo(1, "cytoplasm"), ClassInfo(3, "ER"), ClassInfo(4, "vesicle")]
    messages = check_model_classes(model, project)
    text = "\n".join(messages)
    assert "class id 3 is 'membrane' in the model but 'ER' in the project" in text
    assert "class id 7 ('mitochondrion'), which the project's class table does not define" in text
    assert "class id 4 ('vesicle') was not among the model's classes" in text
    assert messages[-1].startswith("Train a new model")
    assert len(messages) == 4


# ------------------------------------------------------------------------- instance heads


def make_instance_model(seed=0, localization_context=0) -> TrainedModel:
    torch.manual_seed(seed)
    config = ModelConfig(n_classes=len(CLASSES), base_width=4, depth=2, embed_dim=8, n_instance_classes=1,
                         instance_embed_dim=5, **{**PLAIN, "localization_context": localization_context})
    return TrainedModel(net=ProtoSegNet(config), classes=list(CLASSES), normalization=Normalization(10.0, 200.0))


@pytest.mark.parametrize("localization_context", [0, 4])
def test_a_model_with_instance_heads_round_trips(tmp_path, localization_context):
    model = make_instance_model(localization_context=localization_context)
    path = save_model(tmp_path / "wise.protoseg.pt", model)
    assert payload_of(path)["format_version"] == 2
    loaded = load_model(path)
    assert loaded.has_instance_heads and loaded.instance_class_ids == [7]
    assert loaded.net.config == model.net.config
    x = torch.randn(2, 1, 24, 24)
    model.net.eval()
    with torch.no_grad():
        a, b = model.net(x), loaded.net(x)
    for key in ("logits", "localization", "instance_embedding"):
        assert torch.equal(a[key], b[key]), key


def test_instance_heads_must_match_the_classes_flagged_instances(tmp_path):
    model = make_instance_model()
    unflagged = [ClassInfo(c.id, c.name, False, c.color) for c in CLASSES]
    with pytest.raises(ValueError, match="instance heads for 1 class"):
        TrainedModel(net=model.net, classes=unflagged, normalization=model.normalization)
    path = save_model(tmp_path / "wise.protoseg.pt", model)
    payload = payload_of(path)
    config = json.loads(payload["config"])
    config["classes"] = [c.to_json() for c in unflagged]
    payload["config"] = json.dumps(config)
    expect_error(write_payload(path, payload), "instance heads for 1 class", "flags 0")
    payload = payload_of(save_model(tmp_path / "wise2.protoseg.pt", model))
    payload["state_dict"] = {k: v for k, v in payload["state_dict"].items() if not k.startswith("localization_head")}
    expect_error(write_payload(path, payload), "missing")
