"""The session-wide scrub (conftest's pytest_configure): a developer's nnUNet_gemini_* option or
GEMINI_TEST_* hook set in the shell that starts pytest reaches no test, no session fixture's copy of
os.environ and no env dict handed to a subprocess; other variables pass through."""
import glob
import os
import re
import shutil
import subprocess
import sys

from helpers import REPO_ROOT, SCRUBBED_PREFIXES

TESTS = os.path.dirname(os.path.abspath(__file__))
LIBRARY = ("nnunet_gemini", "trainers", "pretraining")

INNER_TEST = '''
import os

import pytest
from helpers import SCRUBBED_PREFIXES, nnunet_env_dict


@pytest.fixture(scope="session")
def session_copy():
    return dict(os.environ)  # what the session fixture planned_demo copies, ahead of any monkeypatch


def test_developer_settings_do_not_reach_the_test(session_copy, nnunet_env, tmp_path):
    for where, env in (("os.environ", os.environ), ("session fixture", session_copy),
                       ("nnunet_env", nnunet_env), ("nnunet_env_dict", nnunet_env_dict(tmp_path))):
        assert not [k for k in env if k.startswith(SCRUBBED_PREFIXES)], where
        assert env.get("GEMINI_RUN_SLOW") == "1", where  # not an option or a hook: kept
'''


def _library_test_hooks():
    """Every GEMINI_TEST_* name the library's source mentions."""
    names = set()
    for folder in LIBRARY:
        for path in glob.glob(os.path.join(REPO_ROOT, folder, "**", "*.py"), recursive=True):
            names.update(re.findall(r"\bGEMINI_TEST_[A-Z0-9_]+", open(path, encoding="utf-8").read()))
    return sorted(names)


def test_shell_settings_are_unset_for_the_whole_session(tmp_path):
    hooks = _library_test_hooks()
    assert hooks, "no GEMINI_TEST_* hook found in the library: the scan is broken"
    assert all(h.startswith(SCRUBBED_PREFIXES) for h in hooks)
    inner = tmp_path / "tests"
    inner.mkdir()
    for name in ("conftest.py", "helpers.py"):
        shutil.copy(os.path.join(TESTS, name), inner / name)
    (inner / "test_inner.py").write_text(INNER_TEST)
    outer = dict(os.environ, nnUNet_gemini_weight="0.3", GEMINI_RUN_SLOW="1", **{h: "1" for h in hooks})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(inner)],
                          cwd=tmp_path, env=outer, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("unset for this run"))
    for name in ["nnUNet_gemini_weight"] + hooks:
        assert name in header, header
