"""The option values and defaults that command lines, trainer options and modules share, in one
torch-free place: argparse and the options reader import them without importing torch, and the
modules that act on them import the same names."""

DEFORMATIONS = ("diffeomorphic", "displacement")   # velocity field + scaling and squaring, or the released one
DEFORMER_RESOLUTIONS = ("full", "half")
DEFAULT_DEFORMER_RESOLUTION = "half"  # measured choice: see docs/design.md
# What the deformer sees of each image of a pair: the backbone's decoder features (as released), the
# image intensities (as VoxelMorph), or both concatenated. The loss is the same in every case.
DEFORMER_INPUTS = ("features", "images", "features_and_images")
DEFAULT_DEFORMER_INPUT = "features"
# Where the two patches of a pair sit: "same" relative position of each case (the default: the
# released code registered whole volumes, so a pair showed corresponding anatomy), or
# "independent" random positions (an ablation of that correspondence).
PAIR_POSITIONS = ("same", "independent")
# What a downstream training takes from a pre-training: every weight but the segmentation layers
# ("all", the GVSL protocol the released code follows), or the encoder only (decoder and deformer
# start fresh: their pre-trained features serve the restoration and GEMINI tasks, not segmentation).
TRANSFERS = ("all", "encoder")
RESTORATION_MODES = ("joint", "separate")  # one forward and step for both losses, or the released two
# gemini_pretrain's defaults (800 x 250 = 2e5 iterations and Adam 1e-4, as released). The decorrelation
# weights are ours (released: 0, no such term): without them the features collapse on real MRI, and the
# start they give won on the real-data selection set (docs/design.md).
RELEASED_DECORRELATION = dict(decorrelation=0.0, encoder_decorrelation=0.0)
PRETRAIN_DEFAULTS = dict(epochs=800, iters_per_epoch=250, lr=1e-4, save_every=5, max_nonfinite=10,
                         example_every=10, seed=12345, deformation="diffeomorphic", restoration_mode="joint",
                         decorrelation=10.0, encoder_decorrelation=10.0, restoration_weight=100.0,
                         deformer_input=DEFAULT_DEFORMER_INPUT)
