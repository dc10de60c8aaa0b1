"""What the tests share besides fixtures: the demo's constants, nnU-Net environments, running a
console command, a private copy of the planned demo, and the scrub of a developer's settings.
tests/conftest.py keeps only pytest hooks and fixtures; test modules import from here
(`from helpers import ...`; pytest puts tests/ on sys.path).

Imports stay cheap (no torch, no nnunetv2): the heavy work happens in subprocesses that run the
real console commands, the way a user runs them.
"""
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Dict, List, MutableMapping

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_ID = 987
DEMO_NAME = "GeminiTiny"
DEMO_SHAPE = (24, 32, 32)
DEMO_SPACING = (2.0, 1.0, 1.0)
DEMO_CASES = dict(labeled=4, unlabeled=4, test=2)

NNUNET_FOLDERS = (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"), ("nnUNet_results", "results"))
# Removed from os.environ once per test session (conftest's pytest_configure), before any fixture
# copies it: every trainer option (nnUNet_gemini_*) and every test hook of the library
# (GEMINI_TEST_*), so that a developer's shell setting never reaches a test or its subprocesses.
# A test that wants one sets it itself (monkeypatch.setenv, or in the env dict it passes).
SCRUBBED_PREFIXES = ("nnUNet_gemini_", "GEMINI_TEST_")


def scrub_environment(environ: MutableMapping[str, str]) -> List[str]:
    """Delete every variable named with a SCRUBBED_PREFIXES prefix from `environ`; returns the
    deleted names, sorted."""
    names = sorted(k for k in environ if k.startswith(SCRUBBED_PREFIXES))
    for name in names:
        del environ[name]
    return names


def nnunet_env_dict(root: str, **extra: str) -> Dict[str, str]:
    """os.environ plus nnUNet_raw/preprocessed/results under `root` (created), one worker process,
    and this checkout first on PYTHONPATH so `python -m nnunet_gemini...` runs the code under test."""
    env = dict(os.environ)
    for var, sub in NNUNET_FOLDERS:
        env[var] = os.path.join(str(root), sub)
        os.makedirs(env[var], exist_ok=True)
    env["nnUNet_def_n_proc"] = "1"
    env.pop("nnUNet_n_proc_DA", None)  # set it only for training: 2.8.1 planning crashes on 0
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(extra)
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


def private_demo_copy(planned_demo: PlannedDemo, root, **extra: str) -> Dict[str, str]:
    """A private, modifiable copy of the session's planned demo under `root`: its raw and
    preprocessed dataset folders copied to root/raw/<name> and root/preprocessed/<name>, and an
    empty root/results. Returns the demo's env (planned_demo.env) pointed at the copy, plus
    `extra`. The one way a test gets a demo it may write into (the session fixture stays read-only)."""
    env = dict(planned_demo.env)
    for var, sub in NNUNET_FOLDERS:
        env[var] = os.path.join(str(root), sub)
        os.makedirs(env[var], exist_ok=True)
    for var, src in (("nnUNet_raw", planned_demo.raw_folder),
                     ("nnUNet_preprocessed", planned_demo.preprocessed_folder)):
        shutil.copytree(src, os.path.join(env[var], planned_demo.dataset_name))
    env.update(extra)
    return env


def run_command(args, env, timeout=900):
    """Run a console command; on failure raise with its output (pytest shows it)."""
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc
