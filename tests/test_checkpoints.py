"""Checkpoint I/O: atomic save under an injected abort, weights_only loading of ours and of
nnU-Net's trainer checkpoints, compatibility checks, disk/writability check."""
import os

import numpy as np
import pytest
import torch

from nnunet_gemini import checkpoints as ck
from nnunet_gemini.errors import GeminiUserError


def _ours(value: float):
    return {"gemini_kind": ck.KIND_PRETRAIN, "network_weights": {"w": torch.full((3,), value)},
            "metadata": {"plans": "nnUNetPlans", "iterations": 5, "patch_size": [8, 8, 8]}}


def test_atomic_save_and_weights_only_load(tmp_path):
    path = str(tmp_path / "checkpoint_latest.pth")
    ck.atomic_torch_save(_ours(1.0), path)
    loaded = ck.load_our_checkpoint(path, ck.KIND_PRETRAIN)
    assert torch.equal(loaded["network_weights"]["w"], torch.ones(3))
    assert loaded["metadata"]["patch_size"] == [8, 8, 8]
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]  # no temporary file left


def test_injected_abort_keeps_previous_checkpoint(tmp_path, monkeypatch):
    from nnunet_gemini import atomic
    path = str(tmp_path / "checkpoint_latest.pth")
    ck.atomic_torch_save(_ours(1.0), path)
    monkeypatch.setenv(atomic.ABORT_AFTER_TMP_WRITE_ENV, "1")
    with pytest.raises(atomic.WriteAborted):
        ck.atomic_torch_save(_ours(2.0), path)
    loaded = ck.load_our_checkpoint(path, ck.KIND_PRETRAIN)
    assert torch.equal(loaded["network_weights"]["w"], torch.ones(3))  # previous one intact
    # the temporary file is left as a killed process would leave it, under a name nothing loads
    leftovers = [f for f in os.listdir(tmp_path) if f != "checkpoint_latest.pth"]
    assert len(leftovers) == 1 and leftovers[0].startswith(atomic.TMP_PREFIX)
    monkeypatch.delenv(atomic.ABORT_AFTER_TMP_WRITE_ENV)
    ck.atomic_torch_save(_ours(3.0), path)
    assert ck.load_our_checkpoint(path, ck.KIND_PRETRAIN)["network_weights"]["w"][0] == 3.0


def test_json_writes_are_atomic_too(tmp_path, monkeypatch):
    """results.json, pool manifests and splits go through the same writer: an abort keeps the old file."""
    import json

    from nnunet_gemini import atomic
    path = str(tmp_path / "results.json")
    atomic.write_json_atomic(path, {"runs": [1]})
    monkeypatch.setenv(atomic.ABORT_AFTER_TMP_WRITE_ENV, "1")
    with pytest.raises(atomic.WriteAborted):
        atomic.write_json_atomic(path, {"runs": [1, 2]})
    assert json.load(open(path)) == {"runs": [1]}


def test_failed_save_removes_its_temporary_file(tmp_path):
    with pytest.raises(Exception):
        ck.atomic_torch_save({"f": lambda x: x}, str(tmp_path / "c.pth"))  # unpicklable
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content, fragment", [
    (b"this is not a checkpoint at all", "not a readable nnunet-gemini checkpoint"),
    (None, "not a readable nnunet-gemini checkpoint"),  # truncated copy of a real one
])
def test_corrupt_files_are_user_errors(tmp_path, content, fragment):
    path = str(tmp_path / "bad.pth")
    if content is None:
        ck.atomic_torch_save(_ours(1.0), str(tmp_path / "good.pth"))
        content = open(tmp_path / "good.pth", "rb").read()[:200]
    open(path, "wb").write(content)
    with pytest.raises(GeminiUserError, match=fragment) as e:
        ck.load_our_checkpoint(path, ck.KIND_PRETRAIN)
    assert path in str(e.value)


def test_other_torch_files_are_not_our_checkpoint(tmp_path):
    path = str(tmp_path / "weights.pth")
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(GeminiUserError, match="not an nnunet-gemini 'gemini_pretrain' checkpoint"):
        ck.load_our_checkpoint(path, ck.KIND_PRETRAIN)
    ck.atomic_torch_save({**_ours(1.0), "gemini_kind": "another_kind"}, path)
    with pytest.raises(GeminiUserError, match="found kind 'another_kind'"):
        ck.load_our_checkpoint(path, ck.KIND_PRETRAIN)
    with pytest.raises(GeminiUserError, match="does not exist"):
        ck.load_our_checkpoint(str(tmp_path / "missing.pth"), ck.KIND_PRETRAIN)


def _nnunet_like_checkpoint():
    """What nnUNetTrainer.save_checkpoint stores: numpy scalars from its logger and _best_ema."""
    return {
        "network_weights": {"encoder.w": torch.zeros(2, 2)},
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.5), np.float64(0.6)],
                    "train_losses": [np.float32(-0.1)], "epoch_end_timestamps": [1.0]},
        "_best_ema": np.float64(0.55),
        "current_epoch": 2,
        "init_args": {"plans": {"plans_name": "nnUNetPlans"}, "configuration": "3d_fullres",
                      "fold": 0, "dataset_json": {}, "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
    }


def test_nnunet_trainer_checkpoint_loads_with_weights_only(tmp_path):
    path = str(tmp_path / "checkpoint_final.pth")
    torch.save(_nnunet_like_checkpoint(), path)
    with pytest.raises(Exception):  # plain weights_only refuses the numpy scalars ...
        torch.load(path, weights_only=True)
    ckpt = ck.load_nnunet_trainer_checkpoint(path)  # ... our allow-list accepts exactly them
    assert float(ckpt["_best_ema"]) == 0.55 and ckpt["trainer_name"] == "nnUNetTrainer"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_nnunet_loader_rejects_arbitrary_objects(tmp_path):
    path = str(tmp_path / "evil.pth")
    torch.save({**_nnunet_like_checkpoint(), "payload": Evil()}, path)
    with pytest.raises(GeminiUserError, match="weights_only=True"):
        ck.load_nnunet_trainer_checkpoint(path)
    torch.save({"no": "weights"}, path)
    with pytest.raises(GeminiUserError, match="no 'network_weights'"):
        ck.load_nnunet_trainer_checkpoint(path)


@pytest.fixture(scope="module")
def managers():
    """Plans/configuration managers of a real nnU-Net plans dict (3d_fullres + 2d)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    arch_kwargs = {"n_stages": 3, "features_per_stage": [8, 16, 32],
                   "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 3,
                   "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "n_conv_per_stage": [2, 2, 2],
                   "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
                   "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                   "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                   "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                   "nonlin_kwargs": {"inplace": True}}
    config = {"data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
              "batch_size": 2, "patch_size": [16, 16, 16], "median_image_size_in_voxels": [20, 20, 20],
              "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
              "use_mask_for_norm": [False], "resampling_fn_data": "resample_data_or_seg_to_shape",
              "resampling_fn_seg": "resample_data_or_seg_to_shape", "resampling_fn_data_kwargs": {},
              "resampling_fn_seg_kwargs": {}, "resampling_fn_probabilities":
                  "resample_data_or_seg_to_shape", "resampling_fn_probabilities_kwargs": {},
              "architecture": {"network_class_name":
                               "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                               "arch_kwargs": arch_kwargs,
                               "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
              "batch_dice": True}
    plans = {"dataset_name": "Dataset001_X", "plans_name": "nnUNetPlans",
             "original_median_spacing_after_transp": [1, 1, 1],
             "original_median_shape_after_transp": [20, 20, 20], "image_reader_writer": "SimpleITKIO",
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
             "configurations": {"3d_fullres": config}, "experiment_planner_used": "x",
             "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {}}
    return PlansManager(plans)


def test_compatibility_fields_are_plain_and_roundtrip(managers, tmp_path):
    pm = managers
    fields = ck.network_compatibility_fields(pm, pm.get_configuration("3d_fullres"), 1)
    assert fields["network_arch_class_name"].endswith("PlainConvUNet")
    assert fields["num_input_channels"] == 1
    assert fields["normalization_schemes"] == ["ZScoreNormalization"]
    path = str(tmp_path / "c.pth")
    ck.atomic_torch_save({"gemini_kind": ck.KIND_PRETRAIN, "compatibility": fields}, path)
    stored = ck.load_our_checkpoint(path, ck.KIND_PRETRAIN)["compatibility"]
    assert stored == fields
    assert ck.check_compatibility(stored, fields) == []


@pytest.mark.parametrize("key, value, fragment", [
    ("num_input_channels", 2, "num_input_channels is 2 in the checkpoint but 1"),
    ("normalization_schemes", ["CTNormalization"], "normalization_schemes"),
    ("network_arch_class_name", "ResidualEncoderUNet", "network_arch_class_name"),
])
def test_incompatible_network_is_error(managers, key, value, fragment):
    pm = managers
    expected = ck.network_compatibility_fields(pm, pm.get_configuration("3d_fullres"), 1)
    with pytest.raises(GeminiUserError, match=fragment):
        ck.check_compatibility({**expected, key: value}, expected, "ckpt.pth")


def test_different_arch_kwargs_is_error(managers):
    pm = managers
    expected = ck.network_compatibility_fields(pm, pm.get_configuration("3d_fullres"), 1)
    other = {**expected, "network_arch_init_kwargs":
             {**expected["network_arch_init_kwargs"], "features_per_stage": [16, 32, 64]}}
    with pytest.raises(GeminiUserError, match="ckpt.pth is incompatible: network_arch_init_kwargs"):
        ck.check_compatibility(other, expected, "ckpt.pth")


def test_spacing_and_patch_differences_are_warnings(managers):
    pm = managers
    expected = ck.network_compatibility_fields(pm, pm.get_configuration("3d_fullres"), 1)
    warnings = ck.check_compatibility({**expected, "spacing": [2.0, 1.0, 1.0],
                                       "patch_size": [32, 32, 32]}, expected)
    assert len(warnings) == 2
    assert "spacing differs" in warnings[0] and "patch_size differs" in warnings[1]


def test_free_disk_and_writable(tmp_path):
    ck.check_free_disk_and_writable(str(tmp_path / "out"), 1024)
    assert os.listdir(tmp_path / "out") == []
    with pytest.raises(GeminiUserError, match="not enough free disk"):
        ck.check_free_disk_and_writable(str(tmp_path / "out"), 1 << 62)
    if os.geteuid() != 0:  # root writes everywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(GeminiUserError, match="not writable"):
            ck.check_free_disk_and_writable(str(ro), 1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GeminiUserError, match="not writable"):
        ck.check_free_disk_and_writable(str(blocker / "sub"), 1)


def test_state_dict_nbytes():
    assert ck.state_dict_nbytes({"a": torch.zeros(10), "b": torch.zeros(2, dtype=torch.float16)}) == 44


def test_optimizer_state_prefix_is_what_an_optimizer_of_the_first_params_saves():
    """Reading a trainer checkpoint from before the deformer's own optimiser: its SGD state over
    network + deformer, cut to the network's parameters, loads into an SGD over the network alone."""
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(5)]
    both = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sum((q ** 2).sum() for q in params[1:]).backward()  # params[0] gets no gradient: no momentum entry
    both.step()
    state = both.state_dict()
    assert ck.optimizer_state_params(state) == 5
    network = [torch.nn.Parameter(q.detach().clone()) for q in params[:3]]
    alone = torch.optim.SGD(network, lr=0.1, momentum=0.9)
    alone.load_state_dict(ck.optimizer_state_prefix(state, 3))
    assert ck.optimizer_state_params(alone.state_dict()) == 3 and len(alone.state) == 2
    for q, r in zip(params[1:3], network[1:3]):
        assert torch.equal(alone.state[r]["momentum_buffer"], both.state[q]["momentum_buffer"])
    with pytest.raises(ValueError, match="at least 6 parameters"):
        ck.optimizer_state_prefix(state, 6)
