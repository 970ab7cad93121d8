"""SafeCLIP on top of open_clip. Importing the package does not import open_clip (seconds, which the
data tools do not need); `register_model_configs()` adds the package's tiny model configs to
open_clip's registry, and every entry point that builds a model calls it."""
from pathlib import Path

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
__version__ = "0.1.0"


def register_model_configs():
    """Make `safeclip-tiny` and `safeclip-micro` known to open_clip (idempotent)."""
    import open_clip

    if "safeclip-micro" not in open_clip.list_models():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
