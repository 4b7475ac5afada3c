"""What the network sees of an image: robust intensity normalisation and 2.5D context planes
(NumPy only, so loading a model file needs neither the losses nor the crop sampler)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Normalization:
    """Robust intensity normalisation: the ``low``/``high`` percentiles map to 0 and 1."""

    low: float
    high: float

    @classmethod
    def from_image(cls, image, percentiles=(0.5, 99.5), max_samples: int = 2_000_000, seed: int = 0):
        """Percentiles of (a random sample of) the image's pixels."""
        flat = np.asarray(image).reshape(-1)
        if flat.size > max_samples:
            flat = flat[np.random.default_rng(seed).integers(0, flat.size, max_samples)]
        low, high = np.percentile(flat.astype(np.float64), percentiles)
        if not high > low:
            high = low + 1.0
        return cls(float(low), float(high))

    def __call__(self, array) -> np.ndarray:
        return ((np.asarray(array, dtype=np.float32) - self.low) / (self.high - self.low)).astype(np.float32)

    def to_dict(self) -> dict:
        return {"low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: dict) -> Normalization:
        return cls(float(d["low"]), float(d["high"]))


def plane_with_context(volume: np.ndarray, z: int, context: int) -> np.ndarray:
    """Plane ``z`` and its ``context`` neighbours on each side as channels (2k+1, Y, X);
    planes beyond the stack's ends repeat the end plane."""
    if volume.ndim == 2:
        return np.repeat(volume[None], 2 * context + 1, axis=0)
    idx = np.clip(np.arange(z - context, z + context + 1), 0, volume.shape[0] - 1)
    return volume[idx]
