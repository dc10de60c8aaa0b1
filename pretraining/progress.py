"""What gemini_pretrain shows a user: nnU-Net style log lines, per-epoch curves
(progress.png) and example figures of one pair and one restoration.

Plain types only in `state_dict()` (it goes into the weights_only checkpoint).
"""
import os
import sys
from datetime import datetime
from typing import Dict, List, Optional

import numpy as np

# Per-epoch curves drawn in progress.png, by panel.
LOSS_TERMS = ("loss", "total", "appearance", "semantic", "smoothness", "restoration")
QUALITY_TERMS = ("ncc", "folding_fraction")


def _timestamp() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


class PretrainLogger:
    """Log file training_log_<timestamp>.txt (lines "<time>: <message>", as nnU-Net writes them),
    echoed to stdout; per-epoch means of every logged term for progress.png and resuming."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.enabled = enabled
        self.log_file: Optional[str] = None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
            self.log_file = os.path.join(output_dir, f"training_log_{stamp}.txt")
        self.epochs: Dict[str, List[float]] = {}  # term -> one value per epoch
        self._running: Dict[str, List[float]] = {}

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{_timestamp()}: {message}"
        print(line, flush=True)
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def add_iteration(self, values: Dict[str, float]) -> None:
        for k, v in values.items():
            self._running.setdefault(k, []).append(float(v))

    def end_epoch(self, extra: Dict[str, float]) -> Dict[str, float]:
        """Close the epoch: the mean of each term over its iterations (NaN when none) + extra."""
        means = {k: float(np.mean(v)) for k, v in self._running.items()}
        means.update({k: float(v) for k, v in extra.items()})
        n_before = len(next(iter(self.epochs.values()))) if self.epochs else 0
        for k in set(self.epochs) | set(means):
            column = self.epochs.setdefault(k, [float("nan")] * n_before)
            column.append(means.get(k, float("nan")))
        self._running = {}
        return means

    def state_dict(self) -> Dict[str, List[float]]:
        return {k: list(v) for k, v in self.epochs.items()}

    def load_state_dict(self, state: Dict[str, List[float]]) -> None:
        self.epochs = {k: [float(x) for x in v] for k, v in state.items()}

    def plot_progress(self, path: str) -> None:
        if not self.enabled or not self.epochs:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(3, 1, figsize=(10, 13))
        axes[0].set_yscale("log")  # 100 x restoration MSE and a ~1e-3 smoothness share the panel
        panels = ((axes[0], LOSS_TERMS, "loss terms (epoch mean)"),
                  (axes[1], QUALITY_TERMS, "NCC / folding fraction"),
                  (axes[2], ("epoch_time_s",), "epoch time [s]"))
        for ax, terms, title in panels:
            for term in terms:
                if term in self.epochs:
                    ax.plot(np.arange(len(self.epochs[term])), self.epochs[term], marker=".", label=term)
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if ax.lines:
                ax.legend(loc="best")
        fig.tight_layout()
        _save_figure(fig, path)


def _save_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)  # a viewer never sees a half-written PNG


def _middle_slice(x: np.ndarray) -> np.ndarray:
    """(C, *spatial) -> 2D image of channel 0 (the middle slice along axis 0 in 3D)."""
    x = x[0]
    return x[x.shape[0] // 2] if x.ndim == 3 else x


def _in_plane_displacement(disp: np.ndarray) -> np.ndarray:
    """(d, *spatial) -> (2, H, W): the in-plane components on the figure's slice."""
    if disp.shape[0] == 3:
        return disp[1:, disp.shape[1] // 2]
    return disp


def save_pair_figure(path: str, fixed, moving, warped, disp, grid_step: int = 4) -> None:
    """fixed, moving, warped moving ((C, *spatial) arrays) and the deformation grid
    (disp (d, *spatial), voxel units) on the middle slice."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
    for ax, img, title in zip(axes, (fixed, moving, warped), ("fixed (B)", "moving (A)", "A warped to B")):
        ax.imshow(_middle_slice(img), cmap="gray")
        ax.set_title(title)
    u = _in_plane_displacement(disp)
    h, w = u.shape[1:]
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    # backward warp: grid node p is drawn where it samples, p + u(p)
    r, c = rows + u[0], cols + u[1]
    ax = axes[3]
    for i in range(0, h, grid_step):
        ax.plot(c[i], r[i], "b-", lw=0.7)
    for j in range(0, w, grid_step):
        ax.plot(c[:, j], r[:, j], "b-", lw=0.7)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_aspect("equal")
    ax.set_title(f"deformation grid (max |u| {np.abs(u).max():.2f} vox)")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    _save_figure(fig, path)


def save_restoration_figure(path: str, damaged, restored, target) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    for ax, img, title in zip(axes, (damaged, restored, target),
                              ("damaged input (rescaled)", "restored", "target (clean, rescaled)")):
        ax.imshow(_middle_slice(img), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    _save_figure(fig, path)


def is_interactive() -> bool:
    return sys.stdout.isatty()
