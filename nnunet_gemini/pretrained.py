"""The GEMINI pre-training checkpoint seen from the outside: where it lives, how it is found,
loaded (weights_only) and applied to a downstream network and deformer.

Written by gemini_pretrain (nnunet_gemini.pretraining), read by our trainers. The schema is in
docs/internal-api.md: ``network_weights`` is the FULL segmentation network state dict (CPU
tensors), so plain ``nnUNetv2_train -pretrained_weights`` accepts the same file.
Transfer follows the GVSL protocol by default: every network weight except the segmentation convs
(``.seg_layers.``, new for the downstream labels) is loaded, then everything is fine-tuned (or the
encoder only: nnUNet_gemini_transfer=encoder).
"""
import os
from typing import Dict, List, Optional

from nnunet_gemini.choices import TRANSFERS
from nnunet_gemini.errors import GeminiUserError

PRETRAIN_TRAINER_NAME = "GEMINIPretrain"
FINAL_CHECKPOINT = "checkpoint_final.pth"
LATEST_CHECKPOINT = "checkpoint_latest.pth"
FORMAT_VERSION = 1
SKIPPED_NETWORK_KEYS = (".seg_layers.",)


def pretrain_output_dir(dataset_name: str, plans_identifier: str, configuration: str,
                        results_root: Optional[str] = None) -> str:
    """nnUNet_results/DatasetXXX/GEMINIPretrain__<plans>__<configuration>/fold_all (results_root:
    another nnUNet_results folder than the environment's)."""
    from nnunet_gemini.datasets import require_env_folder
    root = results_root or require_env_folder("nnUNet_results", must_exist=False)
    return os.path.join(root, dataset_name,
                        f"{PRETRAIN_TRAINER_NAME}__{plans_identifier}__{configuration}", "fold_all")


def find_pretrained_checkpoint(dataset_name: str, plans_identifier: str, configuration: str) -> Optional[str]:
    """Path of the finished pre-training (checkpoint_final.pth) or None."""
    path = os.path.join(pretrain_output_dir(dataset_name, plans_identifier, configuration), FINAL_CHECKPOINT)
    return path if os.path.isfile(path) else None


def load_pretrained_checkpoint(path: str) -> Dict:
    """The checkpoint dict, loaded with torch.load(weights_only=True); GeminiUserError when the
    file is missing, corrupt, or not a gemini_pretrain checkpoint."""
    from nnunet_gemini.checkpoints import KIND_PRETRAIN, load_our_checkpoint
    ckpt = load_our_checkpoint(path, KIND_PRETRAIN)
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise GeminiUserError(f"{path} has checkpoint format_version {version!r}; this nnunet-gemini "
                              f"reads version {FORMAT_VERSION}: re-run gemini_pretrain with this version.")
    for key in ("network_weights", "meta"):
        if key not in ckpt:
            raise GeminiUserError(f"{path} lacks '{key}': it is not a complete gemini_pretrain "
                                  f"checkpoint; re-run gemini_pretrain.")
    return ckpt


def _skipped(key: str) -> bool:
    return any(s in key for s in SKIPPED_NETWORK_KEYS)


PRETRAIN_FIX = "pre-train with the same plans and configuration as this training"


def load_network_weights(network, weights: Dict, checkpoint_name: str, fix: str = PRETRAIN_FIX) -> None:
    """The one weight rule for a network loaded from one of our checkpoints (a pre-training into a
    downstream network, a checkpoint into gemini_register's network): every tensor but the
    segmentation convs (`.seg_layers.`, which depend on the labels) must be in `weights` with this
    network's shape; a missing or misfitting one is a GeminiUserError naming `checkpoint_name`, the
    weight, both shapes and `fix`. Nothing is silently left at its random initialisation. DDP /
    compile wrappers are unwrapped."""
    from nnunet_gemini.network import unwrap_network

    net = unwrap_network(network)
    own = net.state_dict()
    for key, value in own.items():
        if _skipped(key):
            continue
        if key not in weights:
            raise GeminiUserError(f"{checkpoint_name} has no weight '{key}' that this network needs (it was "
                                  f"trained for another architecture): {fix}.")
        if tuple(weights[key].shape) != tuple(value.shape):
            raise GeminiUserError(f"{checkpoint_name}: weight '{key}' has shape {tuple(weights[key].shape)} "
                                  f"but this network needs {tuple(value.shape)}: {fix}.")
    own.update({k: v for k, v in weights.items() if k in own and not _skipped(k)})
    net.load_state_dict(own)


def apply_pretrained(ckpt: Dict, network, deformer=None, expected_fields: Optional[Dict] = None,
                     checkpoint_name: str = "the pre-trained checkpoint", transfer: str = "all") -> List[str]:
    """Load ckpt's network weights (all but `.seg_layers.`, load_network_weights' rule) into
    ``network`` (DDP/compile wrappers are unwrapped) and, when given and present, the deformer
    weights; transfer="encoder" loads the encoder's weights only (choices.TRANSFERS; the caller
    then passes no deformer: one trained on the pre-trained decoder's features fits no other).
    With ``expected_fields`` (checkpoints.network_compatibility_fields of the downstream run) the
    compatibility is checked first. Returns warning strings (spacing / patch size differ,
    no deformer weights); raises GeminiUserError naming both sides on any mismatch."""
    from nnunet_gemini.checkpoints import check_compatibility
    from nnunet_gemini.network import unwrap_network

    warnings: List[str] = []
    if expected_fields is not None:
        warnings += check_compatibility(ckpt.get("meta", {}).get("compat", {}), expected_fields, checkpoint_name)
    if transfer == "encoder":
        net = unwrap_network(network)
        encoder = getattr(net, "encoder", None)
        if encoder is None:
            raise GeminiUserError(f"nnUNet_gemini_transfer=encoder: this network ({type(net).__name__}) has no "
                                  f".encoder to load {checkpoint_name} into: unset nnUNet_gemini_transfer.")
        # by the encoder module itself: the decoder holds the same tensors again under decoder.encoder.*
        load_network_weights(encoder, {k[len("encoder."):]: v for k, v in ckpt["network_weights"].items()
                                       if k.startswith("encoder.")}, checkpoint_name)
    elif transfer == "all":
        load_network_weights(network, ckpt["network_weights"], checkpoint_name)
    else:
        raise ValueError(f"transfer {transfer!r} is not one of {TRANSFERS}")
    if deformer is not None:
        deformer_weights = ckpt.get("deformer_weights")
        if not deformer_weights:
            warnings.append(f"{checkpoint_name} holds no deformer weights; the deformer starts from scratch.")
        else:
            try:
                unwrap_network(deformer).load_state_dict(deformer_weights)
            except RuntimeError as e:
                raise GeminiUserError(
                    f"{checkpoint_name}: its deformer does not fit this deformer "
                    f"({str(e).splitlines()[0]}); use the same deformer options as the pre-training "
                    f"(meta: {ckpt.get('meta', {}).get('deformer')}).") from e
    return warnings
