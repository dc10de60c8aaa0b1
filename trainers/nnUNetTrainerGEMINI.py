"""nnUNetTrainerGEMINI: nnU-Net training with a GEMINI pre-trained start and a semi-supervised
GEMINI loss on unlabelled inter-subject pairs.

Every iteration runs ONE network forward on cat(labelled batch, pair images a, pair images b):
nnU-Net's loss (Dice + CE, deep supervision) on the labelled slice of the outputs, the shared
GeminiStep on the last decoder stage's features of the a/b slices, total = supervised +
weight * gemini under nnU-Net's own SGD + poly schedule (declared departure from the released
two Adam steps). `self.network` stays the plain nnU-Net network (prediction loads it strictly);
the deformer lives beside it, in the same optimiser.

Pre-trained start, one rule: on a fresh training (plans["continue_training"] False, and not a
checkpoint restore such as --val), a gemini_pretrain checkpoint of this dataset / plans /
configuration is loaded in initialize() unless nnUNet_gemini_auto_pretrained=0. nnU-Net's
-pretrained_weights is loaded after initialize() and so overrides the network part.
"""
import os
import sys
from typing import List, Optional, Union

import numpy as np
import torch
from torch import autocast

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.trainers.options import (apply_budget, describe, perform_final_validation, rampup_factor,
                                          read_env_options)
from nnunet_gemini.trainers.progress import GEMINI_TERMS, SKIPPED_KEY, GeminiLocalLogger

__all__ = ["nnUNetTrainerGEMINI", "nnUNetTrainerGEMINI_NoPretrain", "nnUNetTrainerGEMINIFinetune",
           "TEST_NONFINITE_ENV"]

# Test-only fault injection: comma-separated global iteration numbers at which the total loss
# is replaced by NaN (exercises the non-finite guard without a real divergence).
TEST_NONFINITE_ENV = "GEMINI_TEST_NONFINITE_ITERS"
CHECKPOINT_KEY = "gemini"  # our extra entry in nnU-Net's checkpoint dict


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
        # nnU-Net pops this in super().__init__; it is the documented signal of `--c`
        self.continue_training = bool(plans.get("continue_training", False))
        self.gemini_options = read_env_options()  # invalid values fail before any work
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.gemini_semi_supervised:
            self.logger.local_logger = GeminiLocalLogger(self.logger.local_logger.verbose)
        self.gemini_weight = self.gemini_options.weight
        self.gemini_rampup_epochs = self.gemini_options.rampup_epochs
        self.gemini_deformation = self.gemini_options.deformation
        self.max_nonfinite_in_a_row = self.gemini_options.max_nonfinite
        from nnunet_gemini.heads import DEFAULT_DEFORMER_RESOLUTION
        # deformer options: the shared defaults, or the pre-training's when one is loaded
        self.deformer_resolution = DEFAULT_DEFORMER_RESOLUTION
        self.gemini_bidirectional = None  # GeminiStep's default for the deformation model
        self.gemini_integration_steps = 7
        self.gemini_deformer = None    # -> configure_optimizers
        self.gemini_step = None        # -> initialize
        self.pair_loader = None        # -> on_train_start
        self.pretrained_source: Optional[str] = None  # gemini_pretrain checkpoint used, if any
        self.nonfinite_skipped_total = 0
        self.nonfinite_in_a_row = 0
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
        # nnU-Net calls this right after building the network: the deformer is built here so it
        # joins the same SGD + poly schedule (its momentum state then lives in optimizer_state).
        params = list(self.network.parameters())
        if self.gemini_semi_supervised:
            from nnunet_gemini.heads import build_deformer
            if self.gemini_deformer is None:
                self.gemini_deformer = build_deformer(self.network, resolution=self.deformer_resolution
                                                      ).to(self.device)
            params += list(self.gemini_deformer.parameters())
        optimizer = torch.optim.SGD(params, self.initial_lr, weight_decay=self.weight_decay,
                                    momentum=0.99, nesterov=True)
        return optimizer, PolyLRScheduler(optimizer, self.initial_lr, self.num_epochs)

    def initialize(self):
        apply_budget(self, self.gemini_options)
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
                               f"({'GEMINI loss on' if self.gemini_semi_supervised else 'supervised only'}, "
                               f"deformation {self.gemini_deformation})", add_timestamp=False)
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
            from nnunet_gemini.gemini_step import GeminiStep
            from nnunet_gemini.network import DecoderFeatureTap
            self.gemini_step = GeminiStep(self.gemini_deformer, deformation=self.gemini_deformation,
                                          integration_steps=self.gemini_integration_steps,
                                          bidirectional=self.gemini_bidirectional)
            self._feature_tap = DecoderFeatureTap(self.network)
        self._network_fingerprint = _state_fingerprint(self._plain_network())

    def _plain_network(self) -> torch.nn.Module:
        from nnunet_gemini.network import unwrap_network
        return unwrap_network(self.network)

    def _find_pretrained(self):
        """(path, checkpoint) of the gemini_pretrain checkpoint to start from, or None (logged why).
        Sets the deformer options to the checkpoint's unless nnUNet_gemini_deformation is set."""
        if self._restoring_checkpoint:
            return None  # --c / --val: the weights come from our own trainer checkpoint
        if self.continue_training:
            self.print_to_log_file("Continuing a training (--c): no automatic pre-trained load.")
            return None
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
                did = int(self.plans_manager.dataset_name[7:10])
                raise GeminiUserError(
                    f"{type(self).__name__} needs a gemini_pretrain checkpoint, but none was found in "
                    f"{expected_dir}: run `gemini_pretrain -d {did} -p {self.plans_manager.plans_name} "
                    f"-c {self.configuration_name}` first (or train nnUNetTrainerGEMINI_NoPretrain).")
            self.print_to_log_file(f"No gemini_pretrain checkpoint in {expected_dir}: network and deformer start "
                                   f"from random initialisation.")
            return None
        ckpt = pretrained.load_pretrained_checkpoint(path)
        meta = ckpt.get("meta", {})
        deformer_meta = meta.get("deformer") or {}
        self.deformer_resolution = deformer_meta.get("resolution", self.deformer_resolution)
        self.gemini_bidirectional = deformer_meta.get("bidirectional", self.gemini_bidirectional)
        self.gemini_integration_steps = deformer_meta.get("integration_steps", self.gemini_integration_steps)
        trained_with = meta.get("deformation")
        if trained_with and not os.environ.get("nnUNet_gemini_deformation", "").strip():
            self.gemini_deformation = trained_with
        elif trained_with and trained_with != self.gemini_deformation:
            self.print_to_log_file(f"WARNING: {path} was pre-trained with deformation {trained_with!r}, this run uses "
                                   f"{self.gemini_deformation!r} (nnUNet_gemini_deformation): the deformer's output "
                                   f"changes meaning.")
        return path, ckpt

    def _apply_pretrained(self, path: str, ckpt: dict) -> None:
        from nnunet_gemini import pretrained
        from nnunet_gemini.checkpoints import network_compatibility_fields
        expected = network_compatibility_fields(self.plans_manager, self.configuration_manager,
                                                self.num_input_channels)
        deformer = self.gemini_deformer if self.gemini_semi_supervised else None
        warnings = pretrained.apply_pretrained(
            ckpt, self._plain_network(), deformer, expected,
            checkpoint_name=f"the gemini_pretrain checkpoint {path} (for {self.plans_manager.dataset_name} "
                            f"{self.plans_manager.plans_name} {self.configuration_name})")
        self.pretrained_source = path
        self.print_to_log_file(f"Loaded the gemini_pretrain checkpoint {path}: backbone into the network "
                               f"(new segmentation layers)"
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
        if self.gemini_semi_supervised:
            self.pair_loader = self._start_pair_loader()

    def _check_room_for_a_checkpoint(self) -> None:
        """Fail before the first epoch, not at the first save hours later: the fold folder must be
        writable with room for one checkpoint (weights + SGD momentum of network and deformer,
        twice: the previous file stays until the new one is renamed over it)."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        from nnunet_gemini.checkpoints import check_free_disk_and_writable, state_dict_nbytes
        weights = state_dict_nbytes(self._plain_network().state_dict())
        if self.gemini_deformer is not None:
            weights += state_dict_nbytes(self.gemini_deformer.state_dict())
        check_free_disk_and_writable(self.output_folder, 4 * weights + 2 ** 20,
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
            source = f"gemini_pretrain checkpoint {self.pretrained_source}"
        else:
            source = "random initialisation"
        deformer = ""
        if self.gemini_semi_supervised:
            deformer = (f"; deformer weights: {self.pretrained_source or 'random initialisation'}"
                        if not self._restoring_checkpoint else "; deformer weights: the trainer checkpoint")
        self.print_to_log_file(f"Network weights in use: {source}{deformer}.")

    def _start_pair_loader(self):
        from nnunet_gemini import unlabeled
        from nnunet_gemini.pairs import make_pair_loader
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
        if len(case_ids) < 2:
            raise GeminiUserError(f"the unlabelled pool {pool_folder} holds {len(case_ids)} usable case(s) after "
                                  f"removing this fold's validation cases; GEMINI pairs need 2 different subjects. "
                                  f"Add images to imagesUnlabeled/ and rebuild the pool (gemini_pretrain -d ID "
                                  f"--preprocess_only), or train nnUNetTrainer.")
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
        if not self.gemini_semi_supervised:
            return super().train_step(batch)
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        pairs = next(self.pair_loader)
        img_a = pairs["a"].to(self.device, non_blocking=True)
        img_b = pairs["b"].to(self.device, non_blocking=True)
        n, p = data.shape[0], img_a.shape[0]

        self.optimizer.zero_grad(set_to_none=True)
        try:
            with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
                output = self.network(torch.cat((data, img_a, img_b)))
                features = self._feature_tap.pop()
                labelled = [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]
                supervised = self.loss(labelled, target)
                gemini, logs = self.gemini_step(img_a, img_b, features[n:n + p], features[n + p:n + 2 * p])
                total = supervised + self.current_gemini_weight() * gemini
            if str(self.global_iteration) in os.environ.get(TEST_NONFINITE_ENV, "").split(","):
                total = total * float("nan")
            finite = torch.isfinite(total.detach()).float()
            if self.is_ddp:  # all ranks skip together, or the network's DDP all-reduce would hang
                import torch.distributed as dist
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            finite = bool(finite)
            if finite:
                self._backward_and_step(total)
        except torch.OutOfMemoryError as e:
            raise torch.OutOfMemoryError(
                f"out of memory in a GEMINI training step ({n} labelled + 2 x {p} unlabelled patches of "
                f"{tuple(self.configuration_manager.patch_size)} in one forward): lower the unlabelled batch with "
                f"nnUNet_gemini_unlabeled_batch=N (now {self.unlabeled_batch}). Original error: {e}") from e
        self.global_iteration += 1
        if not finite:
            self._count_nonfinite(float(supervised.detach()), float(gemini.detach()))
        else:
            self.nonfinite_in_a_row = 0
        result = {'loss': supervised.detach().cpu().numpy()}
        for key, name in GEMINI_TERMS.items():
            result[key] = float(logs.get(name, np.nan)) if finite else np.nan
        return result

    def current_gemini_weight(self) -> float:
        """nnUNet_gemini_weight, ramped up over the first nnUNet_gemini_rampup_epochs epochs."""
        return self.gemini_weight * rampup_factor(self.current_epoch, self.gemini_rampup_epochs)

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

    def _backward_and_step(self, total: torch.Tensor) -> None:
        params = [q for group in self.optimizer.param_groups for q in group['params']]
        if self.grad_scaler is not None:
            self.grad_scaler.scale(total).backward()
            if self.is_ddp:
                self._average_deformer_gradients()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            total.backward()
            if self.is_ddp:
                self._average_deformer_gradients()
            torch.nn.utils.clip_grad_norm_(params, 12)
            self.optimizer.step()

    def _count_nonfinite(self, supervised: float, gemini: float) -> None:
        self.nonfinite_skipped_total += 1
        self.nonfinite_in_a_row += 1
        self._epoch_skipped += 1
        self.print_to_log_file(f"WARNING: non-finite loss at iteration {self.global_iteration - 1} (supervised "
                               f"{supervised}, gemini {gemini}): update skipped ({self.nonfinite_in_a_row} in a row, "
                               f"{self.nonfinite_skipped_total} in total).")
        if self.nonfinite_in_a_row >= self.max_nonfinite_in_a_row:
            raise GeminiUserError(
                f"training stopped: {self.nonfinite_in_a_row} non-finite losses in a row (limit "
                f"nnUNet_gemini_max_nonfinite={self.max_nonfinite_in_a_row}). Lower nnUNet_gemini_weight "
                f"(now {self.gemini_weight}), check the images for extreme values, or resume from the last "
                f"checkpoint with --c.")

    def on_train_epoch_start(self):
        self._epoch_skipped = 0
        super().on_train_epoch_start()

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
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
        unchanged) plus our entry: deformer weights and counters. The deformer's SGD state is in
        optimizer_state already. Written atomically."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        from nnunet_gemini.checkpoints import atomic_torch_save
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
                # how to rebuild the deformer (gemini_register reads these; same keys as the pre-training meta)
                'deformation': self.gemini_deformation,
                'deformer': {'resolution': self.deformer_resolution,
                             'bidirectional': self.gemini_step.bidirectional if self.gemini_step is not None
                             else self.gemini_bidirectional,
                             'integration_steps': self.gemini_integration_steps},
                'pretrained_source': self.pretrained_source,
                'global_iteration': self.global_iteration,
                'nonfinite_skipped_total': self.nonfinite_skipped_total,
                'nonfinite_in_a_row': self.nonfinite_in_a_row,
            },
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        if not self.was_initialized:
            self._restoring_checkpoint = True  # initialize() must not auto-load pre-trained weights
            self.initialize()
        if isinstance(filename_or_checkpoint, str):
            from nnunet_gemini.checkpoints import load_nnunet_trainer_checkpoint
            checkpoint = load_nnunet_trainer_checkpoint(filename_or_checkpoint)
            source = filename_or_checkpoint
        else:
            checkpoint, source = filename_or_checkpoint, "the given checkpoint dict"
        ours = checkpoint.get(CHECKPOINT_KEY)
        if self.gemini_semi_supervised and (ours is None or ours.get('deformer_weights') is None):
            raise GeminiUserError(f"{source} holds no GEMINI deformer state (written by "
                                  f"{checkpoint.get('trainer_name')!r}): continue it with that trainer, or start a "
                                  f"fresh {type(self).__name__} training (without --c).")
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
        self.optimizer.load_state_dict(checkpoint['optimizer_state'])
        if self.grad_scaler is not None and checkpoint['grad_scaler_state'] is not None:
            self.grad_scaler.load_state_dict(checkpoint['grad_scaler_state'])
        if ours is not None:
            self.pretrained_source = ours.get('pretrained_source')
            self.global_iteration = int(ours.get('global_iteration', 0))
            self.nonfinite_skipped_total = int(ours.get('nonfinite_skipped_total', 0))
            self.nonfinite_in_a_row = int(ours.get('nonfinite_in_a_row', 0))
        self._network_fingerprint = _state_fingerprint(self._plain_network())


class nnUNetTrainerGEMINI_NoPretrain(nnUNetTrainerGEMINI):
    """Semi-supervised GEMINI only: never loads a pre-training checkpoint."""
    auto_pretrained_allowed = False


class nnUNetTrainerGEMINIFinetune(nnUNetTrainerGEMINI):
    """Fine-tunes a gemini_pretrain checkpoint with nnU-Net's supervised loss only (no GEMINI
    loss, no pairs); refuses to start without a checkpoint instead of silently training from scratch."""
    gemini_semi_supervised = False
    requires_pretrained = True
