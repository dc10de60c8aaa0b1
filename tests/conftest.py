"""Shared test fixtures: nnU-Net environments and ONE planned tiny demo dataset per test run.

Imports stay cheap (no torch, no nnunetv2): the heavy work happens in subprocesses that run the
real console commands, the way a user runs them.
"""
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_ID = 987
DEMO_NAME = "GeminiTiny"
DEMO_SHAPE = (24, 32, 32)
DEMO_SPACING = (2.0, 1.0, 1.0)
DEMO_CASES = dict(labeled=4, unlabeled=4, test=2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (or set GEMINI_RUN_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long opt-in test; run with --runslow or GEMINI_RUN_SLOW=1")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("GEMINI_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or GEMINI_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def nnunet_env_dict(root: str, **extra: str) -> Dict[str, str]:
    """os.environ plus nnUNet_raw/preprocessed/results under `root` (created), one worker process,
    and this checkout first on PYTHONPATH so `python -m nnunet_gemini...` runs the code under test."""
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                     ("nnUNet_results", "results")):
        env[var] = os.path.join(str(root), sub)
        os.makedirs(env[var], exist_ok=True)
    env["nnUNet_def_n_proc"] = "1"
    env.pop("nnUNet_n_proc_DA", None)  # set it only for training: 2.8.1 planning crashes on 0
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
    return env


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Fresh nnU-Net folders under tmp_path, exported in this process too; returns the env dict."""
    env = nnunet_env_dict(tmp_path)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, env[var])
    return env


@dataclass
class PlannedDemo:
    dataset_id: int
    dataset_name: str
    raw_folder: str
    preprocessed_folder: str
    results_root: str
    env: Dict[str, str] = field(repr=False)
    plan_output: str = field(repr=False, default="")


def run_command(args, env, timeout=900):
    """Run a console command; on failure raise with its output (pytest shows it)."""
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def planned_demo(tmp_path_factory) -> PlannedDemo:
    """Tiny demo dataset 987, planned and preprocessed (3d_fullres and 2d) once per test run with
    the real `nnUNetv2_plan_and_preprocess --verify_dataset_integrity`. Treat it as read-only;
    copy it (shutil.copytree) before changing anything."""
    root = tmp_path_factory.mktemp("planned_demo")
    env = nnunet_env_dict(root)
    run_command([sys.executable, "-m", "nnunet_gemini.demo_data", "-d", str(DEMO_ID), "--name", DEMO_NAME,
                 "--labeled", str(DEMO_CASES["labeled"]), "--unlabeled", str(DEMO_CASES["unlabeled"]),
                 "--test", str(DEMO_CASES["test"]), "--shape", *map(str, DEMO_SHAPE),
                 "--spacing", *map(str, DEMO_SPACING)], env, timeout=300)
    plan = run_command(["nnUNetv2_plan_and_preprocess", "-d", str(DEMO_ID), "-c", "3d_fullres", "2d",
                        "-npfp", "1", "-np", "1", "--verify_dataset_integrity"], env)
    name = f"Dataset{DEMO_ID:03d}_{DEMO_NAME}"
    return PlannedDemo(DEMO_ID, name, os.path.join(env["nnUNet_raw"], name),
                       os.path.join(env["nnUNet_preprocessed"], name), env["nnUNet_results"], env,
                       plan.stdout)
