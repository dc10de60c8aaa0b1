"""A/B timing of one GEMINI step (deformer + integration + loss, forward and backward) on the real-data
study's feature shapes (the 4-stage PlainConvUNet of Dataset901's plans, patch 32x56x40, 1 pair).
Run from a checkout's root, so `nnunet_gemini` is that checkout's: python ab_gemini_step.py PAIRS LABEL"""
import statistics
import sys
import time

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

sys.path.insert(0, ".")
from nnunet_gemini.gemini_step import step_from_spec  # noqa: E402
from nnunet_gemini.network import DecoderFeatureTap  # noqa: E402

torch.manual_seed(0)
net = PlainConvUNet(1, 4, (32, 64, 128, 256), nn.Conv3d, 3, (1, 2, 2, 2), 2, 3, 2, conv_bias=True,
                    norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                    nonlin_kwargs={"inplace": True})
step = step_from_spec(net, {})
nn.init.normal_(step.deformer.out.weight, std=0.02)
pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 1
imgs = torch.randn(2 * pairs, 1, 32, 56, 40)
with torch.no_grad(), DecoderFeatureTap(net) as tap:
    net(imgs)
    features = tap.pop()
seconds = []
for _ in range(8):
    feat_a = features[:pairs].clone().requires_grad_()
    feat_b = features[pairs:].clone().requires_grad_()
    t = time.perf_counter()
    loss, _ = step(imgs[:pairs], imgs[pairs:], feat_a, feat_b)
    loss.backward()
    seconds.append(time.perf_counter() - t)
label = sys.argv[2] if len(sys.argv) > 2 else ""
print(f"{label} pairs {pairs}: median {statistics.median(seconds[2:]):.3f} s  loss {loss.item():.6f}")
