"""Self-supervised pretraining: a network's backbone and DSP head learn from unlabelled EM.

``pretrain(images, config)`` is a generator of :class:`PretrainEvent`s, as ``training.engine.train``
is: the caller iterates it (in a worker thread in napari), reads its progress and stops it between
steps with ``stop``. The last event carries the :class:`~napari_protoseg.model.encoder.Encoder`,
which ``protoseg pretrain`` writes to a file and ``TrainConfig.encoder`` starts training from.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from napari_protoseg import __version__
from napari_protoseg.annotations.project import Problem, ProjectError, check_image
from napari_protoseg.model.encoder import Encoder, apply_encoder
from napari_protoseg.model.inputs import Normalization
from napari_protoseg.model.network import ModelConfig, ProtoSegNet, pick_device
from napari_protoseg.pretraining.objectives import (
    OBJECTIVES,
    dense_contrastive_loss,
    masked_reconstruction_loss,
    reconstruction_head,
)
from napari_protoseg.training.engine import PACE_STEPS, WarmupCosine, planned_steps

__all__ = ["PretrainConfig", "PretrainEvent", "pretrain", "pretraining_network"]


@dataclass
class PretrainConfig:
    """Everything that decides a pretraining run; why each default is what it is: ``docs/decisions.md``."""

    objective: str = "contrastive"  # "contrastive" (dense, two views) or "masked" (masked reconstruction)
    steps: int = 3000  # optimiser steps (fewer where time_limit ends the run first)
    time_limit: float | None = None  # seconds; the learning rate still decays to the run's end
    batch_size: int = 4  # crops per step
    crop_size: int = 192  # side of a view (px)
    learning_rate: float = 1e-3  # AdamW's peak learning rate (warm-up, cosine decay)
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "auto"
    # The network whose backbone and DSP head learn: the training default (single sections).
    model: ModelConfig = field(default_factory=ModelConfig)
    shift: int = 64  # largest offset (px) between the two views of the contrastive objective
    pixels: int = 256  # image points per crop that the contrastive objective compares
    temperature: float = 0.2  # of the contrastive objective's InfoNCE
    patch: int = 16  # side (px) of the patches the masked objective hides
    mask_ratio: float = 0.5  # share of the patches it hides

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"PretrainConfig.objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.model.n_classes is not None:
            raise ValueError("PretrainConfig.model must leave n_classes unset")
        if not 0 <= self.shift < self.crop_size:
            raise ValueError(f"PretrainConfig.shift must be from 0 to crop_size - 1, got {self.shift}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["model"] = self.model.to_dict()
        return data


@dataclass
class PretrainEvent:
    """Progress of a pretraining run; the last event (``finished`` or ``stopped``) holds the encoder."""

    step: int
    total_steps: int
    loss: float
    elapsed: float
    device: str
    finished: bool = False
    stopped: bool = False
    encoder: Encoder | None = None


def pretraining_network(config: PretrainConfig) -> ProtoSegNet:
    """The network pretraining trains (one class: its prototypes are not used)."""
    return ProtoSegNet(replace(config.model, n_classes=1, n_instance_classes=0))


class _CropSource:
    """Random normalised crops of one or more unlabelled images (planes or stacks)."""

    def __init__(self, images: Sequence[np.ndarray], side: int, seed: int):
        self.images = []
        for i, image in enumerate(images):
            problems = check_image(image, file=f"image {i + 1}")
            if problems:
                raise ProjectError(problems)
            stack = image if image.ndim == 3 else image[None]
            if min(stack.shape[-2:]) < side:
                raise ProjectError([Problem(f"image {i + 1}", f"is {stack.shape[-2]} x {stack.shape[-1]} px; "
                                            f"pretraining needs planes of at least {side} x {side} px.")])
            # Intensity range from at most 8 planes: a lazy (zarr, dask) stack is never read whole.
            planes = np.random.default_rng(seed).permutation(stack.shape[0])[:8]
            sampled = np.stack([np.asarray(stack[int(z)]) for z in sorted(planes)])
            self.images.append((stack, Normalization.from_image(sampled, seed=seed)))
        if not self.images:
            raise ProjectError([Problem("pretraining", "has no image to learn from.")])
        sizes = np.array([s.shape[0] * s.shape[1] * s.shape[2] for s, _ in self.images], dtype=float)
        self.weights = sizes / sizes.sum()
        self.side = side

    def sample(self, n: int, rng: np.random.Generator) -> torch.Tensor:
        crops = np.empty((n, 1, self.side, self.side), dtype=np.float32)
        for j in range(n):
            stack, norm = self.images[rng.choice(len(self.images), p=self.weights)]
            z = rng.integers(stack.shape[0])
            y = rng.integers(stack.shape[1] - self.side + 1)
            x = rng.integers(stack.shape[2] - self.side + 1)
            crops[j, 0] = norm(stack[z, y:y + self.side, x:x + self.side])
        return torch.from_numpy(crops)


def _crop_geometry(config: PretrainConfig, images: Sequence[np.ndarray], multiple: int) -> tuple[int, int]:
    """Crop side and view shift that fit the smallest plane: the configured ones, or for small images
    a crop of about four fifths of the plane (a multiple of the network's ``multiple``) shifted by at
    most the rest."""
    smallest = min((min(np.shape(image)[-2:]) for image in images), default=0)
    crop, shift = config.crop_size, config.shift if config.objective == "contrastive" else 0
    if crop + shift <= smallest:
        return crop, shift
    crop = (smallest * 4 // 5) // multiple * multiple if shift else smallest // multiple * multiple
    crop = max(crop, multiple)
    shift = min(shift, (smallest - crop) // config.model.input_scale * config.model.input_scale)
    return crop, max(shift, 0)


def pretrain(
    images: Sequence[np.ndarray],
    config: PretrainConfig | None = None,
    *,
    init: Encoder | None = None,
    stop: Callable[[], bool] | None = None,
    provenance: dict | None = None,
    report_every: int = 1,
) -> Iterator[PretrainEvent]:
    """Pretrain on ``images`` (2D planes or 3D stacks, any intensity range); yields a
    :class:`PretrainEvent` every ``report_every`` steps and a last one with the encoder.

    ``init``: start from this encoder (e.g. the shipped one, adapted to the user's stack).
    ``stop``: polled between steps; True ends the run early (the last event has ``stopped=True``).
    ``provenance``: what to record about the data in the encoder (its name, licence, ...).
    """
    config = PretrainConfig() if config is None else config
    device = pick_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    net = pretraining_network(config)
    crop_size, shift = _crop_geometry(config, images, net.multiple)
    side = crop_size + (shift if config.objective == "contrastive" else 0)
    source = _CropSource(images, side, config.seed)
    if init is not None:
        apply_encoder(net, init, source="The encoder to start from")
    net.to(device)
    modules = torch.nn.ModuleList([net])
    head = None
    if config.objective == "masked":
        head = reconstruction_head(net).to(device)
        modules.append(head)
    optimizer = torch.optim.AdamW(modules.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = WarmupCosine(config.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    start = time.perf_counter()
    step, loss_value, losses = 0, float("nan"), []
    stopped = False
    while step < schedule.steps:
        if stop is not None and stop():
            stopped = True
            break
        net.train()
        crops = source.sample(config.batch_size, rng).to(device)
        if config.objective == "contrastive":
            loss = dense_contrastive_loss(net, crops, generator, crop_size, shift,
                                          pixels=config.pixels, temperature=config.temperature)
        else:
            loss = masked_reconstruction_loss(net, head, crops, generator, patch=config.patch,
                                              ratio=config.mask_ratio)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), 5.0)
        optimizer.step()
        scheduler.step()
        step += 1
        loss_value = float(loss.detach())
        losses.append(loss_value)
        elapsed = time.perf_counter() - start
        if config.time_limit is not None and (step >= PACE_STEPS or elapsed >= config.time_limit):
            schedule.steps = planned_steps(config.steps, step, step, elapsed, config.time_limit)
        if step % report_every == 0 and step < schedule.steps:
            yield PretrainEvent(step, schedule.steps, loss_value, elapsed, str(device))
    elapsed = time.perf_counter() - start
    record = {
        "objective": config.objective, "steps": step, "seconds": round(elapsed, 1), "device": str(device),
        "final_loss": float(np.mean(losses[-20:])) if losses else None, "config": config.to_dict(),
        "napari_protoseg_version": __version__, "started_from": (init.provenance.get("data") if init else None),
        **(provenance or {}),
    }
    yield PretrainEvent(step, schedule.steps, loss_value, elapsed, str(device), finished=not stopped,
                        stopped=stopped, encoder=Encoder.from_network(net.to("cpu"), record))
