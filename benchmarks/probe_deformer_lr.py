"""How fast can the deformer learn to register real pairs? (issue 13, finding 6)

Takes a gemini_pretrain checkpoint and its dataset's unlabelled pool, freezes the network (its
features of 2K fixed pairs are computed once), and trains a fresh deformer with the checkpoint's
spec on the GEMINI loss alone, with Adam at each learning rate, for S steps cycling over K of the
pairs. Prints the mean appearance term and local NCC of the K training pairs and of H held-out
pairs (does it learn to register, or only these pairs?) at the start, every E steps and after S
steps, and of the checkpoint's own deformer. A cheap probe (the network passes are done once): it
isolates the deformer's optimisation from everything else a pre-training does.

  PYTHONPATH=. nnUNet_raw=... nnUNet_preprocessed=... python benchmarks/probe_deformer_lr.py \
      --checkpoint .../GEMINIPretrain__nnUNetPlans__3d_fullres/fold_all/checkpoint_final.pth --pool FOLDER \
      --pairs 4 --steps 100 --lrs 1e-4 1e-3 1e-2 [--held_out 8 --eval_every 50]
"""
import argparse
import copy
import json
import time

import numpy as np
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pool", required=True, help="the dataset's <data_identifier>_gemini_unlabeled folder")
    p.add_argument("--pairs", type=int, default=4, help="training pairs K")
    p.add_argument("--held_out", type=int, default=None, help="held-out pairs H (default: K)")
    p.add_argument("--eval_every", type=int, default=None, help="also evaluate every E steps (default: end only)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 1e-3, 1e-2])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    from probe_common import checkpoint_and_pool_loader

    from nnunet_gemini.gemini_step import step_from_spec
    from nnunet_gemini.network import DecoderFeatureTap

    model, patch, loader = checkpoint_and_pool_loader(a.checkpoint, a.pool)
    pairs = []
    with torch.no_grad(), DecoderFeatureTap(model.network) as tap:
        held = a.pairs if a.held_out is None else a.held_out
        for _ in range(a.pairs + held):
            batch = next(loader)
            model.network(torch.cat((batch["a"], batch["b"])).float())
            f = tap.pop().float()
            pairs.append((batch["a"].float(), batch["b"].float(), f[:1], f[1:]))

    train, held_out = pairs[:a.pairs], pairs[a.pairs:]

    def evaluate(step):
        out = {}
        with torch.no_grad():
            for name, group in (("train", train), ("held_out", held_out)):
                logs = [step(*pair)[1] for pair in group]
                out[name] = {k: float(np.mean([g[k] for g in logs]))
                             for k in ("appearance", "ncc", "smoothness", "folding_fraction")}
        return out

    spec = model.step.spec()
    out = {"checkpoint": a.checkpoint, "spec": spec, "pairs": a.pairs, "held_out": len(held_out), "steps": a.steps,
           "eval_every": a.eval_every, "patch": list(patch),
           "checkpoint_deformer": evaluate(model.step), "runs": []}
    print(f"checkpoint's deformer on {a.pairs} + {len(held_out)} pairs: {out['checkpoint_deformer']}", flush=True)
    for lr in a.lrs:
        fresh = step_from_spec(copy.deepcopy(model.network), spec)  # a fresh deformer of the same spec
        start = evaluate(fresh)
        opt = torch.optim.Adam(fresh.deformer.parameters(), lr=lr)
        t0 = time.perf_counter()
        curve = []
        for i in range(a.steps):
            loss, _ = fresh(*train[i % len(train)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if a.eval_every and (i + 1) % a.eval_every == 0 and i + 1 < a.steps:
                curve.append({"step": i + 1, **evaluate(fresh)})
                print(f"lr {lr:g} step {i + 1}: ncc train {curve[-1]['train']['ncc']:.4f}, held-out "
                      f"{curve[-1]['held_out']['ncc']:.4f}", flush=True)
        end = evaluate(fresh)
        run = {"lr": lr, "start": start, "curve": curve, "end": end, "seconds": round(time.perf_counter() - t0, 1)}
        out["runs"].append(run)
        for name in ("train", "held_out"):
            s0, s1 = start[name], end[name]
            print(f"lr {lr:g} {name:8s}: appearance {s0['appearance']:.4f} -> {s1['appearance']:.4f}, ncc "
                  f"{s0['ncc']:.4f} -> {s1['ncc']:.4f}, smoothness {s1['smoothness']:.5f}, folding "
                  f"{s1['folding_fraction']:.5f} ({run['seconds']} s)", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
