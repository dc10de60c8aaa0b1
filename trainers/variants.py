"""Trainer variants in nnU-Net's naming style: each only sets attributes."""
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_gemini.trainers.nnUNetTrainerGEMINI import (
    nnUNetTrainerGEMINI,
    nnUNetTrainerGEMINI_NoPretrain,
    nnUNetTrainerGEMINIFinetune,
)
from nnunet_gemini.trainers.options import apply_budget, describe, perform_final_validation, read_env_options


class nnUNetTrainerEnvBudget(nnUNetTrainer):
    """Plain supervised nnUNetTrainer honouring the nnUNet_gemini_* budget variables (not the GEMINI
    schedule options): the baseline for demo/benchmark."""

    def initialize(self):
        options = read_env_options()
        apply_budget(self, options)
        super().initialize()
        self.print_to_log_file(f"{type(self).__name__} options:\n{describe(options)}\n  -> num_epochs "
                               f"{self.num_epochs}, iterations/epoch {self.num_iterations_per_epoch}, val "
                               f"iterations/epoch {self.num_val_iterations_per_epoch}", add_timestamp=False)

    def perform_actual_validation(self, save_probabilities: bool = False):
        perform_final_validation(self, save_probabilities)  # nnUNet_gemini_final_validation=0 skips it


def _length_variant(base, epochs: int):
    def __init__(self, plans, configuration, fold, dataset_json, device=None):
        import torch
        base.__init__(self, plans, configuration, fold, dataset_json,
                      torch.device('cuda') if device is None else device)
        self.num_epochs = epochs
    return __init__


# nnU-Net's own variants write out each class; the same here, generated to stay in sync.
_LENGTHS = (100, 250, 500)
_BASES = (nnUNetTrainerGEMINI, nnUNetTrainerGEMINI_NoPretrain, nnUNetTrainerGEMINIFinetune)
__all__ = ["nnUNetTrainerEnvBudget"]
for _base in _BASES:
    for _epochs in _LENGTHS:
        _name = f"{_base.__name__}_{_epochs}epochs"
        globals()[_name] = type(_name, (_base,), {"__init__": _length_variant(_base, _epochs),
                                                  "__module__": __name__,
                                                  "__doc__": f"{_base.__name__} with {_epochs} epochs."})
        __all__.append(_name)
