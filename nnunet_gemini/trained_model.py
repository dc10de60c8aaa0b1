"""A trained GEMINI model (network + deformer + the plans that preprocess its input), loaded from
either checkpoint kind: a gemini_pretrain checkpoint, or the fold folder of an
nnUNetTrainerGEMINI-family training. Used by gemini_register (nnunet_gemini.register) and
gemini_benchmark's registration scores.

The network is loaded with the one weight rule of nnunet_gemini.pretrained.load_network_weights
(every tensor but the segmentation convs, which registration never uses, must be there with the
shape of the network the plans build; anything else is a GeminiUserError naming the file and the
fix); the deformer is built as the checkpoint's spec describes it (gemini_step.spec_from_checkpoint)
and must take its weights strictly. No torch import at module import: the CLI's --help stays cheap.
"""
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

from nnunet_gemini.errors import GeminiUserError

if TYPE_CHECKING:  # annotations only
    import torch

    from nnunet_gemini.gemini_step import GeminiStep


@dataclass
class RegistrationModel:
    """Network + deformer (as GeminiStep) + the plans that preprocess their input."""
    network: "torch.nn.Module"
    step: "GeminiStep"
    plans_manager: object
    configuration_manager: object
    dataset_json: dict
    device: "torch.device"
    source: str
    deformation: str

    @property
    def file_ending(self) -> str:
        return self.dataset_json["file_ending"]


def _as_device(device):
    """A torch.device as it is; a -device name (or None) through the one resolver."""
    if hasattr(device, "type"):
        return device
    from nnunet_gemini.devices import resolve_device
    return resolve_device(device)


def _plans_and_dataset_json(candidates: Sequence[tuple]) -> tuple:
    """(plans, dataset_json, plans file) of the first (plans.json, dataset.json) pair that exists."""
    for plans_file, dataset_file in candidates:
        if os.path.isfile(plans_file) and os.path.isfile(dataset_file):
            from nnunet_gemini.datasets import load_json
            return load_json(plans_file), load_json(dataset_file), plans_file
    looked = "; ".join(p for p, _ in candidates)
    raise GeminiUserError(f"no plans/dataset.json found for this model (looked for {looked}): "
                          f"export nnUNet_preprocessed / nnUNet_results of the dataset it was trained on")


def _build_model(plans: dict, dataset_json: dict, configuration: str, network_weights: dict,
                 deformer_weights: Optional[dict], spec: dict, device, source: str,
                 plans_fix: str) -> RegistrationModel:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_gemini.gemini_step import step_from_spec
    from nnunet_gemini.network import build_segmentation_network
    from nnunet_gemini.pretrained import load_network_weights

    plans_manager = PlansManager(plans)
    if configuration not in plans["configurations"]:
        raise GeminiUserError(f"configuration {configuration!r} is not in the plans of {source}; "
                              f"choose one of {sorted(plans['configurations'])}")
    cm = plans_manager.get_configuration(configuration)
    if len(cm.patch_size) != 3:
        raise GeminiUserError(f"{source} uses the 2d configuration {configuration!r}; gemini_register "
                              f"registers volumes: use a model trained with a 3d configuration")
    if plans_manager.image_reader_writer_class is not SimpleITKIO:
        raise GeminiUserError(f"the plans of {source} read images with "
                              f"{plans_manager.image_reader_writer_class.__name__}; gemini_register needs "
                              f"SimpleITKIO (images SimpleITK reads, e.g. .nii.gz, .nrrd, .mha)")
    if not deformer_weights:
        raise GeminiUserError(f"{source} holds no deformer weights: use a gemini_pretrain checkpoint "
                              f"or an nnUNetTrainerGEMINI results folder")
    label_manager = plans_manager.get_label_manager(dataset_json)
    network = build_segmentation_network(plans_manager, cm, determine_num_input_channels(plans_manager, cm,
                                                                                         dataset_json),
                                         label_manager.num_segmentation_heads, enable_deep_supervision=False)
    # the one weight rule: all but .seg_layers. (labels; registration never uses them), each of the right shape
    load_network_weights(network, network_weights, source, fix=plans_fix)
    step = step_from_spec(network, spec)  # the deformer as the checkpoint's spec describes it
    try:
        step.deformer.load_state_dict(deformer_weights)
    except RuntimeError as e:
        raise GeminiUserError(f"{source}: its deformer weights do not fit a deformer built as {spec} "
                              f"({str(e).splitlines()[0]})") from e
    network.to(device).eval()
    step.to(device).eval()
    return RegistrationModel(network, step, plans_manager, cm, dataset_json, device, source, spec["deformation"])


def load_from_pretrain_checkpoint(path: str, device=None) -> RegistrationModel:
    """A gemini_pretrain checkpoint (checkpoint_final.pth); its meta names the dataset, plans,
    configuration and deformer; plans come from beside it or from nnUNet_preprocessed."""
    from nnunet_gemini.gemini_step import spec_from_checkpoint
    from nnunet_gemini.pretrained import load_pretrained_checkpoint

    ckpt = load_pretrained_checkpoint(path)
    meta = ckpt["meta"]
    beside = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    candidates = [(os.path.join(beside, "plans.json"), os.path.join(beside, "dataset.json"))]
    if os.environ.get("nnUNet_preprocessed"):
        folder = os.path.join(os.environ["nnUNet_preprocessed"], meta["dataset_name"])
        candidates.append((os.path.join(folder, meta["plans_identifier"] + ".json"),
                           os.path.join(folder, "dataset.json")))
    plans, dataset_json, plans_file = _plans_and_dataset_json(candidates)
    fix = (f"the network was built from {plans_file} ({meta['configuration']}), which are not the plans it was "
           f"pre-trained with: export the nnUNet_preprocessed it was pre-trained with, or put its plans as "
           f"plans.json (with dataset.json) in {beside}")
    return _build_model(plans, dataset_json, meta["configuration"], ckpt["network_weights"],
                        ckpt.get("deformer_weights"), spec_from_checkpoint(meta, where=path),
                        _as_device(device), f"checkpoint {path}", fix)


def load_from_trainer_results(dataset: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                              trainer: str = "nnUNetTrainerGEMINI", fold: str = "all",
                              checkpoint_name: str = "checkpoint_final.pth", deformation: Optional[str] = None,
                              device=None) -> RegistrationModel:
    """nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>/fold_<fold>/<checkpoint_name>
    of an nnUNetTrainerGEMINI-family run (its checkpoint's 'gemini' entry holds the deformer)."""
    from nnunet_gemini.checkpoints import load_nnunet_trainer_checkpoint
    from nnunet_gemini.datasets import require_env_folder, resolve_dataset
    from nnunet_gemini.gemini_step import spec_from_checkpoint

    dataset_name = resolve_dataset(dataset)
    folder = os.path.join(require_env_folder("nnUNet_results"), dataset_name,
                          f"{trainer}__{plans}__{configuration}")
    path = os.path.join(folder, f"fold_{fold}", checkpoint_name)
    ckpt = load_nnunet_trainer_checkpoint(path)
    ours = ckpt.get("gemini") or {}
    plans_dict, dataset_json, plans_file = _plans_and_dataset_json(
        [(os.path.join(folder, "plans.json"), os.path.join(folder, "dataset.json"))])
    recorded = ours.get("deformation")
    if deformation and recorded and deformation != recorded:
        raise GeminiUserError(f"--deformation {deformation}: {path} records deformation {recorded!r}; drop "
                              f"--deformation (it is only for checkpoints that do not record it).")
    spec = spec_from_checkpoint(dict(ours, deformation=recorded or deformation), where=path)
    fix = (f"the network was built from {plans_file}, which nnU-Net wrote beside it at the start of that training: "
           f"restore the plans.json of that training into {folder}, or train again")
    return _build_model(plans_dict, dataset_json, configuration, ckpt["network_weights"],
                        ours.get("deformer_weights"), spec, _as_device(device), f"results {path}", fix)
