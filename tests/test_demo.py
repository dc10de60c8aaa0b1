"""`gemini_demo` end to end: the real console commands in subprocesses on a tiny demo dataset."""
import json
import os
import sys

from helpers import nnunet_env_dict, run_command


def test_gemini_demo_smoke_budget_runs_every_stage_and_reports_dice(tmp_path):
    work = tmp_path / "work"
    env = nnunet_env_dict(work)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.pop(var)  # the demo picks its own folders under --work_dir
    dataset_id = "986"
    # a tiny dataset first (the demo reuses an existing one instead of generating the default size)
    run_command([sys.executable, "-m", "nnunet_gemini.demo_data", "-d", dataset_id, "--labeled", "3",
                 "--unlabeled", "3", "--test", "2", "--shape", "24", "32", "32"],
                dict(env, nnUNet_raw=str(work / "nnUNet_raw")))
    proc = run_command([sys.executable, "-m", "nnunet_gemini.demo", "-d", dataset_id, "--budget", "smoke",
                        "-device", "cpu", "--work_dir", str(work)], env, timeout=1500)
    report = json.loads((work / "gemini_demo_report.json").read_text())
    assert set(report["seconds_per_stage"]) == {"plan_and_preprocess", "pretrain", "train", "predict", "evaluate"}
    assert set(report["test_dice"]["dice_per_structure"]) == {"organ", "vessel", "cyst_wall", "lesion"}
    assert 0.0 <= report["test_dice"]["dice_mean"] <= 1.0
    assert "test Dice" in proc.stdout
    preds = sorted(f for f in os.listdir(report["outputs"]["predictions"]) if f.endswith(".nii.gz"))
    assert len(preds) == 2
    assert os.path.isfile(os.path.join(report["outputs"]["pretraining"], "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(report["outputs"]["training"], "checkpoint_final.pth"))
    # the automatic pre-trained start, through the real nnUNetv2_train
    train_log = next(f for f in os.listdir(report["outputs"]["training"]) if f.startswith("training_log_"))
    text = open(os.path.join(report["outputs"]["training"], train_log)).read()
    assert "Loaded the gemini_pretrain checkpoint" in text
    assert os.path.join(report["outputs"]["pretraining"], "checkpoint_final.pth") in text
