"""Are a pre-training's features collapsed? (issue 13: why does the pre-trained start learn slowly?)

GSS, the semantic term, has no negatives: it is minimised by features that are the same at every
voxel. This probe computes, on P patches of the pool, the last decoder stage's features f (the
GEMINI features, the segmentation layer's input) of each network given and of a fresh nnU-Net
initialisation of the same plans, and prints per network (and per encoder stage):
  spatial share   var over voxels / (var + mean^2), per channel, averaged: 0 = constant features
  mean cosine     of the feature vectors of random voxel pairs of a patch: 1 = all aligned
  effective rank  exp(entropy) of the voxel covariance's eigenvalue shares, of C channels
  participation   (sum l)^2 / sum l^2 of the same eigenvalues
  decorrelation   losses.decorrelation_loss (gemini_pretrain --decorrelation's term): 0 = decorrelated

  PYTHONPATH=. nnUNet_raw=... nnUNet_preprocessed=... python benchmarks/probe_feature_rank.py \
      --checkpoint .../GEMINIPretrain__nnUNetPlans__3d_fullres/fold_all/checkpoint_final.pth --pool FOLDER \
      [--also .../checkpoint_latest.pth ...] [--patches 8] [--json OUT]
"""
import argparse
import copy
import json

import numpy as np
import torch


def feature_figures(f: torch.Tensor, rng: np.random.Generator) -> dict:
    """f: (C, voxels) features of one patch."""
    f = f.double()
    mean, var = f.mean(1), f.var(1, unbiased=False)
    spatial = float((var / (var + mean ** 2).clamp_min(1e-12)).mean())
    idx = rng.integers(0, f.shape[1], size=(2, 4096))
    unit = f / f.norm(dim=0, keepdim=True).clamp_min(1e-12)
    cosine = float((unit[:, idx[0]] * unit[:, idx[1]]).sum(0).mean())
    centred = f - mean[:, None]
    eig = torch.linalg.eigvalsh(centred @ centred.T / f.shape[1]).clamp_min(0)
    share = eig / eig.sum().clamp_min(1e-30)
    entropy = float(-(share[share > 0] * share[share > 0].log()).sum())
    from nnunet_gemini.losses import decorrelation_loss
    return {"decorrelation": float(decorrelation_loss(f[None])),
            "spatial_share": spatial, "mean_cosine": cosine, "effective_rank": float(np.exp(entropy)),
            "participation": float(eig.sum() ** 2 / (eig ** 2).sum().clamp_min(1e-30)),
            "channel_norm": float(f.norm(dim=0).mean())}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a gemini_pretrain checkpoint (its plans build the network)")
    p.add_argument("--also", nargs="*", default=[],
                   help="further checkpoints of the same plans: gemini_pretrain or trained (nnU-Net's)")
    p.add_argument("--pool", required=True, help="the dataset's <data_identifier>_gemini_unlabeled folder")
    p.add_argument("--patches", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    from probe_common import checkpoint_and_pool_loader

    from nnunet_gemini.network import DecoderFeatureTap, EncoderStagesTap, build_segmentation_network
    from nnunet_gemini.pretrained import load_network_weights

    model, patch, loader = checkpoint_and_pool_loader(a.checkpoint, a.pool)
    images = torch.cat([next(loader)["a"].float() for _ in range(a.patches)])
    fresh = build_segmentation_network(model.plans_manager, model.configuration_manager, images.shape[1],
                                       model.network.decoder.seg_layers[-1].out_channels)
    networks = {"fresh nnU-Net init": fresh, a.checkpoint: model.network}
    for path in a.also:  # a gemini_pretrain or an nnU-Net trainer checkpoint: both hold network_weights
        net = copy.deepcopy(fresh)
        load_network_weights(net, torch.load(path, map_location="cpu", weights_only=False)["network_weights"], path,
                             "give checkpoints of the --checkpoint's plans")
        networks[path] = net
    out = {"patch": list(patch), "patches": a.patches, "networks": {}}
    for name, net in networks.items():
        net.eval()
        # each encoder stage's output too, for comparison with the decoder's features
        with torch.no_grad(), DecoderFeatureTap(net) as tap, EncoderStagesTap(net) as encoder:
            net(images)
            tapped = {"decoder features (GEMINI's f)": tap.pop().float(),
                      **{f"encoder stage {k}": o for k, o in enumerate(encoder.pop())}}
        out["networks"][name] = {}
        for where, f in tapped.items():
            rng = np.random.default_rng(a.seed)
            per_patch = [feature_figures(f[i].flatten(1), rng) for i in range(f.shape[0])]
            figures = {k: float(np.mean([x[k] for x in per_patch])) for k in per_patch[0]}
            out["networks"][name][where] = figures
            print(f"{name} | {where}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items())
                  + f" (of {f.shape[1]} channels)", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
