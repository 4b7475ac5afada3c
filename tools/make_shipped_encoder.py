"""Make the EM encoder that napari-protoseg ships (``src/napari_protoseg/model/weights/em_encoder.safetensors``).

Pretrains the default network's backbone and DSP head, self-supervised, on public FIB-SEM of the
fly medulla (Janelia FlyEM, neuroproof_examples, CC BY; ``../shared/data/pretrain``): every section
of each volume, and of the isotropic volumes also the sections across (y-z and x-z planes), each
enlarged 2x in-plane (10 nm -> 5 nm pixels, the scale of TEM of organelles). Reads no benchmark data.

    python tools/make_shipped_encoder.py --data ../shared/data/pretrain --minutes 20 \
        --objective contrastive --out src/napari_protoseg/model/weights/em_encoder.safetensors

Run from the repository root with ``PYTHONPATH=src`` (or the package installed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ATTRIBUTION = "EM data: Janelia FlyEM, neuroproof_examples, CC BY"
ISOTROPIC = ("flyem_medulla_training_sample1.tif", "flyem_medulla_training_sample2.tif")
ANISOTROPIC = ("flyem_medulla_validation_sample.tif",)
UPSCALE = 2


def load_volumes(data: Path) -> list[np.ndarray]:
    """The pretraining stacks: each volume's sections, and the isotropic ones' y-z and x-z sections
    too, enlarged ``UPSCALE`` times in-plane (linear interpolation), as uint8."""
    import tifffile
    import torch
    import torch.nn.functional as F

    def enlarge(stack: np.ndarray) -> np.ndarray:
        planes = torch.from_numpy(stack.astype(np.float32))[:, None]
        big = F.interpolate(planes, scale_factor=UPSCALE, mode="bilinear", align_corners=False)
        return big[:, 0].round().clamp(0, 255).to(torch.uint8).numpy()

    stacks = []
    for name in ISOTROPIC + ANISOTROPIC:
        volume = tifffile.imread(data / name)
        views = [volume]
        if name in ISOTROPIC:
            views += [volume.transpose(1, 0, 2), volume.transpose(2, 0, 1)]
        stacks += [enlarge(np.ascontiguousarray(v)) for v in views]
    return stacks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/pretrain"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget (default 20)")
    parser.add_argument("--steps", type=int, default=100_000, help="at most this many steps")
    parser.add_argument("--objective", choices=("contrastive", "masked"), default="contrastive")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from napari_protoseg.model.encoder import save_encoder
    from napari_protoseg.pretraining.engine import PretrainConfig, pretrain

    stacks = load_volumes(args.data)
    print(f"{len(stacks)} stacks, {sum(s.size for s in stacks) / 1e6:.0f} Mpx", flush=True)
    config = PretrainConfig(objective=args.objective, steps=args.steps, time_limit=60 * args.minutes,
                            seed=args.seed, device=args.device)
    provenance = {"data": "Janelia FlyEM neuroproof_examples: FIB-SEM of the Drosophila medulla (training_sample1, "
                          "training_sample2, validation_sample), 10 nm voxels enlarged to 5 nm in-plane",
                  "licence": "CC BY", "attribution": ATTRIBUTION, "made_by": "tools/make_shipped_encoder.py"}
    started = time.perf_counter()
    event = None
    for event in pretrain(stacks, config, provenance=provenance, report_every=50):
        print(f"step {event.step}/{event.total_steps} loss {event.loss:.4f} {event.elapsed:.0f} s", flush=True)
    path = save_encoder(args.out, event.encoder)
    print(f"{event.step} steps in {time.perf_counter() - started:.0f} s; final loss "
          f"{event.encoder.provenance['final_loss']:.4f}; written to {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
