"""GEMINI-MIP pre-training loop on nnU-Net's plans (what gemini_pretrain runs).

One iteration (defaults):
  pairs (a, b): two different pool cases, patches at the same relative position, one shared
  spatial augmentation (nnunet_gemini.pairs) ->
  ONE forward of the nnU-Net network on cat(a, b, damaged(a)) with a DecoderFeatureTap ->
  GeminiStep on the features of a and b (the shared GEMINI step; losses are not re-implemented
  here) + W * MSE(restoration_head(features of damaged a), rescaled clean a) (W = --restoration_weight,
  100 as released) ->
  one guarded step (nnunet_gemini.guarded_step: backward, gradient clipping at 12 as nnU-Net,
  one Adam step).

Choices (documented defaults, see also run_pretraining --help):
- Optimiser: Adam, lr 1e-4 constant, as released (the released run: 2e5 iterations of batch 1
  whole volumes). Ours: 800 epochs x 250 iterations = 2e5 iterations of patch pairs; pairs per
  iteration = half the plans' batch size (at least 1), so one forward sees as many images as
  nnU-Net's own training (2 x pairs) plus the damaged copies, and the plans' GPU memory target
  roughly holds.
- Restoration "joint" (default): the damaged images ride in the same forward and the two losses
  are summed into one step; "separate" reproduces the released two forwards / two optimiser
  steps per iteration. Joint costs one forward/backward of 3P images instead of 2P + P in two
  passes with two optimiser steps (faster on a GPU, within noise on a CPU); both learn on the
  demo pair (tests/test_pretrain.py states the margins for joint). Measurements: docs/design.md.
- The damaged input is mapped back into the patch's own intensity range before the forward
  (Models Genesis damage works on a [0, 1] rescaled copy; nnU-Net inputs are z-scored or
  CT-normalised), and the head predicts the rescaled clean patch.
- Deformer: the library's measured default (heads.DEFAULT_DEFORMER_RESOLUTION,
  gemini_step.DEFAULT_BIDIRECTIONAL; "displacement" always runs both directions).
- Segmentation convs (`.seg_layers.`) are frozen: no pre-training loss reaches them and
  downstream fine-tuning replaces them; freezing also keeps DDP free of unused parameters.
- Mixed precision (autocast + GradScaler) on CUDA only; the registration and loss maths run in
  float32 inside (docs/internal-api.md). torch.compile with --compile or nnUNet_compile=1 (CUDA).

Non-finite guard (nnunet_gemini.guarded_step, shared with the trainer): a non-finite loss skips
backward and update on every rank together, is counted and logged; after --max_nonfinite in a
row training stops with a GeminiUserError. Test-only: GEMINI_TEST_NONFINITE_ITERS="i,j,k+".
"""
import contextlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from nnunet_gemini import checkpoints, cpu_allocator, datasets, unlabeled
from nnunet_gemini.checkpoints import optimizer_state_regrouped
from nnunet_gemini.choices import PRETRAIN_DEFAULTS, RESTORATION_MODES
from nnunet_gemini.degradation import models_genesis_damage
from nnunet_gemini.devices import default_device, resolve_device
from nnunet_gemini.errors import GeminiUserError, warn_user
from nnunet_gemini.gemini_step import (
    GeminiStep,
    deformer_spec,
    spec_from_checkpoint,
    spec_to_checkpoint,
    step_from_spec,
)
from nnunet_gemini.guarded_step import GRAD_CLIP, Group, GuardedStep
from nnunet_gemini.heads import build_deformer, build_restoration_head
from nnunet_gemini.losses import decorrelation_loss, restoration_loss
from nnunet_gemini.network import DecoderFeatureTap, EncoderStagesTap, build_segmentation_network
from nnunet_gemini.pretrained import FINAL_CHECKPOINT, FORMAT_VERSION, LATEST_CHECKPOINT, pretrain_output_dir
from nnunet_gemini.registration import warp

from .progress import PretrainLogger, is_interactive, save_pair_figure, save_restoration_figure

# flags whose change on --c alters the training recipe mid-run (resume warns, naming each)
RECIPE_FLAGS = ("lr", "deformer_lr", "batch_size", "restoration_mode", "restoration_weight", "decorrelation",
                "encoder_decorrelation")


@dataclass
class PretrainOptions:
    """Every knob of a pre-training run (the CLI flags; plain types, stored in the checkpoint)."""
    dataset: str
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    device: str = field(default_factory=default_device)
    num_gpus: int = 1
    num_processes: int = 1  # pool preprocessing workers (-np)
    continue_training: bool = False
    epochs: int = PRETRAIN_DEFAULTS["epochs"]
    iters_per_epoch: int = PRETRAIN_DEFAULTS["iters_per_epoch"]
    batch_size: Optional[int] = None  # pairs per iteration over all ranks; None: plans' batch // 2
    lr: float = PRETRAIN_DEFAULTS["lr"]
    deformer_lr: Optional[float] = None  # the deformer's Adam lr; None: lr (one optimiser, as released)
    deformation: str = PRETRAIN_DEFAULTS["deformation"]
    deformer_input: str = PRETRAIN_DEFAULTS["deformer_input"]  # what the deformer sees of each image
    unlabeled_dirs: List[str] = field(default_factory=list)
    include_test_images: bool = False
    restoration: bool = True
    restoration_mode: str = PRETRAIN_DEFAULTS["restoration_mode"]
    decorrelation: float = PRETRAIN_DEFAULTS["decorrelation"]  # weight of the features' decorrelation term
    encoder_decorrelation: float = PRETRAIN_DEFAULTS["encoder_decorrelation"]  # the same on the encoder stages
    restoration_weight: float = PRETRAIN_DEFAULTS["restoration_weight"]  # of the Models Genesis MSE (released: 100)
    strict: bool = False
    output_dir: Optional[str] = None
    save_every: int = PRETRAIN_DEFAULTS["save_every"]
    max_nonfinite: int = PRETRAIN_DEFAULTS["max_nonfinite"]
    example_every: int = PRETRAIN_DEFAULTS["example_every"]
    compile: bool = False
    seed: int = PRETRAIN_DEFAULTS["seed"]
    patch_size: Optional[List[int]] = None  # API only (tests, benchmarks): overrides the plans' patch


def _to_cpu(obj):
    """Tensors of a (nested) state dict to CPU, for a device-independent checkpoint."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _package_versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("nnunet-gemini", "nnunetv2", "torch", "dynamic-network-architectures", "batchgeneratorsv2"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    out["torch"] = str(torch.__version__)  # with the build tag (+cu130 / +cpu)
    return out


class PretrainModel(nn.Module):
    """Network + GEMINI step (which owns the deformer) + restoration head as ONE module, so a
    single DDP wrapper covers every trained parameter and every forward goes through it."""

    def __init__(self, network: nn.Module, gemini: GeminiStep, restoration_head: Optional[nn.Module],
                 decorrelation: float = PRETRAIN_DEFAULTS["decorrelation"],
                 restoration_weight: float = PRETRAIN_DEFAULTS["restoration_weight"],
                 encoder_decorrelation: float = PRETRAIN_DEFAULTS["encoder_decorrelation"]):
        super().__init__()
        self.network = network
        self.gemini = gemini
        self.restoration_head = restoration_head
        self.decorrelation = decorrelation
        self.restoration_weight = restoration_weight
        self.encoder_decorrelation = encoder_decorrelation
        self.tap = DecoderFeatureTap(network)
        self.encoder_tap = EncoderStagesTap(network)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_encoder_stages(x)[0]

    def features_and_encoder_stages(self, x: torch.Tensor):
        """(decoder features, [encoder stage outputs]) of one forward; both taps are emptied."""
        self.network(x)
        return self.tap.pop(), self.encoder_tap.pop()

    def forward(self, a: torch.Tensor, b: torch.Tensor, damaged: Optional[torch.Tensor] = None,
                target: Optional[torch.Tensor] = None, task: str = "gemini"):
        """task "gemini": GEMINI loss on (a, b), plus the restoration loss of `damaged` when given
        (same forward); task "restoration": the restoration loss alone. -> (loss, logs)."""
        p = a.shape[0]
        if task == "restoration":
            rest = restoration_loss(self.restoration_head(self.features(damaged)), target)
            return self.restoration_weight * rest, {"restoration": rest.detach()}
        feats, stages = self.features_and_encoder_stages(torch.cat([a, b] + ([damaged] if damaged is not None else [])))
        loss, logs = self.gemini(a, b, feats[:p], feats[p:2 * p])
        logs = dict(logs)
        # how collapsed the pair's features are (decoder; encoder, mean over its stages: the deep stages
        # collapse most on real MRI), logged at any weight (GSS alone lets them collapse)
        for name, weight, term in (
                ("decorrelation", self.decorrelation, lambda: decorrelation_loss(feats[:2 * p])),
                ("encoder_decorrelation", self.encoder_decorrelation,
                 lambda: torch.stack([decorrelation_loss(s[:2 * p]) for s in stages]).mean())):
            with contextlib.nullcontext() if weight > 0 else torch.no_grad():
                value = term()
            if weight > 0:
                loss = loss + weight * value
            logs[name] = value.detach()
        if damaged is not None:
            rest = restoration_loss(self.restoration_head(feats[2 * p:]), target)
            loss = loss + self.restoration_weight * rest
            logs["restoration"] = rest.detach()
        return loss, logs


class GeminiPretrainer:
    """Builds everything from the plans, then `run()` trains. One instance per rank."""

    def __init__(self, options: PretrainOptions, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        self.options = options
        self.rank, self.world_size = rank, world_size
        self.is_main = rank == 0
        self.dataset_name = datasets.resolve_dataset(options.dataset)
        plans_file = datasets.require_planned(self.dataset_name, options.plans, options.configuration)
        self.plans_manager = PlansManager(plans_file)
        self.configuration_manager = self.plans_manager.get_configuration(options.configuration)
        if options.patch_size:
            self.configuration_manager.configuration["patch_size"] = [int(x) for x in options.patch_size]
        self.dataset_json = datasets.load_json(os.path.join(os.path.dirname(plans_file), "dataset.json"))
        self.num_input_channels = int(determine_num_input_channels(
            self.plans_manager, self.configuration_manager, self.dataset_json))
        self.num_output_channels = int(
            self.plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads)
        self.output_dir = options.output_dir or pretrain_output_dir(
            self.dataset_name, options.plans, options.configuration)
        if options.restoration_mode not in RESTORATION_MODES:
            raise GeminiUserError(f"restoration mode {options.restoration_mode!r} is not one of "
                                  f"{RESTORATION_MODES}")
        self.device = resolve_device(options.device, local_rank)
        self.use_amp = self.device.type == "cuda"
        total_pairs = options.batch_size or max(1, int(self.configuration_manager.batch_size) // 2)
        if total_pairs < world_size:
            raise GeminiUserError(f"--batch_size {total_pairs} pairs cannot be split over {world_size} "
                                  f"processes: use --batch_size >= {world_size} or fewer -num_gpus.")
        self.total_pairs = total_pairs
        # nnU-Net's split: the remainder goes to the first ranks
        self.pairs_per_rank = total_pairs // world_size + (1 if rank < total_pairs % world_size else 0)
        if self.is_main:  # the log file goes there at once: a bad -o must be an error, not a traceback
            checkpoints.require_writable_folder(self.output_dir)
        self.logger = PretrainLogger(self.output_dir, enabled=self.is_main)
        self.epoch = 0        # completed epochs
        self.iteration = 0    # completed (attempted) iterations, over all epochs
        self.guarded_step = GuardedStep(
            options.max_nonfinite, "--max_nonfinite", self.logger.log,
            "Lower --lr, check the pool images for extreme values",
            last_good=os.path.join(self.output_dir, LATEST_CHECKPOINT), distributed=world_size > 1)

    # ------------------------------------------------------------------------------------ setup
    def compatibility_fields(self) -> Dict:
        return checkpoints.network_compatibility_fields(self.plans_manager, self.configuration_manager,
                                                        self.num_input_channels)

    def group_lrs(self) -> List[float]:
        """Adam lr of the network (+ restoration head) group and of the deformer group."""
        o = self.options
        return [o.lr, o.lr if o.deformer_lr is None else o.deformer_lr]

    def build(self) -> None:
        torch.manual_seed(self.options.seed + self.rank)
        network = build_segmentation_network(self.plans_manager, self.configuration_manager,
                                             self.num_input_channels, self.num_output_channels,
                                             enable_deep_supervision=False)
        for name, p in network.named_parameters():
            if ".seg_layers." in f".{name}":
                p.requires_grad_(False)
        # the spec's defaults (measured resolution; one pass + inverse for diffeomorphic), --deformation
        # and --deformer_input
        gemini = step_from_spec(network, deformer_spec(self.options.deformation, input=self.options.deformer_input))
        head = build_restoration_head(network, self.num_input_channels) if self.options.restoration else None
        self.model = PretrainModel(network, gemini, head, self.options.decorrelation,
                                    self.options.restoration_weight, self.options.encoder_decorrelation).to(self.device)
        self.trained_parameters = [p for p in self.model.parameters() if p.requires_grad]
        # one Adam, two groups: the deformer's may have an lr of its own (--deformer_lr)
        deformer = {id(p) for p in self.model.gemini.deformer.parameters()}
        self.group_positions = [[i for i, p in enumerate(self.trained_parameters) if (id(p) in deformer) == d]
                                for d in (False, True)]
        self.optimizer = torch.optim.Adam(
            [{"params": [self.trained_parameters[i] for i in positions], "lr": lr}
             for positions, lr in zip(self.group_positions, self.group_lrs())])
        self.scaler = torch.amp.GradScaler("cuda") if self.use_amp else None
        self.forward_model = self.model
        if self.options.compile or os.environ.get("nnUNet_compile", "").lower() in ("1", "true", "t"):
            if self.device.type == "cuda":
                self.forward_model = torch.compile(self.model)
            else:
                warn_user("torch.compile (--compile / nnUNet_compile) is only used on CUDA; ignored.")
        if self.world_size > 1:
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.forward_model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                # the separate restoration step leaves the head (or the deformer) unused in a pass
                find_unused_parameters=self.options.restoration and self.options.restoration_mode == "separate")

    @property
    def network(self) -> nn.Module:
        return self.model.network

    def check_before_training(self) -> None:
        """Fail early: results folder writable with room for a checkpoint, and the network
        weights load into the downstream network with nnU-Net's own load_pretrained_weights.
        Runs before any process group exists (nnU-Net's loader maps to CUDA once one does):
        in run() for a single process, in the launching process for -num_gpus / torchrun."""
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
        build = lambda ds: build_segmentation_network(  # noqa: E731
            self.plans_manager, self.configuration_manager, self.num_input_channels, self.num_output_channels,
            enable_deep_supervision=ds)
        pretrain_network, downstream = build(False), build(True)
        weights_bytes = checkpoints.state_dict_nbytes(pretrain_network.state_dict()) + \
            checkpoints.state_dict_nbytes(build_deformer(pretrain_network).state_dict())
        # weights + two Adam moments, and the previous file beside the temporary one
        checkpoints.check_free_disk_and_writable(self.output_dir, 6 * weights_bytes + 2 ** 20)
        with tempfile.TemporaryDirectory(dir=self.output_dir, prefix=checkpoints.TMP_PREFIX) as tmp:
            path = os.path.join(tmp, "network_weights.pth")
            torch.save({"network_weights": _to_cpu(pretrain_network.state_dict())}, path)
            try:
                with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                    load_pretrained_weights(downstream, path)
            except (AssertionError, RuntimeError, KeyError) as e:
                raise GeminiUserError(
                    f"the pre-training network's weights do not load into the network "
                    f"nnUNetv2_train builds for {self.dataset_name} ({self.options.plans}, "
                    f"{self.options.configuration}): {e}. Check the plans file.") from e

    def pool_case_ids(self) -> List[str]:
        pool_folder = unlabeled.pool_folder_for(self.dataset_name, self.options.plans, self.options.configuration)
        cases = unlabeled.pool_case_ids(pool_folder)
        from nnunet_gemini.pairs import require_two_cases
        require_two_cases(len(cases), pool_folder, dataset=datasets.dataset_id_of(self.dataset_name))
        return cases

    def build_loader(self, seed: int):
        """Pair batches for this rank: nnU-Net's augmenter infrastructure, background workers as
        nnU-Net's training uses them (nnUNet_n_proc_DA)."""
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import ANISO_THRESHOLD
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        from nnunet_gemini import pairs
        pool_folder = unlabeled.pool_folder_for(self.dataset_name, self.options.plans, self.options.configuration)
        self.case_ids = self.pool_case_ids()
        patch = tuple(int(s) for s in self.configuration_manager.patch_size)
        # anisotropic 3D patches get nnU-Net's per-slice (dummy 2D) spatial augmentation
        dummy_2d = len(patch) == 3 and max(patch) / patch[0] > ANISO_THRESHOLD
        np.random.seed(seed % 2 ** 32)  # the loader draws from numpy's global RNG
        num_workers = get_allowed_n_proc_DA()  # per process, as nnU-Net counts them
        return pairs.make_pair_loader(
            unlabeled.load_pool_dataset(pool_folder, self.case_ids), self.pairs_per_rank, patch,
            do_dummy_2d_data_aug=dummy_2d, num_workers=max(0, num_workers),
            pin_memory=self.device.type == "cuda")

    # ------------------------------------------------------------------------------- checkpoints
    def checkpoint_dict(self) -> Dict:
        model = self.model
        return {
            "gemini_kind": checkpoints.KIND_PRETRAIN,
            "format_version": FORMAT_VERSION,
            "network_weights": _to_cpu(model.network.state_dict()),
            "deformer_weights": _to_cpu(model.gemini.deformer.state_dict()),
            "restoration_weights": _to_cpu(model.restoration_head.state_dict()) if model.restoration_head else None,
            "optimizer_state": _to_cpu(self.optimizer.state_dict()),
            "grad_scaler_state": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch, "iteration": self.iteration,
            "meta": {
                "dataset_name": self.dataset_name, "plans_identifier": self.options.plans,
                "configuration": self.options.configuration, "compat": self.compatibility_fields(),
                "patch_size": [int(s) for s in self.configuration_manager.patch_size],
                "spacing": [float(s) for s in self.configuration_manager.spacing],
                "num_output_channels_at_pretraining": self.num_output_channels,
                **spec_to_checkpoint(model.gemini.spec()),  # "deformation", "deformer": how to rebuild it
                "unlabeled_cases": list(self.case_ids), "versions": _package_versions(),
                "iterations": self.iteration, "world_size": self.world_size,
                "options": {k: (list(v) if isinstance(v, (list, tuple)) else v)
                            for k, v in asdict(self.options).items()},
            },
            "logging": {"epochs": self.logger.state_dict(), "nonfinite_total": self.guarded_step.total},
        }

    def save_checkpoint(self, name: str) -> str:
        path = os.path.join(self.output_dir, name)
        if self.is_main:
            checkpoints.atomic_torch_save(self.checkpoint_dict(), path)
        return path

    def resume(self) -> bool:
        """--c: restore from checkpoint_latest.pth (or checkpoint_final.pth); False if neither."""
        path = next((os.path.join(self.output_dir, n) for n in (LATEST_CHECKPOINT, FINAL_CHECKPOINT)
                     if os.path.isfile(os.path.join(self.output_dir, n))), None)
        if path is None:
            if self.is_main:
                warn_user(f"--c: no {LATEST_CHECKPOINT} or {FINAL_CHECKPOINT} in {self.output_dir}; "
                          f"starting a new pre-training.")
            return False
        ckpt = checkpoints.load_our_checkpoint(path, checkpoints.KIND_PRETRAIN)
        meta = ckpt["meta"]
        for w in checkpoints.check_compatibility(meta["compat"], self.compatibility_fields(), path):
            raise GeminiUserError(f"--c: {w} Resume with the plans the run started with, or start a new "
                                  f"run without --c (or another -o).")
        if meta["deformation"] != self.options.deformation:
            raise GeminiUserError(f"--c: {path} was trained with --deformation {meta['deformation']}, not "
                                  f"{self.options.deformation}: pass --deformation {meta['deformation']}.")
        saved = meta.get("options", {})
        saved_iters = saved.get("iters_per_epoch")
        if saved_iters is not None and int(saved_iters) != self.options.iters_per_epoch:
            # epochs are counted, not iterations: another epoch length would miscount the run's total
            raise GeminiUserError(f"--c: {path} was trained with --iters_per_epoch {saved_iters}, not "
                                  f"{self.options.iters_per_epoch}: pass --iters_per_epoch {saved_iters} (--epochs "
                                  f"counts epochs of that length), or start a new run without --c (or another -o).")
        checkpointed = spec_from_checkpoint(meta, where=path)
        if checkpointed["input"] != self.options.deformer_input:
            raise GeminiUserError(f"--c: {path} holds a deformer that sees the {checkpointed['input']}, not the "
                                  f"{self.options.deformer_input}: pass --deformer_input {checkpointed['input']}.")
        if checkpointed != self.model.gemini.spec():
            raise GeminiUserError(f"--c: {path} holds a deformer built as {checkpointed}, this version builds "
                                  f"{self.model.gemini.spec()}: resume with the version that started the run, or "
                                  f"start a new run without --c (or another -o).")
        had_restoration = ckpt["restoration_weights"] is not None
        if had_restoration != self.options.restoration:
            raise GeminiUserError(f"--c: {path} was trained {'with' if had_restoration else 'without'} restoration; "
                                  f"{'drop' if had_restoration else 'add'} --no_restoration to resume it.")
        changed = [f"--{k} {saved[k]} -> {getattr(self.options, k)}" for k in RECIPE_FLAGS
                   if k in saved and saved[k] != getattr(self.options, k)]
        if changed and self.is_main:  # allowed (a lower lr, say), but never silently
            warn_user(f"--c: this call changes the recipe {path} was trained with: {', '.join(changed)}; the rest "
                      f"of the run trains with this call's values. Pass the checkpoint's values to keep its recipe.")
        self.model.network.load_state_dict(ckpt["network_weights"])
        self.model.gemini.deformer.load_state_dict(ckpt["deformer_weights"])
        if self.model.restoration_head is not None:
            self.model.restoration_head.load_state_dict(ckpt["restoration_weights"])
        optimizer_state = ckpt["optimizer_state"]
        if len(optimizer_state["param_groups"]) == 1:  # written before the deformer had a group of its own
            optimizer_state = optimizer_state_regrouped(optimizer_state, self.group_positions)
        self.optimizer.load_state_dict(optimizer_state)
        for group, lr in zip(self.optimizer.param_groups, self.group_lrs()):
            group["lr"] = lr  # the lrs of this call win (constant schedule)
        if self.scaler is not None and ckpt.get("grad_scaler_state"):
            self.scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.epoch, self.iteration = int(ckpt["epoch"]), int(ckpt["iteration"])
        self.logger.load_state_dict(ckpt["logging"]["epochs"])
        self.guarded_step.total = int(ckpt["logging"].get("nonfinite_total", 0))
        self.logger.log(f"Resumed from {path}: {self.epoch} epoch(s), {self.iteration} iteration(s) done.")
        return True

    # ---------------------------------------------------------------------------------- training
    def _damage(self, a: torch.Tensor):
        """(network input in a's intensity range, [0, 1] target) of the Models Genesis damage."""
        damaged01, target = models_genesis_damage(a.float(), generator=self.damage_generator)
        dims = tuple(range(2, a.ndim))
        lo, hi = a.float().amin(dim=dims, keepdim=True), a.float().amax(dim=dims, keepdim=True)
        return (damaged01 * (hi - lo) + lo).to(a.dtype), target

    def _optimise(self, loss: torch.Tensor) -> bool:
        """One guarded step (skipped on every rank when the loss is non-finite on any), then zero_grad."""
        finite = self.guarded_step.step(loss, [Group(self.optimizer, self.trained_parameters, GRAD_CLIP)],
                                        self.scaler)
        self.optimizer.zero_grad(set_to_none=True)
        return finite

    def _autocast(self):
        return torch.autocast(self.device.type, enabled=self.use_amp)

    def train_step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        a = batch["a"].to(self.device, non_blocking=True)
        b = batch["b"].to(self.device, non_blocking=True)
        damaged = target = None
        if self.options.restoration:
            damaged, target = self._damage(a)
        poison = float("nan") if self.guarded_step.inject(self.iteration) else 1.0
        joint = self.options.restoration_mode == "joint"
        with self._autocast():
            loss, logs = self.forward_model(a, b, damaged if joint else None, target if joint else None)
            loss = loss * poison
        logs["loss"] = loss.detach()
        finite = self._optimise(loss)
        if self.options.restoration and not joint:
            with self._autocast():
                rest_loss, rest_logs = self.forward_model(a, b, damaged, target, task="restoration")
                rest_loss = rest_loss * poison
            finite = self._optimise(rest_loss) and finite
            logs.update(rest_logs)
            logs["loss"] = logs["loss"] + rest_loss.detach()
        values = {k: float(v) for k, v in logs.items()}
        self.iteration += 1
        self.guarded_step.record(finite, self.iteration - 1, f"epoch {self.epoch}")
        return values if finite else {}

    @torch.no_grad()
    def save_examples(self, batch: Dict[str, torch.Tensor]) -> None:
        """PNGs of one pair (fixed, moving, warped moving, grid) and one restoration."""
        if not self.is_main:
            return
        model = self.model
        was_training = model.training
        model.eval()
        try:
            a = batch["a"][:1].to(self.device).float()
            b = batch["b"][:1].to(self.device).float()
            feats = model.features(torch.cat([a, b]))
            disp_ab = model.gemini.fields(feats[:1], feats[1:2], a, b)[0]
            tag = f"epoch_{self.epoch:04d}"
            save_pair_figure(os.path.join(self.output_dir, f"example_pair_{tag}.png"), b[0].cpu().numpy(),
                             a[0].cpu().numpy(), warp(a, disp_ab)[0].cpu().numpy(), disp_ab[0].cpu().numpy())
            if model.restoration_head is not None:
                damaged, target = self._damage(a)
                restored = model.restoration_head(model.features(damaged))
                save_restoration_figure(
                    os.path.join(self.output_dir, f"example_restoration_{tag}.png"),
                    ((damaged - damaged.amin()) / (damaged.amax() - damaged.amin()).clamp_min(1e-8))[0].cpu().numpy(),
                    restored[0].float().cpu().numpy(), target[0].cpu().numpy())
        finally:
            model.train(was_training)

    def log_options(self) -> None:
        o = self.options
        self.logger.log(f"GEMINI pre-training of {self.dataset_name}, plans {o.plans}, configuration "
                        f"{o.configuration}; output {self.output_dir}")
        self.logger.log(f"pool: {len(self.case_ids)} unlabelled case(s); "
                        f"patch {list(self.configuration_manager.patch_size)}; "
                        f"{self.total_pairs} pair(s)/iteration over {self.world_size} process(es); "
                        f"{o.epochs} epochs x {o.iters_per_epoch} iterations; Adam lr {o.lr}"
                        f"{'' if o.deformer_lr is None else f' (deformer {o.deformer_lr})'}; deformation "
                        f"{o.deformation}, deformer input {o.deformer_input}; restoration "
                        f"{'off' if not o.restoration else f'{o.restoration_mode}, weight {o.restoration_weight:g}'}; "
                        f"decorrelation weight {o.decorrelation:g}, on the encoder {o.encoder_decorrelation:g}; "
                        f"device {self.device}; mixed precision {self.use_amp}")

    def run(self) -> str:
        """Train to options.epochs; returns the path of checkpoint_final.pth."""
        self.build()
        self.case_ids = self.pool_case_ids()
        if self.options.continue_training:
            self.resume()
        if not dist.is_initialized():
            self.check_before_training()
        self.damage_generator = torch.Generator(device=self.device)
        self.damage_generator.manual_seed(self.options.seed + 7919 * self.rank + self.epoch)
        loader = self.build_loader(seed=self.options.seed + 1000 * self.epoch + 100003 * self.rank)
        self.log_options()
        cpu_allocator.for_training_on(self.device, self.logger.log)
        self.model.train()
        batch = None
        try:
            while self.epoch < self.options.epochs:
                start = time.time()
                self.logger.log(f"Epoch {self.epoch}")
                iterations = range(self.options.iters_per_epoch)
                if self.is_main and is_interactive():
                    from tqdm import tqdm
                    iterations = tqdm(iterations, desc=f"epoch {self.epoch}", leave=False)
                for _ in iterations:
                    batch = next(loader)
                    self.logger.add_iteration(self.train_step(batch))
                self.epoch += 1
                means = self.logger.end_epoch({"epoch_time_s": time.time() - start,
                                               "lr": self.optimizer.param_groups[0]["lr"]})
                self.logger.log("  ".join(f"{k} {means[k]:.4f}" for k in
                                          ("loss", "total", "appearance", "semantic", "smoothness", "restoration",
                                           "decorrelation", "encoder_decorrelation", "ncc", "folding_fraction",
                                           "epoch_time_s")
                                          if k in means and math.isfinite(means[k])))
                last = self.epoch == self.options.epochs
                if self.epoch % self.options.save_every == 0 or last:
                    self.save_checkpoint(LATEST_CHECKPOINT)
                if self.is_main:
                    self.logger.plot_progress(os.path.join(self.output_dir, "progress.png"))
                    if self.epoch % self.options.example_every == 0 or last or self.epoch == 1:
                        self.save_examples(batch)
            final = self.save_checkpoint(FINAL_CHECKPOINT)
            self.logger.log(f"Pre-training done: {self.iteration} iterations; {final}")
            return final
        finally:
            self.model.tap.close()
            shutdown = getattr(loader, "_finish", None)
            if callable(shutdown):
                shutdown()
