"""Run a training module as __main__ the way the parity tests need it.

- webdataset's sample-shuffle RNG is pinned: open_clip calls wds.shuffle without an RNG, so
  webdataset seeds it from pid + time and two identical runs differ (docs/design.md#time-seeded-webdataset-shuffle);
- our tiny model configs are registered with open_clip.add_model_config, as a plain open_clip
  user would do, so `open_clip_train.main --model safeclip-micro` works without our package.

Usage: python tests/run_pinned.py MODULE [ARGS...]
"""
import os
import random
import runpy
import sys
import types

import open_clip
import webdataset.filters

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "open_clip_safe", "model_configs")

pinned_random = types.ModuleType("random")
pinned_random.__dict__.update(random.__dict__)
pinned_random.Random = lambda *args, **kwargs: random.Random(0)
webdataset.filters.random = pinned_random
open_clip.add_model_config(CONFIGS)

module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
