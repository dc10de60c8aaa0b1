"""nnU-Net trainers of nnunet-gemini (installed as nnunet_gemini.trainers)."""
from nnunet_gemini.trainers.nnUNetTrainerGEMINI import *  # noqa: F401,F403
