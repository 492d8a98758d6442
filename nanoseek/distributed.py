"""Devices and multi-process training with PyTorch's own engine: torchrun, DDP or FSDP2, torch.distributed.checkpoint.

    torchrun --nproc_per_node=2 -m nanoseek pretrain --preset test --threads 1 --parallel ddp

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR/PORT); without them everything here is a no-op and the
stage runs as one plain process. Backend gloo on CPU, nccl on CUDA (device cuda:LOCAL_RANK).

  ddp   every rank holds the whole model and optimizer; gradients are all-reduced (averaged) in backward.
  fsdp  FSDP2 (fully_shard): parameters, gradients and AdamW state are sharded along dim 0 across ranks; each
        transformer block is all-gathered just in time for its forward/backward, gradients are reduce-scattered.
        With a bf16 compute dtype its MixedPrecisionPolicy gathers bf16 weights and reduces gradients in fp32.

Work is split by rank with shard_range: rank r gets a contiguous share of the global batch (or of the problems), the
first n % W ranks one item more, so any world size works. The losses are normalised by the whole batch's counts
(loss_norm), so the averaged gradient is the single-process gradient of the same batch however unevenly the rows
or their targets are spread. With --ep the routed experts are spread over the ranks instead (expert_parallel.py:
DTensors that wrap_model leaves to their own all-to-all and gradient reduction). Training state is saved and loaded
with torch.distributed.checkpoint (save_sharded / load_sharded): every rank writes its own shards, and a checkpoint
loads at another world size, with or without FSDP or EP.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.errors import NanoseekError
from nanoseek.model import LossNorm, Transformer

MODES = ("ddp", "fsdp")
T = TypeVar("T")

# torch.distributed.fsdp / .tensor / .checkpoint / DDP are imported only once a process group exists (or a sharded
# checkpoint is read): they add ~0.6 s of CPU to every `import nanoseek.train.trainer` (every training stage and the
# tests import it), and without a process group there is nothing sharded to look for.


def _dtensor(t: Any) -> bool:
    if not initialized():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


# --- devices --------------------------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """--device: None is CUDA when a GPU is present, else the CPU; a bad or unavailable device is one line."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise NanoseekError(f"--device: unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise NanoseekError(f"--device {name}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise NanoseekError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise NanoseekError(f"--device {name}: nanoseek runs on cpu or cuda")
    return device


def inference_dtype(device: torch.device) -> torch.dtype:
    """The engine's weight and cache dtype on a device: bf16 on CUDA (grouped_mm's kernels and half the memory
    traffic of fp32), fp32 on the CPU (the fastest there for the small models a CPU runs; docs/engine.md)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


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
        if local_rank >= torch.cuda.device_count():
            raise NanoseekError(f"distributed: local rank {local_rank} has no GPU (this node has "
                                f"{torch.cuda.device_count()}); start at most that many processes per node")
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
    global _CHECKPOINT_GROUP
    _CHECKPOINT_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def run(device: torch.device, fn: Callable[[torch.device], T]) -> T:
    """fn(device) as one process, or as this rank of a torchrun job: joins the process group (fn gets this rank's
    device), only rank 0 prints (errors still reach stderr from every rank), and the group is left on any exit."""
    device = setup(device)
    try:
        if is_main():
            return fn(device)
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return fn(device)
    finally:
        cleanup()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    """Rank 0: the only one that prints, samples, and writes reports (and the single-file parts of checkpoints)."""
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def _device() -> torch.device:
    """Where collectives' tensors live: the current GPU under nccl, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# --- collectives on host values -------------------------------------------------------------------------------------
def all_reduce_mean(values: Mapping[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (every rank passes the same keys); the identity in one process."""
    if not initialized() or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_device())  # fp64: exact mean
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist(), strict=True))


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any (e.g. a Ctrl-C seen by one rank: all must stop at the same step)."""
    if not initialized():
        return flag
    t = torch.tensor([int(flag)], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_object(obj: T) -> list[T]:
    """Every rank's `obj` in rank order, on every rank ([obj] in one process): small Python results (rewards,
    per-problem scores) that each rank computed for its share of the work."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """t summed over ranks, on t's device (a new tensor; t itself in one process). nccl reduces on the GPU: a CPU
    tensor goes there and back."""
    if not initialized():
        return t
    out = t.detach().to(_device(), copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


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


def agree(check: Callable[[], T]) -> T:
    """Run check() on every rank and stop all of them if it fails on any: the same one-line error everywhere (the
    first failing rank's), instead of the others waiting in the next collective for a rank that left."""
    if not initialized():
        return check()
    error: str | None = None
    result: Any = None
    try:
        result = check()
    except NanoseekError as e:
        error = str(e)
    errors = all_gather_object(error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise NanoseekError(first)
    return result


# --- sharding the work ----------------------------------------------------------------------------------------------
def shard_range(n: int, r: int | None = None, world: int | None = None) -> range:
    """Rank r's contiguous share of n items: [start, stop), the first n % world ranks one item more. Contiguous, so
    the concatenation over ranks is the single-process order."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return range(start, start + base + (r < extra))


def local_batch_size(global_batch: int) -> int:
    """--batch-size is the global batch: rank r gets its shard_range of the rows (every rank at least one)."""
    world = world_size()
    if global_batch < world:
        raise NanoseekError(f"--batch-size {global_batch} is the global batch and must give each of the {world} "
                            f"processes at least one sequence (try {world})")
    return len(shard_range(global_batch))


def shard(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous rows of a global (x, y) batch (see shard_range).

    Every rank draws the same global batch and keeps its rows, so the global batch of a step does not depend on the
    world size: 1 and N processes train on the same tokens, and a run can resume at another world size.
    """
    if world_size() == 1:
        return batch
    local_batch_size(batch[0].shape[0])
    rows = shard_range(batch[0].shape[0])
    return batch[0][rows.start:rows.stop], batch[1][rows.start:rows.stop]


def loss_norm(targets: torch.Tensor, ignore_index: int, mtp_depth: int) -> LossNorm | None:
    """Under data parallelism: each loss term's count over the whole batch (all ranks' targets [B_r, T]) / world,
    so that the mean of the ranks' losses, which DDP and FSDP take of their gradients, is the whole batch's mean;
    None in one process (each term is then a plain mean over its batch). A small all-reduce, on the device."""
    if not initialized():
        return None
    local = LossNorm.count(targets, ignore_index, mtp_depth)
    counts = all_reduce_sum(torch.stack([local.tokens, *local.mtp_tokens, local.sequences]).float())
    counts = counts / dist.get_world_size()
    return LossNorm(counts[0], tuple(counts[1:-1]), counts[-1])


# --- wrapping -------------------------------------------------------------------------------------------------------
class _Method(nn.Module):
    """DDP all-reduces gradients only for work that runs through DDP.forward, but training calls a method of the
    model (compute_loss, or forward for GRPO's log-probabilities): this module's forward is that method, so DDP can
    wrap it."""

    def __init__(self, model: Transformer, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(type(self.model), self.method)(self.model, *args, **kwargs)


def wrap_model(model: Transformer, mode: str, compute_dtype: torch.dtype = torch.float32,
               method: str = "compute_loss") -> Transformer:
    """Make `model` data-parallel in place (a no-op without a process group) and return it.

    The returned object is still the Transformer (config, gates(), compute_loss(x, y, ...) as before), so the
    Trainer and loss functions need no changes; `method` is the one training calls (its gradients are reduced).
    Build the optimizer after this (FSDP2 replaces the parameters by sharded DTensors). compute_dtype bf16 gives
    FSDP2 a MixedPrecisionPolicy: weights all-gathered in bf16, gradients reduce-scattered in fp32.
    """
    if mode not in MODES:
        raise NanoseekError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if not initialized():
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    from torch.nn.parallel import DistributedDataParallel
    # parameters that are already distributed keep their placement and their own gradient reduction: the routed
    # experts under --ep (expert_parallel.parallelize runs first)
    owned = {n: p for n, p in model.named_parameters() if _dtensor(p)}
    if mode == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
            if compute_dtype != torch.float32 else MixedPrecisionPolicy()
        # one FSDP unit per block (gathered for its own forward/backward) + the root: embedding, final norm, head and
        # the MTP modules. MTP stays in the root unit because compute_loss uses its shared_head.norm outside the
        # MTP module's own forward, where a separate unit would already be resharded.
        for layer in model.layers:
            fully_shard(layer, mp_policy=mp, ignored_params=set(owned.values()))
        fully_shard(model, mp_policy=mp, ignored_params=set(owned.values()))
        if method != "forward":
            register_fsdp_forward_method(model, method)  # unshard the root for compute_loss as for forward
        return model
    device = next(model.parameters()).device
    # find_unused_parameters: not every parameter takes part in a step (the MTP modules get no gradient with
    # --mtp-lambda 0, nor in GRPO); DDP then marks the unused ones ready after each backward. (static_graph=True would
    # learn the set once, but fails an internal assert in torch 2.14 when the first backward runs under no_sync,
    # as an accumulation's first micro-batch does.) forward_sync_buffers=False: DDP would otherwise copy rank 0's
    # buffers to all ranks at each forward, overwriting each rank's expert_load count mid-step; the routing biases stay
    # identical without it (synced once at init, then every rank applies the same update from the all-reduced load).
    wrapper = _Method(model, method)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, [f"model.{n}" for n in owned])
    ddp = DistributedDataParallel(wrapper, device_ids=[device.index] if device.type == "cuda" else None,
                                  forward_sync_buffers=False, find_unused_parameters=True)
    # plain attributes (not submodules: the model would contain itself): model.<method> now runs through DDP
    object.__setattr__(model, method, ddp.__call__)
    object.__setattr__(model, "_ddp", ddp)
    return model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Backward passes inside reduce gradients across ranks only if `sync`: the non-final micro-batches of an
    accumulation keep theirs local (DDP's no_sync, FSDP2's set_requires_gradient_sync) and the final one reduces
    the sum once. A no-op in one process or with sync=True."""
    if sync or not initialized():
        yield
        return
    ddp = getattr(model, "_ddp", None)
    if ddp is not None:
        with ddp.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
        return
    yield


def is_sharded(model: nn.Module) -> bool:
    return any(_dtensor(p) for p in model.parameters())


# --- whole weights --------------------------------------------------------------------------------------------------
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


@torch.no_grad()
def full_state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """On rank 0 the model's state dict with every tensor whole and in CPU memory; {} on the other ranks.

    Under FSDP the shards are gathered one tensor at a time and moved to the CPU at once, so no rank ever holds a
    second whole copy of the model on its accelerator (a collective: call on all ranks). Without a process group the
    tensors are the model's own, copied to the CPU only if they live elsewhere."""
    if not is_sharded(model):
        if not is_main():
            return {}
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {}
    for k, v in model.state_dict().items():
        full = _full(v.detach())
        if is_main():
            out[k] = full.cpu()
        del full
    return out


@torch.no_grad()
def copy_full_weights(src: nn.Module, dst: nn.Module) -> None:
    """dst's parameters and buffers <- src's whole values (cast to dst's dtype): under FSDP an all-gather of each
    tensor in turn on every rank (a collective); e.g. the plain model each rank's inference engine samples from."""
    dst_state = dst.state_dict()
    for k, v in src.state_dict().items():
        full = _full(v.detach())
        dst_state[k].copy_(full)
        del full


def load_state_dict(model: nn.Module, full: Mapping[str, torch.Tensor]) -> None:
    """Load full (unsharded) tensors; under FSDP each rank keeps its own shard (no communication)."""
    current = model.state_dict()
    model.load_state_dict({k: _shard_like(v, current.get(k)) for k, v in full.items()})


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(optimizer: torch.optim.Optimizer, full: dict[str, Any]) -> None:
    """Load a full optimizer state (a single process wrote it); moments of sharded parameters are sharded like
    them."""
    params = _optimizer_params(optimizer)
    for i, s in full.get("state", {}).items():
        p = params[int(i)] if int(i) < len(params) else None
        if _dtensor(p):
            for k, v in s.items():
                if torch.is_tensor(v) and v.shape == p.shape:  # exp_avg, exp_avg_sq; not the scalar step
                    s[k] = _shard_like(v, p)
    kernels = _kernels(optimizer)  # a fused optimizer's state resumes under --ep with DDP, which cannot fuse
    optimizer.load_state_dict(full)
    _keep_kernels(optimizer, kernels)


def _kernels(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Each param group's fused / foreach choice: a loaded state dict would restore the saver's, but the kernel must
    suit this process's parameters (fused AdamW refuses the mix of plain tensors and DTensors of DDP + --ep)."""
    return [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]


def _keep_kernels(optimizer: torch.optim.Optimizer, kernels: list[dict[str, Any]]) -> None:
    for group, flags in zip(optimizer.param_groups, kernels, strict=True):
        group.update(flags)


# --- sharded checkpoints (torch.distributed.checkpoint) -------------------------------------------------------------
SHARDED_DIR = "dcp"  # the sub-directory of a checkpoint holding the DCP shards and their .metadata


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optimizer": ...} keyed by parameter names (FQNs), each rank's shards as DTensors under FSDP:
    the names, not the optimizer's parameter order or the sharding, identify a tensor, so DCP can load it into
    another world size and with or without FSDP."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, path: Path, asynchronous: bool = False) -> Any:
    """Write the model and optimizer state to `path` with torch.distributed.checkpoint: every rank writes its own
    shards (replicated tensors, as DDP's, once), rank 0 the .metadata that names them (a collective under torchrun:
    call on all ranks). asynchronous: the state is copied to CPU memory now and written by a background thread;
    returns the future to wait on before the checkpoint counts as written (None when synchronous)."""
    import torch.distributed.checkpoint as dcp
    state = _training_state(model, optimizer)
    if asynchronous:
        # the background thread's collectives (plan, metadata) run on a process group of their own: on the default
        # one they would interleave with the training step's all-reduces and deadlock
        return dcp.async_save(state, checkpoint_id=str(path), process_group=_checkpoint_group())
    dcp.save(state, checkpoint_id=str(path))
    return None


_CHECKPOINT_GROUP: Any = None


def _checkpoint_group() -> Any:
    """A gloo process group for the async checkpoint writer, made once (a collective: every rank's first async
    save makes it)."""
    global _CHECKPOINT_GROUP
    if _CHECKPOINT_GROUP is None and initialized():
        _CHECKPOINT_GROUP = dist.new_group(backend="gloo")
    return _CHECKPOINT_GROUP


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, path: Path) -> None:
    """Load a save_sharded checkpoint into `model` and `optimizer`, at any world size (a collective under torchrun):
    each rank reads the parts of the stored tensors its own shards cover (the whole tensors without FSDP). Without
    an optimizer this process alone reads the whole weights into a plain model (load_model on an intermediate
    checkpoint), whether or not a process group exists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    if optimizer is None:
        state = {"model": {k: v for k, v in model.state_dict().items()}}
        _dcp_load(dcp, state, path, no_dist=True)
        model.load_state_dict(state["model"])
        return
    state = _training_state(model, optimizer)
    # AdamW keeps no state for a parameter that never had a gradient (the MTP modules in GRPO or with --mtp-lambda
    # 0), and the saved checkpoint has none for it; the state to load into is built for every parameter, so ask
    # only for what was saved (set_state_dict then leaves the others without state, as training left them)
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    except Exception as e:
        raise _unreadable(path, e) from None
    optim_state = state["optimizer"]["state"]
    state["optimizer"]["state"] = {fqn: s for fqn, s in optim_state.items()
                                   if all(f"optimizer.state.{fqn}.{k}" in stored for k in s)}
    _dcp_load(dcp, state, path, no_dist=not initialized())
    # strict=False lets those parameters stay without state (every model tensor was read: dcp.load needs them all)
    kernels = _kernels(optimizer)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
    _keep_kernels(optimizer, kernels)


def _unreadable(path: Path, e: BaseException) -> NanoseekError:
    """One line for a missing shard, a damaged .metadata or a tensor of another shape (DCP's exceptions carry each
    rank's traceback: the last line names the error)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    return NanoseekError(f"{path}: not a readable sharded checkpoint of this model "
                         f"({(lines[-1] if lines else type(e).__name__)[:200]})")


def _dcp_load(dcp: Any, state: dict[str, Any], path: Path, no_dist: bool) -> None:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    try:
        with warnings.catch_warnings():  # "torch.distributed is disabled ... single process": what no_dist asks for
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=no_dist)
    except (Exception, CheckpointException) as e:
        raise _unreadable(path, e) from None

