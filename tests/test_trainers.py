"""nnUNetTrainerGEMINI and its variants: the real nnU-Net CLI end to end (train -> final
validation -> predict), and the trainer's rules through the Python API on the 2d configuration
(cheap): pre-trained start, one GEMINI step, checkpoints, refusals."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import DEMO_CASES, run_command

BUDGET = {"nnUNet_gemini_num_epochs": "1", "nnUNet_gemini_iters_per_epoch": "2", "nnUNet_gemini_val_iters": "1",
          "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}


@pytest.fixture(scope="module")
def demo_copy(planned_demo, tmp_path_factory):
    """A private copy of the planned demo (training writes the pool and results into it)."""
    root = tmp_path_factory.mktemp("trainers_demo")
    env = dict(planned_demo.env)
    for var, src in (("nnUNet_raw", os.path.dirname(planned_demo.raw_folder)),
                     ("nnUNet_preprocessed", os.path.dirname(planned_demo.preprocessed_folder))):
        env[var] = str(root / var)
        shutil.copytree(src, env[var])
    env["nnUNet_results"] = str(root / "results")
    os.makedirs(env["nnUNet_results"])
    env.update(BUDGET)
    for k in [k for k in env if k.startswith("nnUNet_gemini_") and k not in BUDGET]:
        del env[k]  # a developer's own settings must not leak into the tests
    return planned_demo, env


@pytest.fixture
def api_env(demo_copy, tmp_path, monkeypatch):
    """This process pointed at the copy, with a fresh results folder per test."""
    demo, env = demo_copy
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, env[var])
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    for k, v in BUDGET.items():
        monkeypatch.setenv(k, v)
    for k in [k for k in os.environ if k.startswith("nnUNet_gemini_") and k not in BUDGET]:
        monkeypatch.delenv(k)
    return demo, env


def _plans_and_dataset_json(demo, env):
    folder = os.path.join(env["nnUNet_preprocessed"], demo.dataset_name)
    with open(os.path.join(folder, "nnUNetPlans.json")) as f:
        plans = json.load(f)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    return plans, dataset_json


def make_trainer(cls_name, demo, env, configuration="2d", fold="all", continue_training=False, plans=None):
    import torch
    from nnunet_gemini import trainers
    default_plans, dataset_json = _plans_and_dataset_json(demo, env)
    plans = default_plans if plans is None else plans
    plans["continue_training"] = continue_training
    return getattr(trainers, cls_name)(plans, configuration, fold, dataset_json, torch.device("cpu"))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _log_text(trainer):
    with open(trainer.log_file) as f:
        return f.read()


# ------------------------------------------------------------------------------------ the CLI
def _train_and_predict(demo, env, configuration, tmp_path):
    train = run_command(["nnUNetv2_train", str(demo.dataset_id), configuration, "all", "-tr", "nnUNetTrainerGEMINI",
                         "-device", "cpu"], env)
    fold_dir = os.path.join(env["nnUNet_results"], demo.dataset_name,
                            f"nnUNetTrainerGEMINI__nnUNetPlans__{configuration}", "fold_all")
    assert os.path.isfile(os.path.join(fold_dir, "checkpoint_final.pth")), train.stdout[-3000:]
    assert os.path.isfile(os.path.join(fold_dir, "validation", "summary.json"))  # nnU-Net's final validation
    assert os.path.isfile(os.path.join(fold_dir, "progress.png"))
    logs = [f for f in os.listdir(fold_dir) if f.startswith("training_log_")]
    log = open(os.path.join(fold_dir, logs[0])).read()
    for needle in ("nnUNet_gemini_weight = 1.0 (default)", "nnUNet_gemini_num_epochs = 1 (environment)",
                   f"Labelled training cases: {DEMO_CASES['labeled']}",
                   f"Unlabelled pool for GEMINI pairs: {DEMO_CASES['labeled'] + DEMO_CASES['unlabeled']} cases",
                   "gemini total", "Network weights in use: random initialisation"):
        assert needle in log, needle

    out = tmp_path / f"pred_{configuration}"
    run_command(["nnUNetv2_predict", "-i", os.path.join(env["nnUNet_raw"], demo.dataset_name, "imagesTs"),
                 "-o", str(out), "-d", str(demo.dataset_id), "-c", configuration, "-f", "all",
                 "-tr", "nnUNetTrainerGEMINI", "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities"],
                env)
    import SimpleITK as sitk
    labels_ts = os.path.join(env["nnUNet_raw"], demo.dataset_name, "labelsTs")
    predictions = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert len(predictions) == DEMO_CASES["test"]
    for name in predictions:
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(out / name)))
        ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(labels_ts, name)))
        assert pred.shape == ref.shape
        assert set(np.unique(pred)) <= set(range(5))  # background + 4 demo labels
        assert os.path.isfile(out / name.replace(".nii.gz", ".npz"))
    return fold_dir


def test_cli_train_3d_runs_to_final_validation_and_predicts(demo_copy, tmp_path):
    demo, env = demo_copy
    fold_dir = _train_and_predict(demo, env, "3d_fullres", tmp_path)
    import torch
    ckpt = torch.load(os.path.join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["gemini"]["deformer_weights"]  # deformer saved beside the plain network
    # what gemini_register needs to rebuild the deformer
    assert ckpt["gemini"]["deformation"] == "diffeomorphic"
    assert ckpt["gemini"]["deformer"] == {"resolution": "half", "bidirectional": False, "integration_steps": 7}
    assert not any(k.startswith(("deformer", "gemini")) for k in ckpt["network_weights"])
    assert len(ckpt["logging"]["gemini_total"]) == 1 and np.isfinite(ckpt["logging"]["gemini_total"][0])


@pytest.mark.slow
def test_cli_train_2d_runs_to_final_validation_and_predicts(demo_copy, tmp_path):
    demo, env = demo_copy
    _train_and_predict(demo, env, "2d", tmp_path)


def test_cascade_is_refused_with_a_clear_message(api_env):
    from nnunet_gemini.errors import GeminiUserError
    demo, env = api_env
    plans, _ = _plans_and_dataset_json(demo, env)
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "next_stage": "3d_cascade_fullres"}
    plans["configurations"]["3d_cascade_fullres"] = {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    with pytest.raises(GeminiUserError, match="cascade"):
        make_trainer("nnUNetTrainerGEMINI", demo, env, configuration="3d_cascade_fullres", plans=plans)
    assert not os.path.isdir(os.path.join(os.environ["nnUNet_results"], demo.dataset_name))  # nothing written


def test_invalid_option_names_the_variable(api_env, monkeypatch):
    from nnunet_gemini.errors import GeminiUserError
    demo, env = api_env
    monkeypatch.setenv("nnUNet_gemini_unlabeled_batch", "two")
    with pytest.raises(GeminiUserError, match="nnUNet_gemini_unlabeled_batch"):
        make_trainer("nnUNetTrainerGEMINI", demo, env)


def test_final_validation_switch_skips_only_when_set(api_env, monkeypatch):
    """nnUNet_gemini_final_validation=0 (the benchmark sets it) skips nnU-Net's final validation in
    both our trainers and the budget baseline, with a log line; unset, nnU-Net's runs (and needs an
    initialised trainer, so it fails on this bare one: proof it was called)."""
    demo, env = api_env
    monkeypatch.setenv("nnUNet_gemini_final_validation", "0")
    for name in ("nnUNetTrainerGEMINI", "nnUNetTrainerEnvBudget"):
        trainer = make_trainer(name, demo, env)
        trainer.perform_actual_validation(False)
        assert not os.path.exists(os.path.join(trainer.output_folder, "validation"))
        with open(trainer.log_file) as f:
            assert "final validation skipped" in f.read()
    monkeypatch.delenv("nnUNet_gemini_final_validation")
    with pytest.raises(Exception):
        make_trainer("nnUNetTrainerEnvBudget", demo, env).perform_actual_validation(False)


# ------------------------------------------------------------------------------ pre-trained start
def write_fake_pretrain_checkpoint(demo, env, configuration="2d", **compat_changes):
    """A valid gemini_pretrain checkpoint (pretrained.py schema) with random weights of the right shapes."""
    import torch
    from nnunet_gemini import checkpoints, pretrained
    donor = make_trainer("nnUNetTrainerGEMINI_NoPretrain", demo, env, configuration)
    donor.initialize()
    compat = checkpoints.network_compatibility_fields(donor.plans_manager, donor.configuration_manager,
                                                      donor.num_input_channels)
    compat.update(compat_changes)
    with torch.no_grad():
        for p in list(donor.network.parameters()) + list(donor.gemini_deformer.parameters()):
            p.add_(torch.randn_like(p))  # weights no fresh initialisation could have
    ckpt = {"gemini_kind": checkpoints.KIND_PRETRAIN,
            "format_version": pretrained.FORMAT_VERSION,
            "network_weights": _state(donor.network), "deformer_weights": _state(donor.gemini_deformer),
            "meta": {"compat": compat, "deformation": "diffeomorphic",
                     "deformer": {"resolution": donor.deformer_resolution, "bidirectional": donor.gemini_bidirectional,
                                  "integration_steps": donor.gemini_integration_steps}}}
    path = os.path.join(pretrained.pretrain_output_dir(demo.dataset_name, "nnUNetPlans", configuration),
                        pretrained.FINAL_CHECKPOINT)
    checkpoints.atomic_torch_save(ckpt, path)
    return path, ckpt


def test_fresh_run_loads_pretrained_checkpoint_and_logs_it(api_env):
    import torch
    demo, env = api_env
    path, ckpt = write_fake_pretrain_checkpoint(demo, env)
    trainer = make_trainer("nnUNetTrainerGEMINI", demo, env)
    trainer.initialize()
    net = trainer.network.state_dict()
    loaded = [k for k in net if ".seg_layers." not in k]
    assert loaded and all(torch.equal(net[k], ckpt["network_weights"][k]) for k in loaded)
    assert not all(torch.equal(net[k], ckpt["network_weights"][k]) for k in net if ".seg_layers." in k)
    deformer = trainer.gemini_deformer.state_dict()
    assert all(torch.equal(deformer[k], v) for k, v in ckpt["deformer_weights"].items())
    assert trainer.pretrained_source == path
    assert f"Loaded the gemini_pretrain checkpoint {path}" in _log_text(trainer)
    trainer._log_weights_in_use()
    assert f"Network weights in use: gemini_pretrain checkpoint {path}" in _log_text(trainer)
    # nnUNetv2_train -pretrained_weights loads after initialize(): the log must say it overrides
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    other, _ = write_fake_pretrain_checkpoint(demo, env)
    load_pretrained_weights(trainer.network, other)
    trainer._log_weights_in_use()
    assert "Network weights in use: nnU-Net -pretrained_weights" in _log_text(trainer)


def test_no_automatic_load_on_continue_or_when_switched_off(api_env, monkeypatch):
    import torch
    demo, env = api_env
    _, ckpt = write_fake_pretrain_checkpoint(demo, env)
    key = next(k for k in ckpt["network_weights"] if ".seg_layers." not in k and k.endswith("weight"))
    resumed = make_trainer("nnUNetTrainerGEMINI", demo, env, continue_training=True)
    resumed.initialize()
    assert not torch.equal(resumed.network.state_dict()[key], ckpt["network_weights"][key])
    assert resumed.pretrained_source is None
    no_pretrain = make_trainer("nnUNetTrainerGEMINI_NoPretrain", demo, env)
    no_pretrain.initialize()
    assert no_pretrain.pretrained_source is None
    monkeypatch.setenv("nnUNet_gemini_auto_pretrained", "0")
    switched_off = make_trainer("nnUNetTrainerGEMINI", demo, env)
    switched_off.initialize()
    assert not torch.equal(switched_off.network.state_dict()[key], ckpt["network_weights"][key])
    assert "nnUNet_gemini_auto_pretrained=0" in _log_text(switched_off)


def test_incompatible_pretrained_checkpoint_is_refused_naming_both(api_env):
    from nnunet_gemini.errors import GeminiUserError
    demo, env = api_env
    path, _ = write_fake_pretrain_checkpoint(demo, env, normalization_schemes=["CTNormalization"])
    trainer = make_trainer("nnUNetTrainerGEMINI", demo, env)
    with pytest.raises(GeminiUserError) as e:
        trainer.initialize()
    assert path in str(e.value) and "CTNormalization" in str(e.value) and "ZScoreNormalization" in str(e.value)


def test_finetune_refuses_without_checkpoint_and_loads_one(api_env):
    import torch
    from nnunet_gemini.errors import GeminiUserError
    demo, env = api_env
    trainer = make_trainer("nnUNetTrainerGEMINIFinetune", demo, env)
    with pytest.raises(GeminiUserError, match=f"gemini_pretrain -d {demo.dataset_id}"):
        trainer.initialize()
    _, ckpt = write_fake_pretrain_checkpoint(demo, env)
    trainer = make_trainer("nnUNetTrainerGEMINIFinetune", demo, env)
    trainer.initialize()
    assert trainer.gemini_deformer is None and trainer.gemini_step is None  # supervised only
    assert len(trainer.optimizer.param_groups[0]["params"]) == len(list(trainer.network.parameters()))
    key = next(k for k in ckpt["network_weights"] if ".seg_layers." not in k)
    assert torch.equal(trainer.network.state_dict()[key], ckpt["network_weights"][key])


# ---------------------------------------------------------------------------------- one iteration
@pytest.fixture
def started_trainer(api_env):
    demo, env = api_env
    trainer = make_trainer("nnUNetTrainerGEMINI_NoPretrain", demo, env)
    trainer.on_train_start()
    yield trainer
    trainer.on_train_end()


def test_one_step_trains_network_and_deformer_and_supervised_loss_sees_only_labelled(started_trainer):
    import torch
    trainer = started_trainer
    seen = {}
    loss = trainer.loss

    def spy_loss(output, target):
        seen["output"], seen["target"] = [o.shape[0] for o in output], [t.shape[0] for t in target]
        return loss(output, target)

    trainer.loss = spy_loss
    hook = trainer.network.register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0].shape[0]))
    net_before, deformer_before = _state(trainer.network), _state(trainer.gemini_deformer)
    result = trainer.train_step(next(trainer.dataloader_train))
    hook.remove()
    n, p = trainer.batch_size, trainer.unlabeled_batch
    assert seen["input"] == n + 2 * p  # one forward for labelled + pairs
    assert set(seen["output"]) == {n} and set(seen["target"]) == {n}
    changed = lambda before, module: [k for k, v in module.state_dict().items()
                                      if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed(net_before, trainer.network) and changed(deformer_before, trainer.gemini_deformer)
    assert np.isfinite(result["loss"]) and np.isfinite(result["gemini_total"]) and result["gemini_total"] > 0
    assert trainer.optimizer.param_groups[0]["params"][-1] is list(trainer.gemini_deformer.parameters())[-1]


def test_out_of_memory_names_the_unlabelled_batch_setting(started_trainer):
    import torch
    trainer = started_trainer

    def oom(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    hook = trainer.network.register_forward_pre_hook(oom)
    try:
        with pytest.raises(torch.OutOfMemoryError, match="nnUNet_gemini_unlabeled_batch=N"):
            trainer.train_step(next(trainer.dataloader_train))
    finally:
        hook.remove()


def test_nonfinite_loss_skips_the_update_then_stops(started_trainer, monkeypatch):
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.trainers.nnUNetTrainerGEMINI import TEST_NONFINITE_ENV
    trainer = started_trainer
    trainer.max_nonfinite_in_a_row = 2
    monkeypatch.setenv(TEST_NONFINITE_ENV, "0,1")
    before = _state(trainer.network)
    result = trainer.train_step(next(trainer.dataloader_train))
    assert np.isnan(result["gemini_total"]) and trainer.nonfinite_skipped_total == 1
    assert all((v == before[k]).all() for k, v in trainer.network.state_dict().items())  # no update
    with pytest.raises(GeminiUserError, match="nnUNet_gemini_max_nonfinite=2"):
        trainer.train_step(next(trainer.dataloader_train))


def test_rampup_scales_the_gemini_term_by_epoch(started_trainer):
    """nnUNet_gemini_rampup_epochs: d total / d gemini is weight * exp(-5 (1 - epoch/R)^2), then weight."""
    import math
    trainer = started_trainer
    original, seen = trainer.gemini_step, {}

    def spy(*args):
        loss, logs = original(*args)
        loss.register_hook(lambda g: seen.__setitem__("d_total_d_gemini", float(g)))
        return loss, logs

    trainer.gemini_step = spy
    trainer.gemini_weight, trainer.gemini_rampup_epochs = 0.5, 4
    try:
        for epoch, factor in ((0, math.exp(-5.0)), (2, math.exp(-1.25)), (4, 1.0), (9, 1.0)):
            trainer.current_epoch = epoch
            trainer.train_step(next(trainer.dataloader_train))
            assert seen.pop("d_total_d_gemini") == pytest.approx(0.5 * factor, rel=1e-6)
    finally:
        trainer.gemini_step = original  # on_train_end saves the step's settings


def test_rampup_factor_and_its_option():
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.trainers.options import rampup_factor, read_env_options
    assert [rampup_factor(e, 0) for e in (0, 5)] == [1.0, 1.0]  # default: no ramp-up (as released)
    ramp = [rampup_factor(e, 10) for e in range(12)]
    assert ramp[0] == pytest.approx(np.exp(-5)) and ramp[10:] == [1.0, 1.0]
    assert all(a < b for a, b in zip(ramp[:10], ramp[1:11]))  # strictly rising to the full weight
    assert read_env_options({"nnUNet_gemini_rampup_epochs": "25"}).rampup_epochs == 25
    with pytest.raises(GeminiUserError, match="nnUNet_gemini_rampup_epochs='-1' must be a non-negative integer"):
        read_env_options({"nnUNet_gemini_rampup_epochs": "-1"})



def test_pair_positions_option_reaches_the_pair_loader(api_env, monkeypatch):
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.trainers.options import read_env_options
    assert read_env_options({}).pair_positions == "same"
    with pytest.raises(GeminiUserError, match="nnUNet_gemini_pair_positions='random' is not one of"):
        read_env_options({"nnUNet_gemini_pair_positions": "random"})
    demo, env = api_env
    monkeypatch.setenv("nnUNet_gemini_pair_positions", "independent")
    trainer = make_trainer("nnUNetTrainerGEMINI_NoPretrain", demo, env)
    trainer.on_train_start()
    try:
        assert trainer.pair_loader.data_loader.positions == "independent"
        assert "nnUNet_gemini_pair_positions = independent (environment)" in _log_text(trainer)
    finally:
        trainer.on_train_end()


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_resume_restores_deformer_optimizer_and_logging(started_trainer, api_env, tmp_path):
    import torch
    demo, env = api_env
    trainer = started_trainer
    outputs = [trainer.train_step(next(trainer.dataloader_train))]
    trainer.on_train_epoch_end(outputs)
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".gemini_tmp_")]  # atomic write left no temp

    resumed = make_trainer("nnUNetTrainerGEMINI_NoPretrain", demo, env, continue_training=True)
    resumed.load_checkpoint(path)
    for k, v in trainer.gemini_deformer.state_dict().items():
        assert torch.equal(resumed.gemini_deformer.state_dict()[k], v)
    for k, v in trainer.network.state_dict().items():
        assert torch.equal(resumed.network.state_dict()[k], v)
    momentum = lambda t: [s["momentum_buffer"] for s in t.optimizer.state_dict()["state"].values()]
    assert len(momentum(resumed)) == len(momentum(trainer)) > len(list(trainer.network.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(momentum(resumed), momentum(trainer)))
    assert resumed.logger.get_value("gemini_total", None) == trainer.logger.get_value("gemini_total", None)
    assert resumed.global_iteration == trainer.global_iteration == 1

    # prediction builds the network with the static method and loads network_weights strictly
    from nnunet_gemini.trainers import nnUNetTrainerGEMINI
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    plain = nnUNetTrainerGEMINI.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, False)
    plain.load_state_dict(ckpt["network_weights"], strict=True)


def test_continue_from_a_checkpoint_without_deformer_is_refused(api_env, tmp_path):
    from nnunet_gemini.errors import GeminiUserError
    demo, env = api_env
    plain = make_trainer("nnUNetTrainerEnvBudget", demo, env)
    plain.initialize()
    path = str(tmp_path / "plain.pth")
    plain.save_checkpoint(path)
    trainer = make_trainer("nnUNetTrainerGEMINI_NoPretrain", demo, env, continue_training=True)
    with pytest.raises(GeminiUserError, match="no GEMINI deformer state"):
        trainer.load_checkpoint(path)


def test_find_best_configuration_and_ensembling_accept_our_results(demo_copy, tmp_path):
    """nnU-Net's model-selection and ensembling tools work on an nnUNetTrainerGEMINI results folder
    (integer folds from gemini_fewshot_split: the 4-case demo is too small for nnU-Net's 5 folds)."""
    demo, env = demo_copy
    env = dict(env, nnUNet_results=str(tmp_path / "results"))
    run_command([sys.executable, "-m", "nnunet_gemini.fewshot_split", "-d", str(demo.dataset_id), "-n", "2",
                 "--draws", "1", "--overwrite"], env)
    run_command(["nnUNetv2_train", str(demo.dataset_id), "3d_fullres", "0", "-tr", "nnUNetTrainerGEMINI",
                 "-device", "cpu", "--npz"], env)
    run_command(["nnUNetv2_find_best_configuration", str(demo.dataset_id), "-c", "3d_fullres",
                 "-tr", "nnUNetTrainerGEMINI", "-f", "0", "--disable_ensembling", "-np", "1"], env)
    instructions = os.path.join(env["nnUNet_results"], demo.dataset_name, "inference_instructions.txt")
    assert "nnUNetTrainerGEMINI" in open(instructions).read()

    predicted = tmp_path / "predicted"
    run_command(["nnUNetv2_predict", "-i", os.path.join(env["nnUNet_raw"], demo.dataset_name, "imagesTs"),
                 "-o", str(predicted), "-d", str(demo.dataset_id), "-c", "3d_fullres", "-f", "0",
                 "-tr", "nnUNetTrainerGEMINI", "-device", "cpu", "-npp", "1", "-nps", "1", "--save_probabilities"],
                env)
    out = tmp_path / "ensemble"
    run_command(["nnUNetv2_ensemble", "-i", str(predicted), str(predicted), "-o", str(out), "-np", "1"], env)
    ensembled = sorted(f for f in os.listdir(out) if f.endswith(".nii.gz"))
    assert ensembled == sorted(f for f in os.listdir(predicted) if f.endswith(".nii.gz"))
    assert len(ensembled) == DEMO_CASES["test"]


# ------------------------------------------------------------------------- data-parallel (DDP)
def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_processes_keep_network_and_deformer_identical(demo_copy, tmp_path):
    """-num_gpus 2 runs nnU-Net's DDP path; here the same trainer code on 2 CPU processes (gloo).
    The ranks start from different random states on purpose: the deformer (outside DDP) must be
    made identical by the trainer itself and stay so (gradients averaged by hand), like the network."""
    import torch
    demo, env = demo_copy
    env = dict(env, nnUNet_results=str(tmp_path / "results"), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2", nnUNet_gemini_final_validation="0",
               nnUNet_gemini_unlabeled_batch="2", nnUNet_compile="0")
    pool = os.path.join(env["nnUNet_preprocessed"], demo.dataset_name, "nnUNetPlans_3d_fullres_gemini_unlabeled")
    shutil.rmtree(pool, ignore_errors=True)  # built on first use: by rank 0 alone, the other rank waits
    worker = os.path.join(os.path.dirname(__file__), "ddp_trainer_worker.py")
    procs = [subprocess.Popen([sys.executable, worker, str(demo.dataset_id), "3d_fullres", "nnUNetTrainerGEMINI_NoPretrain",
                               str(tmp_path)], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(f"--- rank {r} ---\n{out[-4000:]}"
                                                            for r, out in enumerate(outputs))
    ranks = [torch.load(str(tmp_path / f"rank{r}.pt"), map_location="cpu", weights_only=False) for r in range(2)]
    assert [r["unlabeled_batch"] for r in ranks] == [1, 1]  # 2 pairs split over 2 ranks
    for part in ("network", "deformer"):
        a, b = ranks[0][part], ranks[1][part]
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{part} {k} differs between the ranks"
    fold_dir = ranks[0]["output_folder"]
    ckpt = torch.load(os.path.join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    for k, v in ckpt["gemini"]["deformer_weights"].items():
        assert torch.equal(v, ranks[0]["deformer"][k])
    logs = [f for f in os.listdir(fold_dir) if f.startswith("training_log_")]
    assert len(logs) == 1  # rank 0 alone logs
    log = open(os.path.join(fold_dir, logs[0])).read()
    assert "gemini total" in log and log.count("Preprocessing the unlabelled pool") == 1
    assert f"Unlabelled pool for GEMINI pairs: {DEMO_CASES['labeled'] + DEMO_CASES['unlabeled']} cases" in log


def test_uneven_ddp_batch_split_is_refused_with_the_fix():
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.trainers.nnUNetTrainerGEMINI import refuse_uneven_ddp_batch
    for ok in ((2, 2, True), (4, 2, True), (5, 1, True), (5, 2, False)):
        refuse_uneven_ddp_batch(*ok)
    with pytest.raises(GeminiUserError, match=r"batch size 5 does not split evenly over 2 GPUs.*-num_gpus.*"
                                              r"batch_size in the plans to a multiple of 2"):
        refuse_uneven_ddp_batch(5, 2, True)
