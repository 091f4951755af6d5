"""Backbones (shapes, Manifold Mixup points, WRN structure/init) and heads (formulas, scale rule)."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from s2m2.models import MixSpec, create_backbone, list_backbones
from s2m2.models.heads import CosineClassifier, LinearClassifier, RotationHead, create_head, head_spec

sys.path.insert(0, str(Path(__file__).parent))
from conftest import shared_path  # noqa: E402
from release_reference import parse_tsv, random_release_state, release_wrn_entries, release_wrn_features  # noqa: E402

# (name, kwargs, feature_dim); small widths keep the suite fast where the architecture allows it.
BACKBONES = [
    ("wrn28_10", {}, 640),
    ("wrn", {"depth": 10, "widen": 2}, 128),
    ("resnet12", {}, 640),
    ("resnet18", {}, 512),
    ("conv4", {}, 64),
]


@pytest.fixture(scope="module")
def wrn28_10():
    torch.manual_seed(0)
    return create_backbone("wrn28_10").eval()


def _build(name, kwargs):
    torch.manual_seed(0)
    return create_backbone(name, **kwargs).eval()


def test_registry_lists_every_backbone():
    assert set(list_backbones()) >= {"wrn28_10", "wrn", "resnet12", "resnet18", "conv4"}
    with pytest.raises(KeyError, match="unknown backbone"):
        create_backbone("vgg")


@pytest.mark.parametrize("name,kwargs,dim", BACKBONES, ids=[b[0] for b in BACKBONES])
@pytest.mark.parametrize("size", [28, 32, 80])
def test_feature_shape(name, kwargs, dim, size, wrn28_10):
    model = wrn28_10 if name == "wrn28_10" else _build(name, kwargs)
    assert model.feature_dim == dim
    with torch.no_grad():
        features = model(torch.randn(2, 3, size, size))
    assert features.shape == (2, dim)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name,kwargs,points", [
    ("wrn", {"depth": 10, "widen": 2}, 4), ("resnet12", {"widths": (8, 16, 24, 32)}, 5),
    ("resnet18", {"widths": (8, 16, 24, 32)}, 5), ("conv4", {"width": 16}, 5)])
def test_mixup_points(name, kwargs, points):
    """lam=1 is no mixing; lam=0 gives the permuted batch's features; 0<lam<1 at the input is a mixed image."""
    model = _build(name, kwargs)
    assert model.num_mix_points == points
    x = torch.randn(6, 3, 32, 32)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    with torch.no_grad():
        plain = model(x)
        for layer in range(points):
            same = model(x, MixSpec(layer=layer, lam=1.0, perm=perm))
            assert torch.equal(same, plain), f"lam=1 changed the output at point {layer}"
            swapped = model(x, MixSpec(layer=layer, lam=0.0, perm=perm))
            # eval mode: every sample is processed independently, so h[perm] continues as the permuted batch
            torch.testing.assert_close(swapped, plain[perm], rtol=1e-5, atol=1e-6)
        mixed = model(x, MixSpec(layer=0, lam=0.3, perm=perm))
        torch.testing.assert_close(mixed, model(0.3 * x + 0.7 * x[perm]), rtol=1e-5, atol=1e-6)
        # a mixup point inside the network really mixes: the result is neither endpoint
        inner = model(x, MixSpec(layer=points - 1, lam=0.5, perm=perm))
        assert not torch.allclose(inner, plain) and not torch.allclose(inner, plain[perm])
    with pytest.raises(ValueError, match="mixup layer"):
        model(x, MixSpec(layer=points, lam=0.5, perm=perm))


def test_mixup_in_train_mode_lam1_matches_plain():
    """Train mode (batch-statistics BN) with dropout off: lam=1 still equals no mixing, at every point."""
    model = create_backbone("wrn", depth=10, widen=2, dropout=0.0).train()
    x = torch.randn(4, 3, 28, 28)
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(0))
    plain = model(x)
    for layer in range(model.num_mix_points):
        assert torch.equal(model(x, MixSpec(layer, 1.0, perm)), plain)


def test_wrn28_10_matches_release_parameter_count(wrn28_10):
    entries = parse_tsv(shared_path("docs", "official_wrn28_10_mixup_state_dict.tsv"))
    release_params = sum(math.prod(shape) for name, (shape, _) in entries.items()
                         if name.endswith(("weight", "bias")) and not name.startswith("linear."))
    ours = sum(p.numel() for p in wrn28_10.parameters())
    assert ours == release_params == 36_472_784  # "~36.5 M" (spec §2)


def test_wrn28_10_flops_match_the_spec(wrn28_10):
    """65.5 GFLOPs per 80x80 image and 10.5 at 32x32 (spec §2): stage 1 runs at full resolution."""
    from torch.utils.flop_counter import FlopCounterMode

    for size, gflops in ((80, 65.5), (32, 10.5)):
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            wrn28_10(torch.randn(1, 3, size, size))
        assert counter.get_total_flops() / 1e9 == pytest.approx(gflops, abs=0.05)


def test_wrn_structure_and_init(wrn28_10):
    """Strides 1/2/2 (full resolution in stage 1), shortcut convs only where widths change, release init."""
    sizes = []
    hooks = [stage.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[1:]))) for stage in wrn28_10.stages]
    with torch.no_grad():
        wrn28_10(torch.randn(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert sizes == [(160, 32, 32), (320, 16, 16), (640, 8, 8)]
    shortcut_names = [n for n, m in wrn28_10.named_modules() if n.endswith("convShortcut") and m is not None]
    assert shortcut_names == ["stages.0.layer.0.convShortcut", "stages.1.layer.0.convShortcut",
                              "stages.2.layer.0.convShortcut"]
    conv = wrn28_10.stages[2].layer[1].conv1.weight  # 640 x 640 x 3 x 3: He fan-out std sqrt(2 / (9 * 640))
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (9 * 640)), rel=0.01)
    assert abs(conv.mean().item()) < 1e-3
    bn = wrn28_10.stages[1].layer[0].bn2
    assert torch.equal(bn.weight, torch.ones(320)) and torch.equal(bn.bias, torch.zeros(320))
    assert not any(isinstance(m, nn.Conv2d) and m.bias is not None for m in wrn28_10.modules())


def test_wrn_shortcut_takes_activated_input():
    """With a width change, the 1x1 shortcut sees relu(bn1(x)), the identity shortcut sees raw x."""
    from s2m2.models.wrn import BasicBlock

    torch.manual_seed(0)
    for in_planes, out_planes in ((8, 16), (16, 16)):
        block = BasicBlock(in_planes, out_planes, stride=1, dropout=0.0).eval()
        with torch.no_grad():
            block.bn1.bias.fill_(-0.3)  # makes the ReLU matter
            x = torch.randn(2, in_planes, 6, 6)
            a = F.relu(block.bn1(x))
            residual = block.conv2(F.relu(block.bn2(block.conv1(a))))
            shortcut = block.convShortcut(a) if in_planes != out_planes else x
            torch.testing.assert_close(block(x), shortcut + residual)


def test_wrn_dropout_is_configurable():
    x = torch.randn(3, 3, 16, 16)
    dropped = create_backbone("wrn", depth=10, widen=1, dropout=0.5).train()
    torch.manual_seed(1)
    first = dropped(x)
    torch.manual_seed(2)
    assert not torch.allclose(first, dropped(x))  # dropout active in training
    dropped.eval()
    assert torch.equal(dropped(x), dropped(x))
    with pytest.raises(ValueError, match="depth"):
        create_backbone("wrn", depth=12, widen=1)
    assert create_backbone("wrn28_10", dropout=0.9).stages[0].layer[0].dropout == 0.9


def test_resnet12_and_conv4_details():
    model = _build("resnet12", {})
    assert [stage.conv1[0].out_channels for stage in model.stages] == [64, 160, 320, 640]
    assert model.stages[0].negative_slope == 0.1
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(12.4e6, rel=0.01)
    resnet18 = _build("resnet18", {})
    assert resnet18.stem[0].stride == (1, 1) and resnet18.stem[0].kernel_size == (3, 3)
    assert not any(isinstance(m, nn.MaxPool2d) for m in resnet18.modules())
    flat = create_backbone("conv4", pool="flatten", input_size=84).eval()
    assert flat.feature_dim == 1600  # CloserLook's Conv-4 at 84 px: 64 x 5 x 5
    with torch.no_grad():
        assert flat(torch.randn(2, 3, 84, 84)).shape == (2, 1600)
        with pytest.raises(ValueError, match="input_size"):
            flat(torch.randn(2, 3, 32, 32))
    assert create_backbone("conv4", pool="flatten", input_size=28).feature_dim == 64


def test_conv4_per_block_widths():
    """``width=[a, b, c, d]`` builds blocks of those widths; the feature size follows the last block."""
    pyramid = create_backbone("conv4", width=[8, 12, 16, 24], pool="flatten", input_size=32).eval()
    assert [stage[0].out_channels for stage in pyramid.stages] == [8, 12, 16, 24]
    assert [stage[0].in_channels for stage in pyramid.stages] == [3, 8, 12, 16]
    assert pyramid.feature_dim == 24 * 2 * 2
    with torch.no_grad():
        assert pyramid(torch.randn(2, 3, 32, 32)).shape == (2, 96)
    assert create_backbone("conv4", width=[8, 12, 16, 24]).feature_dim == 24  # average-pooled
    assert [stage[0].out_channels for stage in create_backbone("conv4", width=16).stages] == [16] * 4
    for bad in ([8, 12, 16], [8, 12, 16, 0]):
        with pytest.raises(ValueError, match="4 positive ints"):
            create_backbone("conv4", width=bad)


def _classic_to_pool_first(state):
    """Classic block keys (BN at index 1 of a stage) -> pool-first keys (BN at index 2)."""
    return {re.sub(r"^(stages\.\d+)\.1\.", r"\1.2.", k): v for k, v in state.items()}


def test_conv4_pool_first_normalises_the_pooled_maps():
    """``pool_first``: each block is conv - maxpool - BN - ReLU, so BatchNorm's batch statistics are those
    of the pooled conv maps (the classic block's are the full-resolution maps'); in eval mode, with the same
    weights and running statistics and positive BN gains, both orders compute the same features (max-pooling
    commutes with ReLU and with a positive per-channel affine map)."""
    x = torch.randn(6, 3, 28, 28)
    classic, pooled = (create_backbone("conv4", width=8, pool_first=flag) for flag in (False, True))
    pooled.load_state_dict(_classic_to_pool_first(classic.state_dict()))
    for model in (classic, pooled):
        model.train()(x)
    conv_maps = classic.stages[0][0](x).detach()
    momentum = 0.1  # BatchNorm's running_mean starts at 0: one step leaves momentum * batch mean
    torch.testing.assert_close(classic.stages[0][1].running_mean, momentum * conv_maps.mean((0, 2, 3)))
    torch.testing.assert_close(pooled.stages[0][2].running_mean,
                               momentum * F.max_pool2d(conv_maps, 2).mean((0, 2, 3)))
    assert [type(m).__name__ for m in pooled.stages[1]] == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    # Same running statistics in both: the eval-mode functions are then the same.
    pooled.load_state_dict(_classic_to_pool_first(classic.state_dict()))
    with torch.no_grad():
        torch.testing.assert_close(pooled.eval()(x), classic.eval()(x))
    with pytest.raises(ValueError, match="pool_first must be true or false"):
        create_backbone("conv4", pool_first="false")


def test_backbones_train_backward():
    """Gradients reach the first layer of every backbone (train mode, mixup at the last point)."""
    for name, kwargs in [("wrn", {"depth": 10, "widen": 1}), ("resnet12", {"widths": (8, 8, 8, 8)}),
                         ("resnet18", {"widths": (8, 8, 8, 8)}), ("conv4", {"width": 8})]:
        model = _build(name, kwargs).train()
        out = model(torch.randn(4, 3, 28, 28), MixSpec(model.num_mix_points - 1, 0.7, torch.tensor([1, 0, 3, 2])))
        out.square().sum().backward()
        first = next(p for p in model.parameters())
        assert first.grad is not None and first.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------- heads


def test_cosine_head_matches_formula():
    torch.manual_seed(0)
    head = CosineClassifier(5, 3, scale=None)
    with torch.no_grad():
        head.weight_g.copy_(torch.tensor([[0.5], [2.0], [1.5]]))  # gains away from ||v|| so they matter
    x = torch.randn(4, 5)
    logits = head(x)
    v, g = head.weight_v.detach(), head.weight_g.detach()
    expected = torch.empty(4, 3)
    for b in range(4):
        x_norm = math.sqrt(sum(float(t) ** 2 for t in x[b]))
        for c in range(3):
            v_norm = math.sqrt(sum(float(t) ** 2 for t in v[c]))
            dot = sum(float(x[b, i]) * float(v[c, i]) for i in range(5))
            expected[b, c] = 2.0 * float(g[c, 0]) * dot / ((x_norm + 1e-5) * v_norm)
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-6)
    logits.sum().backward()
    assert head.weight_g.grad.abs().sum() > 0 and head.weight_v.grad.abs().sum() > 0  # the gain is learnable


def test_cosine_head_init_and_scale_rule():
    head = CosineClassifier(640, 200)
    assert head.scale == 2.0 and CosineClassifier(640, 201).scale == 10.0 and CosineClassifier(8, 4, scale=7).scale == 7.0
    assert head.weight_v.shape == (200, 640) and head.weight_g.shape == (200, 1)
    torch.testing.assert_close(head.class_weights(), head.weight_v)  # g = ||v|| at init, so w = v
    bound = 1 / math.sqrt(640)  # nn.Linear's default init range
    assert head.weight_v.abs().max() <= bound and head.weight_v.abs().max() > 0.9 * bound
    assert [name for name, _ in head.named_parameters()] == ["weight_v", "weight_g"]  # no bias


def test_linear_and_rotation_heads():
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    linear = create_head("linear", 6, 5)
    assert isinstance(linear, LinearClassifier)
    torch.testing.assert_close(linear(x), x @ linear.weight.t() + linear.bias)
    rotation = create_head("rotation", 6)
    assert isinstance(rotation, RotationHead) and rotation(x).shape == (3, 4)
    cosine = create_head("cosine", 6, 10, scale=4)
    assert isinstance(cosine, CosineClassifier) and cosine.scale == 4
    for head in (linear, rotation, cosine):
        spec = head_spec(head)
        rebuilt = create_head(spec["name"], **spec["kwargs"])
        assert type(rebuilt) is type(head) and rebuilt.state_dict().keys() == head.state_dict().keys()
    with pytest.raises(ValueError, match="num_classes"):
        create_head("cosine", 6)
    with pytest.raises(KeyError, match="unknown head"):
        create_head("arcface", 6, 5)
    with pytest.raises(ValueError, match="4 outputs"):
        create_head("rotation", 6, 10)


# ----------------------------------------------------------------- mixing points against references


@pytest.mark.parametrize("layer", [0, 1, 2, 3])
def test_wrn_mixup_point_matches_the_reference_forward(layer):
    """Mixing point k mixes the OUTPUT of block group k (spec §4), as the independent functional forward
    of tests/release_reference.py does; mixing before a group instead changes the features."""
    from s2m2.checkpoint import checkpoint_filter_fn

    state = random_release_state(release_wrn_entries(10, 2, num_classes=None), seed=11)
    model = create_backbone("wrn", depth=10, widen=2).eval()
    model.load_state_dict(checkpoint_filter_fn(state))
    g = torch.Generator().manual_seed(layer)
    x = torch.randn(5, 3, 20, 20, generator=g)
    perm = torch.tensor([2, 4, 0, 1, 3])
    with torch.no_grad():
        ours = model(x, MixSpec(layer, 0.3, perm))
        reference = release_wrn_features(state, x, mixup=(layer, 0.3, perm))
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
        if layer > 0:  # mixing one group earlier (= before group k) is a different network function
            earlier = release_wrn_features(state, x, mixup=(layer - 1, 0.3, perm))
            assert (ours - earlier).abs().max() > 1e-3


@pytest.mark.parametrize("name,kwargs", [("conv4", {"width": 8}), ("resnet12", {"widths": (8, 8, 8, 8)}),
                                         ("resnet18", {"widths": (8, 8, 8, 8)})])
def test_mixup_point_k_mixes_after_stage_k(name, kwargs):
    """Every backbone: point k = the stem's output run through stages 1..k, then mixed, then the rest."""
    model = _build(name, kwargs)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([1, 3, 0, 2])
    with torch.no_grad():
        for layer in range(model.num_mix_points):
            h = 0.4 * x + 0.6 * x[perm] if layer == 0 else x
            h = model.stem(h)
            for index, stage in enumerate(model.stages, start=1):
                h = stage(h)
                if index == layer:
                    h = 0.4 * h + 0.6 * h[perm]
            expected = model.tail(h)
            torch.testing.assert_close(model(x, MixSpec(layer, 0.4, perm)), expected, rtol=1e-5, atol=1e-6)


def test_head_spec_and_flatten_errors_name_what_they_got():
    with pytest.raises(TypeError, match="not one of our heads: Linear"):
        head_spec(nn.Linear(2, 2))
    flat = create_backbone("conv4", pool="flatten", input_size=84).eval()
    with torch.no_grad(), pytest.raises(ValueError, match=r"built for 5x5 final maps, got \(2, 2\)"):
        flat(torch.randn(1, 3, 32, 32))


def test_wrn_defaults_and_argument_errors():
    from s2m2.models.wrn import WideResNet

    assert WideResNet(depth=10, widen=1).dropout == 0.5  # the release's value at HEAD (spec §2)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        create_backbone("wrn", depth=10, widen=1, dropout=1.0)
    model = create_backbone("wrn", depth=10, widen=1).eval()
    with pytest.raises(ValueError, match=r"mixup layer 4 outside 0\.\.3"):
        model(torch.randn(2, 3, 8, 8), MixSpec(4, 0.5, torch.tensor([1, 0])))


def test_head_initialisation_matches_nn_linear_and_the_release():
    """distLinear's v starts as nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in)) -- 128,000 draws reach
    within 1 % of the bound; the Baseline's linear head starts with a zero bias (the release)."""
    torch.manual_seed(0)
    v = CosineClassifier(640, 200).weight_v.detach()
    bound = 1 / math.sqrt(640)
    assert v.abs().max() <= bound and v.abs().max() > 0.99 * bound
    assert abs(float(v.std()) - bound / math.sqrt(3)) < 0.01 * bound  # the uniform's sd
    assert torch.equal(create_head("linear", 6, 5).bias, torch.zeros(5))
    with pytest.raises(TypeError, match=r"unexpected arguments for the rotation head: \['scale'\]"):
        create_head("rotation", 6, scale=2.0)
