"""Checkpoint I/O: atomic saving, safe (weights_only) loading, and the network compatibility
fields a pre-training checkpoint carries so a downstream run can verify it before training.

Test-only fault injection: with the environment variable GEMINI_TEST_ABORT_AFTER_TMP_WRITE=1,
atomic_torch_save raises CheckpointWriteAborted right after the temporary file is written and
synced (before the rename), which is what a process killed while saving leaves behind.
"""
import os
import shutil
import tempfile
from typing import Any, Dict, List

import numpy as np
import torch

from nnunet_gemini.errors import GeminiUserError

ABORT_AFTER_TMP_WRITE_ENV = "GEMINI_TEST_ABORT_AFTER_TMP_WRITE"
TMP_PREFIX = ".gemini_tmp_"

# Kinds of files we write; load_our_checkpoint checks the "gemini_kind" entry against them.
KIND_PRETRAIN = "gemini_pretrain"
KIND_HEADS = "gemini_heads"


class CheckpointWriteAborted(RuntimeError):
    """Raised only by the test-only fault injection of atomic_torch_save."""


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file in the same folder, flush + fsync, then os.replace.
    A crash at any point leaves either the previous file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if os.environ.get(ABORT_AFTER_TMP_WRITE_ENV) == "1":
            # Simulate a kill between write and rename; the finally block does not run on a
            # real SIGKILL, so leave the temporary file as a killed process would.
            tmp_path_left = tmp_path
            tmp_path = None
            raise CheckpointWriteAborted(f"{ABORT_AFTER_TMP_WRITE_ENV}=1: aborted after writing "
                                         f"{tmp_path_left}")
        os.replace(tmp_path, path)
        tmp_path = None
        _fsync_dir(folder)
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)


def _fsync_dir(folder: str) -> None:
    # Makes the rename itself durable on POSIX; not possible (nor needed) on Windows.
    if os.name == "nt":
        return
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_our_checkpoint(path: str, expected_kind: str) -> Dict[str, Any]:
    """Load a file we wrote (plain types + CPU tensors) with weights_only=True and check its kind."""
    if not os.path.isfile(path):
        raise GeminiUserError(f"checkpoint {path} does not exist: check the path (or run "
                              f"gemini_pretrain first).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors differ by corruption kind
        raise GeminiUserError(
            f"{path} is not a readable nnunet-gemini checkpoint (corrupt, truncated, or not a "
            f"torch file; {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"Re-run the step that wrote it or point to the right file.") from e
    kind = ckpt.get("gemini_kind") if isinstance(ckpt, dict) else None
    if kind != expected_kind:
        raise GeminiUserError(
            f"{path} is not an nnunet-gemini '{expected_kind}' checkpoint (found kind {kind!r}). "
            f"Point to a file written by nnunet-gemini (e.g. gemini_pretrain's "
            f"checkpoint_final.pth).")
    return ckpt


def _numpy_safe_globals() -> List[Any]:
    """The numpy types nnU-Net's logger and _best_ema put into trainer checkpoints:
    numpy scalars (pickled via multiarray.scalar + a dtype) and the dtypes themselves."""
    scalar_fn = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    dtype_classes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.float16, np.int64,
                                                  np.int32, np.bool_)]
    return [scalar_fn, np.dtype, *dtype_classes]


def load_nnunet_trainer_checkpoint(path: str) -> Dict[str, Any]:
    """Load an nnU-Net trainer checkpoint (checkpoint_final.pth etc.) with weights_only=True,
    allow-listing only the numpy scalar/dtype types nnU-Net's logging state contains."""
    if not os.path.isfile(path):
        raise GeminiUserError(f"nnU-Net checkpoint {path} does not exist: check the results "
                              f"folder and fold.")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise GeminiUserError(
            f"{path} could not be loaded as an nnU-Net trainer checkpoint with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). It is corrupt or "
            f"holds objects other than weights and numpy scalars: use a checkpoint written by "
            f"nnUNetv2_train.") from e
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise GeminiUserError(f"{path} is not an nnU-Net trainer checkpoint (no "
                              f"'network_weights'): use a checkpoint written by nnUNetv2_train.")
    return ckpt


def _plain(x: Any) -> Any:
    """Recursively convert to plain python types (lists, dicts, str, int, float, bool, None)."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if x is None or isinstance(x, (str, int, float, bool)):
        return x
    return str(x)  # e.g. a class object in arch kwargs: its dotted name is what matters


def network_compatibility_fields(plans_manager, configuration_manager,
                                 num_input_channels: int) -> Dict[str, Any]:
    """What shapes the network and its input (must match) plus spacing and patch size (warn)."""
    return {
        "network_arch_class_name": str(configuration_manager.network_arch_class_name),
        "network_arch_init_kwargs": _plain(configuration_manager.network_arch_init_kwargs),
        "num_input_channels": int(num_input_channels),
        "normalization_schemes": _plain(configuration_manager.normalization_schemes),
        "spacing": _plain(configuration_manager.spacing),
        "patch_size": _plain(configuration_manager.patch_size),
        "plans_name": str(plans_manager.plans_name),
    }


_MUST_MATCH = ("network_arch_class_name", "network_arch_init_kwargs", "num_input_channels",
               "normalization_schemes")
_WARN_IF_DIFFERENT = ("spacing", "patch_size")


def check_compatibility(ckpt_fields: Dict[str, Any], expected_fields: Dict[str, Any],
                        checkpoint_name: str = "the pre-trained checkpoint") -> List[str]:
    """Raise GeminiUserError on architecture / channel / normalisation differences; return
    warning strings for spacing / patch-size differences."""
    for key in _MUST_MATCH:
        if key not in ckpt_fields:
            raise GeminiUserError(f"{checkpoint_name} lacks the compatibility field '{key}': it "
                                  f"was not written by gemini_pretrain of this version; "
                                  f"re-run gemini_pretrain.")
        got, want = _plain(ckpt_fields[key]), _plain(expected_fields[key])
        if got != want:
            raise GeminiUserError(
                f"{checkpoint_name} is incompatible: {key} is {got!r} in the checkpoint but "
                f"{want!r} for this plans/configuration. Pre-train with the same plans and "
                f"configuration (e.g. gemini_pretrain -p <plans> -c <configuration>, or move the "
                f"plans with nnUNetv2_move_plans_between_datasets).")
    warnings = []
    for key in _WARN_IF_DIFFERENT:
        got, want = _plain(ckpt_fields.get(key)), _plain(expected_fields.get(key))
        if got != want:
            warnings.append(f"{checkpoint_name}: {key} differs (checkpoint {got}, this "
                            f"configuration {want}); the weights load, but features were learnt "
                            f"at another {key.replace('_', ' ')}.")
    return warnings


OTHER_FOLDER_FLAG = "choose another folder with -o"


def require_writable_folder(folder: str, remedy: str = OTHER_FOLDER_FLAG) -> None:
    """Create `folder` if needed and prove a file can be written in it (GeminiUserError if not)."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise GeminiUserError(f"output folder {folder} is not writable ({e.strerror}): {remedy} "
                              f"or fix its permissions.") from e


def check_free_disk_and_writable(folder: str, needed_bytes: int, remedy: str = OTHER_FOLDER_FLAG) -> None:
    """Before training: the output folder must be writable and hold at least needed_bytes.
    `remedy` says how to pick another folder (our CLIs: -o; nnU-Net trainers: nnUNet_results)."""
    require_writable_folder(folder, remedy)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise GeminiUserError(
            f"not enough free disk in {folder}: {free / 2**20:.1f} MiB free, one checkpoint needs "
            f"about {needed_bytes / 2**20:.1f} MiB. Free space or {remedy}.")


def state_dict_nbytes(state_dict: Dict[str, torch.Tensor]) -> int:
    """Bytes the tensors of a state dict occupy (a lower bound on a checkpoint's size)."""
    return int(sum(t.numel() * t.element_size() for t in state_dict.values()
                   if isinstance(t, torch.Tensor)))
