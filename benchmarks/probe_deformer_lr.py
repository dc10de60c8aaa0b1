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
    from probe_common import checkpoint_and_pool_loader, fixed_pairs_with_features, registration_figures, train_deformer

    from nnunet_gemini.gemini_step import step_from_spec

    model, patch, loader = checkpoint_and_pool_loader(a.checkpoint, a.pool)
    held = a.pairs if a.held_out is None else a.held_out
    pairs = fixed_pairs_with_features(model, loader, a.pairs + held)
    train, held_out = pairs[:a.pairs], pairs[a.pairs:]
    spec = model.step.spec()
    out = {"checkpoint": a.checkpoint, "spec": spec, "pairs": a.pairs, "held_out": len(held_out), "steps": a.steps,
           "eval_every": a.eval_every, "patch": list(patch),
           "checkpoint_deformer": registration_figures(model.step, {"train": train, "held_out": held_out}),
           "runs": []}
    print(f"checkpoint's deformer on {a.pairs} + {len(held_out)} pairs: {out['checkpoint_deformer']}", flush=True)
    for lr in a.lrs:
        fresh = step_from_spec(copy.deepcopy(model.network), spec)  # a fresh deformer of the same spec
        run = train_deformer(fresh, train, held_out, a.steps, lr, a.eval_every, f"lr {lr:g}")
        out["runs"].append({"lr": lr, **run})
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
