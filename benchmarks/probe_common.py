"""What the probes share: a gemini_pretrain checkpoint as a model, and its pool's pairs without
augmentation (the probes measure the network, not the augmentation). Imported by the probe scripts,
which run as `python benchmarks/<probe>.py` (their folder is then on sys.path)."""
import torch


def checkpoint_and_pool_loader(checkpoint: str, pool: str):
    """-> (RegistrationModel on the CPU, its plans' patch size, an endless loader of 1-pair batches)."""
    from nnunet_gemini import unlabeled
    from nnunet_gemini.pairs import make_pair_loader
    from nnunet_gemini.register import load_from_pretrain_checkpoint

    model = load_from_pretrain_checkpoint(checkpoint, torch.device("cpu"))
    patch = model.configuration_manager.patch_size
    loader = make_pair_loader(unlabeled.load_pool_dataset(pool, unlabeled.pool_case_ids(pool)), 1, patch,
                              spatial_augmentation=False, intensity_augmentation=False)
    return model, patch, loader


def fixed_pairs_with_features(model, loader, count: int) -> list:
    """`count` pairs drawn once, as (a, b, features of a, features of b): the network's passes are done
    here only, so a probe that trains deformers on them costs the deformer's passes alone."""
    from nnunet_gemini.network import DecoderFeatureTap

    pairs = []
    with torch.no_grad(), DecoderFeatureTap(model.network) as tap:
        for _ in range(count):
            batch = next(loader)
            model.network(torch.cat((batch["a"], batch["b"])).float())
            f = tap.pop().float()
            pairs.append((batch["a"].float(), batch["b"].float(), f[:1], f[1:]))
    return pairs


def registration_figures(step, groups: dict) -> dict:
    """Mean appearance, local NCC, smoothness and folding of `step` over each named group of pairs."""
    import numpy as np
    with torch.no_grad():
        out = {}
        for name, group in groups.items():
            logs = [step(*pair)[1] for pair in group]
            out[name] = {k: float(np.mean([g[k] for g in logs]))
                         for k in ("appearance", "ncc", "smoothness", "folding_fraction")}
    return out


def train_deformer(step, train: list, held_out: list, steps: int, lr: float, eval_every, label: str) -> dict:
    """Trains step.deformer alone (Adam at `lr`, constant) for `steps` steps cycling over `train`; the
    figures of both groups at the start, every `eval_every` steps and at the end, printed under `label`.
    -> {"start", "curve", "end", "seconds"}."""
    import time
    groups = {"train": train, "held_out": held_out}
    start = registration_figures(step, groups)
    opt = torch.optim.Adam(step.deformer.parameters(), lr=lr)
    t0 = time.perf_counter()
    curve = []
    for i in range(steps):
        loss, _ = step(*train[i % len(train)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if eval_every and (i + 1) % eval_every == 0 and i + 1 < steps:
            curve.append({"step": i + 1, **registration_figures(step, groups)})
            print(f"{label} step {i + 1}: ncc train {curve[-1]['train']['ncc']:.4f}, held-out "
                  f"{curve[-1]['held_out']['ncc']:.4f}", flush=True)
    end = registration_figures(step, groups)
    run = {"start": start, "curve": curve, "end": end, "seconds": round(time.perf_counter() - t0, 1)}
    for name in groups:
        s0, s1 = start[name], end[name]
        print(f"{label:8s} {name:8s}: appearance {s0['appearance']:.4f} -> {s1['appearance']:.4f}, ncc "
              f"{s0['ncc']:.4f} -> {s1['ncc']:.4f}, smoothness {s1['smoothness']:.5f}, folding "
              f"{s1['folding_fraction']:.5f} ({run['seconds']} s)", flush=True)
    return run
