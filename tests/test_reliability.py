"""Issue 7, reliability: every bad input is an ERROR, a WARN or OK, every injected fault loses
nothing, and our loaders are safe.

RELIABILITY_TABLE lists every item of the issue with its class and the test that covers it; a
row either points at a test in this file or at a precise test elsewhere, and
test_every_item_has_an_existing_test fails when such a test is renamed or removed. The ERROR and
WARN rows of gemini_pretrain run through its CLI entry point in this process (exit status and
the stderr line a user sees), on a private copy of the shared planned demo.
"""
import ast
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np
import pytest
import SimpleITK as sitk
from helpers import DEMO_ID, REPO_ROOT, private_demo_copy

TESTS = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "nnunet_gemini.pretraining.run_pretraining"]
PRETRAIN_DIR = ("GEMINIPretrain__nnUNetPlans__3d_fullres", "fold_all")
ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pooled_root(planned_demo, tmp_path_factory):
    """A copy of the planned demo with its unlabelled pool preprocessed (read-only). Copies of it
    rebuild their pool (the manifest records absolute source paths); its case ids are the baseline
    that no failed run may add to."""
    root = str(tmp_path_factory.mktemp("reliability"))
    private_demo_copy(planned_demo, root)
    with pytest.MonkeyPatch.context() as mp:
        _export(mp, root)
        from nnunet_gemini import unlabeled
        unlabeled.preprocess_pool(planned_demo.dataset_name)
    return root


@dataclass
class Env:
    root: str
    name: str

    def raw(self, *parts):
        return os.path.join(self.root, "raw", self.name, *parts)

    def preprocessed(self, *parts):
        return os.path.join(self.root, "preprocessed", self.name, *parts)

    def out(self):
        return os.path.join(self.root, "results", self.name, *PRETRAIN_DIR)


def _export(monkeypatch, root):
    for var, sub in zip(ENV_VARS, ("raw", "preprocessed", "results")):
        monkeypatch.setenv(var, os.path.join(root, sub))
    monkeypatch.setenv("nnUNet_def_n_proc", "1")
    monkeypatch.setenv("nnUNet_n_proc_DA", "0")


@pytest.fixture
def env(pooled_root, planned_demo, tmp_path, monkeypatch) -> Env:
    """A private, modifiable copy of pooled_root, exported to this process."""
    root = str(tmp_path / "env")
    shutil.copytree(pooled_root, root)
    _export(monkeypatch, root)
    return Env(root, planned_demo.dataset_name)


def run_cli(argv, capsys) -> Tuple[int, str, str]:
    """gemini_pretrain in this process: (exit status, stdout, stderr)."""
    from nnunet_gemini.pretraining.run_pretraining import main
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


TINY = ["-device", "cpu", "--epochs", "1", "--iters_per_epoch", "1", "-np", "1"]


def write_image(array, path, spacing=(2.0, 1.0, 1.0)):
    img = sitk.GetImageFromArray(np.asarray(array, np.float32))
    img.SetSpacing(tuple(reversed(spacing))[:array.ndim])
    sitk.WriteImage(img, path)


def a_train_image(e: Env) -> str:
    return sorted(glob.glob(e.raw("imagesTr", "*_0000.nii.gz")))[0]


def two_channel_dataset(e: Env) -> None:
    """dataset.json asks for two channels; imagesTr / imagesUnlabeled are emptied."""
    path = e.raw("dataset.json")
    dataset_json = json.load(open(path))
    dataset_json["channel_names"] = {"0": "MR", "1": "PET"}
    json.dump(dataset_json, open(path, "w"))
    for sub in ("imagesTr", "imagesUnlabeled"):
        shutil.rmtree(e.raw(sub))


def pool_manifest(e: Env) -> dict:
    from nnunet_gemini.unlabeled import MANIFEST_NAME, POOL_SUFFIX
    return json.load(open(e.preprocessed("nnUNetPlans_3d_fullres" + POOL_SUFFIX, MANIFEST_NAME)))


# --------------------------------------------------------------------- ERROR: the table itself
@dataclass
class ErrorCase:
    """A bad input of gemini_pretrain: `setup` changes the copy and returns extra CLI args; the
    run must exit 2 with `ERROR:` and every fragment (problem and fix; {placeholders} filled)."""
    setup: Callable[[Env, str], List[str]]
    fragments: Tuple[str, ...]
    train: bool = False  # past --preprocess_only (checks that run before training)


def _as_is(e, tmp):
    return []


def _unplanned(e, tmp):
    shutil.rmtree(e.preprocessed())
    return []


def _not_preprocessed(e, tmp):
    shutil.rmtree(e.preprocessed("nnUNetPlans_3d_fullres"))
    return []


def _no_images(e, tmp):
    shutil.rmtree(e.raw("imagesTr"))
    shutil.rmtree(e.raw("imagesUnlabeled"))
    return []


def _named(name):
    def setup(e, tmp):
        shutil.copy(a_train_image(e), e.raw("imagesUnlabeled", name))
        return []
    return setup


def _missing_channel(e, tmp):
    two_channel_dataset(e)
    d = os.path.join(tmp, "two")
    os.makedirs(d)
    write_image(np.ones((8, 9, 10)), os.path.join(d, "x_0000.nii.gz"))
    write_image(np.ones((8, 9, 10)), os.path.join(d, "x_0001.nii.gz"))
    write_image(np.ones((8, 9, 10)), os.path.join(d, "y_0000.nii.gz"))
    return ["--unlabeled_dir", d]


def _channel_geometry(e, tmp):
    two_channel_dataset(e)
    d = os.path.join(tmp, "geom")
    os.makedirs(d)
    write_image(np.ones((8, 9, 10)), os.path.join(d, "m_0000.nii.gz"))
    write_image(np.ones((8, 9, 10)), os.path.join(d, "m_0001.nii.gz"), spacing=(1.0, 1.0, 1.0))
    return ["--unlabeled_dir", d]


def _image_2d(e, tmp):
    write_image(np.ones((32, 32)) * 5, e.raw("imagesUnlabeled", "flat_0000.nii.gz"), spacing=(1.0, 1.0))
    return []


def _blocked_output(e, tmp):
    blocker = os.path.join(tmp, "a_file")
    open(blocker, "w").close()
    return ["-o", os.path.join(blocker, "out")]


def _checkpoint_file(content):
    def setup(e, tmp):
        out = os.path.join(tmp, "out")
        os.makedirs(out)
        path = os.path.join(out, "checkpoint_latest.pth")
        if isinstance(content, bytes):
            open(path, "wb").write(content)
        else:
            import torch
            torch.save(content, path)
        return ["-o", out, "--c"]
    return setup


FIX_D = "pass -d with an existing dataset id or name"
ERROR_CASES = {
    "dataset id not found": (["-d", "999"], ErrorCase(_as_is, ("dataset '999' not found", FIX_D))),
    "dataset name not found": (["-d", "Dataset987_Typo"],
                               ErrorCase(_as_is, ("dataset 'Dataset987_Typo' not found", FIX_D))),
    "dataset not planned": (None, ErrorCase(_unplanned, ("{name} is not planned",
                                                         f"nnUNetv2_plan_and_preprocess -d {DEMO_ID}"))),
    "plans not found": (["-p", "OtherPlans"], ErrorCase(_as_is, ("not planned with plans 'OtherPlans'",
                                                                 "OtherPlans.json missing",
                                                                 "-overwrite_plans_name OtherPlans"))),
    "configuration not in the plans": (["-c", "3d_lowres"], ErrorCase(_as_is, (
        "configuration '3d_lowres' not in plans", "choose one of 2d, 3d_fullres"))),
    "not preprocessed for the configuration": (None, ErrorCase(_not_preprocessed, (
        "not preprocessed for configuration '3d_fullres'",
        f"nnUNetv2_preprocess -d {DEMO_ID} -plans_name nnUNetPlans -c 3d_fullres"))),
    "no unlabelled images at all": (None, ErrorCase(_no_images, ("no unlabelled images",
                                                                 "--unlabeled_dir DIR"))),
    "wrong channel suffix": (None, ErrorCase(_named("bad_0001.nii.gz"), (
        "{raw}/imagesUnlabeled/bad_0001.nii.gz has channel suffix _0001", "name it CASE_XXXX.nii.gz"))),
    "no channel suffix": (None, ErrorCase(_named("bad.nii.gz"), (
        "{raw}/imagesUnlabeled/bad.nii.gz has no channel suffix", "name it CASE_XXXX.nii.gz"))),
    "wrong file ending": (None, ErrorCase(_named("bad_0000.nii"), (
        "{raw}/imagesUnlabeled/bad_0000.nii has the wrong file ending", "name it CASE_XXXX.nii.gz"))),
    "missing channel": (None, ErrorCase(_missing_channel, ("case 'y'", "misses channel file(s) y_0001.nii.gz",
                                                           "every case needs CASE_XXXX.nii.gz"))),
    "channels with different geometry": (None, ErrorCase(_channel_geometry, (
        "channels of case 'm' differ in geometry", "m_0001.nii.gz has shape", "Resample the channels"))),
    "2D image in a 3D dataset": (None, ErrorCase(_image_2d, (
        "{raw}/imagesUnlabeled/flat_0000.nii.gz is a 2D image", "convert it to a 3D volume"))),
    "unwritable results folder": (None, ErrorCase(_blocked_output, (
        "is not writable", "choose another folder with -o"), train=True)),
    "--c on a corrupt checkpoint": (None, ErrorCase(_checkpoint_file(b"\x00not torch at all"), (
        "checkpoint_latest.pth is not a readable nnunet-gemini checkpoint", "Re-run the step"), train=True)),
    "--c on a file that is not our checkpoint": (None, ErrorCase(_checkpoint_file({"state": [1, 2]}), (
        "checkpoint_latest.pth is not an nnunet-gemini 'gemini_pretrain' checkpoint",
        "Point to a file written by nnunet-gemini"), train=True)),
}


@pytest.mark.parametrize("item", list(ERROR_CASES))
def test_bad_input_is_an_error_naming_it_and_the_fix(item, env, tmp_path, capsys):
    cli_args, case = ERROR_CASES[item]
    extra = case.setup(env, str(tmp_path))
    pool_before = pool_manifest(env)["cases"] if os.path.isdir(env.preprocessed()) else None
    mode = TINY if case.train else ["--preprocess_only", "-np", "1"]
    args = list(cli_args or []) + mode + extra
    rc, out, err = run_cli(args if "-d" in args else ["-d", DEMO_ID] + args, capsys)
    assert rc == 2, (out, err)
    assert err.startswith("ERROR: "), err
    for fragment in case.fragments:
        assert fragment.format(name=env.name, raw=env.raw()) in err, (fragment, err)
    # nothing a later run would take for complete: no final checkpoint; the pool manifest lists
    # no new case (cases whose images the setup removed may leave it), each with all its files
    assert not os.path.exists(os.path.join(env.out(), "checkpoint_final.pth"))
    if pool_before is not None and os.path.isdir(env.preprocessed()):
        from nnunet_gemini.unlabeled import POOL_SUFFIX, _case_files
        listed = pool_manifest(env)["cases"]
        assert {c["case_id"] for c in listed} <= {c["case_id"] for c in pool_before}
        pool = env.preprocessed("nnUNetPlans_3d_fullres" + POOL_SUFFIX)
        assert all(os.path.isfile(f) for c in listed for f in _case_files(pool, c["case_id"]))


def test_too_little_free_disk_is_an_error_before_training(env, tmp_path, capsys, monkeypatch):
    from nnunet_gemini import checkpoints
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12 - 4096, 4096))
    out = str(tmp_path / "out")
    rc, stdout, err = run_cli(["-d", DEMO_ID, *TINY, "-o", out], capsys)
    assert rc == 2 and f"ERROR: not enough free disk in {out}: 0.0 MiB free" in err, err
    assert "Free space or choose another folder with -o" in err
    assert "Epoch 0" not in stdout and not glob.glob(os.path.join(out, "*.pth"))


def test_trainer_checks_room_for_a_checkpoint_before_training(tmp_path, monkeypatch):
    """nnUNetTrainerGEMINI.on_train_start calls this before the first epoch."""
    import torch

    from nnunet_gemini import checkpoints
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.trainers.nnUNetTrainerGEMINI import nnUNetTrainerGEMINI

    class Stub:  # the attributes the check reads
        local_rank, disable_checkpointing, output_folder = 0, False, str(tmp_path / "fold_0")
        gemini_deformer = torch.nn.Conv3d(1, 3, 1)
        _plain_network = staticmethod(lambda: torch.nn.Linear(1000, 1000))
    nnUNetTrainerGEMINI._check_room_for_a_checkpoint(Stub())  # plenty of room: passes
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: usage(10 ** 12, 10 ** 12, 2 ** 20))
    with pytest.raises(GeminiUserError, match=r"not enough free disk in .*fold_0.*needs about 16\.3 MiB.*"
                                              r"export nnUNet_results to another folder"):
        nnUNetTrainerGEMINI._check_room_for_a_checkpoint(Stub())


# ------------------------------------------------------------------------------------------ WARN
def _truncate(e: Env) -> str:
    data = open(a_train_image(e), "rb").read()
    path = e.raw("imagesUnlabeled", "trunc_0000.nii.gz")
    open(path, "wb").write(data[: len(data) // 2])
    return path


def test_truncated_image_is_warned_skipped_and_counted_strict_makes_it_an_error(env, capsys):
    path = _truncate(env)
    before = pool_manifest(env)["cases"]
    rc, out, err = run_cli(["-d", DEMO_ID, "--preprocess_only", "-np", "1"], capsys)
    assert rc == 0
    assert f"WARNING: {path} is unreadable or truncated" in err and "skipping pool case 'trunc'" in err
    assert f"1 of {len(before) + 1} pool case(s) skipped: trunc." in err
    assert f"unlabelled pool: {len(before)} case(s)" in out and "1 skipped)" in out  # counted
    assert [c["case_id"] for c in pool_manifest(env)["cases"]] == [c["case_id"] for c in before]
    rc, out, err = run_cli(["-d", DEMO_ID, "--preprocess_only", "-np", "1", "--strict"], capsys)
    assert rc == 2 and f"ERROR: {path} is unreadable or truncated" in err and "drop --strict" in err


# -------------------------------------------------------------------------------------------- OK
def test_constant_and_smaller_than_patch_images_train_with_finite_values(env):
    """A constant image and one smaller than the patch: preprocessed finite (z-score of a constant
    is 0, not NaN), padded to the patch by the pair loader, and a full pre-training step on the
    pair (NCC, cosine, smoothness, restoration) is finite and updates the weights."""
    import torch

    from nnunet_gemini import unlabeled
    from nnunet_gemini.pairs import make_pair_loader
    from nnunet_gemini.pretraining.pretrainer import GeminiPretrainer, PretrainOptions

    write_image(np.full((24, 32, 32), 300.0), env.raw("imagesUnlabeled", "const_0000.nii.gz"))
    write_image(np.random.default_rng(0).normal(100, 20, (6, 7, 9)), env.raw("imagesUnlabeled", "small_0000.nii.gz"))
    summary = unlabeled.preprocess_pool(env.name)
    assert {"const", "small"} <= set(summary.processed) and not summary.skipped
    dataset = unlabeled.load_pool_dataset(summary.folder, ["const", "small"])
    for case in ("const", "small"):
        data = np.asarray(dataset.load_case(case)[0])
        assert np.isfinite(data).all(), case
    assert np.asarray(dataset.load_case("const")[0]).std() == 0
    small_shape = np.asarray(dataset.load_case("small")[0]).shape[1:]

    options = PretrainOptions(dataset=env.name, device="cpu", output_dir=os.path.join(env.root, "api"),
                              patch_size=[16, 16, 16], restoration_mode="joint")
    trainer = GeminiPretrainer(options)
    trainer.build()
    trainer.damage_generator = torch.Generator().manual_seed(0)
    assert any(s < 16 for s in small_shape), small_shape  # really smaller than the patch
    np.random.seed(0)
    loader = make_pair_loader(dataset, 1, (16, 16, 16), spatial_augmentation=False, mirror_axes=None,
                              intensity_augmentation=False)
    batch = next(loader)
    assert batch["a"].shape == (1, 1, 16, 16, 16) == batch["b"].shape
    before = [p.detach().clone() for p in trainer.trained_parameters]
    values = trainer.train_step(batch)
    assert values and all(np.isfinite(v) for v in values.values()), values
    assert trainer.guarded_step.total == 0
    assert any(not torch.equal(p, q) for p, q in zip(before, trainer.trained_parameters))
    trainer.model.tap.close()


# ---------------------------------------------------------------------------------------- faults
def test_nonfinite_losses_stop_the_cli_with_a_message_and_no_final_checkpoint(env, capsys, monkeypatch):
    monkeypatch.setenv("GEMINI_TEST_NONFINITE_ITERS", "0+")
    rc, out, err = run_cli(["-d", DEMO_ID, *TINY, "--iters_per_epoch", "3", "--max_nonfinite", "2"], capsys)
    assert rc == 2 and "ERROR: training stopped: 2 non-finite losses in a row (iterations 0..1; limit " \
                       "--max_nonfinite=2)" in err, err
    assert "raise --max_nonfinite; resume with --c (the last good state is " in err
    assert "non-finite loss at iteration 0" in out and "non-finite loss at iteration 1" in out
    assert not glob.glob(os.path.join(env.out(), "checkpoint_*.pth"))


def test_sigkill_between_epochs_then_c_resumes_at_the_saved_epoch(env, tmp_path):
    """A real SIGKILL of gemini_pretrain, no timing race: the kill comes once the log shows that
    epoch 1 started (so checkpoint_latest.pth of epoch 1 is on disk, --save_every 1); whatever
    epoch the process reached, --c must resume at the epoch of that checkpoint and finish."""
    import torch
    from helpers import nnunet_env_dict
    sub_env = nnunet_env_dict(env.root, nnUNet_n_proc_DA="0", PYTHONUNBUFFERED="1")
    epochs = 3
    args = CLI + ["-d", str(DEMO_ID), *TINY, "--epochs", str(epochs), "--save_every", "1",
                  "--example_every", "100"]
    out = env.out()
    with open(tmp_path / "killed.txt", "w") as console:
        proc = subprocess.Popen(args, env=sub_env, stdout=console, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        log_text = ""
        while proc.poll() is None and "Epoch 1" not in log_text:
            time.sleep(0.2)
            logs = glob.glob(os.path.join(out, "training_log_*.txt"))
            log_text = open(logs[0]).read() if logs else ""
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, open(tmp_path / "killed.txt").read()[-3000:]
    killed_log = open(glob.glob(os.path.join(out, "training_log_*.txt"))[0]).read()
    assert not os.path.exists(os.path.join(out, "checkpoint_final.pth"))  # nothing looks finished
    saved = torch.load(os.path.join(out, "checkpoint_latest.pth"), map_location="cpu", weights_only=True)
    k = saved["epoch"]
    assert 1 <= k < epochs
    # at most one save interval (1 epoch) lost: epochs the killed run completed minus those saved
    completed = sum("epoch_time_s" in line for line in killed_log.splitlines())
    assert 0 <= completed - k <= 1, (completed, k)

    resumed = subprocess.run(args + ["--c"], env=sub_env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"checkpoint_latest.pth: {k} epoch(s), {k} iteration(s) done." in resumed.stdout
    resumed_epochs = [int(line.rsplit("Epoch ", 1)[1]) for line in resumed.stdout.splitlines()
                      if ": Epoch " in line]
    assert resumed_epochs == list(range(k, epochs))
    final = torch.load(os.path.join(out, "checkpoint_final.pth"), map_location="cpu", weights_only=True)
    assert final["epoch"] == epochs and final["iteration"] == epochs
    assert len(final["logging"]["epochs"]["loss"]) == epochs


# ------------------------------------------------------------------------------------ safe loading
LIBRARY_DIRS = ("nnunet_gemini", "pretraining", "trainers")


def test_no_shell_true_and_no_os_system_in_the_library():
    """User strings (paths, dataset names) never reach a shell: subprocesses get argument lists."""
    offenders = []
    for d in LIBRARY_DIRS:
        for path in glob.glob(os.path.join(REPO_ROOT, d, "**", "*.py"), recursive=True):
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if not isinstance(node, ast.Call):
                    continue
                func = ast.unparse(node.func)
                if func in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                    offenders.append(f"{path}:{node.lineno} {func}")
                for kw in node.keywords:
                    if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                        offenders.append(f"{path}:{node.lineno} shell=")
    assert offenders == []


def test_every_torch_load_in_the_library_is_weights_only():
    offenders = []
    for d in LIBRARY_DIRS:
        for path in glob.glob(os.path.join(REPO_ROOT, d, "**", "*.py"), recursive=True):
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                    kw = {k.arg: k.value for k in node.keywords}
                    if not (isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True):
                        offenders.append(f"{path}:{node.lineno}")
    assert offenders == []


# -------------------------------------------------------------------------- the reliability table
Row = namedtuple("Row", "item klass covered_by")
HERE = "test_reliability.py"
_E = "test_bad_input_is_an_error_naming_it_and_the_fix"


def _here(test, param=None):
    return f"{HERE}::{test}" + (f"[{param}]" if param else "")


RELIABILITY_TABLE = [
    Row("dataset ID not found", "ERROR", _here(_E, "dataset id not found")),
    Row("dataset name not found", "ERROR", _here(_E, "dataset name not found")),
    Row("dataset not planned", "ERROR", _here(_E, "dataset not planned")),
    Row("plans not found", "ERROR", _here(_E, "plans not found")),
    Row("configuration not in the plans", "ERROR", _here(_E, "configuration not in the plans")),
    Row("dataset not preprocessed for the configuration", "ERROR",
        _here(_E, "not preprocessed for the configuration")),
    Row("no unlabelled images at all", "ERROR", _here(_E, "no unlabelled images at all")),
    Row("unlabelled file with a wrong channel suffix", "ERROR", _here(_E, "wrong channel suffix")),
    Row("unlabelled file without a channel suffix", "ERROR", _here(_E, "no channel suffix")),
    Row("unlabelled file with a wrong file ending", "ERROR", _here(_E, "wrong file ending")),
    Row("unlabelled case with a missing channel", "ERROR", _here(_E, "missing channel")),
    Row("channels of one case with different geometry", "ERROR", _here(_E, "channels with different geometry")),
    Row("2D image in a 3D dataset", "ERROR", _here(_E, "2D image in a 3D dataset")),
    Row("pre-trained checkpoint of another architecture", "ERROR",
        "test_checkpoints.py::test_incompatible_network_is_error"),
    Row("pre-trained checkpoint with other architecture settings (arch kwargs)", "ERROR",
        "test_checkpoints.py::test_different_arch_kwargs_is_error"),
    Row("pre-trained checkpoint with another channel count or normalisation", "ERROR",
        "test_pretrain.py::test_apply_pretrained_loads_all_but_seg_layers_and_checks_compatibility"),
    Row("incompatible pre-trained checkpoint found by the trainer", "ERROR",
        "test_trainers.py::test_incompatible_pretrained_checkpoint_is_refused_naming_both"),
    Row("pre-trained checkpoint with other spacing or patch size", "WARN",
        "test_checkpoints.py::test_spacing_and_patch_differences_are_warnings"),
    Row("corrupt or truncated checkpoint", "ERROR", "test_checkpoints.py::test_corrupt_files_are_user_errors"),
    Row("a torch file that is not our checkpoint", "ERROR",
        "test_checkpoints.py::test_other_torch_files_are_not_our_checkpoint"),
    Row("gemini_pretrain --c on a corrupt checkpoint", "ERROR", _here(_E, "--c on a corrupt checkpoint")),
    Row("gemini_pretrain --c on a file that is not our checkpoint", "ERROR",
        _here(_E, "--c on a file that is not our checkpoint")),
    Row("gemini_pretrain --c with another --iters_per_epoch than the checkpoint's", "ERROR",
        "test_pretrain.py::test_resume_continues_at_the_right_epoch_with_optimizer_state"),
    Row("gemini_pretrain --c with other recipe flags (lr, loss weights, batch size) than the checkpoint's", "WARN",
        "test_pretrain.py::test_resume_continues_at_the_right_epoch_with_optimizer_state"),
    Row("unwritable results folder (gemini_pretrain -o)", "ERROR", _here(_E, "unwritable results folder")),
    Row("too little free disk for one checkpoint (gemini_pretrain)", "ERROR",
        _here("test_too_little_free_disk_is_an_error_before_training")),
    Row("unwritable folder / too little free disk (nnUNetTrainerGEMINI)", "ERROR",
        _here("test_trainer_checks_room_for_a_checkpoint_before_training")),
    Row("unreadable or truncated image in the pool", "WARN",
        _here("test_truncated_image_is_warned_skipped_and_counted_strict_makes_it_an_error")),
    Row("NaN or Inf voxels", "WARN", "test_unlabeled.py::test_nan_and_truncated_images_are_warned_and_skipped"),
    Row("--strict turns NaN / unreadable into errors", "ERROR",
        "test_unlabeled.py::test_strict_turns_skips_into_errors"),
    Row("constant image", "OK", _here("test_constant_and_smaller_than_patch_images_train_with_finite_values")),
    Row("constant image in NCC / Models Genesis damage", "OK",
        "test_losses.py::test_constant_images_give_documented_value_and_finite_gradients"),
    Row("image smaller than the patch", "OK",
        _here("test_constant_and_smaller_than_patch_images_train_with_finite_values")),
    Row("pool image replaced in place, or nnUNet_raw moved, after the pool was built", "OK",
        "test_unlabeled.py::test_moved_raw_folder_redoes_nothing_and_a_replaced_image_is_redone"),
    Row("a crash while preprocessing the pool leaves no case counted as done", "FAULT",
        "test_unlabeled.py::test_partial_case_not_in_manifest_is_redone"),
    Row("killed while saving a checkpoint (GEMINI_TEST_ABORT_AFTER_TMP_WRITE)", "FAULT",
        "test_checkpoints.py::test_injected_abort_keeps_previous_checkpoint"),
    Row("a failing save leaves no temporary file", "FAULT",
        "test_checkpoints.py::test_failed_save_removes_its_temporary_file"),
    Row("SIGKILL between epochs, then --c", "FAULT",
        _here("test_sigkill_between_epochs_then_c_resumes_at_the_saved_epoch")),
    Row("--c restores the optimizer state and the epoch", "FAULT",
        "test_pretrain.py::test_resume_continues_at_the_right_epoch_with_optimizer_state"),
    Row("non-finite loss, pre-training (GEMINI_TEST_NONFINITE_ITERS)", "FAULT",
        "test_pretrain.py::test_nonfinite_loss_skips_the_update_then_stops"),
    Row("non-finite losses in a row stop gemini_pretrain", "FAULT",
        _here("test_nonfinite_losses_stop_the_cli_with_a_message_and_no_final_checkpoint")),
    Row("-num_gpus that does not divide the plans' batch size (nnU-Net's batch Dice under DDP)", "ERROR",
        "test_trainers.py::test_uneven_ddp_batch_split_is_refused_with_the_fix"),
    Row("non-finite loss, trainer (GEMINI_TEST_NONFINITE_ITERS)", "FAULT",
        "test_trainers.py::test_nonfinite_loss_skips_the_update_then_stops"),
    Row("non-finite loss on one DDP rank only: all ranks skip together", "FAULT",
        "test_guarded_step.py::test_all_ranks_skip_together_when_one_rank_is_nonfinite"),
    Row("our checkpoints load with weights_only=True", "SAFE",
        "test_checkpoints.py::test_atomic_save_and_weights_only_load"),
    Row("every torch.load of the library is weights_only=True", "SAFE",
        _here("test_every_torch_load_in_the_library_is_weights_only")),
    Row("nnU-Net trainer checkpoint: weights_only + numpy allow-list", "SAFE",
        "test_checkpoints.py::test_nnunet_trainer_checkpoint_loads_with_weights_only"),
    Row("nnU-Net trainer checkpoint with arbitrary objects is refused", "SAFE",
        "test_checkpoints.py::test_nnunet_loader_rejects_arbitrary_objects"),
    Row("no shell=True with user strings", "SAFE", _here("test_no_shell_true_and_no_os_system_in_the_library")),
    Row("nnUNet_gemini_weight=0 for a trainer with the GEMINI loss", "ERROR",
        "test_trainers.py::test_gemini_weight_zero_is_refused_where_the_loss_trains_the_deformer"),
    Row("the removed nnUNet_gemini_rampup_epochs is set", "ERROR",
        "test_trainers.py::test_rampup_warmup_factors_and_their_options"),
    Row("--c with nnUNet_gemini_deformation contradicting the trainer checkpoint", "ERROR",
        "test_trainers.py::test_continue_rebuilds_the_deformer_as_checkpointed"),
    Row("gemini_register with network weights that do not fit (shape or missing)", "ERROR",
        "test_register.py::test_weights_that_do_not_fit_the_network_are_refused_naming_the_file_and_the_fix"),
    Row("gemini_register --deformation contradicting the trainer checkpoint", "ERROR",
        "test_register.py::test_trainer_results_are_rebuilt_from_their_spec"),
    Row("--c on a fold without a checkpoint is a fresh start (pre-training loaded)", "OK",
        "test_trainers.py::test_cli_continue_on_a_fold_without_checkpoint_starts_from_the_pretraining"),
    Row("trainer checkpoint from before the deformer's own optimiser, then --c / --val", "OK",
        "test_trainers.py::test_checkpoint_from_before_the_deformer_optimizer_resumes"),
    Row("trainer --c restores the deformer's Adam state and its spec", "FAULT",
        "test_trainers.py::test_checkpoint_resume_restores_deformer_optimizer_and_logging"),
    Row("gemini_benchmark -o lost but for its results.json", "FAULT",
        "test_collection.py::test_a_lost_pretraining_reruns_only_for_runs_that_load_it"),
]


def _test_functions(file_name: str) -> set:
    tree = ast.parse(open(os.path.join(TESTS, file_name), encoding="utf-8").read())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_item_has_an_existing_test():
    assert {r.klass for r in RELIABILITY_TABLE} <= {"ERROR", "WARN", "OK", "FAULT", "SAFE"}
    assert len({r.item for r in RELIABILITY_TABLE}) == len(RELIABILITY_TABLE)
    for row in RELIABILITY_TABLE:
        file_name, test = row.covered_by.split("::")
        name, _, param = test.partition("[")
        assert name in _test_functions(file_name), row
        if param:
            assert name == _E and param[:-1] in ERROR_CASES, row
    # every ERROR case of the parametrised table appears in the reliability table
    listed = {r.covered_by for r in RELIABILITY_TABLE}
    assert {_here(_E, item) for item in ERROR_CASES} <= listed


# --------------------------------------------------------------- docs/reliability.md against the table
RELIABILITY_DOC = os.path.join(REPO_ROOT, "docs", "reliability.md")


def _tests_named_in_reliability_doc() -> List[Tuple[str, str, str]]:
    """(file, test, param or "") of every test in the last column of docs/reliability.md's tables: a
    cell names `file.py::test_name[param]`; `test_reliability.py::...[param]` abbreviates _E."""
    import re
    doc_test = re.compile(r"(\w+\.py)::(\.\.\.|\w+)(?:\[([^\]]*)\])?")
    named = []
    for line in open(RELIABILITY_DOC, encoding="utf-8"):
        if line.startswith("|") and "::" in line:
            cell = line.rstrip().rstrip("|").rsplit("|", 1)[-1]
            for file_name, test, param in doc_test.findall(cell):
                named.append((file_name, _E if test == "..." else test, param))
    return named


def test_reliability_doc_matches_the_table():
    """docs/reliability.md is checked against RELIABILITY_TABLE, not kept by hand beside it: every
    test its tables name exists (a parameter must be one the test is parametrised with), and every
    test RELIABILITY_TABLE lists is named there."""
    named = _tests_named_in_reliability_doc()
    assert len(named) >= len({r.covered_by for r in RELIABILITY_TABLE}), "no test column found in the doc"
    for file_name, test, param in named:
        assert os.path.isfile(os.path.join(TESTS, file_name)), f"docs/reliability.md names missing {file_name}"
        assert test in _test_functions(file_name), f"docs/reliability.md names missing {file_name}::{test}"
        if param and test == _E:
            assert param in ERROR_CASES, f"docs/reliability.md: {param!r} is not a case of {_E}"
        elif param:
            source = open(os.path.join(TESTS, file_name), encoding="utf-8").read()
            assert f'"{param}"' in source, f"docs/reliability.md: {file_name}::{test} has no case {param!r}"
    in_doc = {f"{f}::{t}" + (f"[{p}]" if p else "") for f, t, p in named}
    missing = sorted({r.covered_by for r in RELIABILITY_TABLE} - in_doc)
    assert not missing, f"RELIABILITY_TABLE entries without a line in docs/reliability.md: {missing}"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
