from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

__all__ = ["nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI_NoPretrain", "nnUNetTrainerGEMINIFinetune"]


class nnUNetTrainerGEMINI(nnUNetTrainer):
    pass


class nnUNetTrainerGEMINI_NoPretrain(nnUNetTrainerGEMINI):
    pass


class nnUNetTrainerGEMINIFinetune(nnUNetTrainerGEMINI):
    pass
