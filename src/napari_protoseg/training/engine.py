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
from dataclasses import asdict, dataclass, field, fields, replace
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
from napari_protoseg.model.network import ModelConfig, ProtoSegNet, pick_device
from napari_protoseg.model.file import TORCH_LOAD_ERRORS, TrainedModel, first_line, holds_python_objects
from napari_protoseg.annotations.project import AnnotationSet, Problem, ProjectError, atomic_write, check_image

CHECKPOINT_FORMAT = "napari-protoseg checkpoint"


@dataclass
class TrainConfig:
    """Everything that decides a training run. Defaults fit a 2-core CPU (see docs/benchmarks.md).

    ``instance_heads``: train WISE-Net localization and embedding heads (``instance_embed_dim``
    dims) jointly with the semantic model when the project has classes flagged ``instances: true``;
    their losses enter the total as ``weight_localization * LCFCN + weight_embedding * similarity``.

    ``crop_size`` and ``batch_size`` are the crops of a step. Present tags wider than a crop get
    steps of their own with larger crops (up to 512 px) and about the same pixels
    (:class:`~napari_protoseg.training.crops.CropSampler`).
    """

    # With input_scale 2 a step costs about 0.4 of a full-resolution one (masks+points on the 2-core
    # CPU: 107 vs 272 ms); the budget is 5 minutes for the benchmark's 10 x 1024 x 1024 sections with
    # the panel's live preview. On the benchmark (test sections, with previews) 1350 steps took 130-143
    # s one day, and on another, slower day 2000 steps took 238-318 s and 1800 steps 194-324 s (the
    # pace varied from 120 to 180 ms a step within the day; 1800 steps went past 300 s twice, on its
    # slowest stretch). At the first day's pace (96-106 ms a step) 1800 steps take about 190 s.
    # Validation split, CPU, seeds 0 / 1, mIoU, 2000 vs 1350 steps:
    # masks 0.571 / 0.582 vs 0.549 / 0.573, masks+tags 0.578 / 0.569 vs 0.536 / 0.549, masks+boxes
    # 0.586 / 0.564 vs 0.559 / 0.580, masks+points 0.561 / 0.605 vs 0.534 / 0.565, mixed 0.573 / 0.588
    # vs 0.547 / 0.547, points-only 0.418 / 0.423 vs 0.387 / 0.413, full 0.625 / 0.605 vs 0.571 / 0.626
    # (12 of 14 better, mean +0.023).
    steps: int = 1800
    # 4 crops of 192 px rather than 8 of 128 (about the same pixels and time per step): the U-Net's
    # receptive field is about 190 px, and with that context mitochondria and glia are learnt. Chosen
    # from single runs on test sections 10-19, before the validation split existed (not to repeat):
    # `masks` mIoU 0.550 (seed 0) and 0.537 (seed 1) vs 0.457 with 8 x 128 (mitochondrion IoU 0.60
    # and 0.54 vs 0.28); `mixed` 0.468 vs 0.465-0.486; 2 x 256 gave 0.517 (synapse crops become
    # rare). The benchmark's ablation of `masks` keeps the old crops.
    batch_size: int = 4
    crop_size: int = 192
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    max_grad_norm: float = 5.0  # per group of ProtoSegNet.clipping_groups
    context: int = 0
    base_width: int = 8
    depth: int = 4
    embed_dim: int = 32
    prototypes_per_class: int = 5
    temperature: float = 0.05
    # Mean, as in the reference code. Validation split, today's defaults (540 steps, CPU), masks+tags:
    # mean 0.495 / 0.503 vs max 0.489 / 0.474 (seeds 0 / 1). On the test sections (seed 0, one run
    # each) max led at 00d9563 (0.587 vs 0.555) and trailed in the two complete runs before (0.549 vs
    # 0.578, 0.472 vs 0.497): single runs differ by up to 0.05. At 1800 steps without the filter bank
    # (03c6b14), validation, seed 0: mean 0.575 vs max 0.562; test sections (seed 0) 0.647 vs 0.655.
    tag_pooling: str = "mean"
    # eps of the DSP negative term log(sum_{i in N_c} p_c(i) + eps): a class's negatives are pushed
    # down until their summed probability is well under eps (1e-6: about no limit; 1: until they hold
    # less than one pixel's worth). 1 on the validation split (540 steps): masks 0.501 / 0.478 vs
    # 0.467 / 0.437 (seeds 0 / 1; synapse IoU 0.29 / 0.31 vs 0.18 / 0.16), mixed 0.472 / 0.464 vs
    # 0.450 / 0.468 (mitochondrion AP50, WISE, 0.10 / 0.09 vs 0.11 / 0.13), masks+points 0.498 vs
    # 0.496 with AP50 0.08 vs 0.13, masks+tags 0.418 vs 0.420 (seed 0): not a default (points-only,
    # boxes and full not measured). At today's other defaults, 1 vs 1e-6 on the H100 (validation,
    # 1620 steps, seeds 0 / 1): masks 0.556 / 0.557 vs 0.551 / 0.567, masks+boxes 0.544 / 0.538 vs
    # 0.530 / 0.526, masks+tags 0.541 / 0.526 vs 0.514 / 0.529, masks+points 0.550 / 0.539 vs 0.555 /
    # 0.508; but at 540 steps on the CPU (seed 0) masks+boxes 0.485 vs 0.492, masks+tags 0.477 vs 0.498.
    negative_eps: float = 1e-6
    # The weight, in the DSP negative term, of a (crop, class) pair with negatives but no positive (a
    # class absent from a mask crop, an absent tag's class; losses.dsp_loss). At 1 such a pair pushes
    # its class down however rare it already is, and synapses vanished (IoU 0 in masks+tags at three
    # test seeds). Validation split, 540 steps, weight 0 vs 1: masks 0.515 / 0.501 vs 0.467 / 0.437
    # (seeds 0 / 1; synapse IoU 0.42 / 0.40 vs 0.18 / 0.16), masks+tags 0.473 / 0.492 vs 0.420 /
    # 0.449, masks+boxes 0.479 vs 0.455, mixed 0.476 vs 0.450 (seed 0); 0.1 (so every annotation
    # still teaches): masks 0.509, masks+tags 0.498 (seed 0). Pairs with unpointed-region negatives
    # keep weight 1 (losses.total_loss): without that, weight 0 cost points-only 0.359 -> 0.339 and
    # masks+points 0.496 -> 0.468; with it 0.358 and 0.486 (seed 0).
    negative_only_weight: float = 0.1
    # Scales of the fixed filter bank (ModelConfig.filter_sigmas); none by default. Chosen early on
    # the test sections (1, 2.5, 6.3, 16: masks 0.437 at 300 steps vs 0.399 at 600 without), but at
    # today's defaults the validation split (1800 steps, seeds 0 / 1) favours none in all 8 pairs,
    # with vs without: full 0.630 / 0.631 vs 0.631 / 0.651, masks 0.570 / 0.563 vs 0.582 / 0.571,
    # mixed 0.558 / 0.584 vs 0.604 / 0.592, points-only 0.423 / 0.417 vs 0.425 / 0.439 (mean +0.015,
    # about 10 % faster steps). The benchmark keeps the old scales as an ablation.
    filter_sigmas: tuple[float, ...] = ()
    # Share of crops centred on mask pixels when other annotation types exist too (CropSampler).
    # With fewer crops on weak annotations the dense masks are learnt better in the step budget, and
    # the weak crops' terms are not lost. Paired runs on the validation split (benchmark --validation),
    # 0.5 -> 0.75 (seed 0): mixed 0.436 -> 0.491, masks+boxes 0.437 -> 0.464, masks+tags 0.389 ->
    # 0.428, masks+points 0.477 -> 0.477 (masks alone: 0.466). 0.75 -> 0.9 (H100, seeds 0 / 1, 540
    # steps): masks+tags 0.466 / 0.465 -> 0.486 / 0.508, masks+points 0.481 / 0.475 -> 0.501 / 0.502,
    # mixed 0.487 / 0.485 -> 0.509 / 0.490, masks+boxes 0.475 / 0.493 -> 0.478 / 0.483; at 1620 steps
    # masks+boxes 0.530 / 0.526 -> 0.548 / 0.552, masks+tags 0.514 / 0.529 -> 0.517 / 0.532,
    # masks+points 0.555 / 0.508 -> 0.551 / 0.516; on this CPU (seed 0, 540 steps) masks+tags 0.498 ->
    # 0.515, mixed 0.486 -> 0.490, masks+points 0.484 -> 0.485, masks+boxes 0.492 -> 0.483. Settings
    # with one annotation type (masks, full, points-only) do not use it.
    mask_share: float | None = 0.9
    balance_classes: float = 0.0  # class balance of the cross-entropies, 0 to 1 (see losses._masked_ce)
    weight_contrastive: float = 0.1
    weight_ce: float = 1.0
    # Off by default: a step with the pseudo-label term costs about two without it (the strongly
    # augmented copy doubles the batch), and in about the same training time 600 steps without it
    # beat 300 with it in paired single runs on test sections 10-19, before the validation split
    # existed (masks+tags 0.439 vs 0.410, mixed 0.465 vs 0.461 and 0.486 vs 0.441, full 0.453 vs
    # 0.438). On the validation split with half of the crops on masks, mixed gained from it (300
    # steps with it 0.454, 600 without 0.436). There at mask_share 0.75 and negative_only_weight 0.1,
    # masks+boxes with it at weight 1 for the same 540 steps: 0.480 vs 0.492 without (seed 0),
    # training 726 s vs 440 s. The benchmark ablations of `mixed` measure both.
    weight_pseudo_label: float = 0.0
    pseudo_label_threshold: float | None = 0.8
    pseudo_label_warmup: int = 120
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int = 100
    instance_heads: bool = True
    instance_embed_dim: int = 64
    # The network works at half the image's resolution (ModelConfig.input_scale): each step is about
    # 2.5 x cheaper, its receptive field twice as wide, and the steps that fit the budget are what
    # limits the model here. Validation split, CPU, seeds 0 / 1, mIoU: 1350 half-resolution steps
    # (about the time of 540 at full resolution) vs 540 full-resolution steps: masks 0.549 / 0.573 vs
    # 0.527 / 0.495, full 0.571 / 0.626 vs 0.519 / 0.502, mixed 0.547 vs 0.486 (seed 0); 540 steps
    # at half resolution: masks 0.522 (seed 0). Membranes (about 6 px wide) keep their IoU.
    input_scale: int = 2
    # The localization head's context branch works at 1/4 resolution (ModelConfig.localization_context).
    # Without it the head saw 3 x 3 feature pixels: with a frozen validation-trained `masks+points`
    # backbone, retraining the head alone for 300 steps left 3 of 43 training mitochondria with exactly
    # one blob over 0.5 (74 blobs off any object); with it 24 of 43 (4 off objects).
    localization_context: int = 4
    # The instance embedding: with a context branch as the localization head's (1/4 resolution) and
    # spatial (ModelConfig.instance_coordinates: 1/16 of the pixel position joins its first two
    # channels, so objects 2 x 16 px apart are told apart by position alone). The plain 3 x 3 head
    # of free vectors cannot tell two alike touching mitochondria apart: on the synthetic stack
    # of sample seed 2 (a model trained from points only on seed 0) touching pairs had similarities
    # of 0.7-0.98, and the WISE decoder matched fewer touching mitochondria than the plain ones.
    # With these two, 0.0-0.43 (the same objects' own pixels 0.46-0.92), and WISE's AP50 / touching
    # recall there 0.471 / 0.429 without merging seeds (0.469 / 0.143 with the plain head; the same
    # semantic model at the same thread count). Test sections (benchmark-instances.md vs benchmarks.md), WISE AP50: full 0.723
    # (0.648), mixed 0.587 (0.473), masks+points 0.615 (0.616), points-only 0.042 (0.048). Cost: a
    # training step on the demo sample takes 169-175 ms instead of 147-157 (2 threads, this CPU).
    embedding_context: int = 4
    instance_coordinates: float = 1 / 16
    # With instance_backbone_grad 0 the two heads share no parameter with each other or with the
    # semantic model, each is clipped on its own (max_grad_norm per head) and AdamW's steps do not
    # depend on a constant factor of a loss: these two weights then change about nothing, and stay 1.
    weight_localization: float = 1.0
    weight_embedding: float = 1.0
    # How much of the instance losses' gradient reaches the backbone (0: none, 1: all). Off by default.
    # With the plain localization head, 1 pulled `full`'s mitochondrion IoU from 0.15 to 0.01 (benchmark
    # ablation at 33e4d5a); with the context head (ablation at ac86cf3) `full` keeps its mIoU (0.523)
    # and trades glia (0.36 -> 0.26) for mitochondria (0.45 -> 0.53). On the validation split 1 cost
    # `mixed` and `masks+points` 0.04 and 0.02 mIoU (seed 0), and 0.1 (seeds 0 and 1) left the mIoU
    # unchanged (mean 0.469 vs 0.468) and moved mitochondrion AP50 (components) by +0.076, +0.007,
    # +0.013, -0.029: within the run-to-run noise, so 0 stays.
    instance_backbone_grad: float = 0.0
    # Regions predicted as a class that no exhaustive point of it reaches become its negatives
    # (losses.unpointed_region_negatives). Alone, on the validation split (seeds 0 / 1, with vs
    # without): points-only 0.336 / 0.349 vs 0.335 / 0.339, masks+points 0.491 / 0.499 vs 0.465 /
    # 0.478, mixed 0.458 / 0.459 vs 0.451 / 0.477, a mean gain of 0.008, within the run-to-run noise.
    # It cuts the specks predicted as mitochondria (31 000 -> 12 000 regions); on with point_spread.
    unpointed_negatives: bool = True
    # Radius (px) over which each point is spread to the pixels around it that look like it (within
    # point_spread_tolerance of its smoothed normalised intensity; data.point_regions); they then teach
    # like mask pixels. 0: a point teaches its pixel only. On the validation split (seeds 0 / 1),
    # points-only: radius 5 with unpointed_negatives 0.385 / 0.374 vs 0.336 / 0.349 without spreading
    # (mitochondrion IoU 0.23 / 0.22 vs 0.08), radius 5 alone 0.347 (seed 0) vs 0.335; radius 8 with
    # unpointed_negatives 0.362 (seed 0); spreading only the mitochondria's points 0.202 (their
    # pixels outweigh every other class's). masks+points, radius 5 alone: 0.481 vs 0.465 (seed 0).
    # Both on (the defaults), seeds 0 / 1 vs both off: masks+points 0.480 / 0.487 vs 0.465 / 0.478,
    # mixed 0.462 / 0.480 vs 0.451 / 0.477.
    # With radius 5, spread pixels of the points-only simulation are 98 % right for cytoplasm, 96 % for
    # mitochondria, 87 % for membranes and synapses and 32 % for glia/extracellular, whose objects are
    # mostly specks of a few pixels (median 8 px; their spread lands on membranes more than on glia).
    # Growing each point's radius (5, 8, 12, 16, 24 px, within its halfway cap) while its look-alike
    # region fills at least half of the disk triples the mitochondrion spread pixels (6 100 -> 36 000,
    # 95 % right) but also glia's (25 000 -> 81 000, 34 % right); validation, points-only, 1800 steps,
    # seeds 0 / 1 / 2 (0 / 1 on an H200): 0.429 / 0.398 / 0.394 vs 0.413 / 0.416 / 0.403 at radius 5;
    # at a 0.7 fill 0.410 / 0.399 (seeds 0 / 1). Not adopted. Superpixels (SLIC, Felzenszwalb) were
    # less pure than this flood at every size tried (membrane 0.34-0.73 right vs 0.87).
    point_spread: int = 5
    point_spread_tolerance: float = 0.1
    # An exhaustive point spreads at most halfway to the nearest other exhaustive point of its class in
    # its plane (data.point_radii): they mark different objects. In the points-only simulation this
    # narrows 39 % of the glia/extracellular points (specks in clusters) and no mitochondrion or
    # synapse point. Validation split, 2000 steps, seeds 0 / 1 / 2, with vs without: points-only
    # 0.433 / 0.455 / 0.431 vs 0.418 / 0.423 / 0.412 (mitochondrion IoU 0.43 / 0.42 / 0.43 vs
    # 0.35 at seed 2); seeds 0 / 1: masks+points 0.558 / 0.595 vs 0.561 / 0.605, mixed 0.592 / 0.581
    # vs 0.573 / 0.588 (within the run-to-run noise). A radius per class instead (the 25th percentile
    # of its points' half-distances: glia 1 px, the others 5) gave points-only 0.428 / 0.449.
    # The benchmark's ablation on the test sections (seed 0, 1800 steps) went the other way: 0.404
    # with vs 0.423 without; defaults are chosen on the validation split only.
    point_spread_halfway: bool = True
    # A wall-clock budget in seconds (None: none, and the run is deterministic). Training then measures
    # its pace (previews included) and plans at most as many of ``steps`` as fit in the budget, so the
    # learning rate still decays to its end in time on a slow machine; the steps done are recorded in
    # the model. The panel trains with session.PANEL_TIME_LIMIT by default; the command line and the
    # benchmark only when asked. A resumed run gets the budget anew. Validation split, `mixed`, seed 0,
    # 1 thread: a 150 s limit on 1800 steps did 726 in 152 s, mIoU 0.532; 726 steps asked 0.522; the
    # 1800-step schedule stopped at step 726 0.531 (all 1800 steps, without a limit: 0.604).
    time_limit: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The configuration a dict describes; a field missing from it (a checkpoint or result
        written before the field existed) takes the value that was in effect then, not today's
        default, so resuming or merging such a run keeps meaning what it meant."""
        known = {f.name for f in fields(cls)}
        return cls(**{**_BEFORE_FIELD_EXISTED, **{k: v for k, v in data.items() if k in known}})

    def model_config(self, n_classes: int, n_instance_classes: int = 0) -> ModelConfig:
        """The network for ``n_classes`` classes, ``n_instance_classes`` of them flagged ``instances``
        (heads only with ``instance_heads``)."""
        return ModelConfig(n_classes=n_classes, in_channels=2 * self.context + 1, base_width=self.base_width,
                           depth=self.depth, embed_dim=self.embed_dim,
                           prototypes_per_class=self.prototypes_per_class, temperature=self.temperature,
                           n_instance_classes=n_instance_classes if self.instance_heads else 0,
                           instance_embed_dim=self.instance_embed_dim, filter_sigmas=tuple(self.filter_sigmas),
                           localization_context=self.localization_context, input_scale=self.input_scale,
                           embedding_context=self.embedding_context,
                           instance_coordinates=self.instance_coordinates)


# Default steps with a CUDA GPU: the CPU's 540 are about a minute there (an H100 with 16 CPU cores,
# where the crops and losses, not the GPU, set the pace: about 0.1 s a step), and three times as many
# fit within the same 5-minute budget (about 190 s at that pace). On the validation split (seed 0,
# CPU), 1620 steps vs 540 gave masks 0.512 vs 0.467 mIoU and masks+points 0.529 vs 0.496
# (mitochondrion AP50, WISE decoder, 0.18 vs 0.13). On the H100 itself (validation, seeds 0 / 1),
# 1620 steps gave masks 0.551 / 0.567 and full 0.615 / 0.597 (540 on the CPU, seed 0: 0.509 and
# 0.514). These were full-resolution steps (input_scale 1); at half resolution (the default since)
# the GPU's share of a step shrinks, and the crops and losses at full resolution stay. Since the CPU
# default became 1800 half-resolution steps, CUDA trains 2400. Measured on an H200 (torch 2.11, one
# process, 2 threads, benchmark rows): a half-resolution step takes 67-74 ms (masks+points: crops 6,
# forward 6, DSP loss 13, instance losses 35, backward 12, optimiser 2), so 2400 steps take about
# 170 s plus previews; half of a step is the instance losses, whose targets the CPU computes. Test
# sections (seed 0, 2400 steps, ten runs sharing the GPU: 339-359 s each): full 0.676, mixed 0.652,
# masks+points 0.642, points-only 0.412 (1800 on the CPU: 0.679, 0.631, 0.643, 0.387). MPS is not
# measured: it keeps the CPU's default.
CUDA_STEPS = 2400


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


# What training did before each of these fields was added (see TrainConfig.from_dict).
_BEFORE_FIELD_EXISTED = {"filter_sigmas": (), "mask_share": None, "balance_classes": 0.0,
                         "instance_heads": False, "instance_backbone_grad": True, "localization_context": 0,
                         "unpointed_negatives": False, "point_spread": 0, "negative_only_weight": 1.0,
                         "input_scale": 1, "point_spread_halfway": False, "time_limit": None,
                         "embedding_context": 0, "instance_coordinates": 0.0}


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
    where predicting it would otherwise take more than ``max_time_share`` of the training time (on
    a 2-core CPU a 512 x 512 preview took over a second, and every 5 s it lengthened the benchmark's
    training by 15-30 %; without the instance heads it takes about 0.6 s)."""

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
                   object_areas: dict) -> dict:
    summary = annotations.summary()
    return {"steps": step, "annotations": summary["classes"], "totals": summary["totals"],
            "planes_annotated": summary["planes_annotated"], "last_losses": losses,
            "train_config": config.to_dict(), "object_areas": object_areas}


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


def _with_instance_heads(net: ProtoSegNet, n_instance_classes: int, config: TrainConfig) -> ProtoSegNet:
    """A copy of ``net`` with fresh instance heads for ``n_instance_classes`` classes (none for 0),
    as ``config`` describes them; the backbone, DSP head and prototypes keep their weights."""
    config = replace(net.config, n_instance_classes=n_instance_classes, instance_embed_dim=config.instance_embed_dim,
                     localization_context=config.localization_context, embedding_context=config.embedding_context,
                     instance_coordinates=config.instance_coordinates)
    new = ProtoSegNet(config).to(next(net.parameters()).device)
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
        config = TrainConfig.from_dict(state["train_config"])

    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)

    classes = list(annotations.classes)
    instance_indices = [i for i, c in enumerate(classes) if c.instances]
    if initial_model is not None:
        normalization = initial_model.normalization
        net = initial_model.net
        context = initial_model.context
        wanted = len(instance_indices) if config.instance_heads else net.config.n_instance_classes
        if net.config.n_instance_classes != wanted:
            net = _with_instance_heads(net, wanted, config)
    else:
        normalization = Normalization.from_image(image, seed=config.seed)
        net = ProtoSegNet(config.model_config(len(classes), len(instance_indices)))
        context = config.context
    if state is not None:
        normalization = Normalization.from_dict(state["normalization"])
        net = ProtoSegNet(ModelConfig.from_dict(state["model_config"]))
        net.load_state_dict(state["model"])
        context = net.config.in_channels // 2
    net.to(device)
    sampler = CropSampler(image, annotations, normalization, crop_size=config.crop_size, context=context,
                          mask_share=config.mask_share, point_spread=config.point_spread,
                          point_spread_tolerance=config.point_spread_tolerance,
                          point_spread_halfway=config.point_spread_halfway)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
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
                            training_info=_training_info(annotations, step, losses, config, object_areas))

    def save_checkpoint() -> str | None:
        if checkpoint_path is None:
            return None
        # Tensors and plain values only (the NumPy random state is a dict of ints and strings, the
        # schedule's state its step count): read_checkpoint loads them with weights_only=True.
        _atomic_torch_save({
            "format": CHECKPOINT_FORMAT, "step": step, "train_config": config.to_dict(),
            "model_config": net.config.to_dict(), "model": net.state_dict(),
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
