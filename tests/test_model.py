"""Tests of the DSP network (napari_protoseg.model.network); pure PyTorch, no Qt."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from napari_protoseg.model.network import DSPHead, FilterBank, ModelConfig, ProtoSegNet, UNet2D, pick_device


# The plain full-resolution network without context heads that these tests were written for (a
# bare ModelConfig's defaults before configuration version 2).
PLAIN = dict(input_scale=1, localization_context=0, embedding_context=0, instance_coordinates=0.0)


def tiny(**kw) -> ProtoSegNet:
    torch.manual_seed(0)
    cfg = dict(n_classes=3, base_width=4, depth=2, embed_dim=8, prototypes_per_class=2, **PLAIN)
    cfg.update(kw)
    return ProtoSegNet(ModelConfig(**cfg))


def test_forward_shapes_and_keys():
    """forward returns per-pixel embeddings (B, D, H, W) and logits (B, C, H, W) at full resolution."""
    net = tiny()
    out = net(torch.randn(2, 1, 32, 48))
    assert set(out) == {"embedding", "logits"}
    assert out["embedding"].shape == (2, 8, 32, 48)
    assert out["logits"].shape == (2, 3, 32, 48)
    assert out["logits"].is_contiguous()


def test_embeddings_are_unit_vectors_and_prototypes_normalised():
    """Embeddings lie on the unit sphere; the prototypes used are L2-normalised at every forward
    (even after the raw parameter drifts off the sphere)."""
    net = tiny()
    with torch.no_grad():
        net.prototypes.mul_(3.0).add_(0.5)
    out = net(torch.randn(2, 1, 20, 20))
    torch.testing.assert_close(out["embedding"].norm(dim=1), torch.ones(2, 20, 20))
    protos = net.normalized_prototypes()
    assert protos.shape == (3, 2, 8)
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(3, 2))


def test_logits_are_mean_cosine_over_prototypes_divided_by_temperature():
    """s_c = (1/K) sum_j cos(e, p_c^j) / tau, hence |s_c| <= 1/tau."""
    net = tiny(temperature=0.05)
    with torch.no_grad():
        net.prototypes.mul_(2.7)
    out = net(torch.randn(2, 1, 16, 16))
    e = out["embedding"]
    cos = F.cosine_similarity(e[:, None, None], net.prototypes[None, :, :, :, None, None], dim=3)  # (B,C,K,H,W)
    torch.testing.assert_close(out["logits"], cos.mean(dim=2) / 0.05, rtol=1e-5, atol=1e-4)
    assert out["logits"].abs().max() <= 1 / 0.05 + 1e-4


def test_any_input_size_works_and_is_cropped_back():
    """Odd and tiny sizes are padded internally to a multiple of 2**depth and cropped back
    (eval mode: a training-mode BatchNorm cannot normalise a single pixel)."""
    net = tiny(depth=3).eval()
    for h, w in ((37, 53), (1, 1), (5, 130), (8, 8)):
        out = net(torch.randn(1, 1, h, w))
        assert out["logits"].shape == (1, 3, h, w)
        assert torch.isfinite(out["logits"]).all()


def test_padding_does_not_leak_across_the_crop():
    """The internal padding only adds pixels at the bottom/right and keeps the pooling grid: with
    BatchNorm in eval mode (a purely local network) the top-left region of an odd-sized input
    equals that of the larger input it was cut from. (GroupNorm normalises over the whole input,
    so there tiles see slightly different statistics.)"""
    net = tiny(depth=2, norm="batch").eval()
    x = torch.randn(1, 1, 64, 64)
    full = net(x)["logits"][..., :12, :12]
    cut = net(x[..., :61, :63])["logits"][..., :12, :12]
    torch.testing.assert_close(full, cut, rtol=1e-4, atol=1e-4)


def test_25d_input_channels_and_wrong_channels_raise():
    """in_channels = 2k + 1 takes neighbouring sections as channels; a mismatch raises ValueError."""
    net = tiny(in_channels=5)
    assert net(torch.randn(1, 5, 16, 16))["logits"].shape == (1, 3, 16, 16)
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 16, 16))
    with pytest.raises(ValueError):
        net(torch.randn(5, 16, 16))


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_gradients_reach_backbone_head_and_prototypes(norm):
    """One backward pass gives finite, non-zero gradients to every parameter (both norm layers)."""
    net = tiny(norm=norm)
    out = net(torch.randn(2, 1, 24, 24))
    F.cross_entropy(out["logits"], torch.randint(0, 3, (2, 24, 24))).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert net.prototypes.grad.abs().sum() > 0


def test_single_class_network():
    """C = 1 works (the logits are a single channel)."""
    net = tiny(n_classes=1)
    assert net(torch.randn(1, 1, 16, 16))["logits"].shape == (1, 1, 16, 16)


def test_config_round_trip_through_json():
    """to_dict() is JSON-able and from_dict() rebuilds an equal config; a state dict loads into a
    network built from the round-tripped config and gives the same output."""
    cfg = ModelConfig(n_classes=4, in_channels=3, base_width=6, depth=2, embed_dim=16,
                      prototypes_per_class=3, temperature=0.1, norm="batch")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert ModelConfig.from_dict(data) == cfg
    torch.manual_seed(1)
    a = ProtoSegNet(cfg).eval()
    b = ProtoSegNet(ModelConfig.from_dict(data)).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 20, 20)
    torch.testing.assert_close(a(x)["logits"], b(x)["logits"])


def test_config_defaults_and_validation():
    """Defaults are as documented (those training uses); nonsense values and unknown keys raise ValueError."""
    cfg = ModelConfig(n_classes=2)
    assert (cfg.in_channels, cfg.embed_dim, cfg.prototypes_per_class, cfg.temperature) == (1, 32, 5, 0.05)
    assert cfg.depth in (3, 4) and cfg.norm == "group"
    assert cfg.input_scale == 2 and cfg.n_instance_classes == 0 and cfg.filter_sigmas == ()
    heads = ModelConfig(n_classes=2, n_instance_classes=1)
    assert (heads.localization_context, heads.embedding_context, heads.instance_coordinates) == (4, 4, 1 / 16)
    for bad in (dict(n_classes=0), dict(n_classes=2, temperature=0.0), dict(n_classes=2, depth=-1),
                dict(n_classes=2, norm="layer"), dict(n_classes=2, embed_dim=2.5)):
        with pytest.raises(ValueError):
            ModelConfig(**bad)
    with pytest.raises(ValueError):
        ModelConfig.from_dict({"n_classes": 2, "instance_head": True})


def test_a_config_for_any_project_leaves_the_classes_to_training():
    """``n_classes`` and ``n_instance_classes`` unset (None): a configuration training completes from
    the project; it keeps the heads' settings for when there are heads, and builds no network."""
    from dataclasses import replace

    template = ModelConfig()
    assert template.n_classes is None and template.n_instance_classes is None and not template.has_instance_heads
    assert template.localization_context == 4 and template.instance_coordinates == 1 / 16
    with pytest.raises(ValueError, match="n_classes is not set"):
        ProtoSegNet(template)
    with pytest.raises(ValueError, match="set both, or neither"):
        ModelConfig(n_instance_classes=1)
    assert ModelConfig.from_dict(json.loads(json.dumps(template.to_dict()))) == template
    heads = replace(template, n_classes=3, n_instance_classes=1)
    assert heads == ModelConfig(n_classes=3, n_instance_classes=1) and heads.localization_context == 4
    assert replace(template, n_classes=3, n_instance_classes=0).localization_context == 0  # no heads, no context


def test_an_old_network_config_means_what_it_meant_and_a_future_one_is_refused():
    """A configuration without a version (written up to commit 3746550) lacking fields added since
    loads as the network it described then (full resolution, plain heads); today's format needs
    every field, and a newer format is refused with a message that says to update."""
    from napari_protoseg.model.migration import CONFIG_VERSION, ConfigVersionError

    old = {"n_classes": 3, "in_channels": 1, "base_width": 4, "depth": 2, "embed_dim": 8,
           "prototypes_per_class": 2, "temperature": 0.05, "norm": "group", "n_instance_classes": 1,
           "instance_embed_dim": 16}
    assert ModelConfig.from_dict(old, version=None) == ModelConfig.from_dict(old, version=1) == ModelConfig(
        n_classes=3, base_width=4, depth=2, embed_dim=8, prototypes_per_class=2, n_instance_classes=1,
        instance_embed_dim=16, **PLAIN)
    assert ModelConfig.from_dict({"n_classes": 2}, version=1) == ModelConfig(n_classes=2, **PLAIN)
    with pytest.raises(ValueError, match="missing"):
        ModelConfig.from_dict(old)  # today's format: every field
    current = ModelConfig(n_classes=3).to_dict()
    newer = CONFIG_VERSION + 1
    with pytest.raises(ConfigVersionError, match=f"newer napari-protoseg.*version {newer}.*Update napari-protoseg"):
        ModelConfig.from_dict(current, version=newer)
    with pytest.raises(ConfigVersionError, match="not a whole number"):
        ModelConfig.from_dict(current, version="2")


def test_unet_and_head_building_blocks():
    """UNet2D maps (B, in, H, W) -> (B, out, H, W); DSPHead returns unit vectors."""
    unet = UNet2D(2, 7, base_width=4, depth=3)
    assert unet(torch.randn(1, 2, 19, 23)).shape == (1, 7, 19, 23)
    head = DSPHead(7, 5)
    e = head(torch.randn(2, 7, 4, 4))
    assert e.shape == (2, 5, 4, 4)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(2, 4, 4))


def test_pick_device():
    """'cpu' always works; 'auto' returns an available device; an unavailable or unknown device
    raises ValueError with a clear message."""
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        assert pick_device("auto").type != "cuda"
        with pytest.raises(ValueError, match="cuda"):
            pick_device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        with pytest.raises(ValueError, match="mps"):
            pick_device("mps")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("tpu")


def test_model_moves_with_to_device():
    """The network is device-agnostic: outputs follow the input's device."""
    device = pick_device("auto")
    net = tiny().to(device)
    out = net(torch.randn(1, 1, 16, 16, device=device))
    assert out["logits"].device.type == device.type


def test_instance_heads_add_localization_and_embedding_outputs():
    """n_instance_classes > 0 adds (B, K, H, W) localization logits and (B, E, H, W) embeddings;
    the semantic outputs are those of the same backbone."""
    net = tiny(n_instance_classes=2, instance_embed_dim=6)
    out = net(torch.randn(3, 1, 20, 28))
    assert set(out) == {"embedding", "logits", "localization", "instance_embedding"}
    assert out["localization"].shape == (3, 2, 20, 28)
    assert out["instance_embedding"].shape == (3, 6, 20, 28)
    # Heads start with few blobs: sigmoid(localization) well below 0.5 everywhere.
    assert torch.sigmoid(out["localization"]).max() < 0.5
    part = net(torch.randn(4, 1, 16, 16), instance_batch=1)
    assert part["logits"].shape[0] == 4 and part["localization"].shape[0] == 1
    assert part["instance_embedding"].shape[0] == 1
    x = torch.randn(2, 1, 16, 16)
    net.eval()
    semantic_only = net(x, instance_batch=0)  # what semantic prediction asks for: no head runs
    assert set(semantic_only) == {"embedding", "logits"}
    torch.testing.assert_close(semantic_only["logits"], net(x)["logits"])


def test_no_instance_classes_means_no_heads_and_the_same_network_as_before():
    plain = tiny()
    assert not any(k.startswith(("localization_head", "instance_embedding_head")) for k in plain.state_dict())
    # The heads are built after everything else: the semantic weights of a seeded network are the same.
    with_heads = tiny(n_instance_classes=1)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(with_heads.state_dict()[key], value)
    assert set(plain(torch.randn(1, 1, 16, 16))) == {"embedding", "logits"}


@pytest.mark.parametrize("shape", [(32, 48), (37, 53)])
def test_a_half_resolution_network_gives_full_resolution_maps(shape):
    """input_scale 2: the network works on the 2x average-pooled input (its embedding is at that
    resolution), and logits and instance maps come back at the input's size, any size."""
    net = tiny(input_scale=2, n_instance_classes=1, instance_embed_dim=4)
    h, w = shape
    x = torch.randn(2, 1, h, w)
    out = net(x)
    assert out["logits"].shape == (2, 3, h, w) and out["logits"].is_contiguous()
    assert out["localization"].shape == (2, 1, h, w) and out["instance_embedding"].shape == (2, 4, h, w)
    assert out["embedding"].shape == (2, 8, -(-h // 8) * 4, -(-w // 8) * 4)  # padded to the multiple, halved
    assert net.multiple == 8 and tiny().multiple == 4
    sampled = net(x, sampled_embedding=True)["instance_embedding"]
    assert sampled.shape == (2, 4, h, w)
    pixels = torch.tensor([0, 5, h * w + 7, 2 * h * w - 1])
    full = out["instance_embedding"].permute(0, 2, 3, 1).reshape(-1, 4)[pixels]
    torch.testing.assert_close(sampled.rows(pixels), full, rtol=1e-5, atol=1e-5)


def test_configs_without_the_instance_fields_load_with_no_heads():
    old = {"n_classes": 3, "in_channels": 1, "base_width": 4, "depth": 2, "embed_dim": 8,
           "prototypes_per_class": 2, "temperature": 0.05, "norm": "group"}
    cfg = ModelConfig.from_dict(old, version=1)  # as written before configurations had a version
    assert cfg.n_instance_classes == 0 and cfg.instance_embed_dim == 64 and not cfg.has_instance_heads
    assert cfg.input_scale == 1  # files written before the field existed: full resolution
    for bad in (dict(n_classes=2, n_instance_classes=3), dict(n_classes=2, n_instance_classes=-1),
                dict(n_classes=2, n_instance_classes=1, instance_embed_dim=0)):
        with pytest.raises(ValueError):
            ModelConfig(**bad)


def test_localization_head_with_context_sees_whole_objects_and_old_configs_keep_the_plain_head():
    """localization_context > 0: the localization at a pixel depends on features up to ~15 x scale
    pixels away (the plain head: 1 pixel); a config without the field builds the plain head, so
    older model files load into the same parameters."""
    from napari_protoseg.model.network import InstanceHead, LocalizationHead

    # BatchNorm in eval mode is per pixel (GroupNorm would couple every pixel of the crop).
    head = LocalizationHead(channels=6, hidden=4, out_channels=2, scale=4, norm="batch").eval()
    features = torch.randn(1, 6, 64, 64, requires_grad=True)
    out = head(features)
    assert out.shape == (1, 2, 64, 64)
    out[0, :, 32, 32].sum().backward()
    reach = torch.nonzero(features.grad.abs().sum(dim=(0, 1)) > 0)
    assert (reach - torch.tensor([32, 32])).abs().max() >= 24
    plain = InstanceHead(channels=6, hidden=4, out_channels=2, norm="batch").eval()
    features.grad = None
    plain(features)[0, :, 32, 32].sum().backward()
    assert (torch.nonzero(features.grad.abs().sum(dim=(0, 1)) > 0) - torch.tensor([32, 32])).abs().max() == 1

    net = tiny(n_instance_classes=1, localization_context=4)
    assert isinstance(net.localization_head, LocalizationHead)
    assert torch.sigmoid(net(torch.randn(2, 1, 24, 40))["localization"]).max() < 0.5  # few blobs at the start
    old = tiny(n_instance_classes=1, localization_context=4).config.to_dict()
    del old["localization_context"]  # a file written before the field existed
    assert isinstance(ProtoSegNet(ModelConfig.from_dict(old, version=1)).localization_head, InstanceHead)
    with pytest.raises(ValueError, match="localization_context"):
        ModelConfig(n_classes=2, localization_context=-1)
    assert ModelConfig(n_classes=2, localization_context=4).localization_context == 0  # no heads, no context


# ------------------------------------------------------------------------------ filter bank


def test_filter_bank_measures_intensity_gradient_and_curvature_at_each_scale():
    """A ramp has gradient magnitude `slope` (times sigma); a bowl x^2 + y^2 has both Hessian
    eigenvalues 2 (times sigma^2); smoothing keeps a constant. Checked away from the borders."""
    bank = FilterBank((1.0, 2.0))
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    inner = (slice(None), slice(20, 44), slice(20, 44))
    ramp = bank((0.01 * xx)[None, None])[0]
    bowl = bank((((xx - 32) ** 2 + (yy - 32) ** 2) / 100.0)[None, None])[0]
    for i, sigma in enumerate((1.0, 2.0)):
        torch.testing.assert_close(ramp[4 * i][inner[1:]], (0.01 * xx)[inner[1:]], atol=1e-4, rtol=0)
        torch.testing.assert_close(ramp[4 * i + 1][inner[1:]], torch.full((24, 24), 0.01 * sigma), atol=1e-4, rtol=0)
        for k in (2, 3):
            torch.testing.assert_close(bowl[4 * i + k][inner[1:]], torch.full((24, 24), 0.02 * sigma ** 2),
                                       atol=1e-3, rtol=0)
    assert bank.n_features == 8 and bank.radius == 9
    flat = bank(torch.full((1, 1, 32, 32), 0.7))[0]
    torch.testing.assert_close(flat[0], torch.full((32, 32), 0.7))
    assert flat[1:4].abs().max() < 1e-5


def test_filter_bank_turns_with_the_image():
    """Magnitudes and eigenvalues do not depend on orientation: rotating the input rotates the output."""
    bank = FilterBank((1.0, 3.0))
    x = torch.rand(1, 1, 48, 48)
    torch.testing.assert_close(bank(torch.rot90(x, 1, (2, 3))), torch.rot90(bank(x), 1, (2, 3)), atol=1e-5, rtol=0)


def test_filter_bank_gives_the_same_responses_by_matrices_and_by_convolutions():
    """Up to ``matrix_limit`` the smoothing runs as matrix products, beyond it as 1-D convolutions:
    both pad alike (reflect; replicate where the kernel is longer than the side) and agree."""
    torch.manual_seed(0)
    for shape in [(3, 1, 48, 70), (1, 1, 20, 9), (2, 1, 1, 5)]:
        by_matrices, by_convolutions = FilterBank((1.0, 2.5, 6.3)), FilterBank((1.0, 2.5, 6.3))
        by_convolutions.matrix_limit = 0
        x = torch.rand(shape)
        smooth_m, smooth_c = by_matrices.smoothed(x), by_convolutions.smoothed(x)
        assert smooth_m.shape == smooth_c.shape == (shape[0], 3, *shape[2:])
        torch.testing.assert_close(smooth_m, smooth_c, atol=1e-6, rtol=0)
        torch.testing.assert_close(by_matrices(x), by_convolutions(x), atol=1e-4, rtol=1e-4)


def test_a_network_with_a_filter_bank_takes_the_raw_channels_and_reaches_farther():
    from napari_protoseg.prediction.tiling import receptive_radius

    plain = ModelConfig(n_classes=3, base_width=4, depth=2, embed_dim=8, **PLAIN)
    config = ModelConfig(n_classes=3, base_width=4, depth=2, embed_dim=8, filter_sigmas=[1.0, 4.0], **PLAIN)
    net = ProtoSegNet(config)
    out = net(torch.rand(2, 1, 40, 40))
    assert out["logits"].shape == (2, 3, 40, 40)
    assert net.backbone.stem[0].in_channels == 1 + 8
    assert receptive_radius(config) == receptive_radius(plain) + 17
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert not any(name.startswith("filters") for name in net.state_dict())  # fixed: nothing to store
    with pytest.raises(ValueError, match="filter_sigmas"):
        ModelConfig(n_classes=3, filter_sigmas=[0.0])


def test_instance_backbone_grad_scales_what_the_instance_losses_send_into_the_backbone():
    """A scale s multiplies the instance losses' backbone gradients by s and changes nothing else:
    the outputs and the heads' own gradients stay those of s = 1."""
    torch.manual_seed(0)
    net = ProtoSegNet(ModelConfig(n_classes=3, base_width=4, depth=2, embed_dim=8, n_instance_classes=1, **PLAIN))
    x = torch.randn(2, 1, 32, 32)
    grads = {}
    for scale in (1.0, 0.1):
        net.zero_grad()
        out = net(x, instance_backbone_grad=scale)
        (out["localization"].square().sum() + out["instance_embedding"].square().sum()).backward()
        grads[scale] = ([p.grad.clone() for p in net.backbone.parameters()],
                        [p.grad.clone() for p in net.localization_head.parameters()], out["localization"].detach())
    for whole, scaled in zip(grads[1.0][0], grads[0.1][0]):
        assert float((scaled - 0.1 * whole).norm()) <= 1e-4 * float((0.1 * whole).norm()) + 1e-7
    assert any(float(g.abs().sum()) > 0 for g in grads[0.1][0])
    for whole, scaled in zip(grads[1.0][1], grads[0.1][1]):
        assert float((scaled - whole).norm()) <= 1e-5 * float(whole.norm()) + 1e-7
    assert torch.equal(grads[1.0][2], grads[0.1][2])


@pytest.mark.parametrize("backbone_grad", [True, False])
def test_instance_heads_train_the_backbone_only_when_asked(backbone_grad):
    """``instance_backbone_grad=False``: a loss on the instance outputs leaves the backbone's
    gradients at zero (the semantic features are not pulled by it) but still trains the heads."""
    net = ProtoSegNet(ModelConfig(n_classes=3, base_width=4, depth=2, embed_dim=8, n_instance_classes=1, **PLAIN))
    out = net(torch.randn(2, 1, 32, 32), instance_backbone_grad=backbone_grad)
    (out["localization"].sum() + out["instance_embedding"].sum()).backward()
    backbone = [p.grad for p in net.backbone.parameters() if p.grad is not None]
    touched = any(float(g.abs().sum()) > 0 for g in backbone)
    assert touched == backbone_grad
    assert float(net.localization_head.conv2.weight.grad.abs().sum()) > 0


def test_clipping_groups_split_the_semantic_model_from_each_instance_head():
    """Gradient norms are clipped per group, so the instance heads' gradients never scale down the
    semantic model's update; every parameter is in exactly one group."""
    net = ProtoSegNet(ModelConfig(n_classes=3, base_width=4, depth=2, embed_dim=8, n_instance_classes=1, **PLAIN))
    groups = net.clipping_groups()
    assert len(groups) == 3
    ids = [id(p) for group in groups for p in group]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    assert {id(p) for p in groups[1]} == {id(p) for p in net.localization_head.parameters()}
    assert {id(p) for p in groups[2]} == {id(p) for p in net.instance_embedding_head.parameters()}
    assert any(p is net.prototypes for p in groups[0])
    plain = ProtoSegNet(ModelConfig(n_classes=3, base_width=4, depth=2, embed_dim=8, **PLAIN))
    assert len(plain.clipping_groups()) == 1


def test_group_norm_of_channels_last_input_equals_torchs_and_keeps_the_layout():
    """While training, the backbone's GroupNorm normalises channels-last input through the standard
    layout on the CPU (faster there); values, gradients and the state dict are nn.GroupNorm's, and
    its output stays channels-last for the next convolution, with and without autograd."""
    from napari_protoseg.model.network import _norm_layer

    torch.manual_seed(0)
    ours = _norm_layer("group", 16)
    reference = torch.nn.GroupNorm(8, 16)
    with torch.no_grad():
        ours.weight.normal_(), ours.bias.normal_()
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 16, 12, 10).contiguous(memory_format=torch.channels_last)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ours, y_ref = ours(x_ours), reference(x_ref)
    assert y_ours.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_ours, y_ref)
    grad = torch.randn_like(y_ref)
    y_ours.backward(grad), y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad)
    assert set(ours.state_dict()) == set(reference.state_dict())
    with torch.no_grad():
        predicted = ours(x)
    assert predicted.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(predicted, y_ref.detach())


# ------------------------------------------------------------------------------ spatial embedding


def test_add_coordinates_adds_scaled_positions_to_the_first_two_channels_only():
    from napari_protoseg.model.network import add_coordinates

    embedding = torch.zeros(2, 4, 3, 5)
    out = add_coordinates(embedding, 0.5)
    torch.testing.assert_close(out[:, 0], torch.arange(3.0)[:, None].expand(2, 3, 5) * 0.5)
    torch.testing.assert_close(out[:, 1], torch.arange(5.0)[None, :].expand(2, 3, 5) * 0.5)
    assert not out[:, 2:].any()
    assert add_coordinates(embedding, 0.0) is embedding


def test_a_spatial_embedding_tells_alike_objects_apart_by_position_where_free_vectors_cannot():
    """Two identical discs far apart: a translation-equivariant head gives their centres the same
    vector; with instance_coordinates the head's offsets are added to the pixel positions, so the
    two differ (similarity well under 0.5) while a constant offset keeps each object together."""
    x = torch.zeros(1, 1, 64, 96)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(96.0), indexing="ij")
    for cx in (24, 72):
        x[0, 0][(yy - 32) ** 2 + (xx - cx) ** 2 <= 64] = 1.0
    plain = tiny(n_instance_classes=1, instance_embed_dim=4, norm="batch").eval()
    spatial = tiny(n_instance_classes=1, instance_embed_dim=4, norm="batch", instance_coordinates=1 / 16,
                   embedding_context=2).eval()
    with torch.no_grad():
        free = plain(x)["instance_embedding"][0]
        placed = spatial(x)["instance_embedding"][0]
    torch.testing.assert_close(free[:, 32, 24], free[:, 32, 72])
    d2 = ((placed[:, 32, 24] - placed[:, 32, 72]) ** 2).sum()
    assert 2 / (1 + torch.exp(d2)) < 0.5
    offsets = placed[:2] - torch.stack([yy, xx]) / 16
    torch.testing.assert_close(offsets[:, 32, 24], offsets[:, 32, 72])  # the learnt part is still equivariant


@pytest.mark.parametrize("input_scale", [1, 2])
def test_sampled_rows_of_a_spatial_embedding_equal_the_full_map(input_scale):
    net = tiny(input_scale=input_scale, n_instance_classes=1, instance_embed_dim=4, instance_coordinates=0.25,
               embedding_context=2)
    h, w = 24, 40
    x = torch.randn(2, 1, h, w)
    full = net(x)["instance_embedding"].permute(0, 2, 3, 1).reshape(-1, 4)
    pixels = torch.tensor([0, 5, w + 3, h * w + 7, 2 * h * w - 1])
    torch.testing.assert_close(net(x, sampled_embedding=True)["instance_embedding"].rows(pixels), full[pixels],
                               rtol=1e-5, atol=1e-5)
    assert full[h * w - 1, 0] > 5.0  # position (23, 39) / 4 is in it


def test_the_spatial_embedding_fields_validate_and_older_configs_load_without_them():
    from napari_protoseg.model.network import InstanceHead, LocalizationHead

    assert isinstance(tiny(n_instance_classes=1, embedding_context=4).instance_embedding_head, LocalizationHead)
    old = tiny(n_instance_classes=1, embedding_context=4, instance_coordinates=0.5).config.to_dict()
    del old["embedding_context"], old["instance_coordinates"]  # a file written before the fields existed
    config = ModelConfig.from_dict(old, version=1)
    assert config.embedding_context == 0 and config.instance_coordinates == 0.0
    assert isinstance(ProtoSegNet(config).instance_embedding_head, InstanceHead)
    for bad in (dict(instance_coordinates=-0.1), dict(instance_coordinates=float("nan")),
                dict(embedding_context=-1), dict(instance_coordinates=0.5, instance_embed_dim=1)):
        with pytest.raises(ValueError):
            ModelConfig(n_classes=2, n_instance_classes=1, **bad)
    no_heads = ModelConfig(n_classes=2, embedding_context=4, instance_coordinates=0.5)
    assert no_heads.embedding_context == 0 and no_heads.instance_coordinates == 0.0
