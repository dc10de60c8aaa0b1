"""The torch device a command runs on: one default and one resolver for every -device flag
(gemini_pretrain, gemini_register, gemini_demo, gemini_benchmark), and the one way a -num_gpus
process leaves its process group. Importing this module does not import torch; default_device()
imports it only when called, so a CLI's --help stays cheap."""
from typing import TYPE_CHECKING, Optional

from nnunet_gemini.errors import GeminiUserError

if TYPE_CHECKING:
    import torch

DEVICES = ("cuda", "cpu", "mps")


def default_device() -> str:
    """'cuda' when a CUDA GPU is visible, else 'cpu' (also when torch cannot be imported: the
    first stage that needs torch reports that)."""
    try:
        import torch
    except Exception:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _refuse(name: str, problem: str, fix: str) -> GeminiUserError:
    return GeminiUserError(f"-device {name}: {problem}; {fix}.")


def resolve_device(name: Optional[str] = None, local_rank: int = 0) -> "torch.device":
    """-device NAME (cuda, cpu or mps; None: default_device()) -> torch.device, checked against what
    this machine has. cuda is this process's GPU `local_rank` (0 outside DDP) and becomes torch's
    current CUDA device, so NCCL and plain .cuda() calls use it too."""
    import torch
    name = default_device() if name is None else str(name)
    if name not in DEVICES:
        raise _refuse(repr(name), f"not one of {', '.join(DEVICES)}", "pass one of them (default: cuda when a "
                                                                     "CUDA GPU is visible, else cpu)")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise _refuse(name, "no CUDA GPU is visible", "use -device cpu (slow) or run on a machine with a GPU")
        if local_rank >= torch.cuda.device_count():
            raise _refuse(name, f"process {local_rank} needs GPU {local_rank} but {torch.cuda.device_count()} "
                                f"CUDA device(s) are visible", "start at most that many processes (-num_gpus)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise _refuse(name, "MPS is not available here", "use -device cpu")
        return torch.device("mps")
    return torch.device("cpu")


def end_process_group(finished: bool) -> None:
    """Leave the default process group. After a finished run every rank first waits for the others:
    a rank that destroys the group, or exits, while a peer's gloo threads still talk to it aborted a
    2-process CPU run with "terminate called without an active exception". After an error no barrier
    (a failed peer would never reach it)."""
    import torch.distributed as dist
    if finished:
        dist.barrier()
    dist.destroy_process_group()
