"""gemini_doctor: is this machine (and optionally a dataset) ready for nnU-Net + GEMINI?

Prints what it finds; every problem comes with a one-line fix, and any problem makes the exit
status 1 (a user error in the arguments themselves exits 2 like every CLI of ours).
"""
import argparse
import contextlib
import io
import os
import platform
from dataclasses import dataclass
from importlib.metadata import version
from typing import List, Optional

from nnunet_gemini.datasets import (
    ENV_FOLDERS,
    count_labelled_images,
    count_unlabelled_images,
    dataset_id_of,
    load_json,
    preprocessed_configurations,
    resolve_dataset,
)
from nnunet_gemini.errors import GeminiUserError, run_cli

TRAINERS = ("nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI_NoPretrain", "nnUNetTrainerGEMINIFinetune")
NNUNET_KFOLD = 5  # nnU-Net's default split is 5-fold KFold


@dataclass
class Finding:
    topic: str
    detail: str
    fix: Optional[str] = None  # set when this is a problem the user must fix

    @property
    def ok(self) -> bool:
        return self.fix is None


def versions() -> List[Finding]:
    import nnunet_gemini
    found = [Finding("python", platform.python_version())]
    for module in ("torch", "nnunetv2"):
        try:
            found.append(Finding(module, version(module)))
        except Exception as e:  # noqa: BLE001 - reported, not raised
            found.append(Finding(module, f"not importable ({e})", f"pip install {module}"))
    where = os.path.dirname(nnunet_gemini.__file__)
    found.append(Finding("nnunet_gemini", f"{nnunet_gemini.__version__} ({where})"))
    return found


def shim_folder() -> str:
    """Folder of our trainer shims, the one the installed .pth appends to nnUNet_extTrainer."""
    import nnunet_gemini
    return os.path.join(os.path.dirname(nnunet_gemini.__file__), "_nnunet_ext_trainers")


def trainer_findings() -> List[Finding]:
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    fix = (f"reinstall this package (pip install nnunet-gemini, or pip install -e . in its clone) so "
           f"its .pth sets nnUNet_extTrainer, or export nnUNet_extTrainer={shim_folder()}")
    found = []
    for name in TRAINERS:
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints its search
                cls = recursive_find_trainer_class_by_name(name)
            found.append(Finding(f"trainer {name}", f"found: {cls.__module__}.{cls.__qualname__}"))
        except Exception as e:  # noqa: BLE001 - any failure means nnUNetv2_train -tr would fail
            found.append(Finding(f"trainer {name}", f"not found ({type(e).__name__}: "
                                                    f"{str(e).splitlines()[0][:160]})", fix))
    return found


def environment_findings() -> List[Finding]:
    found = []
    for var in ENV_FOLDERS:
        value = os.environ.get(var)
        if not value:
            found.append(Finding(var, "not set", f"export {var}=/path/to/{var} (see nnU-Net's "
                                                 f"documentation/set_environment_variables.md)"))
        elif not os.path.isdir(value):
            found.append(Finding(var, f"{value} (folder missing)", f"mkdir -p {value}"))
        else:
            found.append(Finding(var, f"{value} (exists)"))
    ext = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    missing = [p for p in ext if not os.path.isdir(p)]
    detail = ", ".join(f"{p} ({'missing' if p in missing else 'exists'})" for p in ext) or "not set"
    found.append(Finding("nnUNet_extTrainer", detail,
                         "remove the missing folders from nnUNet_extTrainer" if missing else None))
    return found


def accelerator() -> Finding:
    import torch
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Finding("accelerator", f"CUDA: {', '.join(names)} (use -device cuda)")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Finding("accelerator", "Apple MPS (use -device mps)")
    return Finding("accelerator", f"CPU only, {os.cpu_count()} cores (use -device cpu; "
                                  f"nnUNetv2_predict -npp 1 -nps 1 on small machines)")


def dataset_findings(dataset: str, plans: str) -> List[Finding]:
    try:
        name = resolve_dataset(dataset)
    except GeminiUserError as e:
        return [Finding("dataset", str(e).split(":")[0], "pass -d with an existing dataset id or "
                                                          "name, or fix nnUNet_raw")]
    dataset_id = dataset_id_of(name)
    found = [Finding("dataset", name)]
    configurations = preprocessed_configurations(name, plans) if os.environ.get("nnUNet_preprocessed") else []
    if configurations:
        found.append(Finding("planned", f"{plans}: preprocessed {', '.join(configurations)}"))
    else:
        found.append(Finding("planned", f"no (no preprocessed data for plans {plans})",
                             f"nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity"))
    raw_folder = os.path.join(os.environ.get("nnUNet_raw") or "<nnUNet_raw unset>", name)
    if not os.path.isfile(os.path.join(raw_folder, "dataset.json")):
        found.append(Finding("raw images", f"{raw_folder}/dataset.json not found",
                             f"export nnUNet_raw to the folder holding {name}"))
        return found
    dataset_json = load_json(os.path.join(raw_folder, "dataset.json"))
    labelled, unlabelled = count_labelled_images(raw_folder), count_unlabelled_images(raw_folder)
    expected = dataset_json.get("numTraining")
    found.append(Finding("labelled images", f"{labelled} (imagesTr with labelsTr; dataset.json "
                                            f"numTraining={expected})"))
    found.append(Finding("unlabelled images", f"{unlabelled} (imagesUnlabeled/)" + (
        "" if unlabelled else "; GEMINI then pairs the labelled images only: put unlabelled "
                              f"scans into imagesUnlabeled/ as CASE_0000{dataset_json['file_ending']}")))
    if labelled < NNUNET_KFOLD:
        found.append(Finding(
            "how to train", f"{labelled} labelled cases < {NNUNET_KFOLD}: nnU-Net's 5-fold split fails; "
            f"train fold all (nnUNetv2_train {dataset_id} 3d_fullres all -tr nnUNetTrainerGEMINI) or "
            f"write few-shot folds (gemini_fewshot_split -d {dataset_id} -n N)"))
    return found


def run_checks(dataset: Optional[str] = None, plans: str = "nnUNetPlans") -> List[Finding]:
    found = versions() + environment_findings() + trainer_findings() + [accelerator()]
    if dataset is not None:
        found += dataset_findings(dataset, plans)
    return found


def _main(argv=None):
    parser = argparse.ArgumentParser(
        prog="gemini_doctor", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Check versions, nnU-Net variables, trainer discovery, the accelerator and "
                    "(with -d) a dataset. Exit status 1 when something needs fixing.")
    parser.add_argument("-d", default=None, help="dataset id or name to check")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    args = parser.parse_args(argv)
    found = run_checks(args.d, args.p)
    width = max(len(f.topic) for f in found)
    for f in found:
        print(f"{'ok ' if f.ok else 'BAD'} {f.topic:<{width}}  {f.detail}")
    problems = [f for f in found if not f.ok]
    for f in problems:
        print(f"FIX {f.topic}: {f.fix}")
    print(f"{len(problems)} problem(s) found" if problems else "all checks passed")
    return 1 if problems else 0


def main(argv=None):
    raise SystemExit(run_cli(_main, argv))


if __name__ == "__main__":
    main()
