"""GeminiStep: gradient routing of each term, the one-direction inverse, options, and a
learning sanity check of the deformer on a synthetic pair with a known deformation."""
import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from synthetic_pairs import synthetic_pair
from torch import nn

from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.gemini_step import (
    DEFAULT_INTEGRATION_STEPS,
    GeminiStep,
    deformer_spec,
    from_options,
    spec_from_checkpoint,
    spec_to_checkpoint,
    step_from_spec,
)
from nnunet_gemini.heads import Deformer, build_deformer
from nnunet_gemini.losses import GeminiWeights
from nnunet_gemini.network import DecoderFeatureTap
from nnunet_gemini.registration import compose, integrate_velocity

OPS_2D = dict(conv_op=nn.Conv2d, norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
              nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
MODES = [("diffeomorphic", True), ("diffeomorphic", False), ("displacement", True)]


def tiny_unet(in_ch=1):
    return PlainConvUNet(in_ch, 3, (8, 16, 16), nn.Conv2d, 3, (1, 2, 2), 1, 2, 1, conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


class DetachedInput(nn.Module):
    """Deformer that sees detached features: isolates backbone gradients that do NOT pass
    through the deformer input."""

    def __init__(self, deformer):
        super().__init__()
        self.deformer = deformer

    def forward(self, a, b):
        return self.deformer(a.detach(), b.detach())


# term -> weights that leave only that term, and whether its gradient reaches
# (deformer, backbone, backbone other than through the deformer input)
ROUTES = {
    "appearance": (dict(smoothness=0.0, semantic=0.0, appearance=1.0), (True, True, False)),
    "smoothness": (dict(smoothness=1.0, semantic=0.0, appearance=0.0), (True, True, False)),
    "semantic_feature": (dict(smoothness=0.0, semantic=1.0, appearance=0.0, semantic_feature=1.0,
                              semantic_flow=0.0), (False, True, True)),
    "semantic_flow": (dict(smoothness=0.0, semantic=1.0, appearance=0.0, semantic_feature=0.0,
                           semantic_flow=1.0), (True, True, False)),
}


def _grad_norm(module):
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.sqrt(sum((g ** 2).sum() for g in grads))) if grads else 0.0


def _routing(deformation, bidirectional, weights, detach_deformer_input):
    torch.manual_seed(0)
    net = tiny_unet()
    deformer = build_deformer(net)
    nn.init.normal_(deformer.out.weight, std=0.05)  # a non-trivial field, so every path carries signal
    imgs = torch.randn(4, 1, 16, 16)
    tap = DecoderFeatureTap(net)
    net(imgs)  # ONE forward for both images of both pairs
    feats = tap.pop()
    tap.close()
    step = GeminiStep(DetachedInput(deformer) if detach_deformer_input else deformer, deformation=deformation,
                      bidirectional=bidirectional, weights=GeminiWeights(**weights), ncc_window=5)
    loss, _ = step(imgs[:2], imgs[2:], feats[:2], feats[2:])
    loss.backward()
    return _grad_norm(deformer), _grad_norm(net)


@pytest.mark.parametrize("deformation,bidirectional", MODES)
@pytest.mark.parametrize("term", list(ROUTES))
def test_gradient_routing(term, deformation, bidirectional):
    weights, (to_deformer, to_backbone, to_backbone_direct) = ROUTES[term]
    g_deformer, g_backbone = _routing(deformation, bidirectional, weights, detach_deformer_input=False)
    _, g_backbone_direct = _routing(deformation, bidirectional, weights, detach_deformer_input=True)
    assert (g_deformer > 0) == to_deformer, (term, g_deformer)
    assert (g_backbone > 0) == to_backbone, (term, g_backbone)
    assert (g_backbone_direct > 0) == to_backbone_direct, (term, g_backbone_direct)


def test_logs_and_total_match_released_weighting():
    torch.manual_seed(0)
    deformer = Deformer(OPS_2D, in_channels=4)
    nn.init.normal_(deformer.out.weight, std=0.05)
    img_a, img_b = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    loss, logs = GeminiStep(deformer)(img_a, img_b, torch.randn(2, 4, 16, 16), torch.randn(2, 4, 16, 16))
    assert all(isinstance(v, float) for v in logs.values())
    expected = 0.4 * logs["smoothness"] + 0.8 * (0.1 * logs["semantic_feature"] + 1.0 * logs["semantic_flow"]) \
        + 1.0 * logs["appearance"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert logs["total"] == pytest.approx(loss.item(), rel=1e-6)
    assert 0.0 <= logs["folding_fraction"] <= 1.0 and 0.0 <= logs["ncc"] <= 1.0


class SmoothFieldDeformer(nn.Module):
    """Stands in for a trained deformer: a fixed smooth velocity field, counting its calls."""

    def __init__(self, size=32, max_vel=3.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        v = F.interpolate(torch.randn(1, 2, 4, 4, generator=g), size=(size, size), mode="bicubic",
                          align_corners=True)
        self.register_buffer("v", v * (max_vel / v.norm(dim=1).max()))
        self.calls = 0

    def forward(self, feat_a, feat_b):
        self.calls += 1
        return self.v.expand(feat_a.shape[0], -1, -1, -1)


def test_one_direction_runs_deformer_once_and_gives_the_inverse():
    deformer = SmoothFieldDeformer()
    fa, fb = torch.randn(1, 2, 32, 32), torch.randn(1, 2, 32, 32)
    u_ab, u_ba, v_ab, v_ba = GeminiStep(deformer, bidirectional=False).fields(fa, fb)
    assert deformer.calls == 1
    torch.testing.assert_close(v_ba, -v_ab)
    assert u_ab.norm(dim=1).max() > 2.0
    # exp(v) o exp(-v) = identity up to interpolation error (interior: the border pads)
    residual = compose(u_ab, u_ba).norm(dim=1)[:, 4:-4, 4:-4].max()
    assert residual < 0.05 * u_ab.norm(dim=1).max(), float(residual)
    GeminiStep(deformer, bidirectional=True).fields(fa, fb)
    assert deformer.calls == 3


def test_options_and_user_errors():
    deformer = Deformer(OPS_2D, in_channels=2)
    step = from_options(deformer, {"deformation": "displacement", "weights": {"smoothness": 1.0},
                                   "ncc_window": 5})
    assert step.deformation == "displacement" and step.weights.smoothness == 1.0 and step.ncc_window == 5
    assert step.weights.semantic == GeminiWeights().semantic
    assert list(step.parameters()) and all(p is q for p, q in zip(step.parameters(), deformer.parameters()))
    with pytest.raises(GeminiUserError, match="bidirectional"):
        GeminiStep(deformer, deformation="displacement", bidirectional=False)
    with pytest.raises(GeminiUserError, match="deformation"):
        GeminiStep(deformer, deformation="affine")
    with pytest.raises(GeminiUserError, match="unknown GEMINI option"):
        from_options(deformer, {"temperature": 0.1})
    with pytest.raises(GeminiUserError, match="unknown GEMINI weight"):
        from_options(deformer, {"weights": {"contrast": 1.0}})


def test_one_deformer_spec_written_and_read_back():
    """The spec: defaults in one place, both checkpoint layouts read back, a step rebuilt as described."""
    assert deformer_spec() == {"deformation": "diffeomorphic", "resolution": "half", "bidirectional": False,
                               "integration_steps": DEFAULT_INTEGRATION_STEPS, "input": "features"}
    assert deformer_spec("displacement")["bidirectional"] is True  # no closed-form inverse
    network = tiny_unet()
    for spec in (deformer_spec(), deformer_spec("displacement", "full", integration_steps=3),
                 deformer_spec("diffeomorphic", "full", bidirectional=True, integration_steps=0),
                 deformer_spec(input="images"), deformer_spec("displacement", input="features_and_images")):
        step = step_from_spec(network, spec)
        assert step.spec() == spec and step.deformer.resolution == spec["resolution"]
        assert step.deformer.enc0[0].in_channels == 2 * {"features": 8, "images": 1, "features_and_images": 9}[
            spec["input"]]  # tiny_unet: 4 feature channels, 1 image channel
        fields = spec_to_checkpoint(step.spec())  # the layout both writers have always used
        assert set(fields) == {"deformation", "deformer"} and set(fields["deformer"]) == {
            "resolution", "bidirectional", "integration_steps", "input"}
        assert spec_from_checkpoint(fields, "ckpt") == spec
    # checkpoints written before the spec: gemini_pretrain's extra ncc_window, keys left out (before the
    # input was recorded every deformer saw the features)
    old_pretrain = {"deformation": "diffeomorphic", "deformer": {"resolution": "half", "bidirectional": False,
                                                                 "integration_steps": 7, "ncc_window": 9}}
    assert spec_from_checkpoint(old_pretrain, "ckpt") == deformer_spec()
    assert spec_from_checkpoint({"deformer": {"resolution": "full"}}, "ckpt") == deformer_spec(resolution="full")
    for entry, fragment in (({"deformation": "affine"}, "deformation 'affine'"),
                            ({"deformer": {"resolution": "quarter"}}, "resolution 'quarter'"),
                            ({"deformation": "displacement", "deformer": {"bidirectional": False}}, "bidirectional"),
                            ({"deformer": {"integration_steps": -1}}, "integration_steps -1"),
                            ({"deformer": {"input": "labels"}}, "input 'labels'")):
        with pytest.raises(GeminiUserError, match=f"old.pth: .*{fragment}"):
            spec_from_checkpoint(entry, "old.pth")


def test_the_deformer_sees_what_its_input_says_and_the_images_carry_no_gradient():
    """features: the images do not change the field; images: the features do not, and the flow-only terms
    send the backbone no gradient; features_and_images: both change it. The images are required when the
    deformer sees them."""
    torch.manual_seed(3)
    net = tiny_unet()
    x = torch.randn(4, 1, 16, 16)
    other = torch.randn(2, 1, 16, 16)
    for what in ("features", "images", "features_and_images"):
        step = step_from_spec(net, deformer_spec(resolution="full", input=what))
        nn.init.normal_(step.deformer.out.weight, std=0.05)
        with DecoderFeatureTap(net) as tap:
            net(x)
            feats = tap.pop()
        img_a, img_b, fa, fb = x[:2], x[2:], feats[:2], feats[2:]
        field = step.fields(fa, fb, img_a, img_b)[0]
        changed_images = not torch.equal(field, step.fields(fa, fb, other, img_b)[0])
        changed_features = not torch.equal(field, step.fields(fa.roll(3, -1), fb, img_a, img_b)[0])
        assert (changed_features, changed_images) == {"features": (True, False), "images": (False, True),
                                                      "features_and_images": (True, True)}[what], what
        if what != "features":
            with pytest.raises(ValueError, match="needs the images"):
                step.fields(fa, fb)
        # the flow-only terms (appearance, smoothness) reach the backbone only through the deformer's input
        net.zero_grad()
        step.weights = GeminiWeights(semantic=0.0)
        step(img_a, img_b, fa, fb)[0].backward()
        backbone = sum(float(p.grad.abs().sum()) for p in net.parameters() if p.grad is not None)
        assert (backbone > 0) == (what != "images"), (what, backbone)


# the default (half, one direction) and both directions; full resolution costs more CPU and is
# covered by benchmarks/bench_gemini_step.py
@pytest.mark.parametrize("resolution,bidirectional", [("half", False), ("half", True)])
def test_deformer_learns_a_known_deformation(resolution, bidirectional):
    """Only the deformer trains, on image intensities as features (semantic terms off: a 1-channel
    cosine is only a sign). Appearance loss must drop by half and the end-point error (interior,
    8-voxel margin) must fall below a third of the true displacement's mean magnitude."""
    torch.manual_seed(0)
    img_a, img_b, u_true = synthetic_pair()
    deformer = Deformer(OPS_2D, in_channels=1, resolution=resolution)
    step = GeminiStep(deformer, bidirectional=bidirectional, weights=GeminiWeights(semantic=0.0))
    opt = torch.optim.Adam(deformer.parameters(), lr=1e-3)
    first = None
    for _ in range(60):
        loss, logs = step(img_a, img_b, img_a, img_b)
        first = first if first is not None else logs["appearance"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, logs = step(img_a, img_b, img_a, img_b)
        u_ab = step.fields(img_a, img_b)[0]
    inner = (slice(None), slice(8, -8), slice(8, -8))
    epe = (u_ab - u_true).norm(dim=1)[inner].mean()
    magnitude = u_true.norm(dim=1)[inner].mean()
    assert logs["appearance"] < 0.5 * first
    assert epe < magnitude / 3, (float(epe), float(magnitude))
    assert logs["folding_fraction"] == 0.0


@pytest.mark.parametrize("bidirectional", [False, True])
def test_both_integrations_in_one_batch_equal_two_separate_calls(bidirectional):
    torch.manual_seed(5)
    net = tiny_unet()
    deformer = build_deformer(net)
    nn.init.normal_(deformer.out.weight, std=0.05)
    with DecoderFeatureTap(net) as tap:
        net(torch.randn(4, 1, 16, 16))
        feats = tap.pop()
    step = GeminiStep(deformer, bidirectional=bidirectional)
    disp_ab, disp_ba, raw_ab, raw_ba = step.fields(feats[:2], feats[2:])
    assert raw_ab.abs().max() > 0.1
    assert torch.equal(disp_ab, integrate_velocity(raw_ab, step.integration_steps))
    assert torch.equal(disp_ba, integrate_velocity(raw_ba, step.integration_steps))
