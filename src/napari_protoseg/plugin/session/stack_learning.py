"""Learning the stack: while the user annotates, the network's encoder learns the open image's own
pixels without labels (self-supervised pretraining, :mod:`napari_protoseg.pretraining`), in the
background and in pieces between training runs; "Train on current labels" starts from what it learnt.

The encoder is kept in the project folder (``stack-encoder.safetensors``) with the time spent on it,
so that reopening the project goes on where it stopped and a finished one is not repeated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from napari_protoseg.model.encoder import (Encoder, EncoderFileError, encoder_fits, encoder_for_training, load_encoder,
                                           save_encoder)
from napari_protoseg.model.network import ModelConfig
from napari_protoseg.pretraining.engine import PretrainConfig, pretrain

STACK_ENCODER_FILE = "stack-encoder.safetensors"
# Minutes of background learning an image gets in all (its pieces added up).
STACK_LEARNING_MINUTES = 10.0
# Minutes between two saves of the encoder while it learns (a crash loses at most this much).
SAVE_EVERY_MINUTES = 1.0
_SECONDS_KEY = "stack_learning_seconds"


@dataclass
class StackLearningUpdate:
    """Progress of the stack learning: seconds learnt in all (of ``budget``), and whether this piece
    ended (``finished``: the budget is spent) or was stopped; ``saved``: the encoder file written."""

    seconds: float
    budget: float
    step: int
    loss: float
    finished: bool = False
    stopped: bool = False
    saved: Path | None = None


def stack_encoder(folder: Path | None, model: ModelConfig) -> tuple[Encoder | None, float]:
    """The stack encoder kept in a project folder for a network like ``model``, and the seconds
    learnt on it ((None, 0) if there is none, it is unusable or made for another network size: the
    stack is then learnt afresh)."""
    if folder is None:
        return None, 0.0
    path = Path(folder) / STACK_ENCODER_FILE
    if not path.is_file():
        return None, 0.0
    try:
        encoder = load_encoder(path)
    except EncoderFileError:
        return None, 0.0
    if not encoder_fits(encoder, model):
        return None, 0.0
    return encoder, float(encoder.provenance.get(_SECONDS_KEY, 0.0))


def stack_learning_run(image: np.ndarray, folder: Path, config: PretrainConfig, *, start_from: str | None,
                       budget_minutes: float = STACK_LEARNING_MINUTES,
                       stop: Callable[[], bool] | None = None) -> Iterator[StackLearningUpdate]:
    """Learn ``image`` in the background (a generator the panel runs in a worker thread).

    Goes on from the stack encoder in ``folder`` if there is one, else starts from ``start_from``
    (an encoder setting as ``TrainConfig.encoder``: "shipped", a file or None). Runs until the
    budget is spent or ``stop()``; writes the encoder into ``folder`` every
    :data:`SAVE_EVERY_MINUTES` and when it ends (each such piece is a pretraining run of its own,
    its learning rate warming up and decaying again).
    """
    folder = Path(folder)
    kept, done = stack_encoder(folder, config.model)
    budget = 60.0 * budget_minutes
    if done >= budget:
        yield StackLearningUpdate(done, budget, 0, float("nan"), finished=True)
        return
    init = kept if kept is not None else encoder_for_training(start_from, config.model)[0]
    started_from = (kept.provenance.get("started_from") if kept is not None
                    else (str(start_from) if start_from is not None else None))
    while done < budget:
        piece = min(budget - done, 60.0 * SAVE_EVERY_MINUTES)
        piece_config = replace(config, time_limit=piece, steps=1_000_000)
        last = None
        for event in pretrain([image], piece_config, init=init, stop=stop, report_every=5,
                              provenance={"data": "the image being annotated"}):
            last = event
            if event.encoder is None:
                yield StackLearningUpdate(done + event.elapsed, budget, event.step, event.loss)
        done += last.elapsed
        encoder = last.encoder
        encoder.provenance.update({_SECONDS_KEY: done, "started_from": started_from})
        saved = save_encoder(folder / STACK_ENCODER_FILE, encoder)
        init = encoder
        if last.stopped:
            yield StackLearningUpdate(done, budget, last.step, last.loss, stopped=True, saved=saved)
            return
        yield StackLearningUpdate(done, budget, last.step, last.loss, finished=done >= budget, saved=saved)
