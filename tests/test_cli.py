"""The protoseg command line: exit codes and messages, never a traceback for bad input."""

import re
import subprocess
import sys

import numpy as np
import pytest

from napari_protoseg.cli import main
from napari_protoseg.annotations.project import write_project


@pytest.fixture
def project_folder(tmp_path, stack_annotations):
    return write_project(tmp_path / "cells", np.zeros(stack_annotations.image_shape, np.uint8), stack_annotations)


def test_validate_prints_a_summary_and_exits_zero_for_a_valid_project(project_folder, capsys):
    assert main(["validate", str(project_folder)]) == 0
    out = capsys.readouterr().out
    assert "valid annotation project" in out
    assert "image: 3 x 20 x 30" in out
    assert "94 mask pixels, 2 boxes, 2 points, 2 tags" in out
    assert any(line.split()[:6] == ["mitochondrion", "16", "2", "1", "1", "0"] for line in out.splitlines())
    assert "planes annotated (3): 0-2" in out


def test_validate_lists_every_problem_and_exits_non_zero(project_folder, capsys):
    (project_folder / "points.csv").write_text("z,y,x,class\n0,1,1,42\n0,nan,1,1\n")
    assert main(["validate", str(project_folder)]) == 1
    err = capsys.readouterr().err
    assert "not a valid annotation project" in err
    assert "points.csv, row 1: class 42 is not in classes.json" in err
    assert "points.csv, row 2: column 'y' holds 'nan'" in err


def test_validate_of_a_missing_folder_explains_what_a_project_is(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere")]) == 1
    assert "is not a folder; a project is a folder holding image.tif and classes.json" in capsys.readouterr().err


def test_validate_of_a_broken_image_file_is_a_message(project_folder, capsys):
    (project_folder / "image.tif").write_bytes(b"not a tiff")
    assert main(["validate", str(project_folder)]) == 1
    assert "image.tif: cannot be read as a TIFF" in capsys.readouterr().err


def test_no_subcommand_prints_help_and_exits_with_usage_code(capsys):
    assert main([]) == 2
    assert "validate" in capsys.readouterr().out


def test_installed_console_script_gives_no_traceback_for_bad_input(tmp_path):
    result = subprocess.run([sys.executable, "-m", "napari_protoseg.cli", "validate", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "image.tif: is missing" in result.stderr


# ------------------------------------------------------------------ train, predict, demo --headless

import json  # noqa: E402
import signal  # noqa: E402

import tifffile  # noqa: E402
import torch  # noqa: E402

from napari_protoseg import cli  # noqa: E402
from napari_protoseg.model.file import load_model  # noqa: E402
from napari_protoseg.annotations.project import AnnotationSet, ClassInfo, read_classes  # noqa: E402
from napari_protoseg.annotations.synthetic import SAMPLE_CLASSES, generate_sample  # noqa: E402


@pytest.fixture(autouse=True)
def _errors_are_not_hidden(monkeypatch):
    """Unexpected exceptions propagate in tests instead of becoming a one-line message."""
    monkeypatch.setenv(cli.DEBUG_ENV, "1")


@pytest.fixture(scope="module")
def small_sample():
    return generate_sample((2, 96, 96))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_sample):
    """A small sample project, its image as a TIFF and a model trained on it for 3 steps."""
    root = tmp_path_factory.mktemp("trained")
    project = write_project(root / "project", small_sample.image, small_sample.annotations)
    image = root / "image.tif"
    tifffile.imwrite(image, small_sample.image)
    model = root / "model.protoseg.pt"
    assert main(["train", str(project), "--out", str(model), "--steps", "3", "--device", "cpu"]) == 0
    return {"root": root, "project": project, "image": image, "model": model}


def _read_prediction(folder):
    return (tifffile.imread(folder / "semantic.tif"), tifffile.imread(folder / "confidence.tif"),
            json.loads((folder / "classes.json").read_text()))


def test_train_then_predict_round_trip(trained, small_sample, tmp_path, capsys):
    model_file = trained["model"]
    assert model_file.is_file()
    assert not model_file.with_name(model_file.name + ".ckpt").exists()  # removed after success
    model = load_model(model_file)
    assert model.classes == SAMPLE_CLASSES
    assert model.training_info["steps"] == 3
    # the sizes of the annotated mitochondria travel with the model, for the decoders' size floor
    assert model.training_info["object_areas"]["3"]["count"] >= 1

    out = tmp_path / "prediction"
    assert main(["predict", str(model_file), str(trained["image"]), "--out", str(out)]) == 0
    semantic, confidence, doc = _read_prediction(out)
    assert semantic.shape == small_sample.image.shape
    assert set(np.unique(semantic).tolist()) <= {c["id"] for c in doc["classes"]}
    assert confidence.dtype == np.float32 and confidence.shape == small_sample.image.shape
    assert 0.0 <= confidence.min() and confidence.max() <= 1.0
    assert list(doc) == ["classes"]
    classes, problems = read_classes(out / "classes.json")
    assert problems == [] and classes == model.classes
    printed = capsys.readouterr()
    assert "predicted 2 plane(s)" in printed.out and "wrote" in printed.out
    assert "predicting" in printed.err  # the progress bar


def test_ctrl_c_keeps_a_checkpoint_and_resume_continues(tmp_path, small_sample, monkeypatch, capsys, request):
    project = write_project(tmp_path / "project", small_sample.image, small_sample.annotations)
    model_file = tmp_path / "model.protoseg.pt"
    checkpoint = tmp_path / "model.protoseg.pt.ckpt"
    show = cli._on_train_event
    sent = []

    def press_ctrl_c_after_step_2(event, bar):
        show(event, bar)
        if event.step == 2 and not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C does

    monkeypatch.setattr(cli, "_on_train_event", press_ctrl_c_after_step_2)
    args = ["train", str(project), "--out", str(model_file), "--steps", "4", "--seed", "3"]
    handler_before = signal.getsignal(signal.SIGINT)
    if handler_before is signal.SIG_IGN:  # started in the background by a shell: let Ctrl-C through here
        signal.signal(signal.SIGINT, signal.default_int_handler)
        request.addfinalizer(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        handler_before = signal.default_int_handler
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "training stopped at step 2 of 4" in err
    assert f"--resume {checkpoint}" in err
    assert checkpoint.is_file() and not model_file.exists()
    assert torch.load(checkpoint, weights_only=True)["step"] == 2
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored

    monkeypatch.setattr(cli, "_on_train_event", show)
    assert main(["train", str(project), "--out", str(model_file), "--resume", str(checkpoint)]) == 0
    assert "resuming" in capsys.readouterr().err
    info = load_model(model_file).training_info
    assert info["steps"] == 4 and info["train_config"]["seed"] == 3


def test_predict_reads_a_zarr_array_like_the_tiff(trained, small_sample, tmp_path):
    zarr = pytest.importorskip("zarr")
    array = zarr.create_array(store=str(tmp_path / "image.zarr"), shape=small_sample.image.shape,
                              dtype=small_sample.image.dtype, chunks=(1, 48, 48))
    array[:] = small_sample.image
    group = zarr.open_group(str(tmp_path / "group.zarr"), mode="w")
    group.create_array("raw", shape=small_sample.image.shape, dtype=small_sample.image.dtype)[:] = \
        small_sample.image
    for name, source in (("tif", trained["image"]), ("zarr", tmp_path / "image.zarr"),
                         ("group", tmp_path / "group.zarr")):
        assert main(["predict", str(trained["model"]), str(source), "--out", str(tmp_path / name)]) == 0
    tif_sem, tif_conf, tif_doc = _read_prediction(tmp_path / "tif")
    for name in ("zarr", "group"):
        sem, conf, doc = _read_prediction(tmp_path / name)
        np.testing.assert_array_equal(sem, tif_sem)
        np.testing.assert_array_equal(conf, tif_conf)
        assert doc == tif_doc


def test_predict_with_tta_writes_the_test_time_augmented_prediction(trained, tmp_path, capsys):
    """--tta writes the classes of predict_volume(tta=True), which differ from the plain pass somewhere."""
    from napari_protoseg.prediction.tiling import predict_volume

    assert main(["predict", str(trained["model"]), str(trained["image"]), "--out", str(tmp_path / "tta"),
                 "--tta"]) == 0
    assert "with test-time augmentation (8 passes)" in capsys.readouterr().err
    semantic, confidence, _ = _read_prediction(tmp_path / "tta")
    # On the device the command picks ("auto"): a GPU's float sums differ from the CPU's, and on an H200
    # one pixel of the 8-pass prediction changed class between the two.
    expected = predict_volume(load_model(trained["model"]), tifffile.imread(trained["image"]), tta=True,
                              device="auto")
    np.testing.assert_array_equal(semantic, expected.classes)
    np.testing.assert_allclose(confidence, expected.confidence, atol=1e-6)
    assert main(["predict", str(trained["model"]), str(trained["image"]), "--out", str(tmp_path / "plain")]) == 0
    plain_confidence = _read_prediction(tmp_path / "plain")[1]
    assert np.abs(plain_confidence - confidence).max() > 1e-3


def test_predict_accepts_a_project_folder_and_checks_its_classes(trained, tmp_path, capsys):
    assert main(["predict", str(trained["model"]), str(trained["project"]), "--out", str(tmp_path / "a")]) == 0
    other = write_project(tmp_path / "other", np.zeros((2, 96, 96), np.uint8),
                          AnnotationSet((2, 96, 96), [ClassInfo(1, "cytoplasm"), ClassInfo(2, "nucleus")]))
    capsys.readouterr()
    assert main(["predict", str(trained["model"]), str(other), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert "was trained for other classes" in err
    assert "class id 2 is 'membrane' in the model but 'nucleus' in the project" in err
    assert not (tmp_path / "b" / "semantic.tif").exists()


# ---- bad input: a message and exit code 1, never a traceback


def _project(tmp_path, classes, masks=None, name="project"):
    ann = AnnotationSet((2, 40, 40), classes, masks=masks)
    return write_project(tmp_path / name, np.zeros((2, 40, 40), np.uint8), ann)


def test_train_on_a_missing_project_explains_what_a_project_is(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert "not a valid annotation project" in err
    assert "is not a folder; a project is a folder holding image.tif and classes.json" in err
    assert not (tmp_path / "m.pt").exists()


def test_train_on_an_invalid_project_lists_every_problem(project_folder, tmp_path, capsys):
    (project_folder / "points.csv").write_text("z,y,x,class\n0,1,1,42\n0,nan,1,1\n")
    assert main(["train", str(project_folder), "--out", str(tmp_path / "m.pt")]) == 1
    err = capsys.readouterr().err
    assert "points.csv, row 1: class 42 is not in classes.json" in err
    assert "points.csv, row 2: column 'y' holds 'nan'" in err


def test_train_with_nothing_annotated_says_so(tmp_path, classes, capsys):
    project = _project(tmp_path, classes)
    assert main(["train", str(project), "--out", str(tmp_path / "m.pt")]) == 1
    assert "nothing is annotated yet" in capsys.readouterr().err


def test_train_with_a_single_class_asks_for_a_second(tmp_path, capsys):
    masks = np.zeros((2, 40, 40), np.uint8)
    masks[0, 5:10, 5:10] = 1
    project = _project(tmp_path, [ClassInfo(1, "mitochondrion")], masks)
    assert main(["train", str(project), "--out", str(tmp_path / "m.pt")]) == 1
    assert "there is only one class; a segmentation needs at least two" in capsys.readouterr().err


def test_resume_from_a_checkpoint_of_other_classes_or_no_checkpoint(trained, tmp_path, capsys):
    masks = np.zeros((2, 40, 40), np.uint8)
    masks[0, 5:10, 5:10] = 1
    masks[0, 20:30, 5:10] = 2
    project = _project(tmp_path, [ClassInfo(1, "cytoplasm"), ClassInfo(2, "nucleus")], masks)
    checkpoint = tmp_path / "c.ckpt"
    torch.save({"format": "napari-protoseg checkpoint", "step": 1, "train_config": {"steps": 5},
                "classes": [c.to_json() for c in SAMPLE_CLASSES]}, checkpoint)
    assert main(["train", str(project), "--out", str(tmp_path / "m.pt"), "--resume", str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert "was written for other classes than the project's" in err
    assert "class id 2 is 'membrane' in the model but 'nucleus' in the project" in err

    assert main(["train", str(project), "--out", str(tmp_path / "m.pt"), "--resume",
                 str(trained["model"])]) == 1  # a model file is not a checkpoint
    assert "is not a protoseg training checkpoint" in capsys.readouterr().err
    assert main(["train", str(project), "--out", str(tmp_path / "m.pt"), "--resume",
                 str(tmp_path / "missing.ckpt")]) == 1
    assert "missing.ckpt does not exist" in capsys.readouterr().err


def test_resume_refuses_a_checkpoint_that_would_run_code(trained, tmp_path, capsys, code_running_checkpoint):
    checkpoint, marker = code_running_checkpoint({
        "format": "napari-protoseg checkpoint", "step": 1, "train_config": {"steps": 5},
        "classes": [c.to_json() for c in SAMPLE_CLASSES]})
    assert main(["train", str(trained["project"]), "--out", str(tmp_path / "m.pt"), "--resume",
                 str(checkpoint)]) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {checkpoint} holds Python objects" in err
    assert "written by an older version of napari-protoseg" in err and "Retrain" in err
    assert not marker.exists() and not (tmp_path / "m.pt").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_a_message(trained, tmp_path, capsys):
    assert main(["predict", str(trained["model"]), str(trained["image"]), "--out", str(tmp_path),
                 "--device", "cuda"]) == 1
    assert "no CUDA GPU is available" in capsys.readouterr().err


def test_predict_with_a_missing_model_file(trained, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "none.pt"), str(trained["image"]), "--out", str(tmp_path)]) == 1
    assert "the file does not exist" in capsys.readouterr().err


def test_predict_with_a_broken_model_file_gives_no_traceback(trained, tmp_path):
    broken = tmp_path / "broken.protoseg.pt"
    broken.write_bytes(b"this is not a model")
    result = subprocess.run([sys.executable, "-m", "napari_protoseg.cli", "predict", str(broken),
                             str(trained["image"]), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"Cannot use model file {broken}" in result.stderr
    assert "not a PyTorch file or it is damaged" in result.stderr


@pytest.mark.parametrize("shape, message", [
    ((40, 50, 3), "looks like an RGB/RGBA image"),
    ((2, 3, 40, 50), "has 4 dimensions"),
    ((40,), "has 1 dimensions"),
])
def test_predict_rejects_images_of_the_wrong_kind(trained, tmp_path, capsys, shape, message):
    image = tmp_path / "image.tif"
    photometric = {3: "rgb", 4: "minisblack"}.get(len(shape))
    tifffile.imwrite(image, np.zeros(shape, np.uint8), **({"photometric": photometric} if photometric else {}))
    assert main(["predict", str(trained["model"]), str(image), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_predict_of_a_file_that_is_no_image(trained, tmp_path, capsys):
    bad = tmp_path / "notes.txt"
    bad.write_text("hello")
    assert main(["predict", str(trained["model"]), str(bad), "--out", str(tmp_path / "out")]) == 1
    assert "cannot be read as a TIFF" in capsys.readouterr().err
    assert main(["predict", str(trained["model"]), str(tmp_path / "nope.tif"), "--out", str(tmp_path)]) == 1
    assert "nope.tif does not exist" in capsys.readouterr().err


def test_an_unexpected_error_is_one_line_and_a_hint(monkeypatch, capsys):
    def boom(args):
        raise RuntimeError("something broke\nsecond line")

    monkeypatch.setattr(cli, "cmd_validate", boom)
    with pytest.raises(RuntimeError):  # not hidden while debugging (and in tests)
        main(["validate", "x"])
    monkeypatch.delenv(cli.DEBUG_ENV)
    assert main(["validate", "x"]) == 1
    err = capsys.readouterr().err
    assert "protoseg: unexpected error: RuntimeError: something broke" in err
    assert "second line" not in err and "Traceback" not in err
    assert "PROTOSEG_DEBUG=1" in err


def test_headless_demo_writes_overview_prediction_model_and_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--headless", "--steps", "3", "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "plane 7 (not annotated)" in printed
    assert "training: 3 steps" in printed
    png = out / "overview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    semantic, confidence, doc = _read_prediction(out / "prediction")
    assert semantic.shape == confidence.shape == (8, 512, 512)
    # The sample's mitochondria are flagged as instances: the demo separates them too.
    instances = tifffile.imread(out / "prediction" / "instances.tif")
    assert instances.shape == semantic.shape and instances.dtype == np.uint32
    assert "instances:" in printed and "(components decoder)" in printed
    # Every decoder is scored against the sample's mitochondria, touching ones too.
    assert "mitochondrion instances, all 8 planes vs ground truth" in printed
    for decoder in ("wise", "watershed", "components"):
        assert re.search(rf"^  {decoder} +AP50 \d\.\d{{3}} +matched IoU \d\.\d{{3}} +touching recall \d\.\d{{3}}$",
                         printed, re.M)
    assert load_model(out / "model.protoseg.pt").training_info["steps"] == 3
    assert main(["validate", str(out / "project")]) == 0


def test_headless_options_without_headless_are_a_message(tmp_path, capsys):
    assert main(["demo", "--steps", "3", "--out", str(tmp_path)]) == 1
    assert "--out and --steps only go with 'protoseg demo --headless'" in capsys.readouterr().err


# --------------------------------------------------------------------------------- instances


def test_predict_writes_instances_per_plane_or_linked_in_3d(trained, tmp_path, capsys):
    from napari_protoseg.prediction.decoders import link_planes, min_object_sizes, plain_instances

    assert load_model(trained["model"]).has_instance_heads  # the sample flags mitochondria as instances
    out = tmp_path / "wise"
    assert main(["predict", str(trained["model"]), str(trained["image"]), "--out", str(out),
                 "--instance-decoder", "wise"]) == 0
    assert "(wise decoder)" in capsys.readouterr().out
    semantic = tifffile.imread(out / "semantic.tif")
    instances = tifffile.imread(out / "instances.tif")
    assert instances.shape == semantic.shape and instances.dtype == np.uint32
    assert np.all(semantic[instances > 0] == 3)  # objects of the instance class only
    planes = [set(np.unique(p[p > 0]).tolist()) for p in instances]
    assert planes[0].isdisjoint(planes[1])  # ids unique over the stack

    out = tmp_path / "components"
    assert main(["predict", str(trained["model"]), str(trained["image"]), "--out", str(out),
                 "--instance-decoder", "components", "--link-3d"]) == 0
    assert "3D objects" in capsys.readouterr().out
    semantic = tifffile.imread(out / "semantic.tif")
    np.testing.assert_array_equal(tifffile.imread(out / "instances.tif"),
                                  link_planes(plain_instances(semantic, [3], method="components",
                                                              min_size=min_object_sizes(load_model(trained["model"])))))


def test_predict_without_instance_classes_writes_no_instances(tmp_path, capsys):
    from napari_protoseg.model.inputs import Normalization
    from napari_protoseg.model.network import ModelConfig, ProtoSegNet
    from napari_protoseg.model.file import TrainedModel, save_model

    classes = [ClassInfo(c.id, c.name, False, c.color) for c in SAMPLE_CLASSES]
    net = ProtoSegNet(ModelConfig(n_classes=len(classes), base_width=4, depth=2, embed_dim=8, input_scale=1))
    model_file = save_model(tmp_path / "plain.protoseg.pt", TrainedModel(net, classes, Normalization(0.0, 255.0)))
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, np.zeros((40, 48), np.uint8))
    assert main(["predict", str(model_file), str(image), "--out", str(tmp_path / "a")]) == 0
    assert not (tmp_path / "a" / "instances.tif").exists() and (tmp_path / "a" / "semantic.tif").exists()
    capsys.readouterr()
    assert main(["predict", str(model_file), str(image), "--out", str(tmp_path / "b"),
                 "--instance-decoder", "wise"]) == 1
    assert "no class flagged 'instances'" in capsys.readouterr().err


def test_train_notes_present_tags_it_cannot_use(tmp_path, capsys):
    """A 'present' tag on a whole 1024 x 1024 plane is more than any training crop holds: the user
    is told before training (here the run stops right after, at the bad --out)."""
    from napari_protoseg.annotations.project import AnnotationSet, ClassInfo

    masks = np.zeros((1, 1024, 1024), np.uint8)
    masks[0, :8, :8] = 1
    masks[0, 8:16, :8] = 2
    annotations = AnnotationSet((1, 1024, 1024), [ClassInfo(1, "a"), ClassInfo(2, "b")], masks=masks,
                                tags=[(0, 2, True, -1, -1, -1, -1)])
    project = write_project(tmp_path / "project", np.zeros((1, 1024, 1024), np.uint8), annotations)
    assert main(["train", str(project), "--out", str(tmp_path), "--device", "cpu"]) != 0
    err = capsys.readouterr().err
    assert "protoseg: note: 1 'present' tag(s) cover a region wider than 512 pixels" in err
    assert "is a folder" in err


def test_help_states_the_default_number_of_training_steps(capsys):
    from napari_protoseg.training.engine import TrainConfig

    from napari_protoseg.training.engine import CUDA_STEPS

    assert cli.DEFAULT_STEPS == TrainConfig().steps and cli.DEFAULT_CUDA_STEPS == CUDA_STEPS
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert f"(default: {TrainConfig().steps}; {CUDA_STEPS} on a CUDA GPU)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command", ["validate", "train", "predict", "demo", "benchmark"])
def test_every_command_prints_its_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: protoseg {command}")


def test_train_with_a_time_limit_says_how_many_of_the_steps_it_allowed(tmp_path, small_sample, fake_training_clock,
                                                                        capsys):
    fake_training_clock(1.0)  # 1 s a step
    project = write_project(tmp_path / "project", small_sample.image, small_sample.annotations)
    model_file = tmp_path / "model.protoseg.pt"
    assert main(["train", str(project), "--out", str(model_file), "--steps", "200", "--time-limit", "0.5"]) == 0
    captured = capsys.readouterr()
    assert re.search(r"200 steps on \w+, at most 30 s", captured.err)
    assert "the time limit of 30 s allowed 30 of the 200 steps asked" in captured.err
    info = load_model(model_file).training_info
    assert info["steps"] == 30 and info["train_config"]["time_limit"] == 30.0


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan"])
def test_a_time_limit_must_be_a_positive_number_of_minutes(tmp_path, value, capsys):
    with pytest.raises(SystemExit):
        main(["train", str(tmp_path), "--out", str(tmp_path / "m.pt"), "--time-limit", value])
    assert "--time-limit" in capsys.readouterr().err


def test_pretrain_writes_an_encoder_that_train_init_starts_from(trained, tmp_path, capsys):
    encoder = tmp_path / "stack"
    assert main(["pretrain", str(trained["image"]), "--out", str(encoder), "--steps", "3", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "pretrained 3 steps" in out and "encoder written to" in out and "--init" in out
    written = tmp_path / "stack.safetensors"
    assert written.is_file()
    model = tmp_path / "from-encoder.protoseg.pt"
    assert main(["train", str(trained["project"]), "--out", str(model), "--steps", "2", "--device", "cpu",
                 "--init", str(written)]) == 0
    assert load_model(model).training_info  # a model like any other
    assert main(["pretrain", str(trained["project"]), "--out", str(tmp_path / "again"), "--steps", "2",
                 "--device", "cpu", "--init", str(written), "--objective", "masked"]) == 0


def test_train_init_with_a_missing_or_mismatched_encoder_is_a_message(trained, tmp_path, capsys):
    from napari_protoseg.model.encoder import Encoder, save_encoder
    from napari_protoseg.model.network import ModelConfig, ProtoSegNet

    args = ["train", str(trained["project"]), "--out", str(tmp_path / "m.protoseg.pt"), "--steps", "1"]
    assert main([*args, "--init", str(tmp_path / "nowhere.safetensors")]) == 1
    assert "does not exist; check the path, or make one with 'protoseg pretrain" in capsys.readouterr().err
    narrow = save_encoder(tmp_path / "narrow", Encoder.from_network(ProtoSegNet(ModelConfig(n_classes=1, base_width=4))))
    assert main([*args, "--init", str(narrow)]) == 1
    err = capsys.readouterr().err
    assert "pretrained for another network (width 4" in err and "Traceback" not in err
