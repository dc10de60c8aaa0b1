"""Network from real nnU-Net plans, the decoder feature tap, and the heads built from it.

Plans come from nnU-Net's own planners (default -> PlainConvUNet, ResEnc M ->
ResidualEncoderUNet) run on a tiny synthetic dataset, 2d and 3d_fullres.
"""
import json

import numpy as np
import pytest
import torch

from nnunet_gemini.heads import Deformer, RestorationHead, build_deformer, build_restoration_head
from nnunet_gemini.network import DecoderFeatureTap, build_segmentation_network, feature_channels

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID}_GeminiNetTiny"
PLANNERS = {"ExperimentPlanner": ("nnUNetPlans", "PlainConvUNet"),
            "nnUNetPlannerResEncM": ("nnUNetResEncUNetMPlans", "ResidualEncoderUNet")}


def _write_tiny_raw_dataset(raw_dir, n_cases=3, size=24):
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    ds = raw_dir / DATASET_NAME
    (ds / "imagesTr").mkdir(parents=True)
    (ds / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    for i in range(n_cases):
        centre = rng.uniform(8, 16, 3)
        blob = (np.linalg.norm(grid - centre, axis=-1) < rng.uniform(4, 7)).astype(np.uint8)
        img = (blob * 100 + rng.normal(0, 10, blob.shape)).astype(np.float32)
        for arr, path in ((img, ds / "imagesTr" / f"case{i}_0000.nii.gz"), (blob, ds / "labelsTr" / f"case{i}.nii.gz")):
            sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    (ds / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1},
        "numTraining": n_cases, "file_ending": ".nii.gz"}))


@pytest.fixture(scope="module")
def plans_managers(tmp_path_factory):
    """{(plans_identifier, configuration): (PlansManager, ConfigurationManager)}"""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root = tmp_path_factory.mktemp("nnunet")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            (root / var).mkdir()
            mp.setenv(var, str(root / var))
        mp.setenv("nnUNet_def_n_proc", "1")
        _write_tiny_raw_dataset(root / "nnUNet_raw")
        extract_fingerprints([DATASET_ID], num_processes=1, verbose=False, show_progress_bar=False)
        out = {}
        for planner, (plans_id, _) in PLANNERS.items():
            assert plan_experiments([DATASET_ID], planner) == plans_id
            pm = PlansManager(str(root / "nnUNet_preprocessed" / DATASET_NAME / f"{plans_id}.json"))
            for cfg in ("2d", "3d_fullres"):
                out[(plans_id, cfg)] = (pm, pm.get_configuration(cfg))
    return out


CASES = [(planner, cfg) for planner in PLANNERS for cfg in ("2d", "3d_fullres")]


@pytest.mark.parametrize("planner,cfg", CASES)
@pytest.mark.parametrize("in_ch", [1, 2])
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_network_tap_and_heads(plans_managers, planner, cfg, in_ch, deep_supervision):
    plans_id, arch = PLANNERS[planner]
    pm, cm = plans_managers[(plans_id, cfg)]
    torch.manual_seed(0)
    net = build_segmentation_network(pm, cm, in_ch, 2, enable_deep_supervision=deep_supervision)
    assert type(net).__name__ == arch
    assert cm.network_arch_class_name.endswith(arch)
    width = cm.network_arch_init_kwargs["features_per_stage"][0]
    assert feature_channels(net) == width

    patch = tuple(cm.patch_size)
    x = torch.randn(2, in_ch, *patch)
    tap = DecoderFeatureTap(net)
    out = net(x)
    seg = out[0] if deep_supervision else out
    assert isinstance(out, list) == deep_supervision
    assert tap.calls == 1
    feats = tap.pop()
    assert tap.features is None and tap.calls == 0
    assert feats.shape == (2, width, *patch)
    assert feats.requires_grad
    # same forward: the full-resolution seg layer applied to the tapped features is the output
    torch.testing.assert_close(net.decoder.seg_layers[-1](feats), seg)

    deformer = build_deformer(net)
    assert deformer.ndim == len(patch)
    assert isinstance(deformer.out, net.encoder.conv_op)  # the network's own op family
    assert isinstance(deformer.enc0[1], net.encoder.norm_op)
    field = deformer(feats[:1], feats[1:])
    assert field.shape == (1, len(patch), *patch)
    assert 0 < field.abs().max() < 1e-2  # near-zero but not dead at init

    head = build_restoration_head(net, in_ch)
    restored = head(feats)
    assert restored.shape == (2, in_ch, *patch)
    tap.close()
    net(x)
    assert tap.features is None  # closed tap no longer captures


def test_tap_unwraps_compile_and_dataparallel_wrappers(plans_managers):
    pm, cm = plans_managers[("nnUNetPlans", "2d")]
    net = build_segmentation_network(pm, cm, 1, 2, enable_deep_supervision=False)
    wrapped = torch.nn.DataParallel(net)
    tap = DecoderFeatureTap(wrapped)
    assert feature_channels(wrapped) == feature_channels(net)

    class FakeCompiled(torch.nn.Module):  # torch.compile's OptimizedModule keeps the model as _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    tap2 = DecoderFeatureTap(FakeCompiled(wrapped))
    net(torch.randn(1, 1, *cm.patch_size))
    assert tap.pop().shape[1] == tap2.pop().shape[1] == feature_channels(net)
    tap.close(), tap2.close()


@pytest.mark.parametrize("ndim", [2, 3])
def test_half_resolution_deformer_gives_full_resolution_field(ndim):
    conv, norm = (torch.nn.Conv2d, torch.nn.InstanceNorm2d) if ndim == 2 else (torch.nn.Conv3d, torch.nn.InstanceNorm3d)
    ops = dict(conv_op=conv, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True},
               nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    size = (13, 10) if ndim == 2 else (9, 10, 7)  # odd sizes: no divisibility assumption
    deformer = Deformer(ops, in_channels=4, resolution="half")
    torch.nn.init.normal_(deformer.out.weight, std=0.1)
    field = deformer(torch.randn(1, 4, *size), torch.randn(1, 4, *size))
    assert field.shape == (1, ndim, *size)
    head = RestorationHead(ops, in_channels=4, out_channels=3)
    assert head(torch.randn(2, 4, *size)).shape == (2, 3, *size)


@pytest.mark.slow
def test_tap_on_a_torch_compiled_network_matches_eager(plans_managers):
    """nnU-Net compiles the network in initialize() (default on CUDA) and our trainer registers the
    tap afterwards: the compiled forward must still feed the hooks, with eager values and gradients.
    Runs inductor on the CPU (compilation takes tens of seconds on 2 cores), hence opt-in."""
    pm, cm = plans_managers[("nnUNetPlans", "3d_fullres")]
    torch.manual_seed(0)
    net = build_segmentation_network(pm, cm, 1, 2, enable_deep_supervision=True)  # what the trainer compiles
    x = torch.randn(2, 1, *cm.patch_size)
    eager_tap = DecoderFeatureTap(net)
    eager_out = net(x)
    eager_features = eager_tap.pop()
    eager_tap.close()
    compiled = torch.compile(net)
    tap = DecoderFeatureTap(compiled)
    for _ in range(2):  # the second call runs the cached graph: the hook must still fire
        out = compiled(x)
        features = tap.pop()
        assert features.shape == eager_features.shape
        assert torch.allclose(features, eager_features, atol=1e-4)
        assert torch.allclose(out[0], eager_out[0], atol=1e-4)
    features.sum().backward()
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0
