"""Two CPU processes (gloo) against one: same global batch, same losses; checkpoints resume across world sizes.

The ranks are forked from this test process (torch and nanoseek already imported: no seconds of start-up per rank)
and run `nanoseek pretrain` with the variables torchrun sets (RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT); the bad-input test goes through the real `torchrun`.

Tolerance: 2 processes do the same arithmetic on the same tokens as 1, except that each matmul sees half the rows
and gradients are summed by gloo's all-reduce (g_rank0 + g_rank1) / 2 instead of inside one matmul: float32
summation in another order. Measured differences are ~3e-7 in the losses after 6 steps; we allow 1e-5 (loss) and
1e-4 (weights), far below the ~0.1 a step moves the loss, so a real bug (wrong shard, unaveraged gradients, rank-local
expert biases) cannot hide in it. Expert loads are integer counts: MaxVio and the routing biases match exactly.
"""

import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.cli import main

ARGS = ["--preset", "test", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--threads", "1",
        "--warmup-steps", "2", "--eval-every", "3", "--eval-iters", "2", "--sample-every", "0", "--steps", "6",
        "--save-every", "3"]
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(env: dict[str, str], argv: list[str], log: str) -> None:
    """One forked rank: torchrun's environment, stdout/stderr to log.{out,err}, then the CLI."""
    os.environ.update(env)
    for fd, suffix in ((1, "out"), (2, "err")):
        f = os.open(f"{log}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
    sys.stdout = open(1, "w", closefd=False)
    sys.stderr = open(2, "w", closefd=False)
    code = 0
    try:
        main(argv)
    except SystemExit as e:
        code = e.code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def launch(world: int, *args, tmp: Path, command: str = "pretrain") -> list[subprocess.CompletedProcess]:
    """Run `nanoseek <command> *args` as `world` gloo ranks; returns each rank's (returncode, stdout, stderr)."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world)}
    argv = [command, *map(str, args)]
    ctx = multiprocessing.get_context("fork")
    logs = [str(tmp / f"{command}-rank{r}") for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(env | {"RANK": str(r), "LOCAL_RANK": str(r)}, argv, logs[r]))
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    read = lambda path: Path(path).read_text()
    return [subprocess.CompletedProcess(argv, p.exitcode, read(log + ".out"), read(log + ".err"))
            for p, log in zip(procs, logs, strict=True)]


def history(run: Path, step: int = 6) -> dict:
    return json.loads((run / "checkpoints" / f"step_{step:06d}" / "trainer_state.json").read_text())["history"]


def assert_same_run(a: Path, b: Path) -> None:
    ha, hb = history(a), history(b)
    assert [r["step"] for r in ha["train"]] == [r["step"] for r in hb["train"]] == list(range(1, 7))
    for ra, rb in zip(ha["train"] + ha["val"], hb["train"] + hb["val"], strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=LOSS_TOL)
        assert ra.get("maxvio") == pytest.approx(rb.get("maxvio"), abs=1e-6)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.endswith("e_score_correction_bias"):
            assert torch.equal(wa[k], wb[k]), k  # bias updates from the global load, the same on every rank
        else:
            assert torch.allclose(wa[k], wb[k], atol=WEIGHT_TOL), k


def rewind(run: Path, copy: Path, step: int = 3) -> Path:
    """A copy of `run` as it was after `step` (as if stopped there): latest -> step_00000N, later files removed."""
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "final")
    shutil.rmtree(copy / "checkpoints" / "step_000006")
    (copy / "checkpoints" / "latest").write_text(f"step_{step:06d}\n")
    return copy


@pytest.fixture(scope="module")
def single(tmp_path_factory, data_file, one_thread) -> Path:
    """The 1-process reference run (in this process)."""
    out = tmp_path_factory.mktemp("single") / "run"
    try:
        main(["pretrain", *ARGS, "--data", str(data_file), "--out", str(out)])
    except SystemExit as e:
        assert e.code == 0
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory, single, data_file) -> dict[str, Path]:
    runs = {}
    for mode in ("ddp", "fsdp"):
        out = tmp_path_factory.mktemp(mode) / "run"
        # FSDP writes its checkpoints from a background thread (--async-save): the resume tests start from them
        extra = ["--async-save"] if mode == "fsdp" else []
        ranks = launch(2, *ARGS, "--data", data_file, "--out", out, "--parallel", mode, *extra, tmp=out.parent)
        assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
        assert "distributed: 2 processes" in ranks[0].stdout and "final val loss" in ranks[0].stdout
        assert ranks[1].stdout == ""  # only rank 0 prints
        # the training state as torch.distributed.checkpoint shards (one file per rank), the final model in HF layout
        ckpt = out / "checkpoints" / "step_000006"
        assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert not (ckpt / "optimizer.pt").exists() and (out / "final" / "model.safetensors").is_file()
        runs[mode] = out
    return runs


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_follow_the_one_process_run(single, two, mode):
    assert_same_run(two[mode], single)
    assert json.loads((two[mode] / "run.json").read_text())["tokens"] == 6 * 4 * 32  # the global batch's tokens
    # an intermediate sharded checkpoint loads as a model like the final HF one (the same weights at step 6)
    from nanoseek.checkpoint import load_model

    a = load_model(two[mode] / "checkpoints" / "step_000006").state_dict()
    b = load_model(two[mode] / "final").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_two_processes_resumes_in_one(tmp_path, single, two, data_file, one_thread, capsys):
    run = rewind(two["fsdp"], tmp_path / "run")  # sharded weights and AdamW moments, saved whole by rank 0
    try:
        main(["pretrain", *ARGS, "--data", str(data_file), "--out", str(run), "--resume"])
    except SystemExit as e:
        assert e.code == 0
    assert f"resumed from {run / 'checkpoints' / 'step_000003'} at step 3" in capsys.readouterr().out
    assert_same_run(run, single)


def test_checkpoint_of_one_process_resumes_in_two(tmp_path, single, data_file):
    run = rewind(single, tmp_path / "run")
    ranks = launch(2, *ARGS, "--data", data_file, "--out", run, "--resume", "--parallel", "fsdp", tmp=tmp_path)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:]
    assert "resumed from" in ranks[0].stdout and "at step 3" in ranks[0].stdout
    assert_same_run(run, single)


def test_batch_smaller_than_world_size_is_one_line_on_every_rank(tmp_path, data_file):
    """Through the real torchrun: both ranks print the same one-line error, torchrun exits non-zero. (A batch that
    does not divide by the world size is fine: 3 sequences are 2 + 1 rows, the fine-tuning tests below.)"""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", "-m", "nanoseek", "pretrain", *ARGS, "--data",
                           str(data_file), "--out", str(tmp_path / "run"), "--batch-size", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("nanoseek pretrain: error:")]
    assert errors == ["nanoseek pretrain: error: --batch-size 1 is the global batch and must give each of the 2 "
                      "processes at least one sequence (try 2)"] * 2
    assert not (tmp_path / "run").exists()


# --- fine-tuning: sft and distill ------------------------------------------------------------------------------------
TASK = "arithmetic:min_digits=1,max_digits=2,ops=+-"


def run_main(*argv) -> None:
    try:
        main([*map(str, argv)])
    except SystemExit as e:
        assert e.code == 0


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    """A small tokenizer, and a teacher checkpoint with it plus 48 verified traces (distill)."""
    from nanoseek.checkpoint import save_pretrained
    from nanoseek.tasks import format_completion, load_task
    from nanoseek.tokenizer import train_tokenizer
    from nanoseek.train.sft import init_model, task_conversations

    task = load_task(TASK)
    out = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer([p.prompt + "\n" + format_completion(*task.solution_trace(p))
                           for p in task.problems("train", 100)], vocab_size=300, out_dir=out / "tokenizer")
    save_pretrained(init_model("test", None, tok.vocab_size), out / "teacher", tokenizer_dir=out / "tokenizer")
    (out / "traces.jsonl").write_text("".join(json.dumps({"messages": c.messages}) + "\n"
                                              for c in task_conversations(task, 48, seed=1)))
    return out


def finetune_args(command: str, tok: Path) -> list:
    """Micro-batches of 3 sequences (2 + 1 rows on two ranks, with unequal numbers of target tokens), 2 a step (the
    first without a gradient reduction)."""
    common = ["--batch-size", "3", "--grad-accum", "2", "--steps", "4", "--eval-every", "2", "--save-every", "2",
              "--warmup-steps", "1",
              "--threads", "1"]
    if command == "sft":
        return ["--preset", "test", "--tokenizer", tok / "tokenizer", "--task", TASK, "--n", "48", *common]
    return ["--teacher", tok / "teacher", "--teacher-data", tok / "traces.jsonl", "--student-preset", "test", *common]


@pytest.mark.parametrize("command, mode", [("sft", "ddp"), ("distill", "fsdp")])
def test_finetuning_in_two_processes_equals_one(tmp_path, tok_dir, one_thread, command, mode):
    run_main(command, *finetune_args(command, tok_dir), "--out", tmp_path / "one")
    ranks = launch(2, *finetune_args(command, tok_dir), "--out", tmp_path / "two", "--parallel", mode, tmp=tmp_path,
                   command=command)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    ha, hb = history(tmp_path / "one", 4), history(tmp_path / "two", 4)
    assert len(ha["train"]) == 4 and len(ha["val"]) == 2
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(ha["train"] + ha["val"], hb["train"] + hb["val"], strict=True)]
    print(command, mode, "max loss difference", max(diffs))
    assert max(diffs) < 1e-6
    assert (tmp_path / "two" / "checkpoints" / "step_000004" / "dcp" / ".metadata").is_file()
    wa = load_file(tmp_path / "one" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# --- GRPO -----------------------------------------------------------------------------------------------------------
LENGTH_PLUGIN = '''
from nanoseek.tasks import Problem, Reward, Task


class LengthTask(Task):
    """A completion is "correct" iff its length is a multiple of 4: most groups are mixed, some are not."""

    name = "length"

    def problems(self, split, n, seed=0):
        return [Problem(f"Say something {i + 7 * seed}.", "", {}) for i in range(n)]

    def score(self, problem, completion):
        text = completion.split("<｜end▁of▁sentence｜>", 1)[0]
        return Reward(accuracy=float(len(text) % 4 == 0), format=0.0, parsed=text)
'''


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory, tok_dir):
    """The `nanoseek rl` flags of a small run, and its one-process run directory."""
    tmp = tmp_path_factory.mktemp("rl")
    plugin = tmp / "length.py"
    plugin.write_text(LENGTH_PLUGIN)
    args = ["--model", tok_dir / "teacher", "--task", f"{plugin}:LengthTask", "-G", "4", "-B", "3", "--steps", "2",
            "--max-new-tokens", "12", "--mu", "2", "--micro-batch", "3", "--dynamic-sampling", "--lr", "1e-3",
            "--eval-every", "2", "--eval-n", "3", "--save-every", "1", "--threads", "1",
            "--seed", "3"]  # (a seed whose steps both take 2 sampling rounds)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_main("rl", *args, "--out", tmp / "one")
    finally:
        torch.set_num_threads(n)
    return args, tmp / "one"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_rl_in_two_processes_equals_one(tmp_path, rl_run, mode):
    """3 prompts x 4 samples a step (2 + 1 groups on two ranks), dynamic sampling (2 rounds here: the first 3 mixed
    groups of the whole job are trained), mu 2 and micro-batches of 3 rows (the rank with one group runs zero-weight
    passes to match the other's number of backwards): the same rollouts and rewards, the same update (losses to
    1e-6, weights to 1e-6) as one process. Under FSDP the ranks' engines sample from the gathered weights."""
    args, one = rl_run
    ranks = launch(2, *args, "--out", tmp_path / "two", "--parallel", mode, tmp=tmp_path, command="rl")
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    logs = [[json.loads(line) for line in (run / "rl_log.jsonl").read_text().splitlines()]
            for run in (one, tmp_path / "two")]
    assert [r["step"] for r in logs[1]] == [1, 2] and logs[0][0]["sampling_rounds"] == 2
    for a, b in zip(*logs, strict=True):
        for key in ("reward", "reward_std", "frac_zero_std", "rollouts", "sampling_rounds", "trained_groups",
                    "response_len_mean", "response_len_max", "truncated_frac", "trained_seqs"):
            assert a[key] == b[key], key  # the same rollouts
        for key in ("loss", "entropy", "grad_norm", "kl", "ratio"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key  # the same update
    assert history(one, 2)["heldout"] == history(tmp_path / "two", 2)["heldout"]
    wa = load_file(one / "final" / "model.safetensors")
    wb = load_file(tmp_path / "two" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    if mode == "ddp":  # its sharded step-1 checkpoint (no optimizer state for the MTP module) resumes in one process
        shutil.rmtree(tmp_path / "two" / "final")
        (tmp_path / "two" / "checkpoints" / "latest").write_text("step_000001\n")
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            run_main("rl", *args, "--out", tmp_path / "two", "--resume")
        finally:
            torch.set_num_threads(n)
        wc = load_file(tmp_path / "two" / "final" / "model.safetensors")
        assert all(torch.allclose(wa[k], wc[k], atol=1e-6) for k in wa)


# --- eval and sample ------------------------------------------------------------------------------------------------
def test_eval_and_sample_in_two_processes_equal_one(tmp_path, tok_dir, one_thread):
    """5 problems (3 + 2 per rank): the same per-problem greedy and sampled results, metrics and traces."""
    model = ["--model", tok_dir / "teacher", "--task", TASK, "--max-new-tokens", "8", "--threads", "1"]
    evals = [*model, "-n", "5", "--k", "2"]
    samples = [*model, "-n", "5", "-k", "2"]  # every sample written, verified or not
    run_main("eval", *evals, "--json", tmp_path / "one.json")
    run_main("sample", *samples, "--out", tmp_path / "one.jsonl")
    for command, out in (("eval", ["--json", tmp_path / "two.json"]), ("sample", ["--out", tmp_path / "two.jsonl"])):
        ranks = launch(2, *(evals if command == "eval" else samples), *out, tmp=tmp_path, command=command)
        assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert len(one["outcomes"]["greedy"]) == 5 and one["outcomes"] == two["outcomes"]
    assert one["metrics"] == two["metrics"]
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    assert len((tmp_path / "one.jsonl").read_text().splitlines()) > 5  # distinct samples of the 5 problems


def test_commands_that_run_as_one_process_refuse_a_multi_process_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", "m", "--prompt", "hi"])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("nanoseek generate: error: `nanoseek generate` runs as one process, "
                                              "but torchrun started 2")
