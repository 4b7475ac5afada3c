"""The training engine shared by the napari panel, the command line and the benchmark.

``train(...)`` is a generator of :class:`TrainEvent`s: the caller iterates it (in a background
thread in napari), reads progress, loss terms and previews, and stops it between steps with a
``stop`` callable or by closing the generator. Checkpoints (model, optimiser, step, random states,
configuration) are written periodically and when training ends or is stopped; training resumes
from them bit for bit on the CPU. They hold tensors and plain values only and are read without
unpickling anything else (:func:`read_checkpoint`), so a checkpoint never runs code.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from napari_protoseg.training.crops import (
    LARGEST_TAG_CROP,
    CropSampler,
    Normalization,
    present_tag_sides,
    tag_crop_limit,
)
from napari_protoseg.prediction.tiling import predict_plane, predict_region
from napari_protoseg.training.instance_losses import instance_loss
from napari_protoseg.prediction.decoders import object_area_summary, sizes_at_points
from napari_protoseg.training.losses import LossWeights, negative_map, strong_augment, total_loss
from napari_protoseg.model.migration import CONFIG_VERSION, VERSION_KEY, upgrade_train_config
from napari_protoseg.model.encoder import apply_encoder, encoder_for_training
from napari_protoseg.model.network import INSTANCE_HEAD_FIELDS, ModelConfig, ProtoSegNet, pick_device
from napari_protoseg.model.file import TORCH_LOAD_ERRORS, TrainedModel, first_line, holds_python_objects
from napari_protoseg.annotations.project import AnnotationSet, Problem, ProjectError, atomic_write, check_image

CHECKPOINT_FORMAT = "napari-protoseg checkpoint"


@dataclass
class TrainConfig:
    """Everything that decides a training run; the defaults fit a 2-core CPU, and why each is what
    it is: ``docs/decisions.md``.

    ``model`` is the network (:class:`~napari_protoseg.model.network.ModelConfig`) for any project:
    training fills in its ``n_classes`` and ``n_instance_classes`` from the project's classes, so
    leave those unset. Older stored configurations load through :meth:`from_dict`.
    """

    steps: int = 1800  # optimiser steps (CUDA_STEPS on a CUDA GPU: default_train_config)
    # Crops per step and their side (px). Present tags wider than a crop get steps of their own with
    # larger crops (up to 512 px) and about the same pixels (CropSampler).
    batch_size: int = 4
    crop_size: int = 192
    learning_rate: float = 3e-3  # AdamW's peak learning rate (WarmupCosine: warm-up, cosine decay)
    weight_decay: float = 1e-4  # AdamW's weight decay
    max_grad_norm: float = 5.0  # gradient clipping, per group of ProtoSegNet.clipping_groups
    # The network: half resolution, context heads and a spatial instance embedding (ModelConfig).
    model: ModelConfig = field(default_factory=ModelConfig)
    # Pretrained weights the backbone and DSP head start from: None (random), "shipped" (the
    # package's EM encoder) or an encoder file (model.encoder; 'protoseg pretrain' makes one).
    encoder: str | None = None
    # Learning rate of a pretrained backbone and DSP head, as a share of learning_rate.
    encoder_learning_rate: float = 1.0
    # How a present tag pools its class's probability over its region: "mean", "max" or "smoothmax".
    tag_pooling: str = "mean"
    # eps of the DSP negative term log(sum_{i in N_c} p_c(i) + eps): a class's negatives are pushed
    # down until their summed probability is well under eps (1e-6: about no limit).
    negative_eps: float = 1e-6
    # Weight, in the DSP negative term, of a (crop, class) pair with negatives but no positive (a class
    # absent from a mask crop, an absent tag's class; losses.dsp_loss).
    negative_only_weight: float = 0.1
    # Share of crops centred on mask pixels when other annotation types exist too (CropSampler;
    # None: every type alike).
    mask_share: float | None = 0.9
    balance_classes: float = 0.0  # class balance of the cross-entropies, 0 to 1 (see losses._masked_ce)
    weight_contrastive: float = 0.1  # weight of the DSP contrastive loss in the total
    weight_ce: float = 1.0  # weight of the cross-entropy on mask and point pixels
    # Weight of the pseudo-label term on a strongly augmented copy of the batch (0: off).
    weight_pseudo_label: float = 0.0
    pseudo_label_threshold: float | None = 0.8  # confidence a pseudo label needs (None: any)
    pseudo_label_warmup: int = 120  # steps before the pseudo-label term starts
    seed: int = 0  # seeds crops, augmentation and initial weights: the same run on the CPU
    device: str = "auto"  # "auto" (CUDA, else MPS, else CPU), "cpu", "cuda" or "mps"
    checkpoint_every: int = 100  # steps between checkpoints (0: only when the run ends or stops)
    # Train WISE-Net localization and embedding heads for the classes flagged ``instances``.
    instance_heads: bool = True
    # Weights of the instance losses in the total: weight_localization * LCFCN + weight_embedding *
    # similarity.
    weight_localization: float = 1.0
    weight_embedding: float = 1.0
    # How much of the instance losses' gradient reaches the backbone (0: none, 1: all).
    instance_backbone_grad: float = 0.0
    # Regions predicted as a class that no exhaustive point of it reaches become its negatives
    # (losses.unpointed_region_negatives).
    unpointed_negatives: bool = True
    # Radius (px) over which each point teaches the pixels around it that look like it (within
    # point_spread_tolerance of its smoothed normalised intensity; crops.point_regions). 0: its pixel.
    point_spread: int = 5
    point_spread_tolerance: float = 0.1
    # An exhaustive point spreads at most halfway to the nearest other exhaustive point of its class
    # in its plane (crops.point_radii): they mark different objects.
    point_spread_halfway: bool = True
    # A wall-clock budget in seconds (None: none, and the run is deterministic): training plans at
    # most as many of ``steps`` as fit at its pace, so the learning rate still decays to its end.
    time_limit: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, ModelConfig):
            raise TypeError(f"TrainConfig.model must be a ModelConfig, got {type(self.model).__name__}")
        if self.model.n_classes is not None or self.model.n_instance_classes is not None:
            raise ValueError("TrainConfig.model must leave n_classes and n_instance_classes unset: training "
                             "takes them from the project's classes")
        if self.model.in_channels % 2 == 0:
            raise ValueError(f"TrainConfig.model.in_channels must be odd (2 * context + 1: the section and "
                             f"its neighbours on each side), got {self.model.in_channels}")

    def to_dict(self) -> dict:
        """A plain dict of JSON types in the current format (its version under ``config_version``),
        the network's fields nested under ``"model"``."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {VERSION_KEY: CONFIG_VERSION, **data, "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The configuration a stored dict describes, of any format version
        (:func:`~napari_protoseg.model.migration.upgrade_train_config`): an older one, flat or
        lacking fields added since, means what it meant when it was written. Unknown or missing
        keys of the current format raise ``ValueError``."""
        data = upgrade_train_config(data)
        model = ModelConfig.from_dict(data.pop("model"))
        known = {f.name for f in fields(cls)} - {"model"}
        unknown, missing = set(data) - known, known - set(data)
        if unknown or missing:
            raise ValueError("the training configuration " + "; ".join(
                text for text in (f"has unknown keys {sorted(unknown)}" if unknown else "",
                                  f"lacks the keys {sorted(missing)}" if missing else "") if text))
        return cls(model=model, **data)

    def with_changes(self, changes: dict) -> TrainConfig:
        """This configuration with ``changes``, given as :meth:`to_dict` gives fields (the network's
        nested under ``"model"``, e.g. ``{"steps": 720, "model": {"input_scale": 1}}``); unknown
        fields raise ``ValueError``."""
        changes = dict(changes)
        model_changes = changes.pop("model", {})
        unknown = set(changes) - {f.name for f in fields(self)}
        unknown |= {f"model.{k}" for k in set(model_changes) - {f.name for f in fields(ModelConfig)}}
        if unknown:
            raise ValueError(f"unknown training option(s): {sorted(unknown)}")
        return replace(self, model=replace(self.model, **model_changes), **changes)


CUDA_STEPS = 2400  # default steps on a CUDA GPU: about the CPU default's training time there


def default_train_config(device: str = "auto", **changes) -> TrainConfig:
    """The default :class:`TrainConfig` for ``device`` (``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"``):
    :data:`CUDA_STEPS` steps where it resolves to a CUDA GPU, ``TrainConfig().steps`` elsewhere (the
    pseudo-label warm-up keeps its share of the steps); ``changes`` override any field."""
    config = TrainConfig(device=device)
    try:
        kind = pick_device(device).type
    except ValueError:  # an unavailable device: training will say so; the defaults stay
        kind = "cpu"
    if kind == "cuda":
        config = replace(config, steps=CUDA_STEPS, pseudo_label_warmup=warmup_for_steps(config, CUDA_STEPS))
    return replace(config, **changes)


def warmup_for_steps(config: TrainConfig, steps: int) -> int:
    """``config``'s pseudo-label warm-up for a run of ``steps`` steps: the same share of training."""
    return round(config.pseudo_label_warmup * steps / config.steps)


@dataclass
class TrainEvent:
    """Progress of a training run after ``step`` of ``total_steps`` optimiser steps."""

    step: int
    total_steps: int
    losses: dict[str, float]
    elapsed: float
    eta: float
    device: str
    preview: np.ndarray | None = None  # class ids of the preview region, when asked for
    checkpoint: str | None = None  # path written at this step, if any
    finished: bool = False
    stopped: bool = False
    model: TrainedModel | None = field(default=None, repr=False)  # the current model, on the last event
    time_limited: bool = False  # the last event of a run that its time limit ended before the steps asked
    requested_steps: int | None = None  # the steps asked for, on the last event (total_steps may be fewer)


@dataclass
class PreviewRequest:
    """A region whose prediction is sent with the progress every ``every_seconds``, or less often
    where predicting it would otherwise take more than ``max_time_share`` of the training time
    (previews are not free on a CPU: docs/decisions.md)."""

    z: int
    y0: int
    x0: int
    y1: int
    x1: int
    every_seconds: float = 5.0
    max_time_share: float = 0.1


def preview_interval(every_seconds: float, preview_seconds: float, max_time_share: float) -> float:
    """Seconds from the end of one preview to the start of the next: ``every_seconds``, or longer so
    that previews taking ``preview_seconds`` each use at most ``max_time_share`` (0 to 1) of the time."""
    if not 0.0 < max_time_share <= 1.0:
        raise ValueError(f"max_time_share must be in (0, 1], got {max_time_share!r}")
    return max(float(every_seconds), preview_seconds * (1.0 - max_time_share) / max_time_share)


def check_training_input(image: np.ndarray, annotations: AnnotationSet) -> list[Problem]:
    """What keeps training from starting, in words a user can act on (empty when fine)."""
    problems = check_image(image)
    if problems:
        return problems
    if tuple(image.shape) != annotations.image_shape:
        return [Problem("annotations", f"were drawn on an image of shape {annotations.image_shape}, "
                        f"but the image has shape {tuple(image.shape)}.")]
    problems = annotations.validate()
    if problems:
        return problems
    if len(annotations.classes) < 2:
        problems.append(Problem("classes", "there is only one class; a segmentation needs at least two "
                                "(for example the organelle and everything else). Add a class."))
    if not annotations.has_annotations():
        problems.append(Problem("annotations", "nothing is annotated yet. Paint a few strokes, draw a box, "
                                "click points or tag a plane, then train."))
    return problems


def training_notes(annotations: AnnotationSet) -> list[str]:
    """What training will not use although it was drawn, in words a user can act on (empty when
    everything counts); training still runs."""
    too_large = int(np.count_nonzero(present_tag_sides(annotations) > tag_crop_limit(annotations)))
    if not too_large:
        return []
    return [f"{too_large} 'present' tag(s) cover a region wider than {LARGEST_TAG_CROP} pixels, and training "
            f"cannot use them: a present tag only says the class is somewhere in its region, so it teaches only "
            f"in a training crop that holds the whole region (at most {LARGEST_TAG_CROP} x {LARGEST_TAG_CROP}). "
            "Zoom in until the view is at most that wide and tag the visible region, or mark objects with "
            "points or boxes. 'Absent' tags of any size are used."]


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path: str | os.PathLike) -> dict:
    """The content of a training checkpoint, read with ``torch.load(weights_only=True)``: tensors and
    plain values only, so that resuming from a file someone handed over never runs code from it.

    Raises :class:`ProjectError` (one problem naming the file) where the file is missing, damaged,
    not a checkpoint, or holds other Python objects (a checkpoint of an older version, which
    stored them, is refused rather than unpickled).
    """
    path = Path(path)

    def refused(message: str) -> ProjectError:
        return ProjectError([Problem(str(path), message)])

    if not path.is_file():
        raise refused("is a folder, not a checkpoint file." if path.is_dir() else "does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        if holds_python_objects(err):
            raise refused("holds Python objects besides weights and plain values, which napari-protoseg does "
                          "not load because loading them could run code: this checkpoint was written by an "
                          "older version of napari-protoseg or by another program. Retrain, or continue from "
                          "the model file saved with it (the panel's 'Continue training' after loading it; "
                          "in Python train(..., initial_model=load_model(...))).") from None
        raise refused(f"cannot be read: it is not a PyTorch file or it is damaged ({first_line(err)}).") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise refused("is not a protoseg training checkpoint.")
    return state


def _training_info(annotations: AnnotationSet, step: int, losses: dict, config: TrainConfig,
                   object_areas: dict, encoder: str | None = None) -> dict:
    summary = annotations.summary()
    return {"steps": step, "annotations": summary["classes"], "totals": summary["totals"],
            "planes_annotated": summary["planes_annotated"], "last_losses": losses,
            "train_config": config.to_dict(), "object_areas": object_areas, "encoder": encoder}


class WarmupCosine:
    """Learning-rate factor: linear warm-up over 5 % of ``steps``, then cosine decay to 5 %.

    ``steps`` may be lowered during training (a time limit); an object rather than a closure, so the
    scheduler's state (and a checkpoint) keeps it."""

    def __init__(self, steps: int):
        self.steps = int(steps)

    def __call__(self, step: int) -> float:
        warmup = max(1, self.steps // 20)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, self.steps - warmup))
        return 0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress))


PACE_STEPS = 20  # steps measured before a time limit plans fewer steps than asked


def planned_steps(requested: int, step: int, steps_timed: int, elapsed: float, time_limit: float) -> int:
    """The steps a run limited to ``time_limit`` seconds plans: ``requested``, or fewer where the pace
    so far (``steps_timed`` steps in ``elapsed`` s) would take it past the limit; never fewer than
    ``step``, the steps done. The pace is trusted after :data:`PACE_STEPS` steps, or at once when the
    time is up."""
    if elapsed >= time_limit:
        return min(requested, step)
    if steps_timed < PACE_STEPS:
        return requested
    pace = elapsed / steps_timed
    return max(step, min(requested, step + int((time_limit - elapsed) / pace)))


def _parameter_groups(net: ProtoSegNet, config: TrainConfig, pretrained: bool) -> list[dict]:
    """The optimiser's parameter groups: a pretrained backbone and DSP head learn at
    ``encoder_learning_rate`` times the learning rate (keeping more of what pretraining taught)."""
    scale = config.encoder_learning_rate if pretrained else 1.0
    if scale == 1.0:
        return [{"params": list(net.parameters())}]
    encoder = [p for name, p in net.named_parameters() if name.startswith(("backbone.", "head."))]
    ids = {id(p) for p in encoder}
    rest = [p for p in net.parameters() if id(p) not in ids]
    return [{"params": encoder, "lr": config.learning_rate * scale}, {"params": rest}]


def _with_instance_heads(net: ProtoSegNet, n_instance_classes: int, config: TrainConfig) -> ProtoSegNet:
    """A copy of ``net`` with fresh instance heads for ``n_instance_classes`` classes (none for 0),
    as ``config.model`` describes them; the backbone, DSP head and prototypes keep their weights
    and their configuration."""
    heads = {name: getattr(config.model, name) for name in INSTANCE_HEAD_FIELDS}
    new = ProtoSegNet(replace(net.config, n_instance_classes=n_instance_classes, **heads))
    new = new.to(next(net.parameters()).device)
    kept = {k: v for k, v in net.state_dict().items()
            if not k.startswith(("localization_head.", "instance_embedding_head."))}
    new.load_state_dict(kept, strict=False)
    return new


def train(
    image: np.ndarray,
    annotations: AnnotationSet,
    config: TrainConfig | None = None,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    initial_model: TrainedModel | None = None,
    preview: PreviewRequest | None = None,
    stop: Callable[[], bool] | None = None,
    report_every: int = 1,
) -> Iterator[TrainEvent]:
    """Train a DSP model on whatever ``annotations`` hold; yields a :class:`TrainEvent` per step.

    ``config``: default :func:`default_train_config` (more steps on a CUDA GPU).
    ``resume``: a checkpoint to continue from (its configuration wins over ``config``).
    ``initial_model``: start from these weights (e.g. "continue training" after new annotations).
    ``stop``: polled between steps; when it returns True a checkpoint is written and the last
    event has ``stopped=True``. The last event always carries the model.
    """
    config = default_train_config() if config is None else config
    problems = check_training_input(image, annotations)
    if problems:
        raise ProjectError(problems)

    state = read_checkpoint(resume) if resume is not None else None
    if state is not None:
        try:
            config = TrainConfig.from_dict(state["train_config"])
            resumed_net = ModelConfig.from_dict(state["model_config"], state.get(VERSION_KEY))
        except (TypeError, ValueError) as err:
            raise ProjectError([Problem(str(resume), f"cannot be resumed: {err}.")]) from None

    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)

    classes = list(annotations.classes)
    instance_indices = [i for i, c in enumerate(classes) if c.instances]
    started_from = None  # the encoder the network started from (TrainConfig.encoder, where one applied)
    if initial_model is not None:
        normalization = initial_model.normalization
        net = initial_model.net
        context = initial_model.context
        wanted = len(instance_indices) if config.instance_heads else net.config.n_instance_classes
        if net.config.n_instance_classes != wanted:
            net = _with_instance_heads(net, wanted, config)
    else:
        normalization = Normalization.from_image(image, seed=config.seed)
        net = ProtoSegNet(replace(config.model, n_classes=len(classes),
                                  n_instance_classes=len(instance_indices) if config.instance_heads else 0))
        context = net.config.in_channels // 2
        if state is None:
            encoder, started_from = encoder_for_training(config.encoder, net.config)
            if encoder is not None:
                apply_encoder(net, encoder, source=f"The encoder '{config.encoder}'")
    if state is not None:
        normalization = Normalization.from_dict(state["normalization"])
        net = ProtoSegNet(resumed_net)
        net.load_state_dict(state["model"])
        context = net.config.in_channels // 2
    net.to(device)
    sampler = CropSampler(image, annotations, normalization, crop_size=config.crop_size, context=context,
                          mask_share=config.mask_share, point_spread=config.point_spread,
                          point_spread_tolerance=config.point_spread_tolerance,
                          point_spread_halfway=config.point_spread_halfway)
    optimizer = torch.optim.AdamW(_parameter_groups(net, config, pretrained=started_from is not None),
                                  lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    clipping_groups = net.clipping_groups()
    schedule = WarmupCosine(config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
        rng.bit_generator.state = state["numpy_rng"]
        generator.set_state(state["torch_generator"].to(generator.get_state().device))
        torch.set_rng_state(state["torch_rng"])
    requested_steps = config.steps
    weights = LossWeights(config.weight_contrastive, config.weight_ce, config.weight_pseudo_label)
    # A network whose heads do not fit the project's instance classes (e.g. an older model to
    # continue from) trains its semantic part only.
    use_instances = 0 < net.config.n_instance_classes == len(instance_indices) and (
        config.weight_localization > 0 or config.weight_embedding > 0)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
    losses: dict[str, float] = {}
    object_areas = object_area_summary(annotations)

    def current_model() -> TrainedModel:
        return TrainedModel(net=net, classes=classes, normalization=normalization, context=context,
                            training_info=_training_info(annotations, step, losses, config, object_areas,
                                                         started_from))

    def save_checkpoint() -> str | None:
        if checkpoint_path is None:
            return None
        # Tensors and plain values only (the NumPy random state is a dict of ints and strings, the
        # schedule's state its step count): read_checkpoint loads them with weights_only=True.
        _atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "step": step, "train_config": config.to_dict(),
            "model_config": net.config.to_dict(), VERSION_KEY: CONFIG_VERSION, "model": net.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "normalization": normalization.to_dict(), "numpy_rng": rng.bit_generator.state,
            "torch_generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
            "classes": [c.to_json() for c in classes],
        }, checkpoint_path)
        return str(checkpoint_path)

    start = time.perf_counter()
    first_step = step
    last_preview = -float("inf")
    preview_wait = 0.0
    finished_cleanly = False
    try:
        while step < config.steps:
            if stop is not None and stop():
                break
            net.train()
            x, targets = sampler.sample(config.batch_size, rng)
            x, targets = x.to(device), targets.to(device)
            use_pl = config.weight_pseudo_label > 0 and step >= config.pseudo_label_warmup
            if use_pl:
                strong = strong_augment(x, generator)
                outputs = net(torch.cat([x, strong]), instance_batch=len(x),
                              instance_backbone_grad=config.instance_backbone_grad, sampled_embedding=True)
                logits, strong_logits = outputs["logits"][: len(x)], outputs["logits"][len(x):]
            else:
                outputs = net(x, instance_backbone_grad=config.instance_backbone_grad, sampled_embedding=True)
                logits, strong_logits = outputs["logits"], None
            negatives = negative_map(targets, len(classes), *targets.crop_shape)
            terms = total_loss(logits, targets, strong_logits, weights=weights, tag_pooling=config.tag_pooling,
                               eps=config.negative_eps, pl_threshold=config.pseudo_label_threshold,
                               balance_classes=config.balance_classes, unpointed_negatives=config.unpointed_negatives,
                               negative_only_weight=config.negative_only_weight, negatives=negatives)
            if use_instances:
                instance_terms = instance_loss(outputs["localization"], outputs["instance_embedding"], logits,
                                               targets, instance_indices, rng=rng, negatives=negatives)
                terms["total"] = (terms["total"] + config.weight_localization * instance_terms["localization"]
                                  + config.weight_embedding * instance_terms["embedding"])
                terms.update(instance_terms)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            for group in clipping_groups:
                torch.nn.utils.clip_grad_norm_(group, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            losses = {k: float(v.detach()) for k, v in terms.items()}

            elapsed = time.perf_counter() - start
            if config.time_limit is not None:
                planned = planned_steps(requested_steps, step, step - first_step, elapsed, config.time_limit)
                if planned != config.steps:
                    config = replace(config, steps=planned)
                    schedule.steps = planned
            eta = elapsed / (step - first_step) * (config.steps - step)
            checkpoint = None
            if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
                checkpoint = save_checkpoint()
            preview_map = None
            if preview is not None and time.perf_counter() - last_preview >= preview_wait:
                preview_start = time.perf_counter()
                preview_map = predict_region(current_model(), image, preview.z, preview.y0, preview.x0,
                                             preview.y1, preview.x1, device=device).classes
                last_preview = time.perf_counter()
                preview_wait = preview_interval(preview.every_seconds, last_preview - preview_start,
                                                preview.max_time_share)
            if step % report_every == 0 or preview_map is not None or checkpoint is not None:
                yield TrainEvent(step, config.steps, losses, elapsed, eta, str(device), preview_map, checkpoint)
        finished_cleanly = True
    finally:
        # Also reached when the consumer closes the generator: keep the last state on disk.
        checkpoint = save_checkpoint()
    net.eval()
    if step > 0:  # how large the objects that only points mark are, from the model's own objects at them
        model = current_model()
        object_areas.update(sizes_at_points(lambda zs: np.stack([predict_plane(
            model, image, z if annotations.is_stack else None, device=device).classes for z in zs]), annotations))
    yield TrainEvent(step, config.steps, losses, time.perf_counter() - start, 0.0, str(device), None, checkpoint,
                     finished=step >= config.steps, stopped=finished_cleanly and step < config.steps,
                     model=current_model(), time_limited=step >= config.steps and config.steps < requested_steps,
                     requested_steps=requested_steps)
