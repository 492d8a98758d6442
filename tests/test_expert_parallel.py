"""Expert parallelism on gloo: a MoE layer spread over 2 and 4 processes equals the one-process layer.

Each scenario runs once per world size in forked ranks (torch already imported: no start-up cost). Every rank builds
the same MoE layer (test preset, fp32) and the same global batch of 64 tokens, computes the one-process reference on
all of them, then the EP layer on its own 64 / world tokens, and saves both; the tests compare:
  outputs and input gradients (this rank's rows), the gate's and shared experts' gradients (summed over ranks, as
  DDP would), the routed experts' gradients (this rank's slice of the stacks), and the all-to-all bytes counted
  against expert_parallel.layer_bytes of the routing.
Tolerance 1e-5 (relative to the largest value): each expert sees the same rows in the same order as in one process,
so the outputs, input gradients and expert gradients came out bitwise equal; the dense gradients are sums of two
half-batch matmuls (as under DDP), measured within 4e-7 of their size.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_distributed import ARGS, assert_same_run, free_port, history, rewind
from test_distributed import launch as launch_pretrain
from torch import nn

from nanoseek import expert_parallel
from nanoseek.cli import main
from nanoseek.config import get_preset
from nanoseek.errors import NanoseekError
from nanoseek.model import MoE

TOL = 1e-5
TOKENS = 64
# scenario -> (config overrides, routing bias recipe)
SCENARIOS = {
    "node_limited": ({}, None),  # test preset: 8 experts in 4 groups, topk_group 2
    "unlimited": ({"n_group": 1, "topk_group": 1}, None),
    "skewed": ({}, "skewed"),  # every token picks experts 0 and 1: expert 0 gets everything, most get nothing
    "remote": ({}, "remote"),  # every token picks experts of the last EP rank: rank 0's tokens are all remote
}


def build(overrides: dict, recipe: str | None, world: int) -> MoE:
    torch.manual_seed(0)
    cfg = get_preset("test", **overrides)
    moe = MoE(cfg)
    for p in moe.parameters():
        nn.init.normal_(p, std=0.1)
    bias = moe.gate.e_score_correction_bias
    if recipe == "skewed":
        bias[:2] = 10.0
    elif recipe == "remote":
        lx = cfg.n_routed_experts // world
        bias[-lx:] = 10.0
    return moe


def run_scenario(name: str, world: int, rank: int) -> dict:
    overrides, recipe = SCENARIOS[name]
    moe = build(overrides, recipe, world)
    torch.manual_seed(1)
    x_all = torch.randn(TOKENS, moe.config.hidden_size)
    probe = torch.randn(TOKENS, moe.config.hidden_size)  # loss = sum(y * probe): a gradient for every output
    rows = slice(rank * TOKENS // world, (rank + 1) * TOKENS // world)

    ref = build(overrides, recipe, world)
    x_ref = x_all.clone().requires_grad_()
    y_ref = ref(x_ref[None])[0]
    (y_ref * probe).sum().backward()

    par = expert_parallel.parallelize(moe, world)
    x = x_all[rows].clone().requires_grad_()
    par.bytes_sent = 0
    y = moe(x[None])[0]
    (y * probe[rows]).sum().backward()
    sent = torch.tensor([par.bytes_sent])
    dist.all_reduce(sent)

    # the formula, from this rank's routing (the gate is replicated: route the own tokens again)
    _, indices, _ = moe.gate(x.detach())
    dest = indices // par.local_experts
    remote = dest != par.ep_rank
    pairs = int(remote.sum())
    rows_remote = sum(len(set(d) - {par.ep_rank}) for d in dest.tolist())
    counts = torch.tensor([rows_remote, pairs])
    dist.all_reduce(counts)

    dense = {n: p.grad for n, p in moe.named_parameters() if not n.endswith(("gate_up_proj", "down_proj"))}
    for g in dense.values():
        dist.all_reduce(g)  # DDP would average; the loss here is a sum, so the sum is the one-process gradient
    lx, j = par.local_experts, par.ep_rank
    return {
        "y": (y.detach(), y_ref[rows].detach()), "x_grad": (x.grad, x_ref.grad[rows]),
        **{n: (g, dict(ref.named_parameters())[n].grad) for n, g in dense.items()},
        **{n: (_local_grad(getattr(moe, n)), getattr(ref, n).grad[j * lx:(j + 1) * lx])
           for n in ("gate_up_proj", "down_proj")},
        "bytes": (int(sent), expert_parallel.layer_bytes(int(counts[0]), int(counts[1]), moe.config.hidden_size, 4,
                                                         world, ranks=world)),
        "own_pairs": int((~remote).sum()), "remote_rows": int(counts[0]), "received": int(par.bytes_sent > 0),
    }


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """This rank's experts' gradient (None when they received no token: zeros, as expert_parallel.reduce_gradients
    makes it)."""
    return p.grad.to_local() if p.grad is not None else torch.zeros_like(p.to_local())


def _rank_main(world: int, rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        torch.save({name: run_scenario(name, world, rank) for name in SCENARIOS}, f"{out}.{rank}.pt")
    except BaseException:
        Path(f"{out}.{rank}.err").write_text(traceback.format_exc())
        code = 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    os._exit(code)


def launch(world: int, tmp: Path) -> list[dict]:
    ctx = multiprocessing.get_context("fork")
    port, out = free_port(), str(tmp / f"ep{world}")
    procs = [ctx.Process(target=_rank_main, args=(world, r, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120
    try:  # a rank that fails leaves the others waiting in a collective: stop them all at the first failure
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    errors = [Path(f"{out}.{r}.err").read_text() for r in range(world) if Path(f"{out}.{r}.err").exists()]
    assert [p.exitcode for p in procs] == [0] * world, "\n".join(errors)
    return [torch.load(f"{out}.{r}.pt") for r in range(world)]


@pytest.fixture(scope="module", params=[2, 4], ids=["ep2", "ep4"])
def ranks(request, tmp_path_factory) -> list[dict]:
    return launch(request.param, tmp_path_factory.mktemp(f"ep{request.param}"))


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_layer_equals_one_process(ranks, scenario):
    for r, results in enumerate(ranks):
        res = results[scenario]
        for key, value in res.items():
            if isinstance(value, tuple) and torch.is_tensor(value[0]):
                got, want = value
                assert got.shape == want.shape, (r, key)
                err = (got - want).abs().max()
                assert err <= TOL * max(1.0, want.abs().max()), (r, key, err)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bytes_sent_equal_the_formula(ranks, scenario):
    sent, formula = ranks[0][scenario]["bytes"]
    assert sent == formula > 0


def test_remote_tokens_and_uneven_loads(ranks):
    world = len(ranks)
    # "remote": rank 0's tokens chose only experts of the last rank (none of its own)...
    assert ranks[0]["remote"]["own_pairs"] == 0
    # ... and "skewed": experts 0 and 1 (rank 0) got every token, so the other ranks computed nothing themselves
    # and rank 0's tokens never left it: all remote rows are the other ranks' tokens coming to rank 0
    assert ranks[0]["skewed"]["remote_rows"] == TOKENS - TOKENS // world


def test_node_limited_routing_bounds_the_ranks():
    cfg = get_preset("test")  # 8 experts, 4 groups, topk_group 2, K 2
    assert expert_parallel.rank_of_expert(cfg, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert expert_parallel.max_ranks_per_token(cfg, 4) == 2  # one group per rank, 2 groups a token
    v3 = get_preset("deepseek-v3")  # 256 experts, 8 groups, topk_group 4, K 8
    assert expert_parallel.max_ranks_per_token(v3, 8) == 4  # one group per rank (node)
    assert expert_parallel.max_ranks_per_token(v3, 64) == 8  # 8 ranks per group: K bounds it
    unlimited = get_preset("deepseek-v3", n_group=1, topk_group=1)
    assert expert_parallel.expected_ranks_per_token(unlimited, 8) == pytest.approx(_distinct(256, 32, 8, 8))
    assert expert_parallel.expected_ranks_per_token(v3, 8) == pytest.approx(_distinct(128, 32, 8, 4))
    assert expert_parallel.expected_ranks_per_token(v3, 8) < expert_parallel.expected_ranks_per_token(unlimited, 8)


def _distinct(m: int, per_rank: int, k: int, ranks: int) -> float:
    """Expected distinct ranks of k experts drawn without replacement from m experts, per_rank on each of `ranks`."""
    from math import comb
    return ranks * (1 - comb(m - per_rank, k) / comb(m, k))


def test_bad_ep_sizes_are_one_line_errors():
    cfg = get_preset("test")
    with pytest.raises(NanoseekError, match="must divide the number of processes"):
        expert_parallel.check(cfg, 4, 6)
    with pytest.raises(NanoseekError, match="must divide n_routed_experts"):
        expert_parallel.check(get_preset("test", n_routed_experts=6, n_group=1, topk_group=1), 4, 4)
    with pytest.raises(NanoseekError, match="map onto whole ranks"):
        expert_parallel.check(get_preset("test", n_routed_experts=12, n_group=4), 3, 3)
    with pytest.raises(NanoseekError, match="needs|torchrun"):
        expert_parallel.parallelize(MoE(cfg), 2)


# --- pre-training end to end: `nanoseek pretrain --ep N` in forked ranks against one process ----------------------
# (the launcher, the run arguments and the comparison are test_distributed's: losses 1e-5, weights 1e-4, expert
# biases and MaxVio exactly)
assert ARGS[:2] == ["--preset", "test"]
MODEL_FREE_ARGS = ARGS[2:]  # with --config instead of the preset


def pretrain_here(*args) -> None:
    try:
        main(["pretrain", *map(str, args)])
    except SystemExit as e:
        assert e.code == 0


@pytest.fixture(scope="module")
def unlimited_config(tmp_path_factory) -> Path:
    """The test preset without node-limited routing: one group, every expert allowed."""
    path = tmp_path_factory.mktemp("unlimited") / "config.json"
    get_preset("test", n_group=1, topk_group=1).save(path)
    return path


@pytest.fixture(scope="module")
def references(tmp_path_factory, data_file, unlimited_config, one_thread) -> dict[str, Path]:
    """One-process runs: the test preset (node-limited routing) and the unlimited config."""
    runs = {}
    for name, args in (("limited", ARGS), ("unlimited", [*MODEL_FREE_ARGS, "--config", unlimited_config])):
        runs[name] = tmp_path_factory.mktemp(name) / "run"
        pretrain_here(*args, "--data", data_file, "--out", runs[name])
    return runs


@pytest.fixture(scope="module")
def ep_runs(tmp_path_factory, data_file, unlimited_config) -> dict[str, Path]:
    """ep2: 2 ranks x 2 experts' slices, DDP for the rest, node-limited routing. dp2xep2: 4 ranks as 2 data-parallel
    replicas of 2 EP ranks (expert gradients reduced over the replicas), FSDP for the rest, unlimited routing."""
    runs = {}
    for name, world, args in (("ep2", 2, [*ARGS, "--ep", 2]),
                              ("dp2xep2", 4, [*MODEL_FREE_ARGS, "--config", unlimited_config, "--ep", 2,
                                              "--parallel", "fsdp"])):
        out = tmp_path_factory.mktemp(name) / "run"
        ranks = launch_pretrain(world, *args, "--data", data_file, "--out", out, tmp=out.parent)
        assert [r.returncode for r in ranks] == [0] * world, "".join(r.stderr[-2000:] for r in ranks)
        assert "expert parallel: 2 ranks x 4 routed experts" in ranks[0].stdout
        runs[name] = out
    return runs


@pytest.mark.parametrize("run, reference", [("ep2", "limited"), ("dp2xep2", "unlimited")])
def test_pretrain_with_ep_follows_the_one_process_run(ep_runs, references, run, reference):
    assert_same_run(ep_runs[run], references[reference])
    steps = history(ep_runs[run])["train"]
    assert all(r["a2a_bytes"] > 0 for r in steps)  # counted in every step (forward and backward)


def test_ep_checkpoints_resume_at_another_ep_size(tmp_path, ep_runs, references, data_file, one_thread):
    """The checkpoint holds whole expert stacks: ep 2 -> one process, and one process -> ep 2."""
    run = rewind(ep_runs["ep2"], tmp_path / "from_ep2")
    pretrain_here(*ARGS, "--data", data_file, "--out", run, "--resume")
    assert_same_run(run, references["limited"])
    run = rewind(references["limited"], tmp_path / "to_ep2")
    ranks = launch_pretrain(2, *ARGS, "--data", data_file, "--out", run, "--resume", "--ep", 2, tmp=tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:]
    assert "resumed from" in ranks[0].stdout
    assert_same_run(run, references["limited"])


def test_ep_without_torchrun_is_a_one_line_error(tmp_path, data_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pretrain", *ARGS, "--data", str(data_file), "--out", str(tmp_path / "run"), "--ep", "2"])
    assert e.value.code == 2
    assert "--ep 2 spreads the experts over processes" in capsys.readouterr().err


def test_ep_with_uneven_shards_grad_accum_and_async_sharded_checkpoints(tmp_path, data_file, one_thread):
    """EP with the rest of torchrun's training: 3 sequences per micro-batch (2 + 1 rows, so the ranks send each other
    unequal numbers of tokens), 2 micro-batches a step (the first without a gradient reduction, the experts' own
    reduction once after both), FSDP2 for the rest and DCP checkpoints written by a background thread: the same run
    as one process, and its step-3 checkpoint resumes in one process."""
    args = [*ARGS, "--batch-size", 3, "--grad-accum", 2, "--data", data_file]
    pretrain_here(*args, "--out", tmp_path / "one")
    ranks = launch_pretrain(2, *args, "--out", tmp_path / "ep", "--ep", 2, "--parallel", "fsdp", "--async-save",
                            tmp=tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], "".join(r.stderr[-2000:] for r in ranks)
    assert (tmp_path / "ep" / "checkpoints" / "step_000003" / "dcp" / ".metadata").is_file()
    assert_same_run(tmp_path / "ep", tmp_path / "one")
    run = rewind(tmp_path / "ep", tmp_path / "resumed")
    pretrain_here(*args, "--out", run, "--resume")
    assert_same_run(run, tmp_path / "one")
