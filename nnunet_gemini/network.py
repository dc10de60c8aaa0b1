"""The segmentation network from nnU-Net plans, and its full-resolution decoder features.

The backbone of GEMINI is the nnU-Net network itself. Its dense features f are the output of
the last decoder stage (``network.decoder.stages[-1]``, features_per_stage[0] channels, before
the 1x1 seg layer). Both PlainConvUNet and ResidualEncoderUNet use
dynamic_network_architectures' UNetDecoder, whose ``stages`` are ordered from the bottleneck
upwards, so ``stages[-1]`` is the full-resolution one; deep supervision only changes which seg
layers run, not the stages. A forward hook reads f from the same forward that produces the
segmentation, so a trainer pays for one network pass, not two.
"""
from typing import Optional

import torch
from torch import nn

from nnunet_gemini.errors import GeminiUserError


def build_segmentation_network(plans_manager, configuration_manager, num_input_channels: int,
                               num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
    """Exactly what nnUNetTrainer.build_network_architecture builds (so checkpoints stay loadable
    by plain nnU-Net prediction). ``plans_manager`` is unused, as in nnU-Net, but kept for the
    same signature."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(
        configuration_manager.network_arch_class_name,
        configuration_manager.network_arch_init_kwargs,
        configuration_manager.network_arch_init_kwargs_req_import,
        num_input_channels,
        num_output_channels,
        allow_init=True,
        deep_supervision=enable_deep_supervision)


def unwrap_network(network: nn.Module) -> nn.Module:
    """Strip DistributedDataParallel (.module) and torch.compile (._orig_mod) wrappers, in any
    nesting order."""
    while True:
        if hasattr(network, "_orig_mod"):
            network = network._orig_mod
        elif isinstance(network, nn.parallel.DistributedDataParallel) or (
                isinstance(network, nn.DataParallel)):
            network = network.module
        else:
            return network


def last_decoder_stage(network: nn.Module) -> nn.Module:
    net = unwrap_network(network)
    decoder = getattr(net, "decoder", None)
    stages = getattr(decoder, "stages", None)
    if not isinstance(stages, nn.ModuleList) or len(stages) == 0:
        raise GeminiUserError(
            f"the network {type(net).__name__} has no `decoder.stages` (a U-Net decoder from "
            "dynamic_network_architectures); GEMINI needs its full-resolution decoder features. "
            "Use plans whose network_arch_class_name is PlainConvUNet or ResidualEncoderUNet.")
    return stages[-1]


def feature_channels(network: nn.Module) -> int:
    """Width of the full-resolution decoder features (features_per_stage[0])."""
    net = unwrap_network(network)
    last_decoder_stage(net)  # same check and message as the tap
    return int(net.encoder.output_channels[0])


def input_channels(network: nn.Module) -> int:
    """Channels of the images the network takes (its encoder's first convolution's input)."""
    enc = unwrap_network(network).encoder
    return int(next(m for m in enc.modules() if isinstance(m, enc.conv_op)).in_channels)


class EncoderStagesTap:
    """Forward hooks on every encoder stage: after ``network(x)``, ``.pop()`` returns the stages'
    outputs of that forward (with their graph), from full resolution down; ``.close()`` (or leaving
    a ``with`` block) removes the hooks."""

    def __init__(self, network: nn.Module):
        stages = getattr(getattr(unwrap_network(network), "encoder", None), "stages", None)
        if stages is None or len(stages) == 0:
            raise GeminiUserError(f"the network {type(unwrap_network(network)).__name__} has no `encoder.stages` "
                                  "(a U-Net encoder from dynamic_network_architectures)")
        self.outputs: dict = {}
        self._handles = [stage.register_forward_hook(lambda m, i, o, k=k: self.outputs.__setitem__(k, o))
                         for k, stage in enumerate(stages)]

    def pop(self) -> list:
        if len(self.outputs) != len(self._handles):
            raise RuntimeError("EncoderStagesTap.pop(): no forward of the network since the last pop")
        outputs, self.outputs = [self.outputs[k] for k in sorted(self.outputs)], {}
        return outputs

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.outputs = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class DecoderFeatureTap:
    """Forward hook on the last decoder stage: after ``network(x)``, ``.features`` holds the
    (B, features_per_stage[0], *patch) features of that same forward (with their graph, so
    losses on them train the backbone). ``.pop()`` returns and clears them, so a stale tensor
    is never reused by mistake; ``.close()`` removes the hook."""

    def __init__(self, network: nn.Module):
        self.features: Optional[torch.Tensor] = None
        self.calls = 0  # forwards seen since the last pop (a second one would overwrite)
        self._handle = last_decoder_stage(network).register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.features = output
        self.calls += 1

    def pop(self) -> torch.Tensor:
        if self.features is None:
            raise RuntimeError("DecoderFeatureTap.pop(): no forward of the network since the last pop")
        features, self.features, self.calls = self.features, None, 0
        return features

    def close(self) -> None:
        self._handle.remove()
        self.features = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
