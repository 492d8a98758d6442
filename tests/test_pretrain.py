import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nanoseek
import nanoseek.checkpoint
import nanoseek.train.pretrain
from nanoseek.cli import main
from nanoseek.config import get_preset
from nanoseek.data import TokenDataset
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.pretrain import sample
from nanoseek.train.trainer import lr_at, make_optimizer, read_optimizer_state, read_trainer_state, resolve_dtype

# 4 documents of ~4 KB (data.py cuts .txt files at blank lines into ~4096-character documents): 3 train, 1 val
SMALL = ["--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--threads", "1", "--warmup-steps", "2",
         "--eval-every", "4", "--eval-iters", "2", "--sample-every", "0"]
FAST = ["--preset", "test", *SMALL]


def cli(*args) -> int:
    """nanoseek.cli.main in-process; returns the exit code."""
    try:
        main(["pretrain", *map(str, args)])
    except SystemExit as e:
        return e.code
    return 0


def state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file) -> Path:
    """An uninterrupted 8-step run (V3 defaults for gamma, alpha, lambda)."""
    out = tmp_path_factory.mktemp("reference")
    assert cli(*FAST, "--data", data_file, "--steps", 8, "--out", out) == 0
    return out


def test_short_run_writes_final_checkpoint_run_record_and_plot(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    assert cli(*FAST, "--data", data_file, "--steps", 6, "--save-every", 2, "--out", out) == 0
    printed = capsys.readouterr().out
    assert f"final checkpoint (HF DeepseekV3 layout + tokenizer): {out / 'final'}" in printed
    assert "next: nanoseek info --config" in printed

    model = nanoseek.load_model(out / "final")
    assert model.config == get_preset("test")
    assert Tokenizer.from_dir(out / "final").vocab_size == 300

    rec = json.loads((out / "run.json").read_text())
    assert rec["stage"] == "pretrain" and rec["steps"] == 6 and rec["tokens"] == 6 * 4 * 32
    assert rec["params_total"] == get_preset("test").num_params()["total"]
    assert rec["params_active"] == get_preset("test").num_params()["active"]
    assert rec["flops_per_token"] == get_preset("test").flops_per_token(32)
    assert rec["flops"] == rec["flops_per_token"] * rec["tokens"]
    assert rec["threads"] == 1 and rec["machine"]["threads"] == 1
    assert rec["machine"]["torch"] == torch.__version__ and rec["machine"]["cpu_model"]
    assert 0 < rec["train_seconds"] < rec["wall_seconds"]
    assert rec["cpu_hours"] == pytest.approx(rec["wall_seconds"] / 3600)
    assert rec["cost_usd"] == pytest.approx(rec["wall_seconds"] / 3600 * 0.10)
    assert rec["tokens_per_second"] == pytest.approx(rec["tokens"] / rec["train_seconds"])
    assert rec["mfu"] == pytest.approx(rec["flops"] / rec["train_seconds"] / rec["peak_flops"])
    assert 0 < rec["mfu"] < 1 and rec["dtype"] == "float32"
    assert math.isfinite(rec["final_train_loss"]) and math.isfinite(rec["final_val_loss"])
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # keep-last 2 of the checkpoints at steps 2, 4, 6; latest names the newest
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert ckpts == ["step_000004", "step_000006"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000006"
    st = state(out / "checkpoints" / "step_000006")
    assert st["step"] == 6 and [r["step"] for r in st["history"]["train"]] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in st["history"]["val"]] == [4, 6]
    assert all(r["maxvio"] >= 0 and r["lr"] > 0 for r in st["history"]["train"])


def test_ctrl_c_then_resume_equals_uninterrupted_run(tmp_path, data_file, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    original = TokenDataset.get_batch

    def get_batch(self, batch_size, seq_len, step, micro=0, **kw):
        if self.path.name == "train.bin" and step == 3:  # Ctrl-C during the 4th optimizer step
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size, seq_len, step, micro=micro, **kw)

    monkeypatch.setattr(TokenDataset, "get_batch", get_batch)
    assert cli(*FAST, "--data", data_file, "--steps", 8, "--out", out) == 130
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert not (out / "final").exists()
    monkeypatch.setattr(TokenDataset, "get_batch", original)

    assert cli(*FAST, "--data", data_file, "--steps", 8, "--out", out, "--resume") == 0
    resumed = state(out / "checkpoints" / "step_000008")
    uninterrupted = state(reference / "checkpoints" / "step_000008")
    assert [r["step"] for r in resumed["history"]["train"]] == list(range(1, 9))
    assert resumed["history"] == uninterrupted["history"]  # every train/val loss, lr and MaxVio, exactly
    a, b = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optim_a = torch.load(out / "checkpoints" / "step_000008" / "optimizer.pt", weights_only=True)
    optim_b = torch.load(reference / "checkpoints" / "step_000008" / "optimizer.pt", weights_only=True)
    assert all(torch.equal(optim_a["state"][i]["exp_avg_sq"], optim_b["state"][i]["exp_avg_sq"])
               for i in optim_b["state"])

    # resuming with a different model config is refused
    cfg = get_preset("test").to_hf_dict() | {"rope_theta": 5000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli(*SMALL, "--config", tmp_path / "config.json", "--data", data_file, "--out", out, "--resume") == 2
    assert "config differs from the checkpoint" in capsys.readouterr().err


class Killed(BaseException):
    """Stands in for the process dying (not an Exception, so nothing may catch and handle it)."""


def test_checkpoint_killed_mid_write_keeps_previous_and_resume_works(tmp_path, data_file, reference, monkeypatch):
    out = tmp_path / "run"
    real_save_file = nanoseek.checkpoint.save_file

    def dying_save_file(tensors, filename, metadata=None):
        if "step_000008" in str(filename):
            Path(filename).write_bytes(b"half a safetensors file")
            raise Killed
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(nanoseek.checkpoint, "save_file", dying_save_file)
    with pytest.raises(Killed):
        cli(*FAST, "--data", data_file, "--steps", 8, "--save-every", 4, "--out", out)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004"
    assert not (ckpts / "step_000008").exists()
    assert state(ckpts / "step_000004")["step"] == 4
    nanoseek.load_model(ckpts / "step_000004")  # intact and loadable
    monkeypatch.setattr(nanoseek.checkpoint, "save_file", real_save_file)

    assert cli(*FAST, "--data", data_file, "--steps", 8, "--out", out, "--resume") == 0
    assert state(ckpts / "step_000008")["history"] == state(reference / "checkpoints" / "step_000008")["history"]
    assert not list(ckpts.glob(".step_*"))  # the killed write's temporary directory was cleaned up


def test_expert_bias_moves_with_gamma(reference):
    weights = load_file(reference / "final" / "model.safetensors")
    biases = [t for k, t in weights.items() if k.endswith("e_score_correction_bias")]
    assert len(biases) == 2  # one MoE layer + the MTP layer
    for b in biases:
        assert b.abs().max() > 0
        # each of the 8 updates moves a bias by exactly -gamma, 0 or +gamma
        assert b.abs().max() <= 8 * 0.001 + 1e-7
        assert torch.allclose(b / 0.001, (b / 0.001).round(), atol=1e-3)


def test_loss_decreases_and_bias_stays_zero_without_gamma(tmp_path):
    data = tmp_path / "repeated.txt"
    data.write_text("\n\n".join(["The quick brown fox jumps over the lazy dog."] * 400), encoding="utf-8")
    out = tmp_path / "run"
    assert cli(*FAST, "--data", data, "--steps", 30, "--lr", "1e-2", "--bias-update-speed", 0, "--out", out) == 0
    losses = [r["loss"] for r in state(out / "checkpoints" / "step_000030")["history"]["train"]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    weights = load_file(out / "final" / "model.safetensors")
    biases = [t for k, t in weights.items() if k.endswith("e_score_correction_bias")]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_missing_data_file_is_one_line_error(tmp_path):
    missing = tmp_path / "nope.txt"
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "pretrain", "--preset", "test", "--data", str(missing),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and lines[0].startswith("nanoseek pretrain: error:")
    assert not (tmp_path / "run").exists()


def test_invalid_config_and_nothing_to_resume_exit_2(tmp_path, data_file, capsys):
    bad = get_preset("test").to_hf_dict() | {"topk_group": 5}  # n_group is 4
    (tmp_path / "config.json").write_text(json.dumps(bad))
    assert cli("--config", tmp_path / "config.json", "--data", data_file, "--out", tmp_path / "a") == 2
    assert "topk_group" in capsys.readouterr().err

    assert cli(*FAST, "--data", data_file, "--out", tmp_path / "b", "--resume") == 2
    err = capsys.readouterr().err
    assert "no checkpoint to resume" in err and len(err.strip().splitlines()) == 1

    assert cli(*FAST, "--data", data_file, "--out", tmp_path / "c", "--seq-len", 1000) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


def test_existing_run_dir_needs_resume(reference, data_file, capsys):
    assert cli(*FAST, "--data", data_file, "--steps", 8, "--out", reference) == 2
    assert "add --resume" in capsys.readouterr().err
    # resuming a finished run does no steps and leaves its checkpoints as they were
    before = state(reference / "checkpoints" / "step_000008")
    assert cli(*FAST, "--data", data_file, "--steps", 8, "--out", reference, "--resume") == 0
    assert state(reference / "checkpoints" / "step_000008")["history"] == before["history"]


def test_auto_dtype_is_fp32_for_small_widths_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, hidden_size=64) == torch.float32
    assert resolve_dtype("fp32", cpu, hidden_size=4096) == torch.float32
    assert resolve_dtype("bf16", cpu, hidden_size=64) == torch.bfloat16


def test_lr_schedule_warmup_constant_decay():
    lrs = [lr_at(s, 100, 1.0, warmup_steps=10, decay_frac=0.2, min_lr_frac=0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0
    assert all(lr == 1.0 for lr in lrs[10:80])
    assert all(a > b for a, b in zip(lrs[80:], lrs[81:], strict=False))
    assert lrs[-1] == pytest.approx(0.1)
    linear = [lr_at(s, 100, 1.0, 0, 0.5, 0.0, shape="linear") for s in (49, 74, 99)]
    assert linear == pytest.approx([1.0, 0.5, 0.0])


def test_sample_is_deterministic_and_greedy_matches_argmax(reference):
    model = nanoseek.load_model(reference / "final")
    tok = Tokenizer.from_dir(reference / "final")
    a = sample(model, tok, "ROMEO:", max_new_tokens=8, temperature=0.8, seed=1)
    assert a.startswith("ROMEO:") and a == sample(model, tok, "ROMEO:", max_new_tokens=8, temperature=0.8, seed=1)
    ids = tok.encode("ROMEO:")
    with torch.no_grad():
        first = int(model(torch.tensor([ids]))[0, -1, :tok.vocab_size].argmax())
    greedy = sample(model, tok, "ROMEO:", max_new_tokens=1, temperature=0)
    assert greedy == "ROMEO:" + (tok.decode([first]) if first != tok.eos_id else "")


# --- damaged resume files and failed writes: one line naming the file, exit 2, nothing lost ------------------------
def error_line(err: str) -> str:
    """The one error line of a failed command's stderr (the progress bar's lines come before it)."""
    assert "Traceback" not in err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error:" in line]
    assert len(errors) == 1 and err.endswith(errors[0] + "\n"), err
    return errors[0]


@pytest.fixture
def optimizer_file(tmp_path):
    """A tiny model's AdamW (fused, as the Trainer builds it) after one step, and its state saved to optimizer.pt."""
    torch.manual_seed(0)
    model = nanoseek.Transformer(get_preset("test", num_hidden_layers=1, num_nextn_predict_layers=0))
    opt = make_optimizer(model, 1e-3, 0.1)
    model.compute_loss(torch.randint(0, 512, (1, 8)), torch.randint(0, 512, (1, 8)))[0].backward()
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    return tmp_path / "optimizer.pt", opt


def _damage_optimizer(path, how):
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return
    if how == "garbage":
        path.write_bytes(os.urandom(2000))
        return
    if how == "pickled object":
        torch.save({"state": argparse.Namespace(x=1)}, path)  # weights_only refuses arbitrary objects
        return
    sd = torch.load(path, weights_only=True)
    if how == "not a state dict":
        sd = [1, 2]
    elif how == "wrong shape":
        sd["state"][0]["exp_avg"] = torch.zeros(3, 3)
    elif how == "wrong dtype":
        sd["state"][0]["exp_avg_sq"] = sd["state"][0]["exp_avg_sq"].double()
    elif how == "nan":
        sd["state"][1]["exp_avg"][0] = float("nan")
    elif how == "fewer params":
        sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]
    elif how == "extra group":
        sd["param_groups"].append(dict(sd["param_groups"][0]))
    elif how == "bad betas":
        sd["param_groups"][0]["betas"] = "0.9"
    elif how == "unknown parameter":
        sd["state"][10_000] = sd["state"][0]
    torch.save(sd, path)


@pytest.mark.parametrize("how, message", [
    ("truncated", "not a readable optimizer state"),
    ("garbage", "not a readable optimizer state"),
    ("pickled object", "not a readable optimizer state"),
    ("not a state dict", "expected an optimizer state_dict"),
    ("wrong shape", r"exp_avg of parameter 0 is float32 \[3, 3\], the parameter float32 \[512, 64\]"),
    ("wrong dtype", "exp_avg_sq of parameter 0 is float64"),
    ("nan", "exp_avg of parameter 1 holds NaN or inf"),
    ("fewer params", "parameter group 0 holds"),
    ("extra group", "3 parameter groups, this model's optimizer has 2"),
    ("bad betas", "'betas' must be two numbers"),
    ("unknown parameter", "state entry 10000 belongs to no parameter"),
])
def test_damaged_optimizer_state_is_refused_before_loading(optimizer_file, how, message):
    path, opt = optimizer_file
    read_optimizer_state(path, opt, torch.device("cpu"))  # the good file passes
    _damage_optimizer(path, how)
    with pytest.raises(nanoseek.NanoseekError, match=message) as e:
        read_optimizer_state(path, opt, torch.device("cpu"))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON"),
    ("[]", "expected a JSON object"),
    ("{}", "'step' must be a non-negative integer, got None"),
    ('{"step": "4"}', "'step' must be a non-negative integer, got '4'"),
    ('{"step": 4, "tokens": true}', "'tokens' must be a non-negative integer"),
    ('{"step": 4, "tokens": 8, "train_seconds": NaN, "wall_seconds": 1}', "'train_seconds' must be a non-negative"),
    ('{"step": 4, "tokens": 8, "train_seconds": 1, "wall_seconds": 1}', "'history' must be an object"),
    ('{"step": 4, "tokens": 8, "train_seconds": 1, "wall_seconds": 1, "history": {"train": [{"step": 1}], '
     '"val": []}}', "history.train entry of step 1 has no numeric 'loss'"),
    ('{"step": 4, "tokens": 8, "train_seconds": 1, "wall_seconds": 1, "history": {"train": [3], "val": []}}',
     "history.train holds '3'"),
    ('{"stage": "sft", "step": 4, "tokens": 8, "train_seconds": 1, "wall_seconds": 1, '
     '"history": {"train": [], "val": []}}', "written by `nanoseek sft`, not `nanoseek pretrain`"),
])
def test_malformed_trainer_state_is_one_line(tmp_path, content, message):
    path = tmp_path / "trainer_state.json"
    path.write_text(content)
    with pytest.raises(nanoseek.NanoseekError, match=message) as e:
        read_trainer_state(path, "pretrain")
    assert str(path) in str(e.value)


def test_resume_with_a_wrong_shaped_optimizer_state_exits_2(reference, data_file, tmp_path, capsys):
    """Was a segfault (exit 139): the fused AdamW read moments of the wrong shape out of bounds."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpt = out / "checkpoints" / "step_000008"
    sd = torch.load(ckpt / "optimizer.pt", weights_only=True)
    sd["state"][0]["exp_avg"] = torch.zeros(2)
    torch.save(sd, ckpt / "optimizer.pt")
    capsys.readouterr()
    assert cli(*FAST, "--data", data_file, "--steps", 10, "--out", out, "--resume") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"{ckpt / 'optimizer.pt'}: exp_avg of parameter 0" in err
    (out / "checkpoints" / "latest").write_text("../../elsewhere\n")  # never a path out of checkpoints/
    assert cli(*FAST, "--data", data_file, "--steps", 10, "--out", out, "--resume") == 2
    assert "must name a checkpoint step_NNNNNN" in capsys.readouterr().err


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, data_file, monkeypatch, capsys):
    """safetensors reports ENOSPC as a SafetensorError: one line, exit 2, no temporary left, step 4 intact."""
    from safetensors import SafetensorError

    out = tmp_path / "run"
    real_save_file = nanoseek.checkpoint.save_file

    def full_disk(tensors, filename, metadata=None):
        if "step_000008" in str(filename):
            Path(filename).write_bytes(b"partial")
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(nanoseek.checkpoint, "save_file", full_disk)
    assert cli(*FAST, "--data", data_file, "--steps", 8, "--save-every", 4, "--out", out) == 2
    err = error_line(capsys.readouterr().err)
    assert f"could not write {out / 'checkpoints' / 'step_000008'}: No space left on device" in err
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000004" and not (ckpts / "step_000008").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_000004"]  # no temporary directory
    nanoseek.load_model(ckpts / "step_000004")


@pytest.mark.parametrize("target", ["final", "loss.png", "run.json", "tokenizer", "data"])
def test_read_only_or_full_writes_are_one_line_and_leave_no_temporaries(tmp_path, data_file, monkeypatch, capsys,
                                                                       target):
    """EROFS/ENOSPC at each output of a run (simulated: as root, chmod does not stop writes)."""
    import errno

    import nanoseek.checkpoint as ckpt

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC if target in ("data", "loss.png") else errno.EROFS,
                      os.strerror(errno.ENOSPC if target in ("data", "loss.png") else errno.EROFS))

    out = tmp_path / "run"
    if target == "final":
        real = ckpt.save_file
        monkeypatch.setattr(ckpt, "save_file", lambda t, f, metadata=None: fail() if "/.final." in f else
                            real(t, f, metadata=metadata))
    elif target == "loss.png":
        from matplotlib.figure import Figure
        monkeypatch.setattr(Figure, "savefig", fail)
    elif target == "tokenizer":
        monkeypatch.setattr(nanoseek.train.pretrain, "train_tokenizer", fail)
    else:  # the rename that completes run.json / data/val.bin
        real_replace = os.replace
        name = "run.json" if target == "run.json" else "val.bin"
        monkeypatch.setattr(os, "replace", lambda a, b: fail() if Path(b).name == name else real_replace(a, b))
    assert cli(*FAST, "--data", data_file, "--steps", 2, "--out", out) == 2
    assert "could not write" in error_line(capsys.readouterr().err)
    assert not [p for p in out.rglob(".*") if p.name != ".write-test"], "a temporary file was left behind"
    if target in ("final", "loss.png", "run.json"):  # the training itself is kept
        assert (out / "checkpoints" / "latest").read_text().strip() == "step_000002"
        assert not (out / "final").exists() or target != "final"
    if target == "data":
        # no .bin.tmp, and no meta.json: what was written is never taken for a finished token cache
        assert not list((out / "data").glob("*.tmp")) and not (out / "data" / "meta.json").exists()


def test_unwritable_out_fails_before_training(tmp_path, data_file, monkeypatch, capsys):
    import errno

    import nanoseek.osutil as osutil

    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):
        if "w" in mode and ".write-test" in str(file):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(osutil, "open", read_only_open, raising=False)
    trained = []
    monkeypatch.setattr(nanoseek.train.pretrain, "train", lambda *a, **k: trained.append(1))
    assert cli(*FAST, "--data", data_file, "--steps", 2, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'run'} is not writable: Read-only file system" in err and not trained
    assert not (tmp_path / "run" / "data").exists()  # refused before the data work too
