"""`gemini_demo`: the whole GEMINI workflow on the built-in synthetic demo data, one command.

Stages, each a real console command in a subprocess (what a user would type):
  gemini_demo_dataset -> nnUNetv2_plan_and_preprocess -> gemini_pretrain ->
  nnUNetv2_train -tr nnUNetTrainerGEMINI -> nnUNetv2_predict -> Dice against labelsTs.
The report (Dice per structure, time per stage, where every output is) is printed and written
as JSON into the working folder.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

from nnunet_gemini.errors import run_cli
from nnunet_gemini.workflow import StageRunner, default_device, nnunet_folders, score_predictions

# Iteration counts per budget. smoke: checks an installation (results meaningless); quick: the
# whole workflow in about 9 minutes on an idle 2-core CPU (measured: docs/design.md, docs/results.md).
BUDGETS = {
    "smoke": dict(pretrain_epochs=1, pretrain_iters=2, train_epochs=1, train_iters=2, val_iters=1),
    "quick": dict(pretrain_epochs=3, pretrain_iters=10, train_epochs=4, train_iters=10, val_iters=2),
    "standard": dict(pretrain_epochs=20, pretrain_iters=50, train_epochs=30, train_iters=50, val_iters=10),
    "paper": dict(pretrain_epochs=200, pretrain_iters=250, train_epochs=1000, train_iters=250, val_iters=50),
}


def _budget_help() -> str:
    return "; ".join(
        f"{name}: pre-train {b['pretrain_epochs']}x{b['pretrain_iters']} it, "
        f"train {b['train_epochs']}x{b['train_iters']} it" for name, b in BUDGETS.items())


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="gemini_demo",
        description="Run the whole GEMINI + nnU-Net workflow on the built-in synthetic demo dataset: "
                    "generate -> plan and preprocess -> gemini_pretrain -> nnUNetv2_train -tr "
                    "nnUNetTrainerGEMINI -> nnUNetv2_predict -> test Dice.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", type=int, default=990, help="dataset ID for the demo dataset")
    p.add_argument("--budget", choices=list(BUDGETS), default="quick",
                   help=f"iteration budget ({_budget_help()})")
    p.add_argument("-device", default=None, help="cuda|cpu|mps; default: cuda when available, else cpu")
    p.add_argument("--work_dir", default=None,
                   help="folder for nnUNet_raw/_preprocessed/_results; default: the user's nnUNet_* "
                        "variables when all three are set, else ./gemini_demo_work")
    p.add_argument("-tr", default="nnUNetTrainerGEMINI", help="trainer to run")
    p.add_argument("--overwrite", action="store_true", help="regenerate the demo dataset if the ID exists")
    a = p.parse_args(argv)
    device = a.device or default_device()
    budget = BUDGETS[a.budget]
    folders = nnunet_folders(Path(a.work_dir or "gemini_demo_work").resolve(), use_env=a.work_dir is None)
    for f in folders.values():
        os.makedirs(f, exist_ok=True)
    env = dict(os.environ, **folders)
    env.setdefault("nnUNet_def_n_proc", "1" if device == "cpu" else str(min(8, os.cpu_count() or 1)))
    root = Path(folders["nnUNet_results"]).parent
    log_dir = root / "gemini_demo_logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    run = StageRunner(env, log_dir, "gemini_demo")
    t_start = time.time()

    from nnunet_gemini.datasets import resolve_dataset

    raw_existing = [d for d in os.listdir(folders["nnUNet_raw"]) if d.startswith(f"Dataset{a.d:03d}_")]
    if not raw_existing or a.overwrite:
        run("dataset", ["gemini_demo_dataset", "-d", str(a.d)] + (["--overwrite"] if a.overwrite else []))
    os.environ.update(folders)  # resolve_dataset reads the variables at call time
    dataset_name = resolve_dataset(str(a.d))
    raw = Path(folders["nnUNet_raw"]) / dataset_name
    dataset_json = json.loads((raw / "dataset.json").read_text())

    run("plan_and_preprocess", ["nnUNetv2_plan_and_preprocess", "-d", str(a.d), "-c", "3d_fullres",
                                "-np", env["nnUNet_def_n_proc"], "-npfp", env["nnUNet_def_n_proc"],
                                "--verify_dataset_integrity"])
    train_env = {"nnUNet_gemini_num_epochs": str(budget["train_epochs"]),
                 "nnUNet_gemini_iters_per_epoch": str(budget["train_iters"]),
                 "nnUNet_gemini_val_iters": str(budget["val_iters"])}
    if device == "cpu":
        train_env["nnUNet_n_proc_DA"] = "0"
    if a.tr != "nnUNetTrainerGEMINI_NoPretrain":
        run("pretrain", ["gemini_pretrain", "-d", str(a.d), "-c", "3d_fullres", "-device", device,
                         "--epochs", str(budget["pretrain_epochs"]),
                         "--iters_per_epoch", str(budget["pretrain_iters"])],
            extra_env={"nnUNet_n_proc_DA": "0"} if device == "cpu" else None)
    run("train", ["nnUNetv2_train", str(a.d), "3d_fullres", "all", "-tr", a.tr, "-device", device],
        extra_env=train_env)
    pred_dir = root / "gemini_demo_predictions"
    run("predict", ["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred_dir), "-d", str(a.d),
                    "-c", "3d_fullres", "-f", "all", "-tr", a.tr, "-device", device,
                    "-npp", "1", "-nps", "1"])
    t0 = time.time()
    dice = score_predictions(str(raw / "labelsTs"), str(pred_dir), dataset_json["labels"],
                             str(pred_dir / "summary.json"))
    run.times["evaluate"] = round(time.time() - t0, 1)

    results = Path(folders["nnUNet_results"]) / dataset_name
    report = {
        "dataset": dataset_name, "trainer": a.tr, "budget": a.budget, "budget_iterations": budget,
        "device": device, "test_dice": dice, "seconds_per_stage": run.times,
        "total_seconds": round(time.time() - t_start, 1),
        "outputs": {
            "raw_dataset": str(raw),
            "preprocessed": str(Path(folders["nnUNet_preprocessed"]) / dataset_name),
            "pretraining": str(results / "GEMINIPretrain__nnUNetPlans__3d_fullres" / "fold_all"),
            "training": str(results / f"{a.tr}__nnUNetPlans__3d_fullres" / "fold_all"),
            "predictions": str(pred_dir), "logs": str(log_dir),
        },
    }
    report_path = root / "gemini_demo_report.json"
    report_path.write_text(json.dumps(report, indent=2))
    print("\n=== gemini_demo report ===")
    print(f"dataset {dataset_name}, trainer {a.tr}, budget {a.budget}, device {device}")
    for name, d in dice["dice_per_structure"].items():
        print(f"  test Dice {name:>12s}: {d:.3f}")
    print(f"  test Dice {'mean':>12s}: {dice['dice_mean']:.3f}")
    print("time per stage (s): " + ", ".join(f"{k} {v}" for k, v in run.times.items()))
    for k, v in report["outputs"].items():
        print(f"  {k}: {v}")
    print(f"report: {report_path}")
    return 0


def main(argv=None):
    sys.exit(run_cli(_main, argv))


if __name__ == "__main__":
    main()
