"""A synthetic serial-section EM stack of neural tissue, its dense ground truth and sparse annotations.

The plugin's embedded sample data, used by the tests, the demo and a first run. Everything is
drawn from one seeded generator, so the same seed gives bit-identical output.

How it is made (all sizes in pixels of about 5 nm, sections about 45 nm thick):

1. Cells (neurite profiles): an additively weighted Voronoi diagram of seeds that drift slowly
   from section to section, on coordinates bent by a smooth warp field, so outlines are rounded
   and shift a little between sections. Cell boundaries become dark membranes 3-7 px thick.
2. Mitochondria: elongated 3D ellipsoids inside large cells that span several sections; some are
   placed against another one (touching pairs). Where two touch, a 1 px gap in the ground truth
   keeps them apart, as in hand-made labels.
3. Vesicles: synapse-like clusters of small discs (8-18 px across) in a cell, next to a membrane
   that is thickened and darkened there (postsynaptic density).
4. The image is rendered from that label map: light granular cytoplasm, dark membranes,
   darker mitochondria with a dark double membrane and light cristae, ring-like vesicles; then
   blur, an uneven illumination that changes per section, and shot (Poisson) noise.

``sparse_annotations`` derives a few annotations of every type (scribbles, tags, boxes, points)
from the dense ground truth, one type per block of sections, leaving the last section(s) for
evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import disk

from napari_protoseg.annotations.project import BOX_DTYPE, NO_REGION, POINT_DTYPE, TAG_DTYPE, AnnotationSet, ClassInfo

SAMPLE_CLASSES = [
    ClassInfo(1, "cytoplasm", False, "#4c72b0"),
    ClassInfo(2, "membrane", False, "#dd8452"),
    ClassInfo(3, "mitochondrion", True, "#55a868"),
    ClassInfo(4, "vesicle", False, "#c44e52"),
]
CYTOPLASM, MEMBRANE, MITOCHONDRION, VESICLE = 1, 2, 3, 4

# Object counts are given for a 512 x 512 plane and scale with the plane area; sizes do not.
_REFERENCE_AREA = 512 * 512
_CELL_SPACING = 52.0          # mean distance between cell seeds (before packing)
_MITO_PER_PLANE = 13          # mitochondrion profiles per 512 x 512 plane
_SYNAPSES_PER_PLANE = 3.5     # vesicle clusters per 512 x 512 plane
_MIN_MITO_AREA = 60           # smaller mitochondrion profiles (ellipsoid tips) become cytoplasm
_MIN_VESICLE_AREA = 8


@dataclass
class SyntheticSample:
    """A synthetic EM image with its dense ground truth and sparse annotations.

    ``image`` is uint8 (Z, Y, X), or (Y, X) for a 2D shape. ``semantic`` holds a class id (1-4 of
    ``SAMPLE_CLASSES``) for every pixel. ``instances`` numbers the mitochondria: the 4-connected
    components of class 3 in each plane, 1..n per plane (ids restart in every plane), 0 elsewhere.
    ``annotations`` is the sparse set from ``sparse_annotations``.
    """

    image: np.ndarray
    semantic: np.ndarray
    instances: np.ndarray
    annotations: AnnotationSet


# ---------------------------------------------------------------------------------- helpers


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    """Independent generators, so that changing one stage leaves the others' draws unchanged."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def _upsample_linear(coarse: np.ndarray, factor: int, ny: int, nx: int) -> np.ndarray:
    """Bilinear upsampling of the last two axes of a padded coarse grid by an integer factor."""
    out = coarse
    for axis, n in ((-2, ny), (-1, nx)):
        pos = (np.arange(n, dtype=np.float32) + 0.5) / factor - 0.5 + 1.0  # +1: one cell of padding
        i0 = np.floor(pos).astype(np.intp)
        w = (pos - i0).astype(np.float32)
        a = np.take(out, i0, axis=axis)
        b = np.take(out, i0 + 1, axis=axis)
        shape = [1] * out.ndim
        shape[axis] = n
        w = w.reshape(shape)
        out = a * (1 - w) + b * w
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float,
                  z_sigma: float = 0.0) -> np.ndarray:
    """Gaussian-smoothed white noise of unit standard deviation, float32 (Z, Y, X).

    Large in-plane ``sigma`` is synthesised on a coarse grid and upsampled, which keeps it cheap.
    ``z_sigma`` (in sections) correlates neighbouring planes.
    """
    nz, ny, nx = shape
    factor = max(1, int(sigma // 3))
    pad_z = int(np.ceil(3 * z_sigma))
    cy, cx = -(-ny // factor) + 3, -(-nx // factor) + 3
    white = rng.standard_normal((nz + 2 * pad_z, cy, cx), dtype=np.float32)
    field = ndi.gaussian_filter(white, (z_sigma, sigma / factor, sigma / factor), mode="wrap",
                                truncate=3.0)
    field = field[pad_z:pad_z + nz]
    if factor > 1:
        field = _upsample_linear(field, factor, ny, nx)
    else:
        field = field[:, 1:ny + 1, 1:nx + 1]
    field -= field.mean()
    field /= max(float(field.std()), 1e-6)
    return np.ascontiguousarray(field, dtype=np.float32)


def _ellipse(cy: float, cx: float, a: float, b: float, theta: float, ny: int, nx: int):
    """Pixels of a filled ellipse (semi-axes a along ``theta``, b across), clipped to the plane.

    Returns (ys, xs) slices of its bounding box, the mask inside them and the coordinate ``u``
    along the major axis for each pixel of the box.
    """
    r = a + 1
    y0, y1 = max(0, int(np.floor(cy - r))), min(ny, int(np.ceil(cy + r)) + 1)
    x0, x1 = max(0, int(np.floor(cx - r))), min(nx, int(np.ceil(cx + r)) + 1)
    if y0 >= y1 or x0 >= x1:
        return None
    yy = np.arange(y0, y1, dtype=np.float32)[:, None] - cy
    xx = np.arange(x0, x1, dtype=np.float32)[None, :] - cx
    c, s = np.cos(theta), np.sin(theta)
    u = xx * c + yy * s
    v = -xx * s + yy * c
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return (slice(y0, y1), slice(x0, x1)), inside, u


def _separate_touching(labels: np.ndarray) -> None:
    """Zero, in place, every pixel 4-adjacent (in its plane) to a pixel of a smaller nonzero label.

    This leaves a 1 px gap between touching objects, so that each stays its own 4-connected
    component, as in hand-made instance labels.
    """
    original = labels.copy()
    for axis in (1, 2):
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis] = slice(0, -1)
        hi[axis] = slice(1, None)
        p, q = original[tuple(lo)], original[tuple(hi)]
        differ = (p > 0) & (q > 0) & (p != q)
        labels[tuple(lo)][differ & (p > q)] = 0
        labels[tuple(hi)][differ & (q > p)] = 0


def _label_per_plane(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a (Z, Y, X) mask, numbered 1..n in every plane."""
    out = np.zeros(mask.shape, np.int32)
    for z in range(mask.shape[0]):
        out[z] = ndi.label(mask[z])[0]  # default structure: 4-connectivity in 2D
    return out


def _remove_small(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Per plane, the components of ``mask`` smaller than ``min_area`` pixels."""
    small = np.zeros(mask.shape, bool)
    for z in range(mask.shape[0]):
        lab, n = ndi.label(mask[z])
        if n:
            sizes = np.bincount(lab.ravel())
            tiny = sizes < min_area
            tiny[0] = False
            small[z] = tiny[lab]
    return small


# ---------------------------------------------------------------------------------- geometry


@dataclass
class _Cells:
    label: np.ndarray       # (Z, Y, X) int32 cell index of each pixel
    gap: np.ndarray         # (Z, Y, X) float32, second-nearest minus nearest distance (0 on a boundary)
    second: np.ndarray      # (Z, Y, X) int32, second-nearest cell
    sy: np.ndarray          # (Z, N) seed positions per plane
    sx: np.ndarray
    vy: np.ndarray          # (N,) drift per section
    vx: np.ndarray


def _seed_positions(rng, ny, nx, margin):
    """Cell seeds and radii: a few large profiles (dendrites, boutons) and many small ones (axons),
    placed by dart throwing, largest first, so that discs of 0.85 x their radius do not overlap."""
    h, w = ny + 2 * margin, nx + 2 * margin
    n_want = max(6, int(round(h * w / _CELL_SPACING ** 2)))
    big = rng.random(n_want) < 0.10
    radius = np.where(big, rng.uniform(50, 95, n_want), np.exp(rng.normal(np.log(23), 0.38, n_want)))
    radius = np.sort(np.clip(radius, 12, 110))[::-1]
    candidates = rng.random((n_want, 40, 2)) * [h, w] - margin
    pos = np.empty((n_want, 2))
    rad = np.empty(n_want)
    n = 0
    for r, tries in zip(radius, candidates):
        for c in tries:
            if n and np.any(np.sum((pos[:n] - c) ** 2, axis=1) < (0.85 * (rad[:n] + r)) ** 2):
                continue
            pos[n], rad[n] = c, r
            n += 1
            break
    return pos[:n], rad[:n]


def _make_cells(rng, shape) -> _Cells:
    nz, ny, nx = shape
    seeds, weight = _seed_positions(rng, ny, nx, margin=60)
    n = len(seeds)
    vy, vx = rng.normal(0, 2.0, n), rng.normal(0, 2.0, n)
    dweight = rng.normal(0, 1.2, n)
    zc = (nz - 1) / 2
    dz = np.arange(nz)[:, None] - zc
    sy = (seeds[:, 0][None] + vy[None] * dz).astype(np.float32)
    sx = (seeds[:, 1][None] + vx[None] * dz).astype(np.float32)
    wz = (weight[None] + dweight[None] * dz).astype(np.float32)

    warp_y = _smooth_noise(rng, shape, sigma=28, z_sigma=2.5) * 9.0
    warp_x = _smooth_noise(rng, shape, sigma=28, z_sigma=2.5) * 9.0
    fine_y = _smooth_noise(rng, shape, sigma=10, z_sigma=1.5) * 2.2
    fine_x = _smooth_noise(rng, shape, sigma=10, z_sigma=1.5) * 2.2
    warp_y += fine_y
    warp_x += fine_x

    # Candidate seeds per 8 x 8 block (the K nearest at its centre), then exact distances.
    block, k = 8, min(6, n)
    by = np.arange(0, ny, block)
    bx = np.arange(0, nx, block)
    cyy = np.minimum(by + block // 2, ny - 1)
    cxx = np.minimum(bx + block // 2, nx - 1)
    yi = (np.arange(ny) // block)
    xi = (np.arange(nx) // block)
    label = np.empty(shape, np.int32)
    second = np.empty(shape, np.int32)
    gap = np.empty(shape, np.float32)
    gy = np.arange(ny, dtype=np.float32)[:, None]
    gx = np.arange(nx, dtype=np.float32)[None, :]
    for z in range(nz):
        wy = gy + warp_y[z]
        wx = gx + warp_x[z]
        py = wy[np.ix_(cyy, cxx)][..., None]
        px = wx[np.ix_(cyy, cxx)][..., None]
        dc = np.sqrt((py - sy[z]) ** 2 + (px - sx[z]) ** 2) - wz[z]
        cand_block = np.argpartition(dc, k - 1, axis=-1)[..., :k].astype(np.int32)
        cand = cand_block[yi[:, None], xi[None, :]]                       # (Y, X, K)
        d = np.sqrt((wy[..., None] - sy[z][cand]) ** 2 + (wx[..., None] - sx[z][cand]) ** 2)
        d -= wz[z][cand]
        order = np.argpartition(d, 1, axis=-1)[..., :2]
        d12 = np.take_along_axis(d, order, axis=-1)
        c12 = np.take_along_axis(cand, order, axis=-1)
        label[z] = c12[..., 0]
        second[z] = c12[..., 1]
        gap[z] = d12[..., 1] - d12[..., 0]
    return _Cells(label, gap, second, sy, sx, vy, vx)


def _synapse_sites(rng, cells: _Cells, shape):
    """Places of synapses: a point on the boundary of a presynaptic cell A and a cell B per plane.

    Returns a list of (a, b, sites) with sites[z] = (y, x) or None where A and B do not touch.
    """
    nz, ny, nx = shape
    n_syn = max(1, int(round(_SYNAPSES_PER_PLANE * ny * nx / _REFERENCE_AREA)))
    z0 = nz // 2
    on_boundary = cells.gap[z0] < 1.5
    inner = np.zeros((ny, nx), bool)
    m = 40
    inner[m:ny - m, m:nx - m] = True
    ys, xs = np.nonzero(on_boundary & inner)
    if len(ys) == 0:
        ys, xs = np.nonzero(on_boundary)
    if len(ys) == 0:
        return []
    areas = np.bincount(cells.label[z0].ravel(), minlength=cells.sy.shape[1])
    out = []
    used: set[int] = set()
    order = rng.permutation(len(ys))[:200]
    # Between two cells of fair size, one of them large (a bouton); in small planes, any two.
    tries = [(i, 2500, 7000) for i in order] + [(i, 0, 0) for i in order[:20]]
    for i, min_small, min_large in tries:
        if len(out) == n_syn or (min_large == 0 and out):
            break
        y, x = ys[i], xs[i]
        a, b = int(cells.label[z0, y, x]), int(cells.second[z0, y, x])
        if a in used or b in used or min(areas[a], areas[b]) < min_small or max(areas[a], areas[b]) < min_large:
            continue
        if any(np.hypot(y - s[z0][0], x - s[z0][1]) < 120 for _, _, s in out if s[z0] is not None):
            continue
        if areas[b] > areas[a] or (areas[a] >= 7000 and areas[b] >= 7000 and rng.random() < 0.5):
            a, b = b, a   # the vesicles go to the larger cell, the presynaptic bouton
        used.update((a, b))
        sites = []
        for z in range(nz):
            pred_y = y + cells.vy[a] * (z - z0) * 0.5 + cells.vy[b] * (z - z0) * 0.5
            pred_x = x + cells.vx[a] * (z - z0) * 0.5 + cells.vx[b] * (z - z0) * 0.5
            pair = (cells.gap[z] < 1.5) & (
                ((cells.label[z] == a) & (cells.second[z] == b))
                | ((cells.label[z] == b) & (cells.second[z] == a)))
            py, px = np.nonzero(pair)
            if len(py) == 0:
                sites.append(None)
                continue
            j = np.argmin((py - pred_y) ** 2 + (px - pred_x) ** 2)
            sites.append((int(py[j]), int(px[j])) if (py[j] - pred_y) ** 2 + (px[j] - pred_x) ** 2 < 40 ** 2
                         else None)
        out.append((a, b, sites))
    return out


def _membrane(rng, cells: _Cells, synapses, shape):
    """Membrane mask, its thickness map and the postsynaptic-density weight of each pixel."""
    nz, ny, nx = shape
    thickness = 5.0 + 0.9 * _smooth_noise(rng, shape, sigma=24, z_sigma=1.0)
    np.clip(thickness, 3.5, 7.0, out=thickness)
    psd = np.zeros(shape, np.float32)
    gy = np.arange(ny, dtype=np.float32)[:, None]
    gx = np.arange(nx, dtype=np.float32)[None, :]
    for _, _, sites in synapses:
        for z, s in enumerate(sites):
            if s is None:
                continue
            y0, y1 = max(0, s[0] - 60), min(ny, s[0] + 61)
            x0, x1 = max(0, s[1] - 60), min(nx, s[1] + 61)
            d2 = (gy[y0:y1] - s[0]) ** 2 + (gx[:, x0:x1] - s[1]) ** 2
            np.maximum(psd[z, y0:y1, x0:x1], np.exp(-d2 / (2 * 16.0 ** 2)), out=psd[z, y0:y1, x0:x1])
    thickness += 4.0 * psd
    membrane = cells.gap < thickness
    return membrane, thickness, psd


@dataclass
class _Mitos:
    labels: np.ndarray      # (Z, Y, X) int32 raw ids (one per 3D ellipsoid), 0 elsewhere
    u: np.ndarray           # (Z, Y, X) float32 coordinate along each mitochondrion's major axis
    period: np.ndarray      # (Z, Y, X) float32 cristae spacing
    n_touching: int


def _make_mitos(rng, cells: _Cells, membrane, shape) -> _Mitos:
    nz, ny, nx = shape
    interior = np.empty(shape, np.float32)
    for z in range(nz):
        interior[z] = ndi.distance_transform_edt(~membrane[z])
    labels = np.zeros(shape, np.int32)
    u_map = np.zeros(shape, np.float32)
    period_map = np.zeros(shape, np.float32)
    target = _MITO_PER_PLANE * ny * nx / _REFERENCE_AREA
    profiles = np.zeros(nz, int)
    placed: list[dict] = []
    n_touching = forced_tries = 0
    mito_id = 0
    for _attempt in range(int(target * nz * 3) + 10):
        if profiles.mean() >= target:
            break
        z_start = int(np.argmin(profiles + rng.random(nz) * 0.5))
        zc = z_start + rng.uniform(-0.45, 0.45)
        b = rng.uniform(10, 22)
        a = min(75.0, b * rng.uniform(1.3, 3.4))
        theta = rng.uniform(0, np.pi)
        c = max(1.3, b / 9.0 * rng.uniform(1.0, 2.6)) if nz > 1 else 1.0
        here = [p for p in placed if abs(p["zc"] - z_start) < p["c"] * 0.7]
        # Some mitochondria touch another one; make sure at least one pair does.
        touching = bool(here) and (rng.random() < 0.3 or (n_touching == 0 and forced_tries < 12))
        forced_tries += touching
        if touching:
            # Beside (parallel) or end to end with a mitochondrion of this plane, slightly overlapping.
            candidates = []
            for k in rng.permutation(len(here))[:4]:
                other = here[k]
                oy = other["cy"] + other["vy"] * (z_start - other["zc"])
                ox = other["cx"] + other["vx"] * (z_start - other["zc"])
                for turn in rng.permutation([np.pi / 2, -np.pi / 2, 0.0, np.pi]):
                    side = abs(np.sin(turn)) > 0.5
                    ca = a if side else min(a, 2.2 * b)
                    reach = (other["b"] + b if side else other["a"] + ca) * rng.uniform(0.8, 0.95)
                    ang = other["theta"] + turn
                    candidates.append((oy + reach * np.sin(ang), ox + reach * np.cos(ang), ca,
                                       other["theta"] + rng.normal(0, 0.15)))
        else:
            ok = np.flatnonzero(interior[z_start].ravel() >= 0.8 * b + 3)
            if len(ok) == 0:
                continue
            pick = ok[rng.integers(len(ok), size=25)]
            candidates = [(cy, cx, a, theta) for cy, cx in zip(*np.unravel_index(pick, (ny, nx)))]
        for cy, cx, a, theta in candidates:
            iy, ix = int(round(cy)), int(round(cx))
            if not (0 <= iy < ny and 0 <= ix < nx) or interior[z_start, iy, ix] < 4:
                continue
            host = int(cells.label[z_start, iy, ix])
            got = _ellipse(cy, cx, a, b, theta, ny, nx)
            if got is None:
                continue
            box, ell, _ = got
            area = ell.sum()
            allowed = (cells.label[z_start][box] == host) & (interior[z_start][box] >= 2.5)
            if (ell & allowed).sum() < 0.8 * area:
                continue
            occupied = labels[z_start][box] > 0
            overlap = (ell & occupied).sum() / area
            if touching:
                if not 0.005 <= overlap <= 0.12:
                    continue
            else:
                grown = _ellipse(cy, cx, a + 4, b + 4, theta, ny, nx)
                if (grown[1] & (labels[z_start][grown[0]] > 0)).any():
                    continue
            mito_id += 1
            vy, vx = cells.vy[host], cells.vx[host]
            period = rng.uniform(7.0, 10.5)
            drew = 0
            for z in range(max(0, int(np.ceil(zc - c))), min(nz, int(np.floor(zc + c)) + 1)):
                s2 = 1.0 - ((z - zc) / c) ** 2
                if s2 <= 0.12:
                    continue
                s = np.sqrt(s2)
                zy, zx = cy + vy * (z - zc), cx + vx * (z - zc)
                got = _ellipse(zy, zx, a * s, b * s, theta, ny, nx)
                if got is None:
                    continue
                zbox, zell, u = got
                keep = zell & (cells.label[z][zbox] == host) & (interior[z][zbox] >= 2.5) \
                    & (labels[z][zbox] == 0)
                if keep.sum() < _MIN_MITO_AREA:
                    continue
                labels[z][zbox][keep] = mito_id
                u_map[z][zbox][keep] = u[keep]
                period_map[z][zbox][keep] = period
                profiles[z] += 1
                drew += 1
            if drew:
                placed.append(dict(zc=zc, c=c, cy=cy, cx=cx, a=a, b=b, theta=theta, vy=vy, vx=vx))
                n_touching += touching
            break
    _separate_touching(labels)
    return _Mitos(labels, u_map, period_map, n_touching)


def _make_vesicles(rng, cells: _Cells, membrane, mito_mask, synapses, shape):
    """Vesicle discs (Z, Y, X) bool: clusters beside each synapse's membrane, resampled per plane."""
    nz, ny, nx = shape
    vesicles = np.zeros(shape, bool)
    if not synapses:
        return vesicles
    free = np.empty(shape, np.float32)   # distance to membrane or mitochondrion
    for z in range(nz):
        free[z] = ndi.distance_transform_edt(~(membrane[z] | mito_mask[z]))
    for a, _b, sites in synapses:
        mean_r = rng.uniform(4.5, 7.0)
        reach = rng.uniform(55, 85)
        n_want = int(rng.integers(22, 45))
        for z, site in enumerate(sites):
            if site is None:
                continue
            sy, sx = site
            m = 1500
            ang = rng.uniform(0, 2 * np.pi, m)
            rad = reach * np.sqrt(rng.random(m))
            cy = sy + rad * np.sin(ang)
            cx = sx + rad * np.cos(ang)
            radius = np.clip(rng.normal(mean_r, 0.8, m), 4.0, 9.0)
            prefer = rng.random(m) < np.exp(-rad / (0.6 * reach))
            iy, ix = np.round(cy).astype(int), np.round(cx).astype(int)
            ok = prefer & (iy >= 0) & (iy < ny) & (ix >= 0) & (ix < nx)
            iy, ix = np.where(ok, iy, 0), np.where(ok, ix, 0)
            ok &= (cells.label[z, iy, ix] == a) & (free[z, iy, ix] >= radius + 1.5)
            kept: list[tuple[float, float, float]] = []
            for y, x, r in zip(cy[ok].tolist(), cx[ok].tolist(), radius[ok].tolist()):
                if len(kept) == n_want:
                    break
                if any((y - ky) ** 2 + (x - kx) ** 2 < (r + kr + 2.2) ** 2 for ky, kx, kr in kept):
                    continue
                kept.append((y, x, r))
            for y, x, r in kept:
                got = _ellipse(y, x, r, r, 0.0, ny, nx)
                if got is not None:
                    box, inside, _ = got
                    vesicles[z][box] |= inside
    return vesicles


# --------------------------------------------------------------------------------- rendering


def _render(rng, shape, semantic, cells: _Cells, thickness, psd, mitos: _Mitos, depth):
    """Grey values from the label map: texture per class, blur, illumination, shot noise."""
    nz, ny, nx = shape
    r_tex, r_light, r_noise = _rngs(int(rng.integers(2 ** 32)), 3)
    n_cells = cells.sy.shape[1]
    cell_offset = r_tex.normal(0, 11, n_cells).astype(np.float32)
    fine = _smooth_noise(r_tex, shape, sigma=1.2)
    grain = _smooth_noise(r_tex, shape, sigma=3.0)
    blotch = _smooth_noise(r_tex, shape, sigma=9.0, z_sigma=0.5)
    image = 160.0 + cell_offset[cells.label] + 16.0 * fine + 12.0 * grain + 13.0 * blotch
    # Sparse dark granules (ribosomes, microtubules cut across) in the cytoplasm.
    granules = r_tex.random(shape, dtype=np.float32) < 0.012
    image[granules] -= 65.0
    # Fuzzy dark material along the membranes, fading within 4 px.
    halo = np.clip(1.0 - (cells.gap - thickness) / 4.0, 0, 1)
    image -= 22.0 * halo

    mem = semantic == MEMBRANE
    rel = np.clip(cells.gap / np.maximum(thickness, 1e-3), 0, 1)
    mem_value = 40.0 + 30.0 * rel ** 2 - 25.0 * psd + 8.0 * grain
    image[mem] = mem_value[mem]

    mito = semantic == MITOCHONDRION
    if mito.any():
        period = np.where(mito, mitos.period, 1.0)
        wobble = _smooth_noise(r_tex, shape, sigma=5.0)
        phase = mitos.u / period + 0.4 * wobble
        dist = np.abs(phase - np.round(phase)) * period        # px to the nearest crista centre
        broken = _smooth_noise(r_tex, shape, sigma=3.0) < -0.65
        crista = 100.0 + np.where(dist < 1.1, 62.0, np.where(dist < 2.3, -28.0, 0.0))
        crista = np.where(broken, 95.0, crista) + 8.0 * fine
        value = np.where(depth <= 2.5, 48.0 + 8.0 * fine, np.where(depth <= 3.5, 85.0, crista))
        image[mito] = value[mito]

    ves = semantic == VESICLE
    if ves.any():
        value = np.where(depth <= 2.0, 55.0, 140.0) + 6.0 * fine
        image[ves] = value[ves]

    image = ndi.gaussian_filter(image, (0, 1.1, 1.1), truncate=3.0)

    # Uneven illumination: a tilt and a smooth bump, different in every section; gain and offset.
    gy = np.linspace(-0.5, 0.5, ny, dtype=np.float32)[:, None]
    gx = np.linspace(-0.5, 0.5, nx, dtype=np.float32)[None, :]
    bump = _smooth_noise(r_light, shape, sigma=max(ny, nx) / 4.0, z_sigma=0.8)
    for z in range(nz):
        ty, tx = r_light.normal(0, 0.25, 2)
        gain = r_light.uniform(0.85, 1.1)
        offset = r_light.normal(0, 8)
        image[z] *= gain * (1.0 + ty * gy + tx * gx + 0.07 * bump[z])
        image[z] += offset

    # Shot noise (electron counts), then a slight detector blur.
    counts_per_level = 0.8
    lam = np.clip(image, 1.0, None) * counts_per_level
    image = r_noise.poisson(lam).astype(np.float32) / counts_per_level
    image = ndi.gaussian_filter(image, (0, 0.55, 0.55), truncate=3.0)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# -------------------------------------------------------------------------------- public API


def generate_sample(shape=(8, 512, 512), seed: int = 0) -> SyntheticSample:
    """A synthetic serial-section TEM stack of neural tissue with dense and sparse ground truth.

    ``shape`` is (Z, Y, X), or (Y, X) for a single plane. The same ``seed`` gives bit-identical
    output. Classes are ``SAMPLE_CLASSES``: cytoplasm, membrane, mitochondrion (instances) and
    vesicle.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (2, 3) or min(shape) < 1:
        raise ValueError(f"shape must be (Y, X) or (Z, Y, X) with positive sizes, not {shape}")
    if min(shape[-2:]) < 32:
        raise ValueError(f"planes must be at least 32 x 32 pixels, not {shape[-2:]}")
    is_2d = len(shape) == 2
    shape3 = (1, *shape) if is_2d else shape
    r_cells, r_syn, r_mem, r_mito, r_ves, r_render, r_ann = _rngs(seed, 7)

    cells = _make_cells(r_cells, shape3)
    synapses = _synapse_sites(r_syn, cells, shape3)
    membrane, thickness, psd = _membrane(r_mem, cells, synapses, shape3)
    mitos = _make_mitos(r_mito, cells, membrane, shape3)
    mito_mask = mitos.labels > 0
    mito_mask &= ~_remove_small(mito_mask, _MIN_MITO_AREA)
    vesicles = _make_vesicles(r_ves, cells, membrane, mito_mask, synapses, shape3)
    vesicles &= ~_remove_small(vesicles, _MIN_VESICLE_AREA)

    semantic = np.full(shape3, CYTOPLASM, np.uint8)
    semantic[membrane] = MEMBRANE
    semantic[mito_mask] = MITOCHONDRION
    semantic[vesicles] = VESICLE
    instances = _label_per_plane(semantic == MITOCHONDRION).astype(np.uint16)

    depth = np.zeros(shape3, np.float32)   # distance inside a mitochondrion or vesicle
    objects = mito_mask | vesicles
    for z in range(shape3[0]):
        if objects[z].any():
            depth[z] = ndi.distance_transform_edt(objects[z])
    image = _render(r_render, shape3, semantic, cells, thickness, psd, mitos, depth)

    if is_2d:
        image, semantic, instances = image[0], semantic[0], instances[0]
    annotations = sparse_annotations(semantic, instances, seed=int(r_ann.integers(2 ** 32)))
    return SyntheticSample(image=image, semantic=semantic, instances=instances, annotations=annotations)


# ------------------------------------------------------------------------ sparse annotations


def _plane_plan(nz: int) -> dict[str, list[int]]:
    """Which planes get which annotation type; the last plane(s) stay unannotated from 5 planes on.

    8 planes: scribbles 0, tags 1-2, boxes 3-4, points 5-6, nothing on 7.
    """
    if nz == 1:
        return {"scribbles": [0], "tags": [], "boxes": [], "points": [0]}
    if nz == 2:
        return {"scribbles": [0], "tags": [1], "boxes": [1], "points": [1]}
    if nz == 3:
        return {"scribbles": [0], "tags": [1], "boxes": [2], "points": [2]}
    n_eval = max(1, int(round(nz / 8))) if nz >= 5 else 0
    rest = nz - n_eval
    n_scribble = max(1, int(round(rest / 7)))
    share, extra = divmod(rest - n_scribble, 3)
    counts = [n_scribble] + [share + (i < extra) for i in range(3)]
    plan, start = {}, 0
    for name, count in zip(("scribbles", "tags", "boxes", "points"), counts):
        plan[name] = list(range(start, start + count))
        start += count
    return plan


def _stroke_path(rng, start, heading, length, ny, nx, both_ways=False):
    """Pixels of a smooth random brush path (8-connected), clipped to the plane."""
    step = 0.8
    n = max(2, int(length / step))
    turn = ndi.gaussian_filter1d(rng.normal(0, 0.09, n), 3.0)
    ang = heading + np.cumsum(turn)
    ys = start[0] + np.concatenate([[0.0], np.cumsum(step * np.sin(ang))])
    xs = start[1] + np.concatenate([[0.0], np.cumsum(step * np.cos(ang))])
    if both_ways:
        ang2 = heading + np.pi - np.cumsum(ndi.gaussian_filter1d(rng.normal(0, 0.09, n), 3.0))
        ys = np.concatenate([start[0] + np.cumsum(step * np.sin(ang2))[::-1], ys])
        xs = np.concatenate([start[1] + np.cumsum(step * np.cos(ang2))[::-1], xs])
    ys, xs = np.round(ys).astype(int), np.round(xs).astype(int)
    ok = (ys >= 0) & (ys < ny) & (xs >= 0) & (xs < nx)
    return ys[ok], xs[ok]


def _paint(region, ys, xs, radius, start):
    """A brush stroke of the given radius along (ys, xs), clipped to ``region``; only its part
    connected to ``start`` is kept, so a stroke never jumps into another object."""
    stroke = np.zeros(region.shape, bool)
    stroke[ys, xs] = True
    stroke = ndi.binary_dilation(stroke, disk(radius, dtype=bool)) & region
    lab, _ = ndi.label(stroke)
    keep = lab[start]
    return lab == keep if keep else np.zeros(region.shape, bool)


def _scribble_plane(rng, sem, inst):
    """A partial mask of one plane: a few thin strokes in regions of every class."""
    ny, nx = sem.shape
    scale = ny * nx / _REFERENCE_AREA
    out = np.zeros(sem.shape, np.uint8)
    cross = ndi.generate_binary_structure(2, 1)

    # Cytoplasm: wandering strokes that stop at the cell's membrane.
    cyto = sem == CYTOPLASM
    depth = ndi.distance_transform_edt(cyto)
    region = ndi.binary_erosion(cyto, cross)
    starts = np.flatnonzero(depth.ravel() >= 10)
    for i in rng.choice(starts, size=min(len(starts), max(2, int(round(5 * scale)))), replace=False):
        y, x = divmod(int(i), nx)
        ys, xs = _stroke_path(rng, (y, x), rng.uniform(0, 2 * np.pi), rng.uniform(50, 120), ny, nx,
                              both_ways=True)
        out[_paint(region, ys, xs, int(rng.integers(1, 3)), (y, x))] = CYTOPLASM

    # Membrane: strokes along the membrane's centre line.
    mem = sem == MEMBRANE
    if mem.any():
        from skimage.morphology import skeletonize

        skeleton = skeletonize(mem)
        # Cut the centre line at its junctions, so that each stroke follows one membrane.
        neighbours = ndi.convolve(skeleton.astype(np.uint8), np.ones((3, 3), np.uint8), mode="constant")
        skeleton &= neighbours <= 3
        region = ndi.binary_erosion(mem, cross)
        sk = np.flatnonzero((skeleton & region).ravel())
        for i in rng.choice(sk, size=min(len(sk), max(2, int(round(4 * scale)))), replace=False):
            y, x = divmod(int(i), nx)
            reach = rng.uniform(30, 60)
            y0, y1, x0, x1 = max(0, int(y - reach)), int(y + reach) + 1, max(0, int(x - reach)), int(x + reach) + 1
            piece = np.zeros(sem.shape, bool)
            piece[y0:y1, x0:x1] = skeleton[y0:y1, x0:x1]
            lab, _ = ndi.label(piece, np.ones((3, 3)))
            ys, xs = np.nonzero(lab == lab[y, x])
            out[_paint(region, ys, xs, 1, (y, x))] = MEMBRANE

    # Mitochondria: one stroke along the long axis of a few of them.
    mito_region = ndi.binary_erosion(sem == MITOCHONDRION, cross, iterations=2)
    objects = ndi.find_objects(inst)
    ids = [i + 1 for i, sl in enumerate(objects) if sl is not None]
    ids = [i for i in ids if np.count_nonzero(inst[objects[i - 1]] == i) >= 300]
    for obj in rng.permutation(ids)[:max(2, int(round(4 * scale)))]:
        sl = objects[obj - 1]
        mask = inst[sl] == obj
        d = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        cy, cx = np.unravel_index(np.argmax(d), mask.shape)
        yy, xx = np.nonzero(mask)
        cov = np.cov(np.vstack([yy, xx]))
        evals, evecs = np.linalg.eigh(cov)
        heading = np.arctan2(evecs[0, 1], evecs[1, 1])
        length = 0.8 * 2 * np.sqrt(max(evals[1], 1.0)) * 2
        start = (int(cy + sl[0].start), int(cx + sl[1].start))
        ys, xs = _stroke_path(rng, start, heading, length / 2, ny, nx, both_ways=True)
        if mito_region[start]:
            out[_paint(mito_region, ys, xs, int(rng.integers(1, 3)), start)] = MITOCHONDRION

    # Vesicles: a dab of the brush in a few of them.
    ves = sem == VESICLE
    if ves.any():
        lab, n = ndi.label(ves)
        region = ndi.binary_erosion(ves, cross)
        centres = ndi.center_of_mass(ves, lab, np.arange(1, n + 1))
        for j in rng.permutation(n)[:max(3, int(round(10 * scale)))]:
            y, x = (int(round(v)) for v in centres[j])
            if region[y, x]:
                ys, xs = np.array([y]), np.array([x])
                out[_paint(region, ys, xs, 2, (y, x))] = VESICLE
    return out


def _components(mask):
    """(labels, slices) of the 4-connected components of a plane mask."""
    lab, _ = ndi.label(mask)
    return lab, ndi.find_objects(lab)


def sparse_annotations(semantic: np.ndarray, instances: np.ndarray, seed: int = 0) -> AnnotationSet:
    """Sparse annotations of every type derived from dense ground truth (classes ``SAMPLE_CLASSES``).

    For a stack of 8 planes: scribbles (partial mask) on plane 0; tags for every class on each tile
    of a 2 x 2 grid on planes 1-2, plus whole-plane tags on plane 2; a tight box around every
    mitochondrion and every vesicle (exhaustive) on planes 3-4; a point in every mitochondrion
    (exhaustive) and 10 random points per other class (not exhaustive) on planes 5-6; nothing on
    plane 7. Other stack depths get the same blocks scaled; a single plane gets scribbles and
    points. Objects are the 4-connected components per plane (of each instance id for
    mitochondria).
    """
    from skimage.measure import label as sk_label

    semantic = np.asarray(semantic)
    instances = np.asarray(instances)
    if semantic.shape != instances.shape or semantic.ndim not in (2, 3):
        raise ValueError("semantic and instances must have the same (Y, X) or (Z, Y, X) shape")
    is_2d = semantic.ndim == 2
    sem3 = semantic[None] if is_2d else semantic
    ins3 = instances[None] if is_2d else instances
    nz, ny, nx = sem3.shape
    plan = _plane_plan(nz)
    r_scribble, r_points = _rngs(seed, 2)

    masks = np.zeros(sem3.shape, np.uint8)
    for z in plan["scribbles"]:
        masks[z] = _scribble_plane(r_scribble, sem3[z], ins3[z])

    tags = []
    hy, hx = ny // 2, nx // 2
    tiles = [(0, 0, hy, hx), (0, hx, hy, nx), (hy, 0, ny, hx), (hy, hx, ny, nx)]
    for z in plan["tags"]:
        for y0, x0, y1, x1 in tiles:
            if y1 <= y0 or x1 <= x0:
                continue
            present = np.bincount(sem3[z, y0:y1, x0:x1].ravel(), minlength=256) > 0
            tags += [(z, c.id, bool(present[c.id]), y0, x0, y1, x1) for c in SAMPLE_CLASSES]
    if plan["tags"]:
        z = plan["tags"][-1]
        present = np.bincount(sem3[z].ravel(), minlength=256) > 0
        tags += [(z, c.id, bool(present[c.id]), NO_REGION, NO_REGION, NO_REGION, NO_REGION)
                 for c in SAMPLE_CLASSES]

    boxes = []
    for z in plan["boxes"]:
        mito_lab = sk_label(np.where(sem3[z] == MITOCHONDRION, ins3[z], 0), connectivity=1)
        for cid, lab in ((MITOCHONDRION, mito_lab), (VESICLE, _components(sem3[z] == VESICLE)[0])):
            for sl in ndi.find_objects(lab):
                if sl is not None:
                    boxes.append((z, sl[0].start, sl[1].start, sl[0].stop, sl[1].stop, cid, True))

    points = []
    n_random = 10 if nz > 1 else 3
    for z in plan["points"]:
        mito_lab = sk_label(np.where(sem3[z] == MITOCHONDRION, ins3[z], 0), connectivity=1)
        flat = mito_lab.ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(1, flat.max() + 2))
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            if hi > lo:
                y, x = divmod(int(order[lo + r_points.integers(hi - lo)]), nx)
                points.append((z, y, x, MITOCHONDRION, True))
        for cid in (CYTOPLASM, MEMBRANE, VESICLE):
            where = np.flatnonzero(sem3[z].ravel() == cid)
            for i in r_points.choice(where, size=min(n_random, len(where)), replace=False):
                y, x = divmod(int(i), nx)
                points.append((z, y, x, cid, False))

    return AnnotationSet(
        image_shape=semantic.shape,
        classes=list(SAMPLE_CLASSES),
        masks=masks[0] if is_2d else masks,
        boxes=np.array(boxes, dtype=BOX_DTYPE) if boxes else np.zeros(0, BOX_DTYPE),
        points=np.array(points, dtype=POINT_DTYPE) if points else np.zeros(0, POINT_DTYPE),
        tags=np.array(tags, dtype=TAG_DTYPE) if tags else np.zeros(0, TAG_DTYPE),
    )

