"""Trainer discovery after `pip install .` and `pip install -e .`, in a new interpreter with no
variable exported by hand, and a clean `pip uninstall`.

Each test installs this project into a scratch virtual environment with `--no-deps`; the
already installed dependencies (torch, nnunetv2, ...) are made visible through a plain path
line in a .pth file, which (unlike site-packages itself) does not run that environment's own
.pth hooks, so only the scratch install can set nnUNet_extTrainer.
"""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PTH_NAME = "nnunet_gemini_ext_trainers.pth"
TRAINERS = ["nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI_NoPretrain", "nnUNetTrainerGEMINIFinetune"]

FIND_SCRIPT = (
    "import os, sys\n"
    "from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f\n"
    "print('EXT=' + os.environ.get('nnUNet_extTrainer', ''))\n"
    "for name in sys.argv[1:]:\n"
    "    c = f(name)\n"
    "    print('FOUND', name, c.__module__)\n"
)


def _scratch_venv(tmp_path: Path) -> tuple[Path, Path]:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # dependencies (and pip/setuptools) from the running environment, without its .pth hooks
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py, site


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer" and k != "PYTHONPATH"}
    env.update(extra)
    return env


def _pip(py: Path, *args) -> None:
    r = subprocess.run([str(py), "-m", "pip", *args, "-q", "--disable-pip-version-check"],
                       cwd=REPO, env=_clean_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _find(py: Path, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    # run from an unrelated folder so the repository checkout is not on sys.path
    return subprocess.run([str(py), "-c", FIND_SCRIPT, *TRAINERS], cwd=tmp_path, env=_clean_env(**env),
                          capture_output=True, text=True)


@pytest.mark.parametrize("editable", [False, True], ids=["regular", "editable"])
def test_trainers_found_after_install_and_nothing_left_after_uninstall(tmp_path, editable):
    py, site = _scratch_venv(tmp_path)
    _pip(py, "install", "--no-deps", "--no-build-isolation", *(["-e"] if editable else []), str(REPO))
    assert (site / PTH_NAME).is_file()

    r = _find(py, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in TRAINERS:
        assert f"FOUND {name} nnunet_gemini.trainers" in r.stdout
    ext_line = next(line for line in r.stdout.splitlines() if line.startswith("EXT="))
    assert ext_line.endswith("_nnunet_ext_trainers")

    # the user's own value is kept (ours is appended)
    user_dir = tmp_path / "my_trainers"
    user_dir.mkdir()
    r = _find(py, tmp_path, nnUNet_extTrainer=str(user_dir))
    assert r.returncode == 0, r.stdout + r.stderr
    ext = next(line for line in r.stdout.splitlines() if line.startswith("EXT="))[4:].split(os.pathsep)
    assert ext[0] == str(user_dir) and ext[1].endswith("_nnunet_ext_trainers") and len(ext) == 2

    _pip(py, "uninstall", "-y", "nnunet-gemini")
    left = [p.name for p in site.iterdir() if "gemini" in p.name.lower() or p.name.startswith("__editable__")]
    assert left == []


def test_nothing_written_into_nnunetv2_package():
    import nnunetv2

    root = Path(nnunetv2.__path__[0])
    hits = [str(p) for p in root.rglob("*") if "gemini" in p.name.lower()]
    assert hits == []
