"""Multi-process data-parallel training with PyTorch's own engine: DDP or FSDP2 under `torchrun`.

    torchrun --nproc_per_node=2 -m nanoseek pretrain --preset test --threads 1 --parallel ddp

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT); without them everything here is a no-op and the
stage runs as one plain process. Backend gloo on CPU, nccl on CUDA (device cuda:LOCAL_RANK).

  ddp   every rank holds the whole model and optimizer; gradients are all-reduced (averaged) in backward.
  fsdp  FSDP2 (fully_shard): parameters, gradients and AdamW state are sharded along dim 0 across ranks; each
        transformer block is all-gathered just in time for its forward/backward, gradients are reduce-scattered.

Both see the same global batch, split into equal contiguous row slices per rank (shard()), so the averaged gradient is
the single-process gradient of the same batch. With --ep the routed experts are spread over the ranks instead
(expert_parallel.py: DTensors that wrap_model leaves to their own all-to-all and gradient reduction). Checkpoints
stay world-size independent: full weights and a full (unsharded) optimizer state are gathered (full_state_dict /
full_optimizer_state) and written by rank 0; on resume every rank reads the full files and keeps its own shard
(load_state_dict / load_optimizer_state).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer

MODES = ("ddp", "fsdp")
T = TypeVar("T")

# torch.distributed.fsdp / .tensor / DDP are imported only once a process group exists: they add ~0.6 s of CPU to
# every `import nanoseek.train.trainer` (every training stage and the tests import it), and without a process group
# there is nothing sharded to look for.


def _dtensor(t: Any) -> bool:
    if not initialized():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


# --- process group --------------------------------------------------------------------------------------------------
def launched() -> bool:
    """True under torchrun (or anything else that sets the standard RANK / WORLD_SIZE variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device: torch.device, timeout_minutes: float = 10.0) -> torch.device:
    """Join the process group torchrun describes; returns this rank's device (cuda:LOCAL_RANK on CUDA).

    The timeout bounds how long a rank waits in a collective for a peer that died without torchrun noticing.
    """
    if not launched() or dist.is_initialized():
        return device
    try:
        rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise NanoseekError("distributed: RANK, WORLD_SIZE and LOCAL_RANK must be integers (start with torchrun)") \
            from None
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(minutes=timeout_minutes),
                                device_id=device if device.type == "cuda" else None)
    except (ValueError, RuntimeError) as e:  # e.g. MASTER_ADDR unset, or the port taken
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NanoseekError(f"distributed: could not join the {backend} process group as rank {rank} of {world} "
                            f"({first})") from None
    return device


def cleanup() -> None:
    """Leave the process group (in a finally: a rank that fails or is interrupted must not leave it half open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Rank 0: the only one that prints, samples, and writes checkpoints and reports."""
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


# --- collectives on host values -------------------------------------------------------------------------------------
def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (every rank passes the same keys); the identity in one process."""
    if not initialized() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)  # fp64: the mean of few floats is exact
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (e.g. a Ctrl-C seen by one rank: all must stop at the same step)."""
    if not initialized():
        return flag
    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def main_first(fn: Callable[[], T]) -> T:
    """Run fn on rank 0, then on the others (which then find its caches: tokenizer, tokenized data).

    A failure on rank 0 is sent to the others, so every rank stops with the same one-line error instead of waiting.
    """
    if not initialized():
        return fn()
    error: list[str | None] = [None]
    if is_main():
        try:
            result = fn()
        except NanoseekError as e:
            error[0] = str(e)
            raise
        except BaseException as e:
            error[0] = f"rank 0 failed: {type(e).__name__}: {e}"
            raise
        finally:
            dist.broadcast_object_list(error, src=0)
        return result
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise NanoseekError(error[0])
    return fn()


# --- batches --------------------------------------------------------------------------------------------------------
def local_batch_size(global_batch: int) -> int:
    """--batch-size is the global batch: each of the world_size ranks gets global / world_size rows."""
    world = world_size()
    if global_batch % world:
        raise NanoseekError(f"--batch-size {global_batch} is the global batch and must be divisible by the "
                            f"{world} processes (try {max(world, global_batch // world * world)})")
    return global_batch // world


def shard(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous rows [rank * B/W, (rank + 1) * B/W) of a global (x, y) batch of B rows.

    Every rank draws the same global batch and keeps its slice, so the global batch of a step does not depend on the
    world size: 1 and N processes train on the same tokens, and a run can resume at another world size.
    """
    world = world_size()
    if world == 1:
        return batch
    rows = local_batch_size(batch[0].shape[0])
    r = rank()
    return batch[0][r * rows:(r + 1) * rows], batch[1][r * rows:(r + 1) * rows]


# --- wrapping -------------------------------------------------------------------------------------------------------
class _ComputeLoss(nn.Module):
    """DDP all-reduces gradients only for work that runs through DDP.forward, but training calls
    model.compute_loss(), not model(): this module's forward is that method, so DDP can wrap it."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.model).compute_loss(self.model, *args, **kwargs)


def wrap_model(model: Transformer, mode: str) -> Transformer:
    """Make `model` data-parallel in place (a no-op without a process group) and return it.

    The returned object is still the Transformer (config, gates(), compute_loss(x, y, ...) as before), so the
    Trainer and loss functions need no changes. Build the optimizer after this (FSDP2 replaces the parameters by
    sharded DTensors).
    """
    if mode not in MODES:
        raise NanoseekError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if not initialized():
        return model
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
    from torch.nn.parallel import DistributedDataParallel
    # parameters that are already distributed keep their placement and their own gradient reduction: the routed
    # experts under --ep (expert_parallel.parallelize runs first)
    owned = {n: p for n, p in model.named_parameters() if _dtensor(p)}
    if mode == "fsdp":
        # one FSDP unit per block (gathered for its own forward/backward) + the root: embedding, final norm, head and
        # the MTP modules. MTP stays in the root unit because compute_loss uses its shared_head.norm outside the
        # MTP module's own forward, where a separate unit would already be resharded.
        for layer in model.layers:
            fully_shard(layer, ignored_params=set(owned.values()))
        fully_shard(model, ignored_params=set(owned.values()))
        register_fsdp_forward_method(model, "compute_loss")  # unshard the root for compute_loss as for forward
        return model
    device = next(model.parameters()).device
    # static_graph: the same parameters take part in every step, but not always all of them (the MTP modules get no
    # gradient with --mtp-lambda 0); DDP learns the set in the first step instead of searching the graph each step.
    # forward_sync_buffers=False: DDP would otherwise copy rank 0's buffers to all ranks at each forward, overwriting
    # each rank's expert_load count mid-step; the routing biases stay identical without it (synced once at init, then
    # every rank applies the same update from the all-reduced load).
    wrapper = _ComputeLoss(model)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, [f"model.{n}" for n in owned])
    ddp = DistributedDataParallel(wrapper, device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False, static_graph=True)
    # a plain attribute (not a submodule: the model would contain itself): model.compute_loss now runs through DDP
    object.__setattr__(model, "compute_loss", ddp.__call__)
    return model


def is_sharded(model: nn.Module) -> bool:
    return any(_dtensor(p) for p in model.parameters())


# --- full state for checkpoints -------------------------------------------------------------------------------------
def _full(t: Any) -> Any:
    return t.full_tensor() if _dtensor(t) else t


def _shard_like(full: torch.Tensor, ref: Any) -> Any:
    """`full` cut like the sharded `ref` (every rank already has the whole tensor: src_data_rank=None, no
    communication), or `full` itself when `ref` is not sharded."""
    if not _dtensor(ref):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.detach().to(ref.device, ref.dtype), ref.device_mesh, ref.placements,
                             src_data_rank=None)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded tensor gathered whole (a collective under FSDP: call on all ranks)."""
    with torch.no_grad():
        return {k: _full(v.detach()) for k, v in model.state_dict().items()}


def load_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor]) -> None:
    """Load full (unsharded) tensors; under FSDP each rank keeps its own shard (no communication)."""
    current = model.state_dict()
    model.load_state_dict({k: _shard_like(v, current.get(k)) for k, v in full.items()})


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with sharded moments gathered whole: the same file a single process writes
    (a collective under FSDP: call on all ranks)."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: _full(v) for k, v in s.items()} for i, s in sorted(state["state"].items())}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Load a full optimizer state (any world size wrote it); moments of sharded parameters are sharded like them."""
    params = _optimizer_params(optimizer)
    for i, s in full.get("state", {}).items():
        p = params[int(i)] if int(i) < len(params) else None
        if _dtensor(p):
            for k, v in s.items():
                if torch.is_tensor(v) and v.shape == p.shape:  # exp_avg, exp_avg_sq; not the scalar step
                    s[k] = _shard_like(v, p)
    # the kernel choice stays this process's: a fused optimizer's state resumes under --ep with DDP, which cannot fuse
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(full)
    for group, flags in zip(optimizer.param_groups, kernels, strict=True):
        group.update(flags)
