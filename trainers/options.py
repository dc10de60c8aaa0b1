"""Per-run options of the nnunet-gemini trainers, read from `nnUNet_gemini_*` environment variables.

nnU-Net constructs trainers with a fixed signature (an extra argument breaks it), so a user's
per-run settings reach the trainer through the environment; class attributes of variants carry
the rest. Every option is printed into the training log (see `describe`).
"""
import math
import os
from dataclasses import dataclass, fields
from typing import Optional

from nnunet_gemini.choices import DEFAULT_DEFORMER_INPUT, DEFORMATIONS, DEFORMER_INPUTS, PAIR_POSITIONS, TRANSFERS
from nnunet_gemini.errors import GeminiUserError

PREFIX = "nnUNet_gemini_"
_CHOICES = {"deformation": DEFORMATIONS, "deformer_input": DEFORMER_INPUTS, "pair_positions": PAIR_POSITIONS,
            "transfer": TRANSFERS}


@dataclass(frozen=True)
class GeminiRunOptions:
    weight: float = 1.0                  # total = supervised + weight * gemini; > 0 where the loss is on
    rampup: float = 0.0                  # share of the run over which the weight rises (sigmoid ramp); 0: full at once
    deformer_lr: float = 1e-4            # the deformer's own Adam, constant (as released)
    lr: float = 1e-2                     # the network's initial lr for nnU-Net's SGD + poly (nnU-Net's initial_lr)
    warmup: float = 0.0                  # share of the run over which the network's lr rises linearly to poly
    unlabeled_batch: Optional[int] = None  # pairs per iteration; None -> max(1, labelled batch // 2)
    auto_pretrained: bool = True         # load a gemini_pretrain checkpoint of this dataset/plans/config
    transfer: str = "all"                # what that load takes: all but the seg layers, or the encoder only
    deformation: str = "diffeomorphic"   # deformer output: velocity (diffeomorphic) or displacement
    deformer_input: str = DEFAULT_DEFORMER_INPUT  # what a fresh deformer sees: features, images or both
    pair_positions: str = "same"         # patches of a pair: same relative position (as designed) or independent
    max_nonfinite: int = 10              # non-finite losses in a row before training stops
    num_epochs: Optional[int] = None     # budget (None: the trainer's own value)
    iters_per_epoch: Optional[int] = None
    val_iters: Optional[int] = None
    final_validation: bool = True        # 0: skip nnU-Net's validation after training (the benchmark scores imagesTs)


_ZERO_ALLOWED = ("max_nonfinite",)  # the integer options that may be 0
# float options with a range of their own (the others: finite and >= 0)
_FLOAT_RANGES = {"deformer_lr": (lambda v: 0 < v < float("inf"), "a finite number > 0"),
                 "lr": (lambda v: 0 < v < float("inf"), "a finite number > 0"),
                 "rampup": (lambda v: 0 <= v <= 1, "a share of the run in [0, 1]"),
                 "warmup": (lambda v: 0 <= v < 1, "a share of the run in [0, 1)")}
# options that were removed: setting one fails with what replaced it (a silently ignored setting is worse)
_REPLACED = {"rampup_epochs": "nnUNet_gemini_rampup (a share of the run's iterations, e.g. 0.1 for the first "
                              "10 %)"}


def _parse(name: str, raw: str, kind):
    var = PREFIX + name
    try:
        if kind is bool:
            if raw.strip().lower() in ("1", "true", "yes"):
                return True
            if raw.strip().lower() in ("0", "false", "no"):
                return False
            raise ValueError
        value = kind(raw)
    except ValueError:
        raise GeminiUserError(f"environment variable {var}={raw!r} is not a valid "
                              f"{'0/1 switch' if kind is bool else kind.__name__}: fix or unset it.") from None
    if kind is int and value < (0 if name in _ZERO_ALLOWED else 1):
        raise GeminiUserError(f"environment variable {var}={raw!r} must be a "
                              f"{'non-negative' if name in _ZERO_ALLOWED else 'positive'} integer: fix or unset it.")
    if kind is float:
        ok, what = _FLOAT_RANGES.get(name, (lambda v: 0 <= v < float("inf"), "a finite number >= 0"))
        if not ok(value):
            raise GeminiUserError(f"environment variable {var}={raw!r} must be {what}: fix or unset it.")
    if name in _CHOICES and value not in _CHOICES[name]:
        raise GeminiUserError(f"environment variable {var}={raw!r} is not one of {_CHOICES[name]}: "
                              f"pick one of them or unset it.")
    return value


_KINDS = {"weight": float, "rampup": float, "deformer_lr": float, "lr": float, "warmup": float,
          "unlabeled_batch": int, "auto_pretrained": bool, "transfer": str, "deformation": str,
          "deformer_input": str,
          "pair_positions": str, "max_nonfinite": int, "num_epochs": int, "iters_per_epoch": int, "val_iters": int,
          "final_validation": bool}


def read_env_options(environ=None) -> GeminiRunOptions:
    """GeminiRunOptions from `nnUNet_gemini_*` variables (unset or empty -> default);
    GeminiUserError naming the variable when a value is invalid."""
    environ = os.environ if environ is None else environ
    for name, replacement in _REPLACED.items():
        if environ.get(PREFIX + name, "").strip():
            raise GeminiUserError(f"environment variable {PREFIX}{name} was replaced by {replacement}: unset "
                                  f"{PREFIX}{name} and set the new variable instead.")
    values = {}
    for f in fields(GeminiRunOptions):
        raw = environ.get(PREFIX + f.name, "")
        if raw.strip():
            values[f.name] = _parse(f.name, raw.strip(), _KINDS[f.name])
    return GeminiRunOptions(**values)


def is_set(name: str, environ=None) -> bool:
    """Whether the user set nnUNet_gemini_NAME (unset or empty: the default applies)."""
    environ = os.environ if environ is None else environ
    return bool(environ.get(PREFIX + name, "").strip())


def describe(options: GeminiRunOptions, environ=None) -> str:
    """One line per option: `nnUNet_gemini_NAME = value (environment|default)`."""
    lines = []
    for f in fields(options):
        source = "environment" if is_set(f.name, environ) else "default"
        lines.append(f"  {PREFIX}{f.name} = {getattr(options, f.name)} ({source})")
    return "\n".join(lines)


def rampup_factor(iteration: int, rampup: float, total_iterations: int) -> float:
    """Share of the GEMINI weight at training `iteration` (0-based): exp(-5 (1 - t)^2), t = iteration /
    (rampup * total_iterations) clipped to 1 (the sigmoid ramp-up of Laine & Aila's temporal ensembling,
    common in semi-supervised segmentation); 1 from the start when rampup is 0 (as released). A share
    of the run, so a value chosen in a short study means the same in a long one."""
    ramp_iterations = rampup * total_iterations
    if ramp_iterations <= 0:
        return 1.0
    t = min(1.0, max(0.0, iteration / ramp_iterations))
    return float(math.exp(-5.0 * (1.0 - t) ** 2))


def warmup_factor(iteration: int, warmup: float, total_iterations: int) -> float:
    """Share of the network's poly learning rate at training `iteration` (0-based): (iteration + 1) /
    (warmup * total_iterations), linear from ~0, clipped to 1; 1 when warmup is 0 (nnU-Net's start)."""
    warm_iterations = warmup * total_iterations
    if warm_iterations <= 0:
        return 1.0
    return float(min(1.0, (iteration + 1) / warm_iterations))


def apply_budget(trainer, options: GeminiRunOptions) -> None:
    """Training-length options override the trainer's (and its variant's) attributes. Called at
    the start of initialize(), before nnU-Net builds the poly schedule from num_epochs."""
    if options.num_epochs is not None:
        trainer.num_epochs = options.num_epochs
    if options.iters_per_epoch is not None:
        trainer.num_iterations_per_epoch = options.iters_per_epoch
    if options.val_iters is not None:
        trainer.num_val_iterations_per_epoch = options.val_iters


def perform_final_validation(trainer, save_probabilities: bool) -> None:
    """nnU-Net's final validation unless nnUNet_gemini_final_validation=0 (then one log line, no
    validation/ folder). Shared by the GEMINI trainers and nnUNetTrainerEnvBudget."""
    if not read_env_options().final_validation:
        trainer.print_to_log_file(f"{PREFIX}final_validation=0: final validation skipped (no validation/ folder, "
                                  f"no summary.json); run nnUNetv2_train ... --val to do it later.")
        return
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    nnUNetTrainer.perform_actual_validation(trainer, save_probabilities)
