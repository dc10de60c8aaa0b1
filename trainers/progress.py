"""nnU-Net's LocalLogger extended with the GEMINI terms, one value per epoch like its own keys,
so they travel in nnU-Net checkpoints and appear in progress.png beside the supervised loss."""
import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from batchgenerators.utilities.file_and_folder_operations import join  # noqa: E402
from nnunetv2.training.logging.nnunet_logger import LocalLogger  # noqa: E402

# logger key -> GeminiStep log name
GEMINI_TERMS = {"gemini_total": "total", "gemini_appearance": "appearance", "gemini_semantic": "semantic",
                "gemini_smoothness": "smoothness", "gemini_folding": "folding_fraction"}
SKIPPED_KEY = "gemini_skipped_updates"  # non-finite steps skipped in the epoch
GEMINI_LOG_KEYS = tuple(GEMINI_TERMS) + (SKIPPED_KEY,)


class GeminiLocalLogger(LocalLogger):
    def __init__(self, verbose: bool = False):
        super().__init__(verbose)
        for key in GEMINI_LOG_KEYS:
            self.my_fantastic_logging[key] = list()

    def load_checkpoint(self, checkpoint: dict):
        super().load_checkpoint(checkpoint)
        for key in GEMINI_LOG_KEYS:  # a checkpoint written without GEMINI terms
            self.my_fantastic_logging.setdefault(key, [])

    def plot_progress_png(self, output_folder):
        """nnU-Net's three panels (losses + pseudo dice, epoch time, lr) and a fourth with the
        GEMINI terms (left axis) and the folding fraction (right axis)."""
        log = self.my_fantastic_logging
        epoch = min(len(v) for v in log.values()) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        sns.set(font_scale=2.5)
        fig, axes = plt.subplots(4, 1, figsize=(30, 72))

        ax, ax2 = axes[0], axes[0].twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", ls="-", label="loss_tr (supervised)", linewidth=4)
        ax.plot(x, log["val_losses"][:epoch + 1], color="r", ls="-", label="loss_val", linewidth=4)
        ax2.plot(x, log["mean_fg_dice"][:epoch + 1], color="g", ls="dotted", label="pseudo dice", linewidth=3)
        ax2.plot(x, log["ema_fg_dice"][:epoch + 1], color="g", ls="-", label="pseudo dice (mov. avg.)",
                 linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax2.set_ylabel("pseudo dice")
        ax.legend(loc=(0, 1))
        ax2.legend(loc=(0.2, 1))

        ax = axes[1]
        durations = [e - s for e, s in zip(log["epoch_end_timestamps"][:epoch + 1],
                                           log["epoch_start_timestamps"][:epoch + 1])]
        ax.plot(x, durations, color="b", ls="-", label="epoch duration", linewidth=4)
        ax.set(ylim=[0, ax.get_ylim()[1]])
        ax.set_xlabel("epoch")
        ax.set_ylabel("time [s]")
        ax.legend(loc=(0, 1))

        ax = axes[2]
        ax.plot(x, log["lrs"][:epoch + 1], color="b", ls="-", label="learning rate", linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("learning rate")
        ax.legend(loc=(0, 1))

        ax, ax2 = axes[3], axes[3].twinx()
        ax.plot(x, log["train_losses"][:epoch + 1], color="b", ls="-", label="supervised", linewidth=4)
        for key, color in zip(("gemini_total", "gemini_appearance", "gemini_semantic", "gemini_smoothness"),
                              ("k", "m", "c", "y")):
            ax.plot(x, log[key][:epoch + 1], color=color, ls="-", label=key, linewidth=3)
        ax2.plot(x, log["gemini_folding"][:epoch + 1], color="r", ls="dotted", label="folding fraction",
                 linewidth=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel("GEMINI terms (before nnUNet_gemini_weight)")
        ax2.set_ylabel("folding fraction")
        ax.legend(loc=(0, 1), ncol=3)
        ax2.legend(loc=(0.75, 1))

        plt.tight_layout()
        fig.savefig(join(output_folder, "progress.png"))
        plt.close(fig)
