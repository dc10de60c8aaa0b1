"""How far does a pre-training move the network from its initialisation? (issue 13: is the pre-trained
start a different network, or the seeded initialisation plus a small change?)

gemini_pretrain seeds its network (--seed, default 12345), so its initialisation can be rebuilt exactly
from the checkpoint's plans. For each conv of the network (the segmentation layers aside, they are
not pre-trained) this prints the relative L2 distance |w - w_init| / |w_init| of each checkpoint
given: pre-trainings, and nnU-Net trainer checkpoints fine-tuned from them (their network_weights
share the keys). Every pre-training of one plans and seed shares that initialisation, so the arms
that load a pre-training all start near one point while stock nnU-Net's runs start anywhere.

  PYTHONPATH=. nnUNet_preprocessed=... python benchmarks/probe_weight_drift.py \
      --pretraining .../checkpoint_final.pth [--also OTHER.pth ...] [--seed 0] [--json OUT]
"""
import argparse
import json


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretraining", required=True, help="a gemini_pretrain checkpoint: its plans and seed "
                                                         "give the initialisation")
    p.add_argument("--also", nargs="*", default=[], help="more checkpoints (pre-trainings of the same plans and "
                                                         "seed, or trainer checkpoints fine-tuned from one)")
    p.add_argument("--seed", type=int, default=None, help="gemini_pretrain's --seed (default: its default)")
    p.add_argument("--json", default=None, help="also write the figures here")
    a = p.parse_args()
    import torch

    from nnunet_gemini.checkpoints import load_nnunet_trainer_checkpoint
    from nnunet_gemini.choices import PRETRAIN_DEFAULTS
    from nnunet_gemini.errors import GeminiUserError
    from nnunet_gemini.network import build_segmentation_network, input_channels
    from nnunet_gemini.pretrained import load_pretrained_checkpoint
    from nnunet_gemini.register import load_from_pretrain_checkpoint

    model = load_from_pretrain_checkpoint(a.pretraining, torch.device("cpu"))
    pretraining = load_pretrained_checkpoint(a.pretraining)
    torch.manual_seed(PRETRAIN_DEFAULTS["seed"] if a.seed is None else a.seed)  # as gemini_pretrain's build()
    init = build_segmentation_network(model.plans_manager, model.configuration_manager,
                                      input_channels(model.network),
                                      pretraining["meta"]["num_output_channels_at_pretraining"],
                                      enable_deep_supervision=False).state_dict()

    def weights(path: str) -> dict:
        """network_weights of a gemini_pretrain checkpoint, else of an nnU-Net trainer checkpoint."""
        try:
            return load_pretrained_checkpoint(path)["network_weights"]
        except GeminiUserError:
            return load_nnunet_trainer_checkpoint(path)["network_weights"]

    checkpoints = [a.pretraining, *a.also]
    nets = [pretraining["network_weights"], *(weights(path) for path in a.also)]
    layers = [k for k, v in init.items() if k.endswith(".weight") and v.dim() >= 3 and "seg_layers" not in k
              and not k.startswith("decoder.encoder.") and ".all_modules." not in k]
    rows = {k: [float((w[k].float() - init[k]).norm() / init[k].norm()) for w in nets] for k in layers}
    print("relative L2 distance from the seeded initialisation, per conv:")
    for i, path in enumerate(checkpoints):
        print(f"  [{i}] {path}")
    print(f"{'layer':48s} " + " ".join(f"[{i}]".rjust(6) for i in range(len(checkpoints))))
    for k, values in rows.items():
        print(f"{k:48s} " + " ".join(f"{v:6.3f}" for v in values))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"checkpoints": checkpoints, "relative_distance": rows}, f, indent=1)


if __name__ == "__main__":
    main()
