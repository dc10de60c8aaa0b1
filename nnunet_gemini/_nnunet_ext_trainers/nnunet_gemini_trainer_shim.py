# Re-export only: nnU-Net imports this file as a top-level module while searching -tr NAME.
from nnunet_gemini.trainers import *  # noqa: F401,F403
