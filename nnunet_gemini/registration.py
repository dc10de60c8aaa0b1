"""Dense deformation fields: backward warping, validity masks, integration, Jacobians.

Conventions (docs/internal-api.md): tensors are (B, C, *spatial) with 2 or 3 spatial dims;
a displacement field `disp` is (B, d, *spatial) in VOXEL units, channel i = displacement along
array axis i (tensor dim 2 + i). Backward warping: warp(x, disp)(p) = x(p + disp(p)).

One sampling convention end to end: coordinates are normalised for align_corners=True AND
sampled with align_corners=True, so voxel centres sit exactly on the grid and a zero field is
the identity (exact for nearest, float rounding for linear). The released GEMINI and
VoxelMorph code normalise for True but sample with False; that is not copied here.
All maths runs in float32 with autocast disabled.
"""
import torch
import torch.nn.functional as F

_MODES = {"linear": "bilinear", "nearest": "nearest"}  # grid_sample's 'bilinear' is trilinear in 3D
_PADDINGS = ("zeros", "border", "reflection")


def float32_math(device: torch.device):
    """Context manager that switches autocast off for `device` (maths must stay float32)."""
    return torch.autocast(device_type=device.type, enabled=False)


def _check_field(disp: torch.Tensor, name: str = "disp") -> int:
    if not torch.is_tensor(disp) or disp.ndim not in (4, 5):
        raise ValueError(f"{name} must be a (B, d, *spatial) tensor with d = 2 or 3 spatial dims, "
                         f"got shape {tuple(getattr(disp, 'shape', ()))}")
    ndim = disp.ndim - 2
    if disp.shape[1] != ndim:
        raise ValueError(f"{name} has {disp.shape[1]} channels but {ndim} spatial dims: a displacement "
                         f"field needs one channel per spatial axis, shape (B, {ndim}, *spatial)")
    return ndim


def _identity_coords(spatial, device) -> torch.Tensor:
    """(d, *spatial) float32 voxel coordinates p."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) for n in spatial]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)


def _sampling_grid(disp: torch.Tensor) -> torch.Tensor:
    """grid_sample grid (B, *spatial, d) for p + disp(p), normalised for align_corners=True.

    grid_sample's last grid dim is ordered (x, y[, z]) = (last array axis, ..., first), hence
    the flip. An axis of size 1 maps every coordinate to its single voxel (no division by zero).
    """
    spatial = disp.shape[2:]
    coords = _identity_coords(spatial, disp.device).unsqueeze(0) + disp
    extent = torch.tensor([max(n - 1, 1) for n in spatial], device=disp.device, dtype=torch.float32)
    normalised = 2.0 * coords / extent.view(1, -1, *([1] * len(spatial))) - 1.0
    return normalised.movedim(1, -1).flip(-1)


def _check_image_and_field(x, disp: torch.Tensor) -> None:
    ndim = _check_field(disp)
    if not torch.is_tensor(x) or x.ndim != disp.ndim:
        raise ValueError(f"x must be (B, C, *spatial) with {ndim} spatial dims like disp "
                         f"{tuple(disp.shape)}, got shape {tuple(getattr(x, 'shape', ()))}")
    if x.shape[0] != disp.shape[0] or x.shape[2:] != disp.shape[2:]:
        raise ValueError(f"x {tuple(x.shape)} and disp {tuple(disp.shape)} must share batch size and "
                         f"spatial shape")


def warp(x: torch.Tensor, disp: torch.Tensor, mode: str = "linear", padding: str = "zeros") -> torch.Tensor:
    """Backward warp: out(p) = x(p + disp(p)); (B, C, *spatial) -> same shape.

    mode "linear" (bi/trilinear) or "nearest" (labels, masks); padding "zeros" (outside is 0),
    "border" or "reflection". Floating inputs come back float32; integer/bool inputs warped
    with "nearest" come back in their own dtype (labels stay labels).
    Along an axis of size 1 the displacement is ignored (there is only one voxel to sample).
    """
    if mode not in _MODES:
        raise ValueError(f"warp mode must be one of {sorted(_MODES)}, got {mode!r}")
    if padding not in _PADDINGS:
        raise ValueError(f"warp padding must be one of {_PADDINGS}, got {padding!r}")
    _check_image_and_field(x, disp)
    with float32_math(x.device):
        out = F.grid_sample(x.float(), _sampling_grid(disp.float()), mode=_MODES[mode],
                            padding_mode=padding, align_corners=True)
    if mode == "nearest" and not (x.is_floating_point() or x.is_complex()):
        out = out.to(x.dtype)
    return out


class _RoutedSample(torch.autograd.Function):
    """grid_sample sampled once, returned twice: the first copy's gradient reaches only the input,
    the second's only the grid (ATen's sampler backward, one output mask each)."""

    @staticmethod
    def forward(ctx, x, grid, mode: int, padding: int):
        sample = torch.ops.aten.grid_sampler_3d if x.ndim == 5 else torch.ops.aten.grid_sampler_2d
        out = sample(x, grid, mode, padding, True)
        ctx.save_for_backward(x, grid)
        ctx.modes = (mode, padding)
        ctx.set_materialize_grads(False)  # an unused copy's gradient stays None: no sampler backward for it
        return out, out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_to_input, grad_to_grid):
        x, grid = ctx.saved_tensors
        backward = (torch.ops.aten.grid_sampler_3d_backward if x.ndim == 5 else
                    torch.ops.aten.grid_sampler_2d_backward)
        grad_x = grad_grid = None
        if ctx.needs_input_grad[0] and grad_to_input is not None:
            grad_x = backward(grad_to_input.contiguous(), x, grid, *ctx.modes, True, [True, False])[0]
        if ctx.needs_input_grad[1] and grad_to_grid is not None:
            grad_grid = backward(grad_to_grid.contiguous(), x, grid, *ctx.modes, True, [False, True])[1]
        return grad_x, grad_grid, None, None


def warp_routed(x: torch.Tensor, disp: torch.Tensor):
    """(warp(x, sg(disp)), warp(sg(x), disp)) for one linear, zero-padded sampling: two tensors of
    equal value, the first passing gradients only to x, the second only to disp (sg = stop-gradient).
    GEMINI's semantic terms need both routings of the same warp; this samples it once."""
    _check_image_and_field(x, disp)
    with float32_math(x.device):
        return _RoutedSample.apply(x.float(), _sampling_grid(disp.float()), 0, 0)  # 0, 0: bilinear, zeros


def validity_mask(disp: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) float32, detached: 1 where p + disp(p) lies inside [0, n-1] on every axis.

    Axes of size 1 are skipped, consistent with warp ignoring displacement along them.
    """
    _check_field(disp)
    spatial = disp.shape[2:]
    with torch.no_grad(), float32_math(disp.device):
        coords = _identity_coords(spatial, disp.device).unsqueeze(0) + disp.float()
        inside = torch.ones((disp.shape[0], *spatial), dtype=torch.bool, device=disp.device)
        for axis, n in enumerate(spatial):
            if n > 1:
                inside &= (coords[:, axis] >= 0) & (coords[:, axis] <= n - 1)
        return inside.unsqueeze(1).float()


def compose(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Field c with warp(x, c) ~= warp(warp(x, a), b): c(p) = b(p) + a(p + b(p)).

    The field a is sampled with border padding: a displacement does not drop to zero outside
    the volume the way image intensities do.
    """
    _check_field(a, "a")
    _check_field(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"compose needs fields of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    with float32_math(b.device):
        return b.float() + warp(a, b, padding="border")


def integrate_velocity(vel: torch.Tensor, steps: int = 7) -> torch.Tensor:
    """Scaling and squaring: exp of a stationary velocity field -> displacement (diffeomorphic
    for smooth, small enough fields). disp = vel / 2**steps, then `steps` self-compositions.
    The inverse map is integrate_velocity(-vel, steps)."""
    _check_field(vel, "vel")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    with float32_math(vel.device):
        disp = vel.float() / (2 ** int(steps))
        for _ in range(int(steps)):
            disp = compose(disp, disp)
        return disp


def _spatial_gradient(field: torch.Tensor, axis: int) -> torch.Tensor:
    """d field / d x_axis: central differences inside, one-sided at the borders (torch.gradient);
    0 along an axis of size 1."""
    if field.shape[2 + axis] < 2:
        return torch.zeros_like(field)
    return torch.gradient(field, dim=2 + axis)[0]


def jacobian_determinant(disp: torch.Tensor) -> torch.Tensor:
    """(B, *spatial): det of the Jacobian of the MAP p -> p + disp(p), i.e. det(I + grad disp).

    Finite differences: second-order central differences in the interior, first-order one-sided
    differences at the borders (torch.gradient, unit voxel spacing).
    """
    ndim = _check_field(disp)
    with float32_math(disp.device):
        d = disp.float()
        grads = [_spatial_gradient(d, axis) for axis in range(ndim)]  # grads[j][:, i] = du_i/dx_j
        J = [[grads[j][:, i] + (1.0 if i == j else 0.0) for j in range(ndim)] for i in range(ndim)]
        if ndim == 2:
            return J[0][0] * J[1][1] - J[0][1] * J[1][0]
        return (J[0][0] * (J[1][1] * J[2][2] - J[1][2] * J[2][1])
                - J[0][1] * (J[1][0] * J[2][2] - J[1][2] * J[2][0])
                + J[0][2] * (J[1][0] * J[2][1] - J[1][1] * J[2][0]))


def folding_fraction(disp: torch.Tensor) -> torch.Tensor:
    """Scalar tensor in [0, 1]: fraction of voxels (over the batch) with Jacobian det <= 0."""
    with torch.no_grad():
        return (jacobian_determinant(disp) <= 0).float().mean()


def resize_field(disp: torch.Tensor, size) -> torch.Tensor:
    """Resample a field to spatial `size` (bi/trilinear, align_corners=True like warp) and rescale
    channel i by (new_n_i - 1) / (old_n_i - 1), so it stays in voxel units of the new grid.
    A source axis of size 1 carries no scale information and keeps factor 1."""
    ndim = _check_field(disp)
    size = tuple(int(s) for s in size)
    if len(size) != ndim or min(size) < 1:
        raise ValueError(f"size must list {ndim} positive ints (one per spatial axis), got {size}")
    old = disp.shape[2:]
    factors = torch.tensor([(new - 1) / (o - 1) if o > 1 else 1.0 for new, o in zip(size, old)],
                           dtype=torch.float32, device=disp.device)
    with float32_math(disp.device):
        out = F.interpolate(disp.float(), size=size, mode="bilinear" if ndim == 2 else "trilinear",
                            align_corners=True)
        return out * factors.view(1, -1, *([1] * ndim))
