"""A/B timing of one GEMINI step (deformer + integration + loss, fwd+bwd) on the study's real feature shapes."""
import statistics, sys, time, torch
sys.path.insert(0, '.')
from nnunet_gemini.gemini_step import step_from_spec
from nnunet_gemini.network import DecoderFeatureTap
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn
torch.manual_seed(0)
net = PlainConvUNet(1, 4, (32, 64, 128, 256), nn.Conv3d, 3, (1, 2, 2, 2), 2, 3, 2, conv_bias=True, norm_op=nn.InstanceNorm3d,
                    norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})
step = step_from_spec(net, {})
nn.init.normal_(step.deformer.out.weight, std=0.02)
pairs = int(sys.argv[1]) if len(sys.argv) > 1 else 1
imgs = torch.randn(2 * pairs, 1, 32, 56, 40)
with torch.no_grad(), DecoderFeatureTap(net) as tap:
    net(imgs); f = tap.pop()
ts = []
for i in range(8):
    fa = f[:pairs].clone().requires_grad_(); fb = f[pairs:].clone().requires_grad_()
    t = time.perf_counter()
    loss, _ = step(imgs[:pairs], imgs[pairs:], fa, fb); loss.backward()
    ts.append(time.perf_counter() - t)
print(f"{sys.argv[2] if len(sys.argv)>2 else ''} pairs {pairs}: median {statistics.median(ts[2:]):.3f} s  loss {loss.item():.6f}")
