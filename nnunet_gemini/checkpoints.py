"""Checkpoint I/O: atomic saving (nnunet_gemini.atomic, with its test-only abort injection),
safe (weights_only) loading, and the network compatibility fields a pre-training checkpoint
carries so a downstream run can verify it before training.
"""
import os
import shutil
import tempfile
from typing import Any, Dict, List

import numpy as np
import torch

from nnunet_gemini.atomic import TMP_PREFIX, atomic_write
from nnunet_gemini.errors import GeminiUserError

# Kinds of files we write; load_our_checkpoint checks the "gemini_kind" entry against them.
KIND_PRETRAIN = "gemini_pretrain"


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save through nnunet_gemini.atomic: the previous file or the new one, never a torn one."""
    atomic_write(path, lambda f: torch.save(obj, f), suffix=".pth")


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


def optimizer_state_params(state: Dict[str, Any]) -> int:
    """How many parameters an optimizer state_dict was saved for (over all its param groups)."""
    return sum(len(group["params"]) for group in state["param_groups"])


def optimizer_state_prefix(state: Dict[str, Any], n: int) -> Dict[str, Any]:
    """A one-group optimizer state_dict cut to its first `n` parameters: what the same optimiser over
    only those parameters would have saved (torch matches saved parameters to new ones by position)."""
    if len(state["param_groups"]) != 1 or optimizer_state_params(state) < n:
        raise ValueError(f"expected one param group of at least {n} parameters, got "
                         f"{[len(g['params']) for g in state['param_groups']]}")
    group = state["param_groups"][0]
    kept = list(group["params"][:n])
    return {"state": {k: v for k, v in state["state"].items() if k in kept}, "param_groups": [dict(group, params=kept)]}


def optimizer_state_regrouped(state: Dict[str, Any], groups: List[List[int]]) -> Dict[str, Any]:
    """A one-group optimizer state_dict split into param groups: groups[g] lists the positions (in the
    saved group) of group g's parameters, in order. What the same optimiser built with those groups
    would have saved (torch numbers parameters over all groups, in group order)."""
    if len(state["param_groups"]) != 1 or sorted(i for g in groups for i in g) != list(
            range(optimizer_state_params(state))):
        raise ValueError(f"expected one param group whose parameters the groups cover once, got "
                         f"{[len(g['params']) for g in state['param_groups']]} for groups of "
                         f"{[len(g) for g in groups]}")
    group = state["param_groups"][0]
    saved_ids, new_state, new_groups, k = group["params"], {}, [], 0
    for positions in groups:
        ids = list(range(k, k + len(positions)))
        for new_id, position in zip(ids, positions):
            if saved_ids[position] in state["state"]:
                new_state[new_id] = state["state"][saved_ids[position]]
        new_groups.append(dict(group, params=ids))
        k += len(positions)
    return {"state": new_state, "param_groups": new_groups}
