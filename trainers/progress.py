"""nnU-Net's LocalLogger extended with the GEMINI terms, one value per epoch like its own keys,
so they travel in nnU-Net checkpoints. nnU-Net's progress.png stays its own; the GEMINI curves go
to their own progress_gemini.png beside it."""
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
GEMINI_PROGRESS_PNG = "progress_gemini.png"


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
        """nnU-Net's progress.png, untouched, and beside it GEMINI_PROGRESS_PNG: the supervised
        loss and the GEMINI terms (left axis), the folding fraction (right axis) and the skipped
        (non-finite) updates per epoch."""
        super().plot_progress_png(output_folder)
        log = self.my_fantastic_logging
        epoch = min(len(log[k]) for k in ("train_losses", *GEMINI_LOG_KEYS)) - 1
        if epoch < 0:
            return
        x = list(range(epoch + 1))
        sns.set(font_scale=2.5)
        fig, axes = plt.subplots(2, 1, figsize=(30, 36))

        ax, ax2 = axes[0], axes[0].twinx()
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

        ax = axes[1]
        ax.plot(x, log[SKIPPED_KEY][:epoch + 1], color="r", ls="-", label="skipped updates (non-finite loss)",
                linewidth=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel("updates")
        ax.legend(loc=(0, 1))

        plt.tight_layout()
        fig.savefig(join(output_folder, GEMINI_PROGRESS_PNG))
        plt.close(fig)
