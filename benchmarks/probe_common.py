"""What the probes share: a gemini_pretrain checkpoint as a model, and its pool's pairs without
augmentation (the probes measure the network, not the augmentation). Imported by the probe scripts,
which run as `python benchmarks/<probe>.py` (their folder is then on sys.path)."""
import torch


def checkpoint_and_pool_loader(checkpoint: str, pool: str):
    """-> (RegistrationModel on the CPU, its plans' patch size, an endless loader of 1-pair batches)."""
    from nnunet_gemini import unlabeled
    from nnunet_gemini.pairs import make_pair_loader
    from nnunet_gemini.register import load_from_pretrain_checkpoint

    model = load_from_pretrain_checkpoint(checkpoint, torch.device("cpu"))
    patch = model.configuration_manager.patch_size
    loader = make_pair_loader(unlabeled.load_pool_dataset(pool, unlabeled.pool_case_ids(pool)), 1, patch,
                              spatial_augmentation=False, intensity_augmentation=False)
    return model, patch, loader
