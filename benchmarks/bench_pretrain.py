"""Benchmark of gemini_pretrain's iteration (not a test: prints figures and ratios).

Measured in the same run, each in its own spawned process (clean peak memory):
  ours        GeminiPretrainer.train_step on the plans' patch, P pairs (default: the CLI default,
              half the plans' batch), joint restoration (and "separate" for the documented choice)
  nnunet      one nnUNetTrainer.train_step with the same patch and 2P images (what our forward
              sees besides the damaged copies)
  reference   the step written the way the released code works: whole preprocessed volume,
              batch 1, float32, dense 9^3 NCC convolutions (losses.local_ncc_loss_dense),
              full-resolution displacement deformer run in both directions, two optimiser
              steps per iteration (GEMINI, then restoration with its own forward)
Figures: seconds per iteration, iterations/s, peak memory (CPU: max RSS of the process; CUDA:
max allocated), and time per pair-voxel ratio reference / ours (target >= 3); and the floor:
the network's forward/backward and optimiser step alone on our images (pair + damaged copy),
with reference / floor, the ratio no implementation of the same network passes can exceed.

    python benchmarks/bench_pretrain.py                 # builds and plans a temporary demo dataset
    python benchmarks/bench_pretrain.py -d 987          # an already planned dataset (nnUNet_* set)
    python benchmarks/bench_pretrain.py -device cuda --amp_compile   # + AMP/compile on/off on a GPU
"""
import argparse
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time

DEMO_ID = 986


def _peak_mb(device) -> float:
    import torch
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def bench_ours(cfg: dict) -> dict:
    import torch

    from nnunet_gemini.pretraining.pretrainer import GeminiPretrainer, PretrainOptions
    os.environ.setdefault("nnUNet_n_proc_DA", "0")
    t = GeminiPretrainer(PretrainOptions(dataset=cfg["dataset"], device=cfg["device"], batch_size=cfg["pairs"],
                                         output_dir=tempfile.mkdtemp(), restoration_mode=cfg["mode"],
                                         compile=cfg.get("compile", False)))
    t.use_amp = t.use_amp and cfg.get("amp", True)
    t.build()
    t.damage_generator = torch.Generator(device=t.device).manual_seed(0)
    loader = t.build_loader(seed=0)
    batches = [next(loader) for _ in range(2)]  # data loading is not what is measured
    it = iter(range(10 ** 9))
    sec = _time(lambda: t.train_step(batches[next(it) % 2]), t.device, cfg["warmup"], cfg["iters"])
    patch = list(t.configuration_manager.patch_size)
    out = dict(sec=sec, peak_mb=_peak_mb(t.device), pairs=t.total_pairs, patch=patch,
               pair_voxels=t.total_pairs * _prod(patch))
    if cfg.get("floor"):
        # the part no GEMINI implementation can avoid: the network's forward and backward over the
        # same images (pair + damaged copy) and the optimiser step, without deformer, losses or heads
        a, b = (batches[0][k].to(t.device) for k in ("a", "b"))
        x = torch.cat([a, b, t._damage(a)[0]])

        def network_only():
            with t._autocast():
                f = t.model.features(x)
            f.float().square().mean().backward()
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
        out["floor_sec"] = _time(network_only, t.device, cfg["warmup"], cfg["iters"])
    return out


def bench_nnunet(cfg: dict) -> dict:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_gemini import datasets
    name = datasets.resolve_dataset(cfg["dataset"])
    plans_file = datasets.require_planned(name, "nnUNetPlans", "3d_fullres")
    plans = datasets.load_json(plans_file)
    plans["continue_training"] = False
    dataset_json = datasets.load_json(os.path.join(os.path.dirname(plans_file), "dataset.json"))
    os.environ["nnUNet_results"] = tempfile.mkdtemp()
    trainer = nnUNetTrainer(plans, "3d_fullres", "all", dataset_json, device=torch.device(cfg["device"]))
    trainer.initialize()
    patch = list(PlansManager(plans_file).get_configuration("3d_fullres").patch_size)
    n = 2 * cfg["pairs_used"]
    data = torch.randn(n, trainer.num_input_channels, *patch)
    target = [torch.randint(0, trainer.label_manager.num_segmentation_heads, (n, 1, *[round(p * s) for p, s in
                                                                                    zip(patch, scale)])).float()
              for scale in trainer._get_deep_supervision_scales()]
    batch = {"data": data, "target": target}
    sec = _time(lambda: trainer.train_step(batch), trainer.device, cfg["warmup"], cfg["iters"])
    return dict(sec=sec, peak_mb=_peak_mb(trainer.device), images=n)


def bench_reference(cfg: dict) -> dict:
    """The released recipe on one whole volume (padded to the network's divisibility)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from nnunet_gemini.degradation import models_genesis_damage
    from nnunet_gemini.heads import build_deformer, build_restoration_head
    from nnunet_gemini.losses import local_ncc_loss_dense, masked_cosine_loss, restoration_loss, smoothness_loss
    from nnunet_gemini.network import DecoderFeatureTap
    from nnunet_gemini.pretraining.pretrainer import GeminiPretrainer, PretrainOptions
    from nnunet_gemini.registration import validity_mask, warp
    from nnunet_gemini.unlabeled import load_pool_dataset, pool_folder_for

    t = GeminiPretrainer(PretrainOptions(dataset=cfg["dataset"], device=cfg["device"], output_dir=tempfile.mkdtemp()))
    device = t.device
    from nnunet_gemini.network import build_segmentation_network
    net = build_segmentation_network(t.plans_manager, t.configuration_manager, t.num_input_channels,
                                     t.num_output_channels, enable_deep_supervision=False).to(device)
    deformer = build_deformer(net, resolution="full").to(device)  # released: full resolution
    head = build_restoration_head(net, t.num_input_channels).to(device)
    opt = torch.optim.Adam(list(net.parameters()) + list(deformer.parameters()) + list(head.parameters()), 1e-4)
    tap = DecoderFeatureTap(net)
    cases = t.pool_case_ids()
    ds = load_pool_dataset(pool_folder_for(t.dataset_name, "nnUNetPlans", "3d_fullres"), cases[:2])
    vols = [np.asarray(ds.load_case(c)[0]) for c in cases[:2]]
    div = [int(np.prod([s[i] for s in t.configuration_manager.pool_op_kernel_sizes])) for i in range(3)]
    shape = [int(np.ceil(max(v.shape[1 + i] for v in vols) / div[i]) * div[i]) for i in range(3)]

    def pad(v):
        v = torch.from_numpy(v).float()[None]
        return F.pad(v, [x for i in reversed(range(3)) for x in (0, shape[i] - v.shape[2 + i])]).to(device)
    a, b = pad(vols[0]), pad(vols[1])

    def step():
        opt.zero_grad(set_to_none=True)
        net(torch.cat([a, b]))
        f = tap.pop()
        fa, fb = f[:1], f[1:]
        u_ab, u_ba = deformer(fa, fb), deformer(fb, fa)
        m_ab, m_ba = validity_mask(u_ab), validity_mask(u_ba)
        gvs = local_ncc_loss_dense(warp(a, u_ab), b, m_ab) + local_ncc_loss_dense(warp(b, u_ba), a, m_ba)
        gss = (0.1 * (masked_cosine_loss(warp(fa, u_ab.detach()), fb, m_ab)
                      + masked_cosine_loss(warp(fb, u_ba.detach()), fa, m_ba))
               + masked_cosine_loss(warp(fa.detach(), u_ab), fb.detach(), m_ab)
               + masked_cosine_loss(warp(fb.detach(), u_ba), fa.detach(), m_ba))
        loss = 0.4 * (smoothness_loss(u_ab) + smoothness_loss(u_ba)) + 0.8 * gss + gvs
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        damaged, target = models_genesis_damage(a)
        net(damaged)
        (100 * restoration_loss(head(tap.pop()), target)).backward()
        opt.step()

    sec = _time(step, device, cfg["warmup"], cfg["iters"])
    return dict(sec=sec, peak_mb=_peak_mb(device), volume=shape, pair_voxels=_prod(shape))


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _in_child(fn, cfg):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (cfg,))


def _make_demo(root: str) -> str:
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "pre"), ("nnUNet_results", "res")):
        env[var] = os.environ[var] = os.path.join(root, sub)
        os.makedirs(env[var], exist_ok=True)
    env.setdefault("nnUNet_def_n_proc", "1")
    env.pop("nnUNet_n_proc_DA", None)
    subprocess.run([sys.executable, "-m", "nnunet_gemini.demo_data", "-d", str(DEMO_ID), "--labeled", "4",
                    "--unlabeled", "4", "--test", "0"], env=env, check=True, capture_output=True)
    subprocess.run(["nnUNetv2_plan_and_preprocess", "-d", str(DEMO_ID), "-c", "3d_fullres", "-np", "1",
                    "-npfp", "1"], env=env, check=True, capture_output=True)
    return str(DEMO_ID)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", dest="dataset", default=None, help="planned dataset (default: a temporary demo)")
    p.add_argument("-device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--pairs", type=int, default=None, help="pairs per iteration (default: the CLI default)")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--amp_compile", action="store_true", help="CUDA: also AMP off and AMP + torch.compile")
    p.add_argument("-np", type=int, default=1, help="processes for preprocessing the pool (default: 1)")
    args = p.parse_args()
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    with tempfile.TemporaryDirectory() as root:
        dataset = args.dataset or _make_demo(root)
        subprocess.run([sys.executable, "-m", "nnunet_gemini.pretraining.run_pretraining", "-d", dataset,
                        "--preprocess_only", "-np", str(args.np)], check=True, capture_output=True)
        cfg = dict(dataset=dataset, device=args.device, pairs=args.pairs, iters=args.iters, warmup=args.warmup,
                   mode="joint")
        ours = _in_child(bench_ours, dict(cfg, floor=True))
        cfg["pairs_used"] = ours["pairs"]
        separate = _in_child(bench_ours, dict(cfg, mode="separate"))
        nnunet = _in_child(bench_nnunet, cfg)
        ref = _in_child(bench_reference, cfg)
        print(f"device {args.device}, patch {ours['patch']}, {ours['pairs']} pair(s)/iteration, "
              f"reference whole volume {ref['volume']}")
        for label, r in (("ours (joint restoration)", ours), ("ours (separate, as released)", separate),
                         (f"nnUNetTrainer ({nnunet['images']} images)", nnunet), ("released-style reference", ref)):
            print(f"  {label:34s} {r['sec']:8.3f} s/it  {1 / r['sec']:7.3f} it/s  peak {r['peak_mb']:8.0f} MiB")
        print(f"ours / nnUNetTrainer iteration time: {ours['sec'] / nnunet['sec']:.2f}x")
        print(f"separate / joint iteration time: {separate['sec'] / ours['sec']:.2f}x")
        per_voxel_ours = ours["sec"] / ours["pair_voxels"]
        per_voxel_ref = ref["sec"] / ref["pair_voxels"]
        print(f"time per pair-voxel: ours {per_voxel_ours * 1e6:.2f} us, reference {per_voxel_ref * 1e6:.2f} us, "
              f"reference / ours = {per_voxel_ref / per_voxel_ours:.2f}x (target >= 3x)")
        floor = ours["floor_sec"] / ours["pair_voxels"]
        print(f"network forward/backward + optimiser step alone on our {3 * ours['pairs']} images: "
              f"{ours['floor_sec']:.3f} s/it = {ours['floor_sec'] / ours['sec']:.0%} of our step; "
              f"reference / that floor = {per_voxel_ref / floor:.2f}x (the most any step computing the same "
              f"network passes could reach)")
        if args.device == "cuda" and args.amp_compile:
            # "ours" above is AMP on, compile off (the CLI default on CUDA); these are the other two
            # that matter: AMP off (what AMP buys) and AMP + compile (what --compile buys).
            print(f"  cuda amp=True compile=False: {ours['sec']:.3f} s/it, peak {ours['peak_mb']:.0f} MiB (ours)")
            for amp, comp in ((False, False), (True, True)):
                r = _in_child(bench_ours, dict(cfg, amp=amp, compile=comp))
                print(f"  cuda amp={amp} compile={comp}: {r['sec']:.3f} s/it, peak {r['peak_mb']:.0f} MiB, "
                      f"{r['sec'] / ours['sec']:.2f}x ours", flush=True)


if __name__ == "__main__":
    main()
