"""nnU-Net trainers of nnunet-gemini (installed as nnunet_gemini.trainers).

Every name in __all__ is re-exported by the trainer shim that nnU-Net searches for `-tr NAME`.
"""
from nnunet_gemini.trainers import variants
from nnunet_gemini.trainers.nnUNetTrainerGEMINI import (
                                                        nnUNetTrainerGEMINI,
                                                        nnUNetTrainerGEMINI_NoPretrain,
                                                        nnUNetTrainerGEMINIFinetune,
)
from nnunet_gemini.trainers.variants import *  # noqa: F401,F403  nnUNetTrainerEnvBudget, length variants

__all__ = ["nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI_NoPretrain", "nnUNetTrainerGEMINIFinetune",
           *variants.__all__]
