"""SafeCLIP on top of open_clip: importing the package registers its tiny model configs."""
from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)

__version__ = "0.1.0"
