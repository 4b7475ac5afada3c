"""The ``protoseg`` command line.

``validate`` checks a project folder, ``train`` trains a model on a project, ``predict`` applies a
model to a TIFF or zarr image, and ``demo`` opens napari with the synthetic sample and the protoseg
panel (or, with
``--headless``, runs the whole sample -> train -> predict -> overview chain without a display).
Bad input of any kind is reported as a message on stderr with exit code 1, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from napari_protoseg._text import format_duration, format_ranges
from napari_protoseg.annotations.project import ProjectError, read_annotations
from napari_protoseg.prediction import DECODERS

# TrainConfig.steps and training.CUDA_STEPS, restated so that --help need not import PyTorch (a test
# keeps them equal).
DEFAULT_STEPS = 1800
DEFAULT_CUDA_STEPS = 2400

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

DEVICES = ("auto", "cpu", "cuda", "mps")
DEMO_FOLDER = "protoseg-demo"  # where 'demo --headless' writes without --out
SAMPLE_PIXEL_NM = 5.0  # the synthetic sample's pixel size (see sample.py)
CHECKPOINT_SUFFIX = ".ckpt"
DEBUG_ENV = "PROTOSEG_DEBUG"
BENCHMARK_COMMANDS = {
    "benchmark": "run the annotation-budget benchmark on the VNC data (see docs/benchmarks.md)",
    "benchmark-touching": "compare the instance decoders where mitochondria touch (synthetic sample, trained "
                          "from points only; see docs/benchmark-touching.md)",
}


class CliError(Exception):
    """Bad input found by a command: printed as ``message`` (and one line per detail), exit 1."""

    def __init__(self, message: str, details=()):
        super().__init__(message)
        self.message = message
        self.details = [str(d) for d in details]


def _error(message: str, details=()) -> int:
    print(f"protoseg: error: {message}", file=sys.stderr)
    for detail in details:
        print(f"  - {detail}", file=sys.stderr)
    return EXIT_INVALID


# ---------------------------------------------------------------------------------- validate


def _format_summary(folder: Path, summary: dict) -> str:
    shape = " x ".join(str(s) for s in summary["image_shape"])
    totals = summary["totals"]
    lines = [
        f"{folder}: valid annotation project",
        f"image: {shape}",
        f"annotations: {totals['mask_pixels']} mask pixels, {totals['boxes']} boxes, "
        f"{totals['points']} points, {totals['tags']} tags",
        "",
        f"{'class':<24}{'mask px':>10}{'boxes':>8}{'points':>8}{'tags +':>8}{'tags -':>8}",
    ]
    for name, counts in summary["classes"].items():
        lines.append(f"{name:<24}{counts['mask_pixels']:>10}{counts['boxes']:>8}{counts['points']:>8}"
                     f"{counts['tags_present']:>8}{counts['tags_absent']:>8}")
    planes = summary["planes_annotated"]
    lines += ["", f"planes annotated ({len(planes)}): {format_ranges(planes) if planes else 'none'}"]
    return "\n".join(lines)


def cmd_validate(args) -> int:
    folder = Path(args.project)
    try:
        annotations = read_annotations(folder)
    except ProjectError as err:
        print(f"{folder}: not a valid annotation project", file=sys.stderr)
        for problem in err.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_INVALID
    print(_format_summary(folder, annotations.summary()))
    return EXIT_OK


# ------------------------------------------------------------------------------- shared parts


def _pick_device(name: str):
    from napari_protoseg.model.network import pick_device

    try:
        return pick_device(name)
    except ValueError as err:
        raise CliError(f"{err}. Use --device auto (or cpu).") from None


def _read_project(folder: Path):
    """The project's image and annotations; a CliError listing every problem otherwise."""
    from napari_protoseg.annotations.project import read_project

    try:
        return read_project(folder)
    except ProjectError as err:
        raise CliError(f"{folder}: not a valid annotation project", err.problems) from None


def _prepare_output_file(path: Path, what: str) -> Path:
    if path.is_dir():
        raise CliError(f"{what} {path} is a folder; give a file name such as {path / 'model.protoseg.pt'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create the folder {path.parent} for {what} {path} ({err.strerror or err})") from None
    if not os.access(path.parent, os.W_OK):
        raise CliError(f"cannot write {what} {path}: the folder {path.parent} is not writable")
    return path


def _prepare_output_folder(path: Path, what: str) -> Path:
    if path.exists() and not path.is_dir():
        raise CliError(f"{what} {path} exists and is a file; give a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create {what} {path} ({err.strerror or err})") from None
    if not os.access(path, os.W_OK):
        raise CliError(f"cannot write into {what} {path}: the folder is not writable")
    return path


def _progress_bar(total: int, initial: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr,
                dynamic_ncols=True, mininterval=0.5, leave=True)


# ------------------------------------------------------------------------------------- train


def _read_checkpoint(path: Path, project_classes) -> dict:
    """A checkpoint's content (read without running code from it: training.engine.read_checkpoint),
    checked to be a protoseg checkpoint for the project's classes."""
    from napari_protoseg.model.file import check_model_classes
    from napari_protoseg.annotations.project import classes_from_json
    from napari_protoseg.model.migration import VERSION_KEY
    from napari_protoseg.model.network import ModelConfig
    from napari_protoseg.training.engine import TrainConfig, read_checkpoint

    hint = "Give the .ckpt file written by 'protoseg train' for this project."
    try:
        state = read_checkpoint(path)
    except ProjectError as err:
        raise CliError(f"checkpoint {path} {err.problems[0].message} {hint}") from None
    classes, problems = classes_from_json(state.get("classes"), "class table", allow_unknown_keys=True)
    try:
        int(state["step"]), int(state["train_config"]["steps"])
    except (KeyError, TypeError, ValueError):
        problems.append("no step count")
    if problems:
        raise CliError(f"checkpoint {path} is damaged (its class table or step count is missing or invalid). "
                       f"{hint}")
    messages = check_model_classes(classes, project_classes)
    if messages:
        raise CliError(f"checkpoint {path} was written for other classes than the project's", messages)
    if not isinstance(state["train_config"], dict) or not isinstance(state.get("model_config"), dict):
        raise CliError(f"checkpoint {path} is damaged (its configuration is missing). {hint}")
    try:  # any format version this release reads (napari_protoseg.model.migration)
        TrainConfig.from_dict(state["train_config"])
        ModelConfig.from_dict(state["model_config"], state.get(VERSION_KEY))
    except (TypeError, ValueError) as err:
        raise CliError(f"checkpoint {path} cannot be resumed: {err}.") from None
    return state


@dataclass
class _TrainOutcome:
    model: object | None        # TrainedModel, None after an abort
    steps_done: int
    total_steps: int
    elapsed: float
    device: str
    losses: dict
    stopped: bool
    time_limited: bool = False


class _InterruptFlag:
    """Ctrl-C during training: the first asks to stop after the current step (a clean stop with a
    checkpoint), the second aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc):
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
        return False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nprotoseg: stopping after this step and keeping a checkpoint "
              "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)

    def __call__(self) -> bool:
        return self.requested


def _on_train_event(event, bar) -> None:
    """Progress of one training step (a hook the tests use)."""
    bar.n = event.step
    bar.total = event.total_steps  # a time limit may plan fewer steps than asked
    loss = event.losses.get("total")
    bar.set_postfix_str(f"loss {loss:.4f}, {event.device}" if loss is not None else event.device,
                        refresh=False)
    bar.refresh()


def _run_training(image, annotations, config, checkpoint: Path, resume: Path | None = None,
                  start_step: int = 0, total_steps: int | None = None) -> _TrainOutcome:
    """Train with a progress bar on stderr; Ctrl-C stops cleanly (see :class:`_InterruptFlag`)."""
    from napari_protoseg.training.engine import train

    total = config.steps if total_steps is None else total_steps
    bar = _progress_bar(total, start_step, "training", "step")
    event = None
    started = time.perf_counter()
    try:
        with _InterruptFlag() as interrupt:
            events = train(image, annotations, config, checkpoint_path=checkpoint, resume=resume,
                           stop=interrupt)
            try:
                for event in events:
                    _on_train_event(event, bar)
            except KeyboardInterrupt:
                events.close()  # writes the checkpoint if the generator was suspended
                bar.close()
                return _TrainOutcome(None, event.step if event else start_step, total,
                                     time.perf_counter() - started, event.device if event else "?",
                                     event.losses if event else {}, stopped=True)
    finally:
        bar.close()
    return _TrainOutcome(event.model, event.step, event.total_steps, event.elapsed, event.device,
                         event.losses, stopped=event.stopped or (interrupt.requested and not event.finished),
                         time_limited=event.time_limited)


def _checked_encoder(name: str) -> str | None:
    """The encoder setting of ``--init``: None for 'none', else a readable encoder ('shipped' or a file)."""
    from napari_protoseg.model.encoder import EncoderFileError, load_encoder

    if name == "none":
        return None
    try:
        load_encoder(name)
    except EncoderFileError as err:
        raise CliError(str(err)) from None
    return name


def cmd_pretrain(args) -> int:
    from napari_protoseg.model.encoder import ENCODER_SUFFIX, EncoderFileError, load_encoder, save_encoder
    from napari_protoseg.pretraining.engine import PretrainConfig, pretrain

    device = _pick_device(args.device)
    images = [_read_input_image(Path(path))[0] for path in args.images]
    out = Path(args.out)
    if not out.name.endswith(ENCODER_SUFFIX):
        out = out.with_name(out.name + ENCODER_SUFFIX)
    out = _prepare_output_file(out, "encoder file")
    init = None
    if args.init is not None and args.init != "none":
        try:
            init = load_encoder(args.init)
        except EncoderFileError as err:
            raise CliError(str(err)) from None
    defaults = PretrainConfig()
    config = PretrainConfig(objective=args.objective or defaults.objective, time_limit=60.0 * args.minutes,
                            steps=args.steps or 1_000_000, seed=args.seed, device=args.device)
    print(f"pretraining on {len(images)} image(s) for at most {format_duration(config.time_limit)} on {device} "
          f"({config.objective} objective)", file=sys.stderr)
    provenance = {"data": ", ".join(Path(p).name for p in args.images)}
    bar = _progress_bar(None, 0, "pretraining", "step")
    event = None
    try:
        with _InterruptFlag() as interrupt:
            try:
                for event in pretrain(images, config, init=init, stop=interrupt, provenance=provenance,
                                      report_every=5):
                    bar.total = event.total_steps
                    bar.n = event.step
                    bar.set_postfix_str(f"loss {event.loss:.4f}, {event.device}", refresh=False)
                    bar.refresh()
            except EncoderFileError as err:
                raise CliError(str(err)) from None
            except ProjectError as err:
                raise CliError("cannot pretrain", err.problems) from None
    finally:
        bar.close()
    if event is None or event.encoder is None:
        return EXIT_INTERRUPTED
    save_encoder(out, event.encoder)
    print(f"pretrained {event.step} steps in {format_duration(event.elapsed, decimals=1)} on {event.device}"
          + (" (stopped early)" if event.stopped else ""))
    print(f"encoder written to {out}; train from it with: protoseg train PROJECT --out MODEL --init {out}")
    return EXIT_OK


def _interrupted(outcome: _TrainOutcome, checkpoint: Path, resume_hint: str) -> int:
    print(f"protoseg: training stopped at step {outcome.steps_done} of {outcome.total_steps}.",
          file=sys.stderr)
    if checkpoint.exists():
        print(f"The checkpoint {checkpoint} is kept. To continue where it stopped, run:\n"
              f"  {resume_hint}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _training_problems(image, annotations, folder: Path) -> None:
    from napari_protoseg.training.engine import check_training_input

    problems = check_training_input(image, annotations)
    if problems:
        raise CliError(f"cannot train on {folder}", problems)


def _print_training_notes(annotations) -> None:
    from napari_protoseg.training.engine import training_notes

    for note in training_notes(annotations):
        print(f"protoseg: note: {note}", file=sys.stderr)


def cmd_train(args) -> int:
    from napari_protoseg.model.file import save_model
    from napari_protoseg.training.engine import TrainConfig, default_train_config

    folder = Path(args.project)
    device = _pick_device(args.device)
    project = _read_project(folder)
    _training_problems(project.image, project.annotations, folder)
    _print_training_notes(project.annotations)
    out = _prepare_output_file(Path(args.out), "model file")
    checkpoint = out.with_name(out.name + CHECKPOINT_SUFFIX)

    resume = Path(args.resume) if args.resume else None
    config = default_train_config(args.device)
    if args.steps is not None:
        config.steps = args.steps
    if args.seed is not None:
        config.seed = args.seed
    if args.time_limit is not None:
        config.time_limit = args.time_limit * 60.0
    if args.init is not None:
        config.encoder = _checked_encoder(args.init)
    start_step = 0
    if resume is not None:
        state = _read_checkpoint(resume, project.annotations.classes)
        # A resumed run is the checkpoint's run: its settings (steps, seed, device) win.
        config = TrainConfig.from_dict(state["train_config"])
        start_step = int(state["step"])
        del state
        ignored = [f"--{name} {given}" for name, given, kept in
                   (("steps", args.steps, config.steps), ("seed", args.seed, config.seed),
                    ("device", args.device, config.device),
                    ("time-limit", args.time_limit, None if config.time_limit is None else config.time_limit / 60))
                   if given is not None and given != kept and not (name == "device" and given == "auto")]
        if ignored:
            print(f"protoseg: note: {', '.join(ignored)} ignored; a resumed run keeps the settings of "
                  f"its checkpoint ({config.steps} steps, seed {config.seed}, device "
                  f"{config.device}).", file=sys.stderr)
        device = _pick_device(config.device)
        print(f"resuming {resume} at step {start_step} of {config.steps}", file=sys.stderr)

    requested_steps = config.steps
    summary = project.annotations.summary()
    totals = summary["totals"]
    print(f"training on {folder}: image {' x '.join(map(str, project.image.shape))}, "
          f"{len(project.annotations.classes)} classes, {totals['mask_pixels']} mask pixels, "
          f"{totals['boxes']} boxes, {totals['points']} points, {totals['tags']} tags; "
          f"{config.steps} steps on {device}"
          + (f", at most {format_duration(config.time_limit)}" if config.time_limit is not None else ""),
          file=sys.stderr)
    hint_args = f"protoseg train {folder} --out {out} --resume {checkpoint}"
    from napari_protoseg.model.encoder import EncoderFileError

    try:
        outcome = _run_training(project.image, project.annotations, config, checkpoint, resume,
                                start_step=start_step, total_steps=config.steps)
    except EncoderFileError as err:
        raise CliError(str(err)) from None
    if outcome.stopped or outcome.model is None:
        return _interrupted(outcome, checkpoint, hint_args)
    save_model(out, outcome.model)
    checkpoint.unlink(missing_ok=True)
    loss = outcome.losses.get("total")
    print(f"trained {outcome.steps_done} steps in {format_duration(outcome.elapsed, decimals=1)} on {outcome.device}"
          + (f" (final loss {loss:.4f})" if loss is not None else ""))
    if outcome.time_limited:
        print(f"protoseg: note: the time limit of {format_duration(config.time_limit)} allowed "
              f"{outcome.steps_done} of the {requested_steps} steps asked.", file=sys.stderr)
    print(f"model written to {out}")
    return EXIT_OK


# ----------------------------------------------------------------------------------- predict


def _load_model(path: Path, device):
    from napari_protoseg.model.file import ModelFileError, load_model

    try:
        return load_model(path, device=device)
    except ModelFileError as err:
        raise CliError(str(err)) from None


def _open_zarr_array(path: Path):
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as err:  # zarr raises several types for folders that are not zarr
        raise CliError(f"{path} is a folder but not a zarr array or group ({type(err).__name__}: "
                       f"{str(err).strip()[:200]}). Give a TIFF file, a .zarr array, or a project "
                       "folder.") from None
    if isinstance(node, zarr.Array):
        return node
    names = sorted(node.array_keys())
    if len(names) == 1:
        return node[names[0]]
    if not names:
        raise CliError(f"{path} is a zarr group without arrays; give the path of a zarr array.")
    raise CliError(f"{path} is a zarr group holding {len(names)} arrays ({', '.join(names[:8])}); "
                   f"give the path of one of them, e.g. {path / names[0]}")


def _read_input_image(path: Path):
    """(image, project classes or None): a TIFF file, a zarr array (lazy) or a project folder."""
    import tifffile

    from napari_protoseg.annotations.project import CLASSES_FILE, IMAGE_FILE, check_image, is_project_folder, read_classes

    project_classes = None
    if not path.exists():
        raise CliError(f"image {path} does not exist")
    if path.is_dir() and is_project_folder(path):
        project_classes, problems = read_classes(path / CLASSES_FILE)
        if problems:
            raise CliError(f"{path}: not a valid annotation project", problems)
        path = path / IMAGE_FILE
    if path.is_dir():
        image = _open_zarr_array(path)
    else:
        try:
            image = tifffile.imread(path)
        except Exception as err:  # tifffile raises several types for files that are not TIFF
            raise CliError(f"image {path} cannot be read as a TIFF ({type(err).__name__}: "
                           f"{str(err).strip()[:200]}). Give a TIFF file or a zarr array.") from None
    problems = check_image(image, file=str(path))
    if problems:
        raise CliError(f"cannot segment {path}", problems)
    return image, project_classes


def _write_prediction(folder: Path, prediction, model, instances=None) -> dict[str, Path]:
    """semantic.tif, confidence.tif, classes.json and, given ``instances``, instances.tif in
    ``folder``; returns their paths."""
    import numpy as np

    from napari_protoseg.annotations.project import write_text, write_tiff

    paths = {"semantic": folder / "semantic.tif", "confidence": folder / "confidence.tif",
             "classes": folder / "classes.json"}
    write_tiff(paths["semantic"], np.asarray(prediction.classes))
    write_tiff(paths["confidence"], np.asarray(prediction.confidence, dtype=np.float32), compress=False)
    write_text(paths["classes"], json.dumps({"classes": [c.to_json() for c in model.classes]}, indent=1) + "\n")
    if instances is not None:
        paths["instances"] = folder / "instances.tif"
        write_tiff(paths["instances"], np.asarray(instances.labels, dtype=np.uint32))
    return paths


def _predict_with_progress(model, image, device, settings):
    """(semantic prediction, instances or None, seconds): the prediction pipeline's classes,
    confidence and instances of every plane decoded with ``settings`` (a DecoderSettings; the panel's
    pipeline), or for a model without instance classes the semantic prediction alone."""
    from napari_protoseg.prediction.pipeline import predict_instances
    from napari_protoseg.prediction.tiling import predict_volume

    n_planes = int(image.shape[0]) if len(image.shape) == 3 else 1
    bar = _progress_bar(n_planes, 0, "predicting", "plane")

    def progress(done, total):
        bar.n = done
        bar.refresh()

    started = time.perf_counter()
    instances = None
    try:
        if model.instance_class_ids:
            instances = prediction = predict_instances(model, image, settings, progress=progress, device=device)
        else:
            prediction = predict_volume(model, image, progress=progress, device=device, tta=settings.tta)
    finally:
        bar.close()
    return prediction, instances, time.perf_counter() - started


def _decoder_settings(model, decoder: str | None = None, link_3d: bool = False, tta: bool = False):
    """The DecoderSettings of 'protoseg predict': the decoder asked for, else the default (connected
    components), checked against the model; CliError for options the model cannot go with."""
    from napari_protoseg.prediction.pipeline import DecoderSettings, PredictionError, check_decoder

    if not model.instance_class_ids:
        if decoder is not None:
            raise CliError(f"--instance-decoder {decoder}: the model has no class flagged 'instances', so "
                           "there are no objects to separate. Flag the class in classes.json and train again.")
        if link_3d:
            raise CliError("--link-3d: the model has no class flagged 'instances', so there are no objects to link")
    settings = DecoderSettings(link_3d=link_3d, tta=tta, **({"decoder": decoder} if decoder else {}))
    try:
        check_decoder(model, settings)
    except PredictionError as err:
        raise CliError(f"--instance-decoder {settings.decoder}: {err}") from None
    return settings


def _class_fractions(classes, model) -> str:
    import numpy as np

    counts = np.bincount(np.asarray(classes).ravel().astype(np.int64), minlength=max(model.class_ids) + 1)
    total = max(int(counts.sum()), 1)
    return ", ".join(f"{c.name} {100 * counts[c.id] / total:.1f} %" for c in model.classes)


def _instance_summary(instances, model) -> str:
    import numpy as np

    n_objects = len(np.unique(instances.labels)) - int((instances.labels == 0).any())
    kind = "3D objects (linked across planes)" if instances.linked_3d else "objects"
    return (f"instances: {n_objects} {kind} of {', '.join(c.name for c in model.classes if c.instances)} "
            f"({instances.decoder} decoder)")


def cmd_predict(args) -> int:
    from napari_protoseg.model.file import check_model_classes

    device = _pick_device(args.device)
    model = _load_model(Path(args.model), device)
    image, project_classes = _read_input_image(Path(args.image))
    if project_classes is not None:
        messages = check_model_classes(model, project_classes)
        if messages:
            raise CliError(f"the model {args.model} was trained for other classes than the project "
                           f"{args.image}", messages)
    settings = _decoder_settings(model, args.instance_decoder, args.link_3d, args.tta)
    out = _prepare_output_folder(Path(args.out), "output folder")
    shape = " x ".join(str(int(s)) for s in image.shape)
    augmented = " with test-time augmentation (8 passes)" if args.tta else ""
    print(f"predicting {args.image} ({shape}) with {args.model} on {device}{augmented}", file=sys.stderr)
    prediction, instances, seconds = _predict_with_progress(model, image, device, settings)
    paths = _write_prediction(out, prediction, model, instances)
    took = format_duration(seconds, decimals=1)
    print(f"predicted {prediction.planes_done} plane(s) of {shape} in {took} on {device}")
    print(f"classes: {_class_fractions(prediction.classes, model)}")
    print(f"mean confidence: {float(prediction.confidence.mean()):.3f}")
    if instances is not None:
        print(_instance_summary(instances, model))
    for path in paths.values():
        print(f"wrote {path}")
    return EXIT_OK


# -------------------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    if args.headless:
        return _demo_headless(args)
    given = [name for name, value in (("--out", args.out), ("--steps", args.steps)) if value is not None]
    if args.device != "auto":
        given.append("--device")
    if given:
        raise CliError(f"{' and '.join(given)} only go with 'protoseg demo --headless'")
    import napari

    viewer = napari.Viewer(title="protoseg demo", show=args.screenshot is None)
    viewer.open_sample("napari-protoseg", "synthetic_em")
    viewer.window.add_plugin_dock_widget("napari-protoseg", "protoseg")
    if args.screenshot is not None:
        viewer.window._qt_window.resize(1400, 900)
        viewer.screenshot(str(args.screenshot), canvas_only=False, flash=False)
        viewer.close()
        print(f"screenshot written to {args.screenshot}")
        return EXIT_OK
    napari.run()
    return EXIT_OK


def demo_report(png_path: Path, sample, annotations, predicted, classes, steps: int, train_seconds: float,
                device: str, final_loss: float | None, predict_seconds: float) -> tuple[list[str], Path]:
    """The figures of a headless demo (lines for stdout) and its overview PNG."""
    import math

    import numpy as np

    from napari_protoseg.evaluation.metrics import class_iou
    from napari_protoseg.evaluation.overview import pick_annotated_plane, summarize_annotations, write_overview

    class_ids = [int(c.id) for c in classes]
    annotated = annotations.summary()["planes_annotated"]
    held_out = [z for z in range(annotations.n_planes) if z not in annotated]
    eval_plane = held_out[-1] if held_out else annotations.n_planes - 1
    shown_plane = pick_annotated_plane(annotations)
    ious = class_iou(predicted[eval_plane], sample.semantic[eval_plane], class_ids)
    valid = [v for v in ious.values() if not math.isnan(v)]
    miou = float(np.mean(valid)) if valid else float("nan")
    all_ious = class_iou(predicted, sample.semantic, class_ids)
    all_miou = float(np.nanmean(list(all_ious.values())))

    names = {int(c.id): c.name for c in classes}
    held = "not annotated" if held_out else "annotated"
    shape = " x ".join(map(str, sample.image.shape))
    trained = f"{steps} steps in {format_duration(train_seconds, decimals=1)} on {device}"
    lines = [
        f"sample: synthetic EM {shape}, classes {', '.join(names.values())}",
        f"annotations: {summarize_annotations(annotations)}",
        f"training: {trained}" + (f" (final loss {final_loss:.4f})" if final_loss is not None else ""),
        f"prediction: {annotations.n_planes} planes in {format_duration(predict_seconds, decimals=1)}",
        f"plane {eval_plane} ({held}) vs dense ground truth:",
        *(f"  IoU {names[cid]:<16}{v:.3f}" for cid, v in ious.items()),
        f"  mIoU {'':<15}{miou:.3f}",
        f"all {annotations.n_planes} planes ({len(annotated)} annotated) vs dense ground truth: "
        f"mIoU {all_miou:.3f}",
    ]
    title = f"protoseg demo: synthetic EM {shape}; trained {trained}"
    caption = (f"Trained on sparse annotations: {summarize_annotations(annotations)}.\n"
               f"Plane {eval_plane} ({held}) vs dense ground truth: "
               + ", ".join(f"{names[cid]} IoU {v:.2f}" for cid, v in ious.items())
               + f"; mIoU {miou:.2f}.")
    png = write_overview(png_path, image=sample.image, annotations=annotations, prediction=predicted,
                         ground_truth=sample.semantic, planes=[shown_plane, eval_plane], classes=classes,
                         title=title, caption=caption, notes={eval_plane: f"mIoU {miou:.2f}"},
                         pixel_size_nm=SAMPLE_PIXEL_NM)
    return lines, png


def demo_instance_lines(model, image, classes, truth, class_id: int) -> list[str]:
    """Lines scoring each instance decoder on the sample's objects of ``class_id`` (all planes):
    AP50, matched IoU and the recall of objects that touch another (where the decoders differ)."""
    import numpy as np

    from napari_protoseg.evaluation.instances import decoder_figures
    from napari_protoseg.evaluation.metrics import TOUCHING_GAP

    figures = decoder_figures(model, image, np.asarray(classes), truth, class_id)
    if not figures:
        return []
    name = next(c.name for c in model.classes if int(c.id) == class_id)
    first = next(iter(figures.values()))
    lines = [f"{name} instances, all {truth.shape[0]} planes vs ground truth ({first['tp'] + first['fn']} objects, "
             f"{first['touching_objects']} within {TOUCHING_GAP} px of another):"]
    for decoder, f in figures.items():
        touching = "–" if not f["touching_objects"] else f"{f['touching_recall']:.3f}"
        lines.append(f"  {decoder:<11}AP50 {f['ap50']:.3f}  matched IoU {f['matched_iou']:.3f}  "
                     f"touching recall {touching}")
    return lines


def _demo_headless(args) -> int:
    import numpy as np

    from napari_protoseg.model.file import save_model
    from napari_protoseg.annotations.project import write_project
    from napari_protoseg.annotations.synthetic import MITOCHONDRION, generate_sample
    from napari_protoseg.training.engine import default_train_config

    wall_start = time.perf_counter()
    out = _prepare_output_folder(Path(args.out or DEMO_FOLDER), "output folder")
    device = _pick_device(args.device)
    config = default_train_config(args.device)
    if args.steps is not None:
        config.steps = args.steps

    print("generating the synthetic EM sample ...", file=sys.stderr)
    sample = generate_sample()
    project_dir = write_project(out / "project", sample.image, sample.annotations)
    project = _read_project(project_dir)  # train on what was written, as 'protoseg train' does
    annotations = project.annotations
    shape = " x ".join(map(str, sample.image.shape))
    print(f"project written to {project_dir} (image {shape}); training {config.steps} steps on {device}",
          file=sys.stderr)

    model_path = out / "model.protoseg.pt"
    checkpoint = model_path.with_name(model_path.name + CHECKPOINT_SUFFIX)
    outcome = _run_training(project.image, annotations, config, checkpoint)
    if outcome.stopped or outcome.model is None:
        return _interrupted(outcome, checkpoint,
                            f"protoseg train {project_dir} --out {model_path} --resume {checkpoint}")
    model = outcome.model
    save_model(model_path, model)
    checkpoint.unlink(missing_ok=True)

    prediction, instances, predict_seconds = _predict_with_progress(model, project.image, device,
                                                                    _decoder_settings(model))
    pred_dir = _prepare_output_folder(out / "prediction", "prediction folder")
    _write_prediction(pred_dir, prediction, model, instances)

    lines, png = demo_report(out / "overview.png", sample, annotations, np.asarray(prediction.classes),
                             model.classes, outcome.steps_done, outcome.elapsed, outcome.device,
                             outcome.losses.get("total"), predict_seconds)
    print("\n".join(lines))
    if instances is not None:
        print(_instance_summary(instances, model))
        print("\n".join(demo_instance_lines(model, project.image, prediction.classes, sample.instances,
                                            MITOCHONDRION)))
    print(f"model: {model_path}")
    print(f"prediction: {pred_dir}")
    print(f"overview: {png}")
    print(f"total time: {format_duration(time.perf_counter() - wall_start, decimals=1)}")
    return EXIT_OK


# ------------------------------------------------------------------------------------ parser


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protoseg",
        description="Organelle segmentation trained from any mix of masks, boxes, points and tags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    validate = sub.add_parser("validate", help="check an annotation project folder and summarise it")
    validate.add_argument("project", help="project folder (image.tif, classes.json, annotations)")
    validate.set_defaults(func=cmd_validate)

    train = sub.add_parser(
        "train", help="train a model on an annotation project folder",
        description="Train a model on whatever a project folder holds (masks, boxes, points, tags). "
                    "A checkpoint MODEL.ckpt is kept during training; Ctrl-C stops cleanly and "
                    "--resume MODEL.ckpt continues.")
    train.add_argument("project", help="project folder (image.tif, classes.json, annotations)")
    train.add_argument("--out", required=True, metavar="MODEL",
                       help="model file to write (e.g. model.protoseg.pt)")
    train.add_argument("--steps", type=_positive_int, metavar="N",
                       help=f"optimiser steps (default: {DEFAULT_STEPS}; {DEFAULT_CUDA_STEPS} on a CUDA GPU)")
    train.add_argument("--device", choices=DEVICES, default="auto",
                       help="where to train (default: auto = CUDA, else MPS, else CPU)")
    train.add_argument("--seed", type=int, metavar="S", help="random seed (default: 0)")
    train.add_argument("--time-limit", type=_positive_float, metavar="MIN",
                       help="stop within MIN minutes: training measures its pace and plans fewer steps if the "
                            "asked ones would take longer, its learning rate still decaying to the end "
                            "(default: no limit, the same steps and result on every run)")
    train.add_argument("--resume", metavar="CKPT", help="continue from this checkpoint")
    train.add_argument("--init", metavar="ENCODER",
                       help="start the network from this pretrained encoder: a file written by 'protoseg pretrain', "
                            "'shipped' (the EM encoder in the package) or 'none' (random weights; the default)")
    train.set_defaults(func=cmd_train)

    pretrain = sub.add_parser(
        "pretrain", help="learn an image without labels (self-supervised); 'train --init' starts from the result",
        description="Pretrain the network's encoder on the unlabelled pixels of one or more images (TIFF files, "
                    "zarr arrays or project folders) and write it to an encoder file. 'protoseg train --init FILE' "
                    "then starts from it. Ctrl-C stops early and still writes the encoder learnt so far.")
    pretrain.add_argument("images", nargs="+", metavar="IMAGE", help="TIFF file, zarr array or project folder")
    pretrain.add_argument("--out", required=True, metavar="FILE", help="encoder file to write (.safetensors)")
    pretrain.add_argument("--minutes", type=_positive_float, metavar="M", default=10.0,
                          help="wall-clock budget in minutes (default: 10)")
    pretrain.add_argument("--steps", type=_positive_int, metavar="N", help="at most N steps (default: as M allows)")
    pretrain.add_argument("--objective", choices=("contrastive", "masked"), default=None,
                          help="what the network learns: contrastive (two views of a crop agree pixel by pixel) or "
                               "masked (restore hidden patches); default: the package's choice")
    pretrain.add_argument("--init", metavar="ENCODER",
                          help="start from this encoder ('shipped': the package's EM encoder) instead of random weights")
    pretrain.add_argument("--device", choices=DEVICES, default="auto", help="where to train (default: auto)")
    pretrain.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    pretrain.set_defaults(func=cmd_pretrain)

    predict = sub.add_parser(
        "predict", help="segment an image with a trained model",
        description="Segment every plane of IMAGE (a TIFF file, a zarr array or a project folder) "
                    "and write semantic.tif, confidence.tif and classes.json into DIR, and instances.tif "
                    "(one id per object of the classes flagged 'instances') when the model has such classes.")
    predict.add_argument("model", help="model file written by 'protoseg train' or the napari panel")
    predict.add_argument("image", help="TIFF file, zarr array (.zarr folder) or project folder")
    predict.add_argument("--out", required=True, metavar="DIR", help="folder for the results")
    predict.add_argument("--device", choices=DEVICES, default="auto",
                         help="where to predict (default: auto)")
    predict.add_argument("--instance-decoder", choices=DECODERS, default=None,
                         help="how instances.tif separates objects: components (connected components of "
                              "the class map; the default), watershed (distance-transform split of the class "
                              "map) or wise (learned seeds and embeddings; models with instance heads)")
    predict.add_argument("--link-3d", action="store_true",
                         help="link the objects of neighbouring planes into 3D objects (one id per 3D object) "
                              "instead of numbering each plane's objects separately")
    predict.add_argument("--tta", action="store_true",
                         help="test-time augmentation: predict each tile also rotated and mirrored and average "
                              "the 8 results (about 8 times slower; fewer stray pixels)")
    predict.set_defaults(func=cmd_predict)

    demo = sub.add_parser(
        "demo", help="open napari with the synthetic EM sample, its annotations and the protoseg panel "
                     "(--headless: train, predict and write an overview PNG, no display needed)",
        description="Open napari with the synthetic EM sample, or with --headless run sample -> "
                    "train -> predict without a display and write an overview PNG.")
    mode = demo.add_mutually_exclusive_group()
    mode.add_argument("--screenshot", metavar="PNG", type=Path,
                      help="save a screenshot of the window to PNG and quit (for checks without a person)")
    mode.add_argument("--headless", action="store_true",
                      help="no window: write the sample as a project, train, predict and write "
                           "DIR/overview.png with the figures")
    demo.add_argument("--out", metavar="DIR",
                      help="output folder of --headless (default: ./protoseg-demo)")
    demo.add_argument("--steps", type=_positive_int, metavar="N",
                      help=f"training steps of --headless (default: {DEFAULT_STEPS}; {DEFAULT_CUDA_STEPS} on a CUDA GPU; "
                           "fewer for a quick check)")
    demo.add_argument("--device", choices=DEVICES, default="auto",
                      help="where --headless trains and predicts (default: auto)")
    demo.set_defaults(func=cmd_demo)
    # The benchmark harness is loaded by its own subcommands only (see main): these entries just list them.
    for name, text in BENCHMARK_COMMANDS.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _unexpected(err: BaseException) -> int:
    """One line and a hint for an error no command expected; the traceback goes to a log file."""
    log = None
    try:
        fd, name = tempfile.mkstemp(prefix="protoseg-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"protoseg {' '.join(sys.argv[1:])}\n\n")
            f.write("".join(traceback.format_exception(type(err), err, err.__traceback__)))
        log = name
    except OSError:
        pass
    first = (str(err).strip().splitlines() or [""])[0][:300]
    print(f"protoseg: unexpected error: {type(err).__name__}{': ' + first if first else ''}", file=sys.stderr)
    if isinstance(err, MemoryError) or "out of memory" in first.lower():
        print("hint: the data does not fit into memory here; try a smaller image or --device cpu.",
              file=sys.stderr)
    where = f"the full traceback is in {log}; " if log else ""
    print(f"hint: this is likely a bug in napari-protoseg; {where}run again with {DEBUG_ENV}=1 to "
          "see it here, and include it when you report the problem.", file=sys.stderr)
    return EXIT_INVALID


def _benchmark_main(name: str, argv: list[str]) -> int:
    """Run a benchmark subcommand with its own parser (the harness is imported only here)."""
    if name == "benchmark":
        from napari_protoseg.benchmark import command

        parser = command.build_parser(prog="protoseg benchmark")
        return command.run_from_args(parser.parse_args(argv), argv)
    from napari_protoseg.benchmark import touching

    parser = touching.build_parser(prog="protoseg benchmark-touching")
    return touching.run_from_args(parser.parse_args(argv), argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in BENCHMARK_COMMANDS:
        try:
            return _benchmark_main(argv[0], argv[1:])
        except KeyboardInterrupt:
            print("\nprotoseg: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except CliError as err:
        return _error(err.message, err.details)
    except KeyboardInterrupt:
        print("\nprotoseg: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        if os.environ.get(DEBUG_ENV):
            raise
        return _unexpected(err)


if __name__ == "__main__":
    sys.exit(main())
