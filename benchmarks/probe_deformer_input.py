"""Does the deformer register real pairs faster when it sees the images? (issue 13, finding 6)

The deformer (as released) sees only the backbone's features of the two images. In pre-training on
real MRI it stays near the zero field, and a faster backbone drove it there outright (docs/results.md),
while in supervised runs, where the labels shape the features, it registers. This probe freezes a
gemini_pretrain checkpoint's network, computes the features of 2K fixed pairs once, and trains a fresh
deformer of the checkpoint's spec on the GEMINI loss alone (Adam, constant lr) with each input
(gemini_pretrain --deformer_input): "features" (as released), "images" (the two intensity patches
only, as VoxelMorph) and "features_and_images" (concatenated). The loss is the same in every case
(the semantic terms still use the features); only what the deformer sees changes. Prints the
appearance term and local NCC of the K training pairs and of H held-out pairs at the start, every E
steps and at the end: the held-out figure says whether it learns to register or only these pairs.

  PYTHONPATH=. nnUNet_raw=... nnUNet_preprocessed=... python benchmarks/probe_deformer_input.py \
      --checkpoint .../checkpoint_final.pth --pool FOLDER --pairs 32 --held_out 8 --steps 300 \
      --inputs features images features_and_images --lr 1e-4 [--eval_every 100 --json OUT]
"""
import argparse
import json

import torch

from nnunet_gemini.choices import DEFORMER_INPUTS


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--pool", required=True, help="the dataset's <data_identifier>_gemini_unlabeled folder")
    p.add_argument("--pairs", type=int, default=32, help="training pairs K")
    p.add_argument("--held_out", type=int, default=8, help="held-out pairs H")
    p.add_argument("--eval_every", type=int, default=None, help="also evaluate every E steps (default: end only)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--inputs", nargs="+", choices=DEFORMER_INPUTS, default=list(DEFORMER_INPUTS))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    torch.manual_seed(a.seed)
    from probe_common import checkpoint_and_pool_loader, fixed_pairs_with_features, train_deformer

    from nnunet_gemini.gemini_step import step_from_spec

    model, patch, loader = checkpoint_and_pool_loader(a.checkpoint, a.pool)
    pairs = fixed_pairs_with_features(model, loader, a.pairs + a.held_out)
    train, held_out = pairs[:a.pairs], pairs[a.pairs:]
    spec = model.step.spec()
    out = {"checkpoint": a.checkpoint, "spec": spec, "pairs": a.pairs, "held_out": a.held_out, "steps": a.steps,
           "lr": a.lr, "eval_every": a.eval_every, "patch": list(patch), "runs": []}
    for what in a.inputs:
        torch.manual_seed(a.seed)
        step = step_from_spec(model.network, dict(spec, input=what))  # a fresh deformer seeing `what`
        # the checkpoint's loss settings for every input
        step.weights, step.ncc_window, step.smoothness_kind = (model.step.weights, model.step.ncc_window,
                                                               model.step.smoothness_kind)
        run = train_deformer(step, train, held_out, a.steps, a.lr, a.eval_every, what)
        out["runs"].append({"input": what, "in_channels": step.deformer.enc0[0].in_channels // 2, **run})
        if a.json:  # after every input: a long probe leaves what it measured
            with open(a.json, "w") as f:
                json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
