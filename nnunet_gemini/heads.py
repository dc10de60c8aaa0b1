"""GEMINI's heads beside the nnU-Net backbone: the deformer and the restoration head.

Both are built from the backbone's own op family (conv_op, norm_op + kwargs, nonlin + kwargs,
read from ``network.encoder``), so they fit PlainConvUNet and ResidualEncoderUNet, 2d and 3d,
and follow whatever norm/nonlin the plans chose. They live beside ``self.network`` (never
inside it) so nnU-Net's strict ``load_state_dict`` at prediction time is unaffected.
"""
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_gemini.choices import (  # noqa: F401
    DEFAULT_DEFORMER_INPUT,
    DEFAULT_DEFORMER_RESOLUTION,
    DEFORMER_INPUTS,
    DEFORMER_RESOLUTIONS,
)
from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.network import feature_channels, input_channels, unwrap_network
from nnunet_gemini.registration import resize_field


def network_ops(network: nn.Module) -> dict:
    """The op family of a dynamic_network_architectures U-Net (its encoder carries them)."""
    enc = unwrap_network(network).encoder
    return dict(conv_op=enc.conv_op, norm_op=enc.norm_op, norm_op_kwargs=enc.norm_op_kwargs,
                nonlin=enc.nonlin, nonlin_kwargs=enc.nonlin_kwargs)


def _ndim_of(conv_op) -> int:
    for d, op in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        if issubclass(conv_op, op):
            return d
    raise ValueError(f"unsupported conv_op {conv_op}")


class _ConvNormAct(nn.Sequential):
    def __init__(self, ops: dict, cin: int, cout: int, kernel: int = 3, stride: int = 1):
        norm = ops["norm_op"](cout, **(ops["norm_op_kwargs"] or {})) if ops["norm_op"] else nn.Identity()
        act = ops["nonlin"](**(ops["nonlin_kwargs"] or {})) if ops["nonlin"] else nn.Identity()
        # bias is redundant before a norm layer
        super().__init__(ops["conv_op"](cin, cout, kernel, stride, kernel // 2, bias=ops["norm_op"] is None),
                         norm, act)


class Deformer(nn.Module):
    """Small 2-level U-Net on concat(feat_a, feat_b) (what it sees of each image: in_channels each,
    see build_deformer) -> raw field (B, ndim, *spatial) in voxel
    units (a velocity or a displacement; GeminiStep decides), ~0 at init.

    Levels: full (c0) -> /2 (c1) -> /4 bottleneck (c2) -> /2 (c3, with skip) -> full (c4, with
    skip) -> conv k3 to ndim. Upsampling interpolates to the skip's exact size, so any patch
    size works (nnU-Net patches need not be divisible by 4 along unpooled axes).
    resolution="half": the U-Net runs on 2x average-pooled features (1/4 of the voxels in 2d,
    1/8 in 3d) and the field is resampled to full resolution with its values rescaled to full
    resolution voxels.
    """

    def __init__(self, ops: dict, in_channels: int, ndim: int = None, resolution: str = DEFAULT_DEFORMER_RESOLUTION,
                 channels: Sequence[int] = (32, 64, 64, 64, 32), init_std: float = 1e-5):
        super().__init__()
        if resolution not in DEFORMER_RESOLUTIONS:
            raise GeminiUserError(f"deformer resolution {resolution!r} is not one of {DEFORMER_RESOLUTIONS}; "
                                  "pick one of them")
        self.ndim = ndim or _ndim_of(ops["conv_op"])
        self.resolution = resolution
        c0, c1, c2, c3, c4 = channels
        self.enc0 = _ConvNormAct(ops, 2 * in_channels, c0)
        self.enc1 = _ConvNormAct(ops, c0, c1, stride=2)
        self.bottleneck = _ConvNormAct(ops, c1, c2, stride=2)
        self.dec1 = _ConvNormAct(ops, c2 + c1, c3)
        self.dec0 = _ConvNormAct(ops, c3 + c0, c4)
        self.out = ops["conv_op"](c4, self.ndim, 3, 1, 1, bias=True)
        # initial field ~0: the first steps start from the identity deformation
        nn.init.normal_(self.out.weight, std=init_std)
        nn.init.zeros_(self.out.bias)

    def _up(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        return F.interpolate(x, size=like.shape[2:], mode=mode, align_corners=False)

    def forward(self, feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
        x = torch.cat((feat_a, feat_b), dim=1)
        full_size = tuple(x.shape[2:])
        if self.resolution == "half":
            pool = F.adaptive_avg_pool2d if self.ndim == 2 else F.adaptive_avg_pool3d
            x = pool(x, tuple(math.ceil(s / 2) for s in full_size))
        e0 = self.enc0(x)
        e1 = self.enc1(e0)
        b = self.bottleneck(e1)
        d1 = self.dec1(torch.cat((self._up(b, e1), e1), dim=1))
        d0 = self.dec0(torch.cat((self._up(d1, e0), e0), dim=1))
        field = self.out(d0)
        if self.resolution == "half":
            field = resize_field(field, full_size)
        return field


class RestorationHead(nn.Module):
    """Models Genesis restoration decoder tail: conv k3 (feat -> 16) + norm + nonlin + conv k1
    (16 -> input channels), in the backbone's op family."""

    def __init__(self, ops: dict, in_channels: int, out_channels: int, hidden: int = 16):
        super().__init__()
        self.body = _ConvNormAct(ops, in_channels, hidden)
        self.out = ops["conv_op"](hidden, out_channels, 1, 1, 0, bias=True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(features))


def deformer_input_channels(network: nn.Module, deformer_input: str = DEFAULT_DEFORMER_INPUT) -> int:
    """Channels the deformer sees of each image: the decoder features', the images', or both."""
    if deformer_input not in DEFORMER_INPUTS:
        raise GeminiUserError(f"deformer input {deformer_input!r} is not one of {DEFORMER_INPUTS}; pick one of them")
    return ((feature_channels(network) if deformer_input != "images" else 0)
            + (input_channels(network) if deformer_input != "features" else 0))


def build_deformer(network: nn.Module, ndim: int = None, resolution: str = DEFAULT_DEFORMER_RESOLUTION,
                   deformer_input: str = DEFAULT_DEFORMER_INPUT, **kwargs) -> Deformer:
    return Deformer(network_ops(network), deformer_input_channels(network, deformer_input), ndim=ndim,
                    resolution=resolution, **kwargs)


def build_restoration_head(network: nn.Module, num_input_channels: int) -> RestorationHead:
    return RestorationHead(network_ops(network), feature_channels(network), num_input_channels)
