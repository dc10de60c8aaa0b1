"""nnUNetTrainerGEMINI: nnU-Net training with a GEMINI pre-trained start and a semi-supervised
GEMINI loss on unlabelled inter-subject pairs.

Every iteration runs ONE network forward on cat(labelled batch, pair images a, pair images b) and
ONE backward: nnU-Net's loss (Dice + CE, deep supervision) on the labelled slice of the outputs,
the shared GeminiStep on the last decoder stage's features of the a/b slices, total = supervised
+ w * gemini with w = nnUNet_gemini_weight x the ramp-up factor (nnUNet_gemini_rampup, a share of
the run, per iteration).

Two optimisers. The network keeps nnU-Net's SGD + poly (initial lr nnUNet_gemini_lr; an optional
linear warm-up, nnUNet_gemini_warmup, scales it per iteration because the poly scheduler steps per
epoch); w only sets how strongly GEMINI shapes the backbone. The deformer has the released
constant Adam of its own (nnUNet_gemini_deformer_lr); it receives gradient only through
w * gemini, so its gradients are divided by w before its step and its learning does not depend on
the weight, the ramp-up or the poly schedule. Gradients are clipped per module. How this balance
relates to the released two Adam steps: docs/method.md. `self.network` stays the plain nnU-Net
network (prediction loads it strictly); the deformer lives beside it.

Pre-trained start, one rule: unless load_checkpoint is restoring a trainer checkpoint (--c on a
fold that has one, --val), initialize() loads the gemini_pretrain checkpoint of this dataset /
plans / configuration (nnUNet_gemini_auto_pretrained=0 switches it off); `--c` on a fold without a
checkpoint is a fresh start, as in nnU-Net. nnU-Net's -pretrained_weights is loaded after
initialize() and so overrides the network part. The deformer is built as the checkpoint it comes
from describes it (gemini_step.deformer_spec): the pre-training's on a fresh start, the trainer
checkpoint's on --c.
"""
import os
import sys
from typing import List, Optional, Union

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import autocast

from nnunet_gemini import cpu_allocator
from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.guarded_step import GRAD_CLIP, TEST_NONFINITE_ENV, Group, GuardedStep
from nnunet_gemini.trainers.options import (
    apply_budget,
    describe,
    is_set,
    perform_final_validation,
    rampup_factor,
    read_env_options,
    warmup_factor,
)
from nnunet_gemini.trainers.progress import GEMINI_TERMS, SKIPPED_KEY, GeminiLocalLogger

__all__ = ["nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI_NoPretrain", "nnUNetTrainerGEMINIFinetune",
           "TEST_NONFINITE_ENV"]

CHECKPOINT_KEY = "gemini"  # our extra entry in nnU-Net's checkpoint dict
# Both optimisers clip at guarded_step.GRAD_CLIP (nnU-Net's 12), each over its own parameters (the
# deformer's on its 1/weight-rescaled gradients). The test hook of the non-finite guard is
# guarded_step.TEST_NONFINITE_ENV (GEMINI_TEST_NONFINITE_ITERS="i,j,k+"), re-exported here.


def _refuse_cascade(plans: dict, configuration: str) -> None:
    config = PlansManager(plans).get_configuration(configuration)
    if configuration == "3d_cascade_fullres" or config.previous_stage_name is not None:
        raise GeminiUserError(
            f"configuration {configuration!r} is a cascade stage (previous stage "
            f"{config.previous_stage_name!r}); the nnunet-gemini trainers do not support the 3d cascade yet. "
            f"Train 3d_fullres, 3d_lowres or 2d with -tr nnUNetTrainerGEMINI, or the cascade with nnUNetTrainer.")


def refuse_uneven_ddp_batch(global_batch: int, world_size: int, batch_dice: bool) -> None:
    """nnU-Net splits the batch over DDP ranks unevenly when it does not divide (5 over 2 GPUs:
    3 + 2), and its batch Dice then all-gathers per-rank tensors of different sizes: gloo fails
    with "Received data size doesn't match", NCCL may hang. Fail before any work instead."""
    if world_size > 1 and batch_dice and global_batch % world_size:
        raise GeminiUserError(
            f"the plans' batch size {global_batch} does not split evenly over {world_size} GPUs (-num_gpus), "
            f"which nnU-Net's batch Dice loss cannot handle under DDP. Use a -num_gpus that divides "
            f"{global_batch}, or set the configuration's batch_size in the plans to a multiple of {world_size} "
            f"(nnU-Net's documentation/explanation_plans_files.md).")


def _state_fingerprint(module: torch.nn.Module) -> List[float]:
    """Cheap summary of a module's weights, to notice that someone replaced them."""
    with torch.no_grad():
        return [float(t.double().sum()) for t in module.state_dict().values() if t.is_floating_point()]


class nnUNetTrainerGEMINI(nnUNetTrainer):
    # variant switches (nnU-Net style: class attributes, no constructor arguments)
    gemini_semi_supervised = True   # GEMINI loss on unlabelled pairs each iteration
    auto_pretrained_allowed = True  # load a gemini_pretrain checkpoint on a fresh training
    requires_pretrained = False     # refuse to start without one

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        _refuse_cascade(plans, configuration)
        self.gemini_options = read_env_options()  # invalid values fail before any work
        if self.gemini_semi_supervised and not self.gemini_options.weight > 0:
            raise GeminiUserError(
                f"nnUNet_gemini_weight={self.gemini_options.weight:g} switches the GEMINI loss off, but "
                f"{type(self).__name__} trains with it (its deformer learns only through it): set "
                f"nnUNet_gemini_weight > 0 (default 1) or unset it; for supervised training only, train "
                f"nnUNetTrainerGEMINIFinetune (pre-trained start) or nnUNetTrainer.")
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.gemini_semi_supervised:
            self.logger.local_logger = GeminiLocalLogger(self.logger.local_logger.verbose)
        self.gemini_weight = self.gemini_options.weight
        self.gemini_rampup = self.gemini_options.rampup
        from nnunet_gemini.gemini_step import deformer_spec
        # how the deformer is built: the defaults, or the checkpoint's it is loaded from (set before initialize)
        self.deformer_spec = deformer_spec(self.gemini_options.deformation, input=self.gemini_options.deformer_input)
        self.gemini_step = None        # -> configure_optimizers (owns the deformer)
        self.gemini_deformer = None    # -> configure_optimizers
        self.deformer_optimizer = None  # -> configure_optimizers
        self._poly_lr = None           # the network's lr the poly scheduler set this epoch (before warm-up)
        self.pair_loader = None        # -> on_train_start
        self.pretrained_source: Optional[str] = None  # gemini_pretrain checkpoint used, if any
        self.pretrained_deformer_source: Optional[str] = None  # the same, where the deformer came from it too
        # one policy with gemini_pretrain: a non-finite loss skips backward and step on all ranks together
        self.guarded_step = GuardedStep(
            self.gemini_options.max_nonfinite, "nnUNet_gemini_max_nonfinite", self.print_to_log_file,
            f"Lower nnUNet_gemini_weight (now {self.gemini_weight}), check the images for extreme values",
            distributed=self.is_ddp)
        self.global_iteration = 0
        self._epoch_skipped = 0
        self._restoring_checkpoint = False
        self._split_keys = None
        self._feature_tap = None
        self._network_fingerprint = None

    # ------------------------------------------------------------------ setup
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True):
        from nnunet_gemini.network import build_segmentation_network
        return build_segmentation_network(plans_manager, configuration_manager, num_input_channels,
                                          num_output_channels, enable_deep_supervision)

    def configure_optimizers(self):
        # nnU-Net calls this right after building the network: the network keeps nnU-Net's SGD + poly
        # (from self.initial_lr); the deformer, built here as self.deformer_spec says, gets the
        # released constant Adam of its own, so neither the weight nor the poly decay slows it.
        optimizer, lr_scheduler = super().configure_optimizers()
        if self.gemini_semi_supervised:
            from nnunet_gemini.gemini_step import step_from_spec
            self.gemini_step = step_from_spec(self.network, self.deformer_spec).to(self.device)
            self.gemini_deformer = self.gemini_step.deformer
            self.deformer_optimizer = torch.optim.Adam(self.gemini_deformer.parameters(),
                                                       lr=self.gemini_options.deformer_lr)
        return optimizer, lr_scheduler

    @property
    def total_iterations(self) -> int:
        """Training iterations of the whole run: what the ramp-up and warm-up shares refer to."""
        return self.num_epochs * self.num_iterations_per_epoch

    def initialize(self):
        apply_budget(self, self.gemini_options)
        self.initial_lr = self.gemini_options.lr  # nnU-Net's SGD + poly start from it (configure_optimizers)
        if self.is_ddp:
            import torch.distributed as dist
            refuse_uneven_ddp_batch(self.configuration_manager.batch_size, dist.get_world_size(),
                                    self.configuration_manager.batch_dice)
        if self.gemini_options.unlabeled_batch is not None:
            self.unlabeled_batch = self.gemini_options.unlabeled_batch
        else:
            self.unlabeled_batch = max(1, self.configuration_manager.batch_size // 2)
        # read before the deformer is built: it must be built like the pre-training's
        pretrained_ckpt = self._find_pretrained()
        super().initialize()
        self.print_to_log_file(f"nnunet-gemini trainer {type(self).__name__} options:\n"
                               f"{describe(self.gemini_options)}\n"
                               f"  -> num_epochs {self.num_epochs}, iterations/epoch {self.num_iterations_per_epoch}, "
                               f"val iterations/epoch {self.num_val_iterations_per_epoch}, "
                               f"labelled batch {self.batch_size}, unlabelled pairs/iteration "
                               f"{self.unlabeled_batch if self.gemini_semi_supervised else 0} "
                               f"({'GEMINI loss on' if self.gemini_semi_supervised else 'supervised only'})\n"
                               f"{self._describe_schedule()}", add_timestamp=False)
        if self.is_ddp and self.gemini_semi_supervised:  # pairs are split over ranks like nnU-Net's batch
            import torch.distributed as dist
            world, rank = dist.get_world_size(), dist.get_rank()
            if self.unlabeled_batch < world:
                raise GeminiUserError(f"nnUNet_gemini_unlabeled_batch={self.unlabeled_batch} pairs cannot be split "
                                      f"over {world} GPUs: set it to at least {world}.")
            self.unlabeled_batch = self.unlabeled_batch // world + (1 if rank < self.unlabeled_batch % world else 0)
        if pretrained_ckpt is not None:
            self._apply_pretrained(*pretrained_ckpt)
        if self.is_ddp and self.gemini_semi_supervised:
            # DDP broadcasts the network from rank 0 when it wraps it; the deformer is not wrapped
            # (see _average_deformer_gradients), so rank 0's is broadcast here: without it each rank
            # would train its own randomly initialised deformer (gradients averaged, weights apart).
            import torch.distributed as dist
            for tensor in self.gemini_deformer.state_dict().values():
                dist.broadcast(tensor, src=0)
        if self.gemini_semi_supervised:
            from nnunet_gemini.network import DecoderFeatureTap
            self._feature_tap = DecoderFeatureTap(self.network)
        self._network_fingerprint = _state_fingerprint(self._plain_network())

    def _describe_schedule(self) -> str:
        """The options block's derived lines: both optimisers and the shares in iterations."""
        o, total = self.gemini_options, self.total_iterations
        text = (f"  -> network: SGD + poly from lr {self.initial_lr:g}, linear warm-up over "
                f"{round(o.warmup * total)} of {total} iterations")
        if self.gemini_semi_supervised:
            spec = self.gemini_step.spec()
            text += (f"\n  -> deformer: Adam lr {o.deformer_lr:g} (constant, gradients / effective weight), "
                     f"{spec['deformation']}, {spec['resolution']} resolution, "
                     f"{'both directions' if spec['bidirectional'] else 'one direction'}, "
                     f"{spec['integration_steps']} integration steps, sees the {spec['input']}\n"
                     f"  -> GEMINI weight {self.gemini_weight:g}, ramp-up over {round(o.rampup * total)} iterations")
        return text

    def _plain_network(self) -> torch.nn.Module:
        from nnunet_gemini.network import unwrap_network
        return unwrap_network(self.network)

    def _find_pretrained(self):
        """(path, checkpoint) of the gemini_pretrain checkpoint to start from, or None (logged why).
        Sets the deformer spec to the checkpoint's (nnUNet_gemini_deformation, when set, wins).
        The only signal of a resume is load_checkpoint: `--c` on a fold without a checkpoint is a
        fresh start in nnU-Net (it never calls load_checkpoint), so it loads the pre-training too."""
        if self._restoring_checkpoint:
            return None  # --c / --val: the weights come from our own trainer checkpoint
        if not self.auto_pretrained_allowed:
            self.print_to_log_file(f"{type(self).__name__}: automatic pre-trained load is off for this variant; "
                                   "network and deformer start from random initialisation.")
            return None
        from nnunet_gemini import pretrained
        names = (self.plans_manager.dataset_name, self.plans_manager.plans_name, self.configuration_name)
        if not self.gemini_options.auto_pretrained:
            if self.requires_pretrained:
                raise GeminiUserError(f"{type(self).__name__} fine-tunes a gemini_pretrain checkpoint, but "
                                      "nnUNet_gemini_auto_pretrained=0 switches loading it off: unset it, or train "
                                      "nnUNetTrainerGEMINI_NoPretrain / nnUNetTrainer instead.")
            self.print_to_log_file("nnUNet_gemini_auto_pretrained=0: no automatic pre-trained load; "
                                   "network and deformer start from random initialisation.")
            return None
        path = pretrained.find_pretrained_checkpoint(*names)
        if path is None:
            expected_dir = pretrained.pretrain_output_dir(*names)
            if self.requires_pretrained:
                from nnunet_gemini.datasets import dataset_id_of
                did = dataset_id_of(self.plans_manager.dataset_name)
                raise GeminiUserError(
                    f"{type(self).__name__} needs a gemini_pretrain checkpoint, but none was found in "
                    f"{expected_dir}: run `gemini_pretrain -d {did} -p {self.plans_manager.plans_name} "
                    f"-c {self.configuration_name}` first (or train nnUNetTrainerGEMINI_NoPretrain).")
            self.print_to_log_file(f"No gemini_pretrain checkpoint in {expected_dir}: network and deformer start "
                                   f"from random initialisation.")
            return None
        ckpt = pretrained.load_pretrained_checkpoint(path)
        from nnunet_gemini.gemini_step import spec_from_checkpoint
        spec = spec_from_checkpoint(ckpt.get("meta", {}), where=f"the gemini_pretrain checkpoint {path}")
        chosen = self.gemini_options.deformation
        if is_set("deformation") and chosen != spec["deformation"]:
            self.print_to_log_file(f"WARNING: {path} was pre-trained with deformation {spec['deformation']!r}, this "
                                   f"run uses {chosen!r} (nnUNet_gemini_deformation): the deformer's output "
                                   f"changes meaning.")
            # same weights either way; a displacement needs both directions (no closed-form inverse)
            spec = dict(spec, deformation=chosen, bidirectional=spec["bidirectional"] or chosen == "displacement")
        if is_set("deformer_input") and self.gemini_options.deformer_input != spec["input"]:
            if self.gemini_semi_supervised and self.gemini_options.transfer == "all":
                # weights for another input cannot be loaded: never a silently fresh deformer
                raise GeminiUserError(
                    f"{path} holds a deformer that sees the {spec['input']}, but nnUNet_gemini_deformer_input="
                    f"{self.gemini_options.deformer_input} asks for another: unset it (or set it to {spec['input']}) "
                    f"to load the pre-trained deformer, set nnUNet_gemini_transfer=encoder to start a fresh "
                    f"deformer, or pre-train with gemini_pretrain --deformer_input "
                    f"{self.gemini_options.deformer_input}.")
            spec = dict(spec, input=self.gemini_options.deformer_input)  # the deformer starts fresh anyway
        self.deformer_spec = spec
        return path, ckpt

    def _apply_pretrained(self, path: str, ckpt: dict) -> None:
        from nnunet_gemini import pretrained
        from nnunet_gemini.checkpoints import network_compatibility_fields
        expected = network_compatibility_fields(self.plans_manager, self.configuration_manager,
                                                self.num_input_channels)
        transfer = self.gemini_options.transfer
        deformer = self.gemini_deformer if self.gemini_semi_supervised and transfer == "all" else None
        warnings = pretrained.apply_pretrained(
            ckpt, self._plain_network(), deformer, expected,
            checkpoint_name=f"the gemini_pretrain checkpoint {path} (for {self.plans_manager.dataset_name} "
                            f"{self.plans_manager.plans_name} {self.configuration_name})", transfer=transfer)
        self.pretrained_source = path
        self.pretrained_deformer_source = path if deformer is not None else None
        what = ("backbone into the network (new segmentation layers)" if transfer == "all" else
                "encoder into the network's encoder (nnUNet_gemini_transfer=encoder: decoder"
                f"{' and deformer' if self.gemini_semi_supervised else ''} from random initialisation)")
        self.print_to_log_file(f"Loaded the gemini_pretrain checkpoint {path}: {what}"
                               f"{', deformer into the deformer' if deformer is not None else ''}.")
        for w in warnings:
            self.print_to_log_file(f"WARNING: {w}")

    def do_split(self):
        tr_keys, val_keys = super().do_split()
        self._split_keys = (list(tr_keys), list(val_keys))
        return tr_keys, val_keys

    def on_train_start(self):
        super().on_train_start()
        self._check_room_for_a_checkpoint()
        self._log_weights_in_use()
        cpu_allocator.for_training_on(self.device, self.print_to_log_file)
        if self.gemini_semi_supervised:
            self.pair_loader = self._start_pair_loader()

    def _check_room_for_a_checkpoint(self) -> None:
        """Fail before the first epoch, not at the first save hours later: the fold folder must be
        writable with room for one checkpoint (network weights + SGD momentum, deformer weights + two
        Adam moments; twice: the previous file stays until the new one is renamed over it)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        from nnunet_gemini.checkpoints import check_free_disk_and_writable, state_dict_nbytes
        needed = 4 * state_dict_nbytes(self._plain_network().state_dict())
        if self.gemini_deformer is not None:
            needed += 6 * state_dict_nbytes(self.gemini_deformer.state_dict())
        check_free_disk_and_writable(self.output_folder, needed + 2 ** 20,
                                     remedy="export nnUNet_results to another folder")

    def _log_weights_in_use(self) -> None:
        replaced = _state_fingerprint(self._plain_network()) != self._network_fingerprint
        if self._restoring_checkpoint:
            source = "the trainer checkpoint being continued"
        elif replaced:  # run_training loads -pretrained_weights after initialize()
            argv = sys.argv
            file = argv[argv.index("-pretrained_weights") + 1] if "-pretrained_weights" in argv[:-1] else "?"
            source = f"nnU-Net -pretrained_weights {file} (overrides the automatic load)"
        elif self.pretrained_source:
            source = f"gemini_pretrain checkpoint {self.pretrained_source}" + (
                " (encoder only)" if self.gemini_options.transfer == "encoder" else "")
        else:
            source = "random initialisation"
        deformer = ""
        if self.gemini_semi_supervised:
            deformer = (f"; deformer weights: {self.pretrained_deformer_source or 'random initialisation'}"
                        if not self._restoring_checkpoint else "; deformer weights: the trainer checkpoint")
        self.print_to_log_file(f"Network weights in use: {source}{deformer}.")

    def _start_pair_loader(self):
        from nnunet_gemini import unlabeled
        from nnunet_gemini.pairs import make_pair_loader, require_two_cases
        dataset, plans, config = (self.plans_manager.dataset_name, self.plans_manager.plans_name,
                                  self.configuration_name)
        pool_folder = unlabeled.pool_folder_for(dataset, plans, config)
        # under DDP rank 0 alone builds a missing pool; the others wait for it (two ranks writing
        # one manifest would race, and a rank reading a half-written pool would see too few cases)
        if self.local_rank == 0 and not os.path.isfile(os.path.join(pool_folder, unlabeled.MANIFEST_NAME)):
            self.print_to_log_file(f"Preprocessing the unlabelled pool into {pool_folder} (first use)...")
            unlabeled.preprocess_pool(dataset, plans, config, num_processes=1)
        if self.is_ddp:
            import torch.distributed as dist
            dist.barrier()
        tr_keys, val_keys = self._split_keys
        # fold 'all' validates on the training cases: then the labelled images stay in the pool
        exclude = [] if self.fold == "all" else val_keys
        case_ids = unlabeled.pool_case_ids(pool_folder, exclude=exclude)
        from nnunet_gemini.datasets import dataset_id_of
        require_two_cases(len(case_ids), pool_folder, excluded=" after removing this fold's validation cases",
                          dataset=dataset_id_of(dataset), alternative=", or train nnUNetTrainer")
        from_labelled = len(set(case_ids) & set(tr_keys))
        self.print_to_log_file(
            f"Labelled training cases: {len(tr_keys)}; validation cases: {len(val_keys)}. Unlabelled pool for "
            f"GEMINI pairs: {len(case_ids)} cases ({from_labelled} of them labelled training images, used without "
            f"labels; {len(exclude)} validation cases excluded) from {pool_folder}.")
        # nnU-Net's own choices for this configuration (mirroring, dummy 2d augmentation of
        # anisotropic 3d); rotation / scaling stay the pair loader's GEMINI defaults
        _, dummy_2d, _, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        return make_pair_loader(unlabeled.load_pool_dataset(pool_folder, case_ids), self.unlabeled_batch,
                                self.configuration_manager.patch_size, mirror_axes=mirror_axes,
                                do_dummy_2d_data_aug=dummy_2d, num_workers=get_allowed_n_proc_DA() // 2,
                                pin_memory=self.device.type == 'cuda',
                                positions=self.gemini_options.pair_positions)

    def on_train_end(self):
        super().on_train_end()
        if self.pair_loader is not None and hasattr(self.pair_loader, "_finish"):
            self.pair_loader._finish()
        self.pair_loader = None
        if self._feature_tap is not None:
            self._feature_tap.close()
            self._feature_tap = None

    def perform_actual_validation(self, save_probabilities: bool = False):
        perform_final_validation(self, save_probabilities)  # nnUNet_gemini_final_validation=0 skips it

    # ------------------------------------------------------------------ training
    def train_step(self, batch: dict) -> dict:
        self._apply_warmup()
        if not self.gemini_semi_supervised:
            result = super().train_step(batch)
            self.global_iteration += 1
            return result
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        pairs = next(self.pair_loader)
        img_a = pairs["a"].to(self.device, non_blocking=True)
        img_b = pairs["b"].to(self.device, non_blocking=True)
        n, p = data.shape[0], img_a.shape[0]

        self.optimizer.zero_grad(set_to_none=True)
        self.deformer_optimizer.zero_grad(set_to_none=True)
        weight = self.current_gemini_weight()
        try:
            with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
                output = self.network(torch.cat((data, img_a, img_b)))
                features = self._feature_tap.pop()
                labelled = [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]
                supervised = self.loss(labelled, target)
                gemini, logs = self.gemini_step(img_a, img_b, features[n:n + p], features[n + p:n + 2 * p])
                total = supervised + weight * gemini
            if self.guarded_step.inject(self.global_iteration):
                total = total * float("nan")
            finite = self._backward_and_step(total, weight)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(
                f"out of memory in a GEMINI training step ({n} labelled + 2 x {p} unlabelled patches of "
                f"{tuple(self.configuration_manager.patch_size)} in one forward): lower the unlabelled batch with "
                f"nnUNet_gemini_unlabeled_batch=N (now {self.unlabeled_batch}). Original error: {e}") from e
        self.global_iteration += 1
        if not finite:
            self._epoch_skipped += 1
        self.guarded_step.record(finite, self.global_iteration - 1, "" if finite else
                                 f"supervised {float(supervised.detach())}, gemini {float(gemini.detach())}")
        result = {'loss': supervised.detach().cpu().numpy()}
        for key, name in GEMINI_TERMS.items():
            result[key] = float(logs.get(name, np.nan)) if finite else np.nan
        return result

    def current_gemini_weight(self) -> float:
        """nnUNet_gemini_weight, ramped up per iteration over the first nnUNet_gemini_rampup of the run."""
        return self.gemini_weight * rampup_factor(self.global_iteration, self.gemini_rampup, self.total_iterations)

    def _apply_warmup(self) -> None:
        """nnU-Net's poly scheduler sets the network's lr once per epoch (on_train_epoch_start); the
        warm-up (nnUNet_gemini_warmup) scales that value per iteration, before this iteration's step."""
        if self._poly_lr is None:  # a train_step outside run_training's epoch loop
            self._poly_lr = self.optimizer.param_groups[0]['lr']
        lr = self._poly_lr * warmup_factor(self.global_iteration, self.gemini_options.warmup, self.total_iterations)
        for group in self.optimizer.param_groups:
            group['lr'] = lr

    def _average_deformer_gradients(self) -> None:
        """DDP averages the network's gradients; the deformer's are averaged here. A DDP wrap of
        the deformer is avoided on purpose: GeminiStep calls it twice per step (both directions),
        which DDP's once-per-forward bookkeeping does not allow."""
        import torch.distributed as dist
        world = dist.get_world_size()
        for q in self.gemini_deformer.parameters():
            if q.grad is None:
                q.grad = torch.zeros_like(q)
            dist.all_reduce(q.grad)
            q.grad.div_(world)

    def _backward_and_step(self, total: torch.Tensor, weight: float) -> bool:
        """The guarded step (nnunet_gemini.guarded_step) over both optimisers, in this order:
        backward -> DDP: the deformer's gradients averaged by hand -> unscale_ both -> the deformer's
        gradients / weight -> clip each at GRAD_CLIP -> step each -> scaler.update() once.
        Skipped on every rank together when the total is non-finite on any; returns whether it ran."""
        groups = [Group(self.optimizer, list(self.network.parameters()), GRAD_CLIP),
                  Group(self.deformer_optimizer, list(self.gemini_deformer.parameters()), GRAD_CLIP)]

        def unweight_deformer_gradients() -> None:
            # the deformer's gradient is weight * d gemini / d deformer (it is in no other term): without the
            # weight its Adam steps do not depend on nnUNet_gemini_weight or the ramp-up (weight > 0 always)
            for q in self.gemini_deformer.parameters():
                if q.grad is not None:
                    q.grad.div_(weight)

        return self.guarded_step.step(total, groups, self.grad_scaler,
                                      after_backward=self._average_deformer_gradients if self.is_ddp else None,
                                      after_unscale=unweight_deformer_gradients)

    def on_train_epoch_start(self):
        self._epoch_skipped = 0
        super().on_train_epoch_start()
        self._poly_lr = self.optimizer.param_groups[0]['lr']  # this epoch's poly value, before the warm-up

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        lr, poly = self.optimizer.param_groups[0]['lr'], self._poly_lr
        deformer = f", deformer Adam {self.deformer_optimizer.param_groups[0]['lr']:.4g}" \
            if self.deformer_optimizer is not None else ""
        self.print_to_log_file(f"learning rate in use at the last iteration: network {lr:.4g}"
                               + (f" (poly {poly:.4g} x warm-up {lr / poly:.3g})" if poly else "") + deformer)
        if not self.gemini_semi_supervised:
            return
        means = {k: np.array([o[k] for o in train_outputs], dtype=np.float64) for k in GEMINI_TERMS}
        skipped = self._epoch_skipped
        if self.is_ddp:
            import torch.distributed as dist
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (means, skipped))
            means = {k: np.concatenate([g[0][k] for g in gathered]) for k in GEMINI_TERMS}
            skipped = sum(g[1] for g in gathered)
        values = {k: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for k, v in means.items()}
        for key, value in values.items():
            self.logger.log(key, value, self.current_epoch)
        self.logger.log(SKIPPED_KEY, skipped, self.current_epoch)
        self.print_to_log_file("gemini " + ", ".join(f"{k[len('gemini_'):]} {v:.4f}" for k, v in values.items())
                               + f", weight {self.current_gemini_weight():.4g}, skipped updates {skipped}")

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        if self._feature_tap is not None:
            self._feature_tap.features = None  # no stale validation features held until the next step

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (network_weights stays the plain network, so nnUNetv2_predict works
        unchanged; optimizer_state is the network's SGD) plus our entry: the deformer's weights, its
        Adam state and spec, and counters. Written atomically."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        from nnunet_gemini.checkpoints import atomic_torch_save
        from nnunet_gemini.gemini_step import spec_to_checkpoint
        checkpoint = {
            'network_weights': self._plain_network().state_dict(),
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
            CHECKPOINT_KEY: {
                'deformer_weights': self.gemini_deformer.state_dict() if self.gemini_deformer is not None
                else None,
                'deformer_optimizer_state': self.deformer_optimizer.state_dict()
                if self.deformer_optimizer is not None else None,
                # how to rebuild the deformer ('deformation', 'deformer': the pre-training meta's layout)
                **(spec_to_checkpoint(self.gemini_step.spec()) if self.gemini_step is not None else {}),
                'pretrained_source': self.pretrained_source,
                'global_iteration': self.global_iteration,
                'nonfinite_skipped_total': self.guarded_step.total,
                'nonfinite_in_a_row': self.guarded_step.in_a_row,
            },
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if isinstance(filename_or_checkpoint, str):
            from nnunet_gemini.checkpoints import load_nnunet_trainer_checkpoint
            checkpoint = load_nnunet_trainer_checkpoint(filename_or_checkpoint)
            source = filename_or_checkpoint
        else:
            checkpoint, source = filename_or_checkpoint, "the given checkpoint dict"
        ours = checkpoint.get(CHECKPOINT_KEY) or {}
        if self.gemini_semi_supervised:
            if ours.get('deformer_weights') is None:
                raise GeminiUserError(f"{source} holds no GEMINI deformer state (written by "
                                      f"{checkpoint.get('trainer_name')!r}): continue it with that trainer, or start "
                                      f"a fresh {type(self).__name__} training (without --c).")
            spec = self._checkpointed_spec(ours, source)
        if not self.was_initialized:
            if self.gemini_semi_supervised:
                self.deformer_spec = spec  # read before initialize() builds the deformer: rebuilt as checkpointed
            self._restoring_checkpoint = True  # initialize() must not auto-load pre-trained weights
            self.initialize()
        elif self.gemini_semi_supervised and self.gemini_step.spec() != spec:
            raise GeminiUserError(f"{source} holds a deformer built as {spec}, but this trainer built its deformer "
                                  f"as {self.gemini_step.spec()} before the checkpoint was given: load it into a "
                                  f"trainer that is not initialised yet (as nnUNetv2_train --c / --val do).")
        network_state = {(k[7:] if k.startswith('module.') else k): v
                         for k, v in checkpoint['network_weights'].items()}
        self._plain_network().load_state_dict(network_state)
        if self.gemini_semi_supervised:
            self.gemini_deformer.load_state_dict(ours['deformer_weights'])
        self.my_init_kwargs = checkpoint['init_args']
        self.current_epoch = checkpoint['current_epoch']
        self.logger.load_checkpoint(checkpoint['logging'])
        self._best_ema = checkpoint['_best_ema']
        self.inference_allowed_mirroring_axes = checkpoint.get('inference_allowed_mirroring_axes',
                                                               self.inference_allowed_mirroring_axes)
        self._load_optimizer_states(checkpoint['optimizer_state'], ours.get('deformer_optimizer_state'), source)
        if self.grad_scaler is not None and checkpoint['grad_scaler_state'] is not None:
            self.grad_scaler.load_state_dict(checkpoint['grad_scaler_state'])
        self.pretrained_source = ours.get('pretrained_source')
        # nnUNetTrainerGEMINIFinetune counts iterations only since this version: whole epochs before
        self.global_iteration = int(ours.get('global_iteration') or self.current_epoch * self.num_iterations_per_epoch)
        self.guarded_step.total = int(ours.get('nonfinite_skipped_total', 0))
        self.guarded_step.in_a_row = int(ours.get('nonfinite_in_a_row', 0))
        self._network_fingerprint = _state_fingerprint(self._plain_network())

    def _checkpointed_spec(self, ours: dict, source: str) -> dict:
        """The deformer spec a trainer checkpoint records; nnUNet_gemini_deformation and
        nnUNet_gemini_deformer_input may not contradict it."""
        from nnunet_gemini.gemini_step import spec_from_checkpoint
        spec = spec_from_checkpoint(ours, where=source)
        held_as = {"deformation": f"was trained with deformation {spec['deformation']!r}",
                   "input": f"holds a deformer that sees the {spec['input']}"}
        for option, key in (("deformation", "deformation"), ("deformer_input", "input")):
            chosen = getattr(self.gemini_options, option)
            if is_set(option) and chosen != spec[key]:
                raise GeminiUserError(
                    f"{source} {held_as[key]}, but nnUNet_gemini_{option}={chosen} asks for another: --c / --val "
                    f"rebuild the deformer as checkpointed, so unset nnUNet_gemini_{option} (or set it to "
                    f"{spec[key]}), or start a new training without --c.")
        return spec

    def _load_optimizer_states(self, network_state: dict, deformer_state: Optional[dict], source: str) -> None:
        """The network's SGD state and the deformer's Adam state. A checkpoint written before the
        deformer had an optimiser of its own holds one SGD state over network + deformer (network
        parameters first) and no Adam state: its network part is restored, the Adam starts fresh."""
        from nnunet_gemini.checkpoints import optimizer_state_params, optimizer_state_prefix
        num_network = len(list(self._plain_network().parameters()))
        if self.gemini_semi_supervised and deformer_state is None and \
                optimizer_state_params(network_state) > num_network:
            network_state = optimizer_state_prefix(network_state, num_network)
            self.print_to_log_file(f"{source} was written before the deformer had an optimiser of its own: restored "
                                   f"the network's SGD state from it; the deformer's Adam starts fresh.")
        self.optimizer.load_state_dict(network_state)
        if self.gemini_semi_supervised and deformer_state is not None:
            self.deformer_optimizer.load_state_dict(deformer_state)
            for group in self.deformer_optimizer.param_groups:
                group['lr'] = self.gemini_options.deformer_lr  # constant: this run's nnUNet_gemini_deformer_lr wins


class nnUNetTrainerGEMINI_NoPretrain(nnUNetTrainerGEMINI):
    """Semi-supervised GEMINI only: never loads a pre-training checkpoint."""
    auto_pretrained_allowed = False


class nnUNetTrainerGEMINIFinetune(nnUNetTrainerGEMINI):
    """Fine-tunes a gemini_pretrain checkpoint with nnU-Net's supervised loss only (no GEMINI
    loss, no pairs); refuses to start without a checkpoint instead of silently training from scratch."""
    gemini_semi_supervised = False
    requires_pretrained = True
