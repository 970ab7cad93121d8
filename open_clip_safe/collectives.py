"""SafeCLIP's own collectives on host arrays: the similarity pass's rows, the split, the log's keys.

On CUDA open_clip starts its process group with NCCL, which refuses CPU tensors, and per-sample
arrays must not move to the GPU in one piece (at LAION-400M they are gigabytes). So these go
through one gloo group, made once beside the training group; when the training group carries CPU
tensors already (gloo, or a "cpu:gloo,cuda:nccl" backend) that group is used. A user's own
--dist-backend keeps carrying DDP and the losses, which hold tensors on the training device.
Transfers are chunked: beyond its result, a rank holds at most world_size x CHUNK bytes in flight.
"""
import numpy as np
import torch
import torch.distributed as dist

CHUNK = 1 << 24  # bytes per rank and transfer
_HOST_GROUPS = {}


def carries_cpu(backend):
    """Whether a backend string ("gloo", "nccl", "cpu:gloo,cuda:nccl") carries CPU tensors."""
    backend = str(backend).lower()
    return backend == "gloo" or "cpu:gloo" in backend


def host_group(args):
    """The group for host-memory collectives: the default group if it carries CPU tensors, else a gloo
    group made once (every rank must call this at the same point, as new_group is collective)."""
    if not args.distributed:
        return None
    if carries_cpu(dist.get_backend()):
        return None
    default = dist.distributed_c10d._get_default_group()
    if default not in _HOST_GROUPS:
        _HOST_GROUPS[default] = dist.new_group(backend="gloo")
    return _HOST_GROUPS[default]


def start_host_group(args):
    """Make the host group and cross it once at the run's start, on every rank: a gloo network that
    cannot connect (GLOO_SOCKET_IFNAME, a firewall) then fails in the first minute, not at the first
    mixed epoch hours in."""
    barrier(args)


def all_gather_counts(args, count):
    """Every rank's count of local rows, in rank order."""
    if not args.distributed:
        return [count]
    mine = torch.tensor([count], dtype=torch.int64)
    counts = [torch.zeros_like(mine) for _ in range(args.world_size)]
    dist.all_gather(counts, mine, group=host_group(args))
    return [int(c) for c in counts]


def gather_rows(args, local, counts, dst=None):
    """Every rank's 1-D `local` array concatenated in rank order, CHUNK bytes at a time: on every rank
    (dst None) or on rank `dst` only (None elsewhere). `counts` is all_gather_counts' result. Rows travel
    as bytes, since gloo carries no uint16/int16/uint64 tensors; every rank must pass the same dtype."""
    local = np.ascontiguousarray(local)
    if not args.distributed:
        return local
    size = local.dtype.itemsize
    raw, counts = local.reshape(-1).view(np.uint8), [count * size for count in counts]
    group = host_group(args)
    out = np.empty(sum(counts), dtype=np.uint8) if dst is None or args.rank == dst else None
    starts = np.concatenate([[0], np.cumsum(counts)])
    for begin in range(0, max(counts), CHUNK):
        width = min(CHUNK, max(counts) - begin)
        mine = raw[begin:begin + width]
        piece = torch.zeros(width, dtype=torch.uint8)
        piece[:len(mine)] = torch.from_numpy(mine)
        parts = [torch.empty_like(piece) for _ in range(args.world_size)] if out is not None else None
        if dst is None:
            dist.all_gather(parts, piece, group=group)
        else:
            dist.gather(piece, parts, dst=dst, group=group)
        for rank, part in enumerate(parts or ()):
            rows = max(0, min(width, counts[rank] - begin))
            out[starts[rank] + begin:starts[rank] + begin + rows] = part[:rows].numpy()
    return None if out is None else out.view(local.dtype)


def broadcast_rows(args, array, length, dtype, src=0):
    """Rank `src`'s 1-D array of `length` rows to every rank (others pass None), CHUNK bytes at a time."""
    if not args.distributed:
        return array
    group = host_group(args)
    out = np.ascontiguousarray(array, dtype=dtype) if args.rank == src else np.empty(length, dtype=dtype)
    raw = out.view(np.uint8)
    for begin in range(0, len(raw), CHUNK):
        dist.broadcast(torch.from_numpy(raw[begin:begin + CHUNK]), src, group=group)  # received in place
    return out


def gather_bytes_to(args, payload, dst=0):
    """Every rank's `payload` (bytes) on rank `dst`, in rank order (None elsewhere)."""
    if not args.distributed:
        return [payload]
    group = host_group(args)
    sizes = all_gather_counts(args, len(payload))
    buffer = torch.zeros(max(max(sizes), 1), dtype=torch.uint8)
    buffer[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else 0
    parts = [torch.empty_like(buffer) for _ in range(args.world_size)] if args.rank == dst else None
    dist.gather(buffer, parts, dst=dst, group=group)
    if args.rank != dst:
        return None
    return [part[:size].numpy().tobytes() for part, size in zip(parts, sizes)]


def broadcast_object(args, obj, src=0):
    """A small picklable object from rank `src` to every rank (host group)."""
    if not args.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src, group=host_group(args))
    return box[0]


def barrier(args):
    if args.distributed:
        dist.barrier(group=host_group(args))
