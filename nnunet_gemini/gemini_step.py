"""One GEMINI step on a batch of inter-subject pairs: deformer -> fields -> gemini_loss.

The caller runs the backbone ONCE (e.g. on cat(labelled, img_a, img_b)) with a
DecoderFeatureTap and hands the sliced features here. The deformer input is NOT detached:
appearance and smoothness also reach the backbone through the deformer input, the semantic
feature branch reaches only the backbone (stop-gradient on the field), the semantic flow
branch reaches the deformer (and the backbone only through the deformer input); the routing
itself lives in losses.gemini_loss and is pinned by tests/test_gemini_step.py.

Fields. "diffeomorphic": the deformer predicts a stationary velocity v; u = exp(v) by scaling
and squaring. bidirectional=True runs the deformer both ways (v_BA = D([fB, fA])); False runs
it once and takes u_BA = exp(-v_AB), the exact inverse of the same flow (a true homeomorphism
pair, half the deformer cost). "displacement" (as released): u = D(...), both directions
always. Smoothness acts on the raw field (velocity or displacement).

Default deformer option, measured (2-core CPU shared with other jobs, so timings are rough):
half resolution, one direction (DEFAULT_BIDIRECTIONAL below, heads.DEFAULT_DEFORMER_RESOLUTION).
- Speed, `PYTHONPATH=. python benchmarks/bench_gemini_step.py` (fwd+bwd, 2 pairs, 3d 32x48x48,
  4-stage PlainConvUNet): GEMINI part (deformer + integration + loss) relative to full+both:
  full+one 0.46, half+both 0.30, half+one 0.23; the deformer alone: 33.0 s / 12.5 / 6.6 / 2.1 s.
- Quality (deformer-only learning on a 2D 64^2 pair with a known smooth deformation, max 3 vox,
  150 Adam steps): end-point error / mean |u_true|: full+both 0.045, full+one 0.038,
  half+both 0.022, half+one 0.028; appearance loss 0.94 -> <= 0.014 for all; no folding.
  `bench_gemini_step.py --skip-speed --quality-steps 60 --quality-seeds 1` (64^2, 60 steps):
  EPE/|u| full+both 0.155, full+one 0.048, half+both 0.058, half+one 0.037; appearance
  after/before 0.021 / 0.016 / 0.014 / 0.018; no folding. Both-direction full resolution
  converges slowest.
So half+one costs about a quarter of full+both's GEMINI overhead at equal or better quality,
and its pair (exp(v), exp(-v)) is exactly inverse-consistent. Caveat: the synthetic
deformation is smooth; a full-resolution deformer may matter for fine inter-subject detail,
so both options stay available.
"""
import dataclasses
from typing import Optional

import torch
from torch import nn

from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.losses import GeminiWeights, gemini_loss
from nnunet_gemini.registration import folding_fraction, integrate_velocity

DEFORMATIONS = ("diffeomorphic", "displacement")
DEFAULT_BIDIRECTIONAL = False


class GeminiStep(nn.Module):
    """GEMINI loss for pairs (img_a[i], img_b[i]); owns no parameters besides the deformer."""

    def __init__(self, deformer: nn.Module, deformation: str = "diffeomorphic", integration_steps: int = 7,
                 bidirectional: Optional[bool] = None, weights: Optional[GeminiWeights] = None,
                 ncc_window: int = 9, smoothness_kind: str = "gradient"):
        super().__init__()
        if deformation not in DEFORMATIONS:
            raise GeminiUserError(f"deformation {deformation!r} is not one of {DEFORMATIONS}; pick one of them")
        if bidirectional is None:  # a displacement has no closed-form inverse: both directions
            bidirectional = True if deformation == "displacement" else DEFAULT_BIDIRECTIONAL
        if deformation == "displacement" and not bidirectional:
            raise GeminiUserError("deformation 'displacement' has no closed-form inverse, so it needs "
                                  "bidirectional=True; use deformation 'diffeomorphic' for one direction")
        self.deformer = deformer
        self.deformation = deformation
        self.integration_steps = int(integration_steps)
        self.bidirectional = bool(bidirectional)
        self.weights = weights if weights is not None else GeminiWeights()
        self.ncc_window = int(ncc_window)
        self.smoothness_kind = smoothness_kind

    def fields(self, feat_a: torch.Tensor, feat_b: torch.Tensor):
        """-> (disp_ab, disp_ba, raw_ab, raw_ba): displacements (voxel units) and the raw
        fields the smoothness term acts on."""
        raw_ab = self.deformer(feat_a, feat_b).float()
        if self.deformation == "displacement":
            raw_ba = self.deformer(feat_b, feat_a).float()
            return raw_ab, raw_ba, raw_ab, raw_ba
        raw_ba = self.deformer(feat_b, feat_a).float() if self.bidirectional else -raw_ab
        return (integrate_velocity(raw_ab, self.integration_steps),
                integrate_velocity(raw_ba, self.integration_steps), raw_ab, raw_ba)

    def forward(self, img_a: torch.Tensor, img_b: torch.Tensor, feat_a: torch.Tensor, feat_b: torch.Tensor):
        disp_ab, disp_ba, raw_ab, raw_ba = self.fields(feat_a, feat_b)
        loss, terms = gemini_loss(img_a, img_b, feat_a, feat_b, disp_ab, disp_ba, reg_ab=raw_ab, reg_ba=raw_ba,
                                  weights=self.weights, ncc_window=self.ncc_window,
                                  smoothness_kind=self.smoothness_kind)
        with torch.no_grad():
            scalars = {k: v.detach().float().reshape(()) for k, v in terms.items()
                       if torch.is_tensor(v) and v.numel() == 1}
            scalars["folding_fraction"] = folding_fraction(disp_ab.detach()).float()
            # one device sync for all log values instead of one per term
            logs = dict(zip(scalars, torch.stack(list(scalars.values())).tolist()))
        return loss, logs


GEMINI_STEP_OPTIONS = ("deformation", "integration_steps", "bidirectional", "ncc_window", "smoothness_kind",
                       "weights")


def from_options(deformer: nn.Module, options: Optional[dict] = None) -> GeminiStep:
    """GeminiStep from a plain dict (CLI flags, trainer attributes, checkpoint metadata).
    ``weights`` may be a dict of GeminiWeights fields."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(GEMINI_STEP_OPTIONS))
    if unknown:
        raise GeminiUserError(f"unknown GEMINI option(s) {unknown}; known: {list(GEMINI_STEP_OPTIONS)}")
    weights = options.pop("weights", None)
    if isinstance(weights, dict):
        fields = {f.name for f in dataclasses.fields(GeminiWeights)}
        bad = sorted(set(weights) - fields)
        if bad:
            raise GeminiUserError(f"unknown GEMINI weight(s) {bad}; known: {sorted(fields)}")
        weights = GeminiWeights(**{k: float(v) for k, v in weights.items()})
    return GeminiStep(deformer, weights=weights, **options)
