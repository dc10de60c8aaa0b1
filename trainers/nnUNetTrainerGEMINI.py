from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

__all__ = ["nnUNetTrainerGEMINI"]


class nnUNetTrainerGEMINI(nnUNetTrainer):
    pass
