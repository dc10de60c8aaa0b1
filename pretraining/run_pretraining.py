"""gemini_pretrain: GEMINI self-supervised pre-training on unlabelled volumes with nnU-Net's plans.

    gemini_pretrain -d DATASET [-c 3d_fullres] [-p nnUNetPlans] [-device cuda|cpu|mps] ...

Steps: (1) the unlabelled pool (imagesTr without labels, imagesUnlabeled/, --unlabeled_dir
folders, imagesTs only with --include_test_images) is preprocessed with the plan's own
preprocessor (only new cases); (2) the nnU-Net network of the plans + GEMINI heads are trained
(pretraining/pretrainer.py documents the loop and the chosen defaults); (3) checkpoint_final.pth
lands in nnUNet_results/DatasetXXX/GEMINIPretrain__<plans>__<configuration>/fold_all/ (or -o);
`nnUNetv2_train ... -pretrained_weights <it>` accepts it, and our trainers find it by themselves.

Pre-train once, fine-tune many: pre-train with the TARGET dataset's plans and point
--unlabeled_dir at the large collection (it is preprocessed with those plans); other datasets
fine-tune from the same file once they use the same plans (nnUNetv2_move_plans_between_datasets).
Architecture, channels and normalisation must match (error); spacing / patch size may differ
(warning).

Several GPUs: -num_gpus N starts N processes (DDP, NCCL on CUDA, gloo on CPU); the batch of
pairs is split across them, rank 0 logs and saves. Several nodes: launch this same command with
torchrun (it reads RANK / WORLD_SIZE / LOCAL_RANK and joins with init_process_group("env://")).
"""
import argparse
import os
import sys
from dataclasses import asdict
from typing import Optional

from nnunet_gemini.choices import DEFORMATIONS, DEFORMER_INPUTS, PRETRAIN_DEFAULTS, RESTORATION_MODES
from nnunet_gemini.devices import end_process_group
from nnunet_gemini.errors import GeminiUserError, run_cli


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """States every default; flags whose default is computed say so in their own help."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    # defaults and choices from nnunet_gemini.choices (torch-free: --help must not import torch)
    p = argparse.ArgumentParser(
        prog="gemini_pretrain", formatter_class=_HelpFormatter,
        description="GEMINI self-supervised pre-training (deformable homeomorphism + semantic similarity "
                    "+ Models Genesis restoration) of the nnU-Net network of a planned dataset. Output: "
                    "nnUNet_results/DatasetXXX/GEMINIPretrain__<plans>__<configuration>/fold_all/"
                    "checkpoint_final.pth, usable with nnUNetv2_train -pretrained_weights.")
    p.add_argument("-d", dest="dataset", required=True, help="dataset id or name (planned and preprocessed)")
    p.add_argument("-c", dest="configuration", default="3d_fullres", help="nnU-Net configuration")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-device", dest="device", default=None, choices=("cuda", "cpu", "mps"),
                   help="device (default: cuda if available, else cpu)")
    p.add_argument("-num_gpus", dest="num_gpus", type=int, default=1,
                   help="data-parallel processes on this machine (DDP; with -device cpu they use gloo)")
    p.add_argument("-np", dest="num_processes", type=int, default=None,
                   help="processes for preprocessing the unlabelled pool (default: nnUNet_def_n_proc or 8)")
    p.add_argument("--c", dest="continue_training", action="store_true",
                   help="continue from checkpoint_latest.pth of the output folder")
    p.add_argument("--epochs", type=int, default=PRETRAIN_DEFAULTS["epochs"], help="epochs")
    p.add_argument("--iters_per_epoch", type=int, default=PRETRAIN_DEFAULTS["iters_per_epoch"],
                   help="iterations per epoch (default total: 2e5, as released)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="pairs per iteration over all processes (default: half the plans' batch size, "
                        "at least 1)")
    p.add_argument("--lr", type=float, default=PRETRAIN_DEFAULTS["lr"], help="Adam learning rate (constant)")
    p.add_argument("--deformer_lr", type=float, default=None,
                   help="the deformer's Adam learning rate (constant; default: --lr, one optimiser as released)")
    p.add_argument("--deformation", default=PRETRAIN_DEFAULTS["deformation"], choices=DEFORMATIONS,
                   help="deformation model: velocity field integrated by scaling and squaring, or the "
                        "released direct displacement")
    p.add_argument("--deformer_input", default=PRETRAIN_DEFAULTS["deformer_input"], choices=DEFORMER_INPUTS,
                   help="what the deformer sees of each image: the network's decoder features (as released), the "
                        "images (as VoxelMorph), or both; the trainers that load the checkpoint build it the same")
    p.add_argument("--unlabeled_dir", dest="unlabeled_dirs", nargs="+", action="extend", default=[],
                   help="extra folders of CASE_XXXX<file_ending> images for the pool")
    p.add_argument("--include_test_images", action="store_true", help="also put imagesTs into the pool")
    p.set_defaults(restoration=True)  # before add_argument: the help then says "default: on", not True
    p.add_argument("--no_restoration", dest="restoration", action="store_false", default=argparse.SUPPRESS,
                   help="turn off the Models Genesis restoration task (default: on)")
    p.add_argument("--restoration_mode", default=PRETRAIN_DEFAULTS["restoration_mode"], choices=RESTORATION_MODES,
                   help="joint: one forward and one step for both losses; separate: the released two "
                        "forwards and two optimiser steps per iteration")
    p.add_argument("--restoration_weight", type=float, default=PRETRAIN_DEFAULTS["restoration_weight"],
                   help="weight W of the restoration MSE (100, as released; --no_restoration turns the task off)")
    p.add_argument("--decorrelation", type=float, default=PRETRAIN_DEFAULTS["decorrelation"],
                   help="weight of a decorrelation term on the features' channels (ours; 0: off, as released: "
                        "GSS has no negatives, and without it the features collapse into few dimensions)")
    p.add_argument("--encoder_decorrelation", type=float, default=PRETRAIN_DEFAULTS["encoder_decorrelation"],
                   help="weight of the same term on every encoder stage's output, averaged over the stages "
                        "(ours; 0: off, as released)")
    p.add_argument("--preprocess_only", action="store_true", help="stop after preprocessing the pool")
    p.add_argument("--strict", action="store_true",
                   help="unreadable or non-finite pool images are errors instead of skipped cases")
    p.add_argument("-o", dest="output_dir", default=None,
                   help="output folder (default: nnUNet_results/DatasetXXX/GEMINIPretrain__<plans>__"
                        "<configuration>/fold_all)")
    p.add_argument("--save_every", type=int, default=PRETRAIN_DEFAULTS["save_every"],
                   help="epochs between checkpoint_latest.pth saves (--c loses at most this many)")
    p.add_argument("--max_nonfinite", type=int, default=PRETRAIN_DEFAULTS["max_nonfinite"],
                   help="non-finite losses in a row (each update skipped) before training stops")
    p.add_argument("--example_every", type=int, default=PRETRAIN_DEFAULTS["example_every"],
                   help="epochs between example PNGs (pair registration, restoration)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA; also nnUNet_compile=1)")
    p.add_argument("--seed", type=int, default=PRETRAIN_DEFAULTS["seed"], help="random seed")
    return p


def options_from_args(args: argparse.Namespace):
    from nnunet_gemini.devices import default_device
    from nnunet_gemini.pretraining.pretrainer import PretrainOptions
    for name in ("epochs", "iters_per_epoch", "save_every", "max_nonfinite", "example_every", "num_gpus"):
        if getattr(args, name) < 1:
            raise GeminiUserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.batch_size is not None and args.batch_size < 1:
        raise GeminiUserError(f"--batch_size must be >= 1, got {args.batch_size}")
    for name in ("decorrelation", "encoder_decorrelation"):
        if not 0 <= getattr(args, name) < float("inf"):
            raise GeminiUserError(f"--{name} must be a finite weight >= 0 (0: off), got {getattr(args, name)}")
    if not 0 < args.restoration_weight < float("inf"):
        raise GeminiUserError(f"--restoration_weight must be a finite weight > 0, got {args.restoration_weight} "
                              "(to pre-train without restoration, pass --no_restoration)")
    for name in ("lr", "deformer_lr"):
        if getattr(args, name) is not None and not 0 < getattr(args, name) < float("inf"):
            raise GeminiUserError(f"--{name} must be a finite learning rate > 0, got {getattr(args, name)}")
    num_processes = args.num_processes or int(os.environ.get("nnUNet_def_n_proc", 8))
    return PretrainOptions(
        dataset=args.dataset, configuration=args.configuration, plans=args.plans,
        device=args.device or default_device(), num_gpus=args.num_gpus, num_processes=num_processes,
        continue_training=args.continue_training, epochs=args.epochs, iters_per_epoch=args.iters_per_epoch,
        batch_size=args.batch_size, lr=args.lr, deformer_lr=args.deformer_lr, deformation=args.deformation,
        deformer_input=args.deformer_input,
        unlabeled_dirs=[os.path.abspath(d) for d in args.unlabeled_dirs],
        include_test_images=args.include_test_images, restoration=args.restoration,
        restoration_mode=args.restoration_mode, decorrelation=args.decorrelation,
        encoder_decorrelation=args.encoder_decorrelation,
        restoration_weight=args.restoration_weight, strict=args.strict,
        output_dir=os.path.abspath(args.output_dir) if args.output_dir else None, save_every=args.save_every,
        max_nonfinite=args.max_nonfinite, example_every=args.example_every, compile=args.compile, seed=args.seed)


def preprocess(options) -> None:
    from nnunet_gemini import datasets, unlabeled
    dataset_name = datasets.resolve_dataset(options.dataset)
    datasets.require_planned(dataset_name, options.plans, options.configuration)
    summary = unlabeled.preprocess_pool(dataset_name, options.plans, options.configuration,
                                        num_processes=options.num_processes,
                                        unlabeled_dirs=options.unlabeled_dirs,
                                        include_test_images=options.include_test_images, strict=options.strict)
    print(f"unlabelled pool: {summary.num_cases} case(s) in {summary.folder} "
          f"({len(summary.processed)} preprocessed now, {len(summary.skipped)} skipped)", flush=True)


def _train(options, rank: int, world_size: int, local_rank: int) -> str:
    from nnunet_gemini.pretraining.pretrainer import GeminiPretrainer
    return GeminiPretrainer(options, rank=rank, world_size=world_size, local_rank=local_rank).run()


def _preflight(options, world_size: int) -> None:
    """Output folder, free disk and downstream loadability, checked once before the processes
    of a data-parallel run start (a single process checks inside run())."""
    from nnunet_gemini.pretraining.pretrainer import GeminiPretrainer
    GeminiPretrainer(options, rank=0, world_size=world_size).check_before_training()


def _spawned_rank(rank: int, world_size: int, options_dict: dict, port: int) -> None:
    """Entry of each -num_gpus process (torch.multiprocessing.spawn)."""
    import torch
    import torch.distributed as dist

    from nnunet_gemini.pretraining.pretrainer import PretrainOptions
    options = PretrainOptions(**options_dict)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if options.device == "cuda" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    if options.device == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    finished = False
    try:
        _train(options, rank, world_size, local_rank=rank)
        finished = True
    except GeminiUserError as e:
        if rank == 0:
            print(f"ERROR: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2)
    finally:
        end_process_group(finished)


def _torchrun_env() -> Optional[tuple]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return None


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    launched = _torchrun_env()
    if launched is not None:  # torchrun: every process runs this; rank 0 prepares and checks
        import torch.distributed as dist
        rank, world_size, local_rank = launched
        if rank == 0:
            preprocess(options)
            if not args.preprocess_only:
                _preflight(options, world_size)
        # the other ranks wait here until rank 0 joins (after its preparation)
        dist.init_process_group("nccl" if options.device == "cuda" else "gloo", init_method="env://")
        finished = False
        try:
            if not args.preprocess_only:
                _train(options, rank, world_size, local_rank)
            finished = True
        finally:
            end_process_group(finished)
        return 0
    preprocess(options)
    if args.preprocess_only:
        return 0
    if options.num_gpus > 1:
        if options.device == "mps":
            raise GeminiUserError("-num_gpus > 1 needs -device cuda or cpu (no multi-process MPS).")
        if options.device == "cuda":
            import torch
            if torch.cuda.device_count() < options.num_gpus:
                raise GeminiUserError(f"-num_gpus {options.num_gpus} but only {torch.cuda.device_count()} "
                                      f"CUDA device(s) are visible: lower -num_gpus.")
        _preflight(options, options.num_gpus)
        import torch.multiprocessing as mp
        try:
            from nnunetv2.run.run_training import find_free_network_port
            mp.spawn(_spawned_rank, args=(options.num_gpus, asdict(options), find_free_network_port()),
                     nprocs=options.num_gpus, join=True)
        except mp.ProcessExitedException as e:
            raise GeminiUserError(f"a pre-training process exited with status {e.exit_code} (see its "
                                  f"message above); fix it and resume with --c.") from None
        return 0
    _train(options, 0, 1, 0)
    return 0


def main(argv=None) -> int:
    rc = run_cli(_main, argv)
    if __name__ == "__main__" or argv is None:
        sys.exit(rc)
    return rc


if __name__ == "__main__":
    main()
