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
from helpers import DEMO_CASES, private_demo_copy, run_command

BUDGET = {"nnUNet_gemini_num_epochs": "1", "nnUNet_gemini_iters_per_epoch": "2", "nnUNet_gemini_val_iters": "1",
          "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1"}


@pytest.fixture(scope="module")
def demo_copy(planned_demo, tmp_path_factory):
    """A private copy of the planned demo (training writes the pool and results into it)."""
    root = tmp_path_factory.mktemp("trainers_demo")
    return planned_demo, private_demo_copy(planned_demo, root, **BUDGET)


@pytest.fixture
def api_env(demo_copy, tmp_path, monkeypatch):
    """This process pointed at the copy, with a fresh results folder per test."""
    demo, env = demo_copy
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.setenv(var, env[var])
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    for k, v in BUDGET.items():
        monkeypatch.setenv(k, v)
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
    assert os.path.isfile(os.path.join(fold_dir, "progress.png"))  # nnU-Net's own
    assert os.path.isfile(os.path.join(fold_dir, "progress_gemini.png"))  # the GEMINI curves beside it
    logs = [f for f in os.listdir(fold_dir) if f.startswith("training_log_")]
    log = open(os.path.join(fold_dir, logs[0])).read()
    for needle in ("nnUNet_gemini_weight = 1.0 (default)", "nnUNet_gemini_num_epochs = 1 (environment)",
                   f"Labelled training cases: {DEMO_CASES['labeled']}",
                   f"Unlabelled pool for GEMINI pairs: {DEMO_CASES['labeled'] + DEMO_CASES['unlabeled']} cases",
                   "gemini total", "Network weights in use: random initialisation",
                   "glibc malloc: freed memory kept for reuse"):
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
    assert ckpt["gemini"]["deformer"] == {"resolution": "half", "bidirectional": False, "integration_steps": 7,
                                          "input": "features"}
    assert ckpt["gemini"]["deformer_optimizer_state"]["param_groups"][0]["lr"] == 1e-4  # its own Adam
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
    from nnunet_gemini.gemini_step import spec_to_checkpoint
    ckpt = {"gemini_kind": checkpoints.KIND_PRETRAIN,
            "format_version": pretrained.FORMAT_VERSION,
            "network_weights": _state(donor.network), "deformer_weights": _state(donor.gemini_deformer),
            "meta": {"compat": compat, **spec_to_checkpoint(donor.gemini_step.spec())}}
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
    assert f"Network weights in use: gemini_pretrain checkpoint {path}; deformer weights: {path}." in _log_text(trainer)
    # nnUNetv2_train -pretrained_weights loads after initialize(): the log must say it overrides
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    other, _ = write_fake_pretrain_checkpoint(demo, env)
    load_pretrained_weights(trainer.network, other)
    trainer._log_weights_in_use()
    assert "Network weights in use: nnU-Net -pretrained_weights" in _log_text(trainer)


def test_encoder_transfer_loads_the_encoder_only(api_env, monkeypatch):
    """nnUNet_gemini_transfer=encoder: every encoder weight (and its decoder.encoder.* alias) is the
    pre-training's, every decoder weight and the deformer keep their fresh initialisation."""
    import torch
    demo, env = api_env
    path, ckpt = write_fake_pretrain_checkpoint(demo, env)
    monkeypatch.setenv("nnUNet_gemini_transfer", "encoder")
    trainer = make_trainer("nnUNetTrainerGEMINI", demo, env)
    trainer.initialize()
    net = trainer.network.state_dict()
    encoder = [k for k in net if k.startswith(("encoder.", "decoder.encoder."))]
    decoder = [k for k in net if k.startswith("decoder.") and k not in encoder and k.endswith("weight")]
    assert encoder and decoder
    assert all(torch.equal(net[k], ckpt["network_weights"][k]) for k in encoder)
    assert not any(torch.equal(net[k], ckpt["network_weights"][k]) for k in decoder)
    deformer = trainer.gemini_deformer.state_dict()
    assert not any(torch.equal(deformer[k], v) for k, v in ckpt["deformer_weights"].items() if k.endswith("weight"))
    assert "nnUNet_gemini_transfer = encoder (environment)" in _log_text(trainer)
    assert "encoder into the network's encoder (nnUNet_gemini_transfer=encoder: decoder and deformer" in \
        _log_text(trainer)
    trainer._log_weights_in_use()
    assert f"Network weights in use: gemini_pretrain checkpoint {path} (encoder only); deformer weights: random " \
        "initialisation" in _log_text(trainer)
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.trainers.options import read_env_options
    with pytest.raises(GeminiUserError, match="nnUNet_gemini_transfer='decoder' is not one of"):
        read_env_options({"nnUNet_gemini_transfer": "decoder"})


def test_continue_without_a_checkpoint_loads_the_pretraining_unless_switched_off(api_env, monkeypatch):
    """`--c` on a fold without a checkpoint is a fresh start (nnU-Net never calls load_checkpoint):
    the pre-training is loaded as on any fresh start (bug 3 of issue 13: it was skipped)."""
    import torch
    demo, env = api_env
    path, ckpt = write_fake_pretrain_checkpoint(demo, env)
    key = next(k for k in ckpt["network_weights"] if ".seg_layers." not in k and k.endswith("weight"))
    continued = make_trainer("nnUNetTrainerGEMINI", demo, env, continue_training=True)
    continued.initialize()
    assert torch.equal(continued.network.state_dict()[key], ckpt["network_weights"][key])
    assert continued.pretrained_source == path
    no_pretrain = make_trainer("nnUNetTrainerGEMINI_NoPretrain", demo, env, continue_training=True)
    no_pretrain.initialize()
    assert no_pretrain.pretrained_source is None
    monkeypatch.setenv("nnUNet_gemini_auto_pretrained", "0")
    switched_off = make_trainer("nnUNetTrainerGEMINI", demo, env, continue_training=True)
    switched_off.initialize()
    assert not torch.equal(switched_off.network.state_dict()[key], ckpt["network_weights"][key])
    assert "nnUNet_gemini_auto_pretrained=0" in _log_text(switched_off)


def test_cli_continue_on_a_fold_without_checkpoint_starts_from_the_pretraining(api_env):
    """The real `nnUNetv2_train ... all --c` (cluster scripts pass --c on every start) on an empty fold,
    with a pre-training present: nnU-Net starts a new training and the pre-training is loaded. With a
    tiny nnUNet_gemini_lr the trained network stays at the pre-trained weights (seg layers aside)."""
    import torch
    demo, env = api_env
    _, ckpt = write_fake_pretrain_checkpoint(demo, env, configuration="3d_fullres")
    env = dict(env, nnUNet_results=os.environ["nnUNet_results"], nnUNet_gemini_lr="1e-9",
               nnUNet_gemini_final_validation="0")
    proc = run_command(["nnUNetv2_train", str(demo.dataset_id), "3d_fullres", "all", "-tr", "nnUNetTrainerGEMINI",
                        "-device", "cpu", "--c"], env)
    assert "Cannot continue training" in proc.stdout  # nnU-Net's own fresh start
    fold_dir = os.path.join(env["nnUNet_results"], demo.dataset_name, "nnUNetTrainerGEMINI__nnUNetPlans__3d_fullres",
                            "fold_all")
    log = open(os.path.join(fold_dir, next(f for f in os.listdir(fold_dir) if f.startswith("training_log_")))).read()
    assert "Loaded the gemini_pretrain checkpoint" in log and "nnUNet_gemini_lr = 1e-09 (environment)" in log
    final = torch.load(os.path.join(fold_dir, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    backbone = [k for k in ckpt["network_weights"] if ".seg_layers." not in k]
    assert backbone and all(torch.allclose(final["network_weights"][k], ckpt["network_weights"][k], atol=1e-6)
                            for k in backbone)


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
    for continue_training in (False, True):  # --c on a fold without checkpoint is a fresh start too
        trainer = make_trainer("nnUNetTrainerGEMINIFinetune", demo, env, continue_training=continue_training)
        with pytest.raises(GeminiUserError, match=f"gemini_pretrain -d {demo.dataset_id}"):
            trainer.initialize()
    _, ckpt = write_fake_pretrain_checkpoint(demo, env)
    trainer = make_trainer("nnUNetTrainerGEMINIFinetune", demo, env)
    trainer.initialize()
    assert trainer.gemini_deformer is None and trainer.gemini_step is None  # supervised only
    assert trainer.deformer_optimizer is None
    assert len(trainer.optimizer.param_groups[0]["params"]) == len(list(trainer.network.parameters()))
    key = next(k for k in ckpt["network_weights"] if ".seg_layers." not in k)
    assert torch.equal(trainer.network.state_dict()[key], ckpt["network_weights"][key])


def test_progress_png_stays_nnunets_and_the_gemini_curves_get_their_own_file(tmp_path):
    """progress.png is nnU-Net's figure (its 3 panels, 30 x 54 inches at 100 dpi); the GEMINI terms,
    the folding fraction and the skipped updates go to progress_gemini.png."""
    from PIL import Image

    from nnunet_gemini.trainers.progress import GEMINI_LOG_KEYS, GEMINI_PROGRESS_PNG, GeminiLocalLogger
    logger = GeminiLocalLogger()
    for epoch in range(2):
        for key in ("mean_fg_dice", "train_losses", "val_losses", "lrs", *GEMINI_LOG_KEYS):
            logger.log(key, 0.5 + epoch, epoch)
        logger.log("ema_fg_dice", 0.5, epoch)
        logger.log("dice_per_class_or_region", [0.5], epoch)
        logger.log("epoch_start_timestamps", 10.0 * epoch, epoch)
        logger.log("epoch_end_timestamps", 10.0 * epoch + 3, epoch)
    logger.plot_progress_png(str(tmp_path))
    assert GEMINI_PROGRESS_PNG == "progress_gemini.png"
    assert Image.open(tmp_path / "progress.png").size == (3000, 5400)  # nnU-Net's figure, no fourth panel
    assert Image.open(tmp_path / GEMINI_PROGRESS_PNG).size == (3000, 3600)


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

    def changed(before, module):
        return [k for k, v in module.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]

    assert changed(net_before, trainer.network) and changed(deformer_before, trainer.gemini_deformer)
    assert np.isfinite(result["loss"]) and np.isfinite(result["gemini_total"]) and result["gemini_total"] > 0
    # two optimisers: nnU-Net's SGD over the network only, the deformer's own Adam
    assert [id(q) for q in trainer.optimizer.param_groups[0]["params"]] == [id(q) for q in trainer.network.parameters()]
    assert isinstance(trainer.deformer_optimizer, torch.optim.Adam)
    assert [id(q) for q in trainer.deformer_optimizer.param_groups[0]["params"]] == \
        [id(q) for q in trainer.gemini_deformer.parameters()]


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
    """The shared guard (nnunet_gemini.guarded_step): no backward, no step of either optimiser,
    counted and logged; nnUNet_gemini_max_nonfinite in a row stop the training."""
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.guarded_step import TEST_NONFINITE_ENV
    trainer = started_trainer
    trainer.guarded_step.limit = 2
    monkeypatch.setenv(TEST_NONFINITE_ENV, "0+")
    before, deformer_before = _state(trainer.network), _state(trainer.gemini_deformer)
    result = trainer.train_step(next(trainer.dataloader_train))
    assert np.isnan(result["gemini_total"]) and trainer.guarded_step.total == 1
    assert all((v == before[k]).all() for k, v in trainer.network.state_dict().items())  # no update
    assert all((v == deformer_before[k]).all() for k, v in trainer.gemini_deformer.state_dict().items())
    assert all(q.grad is None for q in [*trainer.network.parameters(), *trainer.gemini_deformer.parameters()])
    assert "non-finite loss at iteration 0 (supervised" in _log_text(trainer)
    with pytest.raises(GeminiUserError, match=r"training stopped: 2 non-finite losses in a row \(iterations 0\.\.1; "
                                              r"limit nnUNet_gemini_max_nonfinite=2\)"):
        trainer.train_step(next(trainer.dataloader_train))


def test_rampup_scales_the_gemini_term_per_iteration(started_trainer):
    """nnUNet_gemini_rampup R: d total / d gemini is weight * exp(-5 (1 - i / (R * total))^2), then weight."""
    import math
    trainer = started_trainer
    original, seen = trainer.gemini_step, {}

    def spy(*args):
        loss, logs = original(*args)
        loss.register_hook(lambda g: seen.__setitem__("d_total_d_gemini", float(g)))
        return loss, logs

    trainer.gemini_step = spy
    trainer.gemini_weight, trainer.gemini_rampup = 0.5, 0.4
    trainer.num_epochs, trainer.num_iterations_per_epoch = 10, 10  # 100 iterations: ramp-up over 40
    try:
        for iteration, factor in ((0, math.exp(-5.0)), (20, math.exp(-1.25)), (40, 1.0), (90, 1.0)):
            trainer.global_iteration = iteration
            trainer.train_step(next(trainer.dataloader_train))
            assert seen.pop("d_total_d_gemini") == pytest.approx(0.5 * factor, rel=1e-6)
    finally:
        trainer.gemini_step = original  # on_train_end saves the step's settings


def test_rampup_warmup_factors_and_their_options():
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.trainers.options import rampup_factor, read_env_options, warmup_factor
    assert [rampup_factor(i, 0.0, 100) for i in (0, 50)] == [1.0, 1.0]  # default: no ramp-up (as released)
    ramp = [rampup_factor(i, 0.1, 100) for i in range(12)]
    assert ramp[0] == pytest.approx(np.exp(-5)) and ramp[10:] == [1.0, 1.0]
    assert all(a < b for a, b in zip(ramp[:10], ramp[1:11]))  # strictly rising to the full weight
    assert rampup_factor(500, 0.1, 10000) == rampup_factor(5, 0.1, 100)  # a share: the same in a longer run
    assert [warmup_factor(i, 0.0, 100) for i in (0, 50)] == [1.0, 1.0]
    assert [warmup_factor(i, 0.1, 100) for i in (0, 4, 9, 10, 99)] == pytest.approx([0.1, 0.5, 1.0, 1.0, 1.0])
    options = read_env_options({"nnUNet_gemini_rampup": "0.25", "nnUNet_gemini_warmup": "0.05",
                                "nnUNet_gemini_lr": "3e-3", "nnUNet_gemini_deformer_lr": "2e-4"})
    assert (options.rampup, options.warmup, options.lr, options.deformer_lr) == (0.25, 0.05, 3e-3, 2e-4)
    defaults = read_env_options({})
    assert (defaults.rampup, defaults.warmup, defaults.lr, defaults.deformer_lr) == (0.0, 0.0, 1e-2, 1e-4)
    for var, raw, what in (("rampup", "1.5", "in \\[0, 1\\]"), ("warmup", "1", "in \\[0, 1\\)"),
                           ("lr", "0", "> 0"), ("deformer_lr", "-1e-4", "> 0"), ("deformer_lr", "nan", "> 0")):
        with pytest.raises(GeminiUserError, match=f"nnUNet_gemini_{var}='{raw}' must be .*{what}"):
            read_env_options({f"nnUNet_gemini_{var}": raw})
    with pytest.raises(GeminiUserError, match="nnUNet_gemini_rampup_epochs was replaced by nnUNet_gemini_rampup "
                                              "\\(a share of the run"):
        read_env_options({"nnUNet_gemini_rampup_epochs": "25"})


def test_gemini_weight_zero_is_refused_where_the_loss_trains_the_deformer(api_env, monkeypatch):
    from nnunet_gemini.errors import GeminiUserError
    demo, env = api_env
    monkeypatch.setenv("nnUNet_gemini_weight", "0")
    for name in ("nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI_NoPretrain"):
        with pytest.raises(GeminiUserError, match="nnUNet_gemini_weight=0 switches the GEMINI loss off.*"
                                                  "nnUNetTrainerGEMINIFinetune.*nnUNetTrainer"):
            make_trainer(name, demo, env)
    make_trainer("nnUNetTrainerGEMINIFinetune", demo, env)  # supervised only: the weight is unused


def test_deformer_learns_independently_of_the_gemini_weight(started_trainer):
    """Issue 13: with weights 1 and 0.1 the deformer moves alike over 5 steps (its Adam sees
    gradient / weight), the backbone's GEMINI gradient scales with the weight, and the grad
    scaler path (unscale both optimisers, step both) gives the deformer the same gradient."""
    import copy

    import torch
    trainer = started_trainer
    # the same labelled batches and pairs in every run (the loaders draw at random)
    batches = [next(trainer.dataloader_train) for _ in range(5)]
    pairs = [next(trainer.pair_loader) for _ in range(5)]
    start = copy.deepcopy({"net": trainer.network.state_dict(), "deformer": trainer.gemini_deformer.state_dict(),
                           "sgd": trainer.optimizer.state_dict(), "adam": trainer.deformer_optimizer.state_dict()})

    def reset(weight):
        trainer.network.load_state_dict(start["net"])
        trainer.gemini_deformer.load_state_dict(start["deformer"])
        trainer.optimizer.load_state_dict(start["sgd"])
        trainer.deformer_optimizer.load_state_dict(start["adam"])
        trainer.gemini_weight, trainer.global_iteration = weight, 0

    def run(steps):
        for i in range(steps):
            trainer.pair_loader = iter([pairs[i]])
            trainer.train_step(batches[i])

    moved = {}
    for weight in (1.0, 0.1):
        reset(weight)
        run(5)
        moved[weight] = float(torch.cat([(v - start["deformer"][k]).flatten() for k, v in
                                         trainer.gemini_deformer.state_dict().items() if v.is_floating_point()]).norm())
    assert moved[1.0] > 0 and moved[0.1] > 0
    assert 1 / 1.5 < moved[1.0] / moved[0.1] < 1.5, moved

    # one step, supervised loss off: the backbone's gradient is weight * d gemini, the deformer's is not
    loss, grads = trainer.loss, {}
    trainer.loss = lambda output, target: sum(o.sum() for o in output) * 0.0
    net_params, deformer_params = list(trainer.network.parameters()), list(trainer.gemini_deformer.parameters())
    pre_step = trainer.deformer_optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: grads.__setitem__("deformer", [q.grad.clone() for q in deformer_params]))
    try:
        for weight, scaler in ((1.0, None), (0.1, None), (0.1, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10))):
            reset(weight)
            trainer.grad_scaler = scaler
            raw = {}  # the network's gradients as backward computes them (before the clip)
            hooks = [q.register_hook(lambda g, i=i: raw.__setitem__(i, g.clone())) for i, q in enumerate(net_params)]
            run(1)
            for h in hooks:
                h.remove()
            scale = 2.0 ** 10 if scaler is not None else 1.0  # the scale this backward ran with
            grads[(weight, scaler is not None)] = (torch.cat([raw[i].flatten() for i in sorted(raw)]) / scale,
                                                   torch.cat([g.flatten() for g in grads.pop("deformer")]))
    finally:
        pre_step.remove()
        trainer.loss, trainer.grad_scaler = loss, None
    (net_1, deformer_1), (net_01, deformer_01) = grads[(1.0, False)], grads[(0.1, False)]
    net_amp, deformer_amp = grads[(0.1, True)]
    assert net_1.norm() > 0 and deformer_1.norm() > 0

    def close(a, b):  # float32 sums in another order: compare norm-relative
        return float((a - b).norm()) <= 1e-4 * float(b.norm())

    assert close(net_01, 0.1 * net_1) and close(net_amp, net_01)
    assert close(deformer_01, deformer_1) and close(deformer_amp, deformer_1)


def test_network_lr_option_and_per_iteration_warmup(api_env, monkeypatch):
    """nnUNet_gemini_lr is the network's initial SGD + poly lr; nnUNet_gemini_warmup scales it linearly
    per iteration, also in nnUNetTrainerGEMINIFinetune (nnU-Net's own train_step); both logged."""
    demo, env = api_env
    write_fake_pretrain_checkpoint(demo, env)
    for var, value in (("lr", "0.02"), ("warmup", "0.25"), ("num_epochs", "4"), ("iters_per_epoch", "2")):
        monkeypatch.setenv(f"nnUNet_gemini_{var}", value)  # 8 iterations: warm-up over 2
    for name in ("nnUNetTrainerGEMINIFinetune", "nnUNetTrainerGEMINI"):
        trainer = make_trainer(name, demo, env)
        trainer.on_train_start()
        try:
            trainer.on_train_epoch_start()
            assert trainer._poly_lr == pytest.approx(0.02)
            seen = []
            hook = trainer.optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
            outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(3)]
            hook.remove()
            assert seen == pytest.approx([0.01, 0.02, 0.02])
            trainer.on_train_epoch_end(outputs)
            log = _log_text(trainer)
            assert "nnUNet_gemini_lr = 0.02 (environment)" in log and "nnUNet_gemini_warmup = 0.25 (environment)" in log
            assert "network: SGD + poly from lr 0.02, linear warm-up over 2 of 8 iterations" in log
            assert "learning rate in use at the last iteration: network 0.02 (poly 0.02 x warm-up 1)" in log
            assert trainer.global_iteration == 3
        finally:
            trainer.on_train_end()


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

    def momentum(t):
        return [s["momentum_buffer"] for s in t.optimizer.state_dict()["state"].values()]

    assert len(momentum(resumed)) == len(momentum(trainer)) > 0
    assert len(resumed.optimizer.param_groups[0]["params"]) == len(list(trainer.network.parameters()))  # network only
    assert all(torch.equal(a, b) for a, b in zip(momentum(resumed), momentum(trainer)))
    # the deformer's Adam state round-trips (step counters and both moments)

    def adam(t):
        return t.deformer_optimizer.state_dict()["state"]

    assert len(adam(resumed)) == len(adam(trainer)) == len(list(trainer.gemini_deformer.parameters()))
    for k, state in adam(trainer).items():
        assert float(adam(resumed)[k]["step"]) == float(state["step"]) == 1.0
        assert torch.equal(adam(resumed)[k]["exp_avg"], state["exp_avg"])
        assert torch.equal(adam(resumed)[k]["exp_avg_sq"], state["exp_avg_sq"])
    assert resumed.logger.get_value("gemini_total", None) == trainer.logger.get_value("gemini_total", None)
    assert resumed.global_iteration == trainer.global_iteration == 1

    # prediction builds the network with the static method and loads network_weights strictly
    from nnunet_gemini.trainers import nnUNetTrainerGEMINI
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    plain = nnUNetTrainerGEMINI.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, False)
    plain.load_state_dict(ckpt["network_weights"], strict=True)


def test_checkpoint_from_before_the_deformer_optimizer_resumes(started_trainer, api_env, tmp_path):
    """A trainer checkpoint written before the deformer had an Adam of its own: one SGD state over
    network + deformer (network parameters first), no deformer optimiser state. --c / --val restore
    the network's SGD state, start a fresh deformer Adam, say so, and training goes on."""
    import torch

    from nnunet_gemini.checkpoints import atomic_torch_save
    demo, env = api_env
    trainer = started_trainer
    trainer.on_train_epoch_end([trainer.train_step(next(trainer.dataloader_train))])
    path = str(tmp_path / "checkpoint_latest.pth")
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    # what the old trainer saved: SGD over network + deformer, momentum for both
    network, deformer = list(trainer.network.parameters()), list(trainer.gemini_deformer.parameters())
    old_sgd = torch.optim.SGD(network + deformer, 0.01, weight_decay=3e-5, momentum=0.99, nesterov=True)
    for q in network:
        if q in trainer.optimizer.state:  # parameters without a gradient yet have no momentum
            old_sgd.state[q] = {"momentum_buffer": trainer.optimizer.state[q]["momentum_buffer"].clone()}
    for q in deformer:
        old_sgd.state[q] = {"momentum_buffer": torch.randn_like(q)}
    checkpoint["optimizer_state"] = old_sgd.state_dict()
    del checkpoint["gemini"]["deformer_optimizer_state"]
    atomic_torch_save(checkpoint, path)

    resumed = make_trainer("nnUNetTrainerGEMINI_NoPretrain", demo, env, continue_training=True)
    resumed.load_checkpoint(path)
    assert "written before the deformer had an optimiser of its own" in _log_text(resumed)
    assert len(resumed.optimizer.state) == len(trainer.optimizer.state) > 0
    for q, r in zip(network, resumed.network.parameters()):
        if q in trainer.optimizer.state:
            assert torch.equal(resumed.optimizer.state[r]["momentum_buffer"],
                               trainer.optimizer.state[q]["momentum_buffer"])
    assert not resumed.deformer_optimizer.state  # fresh Adam
    for k, v in trainer.gemini_deformer.state_dict().items():
        assert torch.equal(resumed.gemini_deformer.state_dict()[k], v)
    resumed.on_train_start()
    try:
        assert np.isfinite(resumed.train_step(next(resumed.dataloader_train))["gemini_total"])
        assert len(resumed.deformer_optimizer.state) == len(deformer)
    finally:
        resumed.on_train_end()


def test_continue_rebuilds_the_deformer_as_checkpointed(api_env, tmp_path, monkeypatch):
    """Bug 4 of issue 13: a `gemini_pretrain --deformation displacement --deformer_input images` start,
    trained by nnUNetTrainerGEMINI, resumes (--c) as displacement with the checkpoint's resolution,
    direction, integration steps and input (the file is read before initialize() builds the deformer);
    a contradicting nnUNet_gemini_deformation or nnUNet_gemini_deformer_input is refused, on --c and on
    a start that would load the pre-trained deformer (a fresh deformer, transfer=encoder, may differ)."""
    import torch

    from nnunet_gemini.checkpoints import atomic_torch_save
    from nnunet_gemini.errors import GeminiUserError
    demo, env = api_env
    run_command([sys.executable, "-m", "nnunet_gemini.pretraining.run_pretraining", "-d", str(demo.dataset_id),
                 "-c", "2d", "-device", "cpu", "--epochs", "1", "--iters_per_epoch", "1", "-np", "1",
                 "--deformation", "displacement", "--deformer_input", "images"],
                dict(env, nnUNet_results=os.environ["nnUNet_results"]))
    trainer = make_trainer("nnUNetTrainerGEMINI", demo, env)
    trainer.on_train_start()
    try:
        assert trainer.pretrained_deformer_source and trainer.gemini_step.spec() == {
            "deformation": "displacement", "resolution": "half", "bidirectional": True, "integration_steps": 7,
            "input": "images"}
        assert trainer.gemini_deformer.enc0[0].in_channels == 2 * trainer.num_input_channels
        assert "integration steps, sees the images" in _log_text(trainer)
        trainer.on_train_epoch_end([trainer.train_step(next(trainer.dataloader_train))])
        path = str(tmp_path / "checkpoint_latest.pth")
        trainer.save_checkpoint(path)
    finally:
        trainer.on_train_end()
    resumed = make_trainer("nnUNetTrainerGEMINI", demo, env, continue_training=True)
    resumed.load_checkpoint(path)
    assert resumed.gemini_step.spec() == trainer.gemini_step.spec()
    for k, v in trainer.gemini_deformer.state_dict().items():
        assert torch.equal(resumed.gemini_deformer.state_dict()[k], v)
    # every field of the spec is read back, not only the deformation model
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["gemini"]["deformer"].update(resolution="full", integration_steps=5)
    atomic_torch_save(checkpoint, path)
    resumed = make_trainer("nnUNetTrainerGEMINI", demo, env, continue_training=True)
    resumed.load_checkpoint(path)
    assert resumed.gemini_step.spec() == {"deformation": "displacement", "resolution": "full", "bidirectional": True,
                                          "integration_steps": 5, "input": "images"}
    monkeypatch.setenv("nnUNet_gemini_deformer_input", "features")
    with pytest.raises(GeminiUserError, match="sees the images, but nnUNet_gemini_deformer_input=features.*--c / "
                                              "--val rebuild the deformer as checkpointed"):
        make_trainer("nnUNetTrainerGEMINI", demo, env, continue_training=True).load_checkpoint(path)
    with pytest.raises(GeminiUserError, match="sees the images, but nnUNet_gemini_deformer_input=features.*"
                                              "gemini_pretrain --deformer_input features"):
        make_trainer("nnUNetTrainerGEMINI", demo, env).initialize()
    monkeypatch.setenv("nnUNet_gemini_transfer", "encoder")  # a fresh deformer: it may see what the run asks
    fresh = make_trainer("nnUNetTrainerGEMINI", demo, env)
    fresh.initialize()
    assert fresh.gemini_step.spec()["input"] == "features" and fresh.pretrained_deformer_source is None
    monkeypatch.delenv("nnUNet_gemini_transfer")
    monkeypatch.delenv("nnUNet_gemini_deformer_input")
    monkeypatch.setenv("nnUNet_gemini_deformation", "diffeomorphic")
    with pytest.raises(GeminiUserError, match="trained with deformation 'displacement', but nnUNet_gemini_"
                                              "deformation=diffeomorphic.*unset nnUNet_gemini_deformation"):
        make_trainer("nnUNetTrainerGEMINI", demo, env, continue_training=True).load_checkpoint(path)


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
def test_ddp_two_cpu_processes_keep_network_and_deformer_identical(demo_copy, tmp_path):
    """-num_gpus 2 runs nnU-Net's DDP path; here the same trainer code on 2 CPU processes (gloo).
    The ranks start from different random states on purpose: the deformer (outside DDP) must be
    made identical by the trainer itself and stay so (gradients averaged by hand), like the network."""
    import torch
    from nnunetv2.run.run_training import find_free_network_port
    demo, env = demo_copy
    env = dict(env, nnUNet_results=str(tmp_path / "results"), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(find_free_network_port()), WORLD_SIZE="2", nnUNet_gemini_final_validation="0",
               nnUNet_gemini_unlabeled_batch="2", nnUNet_compile="0")
    pool = os.path.join(env["nnUNet_preprocessed"], demo.dataset_name, "nnUNetPlans_3d_fullres_gemini_unlabeled")
    shutil.rmtree(pool, ignore_errors=True)  # built on first use: by rank 0 alone, the other rank waits
    worker = os.path.join(os.path.dirname(__file__), "ddp_trainer_worker.py")
    args = [sys.executable, worker, str(demo.dataset_id), "3d_fullres", "nnUNetTrainerGEMINI_NoPretrain", str(tmp_path)]
    procs = [subprocess.Popen(args, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
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
