"""Run open_clip_safe.main as one rank of a job whose training group says it is NCCL, recording
every collective: its group (the default one or another), its backend, the devices of its tensors
and the open_clip / open_clip_safe module that called it. The process group itself is gloo (CI has
no GPU); get_backend() answers "nccl" for the default group, so code that asks which backend it has
(as SafeCLIP's host-array collectives do) takes the NCCL path.

Usage: python tests/run_recording.py RECORD_FILE [open_clip_safe.main arguments...]
"""
import atexit
import functools
import inspect
import json
import runpy
import sys

import torch
import torch.distributed as dist

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "gather", "broadcast", "broadcast_object_list", "all_reduce",
               "reduce", "scatter", "all_to_all", "barrier", "all_gather_object", "gather_object")
records = []
groups = {}  # id(group) -> backend asked for in new_group
real_get_backend, real_new_group = dist.get_backend, dist.new_group


def is_default(group):
    return group is None or group is dist.group.WORLD


def get_backend(group=None):
    return "nccl" if is_default(group) else real_get_backend(group)


def new_group(*args, **kwargs):
    group = real_new_group(*args, **kwargs)
    groups[id(group)] = kwargs.get("backend") or (args[1] if len(args) > 1 else None)
    records.append({"op": "new_group", "group": "other", "backend": groups[id(group)], "devices": [],
                    "caller": caller()})
    return group


def caller():
    for frame in inspect.stack()[2:]:
        module = frame.frame.f_globals.get("__name__", "")
        if module.startswith(("open_clip", "open_clip_safe", "open_clip_train")):
            return module
    return "?"


def tensors_of(args, kwargs):
    found = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


def recorded(name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        group = kwargs.get("group")
        default = is_default(group)
        records.append({"op": name, "group": "default" if default else "other",
                        "backend": "nccl" if default else groups.get(id(group), real_get_backend(group)),
                        "devices": sorted({t.device.type for t in tensors_of(args, kwargs)}), "caller": caller()})
        return function(*args, **kwargs)
    return wrapper


dist.get_backend, dist.new_group = get_backend, new_group
for name in COLLECTIVES:
    setattr(dist, name, recorded(name, getattr(dist, name)))
record_file = sys.argv[1]
atexit.register(lambda: json.dump(records, open(record_file, "w"), indent=0))
sys.argv = ["open_clip_safe.main"] + sys.argv[2:]
runpy.run_module("open_clip_safe.main", run_name="__main__", alter_sys=True)
