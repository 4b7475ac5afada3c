"""The WISE-Net instance losses: each LCFCN term on tiny hand-made maps, and the similarity loss."""

import math

import numpy as np
import pytest
import torch
from skimage.segmentation import watershed

from napari_protoseg.training.instance_losses import (
    InstanceLossWeights,
    embedding_loss,
    instance_loss,
    lcfcn_loss,
    lcfcn_targets,
    object_points,
    similarity,
)
from napari_protoseg.training.losses import CropTargets

H = W = 24
C = 3  # class 2 is the instance class
INSTANCE = [2]


def targets(B=1, points=(), exhaustive=False, tags=(), mask=None):
    t = CropTargets.empty(B, C, H, W)
    if points:
        t.points = torch.tensor(points, dtype=torch.long).reshape(-1, 4)
    t.point_exhaustive = torch.zeros(B, C, dtype=torch.bool)
    t.point_exhaustive[:, 2] = exhaustive
    if tags:
        t.tags = torch.tensor(tags, dtype=torch.long).reshape(-1, 7)
    if mask is not None:
        t.mask = torch.as_tensor(mask, dtype=torch.long).reshape(B, H, W)
    return t


def localization(blobs=(), low=-4.0, high=4.0, B=1):
    """Logits: ``low`` everywhere, ``high`` in the rectangles ``blobs`` ((y0, x0, y1, x1), ...)."""
    loc = torch.full((B, 1, H, W), low)
    for y0, x0, y1, x1 in blobs:
        loc[:, 0, y0:y1, x0:x1] = high
    return loc.requires_grad_(True)


def only(*names):
    """The named terms, all others weighted 0."""
    w = {f.name: 0.0 for f in InstanceLossWeights.__dataclass_fields__.values()}
    w.update({name: 1.0 for name in names})
    return InstanceLossWeights(**w)


def flat_pixels(pixels):
    return {divmod(int(p) % (H * W), W) for p in pixels}


# --------------------------------------------------------------------------------- LCFCN


def test_two_points_in_one_blob_create_a_split_boundary_between_them():
    """A blob holding two points gets a local split: a boundary across the blob between the two
    points, pushed to background; a blob with one point gets none."""
    t = targets(points=[(0, 2, 12, 5), (0, 2, 12, 18)])
    loc = localization([(9, 2, 16, 22)])
    tg = lcfcn_targets(loc, t, INSTANCE)
    local = flat_pixels(tg.split_local[0])
    assert local, "no split boundary inside the blob"
    assert all(9 <= y < 16 and 2 <= x < 22 for y, x in local)  # inside the blob
    assert all(5 < x < 18 for _, x in local)  # between the points
    assert {y for y, _ in local} == set(range(9, 16))  # it cuts the blob across
    assert tg.split_local_weight[tg.split_local[1][0]] == 1  # two points: weight n - 1 = 1
    # The global split holds the same boundary over the whole plane.
    assert local <= flat_pixels(tg.split_global[0]) and len(tg.split_global[0]) > len(local)

    terms = lcfcn_loss(loc, t, INSTANCE, weights=only("split_local"))
    assert terms["loc_split_local"].item() == pytest.approx(-math.log(1 - torch.sigmoid(torch.tensor(4.0)).item()),
                                                            rel=1e-5)
    terms["localization"].backward()
    grad = loc.grad[0, 0]
    boundary = np.zeros((H, W), bool)
    boundary[tuple(np.array(sorted(local)).T)] = True
    assert bool((grad[torch.from_numpy(boundary)] > 0).all())  # descent lowers p on the boundary
    assert bool((grad[torch.from_numpy(~boundary)] == 0).all())

    one = lcfcn_targets(localization([(9, 2, 16, 22)]), targets(points=[(0, 2, 12, 5)]), INSTANCE)
    assert len(one.split_local[0]) == 0 and len(one.split_global[0]) == 0


def test_global_split_separates_points_in_different_blobs():
    t = targets(points=[(0, 2, 5, 5), (0, 2, 18, 18)])
    tg = lcfcn_targets(localization([(3, 3, 8, 8), (16, 16, 21, 21)]), t, INSTANCE)
    assert len(tg.split_local[0]) == 0  # no blob holds two points
    basins = tg.basins[0, 0]
    assert basins[5, 5] != basins[18, 18] and set(np.unique(basins)) == {1, 2}
    assert len(tg.split_global[0]) > 0


def test_one_watershed_over_stacked_planes_equals_a_watershed_per_plane():
    """The batch's planes are flooded in one call; the footprint keeps them apart."""
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(size=(3, 1, H, W)).astype(np.float32))
    pts = [(0, 2, 3, 3), (0, 2, 20, 10), (0, 2, 12, 12), (1, 2, 5, 19), (1, 2, 19, 2), (2, 2, 8, 8)]
    tg = lcfcn_targets(logits, targets(B=3, points=pts), INSTANCE)
    prob = torch.sigmoid(logits).numpy()
    for b in range(2):
        markers = np.zeros((H, W), np.int64)
        for i, (bb, _, y, x) in enumerate(pts):
            if bb == b:
                markers[y, x] = i + 1
        np.testing.assert_array_equal(tg.basins[b, 0], watershed(-prob[b, 0], markers))
    assert not tg.basins[2].any()  # one point: nothing to split


def test_a_blob_without_a_point_is_pushed_down_only_where_points_are_exhaustive():
    blobs = [(3, 3, 8, 8), (14, 14, 19, 19)]  # the second holds no point
    points = [(0, 2, 5, 5)]
    for exhaustive in (True, False):
        loc = localization(blobs)
        t = targets(points=points, exhaustive=exhaustive)
        tg = lcfcn_targets(loc, t, INSTANCE, edge_margin=4)
        terms = lcfcn_loss(loc, t, INSTANCE, targets=tg, weights=only("false_positive"))
        if exhaustive:
            assert flat_pixels(tg.false_positive[0]) == {(y, x) for y in range(14, 19) for x in range(14, 19)}
            assert terms["loc_false_positive"].item() > 4.0
            terms["localization"].backward()
            assert bool((loc.grad[0, 0, 14:19, 14:19] > 0).all())
            assert bool((loc.grad[0, 0, 3:8, 3:8] == 0).all())  # the blob with its point is left alone
        else:
            assert len(tg.false_positive[0]) == 0
            assert terms["loc_false_positive"].item() == 0.0


def test_blobs_near_the_edge_are_spared_unless_the_crop_is_mask_labelled():
    """With exhaustive points, a point-free blob near the crop's edge may be an object whose point
    lies outside the crop: spared. A mask-labelled crop has a (virtual) point in every object."""
    loc = localization([(10, 10, 14, 14), (1, 1, 4, 4)])  # the second lies within 4 px of the edge
    inner = {(y, x) for y in range(10, 14) for x in range(10, 14)}
    tg = lcfcn_targets(loc, targets(exhaustive=True), INSTANCE, edge_margin=4)
    assert flat_pixels(tg.false_positive[0]) == inner
    mask = np.zeros((H, W), np.int64)  # every pixel labelled class 0: no object at all
    tg = lcfcn_targets(loc, targets(mask=mask), INSTANCE, edge_margin=4)
    assert flat_pixels(tg.false_positive[0]) == inner | {(y, x) for y in range(1, 4) for x in range(1, 4)}


def test_point_level_term_is_minus_log_p_at_the_points():
    loc = localization()
    with torch.no_grad():
        loc[0, 0, 5, 5] = 0.0
        loc[0, 0, 9, 9] = 2.0
    t = targets(points=[(0, 2, 5, 5), (0, 2, 9, 9), (0, 1, 3, 3)])  # the last is not an instance class
    terms = lcfcn_loss(loc, t, INSTANCE)
    expected = -(math.log(0.5) + math.log(torch.sigmoid(torch.tensor(2.0)).item()))  # summed over the crop's points
    assert terms["loc_point"].item() == pytest.approx(expected, rel=1e-5)


def test_image_level_term_follows_present_and_absent_tags():
    """A present tag pushes the maximum of p over its region up, an absent tag pushes it down."""
    loc = localization([(2, 2, 4, 4)], low=-2.0, high=1.0)
    region = (0, 0, 12, 12)
    for present, expected in ((1, -math.log(torch.sigmoid(torch.tensor(1.0)).item())),
                              (0, -math.log(1 - torch.sigmoid(torch.tensor(1.0)).item()))):
        loc.grad = None
        t = targets(tags=[(0, 2, present, *region)])
        terms = lcfcn_loss(loc, t, INSTANCE, weights=only("image"))
        assert terms["loc_image"].item() == pytest.approx(expected, rel=1e-5)
        terms["localization"].backward()
        grad_at_max = loc.grad[0, 0, 2:4, 2:4]
        assert bool((grad_at_max < 0).all()) if present else bool((grad_at_max > 0).all())
        assert bool((loc.grad[0, 0, 12:, 12:] == 0).all())  # outside the tag's region
    # A tag of another class says nothing about this class.
    assert lcfcn_loss(loc, targets(tags=[(0, 1, 0, *region)]), INSTANCE)["loc_image"].item() == 0.0


def test_image_level_term_marks_a_crop_with_a_point_present():
    loc = localization(low=-3.0)
    terms = lcfcn_loss(loc, targets(points=[(0, 2, 7, 7)]), INSTANCE)
    assert terms["loc_image"].item() == pytest.approx(-math.log(torch.sigmoid(torch.tensor(-3.0)).item()), rel=1e-5)


def test_negative_term_pushes_down_where_annotations_rule_the_class_out():
    mask = np.full((H, W), -1)
    mask[:4] = 0
    loc = localization(low=0.0)
    terms = lcfcn_loss(loc, targets(mask=mask), INSTANCE, weights=only("negative"))
    assert terms["loc_negative"].item() == pytest.approx(math.log(2), rel=1e-5)
    terms["localization"].backward()
    assert bool((loc.grad[0, 0, :4] > 0).all()) and bool((loc.grad[0, 0, 4:] == 0).all())


def test_mask_components_give_virtual_points_unless_they_hold_an_annotated_point():
    mask = np.full((H, W), -1)
    mask[2:9, 2:9] = 2  # component with a point
    mask[12:21, 12:21] = 2  # component without: virtual point at its centre
    mask[2:5, 15:20] = 1  # another class
    pts = object_points(targets(points=[(0, 2, 3, 3)], mask=mask), INSTANCE)
    assert len(pts) == 2
    assert pts.annotated.tolist() == [True, False]
    assert (pts.y[1], pts.x[1]) == (16, 16)
    assert pts.component[0] != pts.component[1] and pts.points_in_component[pts.component[0]] == 1


# ---------------------------------------------------------------------------- similarity


def test_similarity_is_one_for_equal_vectors_and_falls_with_distance():
    a = torch.zeros(4, 3)
    b = torch.tensor([[0.0, 0, 0], [0.5, 0, 0], [1.0, 0, 0], [3.0, 0, 0]])
    s = similarity(a, b)
    torch.testing.assert_close(s, 2 / (1 + torch.exp((a - b).pow(2).sum(-1))))
    assert s[0].item() == 1.0 and bool((s[1:] < s[:-1]).all())


def _two_objects():
    """Two touching mask components of the instance class (split by a labelled gap column) and background."""
    mask = np.zeros((H, W), np.int64)
    mask[4:20, 2:11] = 2
    mask[4:20, 12:22] = 2
    return targets(mask=mask), mask


def _embedding(mask, vector_left, vector_right, vector_background=(0.0, 0.0)):
    emb = torch.zeros(1, 2, H, W)
    emb[0, :] = torch.tensor(vector_background)[:, None, None]
    left = torch.zeros(H, W, dtype=torch.bool)
    left[4:20, 2:11] = True
    right = torch.zeros(H, W, dtype=torch.bool)
    right[4:20, 12:22] = True
    emb[0, :, left] = torch.tensor(vector_left)[:, None]
    emb[0, :, right] = torch.tensor(vector_right)[:, None]
    return emb.requires_grad_(True)


def test_similarity_loss_is_low_for_a_correct_grouping_and_high_for_a_wrong_one():
    t, mask = _two_objects()
    semantic = torch.zeros(1, C, H, W)  # the semantic prediction is not used by mask objects
    loc = localization()
    tg = lcfcn_targets(loc, t, INSTANCE)

    def loss(emb):
        return embedding_loss(emb, semantic, t, INSTANCE, lcfcn=tg, rng=np.random.default_rng(0)).item()

    correct = loss(_embedding(mask, (3.0, 0.0), (0.0, 3.0), (-3.0, -3.0)))
    merged = loss(_embedding(mask, (3.0, 0.0), (3.0, 0.0), (-3.0, -3.0)))  # both objects alike
    swapped_half = _embedding(mask, (3.0, 0.0), (0.0, 3.0), (-3.0, -3.0))
    with torch.no_grad():
        swapped_half[0, :, 4:12, 2:11] = torch.tensor([0.0, 3.0])[:, None, None]  # half of A looks like B
    wrong = loss(swapped_half)
    flat = loss(_embedding(mask, (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)))  # everything alike
    assert correct < 0.05
    assert merged > correct + 0.5 and wrong > correct + 0.5 and flat > correct + 0.5


def test_similarity_loss_pulls_an_objects_pixels_together_and_pushes_objects_apart():
    """Gradient descent on the embedding alone lowers the loss and separates the two objects."""
    t, mask = _two_objects()
    semantic = torch.zeros(1, C, H, W)
    tg = lcfcn_targets(localization(), t, INSTANCE)
    emb = (0.1 * torch.randn(1, 2, H, W, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    optimizer = torch.optim.Adam([emb], lr=0.05)
    losses = []
    for step in range(60):
        loss = embedding_loss(emb, semantic, t, INSTANCE, lcfcn=tg, rng=np.random.default_rng(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    left = emb[0, :, 4:20, 2:11].detach().reshape(2, -1).mean(1)
    right = emb[0, :, 4:20, 12:22].detach().reshape(2, -1).mean(1)
    assert (left - right).pow(2).sum().item() > 1.0


def test_point_regions_come_from_the_semantic_prediction_split_between_touching_objects():
    """Two points in one semantic region: each point's object is its part of the region (the
    watershed basins), so pixels near a point are pulled to it and pushed from the other."""
    semantic = torch.full((1, C, H, W), -10.0)
    semantic[0, 0] = 10.0  # background class everywhere ...
    semantic[0, 0, 6:18, 2:22] = -10.0
    semantic[0, 2, 6:18, 2:22] = 10.0  # ... but one region of the instance class
    t = targets(points=[(0, 2, 12, 5), (0, 2, 12, 18)])
    loc = localization([(10, 3, 14, 8), (10, 16, 14, 21)])
    from napari_protoseg.training.instance_losses import InstanceLossSettings, _object_regions

    tg = lcfcn_targets(loc, t, INSTANCE)
    objects, anchors = _object_regions(t, np.array(INSTANCE), tg, torch.softmax(semantic, 1), InstanceLossSettings())
    assert len(anchors) == 2
    left, right = objects[0, 0, 12, 5], objects[0, 0, 12, 18]
    assert left != right and left > 0 and right > 0
    assert set(np.unique(objects[0, 0, 6:18, 2:22])) == {left, right}  # the region is split between them
    assert not objects[0, 0, :6].any()  # background stays outside

    emb = torch.zeros(1, 2, H, W)
    emb[0, 0, :, :12] = 3.0
    emb[0, 1, :, 12:] = 3.0
    good = embedding_loss(emb, semantic, t, INSTANCE, lcfcn=tg).item()
    bad = embedding_loss(torch.zeros(1, 2, H, W), semantic, t, INSTANCE, lcfcn=tg).item()
    assert good < bad


def test_instance_loss_returns_every_term_and_backpropagates_into_both_heads():
    t, _ = _two_objects()
    t.points = torch.tensor([[0, 2, 10, 6]])
    loc = localization([(8, 4, 12, 8)])
    emb = torch.randn(1, 8, H, W, requires_grad=True)
    out = instance_loss(loc, emb, torch.randn(1, C, H, W), t, INSTANCE, rng=np.random.default_rng(0))
    assert set(out) == {"loc_image", "loc_point", "loc_split_global", "loc_split_local", "loc_false_positive",
                        "loc_negative", "localization", "embedding"}
    (out["localization"] + out["embedding"]).backward()
    assert loc.grad.abs().sum() > 0 and emb.grad.abs().sum() > 0
    assert all(torch.isfinite(v) for v in out.values())


def test_bad_instance_indices_are_refused():
    loc = localization()
    with pytest.raises(ValueError, match="instance_indices"):
        lcfcn_loss(loc, targets(), [5])
    with pytest.raises(ValueError, match="channels"):
        lcfcn_targets(loc, targets(), [1, 2])


def test_crop_sampler_reports_which_classes_points_are_exhaustive():
    from napari_protoseg.training.crops import CropSampler
    from napari_protoseg.model.inputs import Normalization
    from napari_protoseg.annotations.project import AnnotationSet, ClassInfo

    points = [(0, 5, 5, 2, True), (0, 20, 20, 2, True), (0, 10, 10, 1, False), (1, 7, 7, 2, False)]
    annotations = AnnotationSet((2, 32, 32), [ClassInfo(1, "a"), ClassInfo(2, "b", instances=True)],
                                points=points)
    sampler = CropSampler(np.zeros((2, 32, 32), np.float32), annotations, Normalization(0.0, 1.0), crop_size=32)
    _, t = sampler.sample(16, np.random.default_rng(0))
    for b in range(16):
        n = int((t.points[:, 0] == b).sum())  # 3 points: a crop of plane 0, 1 point: plane 1
        assert n in (1, 3)
        assert t.point_exhaustive[b, 1].item() == (n == 3)  # plane 0: all class-2 points exhaustive
        assert not t.point_exhaustive[b, 0].item()  # class 1's point is not



def _backward_ops(tensor):
    seen, stack, names = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_instance_losses_backpropagate_without_unordered_atomic_adds():
    """Plain tensor indexing backpropagates through index_put with accumulation, which a multi-threaded
    CPU runs as unordered atomic float adds: repeated pixels (an anchor in many pairs, overlapping split
    lines) then sum in a different order from run to run, and training with the instance heads was not
    reproducible. The losses gather with index_select, whose backward adds in a fixed order."""
    B, size = 2, 48
    yy, xx = np.mgrid[:size, :size]
    mask = np.full((B, size, size), -1, np.int64)
    mask[:, :8] = 0
    points = []
    for b in range(B):
        for cy, cx in [(16, 14), (16, 34), (36, 24)]:
            mask[b][(yy - cy) ** 2 + (xx - cx) ** 2 < 49] = 2
            points.append((b, 2, cy, cx))
    t = CropTargets.empty(B, C, size, size)
    t.mask = torch.as_tensor(mask)
    t.points = torch.tensor(points)
    t.point_exhaustive = torch.ones(B, C, dtype=torch.bool)
    t.tags = torch.tensor([(0, 2, 1, 0, 0, size, size), (1, 1, 0, 0, 0, size, size)])
    generator = torch.Generator().manual_seed(0)
    loc = torch.randn(B, 1, size, size, generator=generator).requires_grad_(True)
    emb = torch.randn(B, 8, size, size, generator=generator).requires_grad_(True)
    semantic = torch.randn(B, C, size, size, generator=generator)
    out = instance_loss(loc, emb, semantic, t, INSTANCE, rng=np.random.default_rng(0))
    for name in ("loc_image", "loc_point", "loc_split_global", "loc_false_positive", "loc_negative", "embedding"):
        assert out[name].grad_fn is not None, name  # the term has pixels, so it is really checked
        assert "IndexBackward0" not in _backward_ops(out[name]), name


def test_the_embedding_loss_of_a_sampled_embedding_equals_that_of_the_full_map():
    """Training evaluates the instance embedding only at the pixels the loss samples
    (SampledEmbedding); the loss and the gradients into the head equal those of the full map."""
    from napari_protoseg.model.network import InstanceHead, SampledEmbedding

    t, _ = _two_objects()
    semantic = torch.zeros(1, C, H, W)
    torch.manual_seed(0)
    head = InstanceHead(6, 4, 8)
    features = torch.randn(1, 6, H, W)
    tg = lcfcn_targets(localization(), t, INSTANCE)
    losses, grads = [], []
    for embedding in (head(features), SampledEmbedding(head.hidden(features), head.conv2)):
        head.zero_grad()
        loss = embedding_loss(embedding, semantic, t, INSTANCE, lcfcn=tg, rng=np.random.default_rng(0))
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in head.parameters()])
    assert losses[0] > 0
    torch.testing.assert_close(losses[1], losses[0])
    for sampled, full in zip(grads[1], grads[0]):
        torch.testing.assert_close(sampled, full)
