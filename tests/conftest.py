"""pytest hooks and fixtures only: the `slow` marker, the session-wide scrub of a developer's
nnUNet_gemini_* and GEMINI_TEST_* settings, nnU-Net environments and ONE planned tiny demo
dataset per test run. What tests import (constants, run_command, private_demo_copy, ...) lives in
tests/helpers.py.

Imports stay cheap (no torch, no nnunetv2): the heavy work happens in subprocesses that run the
real console commands, the way a user runs them.
"""
import os
import sys

import pytest
from helpers import (
    DEMO_CASES,
    DEMO_ID,
    DEMO_NAME,
    DEMO_SHAPE,
    DEMO_SPACING,
    SCRUBBED_PREFIXES,
    PlannedDemo,
    nnunet_env_dict,
    run_command,
    scrub_environment,
)

_SCRUBBED = []  # names removed from os.environ by pytest_configure, for the report header


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (or set GEMINI_RUN_SLOW=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long opt-in test; run with --runslow or GEMINI_RUN_SLOW=1")
    # Before any fixture copies os.environ (the session fixture planned_demo does, ahead of every
    # function-scoped monkeypatch), so no developer setting leaks into a test or its subprocesses.
    _SCRUBBED[:] = scrub_environment(os.environ)


def pytest_report_header(config):
    if _SCRUBBED:
        return f"unset for this run ({' / '.join(p + '*' for p in SCRUBBED_PREFIXES)}): {', '.join(_SCRUBBED)}"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow") or os.environ.get("GEMINI_RUN_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or GEMINI_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def nnunet_env(tmp_path, monkeypatch):
    """Fresh nnU-Net folders under tmp_path, exported in this process too; returns the env dict."""
    env = nnunet_env_dict(tmp_path)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(var, env[var])
    return env


@pytest.fixture(scope="session")
def planned_demo(tmp_path_factory) -> PlannedDemo:
    """Tiny demo dataset 987, planned and preprocessed (3d_fullres and 2d) once per test run with
    the real `nnUNetv2_plan_and_preprocess --verify_dataset_integrity`. Treat it as read-only;
    take a private copy with helpers.private_demo_copy before changing anything."""
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
