"""One rank of a 2-process CPU (gloo) DDP training of an nnU-Net trainer, for test_trainers.py.

nnU-Net's own DDP entry (`nnUNetv2_train -num_gpus N`) hard-codes NCCL and CUDA devices; this
worker runs the same trainer code path on the CPU: env:// rendezvous (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), gloo, and two CUDA assumptions of nnUNetTrainer undone (its device
and the DDP wrap's device_ids). Each rank writes rank<R>.pt with its final network and deformer
weights so the test can compare the ranks.

    python tests/ddp_trainer_worker.py DATASET CONFIGURATION TRAINER OUT_DIR
"""
import os
import sys

import torch
import torch.distributed as dist

from nnunet_gemini.devices import end_process_group


def main(dataset: str, configuration: str, trainer_name: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as base
    from torch.nn.parallel import DistributedDataParallel
    # CPU modules take no device_ids (nnU-Net passes [local_rank] for its CUDA devices)
    base.DDP = lambda module, device_ids=None, **kw: DistributedDataParallel(module, **kw)
    from nnunetv2.run.run_training import get_trainer_from_args
    trainer = get_trainer_from_args(dataset, configuration, "all", trainer_name, "nnUNetPlans",
                                    device=torch.device("cpu"))
    trainer.device = torch.device("cpu")  # nnUNetTrainer sets cuda:<rank> under DDP
    trainer.grad_scaler = None
    torch.manual_seed(1000 + dist.get_rank())  # ranks must not agree by accident of a shared seed
    trainer.run_training()
    deformer = getattr(trainer, "gemini_deformer", None)
    torch.save({"network": {k: v.detach().clone() for k, v in trainer._plain_network().state_dict().items()}
                if hasattr(trainer, "_plain_network") else trainer.network.module.state_dict(),
                "deformer": deformer.state_dict() if deformer is not None else None,
                "unlabeled_batch": getattr(trainer, "unlabeled_batch", None),
                "batch_size": trainer.batch_size,
                "output_folder": trainer.output_folder},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    end_process_group(finished=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
