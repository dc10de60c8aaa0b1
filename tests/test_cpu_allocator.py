"""The CPU allocator setting: mallopt called once with mmap off and a high trim threshold, and left
alone where the user tunes glibc's malloc or there is no glibc."""
import ctypes

import pytest
import torch  # imported before the fixture fakes ctypes.CDLL, which torch's import uses

from nnunet_gemini import cpu_allocator


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(cpu_allocator, "_applied", False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(cpu_allocator.sys, "platform", "linux")
    for var in cpu_allocator._USER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    return fake


def test_applied_once_with_mmap_off_and_a_high_trim_threshold(libc):
    line = cpu_allocator.keep_freed_memory()
    assert line.startswith("glibc malloc: freed memory kept for reuse")
    assert libc.calls == [(cpu_allocator.M_MMAP_MAX, 0), (cpu_allocator.M_TRIM_THRESHOLD, 2 ** 31 - 1)]
    assert cpu_allocator.keep_freed_memory() == line and len(libc.calls) == 2  # once per process


def test_the_users_malloc_variables_win(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert cpu_allocator.keep_freed_memory() == "glibc malloc: left as the environment sets it (MALLOC_TRIM_THRESHOLD_)"
    assert libc.calls == []


def test_left_alone_without_glibc(libc, monkeypatch):
    monkeypatch.setattr(cpu_allocator.sys, "platform", "darwin")
    assert "not on Linux" in cpu_allocator.keep_freed_memory() and libc.calls == []
    monkeypatch.setattr(cpu_allocator.sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", lambda name: object())  # a C library without mallopt
    assert "no mallopt" in cpu_allocator.keep_freed_memory()
    libc.result = 0
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    assert "refused" in cpu_allocator.keep_freed_memory() and not cpu_allocator._applied


def test_training_loops_apply_it_on_a_cpu_only(libc):
    lines = []
    cpu_allocator.for_training_on(torch.device("cuda", 0), lines.append)
    assert lines == [] and libc.calls == []  # a GPU run keeps glibc's defaults
    cpu_allocator.for_training_on(torch.device("cpu"), lines.append)
    assert lines == [cpu_allocator.APPLIED] and len(libc.calls) == 2
