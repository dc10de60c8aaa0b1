"""nnunet_gemini.devices: the one default and the one resolver of every -device flag, and how a
-num_gpus process leaves its process group."""
import pytest
import torch

from nnunet_gemini.devices import default_device, end_process_group, resolve_device
from nnunet_gemini.errors import GeminiUserError


def test_default_and_cpu():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert default_device() == expected and resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")


def test_one_error_text_naming_the_flag_and_the_fix(monkeypatch):
    with pytest.raises(GeminiUserError, match=r"^-device 'gpu': not one of cuda, cpu, mps; pass one of them"):
        resolve_device("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GeminiUserError, match=r"^-device cuda: no CUDA GPU is visible; use -device cpu \(slow\)"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(GeminiUserError, match=r"^-device mps: MPS is not available here; use -device cpu\.$"):
        resolve_device("mps")


def test_a_rank_beyond_the_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(GeminiUserError, match=r"process 1 needs GPU 1 but 1 CUDA device\(s\) are visible"):
        resolve_device("cuda", local_rank=1)


@pytest.mark.parametrize("finished, calls", [(True, ["barrier", "destroy"]), (False, ["destroy"])])
def test_a_process_leaves_its_group_in_step_only_after_a_finished_run(monkeypatch, finished, calls):
    import torch.distributed as dist
    seen = []
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: seen.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda *a, **k: seen.append("destroy"))
    end_process_group(finished)
    assert seen == calls  # after an error a barrier would wait for a peer that never comes
