"""Time per training iteration and peak memory: nnUNetTrainerGEMINI against nnUNetTrainer on the
same plans and configuration, side by side in one run.

  (a) same TOTAL images per iteration: nnUNetTrainer with batch n + 2p vs GEMINI with n labelled
      + p pairs (targets: <= 1.25x time, <= 1.3x memory);
  (b) same labelled batch: nnUNetTrainer with batch n (figures in docs/design.md).

Only the train_step is timed (synthetic tensors of the plans' patch size, so data loading and
augmentation, which both trainers share, do not blur the figures). Each variant runs in its own
process so peak memory is its own: CUDA max_memory_allocated, or on CPU the growth of peak RSS
over the RSS before the first step (Linux; an approximation of what the steps allocate).

  nnUNet_raw=... nnUNet_preprocessed=... nnUNet_results=/tmp/bench_results \\
  python benchmarks/bench_trainer.py -d 987 -c 3d_fullres [-n 2 -p 1] [--iters 5] [--device cpu]
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import tempfile
import time


def _make_trainer(name, dataset, configuration, plans_identifier, device):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
    folder = join(nnUNet_preprocessed.require(), maybe_convert_to_dataset_name(dataset))
    plans = load_json(join(folder, plans_identifier + ".json"))
    plans["continue_training"] = False
    cls = recursive_find_trainer_class_by_name(name)
    return cls(plans, configuration, "all", load_json(join(folder, "dataset.json")), torch.device(device))


def _current_rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _measure(args, variant, labelled, pairs, queue):
    import contextlib
    import io

    import torch
    os.environ["nnUNet_gemini_auto_pretrained"] = "0"
    os.environ["nnUNet_results"] = tempfile.mkdtemp(prefix="bench_trainer_")
    name = "nnUNetTrainerGEMINI_NoPretrain" if variant == "gemini" else "nnUNetTrainer"
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = _make_trainer(name, args.d, args.c, args.p, args.device)
        trainer.initialize()
    device = trainer.device
    patch = tuple(trainer.configuration_manager.patch_size)
    channels = trainer.num_input_channels
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # output shapes of the deep supervision heads -> target shapes
        shapes = [o.shape[2:] for o in trainer.network(torch.zeros((1, channels) + patch, device=device))]
    heads = trainer.label_manager.num_segmentation_heads

    def batch():
        data = torch.randn((labelled, channels) + patch, generator=gen)
        target = [torch.randint(0, heads, (labelled, 1) + tuple(s), generator=gen).float() for s in shapes]
        return {"data": data, "target": target}

    if variant == "gemini":
        def synthetic_pairs():
            while True:
                yield {"a": torch.randn((pairs, channels) + patch, generator=gen),
                       "b": torch.randn((pairs, channels) + patch, generator=gen)}
        trainer.pair_loader = synthetic_pairs()
        trainer.network.train()
    batches = [batch() for _ in range(args.iters + args.warmup)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_before_steps = _current_rss_kib()
    for b in batches[:args.warmup]:
        trainer.train_step(b)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for b in batches[args.warmup:]:
        trainer.train_step(b)
    sync()
    seconds = (time.perf_counter() - start) / args.iters
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        # what the steps need beyond the model and setup: peak RSS minus RSS before the first step
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_steps) / 1024
    queue.put({"variant": variant, "labelled": labelled, "pairs": pairs, "images": labelled + 2 * pairs,
               "patch": list(patch), "s_per_iter": seconds, "peak_mib": peak_mib})


def run(args, variant, labelled, pairs=0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(args, variant, labelled, pairs, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-d", required=True, help="dataset id or name (planned and preprocessed)")
    parser.add_argument("-c", default="3d_fullres", help="configuration")
    parser.add_argument("-p", default="nnUNetPlans", help="plans identifier")
    parser.add_argument("-n", type=int, default=None, help="labelled batch (default: the plans' batch size)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs per iteration (default: max(1, n // 2))")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if args.n is None:
        from batchgenerators.utilities.file_and_folder_operations import join, load_json
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
        plans = load_json(join(nnUNet_preprocessed.require(), maybe_convert_to_dataset_name(args.d), args.p + ".json"))
        args.n = int(plans["configurations"][args.c]["batch_size"]) if "batch_size" in \
            plans["configurations"][args.c] else 2
    pairs = args.pairs or max(1, args.n // 2)
    gemini = run(args, "gemini", args.n, pairs)
    same_total = run(args, "nnunet", args.n + 2 * pairs)
    same_labelled = run(args, "nnunet", args.n)
    print(f"device {args.device}, configuration {args.c}, patch {gemini['patch']}, {args.iters} timed iterations")
    print(f"{'variant':<34}{'images':>7}{'s/iter':>9}{'peak MiB':>10}")
    for label, r in (("nnUNetTrainerGEMINI (n + 2p)", gemini), ("(a) nnUNetTrainer, same total", same_total),
                     ("(b) nnUNetTrainer, same labelled", same_labelled)):
        print(f"{label:<34}{r['images']:>7}{r['s_per_iter']:>9.3f}{r['peak_mib']:>10.1f}")
    ratios = {"a_time": gemini["s_per_iter"] / same_total["s_per_iter"],
              "a_memory": gemini["peak_mib"] / same_total["peak_mib"],
              "b_time": gemini["s_per_iter"] / same_labelled["s_per_iter"],
              "b_memory": gemini["peak_mib"] / same_labelled["peak_mib"]}
    print(f"(a) same total images:   time {ratios['a_time']:.2f}x (target <= 1.25x), "
          f"memory {ratios['a_memory']:.2f}x (target <= 1.3x)")
    print(f"(b) same labelled batch: time {ratios['b_time']:.2f}x, memory {ratios['b_memory']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gemini": gemini, "same_total": same_total, "same_labelled": same_labelled,
                       "ratios": ratios, "device": args.device}, f, indent=1)


if __name__ == "__main__":
    main()
