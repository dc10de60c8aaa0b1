"""One guarded optimiser step, shared by both training loops (gemini_pretrain's and
nnUNetTrainerGEMINI's).

A step, in this order:

    all ranks agree the loss is finite -> backward -> after_backward() -> unscale_ each optimiser
    (grad scaler) -> after_unscale() -> clip each group at its own max-norm -> step each optimiser
    -> scaler.update() once

(torch's rule for several optimisers under one GradScaler: unscale_ each, step each, update once.)
The two hooks are where a loop does its own gradient work: the trainer averages the deformer's
gradients over DDP ranks by hand after backward, and divides them by the GEMINI weight after
unscale_.

The non-finite policy, the same for both loops: every rank first agrees whether the loss is finite
(all_reduce MIN under DDP). When it is not finite on some rank, no rank runs backward or step (DDP
reduces gradients inside backward, so skipping together cannot leave a rank waiting), the iteration
is counted and logged, and `limit` of them in a row stop the run with a GeminiUserError. Zeroing
gradients stays the loop's business.

Test hook (both loops): GEMINI_TEST_NONFINITE_ITERS="i,j,k+" makes the loss NaN at the global
(0-based) iterations i and j, and at k and every later one. Test-only: leave it unset for real runs.
"""
import os
from typing import Callable, FrozenSet, NamedTuple, Optional, Sequence, Tuple

import torch

from nnunet_gemini.errors import GeminiUserError

TEST_NONFINITE_ENV = "GEMINI_TEST_NONFINITE_ITERS"
GRAD_CLIP = 12.0  # nnU-Net's max gradient norm (its train_step); every group of both loops uses it


class Group(NamedTuple):
    """One optimiser, the parameters whose gradients it steps, and their max gradient norm."""
    optimizer: torch.optim.Optimizer
    parameters: Sequence[torch.Tensor]
    max_norm: float = GRAD_CLIP


def parse_injected_iterations(value: str) -> Tuple[FrozenSet[int], Optional[int]]:
    """GEMINI_TEST_NONFINITE_ITERS "i,j,k+" -> ({i, j}, k): the listed iterations and the first of
    the open range (None without a "k+")."""
    listed, every_from = set(), None
    for token in (t.strip() for t in value.split(",")):
        if not token:
            continue
        number = token[:-1] if token.endswith("+") else token
        if not number.isdigit():
            raise GeminiUserError(f"{TEST_NONFINITE_ENV}={value!r} is not a list of iteration numbers: use "
                                  f"i,j,k+ (k+: k and every later iteration). It is test-only: unset it for real "
                                  f"runs.")
        if token.endswith("+"):
            every_from = int(number) if every_from is None else min(every_from, int(number))
        else:
            listed.add(int(number))
    return frozenset(listed), every_from


def injected_nonfinite(iteration: int, environ=None) -> bool:
    """Whether the test hook makes the loss of this global iteration non-finite (read at each call)."""
    value = (os.environ if environ is None else environ).get(TEST_NONFINITE_ENV, "").strip()
    if not value:
        return False
    listed, every_from = parse_injected_iterations(value)
    return iteration in listed or (every_from is not None and iteration >= every_from)


def all_ranks_finite(loss: torch.Tensor, distributed: bool = False) -> bool:
    """True when the loss is finite on every rank (one all_reduce MIN under DDP)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if distributed:
        import torch.distributed as dist
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def backward_and_step(loss: torch.Tensor, groups: Sequence[Group], scaler=None,
                      after_backward: Optional[Callable[[], None]] = None,
                      after_unscale: Optional[Callable[[], None]] = None) -> None:
    """Backward of a finite loss, then a clipped step of every group's optimiser (see the module)."""
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if after_backward is not None:
        after_backward()
    if scaler is not None:
        for group in groups:
            scaler.unscale_(group.optimizer)
    if after_unscale is not None:
        after_unscale()
    for group in groups:
        torch.nn.utils.clip_grad_norm_(group.parameters, group.max_norm)
    if scaler is not None:
        for group in groups:
            scaler.step(group.optimizer)
        scaler.update()
    else:
        for group in groups:
            group.optimizer.step()


class GuardedStep:
    """The step plus the non-finite counters of one training loop.

    limit: non-finite iterations in a row that stop the run; limit_name: the flag or variable that
    sets it (named in the stop message); log: the loop's log function; remedy: the loop's first
    advice in the stop message ("Lower --lr, check ..."); last_good: where the last good state is
    (optional, named in the stop message); distributed: all ranks agree (DDP).
    Counters: `in_a_row` (reset by a finite iteration) and `total`."""

    def __init__(self, limit: int, limit_name: str, log: Callable[[str], None], remedy: str,
                 last_good: Optional[str] = None, distributed: bool = False):
        self.limit, self.limit_name, self.log = int(limit), limit_name, log
        self.remedy, self.last_good, self.distributed = remedy, last_good, distributed
        self.in_a_row = 0
        self.total = 0
        injected_nonfinite(0)  # a malformed test hook fails here, before any work

    def inject(self, iteration: int) -> bool:
        """The test hook (GEMINI_TEST_NONFINITE_ITERS) for this global iteration."""
        return injected_nonfinite(iteration)

    def step(self, loss: torch.Tensor, groups: Sequence[Group], scaler=None,
             after_backward: Optional[Callable[[], None]] = None,
             after_unscale: Optional[Callable[[], None]] = None) -> bool:
        """backward_and_step when the loss is finite on every rank; returns whether it was. A
        non-finite loss touches no gradient, optimiser or scaler state on any rank."""
        finite = all_ranks_finite(loss, self.distributed)
        if finite:
            backward_and_step(loss, groups, scaler, after_backward, after_unscale)
        return finite

    def record(self, finite: bool, iteration: int, details: str = "") -> None:
        """Count one finished iteration (`iteration`: its global 0-based number): a finite one
        resets the run of non-finite ones; a non-finite one is counted and logged, and the run
        stops with a GeminiUserError once `limit` of them came in a row."""
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        self.log(f"WARNING: non-finite loss at iteration {iteration}" + (f" ({details})" if details else "")
                 + f": update skipped ({self.in_a_row} in a row, {self.total} in total).")
        if self.in_a_row >= self.limit:
            last_good = f" (the last good state is {self.last_good})" if self.last_good else ""
            raise GeminiUserError(
                f"training stopped: {self.in_a_row} non-finite losses in a row (iterations "
                f"{iteration - self.in_a_row + 1}..{iteration}; limit {self.limit_name}={self.limit}). "
                f"{self.remedy}, or raise {self.limit_name}; resume with --c{last_good}.")
