"""Pretrained encoders on disk: the backbone and DSP head of a network, learnt without labels.

An encoder file is a `safetensors <https://huggingface.co/docs/safetensors>`_ file: tensors named as
in :class:`~napari_protoseg.model.network.ProtoSegNet`'s state dict (``backbone.*``, ``head.*``) and
text metadata: the format, the architecture the tensors fit (JSON) and their provenance (JSON: the
data, the objective, steps and time, the data's licence and attribution). Reading one never runs
code from it. Every way a file can be unusable raises :class:`EncoderFileError` with a message
saying what is wrong and what to do.

The package ships one encoder for the default network, pretrained on public EM
(:func:`shipped_encoder_path`; how it was made: ``tools/make_shipped_encoder.py``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from napari_protoseg.model.network import ModelConfig, ProtoSegNet

__all__ = [
    "ENCODER_FORMAT",
    "ENCODER_SUFFIX",
    "SHIPPED",
    "Encoder",
    "EncoderFileError",
    "apply_encoder",
    "encoder_architecture",
    "encoder_fits",
    "encoder_for_training",
    "load_encoder",
    "resolve_encoder",
    "save_encoder",
    "shipped_encoder_for",
    "shipped_encoder_path",
]

ENCODER_FORMAT = "napari-protoseg encoder"
ENCODER_FORMAT_VERSION = 1
ENCODER_SUFFIX = ".safetensors"
SHIPPED = "shipped"  # names the package's own encoder wherever an encoder file is asked for
# The parts of a network an encoder holds, by state-dict prefix.
ENCODER_PREFIXES = ("backbone.", "head.")
# ModelConfig fields that decide the shapes of those parts (in_channels aside: see apply_encoder).
ARCHITECTURE_FIELDS = ("base_width", "depth", "embed_dim", "norm", "input_scale", "filter_sigmas")
_WEIGHTS_DIR = Path(__file__).parent / "weights"


class EncoderFileError(ValueError):
    """An encoder file that cannot be used; the message says what is wrong and what to do."""


@dataclass
class Encoder:
    """Pretrained weights of a network's backbone and DSP head.

    ``architecture``: the :class:`ModelConfig` fields they fit (:data:`ARCHITECTURE_FIELDS` and
    ``in_channels``); ``provenance``: free JSON saying how they were made."""

    architecture: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_network(cls, net: ProtoSegNet, provenance: dict[str, Any] | None = None) -> Encoder:
        """The encoder part of ``net`` (copied to the CPU)."""
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in net.state_dict().items()
                 if k.startswith(ENCODER_PREFIXES)}
        return cls(encoder_architecture(net.config), state, dict(provenance or {}))


def encoder_architecture(config: ModelConfig) -> dict[str, Any]:
    """The fields of ``config`` an encoder must match (as JSON types)."""
    data = config.to_dict()
    return {name: data[name] for name in ("in_channels", *ARCHITECTURE_FIELDS)}


def save_encoder(path: str | os.PathLike, encoder: Encoder) -> Path:
    """Write ``encoder`` to ``path`` (a ``.safetensors`` file; other names get the suffix added)."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.name.endswith(ENCODER_SUFFIX):
        path = path.with_name(path.name + ENCODER_SUFFIX)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": ENCODER_FORMAT, "format_version": str(ENCODER_FORMAT_VERSION),
                "architecture": json.dumps(encoder.architecture), "provenance": json.dumps(encoder.provenance)}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in encoder.state_dict.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def shipped_encoder_path() -> Path:
    """The package's encoder for the default network (pretrained on public EM)."""
    return _WEIGHTS_DIR / "em_encoder.safetensors"


def shipped_encoder_for(config: ModelConfig) -> Path | None:
    """The package's encoder for a network like ``config`` (same architecture, any input sections),
    or None where the package ships none for it."""
    from safetensors import SafetensorError, safe_open

    wanted = encoder_architecture(config)
    for path in sorted(_WEIGHTS_DIR.glob("*" + ENCODER_SUFFIX)):
        try:
            with safe_open(str(path), framework="pt") as f:
                have = json.loads((f.metadata() or {}).get("architecture", "{}"))
        except (SafetensorError, OSError, ValueError):
            continue
        if _same_architecture(have, wanted):
            return path
    return None


def resolve_encoder(name: str | os.PathLike) -> Path:
    """The file an encoder setting names: :data:`SHIPPED` for the package's own, else a path."""
    return shipped_encoder_path() if str(name) == SHIPPED else Path(name)


def encoder_for_training(setting: str | None, config: ModelConfig) -> tuple[Encoder | None, str | None]:
    """The encoder a training setting (``TrainConfig.encoder``) starts ``config``'s network from, and
    the file it came from: None gives (None, None); :data:`SHIPPED` the package's encoder for this
    network, or (None, None) where it ships none for it (other sizes start from random weights);
    a file is read and must fit (:class:`EncoderFileError` otherwise, from :func:`apply_encoder`)."""
    if setting is None:
        return None, None
    if str(setting) == SHIPPED:
        path = shipped_encoder_for(config)
        return (load_encoder(path), SHIPPED) if path is not None else (None, None)
    return load_encoder(setting), str(setting)


def load_encoder(path: str | os.PathLike) -> Encoder:
    """Read an encoder file (:data:`SHIPPED` reads the package's own); raises :class:`EncoderFileError`."""
    from safetensors import SafetensorError, safe_open

    path = resolve_encoder(path)
    what = "The package's pretrained encoder" if path == shipped_encoder_path() else f"The encoder file {path}"
    if not path.is_file():
        hint = ("reinstall napari-protoseg, or train from scratch (--init none)" if path == shipped_encoder_path()
                else "check the path, or make one with 'protoseg pretrain IMAGE --out FILE'")
        raise EncoderFileError(f"{what} does not exist; {hint}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise EncoderFileError(f"{what} is not a readable encoder file ({str(err).splitlines()[0]}); "
                               "make one with 'protoseg pretrain IMAGE --out FILE'.") from None
    if metadata.get("format") != ENCODER_FORMAT:
        raise EncoderFileError(f"{what} is a safetensors file but not a napari-protoseg encoder; make one with "
                               "'protoseg pretrain IMAGE --out FILE'.")
    try:
        version = int(metadata.get("format_version", "0"))
        architecture = json.loads(metadata["architecture"])
        provenance = json.loads(metadata.get("provenance", "{}"))
    except (KeyError, ValueError) as err:
        raise EncoderFileError(f"{what} has damaged metadata ({err}); pretrain it again.") from None
    if version > ENCODER_FORMAT_VERSION:
        raise EncoderFileError(f"{what} was written by a newer napari-protoseg (encoder format {version}); "
                               "update napari-protoseg to use it.")
    missing = [name for name in ("in_channels", *ARCHITECTURE_FIELDS) if name not in architecture]
    if missing or not any(k.startswith("backbone.") for k in state):
        raise EncoderFileError(f"{what} lacks {', '.join(missing) or 'backbone weights'}; pretrain it again.")
    return Encoder(architecture, state, provenance)


def encoder_fits(encoder: Encoder, config: ModelConfig) -> bool:
    """Whether ``encoder`` can start a network like ``config`` (:func:`apply_encoder` would take it)."""
    return _misfit(encoder, config, "the encoder") is None


def _misfit(encoder: Encoder, config: ModelConfig, source: str) -> str | None:
    """Why ``encoder`` cannot start a network like ``config`` (None when it can)."""
    wanted = encoder_architecture(config)
    have = encoder.architecture
    if not _same_architecture(have, wanted):
        return (f"{source} was pretrained for another network ({_describe(have)}) than this one ({_describe(wanted)}). "
                "Pretrain an encoder for this network ('protoseg pretrain' with the same model settings), or train "
                "from scratch (--init none).")
    in_have, in_want = int(have["in_channels"]), int(wanted["in_channels"])
    if in_have not in (1, in_want):
        return (f"{source} was pretrained on {in_have} input sections, this network reads {in_want}; pretrain "
                "on single sections (the default) or with the same context.")
    return None


def _describe(architecture: dict[str, Any]) -> str:
    sigmas = architecture.get("filter_sigmas") or []
    return (f"width {architecture['base_width']}, depth {architecture['depth']}, embedding {architecture['embed_dim']}, "
            f"{architecture['norm']} norm, input scale {architecture['input_scale']}, "
            + (f"filter bank {list(sigmas)}" if sigmas else "no filter bank"))


def apply_encoder(net: ProtoSegNet, encoder: Encoder, source: str = "the encoder") -> None:
    """Load ``encoder`` into ``net``'s backbone and DSP head (prototypes and instance heads keep
    theirs). An encoder of single sections also starts a 2.5D network: its weights go to the centre
    section's input channel, the neighbours' start at zero. Raises :class:`EncoderFileError` when the
    architectures differ."""
    problem = _misfit(encoder, net.config, source)
    if problem is not None:
        raise EncoderFileError(problem)
    in_have, in_want = int(encoder.architecture["in_channels"]), net.config.in_channels
    state = net.state_dict()
    unknown = [k for k in encoder.state_dict if k not in state]
    if unknown:
        raise EncoderFileError(f"{source} holds weights this network does not have ({unknown[0]}, ...); "
                               "pretrain it again with this release.")
    merged = {}
    for name, tensor in encoder.state_dict.items():
        target = state[name]
        if tensor.shape != target.shape and name == "backbone.stem.0.weight" and in_have == 1:
            tensor = _inflated_stem(tensor, target.shape, in_want)
        if tensor.shape != target.shape:
            raise EncoderFileError(f"{source} has {name} of shape {tuple(tensor.shape)}, this network "
                                   f"{tuple(target.shape)}; pretrain it again for this network.")
        merged[name] = tensor.to(dtype=target.dtype)
    state.update(merged)
    net.load_state_dict(state)


def _inflated_stem(weight: torch.Tensor, shape: torch.Size, in_channels: int) -> torch.Tensor:
    """The first convolution of a single-section encoder for ``in_channels`` sections: the section's
    weights on the centre channel, zeros on its neighbours, the filter-bank channels after them."""
    inflated = torch.zeros(shape, dtype=weight.dtype)
    inflated[:, in_channels // 2] = weight[:, 0]
    inflated[:, in_channels:] = weight[:, 1:]
    return inflated


def _same_architecture(have: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether two :func:`encoder_architecture` dicts agree on everything but the input sections."""
    return all(_normalised(have.get(name)) == _normalised(wanted[name]) for name in ARCHITECTURE_FIELDS)


def _normalised(value):
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else value
