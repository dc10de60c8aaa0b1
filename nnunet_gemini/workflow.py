"""Pieces shared by the orchestrating CLIs (gemini_demo, gemini_benchmark): run a stage as a
real console command, the default device (nnunet_gemini.devices), score predictions with nnU-Net's evaluation."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from nnunet_gemini.devices import default_device  # noqa: F401  (one place; demo and benchmark import it here)
from nnunet_gemini.errors import GeminiUserError

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# our commands: the console script when installed, else the module with this interpreter
OUR_MODULES = {"gemini_demo_dataset": "nnunet_gemini.demo_data",
               "gemini_fewshot_split": "nnunet_gemini.fewshot_split",
               "gemini_pretrain": "nnunet_gemini.pretraining.run_pretraining"}


def nnunet_folders(fallback_root: Path, use_env: bool) -> Dict[str, str]:
    """The user's nnUNet_* folders when `use_env` and all three are set, else folders under fallback_root."""
    if use_env and all(os.environ.get(v) for v in NNUNET_VARS):
        return {v: os.environ[v] for v in NNUNET_VARS}
    return {v: str(Path(fallback_root) / v) for v in NNUNET_VARS}


class StageRunner:
    """Runs one stage as a subprocess (list args, no shell), one log per stage, wall time per
    stage in `times`; a failing stage raises GeminiUserError with its log's last lines."""

    def __init__(self, env: dict, log_dir: Path, prog: str):
        self.env, self.log_dir, self.prog, self.times = env, Path(log_dir), prog, {}

    def __call__(self, stage: str, cmd: List[str], extra_env: Optional[dict] = None) -> float:
        exe = shutil.which(cmd[0], path=self.env.get("PATH"))
        if exe is not None:
            cmd = [exe] + cmd[1:]
        elif cmd[0] in OUR_MODULES:
            cmd = [sys.executable, "-m", OUR_MODULES[cmd[0]]] + cmd[1:]
        else:
            raise GeminiUserError(f"command '{cmd[0]}' not found on PATH; install nnU-Net and this project "
                                  f"(`pip install -e .`) in the active environment")
        log = self.log_dir / f"{stage}.log"
        print(f"[{self.prog}] {stage}: {' '.join(cmd)}  (log: {log})", flush=True)
        t0 = time.time()
        with open(log, "w") as fh:
            r = subprocess.run(cmd, env=dict(self.env, **(extra_env or {})), stdout=fh, stderr=subprocess.STDOUT)
        seconds = self.times[stage] = round(time.time() - t0, 1)
        if r.returncode != 0:
            tail = "".join(open(log).readlines()[-15:])
            raise GeminiUserError(f"stage '{stage}' failed (exit {r.returncode}); see {log}. Last lines:\n{tail}")
        return seconds


def score_predictions(labels_dir: str, pred_dir: str, labels: Dict[str, int], out_json: str) -> dict:
    """Dice per structure (mean over test cases), nnU-Net's mean foreground Dice, and the mean
    foreground Dice of every test case."""
    import numpy as np
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder_simple, load_summary_json

    fg = {name: int(v) for name, v in labels.items() if int(v) != 0}
    # it writes the summary but returns None in nnunetv2 2.8.1: read the summary back
    compute_metrics_on_folder_simple(labels_dir, pred_dir, list(fg.values()), out_json, num_processes=1, chill=False)
    res = load_summary_json(out_json)
    per_case = {}
    for case in res["metric_per_case"]:
        values = [case["metrics"][v]["Dice"] for v in fg.values()]
        name = os.path.basename(case["reference_file"])
        per_case[name] = float(np.nanmean(values)) if not all(np.isnan(values)) else float("nan")
    return {"dice_per_structure": {name: float(res["mean"][v]["Dice"]) for name, v in fg.items()},
            "dice_mean": float(res["foreground_mean"]["Dice"]), "dice_per_case": per_case}


def project_revision() -> str:
    """What code ran: the git commit of this checkout (editable install; '+dirty' with uncommitted
    changes to tracked files), else the installed package's version."""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.py").is_file() and (root / ".git").exists():
        try:
            git = ["git", "-C", str(root)]
            commit = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
            if commit.returncode == 0:
                dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                       text=True, timeout=30).stdout.strip()
                return commit.stdout.strip() + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass
    from nnunet_gemini import __version__
    return f"nnunet-gemini {__version__}"
