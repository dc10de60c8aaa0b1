"""Cost and quality of the GEMINI step for each deformer option (full/half resolution x
both directions / one direction with the inverse from the negated velocity).

Speed: forward+backward of one GEMINI step on a 2-pair batch (4 images through the backbone
in one forward), split into backbone, deformer, integration (scaling and squaring warps) and
loss (its warps, NCC, cosine, smoothness). Stages are cut at detached leaves so each backward
is timed on its own; the sum equals one ordinary step.
Quality: only the deformer trains on a 2D synthetic pair whose true deformation is known
(appearance loss before/after, end-point error against the truth, folding fraction).

  PYTHONPATH=. python benchmarks/bench_gemini_step.py                       # demo-like 3d 32x48x48
  PYTHONPATH=. python benchmarks/bench_gemini_step.py --plans nnUNetPlans.json -c 3d_fullres
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic_pairs import synthetic_pair  # noqa: E402

from nnunet_gemini.gemini_step import GeminiStep  # noqa: E402
from nnunet_gemini.heads import Deformer, build_deformer  # noqa: E402
from nnunet_gemini.losses import GeminiWeights, gemini_loss  # noqa: E402
from nnunet_gemini.network import DecoderFeatureTap, build_segmentation_network  # noqa: E402
from nnunet_gemini.registration import integrate_velocity  # noqa: E402

OPTIONS = [("full", True), ("full", False), ("half", True), ("half", False)]


def demo_network(ndim=3):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if ndim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    return PlainConvUNet(1, 4, (32, 64, 128, 256), conv, 3, (1, 2, 2, 2), 2, 2, 2, conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def leaf(x):
    return x.detach().requires_grad_()


def one_step_split(net, deformer, bidirectional, imgs, device):
    """Seconds (fwd+bwd) per stage for one GEMINI step; stages joined by detached leaves."""
    t = {}
    n = imgs.shape[0] // 2
    tap = DecoderFeatureTap(net)
    _, t["backbone"] = timed(lambda: net(imgs), device)
    feats = tap.pop()
    tap.close()
    f = leaf(feats)
    fa, fb = f[:n], f[n:]

    def run_deformer():
        raw_ab = deformer(fa, fb)
        raw_ba = deformer(fb, fa) if bidirectional else -raw_ab
        return raw_ab, raw_ba
    (raw_ab, raw_ba), t["deformer"] = timed(run_deformer, device)
    r_ab, r_ba = leaf(raw_ab), leaf(raw_ba)
    (u_ab, u_ba), t["integration"] = timed(lambda: (integrate_velocity(r_ab), integrate_velocity(r_ba)), device)
    d_ab, d_ba = leaf(u_ab), leaf(u_ba)
    (loss, _), t["loss"] = timed(lambda: gemini_loss(imgs[:n], imgs[n:], fa, fb, d_ab, d_ba, r_ab, r_ba), device)
    # backwards, last stage first
    _, dt = timed(lambda: loss.backward(), device)
    t["loss"] += dt
    _, dt = timed(lambda: torch.autograd.backward((u_ab, u_ba), (d_ab.grad, d_ba.grad)), device)
    t["integration"] += dt
    _, dt = timed(lambda: torch.autograd.backward((raw_ab, raw_ba) if bidirectional else raw_ab,
                                                   (r_ab.grad, r_ba.grad) if bidirectional
                                                   else r_ab.grad - r_ba.grad), device)
    t["deformer"] += dt
    _, dt = timed(lambda: feats.backward(f.grad), device)
    t["backbone"] += dt
    net.zero_grad(set_to_none=True)
    deformer.zero_grad(set_to_none=True)
    return t


def bench_speed(net, patch, device, repeats):
    imgs = torch.randn(4, 1, *patch, device=device)  # both builders make 1-channel networks
    rows = {}
    for resolution, bidirectional in OPTIONS:
        torch.manual_seed(0)
        deformer = build_deformer(net, resolution=resolution).to(device)
        one_step_split(net, deformer, bidirectional, imgs, device)  # warm-up
        runs = [one_step_split(net, deformer, bidirectional, imgs, device) for _ in range(repeats)]
        rows[(resolution, bidirectional)] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return rows


# ----------------------------------------------------------------------------- quality
def bench_quality(size, steps, seeds):
    ops = dict(conv_op=nn.Conv2d, norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
               nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    inner = (slice(None), slice(8, -8), slice(8, -8))
    rows = {}
    for resolution, bidirectional in OPTIONS:
        res = []
        for seed in seeds:
            a, b, u_true = synthetic_pair(size, seed=seed)
            torch.manual_seed(seed)
            deformer = Deformer(ops, 1, resolution=resolution)
            step = GeminiStep(deformer, bidirectional=bidirectional, weights=GeminiWeights(semantic=0.0))
            opt = torch.optim.Adam(deformer.parameters(), lr=1e-3)
            t0 = time.perf_counter()
            first = None
            for i in range(steps):
                loss, logs = step(a, b, a, b)
                first = logs["appearance"] if first is None else first
                opt.zero_grad()
                loss.backward()
                opt.step()
            secs = time.perf_counter() - t0
            with torch.no_grad():
                _, logs = step(a, b, a, b)
                u = step.fields(a, b)[0]
            epe = float((u - u_true).norm(dim=1)[inner].mean() / u_true.norm(dim=1)[inner].mean())
            res.append((logs["appearance"] / first, epe, logs["folding_fraction"], secs))
        rows[(resolution, bidirectional)] = [statistics.mean(col) for col in zip(*res)]
    return rows


def print_speed(rows):
    ref = rows[("full", True)]
    base, base_gemini = sum(ref.values()), sum(ref.values()) - ref["backbone"]
    print(f"{'deformer option':<22}{'backbone':>10}{'deformer':>10}{'integr.':>10}{'loss':>10}{'total':>10}"
          f"{'vs full+bi':>12}{'GEMINI part':>13}")
    for (res, bi), t in rows.items():
        total = sum(t.values())
        print(f"{res + (' both dirs' if bi else ' one dir'):<22}" + "".join(f"{t[k]:>10.3f}" for k in t)
              + f"{total:>10.3f}{total / base:>12.2f}{(total - t['backbone']) / base_gemini:>13.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plans", help="nnU-Net plans json (default: a demo-like 4-stage 3d PlainConvUNet)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("--patch", default="32x48x48", help="patch when no plans are given")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quality-size", type=int, default=64)
    p.add_argument("--quality-steps", type=int, default=100)
    p.add_argument("--quality-seeds", type=int, default=2)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    if args.plans:
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        pm = PlansManager(args.plans)
        cm = pm.get_configuration(args.configuration)
        net, patch = build_segmentation_network(pm, cm, 1, 2, False), tuple(cm.patch_size)
        what = f"{cm.network_arch_class_name.split('.')[-1]} from {args.plans} ({args.configuration})"
    else:
        patch = tuple(int(s) for s in args.patch.split("x"))
        net, what = demo_network(len(patch)), "demo-like 4-stage PlainConvUNet"
    net = net.to(device)
    print(f"GEMINI step fwd+bwd, 2 pairs, patch {patch}, {what}, device {device}, "
          f"threads {torch.get_num_threads()}, median of {args.repeats}")
    if not args.skip_speed:
        print_speed(bench_speed(net, patch, device, args.repeats))

    if not args.skip_quality:
        print(f"\nlearning sanity: 2D {args.quality_size}^2 synthetic pair, deformer only, {args.quality_steps} Adam "
              f"steps, mean of {args.quality_seeds} seeds (EPE relative to mean true |u|, interior)")
        q = bench_quality(args.quality_size, args.quality_steps, range(args.quality_seeds))
        print(f"{'deformer option':<22}{'app after/before':>18}{'EPE/|u|':>10}{'folding':>10}{'secs':>8}")
        for (res, bi), (app, epe, fold, secs) in q.items():
            print(f"{res + (' both dirs' if bi else ' one dir'):<22}{app:>18.3f}{epe:>10.3f}{fold:>10.4f}{secs:>8.1f}")


if __name__ == "__main__":
    main()
