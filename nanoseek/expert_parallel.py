"""Expert parallelism (V3 paper 3.2): each rank holds a slice of every MoE layer's routed experts, and each token's
hidden state travels to the ranks that hold its experts and back with all-to-all.

    torchrun --nproc_per_node=4 -m nanoseek pretrain --ep 2     # 2 data-parallel replicas x 2 expert ranks

The ranks form a 2-D DeviceMesh (dp, ep), world = dp * ep; rank = dp_index * ep + ep_index, so an EP group is ep
consecutive ranks (one node when ep = the GPUs of a node). Every rank trains on its own rows of the global batch (as
in plain data parallelism). What each rank holds:

  routed experts   experts [j*L, (j+1)*L) of every MoE layer on EP rank j (L = n_routed_experts / ep): DTensors
                   sharded on the mesh's ep dimension (Shard(0)), replicated over dp; gradients reduced here
  everything else  attention, dense MLPs, shared experts, gate (and its bias), embedding, head: replicated (DDP)
                   or sharded (FSDP2) over all ranks, as without --ep (distributed.wrap_model leaves the experts out)

A MoE layer on one rank (n tokens, K experts each, N = ep ranks):
  1. route locally (the gate is replicated): expert e lives on EP rank e // L
  2. one row per (token, destination rank), however many of the token's experts live there (a token is sent to a
     rank once), plus one (local expert, row) pair per (token, expert) with its routing weight
  3. all_to_all_single of the sizes, then of the pairs, then of the rows and weights (uneven splits)
  4. each rank runs its L experts on the rows it received (one grouped GEMM per projection, as without EP), scales by
     the routing weights and sums each row's experts: one partial output per received row
  5. all_to_all_single sends the partial outputs back; each token sums its rows
Backward runs the same all-to-alls in reverse (_AllToAll / _Dispatch below). The all-to-alls use a process group of
their own, so they never interleave with DDP's or FSDP's collectives on the world group during backward.

Node-limited routing: expert groups are contiguous blocks of E / n_group experts and ranks hold contiguous blocks of
L, so with ep dividing n_group (or n_group dividing ep) every group lives on whole ranks and topk_group caps the
ranks (or nodes) a token can visit: max_ranks_per_token(). The accounting functions below give the bytes per token
for any shape (docs/expert_parallel.md has the table for DeepSeek-V3's).

The aux-loss-free bias update needs no change: the gate routes each rank's own tokens over all E experts, and the
trainer all-reduces expert_load over all ranks before the update. Checkpoints are torch.distributed.checkpoint
shards keyed by parameter name: each EP rank writes its experts' rows of the stacks, and loading reads the rows the
current EP size (or one plain process) needs, so a run resumes at any --ep; the HF export gathers whole stacks
(distributed.full_state_dict_cpu) and is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import combinations
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.errors import NanoseekError
from nanoseek.model import MoE, Transformer

ExpertsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (rows [R,D] sorted by local expert, counts [L])


# --- placement --------------------------------------------------------------------------------------------------
def check(config: ModelConfig, ep: int, world: int) -> None:
    """One NanoseekError when `ep` expert ranks do not fit the model or the world size."""
    if ep < 1:
        raise NanoseekError(f"--ep must be >= 1, got {ep}")
    if ep == 1:
        return
    if world % ep:
        raise NanoseekError(f"--ep {ep} must divide the number of processes ({world}); start torchrun with "
                            f"--nproc_per_node a multiple of {ep}")
    e, g = config.n_routed_experts, config.n_group
    if not any(config.is_moe_layer(i) for i in range(config.num_hidden_layers)):
        raise NanoseekError(f"--ep {ep}: the model has no MoE layer to spread over ranks")
    if e % ep:
        raise NanoseekError(f"--ep {ep} must divide n_routed_experts ({e})")
    if g > 1 and g % ep and ep % g:
        raise NanoseekError(f"--ep {ep}: the {g} expert groups (n_group) must map onto whole ranks for node-limited "
                            f"routing: use an ep that divides n_group or a multiple of it")


def rank_of_expert(config: ModelConfig, ep: int) -> torch.Tensor:
    """[E] the EP rank that holds each routed expert (contiguous blocks of n_routed_experts / ep)."""
    return torch.arange(config.n_routed_experts) // (config.n_routed_experts // ep)


def max_ranks_per_token(config: ModelConfig, ep: int) -> int:
    """The most EP ranks one token's experts can live on: each of its topk_group groups lies on ep / n_group ranks
    (or shares a rank with other groups when ep < n_group), and it has num_experts_per_tok experts."""
    k, g, kg = config.num_experts_per_tok, config.n_group, config.topk_group
    if g <= 1:
        return min(k, ep)
    return min(k, ep, kg * max(1, ep // g))


def expected_ranks_per_token(config: ModelConfig, ep: int) -> float:
    """The mean number of EP ranks a token's experts live on, for uniform routing: the gate keeps topk_group of the
    n_group groups (every choice alike), then K distinct experts among theirs (every choice alike).

    Exact: for each choice of groups, a rank holding m of the M allowed experts is visited unless all K experts
    avoid it, probability C(M-m, K) / C(M, K). Uniform routing is the balanced state the bias update steers to;
    real tokens' choices are correlated, so measured numbers differ (expert_parallel.stats count them)."""
    e, k = config.n_routed_experts, config.num_experts_per_tok
    g = max(config.n_group, 1)
    kg = config.topk_group if g > 1 else 1
    owner = rank_of_expert(config, ep).tolist()
    total, choices = 0.0, 0
    for groups in combinations(range(g), kg):
        allowed = [x for x in range(e) if x // (e // g) in groups]
        m = len(allowed)
        per_rank: dict[int, int] = {}
        for x in allowed:
            per_rank[owner[x]] = per_rank.get(owner[x], 0) + 1
        total += sum(1 - math.comb(m - n, k) / math.comb(m, k) for n in per_rank.values())
        choices += 1
    return total / choices


def layer_bytes(rows: int, pairs: int, hidden: int, elem_bytes: int, ep: int, ranks: int = 1,
                backward: bool = True) -> int:
    """Bytes one MoE layer's all-to-alls send between ranks (summed over `ranks` source ranks), given the rows
    (distinct (token, remote rank)) and pairs ((token, expert on a remote rank)) those ranks send:
      forward   sizes 16 (ep - 1) per rank; per pair (expert, row) 16 + weight 4; per row D * elem_bytes (the rows'
                dtype) to the experts and the same back (combine)
      backward  per row D * elem_bytes of the combine's gradient and the same of the rows'; 4 per pair (weights)
    """
    forward = 16 * (ep - 1) * ranks + 20 * pairs + 2 * rows * hidden * elem_bytes
    return forward + (4 * pairs + 2 * rows * hidden * elem_bytes if backward else 0)


# --- the expert-parallel group and its all-to-all ---------------------------------------------------------------
class ExpertParallel:
    """The EP process group, the mesh the expert DTensors live on, and the count of bytes this rank sent."""

    def __init__(self, config: ModelConfig, ep: int):
        from torch.distributed.device_mesh import init_device_mesh

        world, rank = dist.get_world_size(), dist.get_rank()
        check(config, ep, world)
        self.config, self.ep, self.world = config, ep, world
        self.dp = world // ep
        self.ep_rank = rank % ep
        self.local_experts = config.n_routed_experts // ep
        self.mesh = init_device_mesh("cpu" if dist.get_backend() == "gloo" else "cuda", (self.dp, ep),
                                     mesh_dim_names=("dp", "ep"))
        # own groups (every rank creates every group, in the same order): the all-to-alls in backward must never share
        # a group with the gradient all-reduces DDP / FSDP issue at the same time
        self.group = self.dp_group = None
        for d in range(self.dp):
            g = dist.new_group(list(range(d * ep, (d + 1) * ep)))
            if rank // ep == d:
                self.group = g
        for j in range(ep):
            g = dist.new_group(list(range(j, world, ep)))
            if rank % ep == j:
                self.dp_group = g
        self.bytes_sent = 0  # to other ranks, by this rank's all-to-alls (forward and backward) since the last reset

    def all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """x [sum(send), ...]: send[j] rows (in order) to EP rank j; recv[j] rows from each -> [sum(recv), ...]."""
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=self.group)
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        self.bytes_sent += (sum(send) - send[self.ep_rank]) * row_bytes  # the own chunk is a local copy
        return out

    def total_bytes_sent(self) -> int:
        """bytes_sent summed over all ranks (a collective: every rank calls it)."""
        t = torch.tensor([self.bytes_sent], dtype=torch.int64, device=self.mesh.device_type)
        dist.all_reduce(t)
        return int(t.item())

    # --- the MoE layer's routed experts ------------------------------------------------------------------------
    def dispatch(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, experts: ExpertsFn,
                 dtype: torch.dtype | None = None) -> torch.Tensor:
        """moe.dispatch across ranks: x [n,D] this rank's tokens, weights/indices [n,K] their routing (global expert
        ids) -> the routed experts' output [n,D]. experts(xs [R,D] sorted by local expert, counts [L]) runs this
        rank's L experts; the rows travel in `dtype` (default x's)."""
        n, k = indices.shape
        ep, lx, dev = self.ep, self.local_experts, x.device
        dest = indices // lx  # [n,K] EP rank of each chosen expert
        # rows: one per (token, destination rank), sorted by rank then token
        visit = torch.zeros(ep, n, dtype=torch.bool, device=dev)
        visit[dest.flatten(), torch.arange(n, device=dev).repeat_interleave(k)] = True
        row_rank, row_token = visit.nonzero(as_tuple=True)
        send_rows = visit.sum(1)  # [ep]
        row_index = torch.full((ep, n), -1, dtype=torch.long, device=dev)
        row_index[row_rank, row_token] = torch.arange(len(row_token), device=dev) - (send_rows.cumsum(0) -
                                                                                     send_rows)[row_rank]
        # pairs: one per (token, expert), sorted by rank (stable: then token, then k), naming their row in that chunk
        pair_rank = dest.flatten()
        order = pair_rank.argsort(stable=True)
        send_pairs = torch.bincount(pair_rank, minlength=ep)
        meta = torch.stack([(indices.flatten() % lx)[order], row_index[pair_rank[order], order // k]], 1)
        sizes = self.all_to_all(torch.stack([send_rows, send_pairs], 1), [1] * ep, [1] * ep)  # [ep, 2] received
        s_rows, s_pairs = send_rows.tolist(), send_pairs.tolist()
        r_rows, r_pairs = sizes[:, 0].tolist(), sizes[:, 1].tolist()
        meta = self.all_to_all(meta, s_pairs, r_pairs)  # [P_recv, 2] (local expert, row in its source's chunk)
        xs, w = _Dispatch.apply(x.to(dtype or x.dtype).index_select(0, row_token), weights.flatten()[order],
                                self, (s_rows, s_pairs), (r_rows, r_pairs))
        # this rank's experts on the rows it received: a partial output per row (the sum over its experts here)
        ys = x.new_zeros(len(xs), x.shape[1])
        if len(meta):  # a rank that received nothing skips its experts (grouped_mm's backward rejects zero rows)
            src = torch.repeat_interleave(torch.arange(ep, device=dev), sizes[:, 1])
            row = meta[:, 1] + (sizes[:, 0].cumsum(0) - sizes[:, 0])[src]
            by_expert = meta[:, 0].argsort(stable=True)  # same row order as one process: source rank, then token
            rows = row[by_expert]
            out = experts(xs.index_select(0, rows), torch.bincount(meta[:, 0], minlength=lx))
            ys = ys.index_add(0, rows, (out * w[by_expert, None].to(x.dtype)).to(x.dtype))
        # the partial outputs go back in the rows' dtype (bf16 under autocast, as V3's combine); xs and w go in too,
        # so that a rank that received nothing still takes part in the dispatch's backward all-to-all
        back = _Combine.apply(ys.to(dtype or x.dtype), xs, w, self, (r_rows, s_rows))
        return x.new_zeros(x.shape).index_add_(0, row_token, back.to(x.dtype))

    # --- after backward -----------------------------------------------------------------------------------------
    def expert_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for m in model.modules() if isinstance(m, MoE) for p in (m.gate_up_proj, m.down_proj)]

    @torch.no_grad()
    def reduce_gradients(self, model: nn.Module) -> None:
        """The experts' gradient of the global batch: the all-to-all's backward summed every EP peer's tokens into
        their owner; add the dp replicas' sums and divide by the world size (each rank's loss is a mean over its
        shard, and DDP / FSDP average the other gradients the same way). An expert stack that received no token
        gets a zero gradient, as in one process (AdamW still decays it)."""
        for p in self.expert_parameters(model):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local = p.grad.to_local()
            if self.dp > 1:
                dist.all_reduce(local, group=self.dp_group)
            local.div_(self.world)


class _Dispatch(torch.autograd.Function):
    """The token rows [R,D] and the pairs' routing weights [P] to their ranks; backward sends their gradients back
    (both in one node, so every rank runs the two reverse all-to-alls in the same order)."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weights: torch.Tensor, ep: ExpertParallel, send: tuple[list[int], ...],
                recv: tuple[list[int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.ep, ctx.send, ctx.recv = ep, send, recv
        ctx.row_shape, ctx.dtype, ctx.device = rows.shape[1:], rows.dtype, rows.device
        return ep.all_to_all(rows, send[0], recv[0]), ep.all_to_all(weights, send[1], recv[1])

    @staticmethod
    def backward(ctx, grad_rows: torch.Tensor | None, grad_weights: torch.Tensor | None):
        ep, (send_rows, send_pairs), (recv_rows, recv_pairs) = ctx.ep, ctx.send, ctx.recv
        if grad_rows is None:
            grad_rows = torch.zeros((sum(recv_rows), *ctx.row_shape), dtype=ctx.dtype, device=ctx.device)
        if grad_weights is None:
            grad_weights = torch.zeros(sum(recv_pairs), device=ctx.device)
        return (ep.all_to_all(grad_rows, recv_rows, send_rows), ep.all_to_all(grad_weights, recv_pairs, send_pairs),
                None, None, None)


class _Combine(torch.autograd.Function):
    """The partial outputs [R_recv,D] back to the ranks their tokens came from; backward sends the gradient out again.
    `xs` and `w` (the dispatched rows and weights) are inputs only to keep the dispatch in the graph."""

    @staticmethod
    def forward(ctx, ys: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ep: ExpertParallel,
                splits: tuple[list[int], list[int]]) -> torch.Tensor:
        ctx.ep, ctx.splits = ep, splits
        ctx.save_for_backward(xs, w)
        return ep.all_to_all(ys, splits[0], splits[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xs, w = ctx.saved_tensors
        send, recv = ctx.splits
        return (ctx.ep.all_to_all(grad, recv, send), torch.zeros_like(xs) if ctx.needs_input_grad[1] else None,
                torch.zeros_like(w) if ctx.needs_input_grad[2] else None, None, None)


# --- the model ------------------------------------------------------------------------------------------------
def parallelize(model: Transformer, ep: int) -> ExpertParallel | None:
    """Keep this rank's slice of every MoE layer's routed experts (DTensors sharded over the mesh's ep dimension) and
    route the layers' tokens through the all-to-all. Every rank must hold the same whole model (same seed or same
    checkpoint) and call this before distributed.wrap_model. None (and nothing changed) for ep = 1."""
    if ep == 1:
        check(model.config, ep, 1)
        return None
    if not (dist.is_available() and dist.is_initialized()):
        raise NanoseekError(f"--ep {ep} spreads the experts over processes: start with torchrun --nproc_per_node "
                            f"(a multiple of {ep})")
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    par = ExpertParallel(model.config, ep)
    for m in model.modules():
        if isinstance(m, MoE):
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(m, name)
                # src_data_rank=None: every rank already has the whole tensor and keeps its slice, no communication
                local = distribute_tensor(full.detach(), par.mesh, [Replicate(), Shard(0)], src_data_rank=None)
                setattr(m, name, nn.Parameter(local, requires_grad=full.requires_grad))
            m.ep = par
    return par


def of(model: nn.Module) -> ExpertParallel | None:
    """The model's ExpertParallel (set by parallelize), or None."""
    return next((m.ep for m in model.modules() if isinstance(m, MoE) and m.ep is not None), None)


def clip_grad_norm_(parameters: Iterable[nn.Parameter], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for parameters of several kinds at once (plain tensors and DTensors on
    different meshes: DDP's replicas, FSDP's shards, the experts), which torch's foreach kernels refuse to mix.

    Returns the global norm; each group's norm is reduced over its own mesh, so sharded gradients count once."""
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in parameters:
        if p.grad is not None:
            groups.setdefault(getattr(p.grad, "device_mesh", None), []).append(p.grad)
    square = 0.0
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        square += float(norm) ** 2
    total = math.sqrt(square)
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
