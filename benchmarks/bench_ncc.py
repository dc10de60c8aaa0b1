"""Local NCC loss, forward + backward: box filter (cumulative sums) vs dense window^3 conv.

Usage: PYTHONPATH=. python benchmarks/bench_ncc.py [--repeats N] [--window 9] [--sizes 96 128]
       [--cpu-only | --cuda-only]
Prints per shape and device: median time of each, speed-up ratio, max abs difference of the
loss and of the input gradient; on CUDA also fp32 vs autocast(fp16) and peak memory.
Target: >= 30x at 1x1x96^3 on CPU.
"""
import argparse
import time

import torch

from nnunet_gemini.losses import local_ncc_loss, local_ncc_loss_dense

SHAPES = {96: (1, 1, 96, 96, 96), 128: (2, 1, 128, 128, 128)}


def _timed(fn, i, j, repeats, device):
    times, loss, grad = [], None, None
    for _ in range(repeats):
        x = i.detach().clone().requires_grad_()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = fn(x, j)
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        grad = x.grad
    return sorted(times)[len(times) // 2], loss.detach(), grad


def _peak_mb(fn, i, j, device, autocast):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    x = i.detach().clone().requires_grad_()
    with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
        fn(x, j).backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def bench(shape, device, repeats, window):
    g = torch.Generator().manual_seed(0)
    i = torch.rand(shape, generator=g).to(device)
    j = (0.5 * i.cpu() + 0.5 * torch.rand(shape, generator=g)).to(device)
    mask = torch.ones((shape[0], 1) + shape[2:], device=device)
    def box(a, b):
        return local_ncc_loss(a, b, mask, window)

    def dense(a, b):
        return local_ncc_loss_dense(a, b, mask, window)
    _timed(box, i, j, 1, device)  # warm-up
    _timed(dense, i, j, 1, device)
    t_box, l_box, g_box = _timed(box, i, j, repeats, device)
    t_dense, l_dense, g_dense = _timed(dense, i, j, max(1, repeats // 2), device)
    print(f"{device.type:4s} {'x'.join(map(str, shape)):>14s} window {window}: box {t_box * 1e3:9.1f} ms  "
          f"dense {t_dense * 1e3:9.1f} ms  ratio {t_dense / t_box:6.1f}x  "
          f"|dloss| {abs(l_box - l_dense).item():.2e}  |dgrad| {(g_box - g_dense).abs().max().item():.2e}  "
          f"(loss {l_box.item():.6f})", flush=True)
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.float16):
            t_amp, l_amp, _ = _timed(box, i.half(), j.half(), repeats, device)
        print(f"     autocast fp16 box {t_amp * 1e3:.1f} ms (loss dtype {l_amp.dtype}, |dloss| vs fp32 "
              f"{abs(l_amp - l_box).item():.2e});  peak MB fp32 box {_peak_mb(box, i, j, device, False):.0f}  "
              f"autocast box {_peak_mb(box, i, j, device, True):.0f}  dense {_peak_mb(dense, i, j, device, False):.0f}",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--cuda-only", action="store_true")
    parser.add_argument("--sizes", type=int, nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    args = parser.parse_args()
    devices = [] if args.cuda_only else [torch.device("cpu")]
    if torch.cuda.is_available() and not args.cpu_only:
        devices.append(torch.device("cuda"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    for device in devices:
        for size in args.sizes:
            bench(SHAPES[size], device, args.repeats, args.window)


if __name__ == "__main__":
    main()
