"""nnunet_gemini.guarded_step, the one optimiser step of both training loops, on toy modules: the
order of its stages and hooks, per-group clipping, the grad scaler rule for several optimisers, a
non-finite loss skipped without touching any state, the counters, the log line and the stop
error, the test hook's syntax, and all ranks agreeing (2 gloo processes)."""
import math

import pytest
import torch

from nnunet_gemini.devices import end_process_group
from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.guarded_step import (
    GRAD_CLIP,
    TEST_NONFINITE_ENV,
    Group,
    GuardedStep,
    all_ranks_finite,
    backward_and_step,
    injected_nonfinite,
    parse_injected_iterations,
)


def _two_groups(seed=0, lr=1.0, scale=1.0):
    torch.manual_seed(seed)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 1)
    groups = [Group(torch.optim.SGD(a.parameters(), lr=lr), list(a.parameters()), 0.5),
              Group(torch.optim.SGD(b.parameters(), lr=lr), list(b.parameters()), 2.0)]
    x = torch.randn(5, 4)
    loss = scale * b(torch.tanh(a(x))).pow(2).sum()
    return a, b, groups, loss


def _guard(limit=3, log=None, **kw):
    return GuardedStep(limit, "--max_nonfinite", (log if log is not None else []).append, "Lower --lr", **kw)


# ------------------------------------------------------------------------------------ the test hook
def test_the_test_hook_lists_iterations_and_open_ranges():
    assert GRAD_CLIP == 12.0 and TEST_NONFINITE_ENV == "GEMINI_TEST_NONFINITE_ITERS"
    assert parse_injected_iterations("1, 3,5+") == (frozenset({1, 3}), 5)
    assert parse_injected_iterations("") == (frozenset(), None)
    env = {TEST_NONFINITE_ENV: "0,2,7+"}
    assert [i for i in range(10) if injected_nonfinite(i, env)] == [0, 2, 7, 8, 9]
    assert not injected_nonfinite(0, {})
    for bad in ("x", "1,-2", "3++", "1.5"):
        with pytest.raises(GeminiUserError, match=f"{TEST_NONFINITE_ENV}=.*i,j,k\\+.*test-only"):
            parse_injected_iterations(bad)


def test_a_malformed_test_hook_fails_when_the_guard_is_built(monkeypatch):
    monkeypatch.setenv(TEST_NONFINITE_ENV, "soon")
    with pytest.raises(GeminiUserError, match=TEST_NONFINITE_ENV):
        _guard()
    monkeypatch.setenv(TEST_NONFINITE_ENV, "4+")
    guard = _guard()
    assert [i for i in range(7) if guard.inject(i)] == [4, 5, 6]


# ---------------------------------------------------------------------------------- the step itself
def test_stages_and_hooks_run_in_the_documented_order(monkeypatch):
    """backward -> after_backward -> unscale_ each -> after_unscale -> clip each -> step each -> update once."""
    a, b, groups, loss = _two_groups()
    events = []
    names = {id(g.optimizer): n for g, n in zip(groups, "ab")}

    class RecordingScaler:
        def scale(self, value):
            events.append("scale")
            return value

        def unscale_(self, optimizer):
            events.append(f"unscale {names[id(optimizer)]}")

        def step(self, optimizer):
            events.append(f"step {names[id(optimizer)]}")
            optimizer.step()

        def update(self):
            events.append("update")

    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm):
        events.append(f"clip {max_norm}")
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    loss.register_hook(lambda g: events.append("backward"))
    backward_and_step(loss, groups, RecordingScaler(), after_backward=lambda: events.append("after_backward"),
                      after_unscale=lambda: events.append("after_unscale"))
    assert events == ["scale", "backward", "after_backward", "unscale a", "unscale b", "after_unscale",
                      "clip 0.5", "clip 2.0", "step a", "step b", "update"]


def test_each_group_is_clipped_at_its_own_norm_not_jointly():
    a, b, groups, loss = _two_groups(scale=100.0)  # large gradients: both groups are clipped
    before = [p.detach().clone() for g in groups for p in g.parameters]
    assert _guard().step(loss, groups)
    for group in groups:
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in group.parameters]))
        assert norm == pytest.approx(group.max_norm, rel=1e-4)
    # plain SGD, lr 1: each parameter moved by exactly its clipped gradient
    after = [p.detach() for g in groups for p in g.parameters]
    grads = [p.grad for g in groups for p in g.parameters]
    assert all(torch.allclose(x - y, g) for x, y, g in zip(before, after, grads))


def test_a_real_grad_scaler_gives_the_update_of_the_unscaled_step():
    """torch's multi-optimiser rule (unscale_ each, step each, update once) on CPU: a power-of-two
    scale is undone exactly, so the parameters match a step without the scaler."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        a, b, groups, loss = _two_groups(seed=3, lr=0.1)
        assert _guard().step(loss, groups, scaler)
        results.append([p.detach().clone() for g in groups for p in g.parameters])
        if scaler is not None:
            assert scaler.get_scale() == 2.0 ** 10  # no inf found: update keeps the scale (growth later)
    assert all(torch.equal(x, y) for x, y in zip(*results))


def test_a_nonfinite_loss_skips_backward_and_touches_no_state():
    a, b, groups, loss = _two_groups()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = [p.detach().clone() for g in groups for p in g.parameters]
    hooks = []
    loss = loss * float("nan")
    loss.register_hook(lambda g: hooks.append("backward"))
    called = []
    assert not _guard().step(loss, groups, scaler, after_backward=lambda: called.append(1),
                             after_unscale=lambda: called.append(2))
    assert hooks == [] and called == []  # no backward, no hook
    assert all(p.grad is None for g in groups for p in g.parameters)
    assert all(torch.equal(x, p) for x, p in zip(before, (p for g in groups for p in g.parameters)))
    assert all(not g.optimizer.state for g in groups)
    assert scaler.get_scale() == 2.0 ** 10
    # the scaler holds no half-done step: the next finite step runs (unscale_ twice would raise)
    assert _guard().step(b(torch.tanh(a(torch.ones(1, 4)))).sum(), groups, scaler)


# ------------------------------------------------------------------------------------ the counters
def test_counters_log_line_and_the_stop_after_limit_in_a_row():
    log = []
    guard = _guard(limit=2, log=log, last_good="/out/checkpoint_latest.pth")
    guard.record(True, 0)
    guard.record(False, 1, "epoch 0")
    assert (guard.in_a_row, guard.total) == (1, 1)
    assert log == ["WARNING: non-finite loss at iteration 1 (epoch 0): update skipped (1 in a row, 1 in total)."]
    guard.record(True, 2)  # a finite iteration ends the run of non-finite ones
    assert (guard.in_a_row, guard.total) == (0, 1)
    guard.record(False, 3)
    assert log[-1] == "WARNING: non-finite loss at iteration 3: update skipped (1 in a row, 2 in total)."
    with pytest.raises(GeminiUserError) as e:
        guard.record(False, 4)
    assert str(e.value) == ("training stopped: 2 non-finite losses in a row (iterations 3..4; limit "
                            "--max_nonfinite=2). Lower --lr, or raise --max_nonfinite; resume with --c (the last "
                            "good state is /out/checkpoint_latest.pth).")
    assert (guard.in_a_row, guard.total) == (2, 3)


def test_limit_zero_stops_at_the_first_nonfinite_loss():
    guard = GuardedStep(0, "nnUNet_gemini_max_nonfinite", lambda line: None, "Lower nnUNet_gemini_weight (now 1)")
    guard.record(True, 0)
    with pytest.raises(GeminiUserError, match=r"1 non-finite losses in a row \(iterations 7\.\.7; limit "
                                              r"nnUNet_gemini_max_nonfinite=0\)\. Lower nnUNet_gemini_weight"):
        guard.record(False, 7)


# ---------------------------------------------------------------------------- all ranks agree (DDP)
def _rank(rank: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    finished = False
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        model = torch.nn.parallel.DistributedDataParallel(net)
        guard = GuardedStep(5, "--max_nonfinite", lambda line: None, "Lower --lr", distributed=True)
        seen = []
        for iteration in range(3):  # rank 1's loss is NaN at iteration 1 only
            loss = model(torch.ones(1, 2)).sum() * (float("nan") if rank == 1 and iteration == 1 else 1.0)
            finite = guard.step(loss, [Group(opt, list(net.parameters()), GRAD_CLIP)])
            opt.zero_grad(set_to_none=True)
            guard.record(finite, iteration)
            seen.append(finite)
        torch.save({"seen": seen, "total": guard.total, "weight": net.weight.detach().clone()}, f"{out_file}.{rank}")
        del model, opt  # DDP's reducer goes before the group it talks through
        finished = True
    finally:
        end_process_group(finished)


def test_all_ranks_skip_together_when_one_rank_is_nonfinite(tmp_path):
    import torch.multiprocessing as mp
    out = str(tmp_path / "rank")
    mp.spawn(_rank, args=(str(tmp_path / "init"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for r in ranks:
        assert r["seen"] == [True, False, True] and r["total"] == 1
    assert torch.equal(ranks[0]["weight"], ranks[1]["weight"])  # in step: the DDP all-reduce never hung
    assert not all_ranks_finite(torch.tensor(math.inf)) and all_ranks_finite(torch.tensor(1.0))
