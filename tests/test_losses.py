"""Tests of the DSP targets and losses (napari_protoseg.training.losses); pure PyTorch, no Qt."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_protoseg.training.losses import (
    TAG_POOLINGS,
    CropTargets,
    LossWeights,
    dsp_loss,
    mask_components,
    negative_map,
    pseudo_label_loss,
    pseudo_label_targets,
    strong_augment,
    supervised_ce,
    supervised_targets,
    total_loss,
    unpointed_region_negatives,
)
from oracles import reference_dsp_loss, reference_negative_map

C, H, W = 3, 32, 32


def targets(B=1, n_classes=C, h=H, w=W, mask=None, boxes=(), exhaustive=(), points=(), tags=()):
    """CropTargets from plain Python lists; ``exhaustive`` lists (b, c) pairs."""
    t = CropTargets.empty(B, n_classes, h, w)
    if mask is not None:
        t.mask = torch.as_tensor(mask, dtype=torch.long)
    if boxes:
        t.boxes = torch.tensor(boxes, dtype=torch.long).reshape(-1, 6)
    for b, c in exhaustive:
        t.box_exhaustive[b, c] = True
    if points:
        t.points = torch.tensor(points, dtype=torch.long).reshape(-1, 4)
    if tags:
        t.tags = torch.tensor(tags, dtype=torch.long).reshape(-1, 7)
    return t


def optimise(t, steps=30, lr=0.1, B=1, n_classes=C, seed=0, **loss_kw):
    """Softmax probabilities of free logits before and after ``steps`` Adam steps on the DSP loss."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.nn.Parameter(0.5 * torch.randn(B, n_classes, H, W, generator=g))
    before = torch.softmax(logits.detach(), 1).clone()
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = dsp_loss(logits, t, **loss_kw)["contrastive"]
        loss.backward()
        opt.step()
    return before, torch.softmax(logits.detach(), 1)


def random_targets(rng: np.random.Generator, B: int, n_classes: int, h: int, w: int) -> CropTargets:
    """Random targets of every type, including rectangles partly outside the crop and empty ones."""
    mask = rng.integers(0, n_classes, (B, h, w))
    mask[rng.random((B, h, w)) < 0.75] = -1  # sparse, scribble-like labels
    mask[0, : h // 2, : w // 2] = -1  # and an unlabelled quadrant

    def rects(n, extra_cols):
        y0 = rng.integers(-3, h - 1, n)
        x0 = rng.integers(-3, w - 1, n)
        y1 = y0 + rng.integers(0, h // 2 + 3, n)  # some empty (y1 == y0), some past the crop
        x1 = x0 + rng.integers(1, w // 2 + 3, n)
        cols = [rng.integers(0, B, n), rng.integers(0, n_classes, n), *extra_cols(n), y0, x0, y1, x1]
        return torch.from_numpy(np.stack(cols, 1)).long()

    n_pts = int(rng.integers(1, 8))
    points = np.stack([rng.integers(0, B, n_pts), rng.integers(0, n_classes, n_pts),
                       rng.integers(-1, h + 1, n_pts), rng.integers(0, w, n_pts)], 1)
    whole = np.array([[0, int(rng.integers(0, n_classes)), 1, 0, 0, h, w]])
    tags = torch.cat([rects(int(rng.integers(1, 7)), lambda n: [rng.integers(0, 2, n)]), torch.from_numpy(whole)])
    return CropTargets(
        mask=torch.from_numpy(mask).long(),
        boxes=rects(int(rng.integers(1, 9)), lambda n: []),
        box_exhaustive=torch.from_numpy(rng.random((B, n_classes)) < 0.4),
        points=torch.from_numpy(points).long(),
        tags=tags,
    )


# --------------------------------------------------------------------------------------------
# Each annotation type moves the probabilities the right way


def test_box_raises_class_probability_inside_the_box():
    """A box of class c makes p_c higher inside the box (MIL pooling), without an exhaustive flag
    leaving every pixel outside the box untouched (no negatives outside a non-exhaustive box)."""
    t = targets(boxes=[(0, 1, 8, 10, 16, 20)])
    before, after = optimise(t)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[8:16, 10:20] = True
    box_before, box_after = before[0, 1, 8:16, 10:20], after[0, 1, 8:16, 10:20]
    # Every column and every row of a tight box crosses the object: their maxima go up.
    assert box_after.amax(0).min() > 0.9 and box_after.amax(1).min() > 0.9
    assert box_before.amax(0).mean() < 0.7
    assert (box_after >= box_before - 1e-6).all()  # nothing inside the box is pushed down
    torch.testing.assert_close(after[0, :, ~inside], before[0, :, ~inside], rtol=0, atol=0)


def test_exhaustive_box_lowers_class_probability_outside_all_its_boxes():
    """With box_exhaustive[b, c], p_c goes down outside all class-c boxes and up inside them."""
    t = targets(boxes=[(0, 1, 8, 10, 16, 20), (0, 1, 24, 2, 30, 6)], exhaustive=[(0, 1)])
    before, after = optimise(t)
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[8:16, 10:20] = True
    inside[24:30, 2:6] = True
    assert after[0, 1][~inside].max() < 0.05
    assert after[0, 1][~inside].mean() < 0.2 * before[0, 1][~inside].mean()
    assert after[0, 1][8:16, 10:20].amax(0).mean() > 0.8
    assert after[0, 1][24:30, 2:6].amax(0).mean() > 0.8


def test_exhaustive_flag_without_boxes_makes_whole_crop_negative():
    """box_exhaustive for a class with no box in the crop means the class is absent from the crop."""
    t = targets(exhaustive=[(0, 2)])
    assert negative_map(t, C, H, W)[0, 2].all()
    before, after = optimise(t)
    assert after[0, 2].max() < 0.05 < before[0, 2].mean()


def test_absent_tag_lowers_class_probability_everywhere_in_its_region():
    """An absent tag for class c pushes p_c down at every pixel of the region, nothing outside."""
    t = targets(tags=[(0, 0, 0, 4, 4, 20, 28)])
    before, after = optimise(t)
    assert after[0, 0, 4:20, 4:28].max() < 0.05
    assert before[0, 0, 4:20, 4:28].mean() > 0.2
    outside = torch.ones(H, W, dtype=torch.bool)
    outside[4:20, 4:28] = False
    torch.testing.assert_close(after[0, :, outside], before[0, :, outside], rtol=0, atol=0)


@pytest.mark.parametrize("pooling", TAG_POOLINGS)
def test_present_tag_raises_pooled_class_probability(pooling):
    """A present tag for class c raises the pooled p_c over its region (mean, max or smooth max)."""
    t = targets(tags=[(0, 2, 1, 0, 0, H, W)])

    def pooled(p):
        region = p[0, 2]
        if pooling == "mean":
            return region.mean()
        if pooling == "max":
            return region.max()
        return region.pow(4).mean().pow(0.25)

    before, after = optimise(t, tag_pooling=pooling)
    assert pooled(after) > pooled(before) + 0.2


def test_point_raises_class_probability_at_the_point():
    """A point of class c raises p_c at its pixel (and only there: free logits elsewhere unchanged)."""
    t = targets(points=[(0, 1, 5, 7), (0, 2, 20, 21)])
    before, after = optimise(t)
    assert after[0, 1, 5, 7] > 0.95 > before[0, 1, 5, 7]
    assert after[0, 2, 20, 21] > 0.95 > before[0, 2, 20, 21]
    untouched = torch.ones(H, W, dtype=torch.bool)
    untouched[5, 7] = untouched[20, 21] = False
    torch.testing.assert_close(after[0, :, untouched], before[0, :, untouched], rtol=0, atol=0)


def test_mask_raises_probability_of_its_class_on_each_component():
    """Mask components (scribbles) of class c get higher p_c; unlabelled pixels are untouched."""
    mask = torch.full((1, H, W), -1)
    mask[0, 2:6, 2:12] = 2  # two components of class 2
    mask[0, 20:22, 5:30] = 2
    mask[0, 10:14, 15:19] = 0  # one of class 0
    t = targets(mask=mask)
    before, after = optimise(t)
    for sl, c in (((slice(2, 6), slice(2, 12)), 2), ((slice(20, 22), slice(5, 30)), 2),
                  ((slice(10, 14), slice(15, 19)), 0)):
        assert after[0, c][sl].min() > 0.9
        assert before[0, c][sl].mean() < 0.6
    unlabelled = mask[0] < 0
    torch.testing.assert_close(after[0, :, unlabelled], before[0, :, unlabelled], rtol=0, atol=0)


def test_mask_components_use_8_connectivity_and_never_span_two_crops():
    """Diagonal neighbours of one class form one component; equal classes in adjacent crops or of
    different classes never merge."""
    mask = torch.full((2, 4, 4), -1)
    mask[0, 0, 0] = mask[0, 1, 1] = mask[0, 2, 2] = 1  # one diagonal stroke
    mask[0, 3, 0:2] = 0  # class 0: (3, 1) touches (2, 2) diagonally, but is another class
    mask[0, 3, 3] = 1  # diagonal to (2, 2): same component
    mask[1, 0, :] = 1  # first row of crop 1, directly "below" crop 0's last row
    labels, comp_class, comp_batch = mask_components(mask)
    assert len(comp_class) == 3
    assert len(np.unique(labels[0][mask[0].numpy() == 1])) == 1
    assert sorted(zip(comp_batch.tolist(), comp_class.tolist())) == [(0, 0), (0, 1), (1, 1)]
    assert (labels[mask.numpy() < 0] == 0).all()


def test_mask_lowers_other_classes_on_annotated_pixels():
    """An annotated pixel is a negative for every other class."""
    mask = torch.full((1, H, W), -1)
    mask[0, 10:20, 10:20] = 1
    neg = negative_map(targets(mask=mask), C, H, W)
    assert neg[0, [0, 2], 10:20, 10:20].all() and not neg[0, 1].any()
    assert not neg[0, :, mask[0] < 0].any()


# --------------------------------------------------------------------------------------------
# Negatives


def test_negatives_are_the_union_over_annotation_types():
    """The negative map is the union of every type's negatives; the published code overwrote the
    earlier types' negatives with the last type's, which would lose the mask's and points' here."""
    mask = torch.full((1, H, W), -1)
    mask[0, 2, 2] = 0  # negative for classes 1, 2
    parts = dict(
        mask=mask,
        boxes=[(0, 2, 0, 0, 5, 5)],
        exhaustive=[(0, 2)],  # class 2 negative outside [0:5, 0:5]
        points=[(0, 1, 25, 25)],  # negative for classes 0, 2 at (25, 25)
        tags=[(0, 1, 0, 10, 10, 20, 20), (0, 0, 1, 0, 0, H, W)],  # class 1 absent in [10:20, 10:20]
    )
    full = negative_map(targets(**parts), C, H, W)
    union = torch.zeros_like(full)
    for key in ("mask", "boxes", "points", "tags"):
        single = {key: parts[key]}
        if key == "boxes":
            single["exhaustive"] = parts["exhaustive"]
        union |= negative_map(targets(**single), C, H, W)
    assert torch.equal(full, union)
    assert full[0, 1, 2, 2] and full[0, 2, 2, 2] and not full[0, 0, 2, 2]  # mask
    assert full[0, 0, 25, 25] and full[0, 2, 25, 25] and not full[0, 1, 25, 25]  # point (+ box)
    assert full[0, 1, 10:20, 10:20].all()  # absent tag
    assert full[0, 2].sum() == H * W - 25 + 1  # exhaustive box, plus the mask pixel inside it
    assert full[0, 0].sum() == 1  # only the class-1 point; the present tag adds no negatives
    assert full[0, 1].sum() == 1 + 100  # the mask pixel and the absent tag's region
    assert np.array_equal(full.numpy(), reference_negative_map(targets(**parts), C, H, W))


def test_negative_map_matches_reference_loop_on_random_targets():
    """The vectorised negative map (difference arrays, index writes) equals the per-class loop."""
    for seed in range(6):
        rng = np.random.default_rng(seed)
        t = random_targets(rng, 3, 4, 17, 23)
        assert np.array_equal(negative_map(t, 4, 17, 23).numpy(), reference_negative_map(t, 4, 17, 23))


# --------------------------------------------------------------------------------------------
# Vectorised loss == reference loop


@pytest.mark.parametrize("pooling", TAG_POOLINGS)
@pytest.mark.parametrize("negative_only_weight", [1.0, 0.25])
def test_vectorised_dsp_loss_equals_reference_loop(pooling, negative_only_weight):
    """dsp_loss equals the per-crop, per-class reference loop, value and gradient, for every term,
    on random logits and random targets of all types (several seeds), also when the pairs with
    negatives but no positive are weighted down."""
    reweighted = 0
    for seed in range(5):
        rng = np.random.default_rng(100 + seed)
        B, n_classes, h, w = 2, 3 + seed % 2, 19, 24
        t = random_targets(rng, B, n_classes, h, w)
        # One more crop with nothing but an absent tag: a pair with negatives and no positive.
        t.mask = torch.cat([t.mask, torch.full((1, h, w), -1)])
        t.box_exhaustive = torch.cat([t.box_exhaustive, torch.zeros((1, n_classes), dtype=torch.bool)])
        t.tags = torch.cat([t.tags, torch.tensor([[B, seed % n_classes, 0, 2, 3, h - 4, w]])])
        B += 1
        base = torch.from_numpy(rng.normal(0.0, 2.0, (B, n_classes, h, w)))
        a_logits = base.clone().requires_grad_()
        b_logits = base.clone().requires_grad_()
        got = dsp_loss(a_logits, t, tag_pooling=pooling, negative_only_weight=negative_only_weight)
        want = reference_dsp_loss(b_logits, t, tag_pooling=pooling, negative_only_weight=negative_only_weight)
        assert set(got) == set(want) == {"contrastive", "mask", "box", "point", "tag", "negative"}
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-8, msg=f"{seed} {key}")
        assert all(want[k].item() != 0.0 for k in ("mask", "box", "point", "tag", "negative"))
        reweighted += float(want["negative"]) != float(reference_dsp_loss(base, t, tag_pooling=pooling)["negative"])
        got["contrastive"].backward()
        want["contrastive"].backward()
        torch.testing.assert_close(a_logits.grad, b_logits.grad, rtol=1e-5, atol=1e-9)
    assert (reweighted > 0) == (negative_only_weight != 1.0)


def test_negative_only_weight_scales_the_pairs_without_positives():
    """A (crop, class) pair with negatives but no positive counts ``negative_only_weight`` in the
    negative term; a pair with a positive keeps weight 1; the divisor counts both."""
    mask = torch.full((1, H, W), -1)
    mask[0, :4] = 0  # a component of class 0: a positive for class 0, negatives for classes 1 and 2
    t = targets(mask=mask, tags=[(0, 1, 0, 8, 8, 24, 24)])  # ... and class 1 absent from a square
    logits = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(0))
    full = float(dsp_loss(logits, t)["negative"])
    none = float(dsp_loss(logits, t, negative_only_weight=0.0)["negative"])
    half = float(dsp_loss(logits, t, negative_only_weight=0.5)["negative"])
    assert half == pytest.approx((full + none) / 2, rel=1e-6)
    # Classes 1 and 2 have negatives and no positive; class 0 has no negative: weight 0 leaves nothing.
    assert none == 0.0 and full != 0.0
    mask[0, 20:] = 1  # now class 1 has a positive: only class 2 is weighted
    t = targets(mask=mask, tags=[(0, 1, 0, 8, 8, 24, 24)])
    logp = torch.log_softmax(logits, 1)[0]
    neg = negative_map(t, C, H, W)[0]
    class_term = [float(torch.logsumexp(logp[c][neg[c]], 0)) for c in range(C)]
    assert float(dsp_loss(logits, t, negative_only_weight=0.0)["negative"]) == pytest.approx(
        (class_term[0] + class_term[1]) / 3, rel=1e-5)
    keep_class_2 = torch.tensor([[False, False, True]])
    assert float(dsp_loss(logits, t, negative_only_weight=0.0, full_weight_pairs=keep_class_2)["negative"]) == (
        pytest.approx(sum(class_term) / 3, rel=1e-5))
    with pytest.raises(ValueError, match="negative_only_weight"):
        dsp_loss(logits, t, negative_only_weight=-1.0)


def test_vectorised_dsp_loss_float32_close_to_reference():
    """In float32 (the training dtype) the vectorised loss stays within float tolerance."""
    rng = np.random.default_rng(7)
    t = random_targets(rng, 2, 3, 20, 20)
    logits = torch.from_numpy(rng.normal(0.0, 3.0, (2, 3, 20, 20)))
    got = dsp_loss(logits.float(), t, tag_pooling="smoothmax")
    want = reference_dsp_loss(logits, t, tag_pooling="smoothmax")
    for key in want:
        torch.testing.assert_close(got[key].double(), want[key], rtol=1e-4, atol=1e-5)


def test_box_and_tag_chunking_gives_the_same_loss():
    """Processing boxes and tags in small memory-bounded chunks changes nothing."""
    rng = np.random.default_rng(3)
    t = random_targets(rng, 2, 3, 24, 24)
    t.boxes = torch.cat([t.boxes] * 20)
    t.tags = torch.cat([t.tags] * 20)
    logits = torch.from_numpy(rng.normal(0.0, 2.0, (2, 3, 24, 24)))
    whole = dsp_loss(logits, t, tag_pooling="max")
    chunked = dsp_loss(logits, t, tag_pooling="max", chunk_elements=100)
    for key in whole:
        torch.testing.assert_close(whole[key], chunked[key], rtol=1e-12, atol=1e-12)


def test_many_boxes_on_a_large_crop_are_gathered_in_memory_bounded_chunks(monkeypatch):
    """200 boxes on 4 crops of 256 x 256 are pooled in chunks of at most ``_CHUNK_ELEMENTS`` gathered
    values (a few chunks, not one per box), and the loss stays finite. (Speed is a benchmark's figure.)"""
    import napari_protoseg.training.losses as losses_module

    gathered: list[int] = []
    original = losses_module._rect_chunks

    def recording_chunks(*args, **kwargs):
        for s, values in original(*args, **kwargs):
            gathered.append(values.numel())
            yield s, values

    monkeypatch.setattr(losses_module, "_rect_chunks", recording_chunks)
    rng = np.random.default_rng(0)
    n = 200
    y0 = rng.integers(0, 200, n)
    x0 = rng.integers(0, 200, n)
    boxes = np.stack([rng.integers(0, 4, n), rng.integers(0, 3, n), y0, x0,
                      y0 + rng.integers(4, 56, n), x0 + rng.integers(4, 56, n)], 1)
    t = CropTargets.empty(4, 3, 256, 256)
    t.boxes = torch.from_numpy(boxes).long()
    t.box_exhaustive[:] = True
    logits = torch.randn(4, 3, 256, 256, requires_grad=True)
    dsp_loss(logits, t, chunk_elements=1 << 16)["contrastive"].backward()
    assert 1 < len(gathered) < 40
    assert max(gathered) <= 1 << 16
    assert torch.isfinite(logits.grad).all()


# --------------------------------------------------------------------------------------------
# Degenerate inputs


def _finite(out: dict, logits: torch.Tensor) -> None:
    for key, value in out.items():
        assert torch.isfinite(value), key
    logits.grad = None
    out["contrastive" if "total" not in out else "total"].backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_empty_targets_give_a_finite_zero_loss_with_a_graph():
    """No annotations: every term is exactly 0 and backward() works (zero gradient)."""
    logits = torch.randn(2, C, 16, 16, requires_grad=True)
    t = CropTargets.empty(2, C, 16, 16)
    out = dsp_loss(logits, t)
    assert all(v.item() == 0.0 for v in out.values())
    _finite(out, logits)
    assert (logits.grad == 0).all()
    tot = total_loss(logits, t, torch.randn(2, C, 16, 16, requires_grad=True))
    assert tot["contrastive"].item() == 0.0 and tot["ce"].item() == 0.0
    _finite(tot, logits)  # (the pseudo-label term may be non-zero: unannotated pixels get labels)
    assert supervised_ce(logits, t).item() == 0.0


def test_single_class_project_is_finite():
    """C = 1 (p == 1 everywhere): every annotation type yields finite loss and gradients."""
    rng = np.random.default_rng(1)
    t = random_targets(rng, 2, 1, 16, 16)
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    for pooling in TAG_POOLINGS:
        _finite(dsp_loss(logits, t, tag_pooling=pooling), logits)
    _finite(total_loss(logits, t, torch.randn(2, 1, 16, 16)), logits)


def test_all_negative_crop_is_finite():
    """A crop where every class is absent everywhere (all tags absent) gives a finite loss and
    finite gradients; its pseudo labels are all ignored."""
    t = targets(B=1, tags=[(0, c, 0, 0, 0, H, W) for c in range(C)])
    assert negative_map(t, C, H, W).all()
    logits = torch.randn(1, C, H, W, requires_grad=True)
    _finite(dsp_loss(logits, t), logits)
    _finite(total_loss(logits, t, torch.randn(1, C, H, W)), logits)
    assert (pseudo_label_targets(logits, t) == -1).all()


def test_extreme_logits_do_not_overflow():
    """Huge logits (probabilities underflowing to 0) keep the loss and gradients finite."""
    rng = np.random.default_rng(2)
    t = random_targets(rng, 2, 3, 16, 16)
    logits = (1e4 * torch.randn(2, 3, 16, 16)).requires_grad_()
    for pooling in TAG_POOLINGS:
        _finite(dsp_loss(logits, t, tag_pooling=pooling), logits)
    _finite(total_loss(logits, t, -logits.detach()), logits)


def test_half_precision_logits_are_computed_in_float32():
    """bfloat16 logits (autocast) give a float32 loss close to the float32 one."""
    rng = np.random.default_rng(4)
    t = random_targets(rng, 1, 3, 16, 16)
    logits = torch.randn(1, 3, 16, 16)
    got = dsp_loss(logits.bfloat16(), t)["contrastive"]
    assert got.dtype == torch.float32
    assert torch.isclose(got, dsp_loss(logits.bfloat16().float(), t)["contrastive"])


def test_bad_arguments_raise():
    """Unknown tag pooling and mismatched target shapes raise ValueError."""
    t = CropTargets.empty(1, C, 8, 8)
    with pytest.raises(ValueError):
        dsp_loss(torch.zeros(1, C, 8, 8), t, tag_pooling="median")
    with pytest.raises(ValueError):
        dsp_loss(torch.zeros(1, C, 8, 9), t)
    with pytest.raises(ValueError):
        dsp_loss(torch.zeros(1, C + 1, 8, 8), t)


# --------------------------------------------------------------------------------------------
# Targets container


def test_crop_targets_empty_to_validate_and_collate():
    """empty() builds valid targets, to() moves them, collate() shifts crop indices, validate()
    rejects out-of-range classes."""
    a = targets(B=1, boxes=[(0, 1, 0, 0, 4, 4)], points=[(0, 2, 1, 1)], tags=[(0, 0, 1, 0, 0, H, W)])
    b = targets(B=2, boxes=[(1, 0, 2, 2, 6, 6)], exhaustive=[(1, 0)])
    a.validate(C)
    b.validate()
    moved = a.to("cpu")
    assert moved.mask.device.type == "cpu" and torch.equal(moved.boxes, a.boxes)
    both = CropTargets.collate([a, b])
    both.validate(C)
    assert both.batch_size == 3 and both.crop_shape == (H, W) and both.n_classes == C
    assert both.boxes[:, 0].tolist() == [0, 2]
    assert both.box_exhaustive[2, 0] and both.box_exhaustive.sum() == 1
    bad = targets(points=[(0, C, 1, 1)])
    with pytest.raises(ValueError):
        bad.validate(C)
    with pytest.raises(ValueError):
        CropTargets(a.mask, a.boxes[:, :5], a.box_exhaustive, a.points, a.tags).validate()  # too few columns


def test_extra_columns_of_boxes_points_and_tags_are_ignored():
    """Tables may carry further columns after the documented ones (e.g. a data loader's flags);
    they change neither the negatives nor the loss."""
    rng = np.random.default_rng(11)
    t = random_targets(rng, 2, 3, 16, 16)
    extra = CropTargets(t.mask, F.pad(t.boxes, (0, 1), value=1), t.box_exhaustive,
                        F.pad(t.points, (0, 2), value=7), F.pad(t.tags, (0, 1), value=1))
    extra.validate(3)
    logits = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    assert torch.equal(negative_map(t, 3, 16, 16), negative_map(extra, 3, 16, 16))
    for key, value in dsp_loss(logits, t).items():
        torch.testing.assert_close(dsp_loss(logits, extra)[key], value)
        torch.testing.assert_close(reference_dsp_loss(logits, extra)[key], value)
    both = CropTargets.collate([t, extra])
    assert both.boxes.shape[1] == 7 and both.tags.shape[1] == 8 and both.points.shape[1] == 6


# --------------------------------------------------------------------------------------------
# Cross-entropy and pseudo labels


def test_supervised_ce_uses_mask_and_point_pixels_only():
    """CE is the mean over annotated mask pixels and point pixels; 0 (with a graph) without any."""
    mask = torch.full((1, 8, 8), -1)
    mask[0, 0, :4] = 2
    t = targets(h=8, w=8, mask=mask, points=[(0, 1, 5, 5), (0, 0, 9, 9)])  # second point outside
    logits = torch.randn(1, C, 8, 8, requires_grad=True)
    target = supervised_targets(t)
    assert (target >= 0).sum() == 5 and target[0, 5, 5] == 1
    sel = target[0] >= 0
    want = F.cross_entropy(logits[0][:, sel].T, target[0][sel])
    torch.testing.assert_close(supervised_ce(logits, t), want)
    empty = supervised_ce(logits, CropTargets.empty(1, C, 8, 8))
    assert empty.item() == 0.0
    empty.backward()


def test_balanced_ce_weighs_every_present_class_equally():
    """With balance, a class of 2 pixels counts as much as one of 30: mean of per-class means."""
    mask = torch.full((1, 8, 8), -1)
    mask[0, :4, :] = 0  # 32 pixels
    mask[0, 7, :2] = 2  # 2 pixels; class 1 absent
    t = targets(h=8, w=8, mask=mask)
    logits = torch.randn(1, C, 8, 8, requires_grad=True)
    ce = F.cross_entropy(logits, mask.clamp_min(0), reduction="none")[0]
    want = (ce[mask[0] == 0].mean() + ce[mask[0] == 2].mean()) / 2
    torch.testing.assert_close(supervised_ce(logits, t, balance=True), want)
    assert not torch.isclose(supervised_ce(logits, t), want)
    torch.testing.assert_close(pseudo_label_loss(logits, mask, balance=True), want)
    assert supervised_ce(logits, CropTargets.empty(1, C, 8, 8), balance=True).item() == 0.0


def test_partial_balance_weighs_classes_by_a_power_of_their_pixel_counts():
    """balance=0.5 weighs each class's mean CE by sqrt(pixel count): between plain and full balance."""
    mask = torch.full((1, 8, 8), -1)
    mask[0, :4, :] = 0  # 32 pixels
    mask[0, 7, :2] = 2  # 2 pixels
    t = targets(h=8, w=8, mask=mask)
    logits = torch.randn(1, C, 8, 8)
    ce = F.cross_entropy(logits, mask.clamp_min(0), reduction="none")[0]
    w0, w2 = 32 ** 0.5, 2 ** 0.5
    want = (w0 * ce[mask[0] == 0].mean() + w2 * ce[mask[0] == 2].mean()) / (w0 + w2)
    torch.testing.assert_close(supervised_ce(logits, t, balance=0.5), want)
    torch.testing.assert_close(supervised_ce(logits, t, balance=0.0), supervised_ce(logits, t, balance=False))
    with pytest.raises(ValueError, match="balance"):
        supervised_ce(logits, t, balance=1.5)


def test_pseudo_labels_never_pick_a_forbidden_class():
    """Pseudo labels avoid every class the annotations rule out and keep annotated classes."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        t = random_targets(rng, 2, 4, 20, 20)
        logits = torch.from_numpy(rng.normal(0.0, 5.0, (2, 4, 20, 20))).float()
        pl = pseudo_label_targets(logits, t)
        neg = negative_map(t, 4, 20, 20)
        known = supervised_targets(t)
        free = (known < 0) & (pl >= 0)
        chosen_forbidden = neg.gather(1, pl.clamp_min(0)[:, None])[:, 0]
        assert not (chosen_forbidden & free).any()
        assert torch.equal(pl[known >= 0], known[known >= 0])
        assert torch.equal(pl < 0, (known < 0) & neg.all(1))


def test_pseudo_label_threshold_masks_low_confidence_pixels():
    """Pixels whose renormalised confidence is below the threshold become -1; annotated ones stay."""
    logits = torch.zeros(1, C, 4, 4)
    logits[0, 0, :2] = 10.0  # confident class 0 in the top half, uniform in the bottom half
    t = targets(h=4, w=4, points=[(0, 2, 3, 3)])
    pl = pseudo_label_targets(logits, t, threshold=0.9)
    assert (pl[0, :2] == 0).all()
    assert (pl[0, 2:].flatten()[:-1] == -1).all() and pl[0, 3, 3] == 2
    # Forbidding classes renormalises: with class 1 and 2 absent, class 0 is certain.
    t2 = targets(h=4, w=4, tags=[(0, 1, 0, 0, 0, 4, 4), (0, 2, 0, 0, 0, 4, 4)])
    assert (pseudo_label_targets(logits, t2, threshold=0.9) == 0).all()


def test_pseudo_label_targets_are_detached_and_loss_trains_strong_view():
    """Pseudo labels carry no gradient; the pseudo-label loss is CE on the strong view's logits."""
    weak = torch.randn(1, C, 8, 8, requires_grad=True)
    pl = pseudo_label_targets(weak, CropTargets.empty(1, C, 8, 8))
    assert not pl.requires_grad and pl.dtype == torch.long and (pl >= 0).all()
    strong = torch.randn(1, C, 8, 8, requires_grad=True)
    loss = pseudo_label_loss(strong, pl)
    torch.testing.assert_close(loss, F.cross_entropy(strong, pl))
    loss.backward()
    assert strong.grad is not None and weak.grad is None
    nothing = pseudo_label_loss(strong, torch.full((1, 8, 8), -1))
    assert nothing.item() == 0.0


# --------------------------------------------------------------------------------------------
# Strong augmentation and total loss


def test_strong_augment_is_photometric_and_reproducible():
    """Same generator seed -> same output; without noise and cutout every crop is a monotone
    per-pixel intensity map (pixel order preserved, so the view stays aligned); with cutout the
    output changes but keeps shape and dtype."""
    x = torch.rand(3, 3, 32, 40)
    a = strong_augment(x, torch.Generator().manual_seed(5))
    b = strong_augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape and a.dtype == x.dtype
    assert torch.isfinite(a).all()
    y = strong_augment(x, torch.Generator().manual_seed(1), noise=0.0, cutouts=0)
    for i in range(3):
        order = torch.argsort(x[i].flatten())
        assert (y[i].flatten()[order].diff() >= -1e-5).all()
    assert not torch.equal(y, x)
    cut = strong_augment(x, torch.Generator().manual_seed(0), noise=0.0, gamma=(1, 1), gain=(1, 1),
                         offset=0.0, cutouts=3, cutout_prob=1.0)
    filled = cut != x
    assert filled.any() and filled.float().mean() < 0.6
    constant = torch.ones(2, 1, 8, 8)
    assert torch.isfinite(strong_augment(constant)).all()


def test_total_loss_combines_weighted_terms_and_backpropagates():
    """total = w_c * contrastive + w_ce * CE + w_pl * pseudo-label; all terms reported."""
    rng = np.random.default_rng(9)
    t = random_targets(rng, 2, 3, 16, 16)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    strong = torch.randn(2, 3, 16, 16, requires_grad=True)
    w = LossWeights(contrastive=0.5, ce=2.0, pseudo_label=0.25)
    out = total_loss(logits, t, strong, weights=w, pl_threshold=None)
    assert {"total", "contrastive", "mask", "box", "point", "tag", "negative", "ce", "pseudo_label"} <= set(out)
    want = 0.5 * out["contrastive"] + 2.0 * out["ce"] + 0.25 * out["pseudo_label"]
    torch.testing.assert_close(out["total"], want)
    torch.testing.assert_close(out["contrastive"], dsp_loss(logits, t)["contrastive"])
    out["total"].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(strong.grad).all()
    assert strong.grad.abs().sum() > 0
    defaults = LossWeights()
    assert (defaults.contrastive, defaults.ce, defaults.pseudo_label) == (1.0, 1.0, 0.5)
    no_strong = total_loss(logits, t)
    assert no_strong["pseudo_label"].item() == 0.0
    assert math.isfinite(no_strong["total"].item())


def test_a_box_cut_by_the_crop_border_gives_no_positive_but_stays_off_the_negatives():
    """Cut boxes (7th column 0) are not tight any more: no MIL positive, yet not 'outside all boxes'."""
    logits = torch.zeros(1, 2, 8, 8, requires_grad=True)
    cut = torch.tensor([[0, 1, 0, 0, 4, 4, 0]])
    t = CropTargets(mask=torch.full((1, 8, 8), -1), boxes=cut, box_exhaustive=torch.tensor([[False, True]]),
                    points=torch.zeros(0, 4, dtype=torch.long), tags=torch.zeros(0, 7, dtype=torch.long))
    terms = dsp_loss(logits, t)
    assert float(terms["box"].detach()) == 0.0
    neg = negative_map(t, 2, 8, 8)
    assert not neg[0, 1, :4, :4].any() and neg[0, 1, 4:, :].all()
    whole = t.boxes.clone()
    whole[0, 6] = 1
    t_whole = CropTargets(t.mask, whole, t.box_exhaustive, t.points, t.tags)
    assert float(dsp_loss(logits, t_whole)["box"].detach()) > 0
    torch.testing.assert_close(dsp_loss(logits, t_whole)["box"], reference_dsp_loss(logits, t_whole)["box"])
    assert float(reference_dsp_loss(logits, t)["box"].detach()) == 0.0


# --------------------------------------------------------------------------------------------
# Exhaustive points rule out the predicted regions they do not reach


def _logits_with_regions(regions, B=1):
    """Logits whose argmax is class 0 everywhere except the given (b, c, y0, x0, y1, x1) rectangles."""
    logits = torch.zeros(B, C, H, W)
    logits[:, 0] = 1.0
    for b, c, y0, x0, y1, x1 in regions:
        logits[b, c, y0:y1, x0:x1] = 2.0
    return logits


def test_a_predicted_region_without_a_point_is_negative_only_where_points_are_exhaustive():
    """Three regions predicted as class 1: one holds a class-1 point, one holds none, one touches the
    crop's edge. With class 1's points exhaustive only the unpointed inner region becomes negative
    for class 1; without the flag nothing does."""
    logits = _logits_with_regions([(0, 1, 4, 4, 10, 10), (0, 1, 15, 15, 20, 22), (0, 1, 25, 0, 30, 6)])
    t = targets(points=[(0, 1, 6, 6)])
    assert not unpointed_region_negatives(logits, t).any()
    t.point_exhaustive = torch.tensor([[False, True, False]])
    neg = unpointed_region_negatives(logits, t)
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[15:20, 15:22] = True
    assert torch.equal(neg[0, 1], expected)
    assert not neg[0, [0, 2]].any()
    # A mask pixel of class 1 inside the region vouches for it like a point.
    t.mask = torch.full((1, H, W), -1)
    t.mask[0, 17, 17] = 1
    assert not unpointed_region_negatives(logits, t).any()


def test_unpointed_regions_keep_full_weight_where_their_class_has_no_positive():
    """With ``negative_only_weight=0`` a class without a positive in the crop is not pushed down by
    the annotations' negatives, but its unpointed regions still are (they vanish once the class is
    no longer predicted there)."""
    start = _logits_with_regions([(0, 1, 15, 15, 20, 22)])
    t = targets(points=[(0, 0, 3, 3)])  # a class-0 point: a negative for class 1, no class-1 point
    t.point_exhaustive = torch.tensor([[False, True, False]])

    def trained(unpointed):
        logits = torch.nn.Parameter(start.clone())
        opt = torch.optim.Adam([logits], lr=0.1)
        for _ in range(20):
            opt.zero_grad()
            total_loss(logits, t, unpointed_negatives=unpointed, negative_only_weight=0.0)["total"].backward()
            opt.step()
        return torch.softmax(logits.detach(), 1)[0, 1, 15:20, 15:22].mean()

    before = torch.softmax(start, 1)[0, 1, 15:20, 15:22].mean()
    assert trained(unpointed=True) < 0.5 * before
    assert trained(unpointed=False) == pytest.approx(float(before), rel=1e-6)


def test_unpointed_negatives_push_the_unpointed_region_down_in_the_loss():
    """``total_loss(..., unpointed_negatives=True)`` adds those negatives: a few optimiser steps lower
    class 1 in the unpointed region and keep it at the point."""
    start = _logits_with_regions([(0, 1, 4, 4, 10, 10), (0, 1, 15, 15, 20, 22)])
    t = targets(points=[(0, 1, 6, 6)])
    t.point_exhaustive = torch.tensor([[False, True, False]])
    logits = torch.nn.Parameter(start.clone())
    opt = torch.optim.Adam([logits], lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        total_loss(logits, t, unpointed_negatives=True)["total"].backward()
        opt.step()
    after = torch.softmax(logits.detach(), 1)[0, 1]
    before = torch.softmax(start, 1)[0, 1]
    assert after[15:20, 15:22].mean() < 0.5 * before[15:20, 15:22].mean()
    assert after[6, 6] > 0.9


def test_total_loss_uses_a_given_negative_map_without_changing_it():
    """``train`` builds the negative map once and hands it to ``total_loss`` and the instance
    losses: the terms equal those of a map built inside, and the unpointed-region negatives that
    ``total_loss`` adds do not leak into the caller's map."""
    start = _logits_with_regions([(0, 1, 4, 4, 10, 10), (0, 1, 15, 15, 20, 22)])
    t = targets(points=[(0, 1, 6, 6), (0, 0, 3, 3)])
    t.point_exhaustive = torch.tensor([[False, True, False]])
    given = negative_map(t, *start.shape[1:])
    kept = given.clone()
    inside = total_loss(start, t, unpointed_negatives=True)
    outside = total_loss(start, t, unpointed_negatives=True, negatives=given)
    assert unpointed_region_negatives(start, t).any()
    assert torch.equal(given, kept)
    for name, value in inside.items():
        assert torch.equal(value, outside[name]), name
