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

Deformer input. As released the deformer sees the decoder features of the two images;
deformer_input="images" shows it the two images instead (as VoxelMorph), "features_and_images"
both, concatenated per image. Only its input changes: the losses, their routing and the
semantic terms (on the features) stay the same; the images carry no gradient.

Default deformer option: half resolution, one direction (DEFAULT_BIDIRECTIONAL below,
heads.DEFAULT_DEFORMER_RESOLUTION), a measured choice: about a quarter of full+both's GEMINI cost
at equal or better quality on a known deformation, and exactly inverse-consistent; full
resolution and both directions stay available. Measurements: docs/design.md.
"""
import dataclasses
from typing import Optional

import torch
from torch import nn

# DEFORMATIONS is re-exported: callers import it from here
from nnunet_gemini.choices import DEFAULT_DEFORMER_INPUT, DEFORMATIONS, DEFORMER_INPUTS  # noqa: F401
from nnunet_gemini.errors import GeminiUserError
from nnunet_gemini.losses import GeminiWeights, gemini_loss
from nnunet_gemini.registration import folding_fraction, integrate_velocity

DEFAULT_BIDIRECTIONAL = False
DEFAULT_INTEGRATION_STEPS = 7  # scaling-and-squaring steps of a velocity field


class GeminiStep(nn.Module):
    """GEMINI loss for pairs (img_a[i], img_b[i]); owns no parameters besides the deformer."""

    def __init__(self, deformer: nn.Module, deformation: str = "diffeomorphic",
                 integration_steps: int = DEFAULT_INTEGRATION_STEPS,
                 bidirectional: Optional[bool] = None, weights: Optional[GeminiWeights] = None,
                 ncc_window: int = 9, smoothness_kind: str = "gradient",
                 deformer_input: str = DEFAULT_DEFORMER_INPUT):
        super().__init__()
        if deformer_input not in DEFORMER_INPUTS:
            raise GeminiUserError(f"deformer input {deformer_input!r} is not one of {DEFORMER_INPUTS}; "
                                  "pick one of them")
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
        self.deformer_input = deformer_input

    def spec(self) -> dict:
        """How to rebuild this deformer and its fields (see deformer_spec): what checkpoints record."""
        return deformer_spec(self.deformation, self.deformer.resolution, self.bidirectional, self.integration_steps,
                             self.deformer_input)

    def deformer_sees(self, feat: torch.Tensor, img: Optional[torch.Tensor]) -> torch.Tensor:
        """What the deformer is given of one image (per deformer_input)."""
        if self.deformer_input == "features":
            return feat
        if img is None:
            raise ValueError(f"deformer_input {self.deformer_input!r} needs the images: pass img_a and img_b")
        if img.shape[0] != feat.shape[0] or img.shape[2:] != feat.shape[2:]:
            raise ValueError(f"images {tuple(img.shape)} and features {tuple(feat.shape)} differ in batch or "
                             "spatial size")
        img = img.to(feat.dtype)
        return img if self.deformer_input == "images" else torch.cat((feat, img), dim=1)

    def fields(self, feat_a: torch.Tensor, feat_b: torch.Tensor, img_a: Optional[torch.Tensor] = None,
               img_b: Optional[torch.Tensor] = None):
        """-> (disp_ab, disp_ba, raw_ab, raw_ba): displacements (voxel units) and the raw
        fields the smoothness term acts on. The images are needed when the deformer sees them."""
        seen_a, seen_b = self.deformer_sees(feat_a, img_a), self.deformer_sees(feat_b, img_b)
        raw_ab = self.deformer(seen_a, seen_b).float()
        if self.deformation == "displacement":
            raw_ba = self.deformer(seen_b, seen_a).float()
            return raw_ab, raw_ba, raw_ab, raw_ba
        raw_ba = self.deformer(seen_b, seen_a).float() if self.bidirectional else -raw_ab
        # both integrations in one batch (each sample as alone: the values of two separate calls)
        disp_ab, disp_ba = integrate_velocity(torch.cat((raw_ab, raw_ba)), self.integration_steps).chunk(2)
        return disp_ab, disp_ba, raw_ab, raw_ba

    def forward(self, img_a: torch.Tensor, img_b: torch.Tensor, feat_a: torch.Tensor, feat_b: torch.Tensor):
        disp_ab, disp_ba, raw_ab, raw_ba = self.fields(feat_a, feat_b, img_a, img_b)
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
                       "weights", "deformer_input")


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


# ------------------------------------------------------------------ the deformer's spec
# One description of the deformer and its fields, written by both checkpoint writers (gemini_pretrain,
# the trainer) and read by every reader (the trainer's pre-trained start and --c, gemini_register).
SPEC_KEYS = ("deformation", "resolution", "bidirectional", "integration_steps", "input")


def deformer_spec(deformation: Optional[str] = None, resolution: Optional[str] = None,
                  bidirectional: Optional[bool] = None, integration_steps: Optional[int] = None,
                  input: Optional[str] = None, where: str = "the deformer spec") -> dict:
    """The complete spec {SPEC_KEYS}, None -> the default (the one place the defaults live), checked;
    GeminiUserError naming `where` when a value is not buildable."""
    from nnunet_gemini.heads import DEFAULT_DEFORMER_RESOLUTION, DEFORMER_RESOLUTIONS
    deformation = "diffeomorphic" if deformation is None else deformation
    if deformation not in DEFORMATIONS:
        raise GeminiUserError(f"{where}: deformation {deformation!r} is not one of {DEFORMATIONS}")
    resolution = DEFAULT_DEFORMER_RESOLUTION if resolution is None else resolution
    if resolution not in DEFORMER_RESOLUTIONS:
        raise GeminiUserError(f"{where}: deformer resolution {resolution!r} is not one of {DEFORMER_RESOLUTIONS}")
    if bidirectional is None:  # a displacement has no closed-form inverse: both directions
        bidirectional = True if deformation == "displacement" else DEFAULT_BIDIRECTIONAL
    if deformation == "displacement" and not bidirectional:
        raise GeminiUserError(f"{where}: deformation 'displacement' needs bidirectional=True (no closed-form "
                              f"inverse)")
    steps = DEFAULT_INTEGRATION_STEPS if integration_steps is None else integration_steps
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise GeminiUserError(f"{where}: integration_steps {integration_steps!r} is not a non-negative integer")
    input = DEFAULT_DEFORMER_INPUT if input is None else input
    if input not in DEFORMER_INPUTS:
        raise GeminiUserError(f"{where}: deformer input {input!r} is not one of {DEFORMER_INPUTS}")
    return {"deformation": deformation, "resolution": resolution, "bidirectional": bool(bidirectional),
            "integration_steps": int(steps), "input": input}


def spec_to_checkpoint(spec: dict) -> dict:
    """The checkpoint fields of a spec, in the layout both checkpoint kinds have always had:
    {"deformation": ..., "deformer": {"resolution", "bidirectional", "integration_steps", "input"}}."""
    spec = deformer_spec(**spec)
    return {"deformation": spec["deformation"], "deformer": {k: spec[k] for k in SPEC_KEYS if k != "deformation"}}


def spec_from_checkpoint(entry: dict, where: str) -> dict:
    """The spec recorded in a checkpoint's fields (a gemini_pretrain "meta" or a trainer's "gemini"
    entry). Keys an older writer left out take the defaults (one written before the deformer input was
    recorded has a feature-input deformer, the default); other keys there (gemini_pretrain wrote
    "ncc_window", a loss setting nobody read back) are ignored."""
    deformer = entry.get("deformer") or {}
    return deformer_spec(entry.get("deformation"), deformer.get("resolution"), deformer.get("bidirectional"),
                         deformer.get("integration_steps"), deformer.get("input"), where=where)


def step_from_spec(network: nn.Module, spec: dict) -> GeminiStep:
    """The one builder: a fresh deformer beside `network` (its op family and feature channels) inside
    a GeminiStep, both as `spec` says."""
    from nnunet_gemini.heads import build_deformer
    spec = deformer_spec(**spec)
    deformer = build_deformer(network, resolution=spec["resolution"], deformer_input=spec["input"])
    return from_options(deformer, {"deformer_input": spec["input"],
                                   **{k: spec[k] for k in ("deformation", "bidirectional", "integration_steps")}})
