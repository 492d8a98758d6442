import json

import pytest
import torch

import nanoseek.train.trainer
from nanoseek.cli import main
from nanoseek.config import get_preset
from nanoseek.train.ablate import (
    PARAM_TOLERANCE,
    AblateConfig,
    GQAttention,
    Variant,
    gqa_attention_params,
    kv_cache_bytes_per_token,
    mla_attention_params,
    mla_variants,
    mtp_variants,
)

STEPS = 4
FAST = ["--preset", "test", "--vocab-size", "300", "--batch-size", "4", "--seq-len", "32", "--threads", "1",
        "--warmup-steps", "1", "--eval-every", "2", "--eval-iters", "2", "--steps", str(STEPS)]
EXPECTED = {"balance": ["aux-free-g0.001", "aux-free-g0.01", "aux-loss-a0.01", "aux-loss-a0.001", "none"],
            "mla": ["mla", "mha", "gqa"], "mtp": ["mtp", "no-mtp", "no-mtp-flops"], "fp8": ["bf16", "fp8", "fp32"]}


def cli(*args) -> int:
    try:
        main(["ablate", *map(str, args)])
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(autouse=True)
def no_peak_measurement(monkeypatch):
    """The Trainer measures the matmul peak (2 s per dtype) only for MFU, which these tests do not check."""
    monkeypatch.setattr(nanoseek.train.trainer, "machine_peak_flops", lambda *a, **k: 1e9)


@pytest.mark.parametrize("ablation", list(EXPECTED))
def test_ablation_end_to_end(ablation, tmp_path, data_file, one_thread):
    out = tmp_path / ablation
    assert cli(ablation, *FAST, "--data", data_file, "--out", out) == 0
    summary = json.loads((out / "ablation.json").read_text())
    rows = {r["variant"]: r for r in summary["rows"]}
    assert list(rows) == EXPECTED[ablation] and list(summary["histories"]) == EXPECTED[ablation]
    table = (out / "ablation.md").read_text()
    assert all(f"| {r['label']} |" in table for r in summary["rows"])
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tokenizer" / "tokenizer.json").is_file() and (out / "data" / "train.bin").is_file()
    for name, row in rows.items():
        rec = json.loads((out / name / "run.json").read_text())
        assert (out / name / "loss.png").is_file()
        assert rec["steps"] == row["steps"] and rec["final_val_loss"] == row["final_val_loss"] > 0
        val_steps = [r["step"] for r in summary["histories"][name]["val"]]
        assert val_steps == sorted({*range(2, row["steps"] + 1, 2), row["steps"]})  # --eval-every 2, and the end
    hist = summary["histories"]

    if ablation == "balance":
        assert rows["aux-free-g0.01"]["settings"] == {"attention": "mla", "fp8": False,
                                                             "bias_update_speed": 0.01, "balance_alpha": 0.0}
        assert all("loss_balance" in r for r in hist["aux-loss-a0.01"]["train"])
        assert not any("loss_balance" in r for r in hist["aux-free-g0.01"]["train"] + hist["none"]["train"])
        assert all(r["maxvio"] >= 0 for r in hist["none"]["train"])
        # step 1: same init and batch everywhere, and alpha / gamma act only through the gradient and the bias
        # update after the step, so the next-token loss is identical
        assert len({h["train"][0]["loss"] for h in hist.values()}) == 1
    if ablation == "mla":
        for name in ("mha", "gqa"):
            assert rows[name]["settings"]["rope"] == "full head"
            rec = json.loads((out / name / "run.json").read_text())
            assert rec["config"]["ablation_variant"]["attention"] == name
        assert rows["mla"]["kv_bytes_per_token"] < rows["gqa"]["kv_bytes_per_token"] < rows["mha"]["kv_bytes_per_token"]
    if ablation == "mtp":
        assert all("loss_mtp" in r for r in hist["mtp"]["train"])
        assert not any("loss_mtp" in r for r in hist["no-mtp"]["train"])
        assert rows["no-mtp"]["steps"] == STEPS < rows["no-mtp-flops"]["steps"]
        per_step = rows["no-mtp"]["flops"] / STEPS
        assert abs(rows["no-mtp-flops"]["flops"] - rows["mtp"]["flops"]) <= per_step / 2  # matched to within a step
        # same init and batch at step 1: the next-token loss is identical, only the objective differs
        assert hist["mtp"]["train"][0]["loss"] == hist["no-mtp"]["train"][0]["loss"]
    if ablation == "fp8":
        assert rows["bf16"]["rel_diff_val_final"] == 0.0
        assert hist["fp8"]["train"][0]["loss"] != hist["bf16"]["train"][0]["loss"]  # FP8 GEMMs were really on
        assert abs(rows["fp8"]["rel_diff_val_final"]) < 0.05
        assert json.loads((out / "fp32" / "run.json").read_text())["dtype"] == "float32"


def test_rerun_skips_finished_variants(tmp_path, data_file, one_thread, capsys):
    out = tmp_path / "balance"
    args = ["balance", *FAST, "--data", data_file, "--out", out, "--gammas", "0.01", "--alphas", "0.01"]
    assert cli(*args) == 0
    names = ["aux-free-g0.01", "aux-loss-a0.01", "none"]
    mtimes = {n: (out / n / "run.json").stat().st_mtime_ns for n in names}
    first = json.loads((out / "ablation.json").read_text())["rows"]
    capsys.readouterr()

    assert cli(*args) == 0
    printed = capsys.readouterr().out
    assert all(f"[balance] {n}: finished earlier, skipped" in printed for n in names)
    assert {n: (out / n / "run.json").stat().st_mtime_ns for n in names} == mtimes
    assert json.loads((out / "ablation.json").read_text())["rows"] == first

    (out / "none" / "run.json").unlink()  # an unfinished variant: retrained from step 0, the others skipped
    assert cli(*args) == 0
    printed = capsys.readouterr().out
    assert "[balance] none: finished earlier" not in printed and "[balance] none: no balancing" in printed
    assert (out / "none" / "run.json").stat().st_mtime_ns != mtimes["none"]
    rows = json.loads((out / "ablation.json").read_text())["rows"]
    assert rows[2]["final_val_loss"] == first[2]["final_val_loss"]  # deterministic: the same run again


def test_ctrl_c_says_what_was_kept(tmp_path, data_file, one_thread, monkeypatch, capsys):
    """Ctrl-C in the second variant: exit 130, no claim of a saved checkpoint or of --resume (variants keep none);
    the rerun skips the finished variant and trains the interrupted one from step 0."""
    import os
    import signal

    from nanoseek.data import TokenDataset

    out = tmp_path / "mtp"
    args = ["mtp", *FAST, "--data", data_file, "--out", out, "--variants", "mtp", "no-mtp"]
    original, calls = TokenDataset.get_batch, []

    def get_batch(self, batch_size, seq_len, step, micro=0, **kw):
        if self.path.name == "train.bin":
            calls.append(step)
            if len(calls) == STEPS + 2:  # the second variant's second step
                os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch_size, seq_len, step, micro=micro, **kw)

    monkeypatch.setattr(TokenDataset, "get_batch", get_batch)
    assert cli(*args) == 130
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "nothing saved for mtp/no-mtp" in text and "--resume" not in text
    assert (out / "mtp" / "run.json").is_file() and not (out / "no-mtp" / "run.json").exists()
    monkeypatch.setattr(TokenDataset, "get_batch", original)
    assert cli(*args) == 0
    printed = capsys.readouterr().out
    assert "[mtp] mtp: finished earlier, skipped" in printed and (out / "no-mtp" / "run.json").is_file()


def test_bad_variant_name_is_one_line_error(tmp_path, data_file, capsys):
    assert cli("mla", *FAST, "--data", data_file, "--out", tmp_path, "--variants", "mqa") == 2
    assert "--variants: mqa is not a variant of mla" in capsys.readouterr().err


@pytest.mark.parametrize("preset", ["test", "cpu"])
def test_mha_gqa_parameters_match_mla(preset):
    cfg = get_preset(preset)
    variants = mla_variants(cfg, AblateConfig(ablation="mla"))
    mla_attn = mla_attention_params(cfg)
    mla_model = variants[0].build(cfg, 0, torch.device("meta"))  # meta: shapes only, nothing allocated
    mla_total = sum(p.numel() for n, p in mla_model.named_parameters() if not n.startswith("mtp."))
    assert mla_total == cfg.num_params()["total"]
    for v in variants[1:]:
        model = v.build(cfg, 0, torch.device("meta"))
        attn = model.layers[0].self_attn
        assert isinstance(attn, GQAttention) and attn.n_kv_heads == v.n_kv_heads and attn.head_dim == v.head_dim
        counted_attn = sum(p.numel() for p in attn.parameters())
        assert counted_attn == gqa_attention_params(cfg.hidden_size, cfg.num_attention_heads, v.n_kv_heads,
                                                    v.head_dim)
        assert abs(counted_attn / mla_attn - 1) <= PARAM_TOLERANCE
        total = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
        mtp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))
        assert total == v.params(cfg)["total"] and mtp == v.params(cfg)["mtp_total"]
        assert abs(total / mla_total - 1) <= 0.01
    # cpu preset: MLA attention 127,168 per layer; MHA 4 heads x 32 = 131,072 (+3.1%); GQA 2 kv heads x 42 = 129,024
    if preset == "cpu":
        assert mla_attn == 127_168
        assert [(v.n_kv_heads, v.head_dim) for v in variants[1:]] == [(4, 32), (2, 42)]


def test_kv_cache_bytes_per_token_formulas():
    cfg = get_preset("test")  # 2 layers, kv_lora_rank 16, qk_rope_head_dim 8
    assert kv_cache_bytes_per_token(cfg) == (16 + 8) * 2 * 2 == 96
    assert kv_cache_bytes_per_token(cfg, "mha", 2, 16) == 2 * 2 * 16 * 2 * 2 == 256
    assert kv_cache_bytes_per_token(cfg, "gqa", 1, 22) == 2 * 1 * 22 * 2 * 2 == 176
    assert kv_cache_bytes_per_token(cfg, "mha", 2, 16, bytes_per_element=4) == 512
    v3 = get_preset("deepseek-v3")  # 61 x 576 x 2 B = 70,272 B (reference notes); MHA 128 heads x 128: 3,997,696 B
    assert kv_cache_bytes_per_token(v3) == 70_272
    assert kv_cache_bytes_per_token(v3, "mha", 128, 128) == 2 * 128 * 128 * 61 * 2
    # the formulas agree with what the modules actually produce per token (the tensors a cache would hold)
    cpu = get_preset("cpu")
    for v in mla_variants(cpu, AblateConfig(ablation="mla")):
        model = v.build(cpu, 0, torch.device("meta"))
        attn = model.layers[0].self_attn
        per_layer = (attn.kv_a_proj_with_mqa.out_features if v.attention == "mla"
                     else attn.k_proj.out_features + attn.v_proj.out_features)
        assert kv_cache_bytes_per_token(cpu, v.attention, v.n_kv_heads, v.head_dim) == per_layer * 6 * 2


def test_gqa_attention_is_causal_and_shares_kv_heads(one_thread):
    cfg = get_preset("test")
    torch.manual_seed(0)
    gqa = GQAttention(cfg, n_heads=4, n_kv_heads=2, head_dim=8)
    mha = GQAttention(cfg, n_heads=4, n_kv_heads=4, head_dim=8)
    with torch.no_grad():  # MHA whose K/V heads repeat GQA's (heads 0,1 share kv 0; heads 2,3 kv 1): same output
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for proj in ("k_proj", "v_proj"):
            w = getattr(gqa, proj).weight.view(2, 8, -1)
            getattr(mha, proj).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, -1))
    x = torch.randn(2, 10, cfg.hidden_size)
    none = torch.empty(0)
    y = gqa(x, none, none)
    torch.testing.assert_close(y, mha(x, none, none))
    x2 = x.clone()
    x2[:, 6:] = torch.randn(2, 4, cfg.hidden_size)  # changing the future leaves the past untouched
    y2 = gqa(x2, none, none)
    torch.testing.assert_close(y2[:, :6], y[:, :6])
    assert not torch.allclose(y2[:, 6:], y[:, 6:])


def test_mtp_flops_matched_steps():
    cfg = get_preset("cpu")
    args = AblateConfig(ablation="mtp", mtp_lambda=0.3, seq_len=128, steps=150)
    mtp, no_mtp, matched = mtp_variants(cfg, args)
    f_mtp, f_no = Variant("x", "").flops_per_token(cfg, 128, True), Variant("x", "").flops_per_token(cfg, 128, False)
    # MTP adds one block and one pass through the shared 4096 x 256 head on top of config.flops_per_token's count
    assert f_mtp == cfg.flops_per_token(128, True) + 6 * 4096 * 256 and f_no == cfg.flops_per_token(128, False)
    assert matched.overrides == {"mtp_lambda": 0.0, "steps": round(150 * f_mtp / f_no)}
    assert 150 < matched.overrides["steps"] < 250 and mtp.overrides == {"mtp_lambda": 0.3}
