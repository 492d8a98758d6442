import json
import math
from pathlib import Path

import pytest

from nanoseek.cli import main
from nanoseek.config import get_preset
from nanoseek.data import corpus_dir
from nanoseek.train.record import RunRecord
from nanoseek.train.report import (
    H800_PEAK_FLOPS,
    V3_GPU_HOURS,
    V3_PRETRAIN_GPU_HOURS,
    fmt_sci,
    fmt_usd,
    load_history,
    write_report_card,
)

CFG = get_preset("test").to_hf_dict()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(stage: str, wall: float, train: float, tokens: int, price: float = 0.1, threads: int = 1,
           device: str = "cpu", fpt: float = 8.0e5, val: float | None = 2.5) -> RunRecord:
    return RunRecord(stage=stage, config=CFG, params_total=162720, params_active=125856, params_mtp=72560, steps=10,
                     tokens=tokens, flops_per_token=fpt, wall_seconds=wall, train_seconds=train, threads=threads,
                     dtype="float32", device=device, peak_flops=5e10, price_per_hour=price, final_train_loss=3.0,
                     final_val_loss=val, machine={"cpu_model": "Test CPU", "cpu_count": 2, "torch": "x"})


def eval_json(model: str, greedy: float, sampled: float, n: int = 50, k: int = 4, seed: int = 0) -> dict:
    """The layout `nanoseek eval --json` writes (nanoseek/evaluate.py run/evaluate/compute_metrics)."""
    def metric(v: float, method: str) -> dict:
        return {"value": v, "ci95": [max(0.0, v - 0.1), min(1.0, v + 0.1)], "ci_method": method}
    return {"task": "arithmetic", "model": model, "split": "test", "n": n, "k": k, "max_new_tokens": 64,
            "sampling": {"temperature": 0.6, "top_p": 0.95, "seed": seed}, "greedy_truncated": 0.0,
            "greedy_mean_tokens": 20.0, "sampled_truncated": 0.0, "sampled_mean_tokens": 21.0,
            "metrics": {"pass@1_greedy": metric(greedy, "wilson"), "format_greedy": 1.0,
                        f"pass@1_sampled_mean@{k}": metric(sampled, "bootstrap"),
                        f"pass@{k}": metric(min(1.0, sampled + 0.2), "bootstrap"),
                        f"maj@{k}": metric(sampled, "wilson"), "format_sampled": 1.0},
            "seconds": 3.0}


# directory names sort differently from the stage order, to check the card orders by the record's stage
RUNS = {"c_pretrain": record("pretrain", wall=7200.0, train=6000.0, tokens=3_000_000),
        "b_sft": record("sft", wall=1800.0, train=1500.0, tokens=500_000, val=None),
        "a_rl": record("rl", wall=900.0, train=300.0, tokens=40_000, price=0.2, threads=2)}


@pytest.fixture
def speedrun(tmp_path) -> Path:
    """A speedrun-like layout: one run.json per stage, evals in eval/ (named by neither key nor stage), junk JSON."""
    for name, rec in RUNS.items():
        (tmp_path / name).mkdir()
        rec.write(tmp_path / name / "run.json")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "first.json").write_text(json.dumps(eval_json(str(tmp_path / "b_sft" / "final"), 0.4, 0.3)))
    (tmp_path / "eval" / "second.json").write_text(json.dumps(eval_json(str(tmp_path / "a_rl" / "final"), 0.5, 0.45)))
    (tmp_path / "eval" / "other_n.json").write_text(json.dumps(eval_json("somewhere/else/final", 0.9, 0.9, n=7)))
    (tmp_path / "c_pretrain" / "meta.json").write_text(json.dumps({"tokens": 5, "metrics": 3}))  # not an eval
    return tmp_path


def report(*args) -> int:
    try:
        main(["report", *map(str, args)])
    except SystemExit as e:
        return e.code
    return 0


def test_card_rows_totals_and_pngs(speedrun, capsys):
    assert report(speedrun) == 0
    assert "report.md" in capsys.readouterr().out
    card = (speedrun / "report.md").read_text()
    data = json.loads((speedrun / "report.json").read_text())
    assert [s["stage"] for s in data["stages"]] == ["pretrain", "sft", "rl"]  # stage order, not directory order
    rows = [line for line in card.splitlines() if line.startswith("| pretrain") or line.startswith("| sft")
            or line.startswith("| rl")]
    assert [r.split(" | ")[0] for r in rows[:3]] == ["| pretrain (c_pretrain)", "| sft (b_sft)", "| rl (a_rl)"]

    # each run at its own recorded price: cost = wall hours x $/h, summed
    costs = [r.wall_seconds / 3600 * r.price_per_hour for r in (RUNS["c_pretrain"], RUNS["b_sft"], RUNS["a_rl"])]
    assert [s["cost_usd"] for s in data["stages"]] == pytest.approx(costs, rel=1e-12)
    assert costs == pytest.approx([0.2, 0.05, 0.05])
    total = data["totals"]
    assert total["cost_usd"] == pytest.approx(0.3, rel=1e-12)
    assert total["tokens"] == 3_540_000
    assert total["flops"] == pytest.approx(3_540_000 * 8.0e5, rel=1e-12)
    assert total["wall_seconds"] == 9900.0
    assert total["device_hours"] == {"CPU-h": pytest.approx(2.0 + 0.5 + 0.25 * 2)}  # rl ran on 2 threads
    assert total["mfu"] == pytest.approx(3_540_000 * 8.0e5 / (7800 * 5e10))
    totals_row = next(line for line in card.splitlines() if line.startswith("| **total**"))
    assert f"**{fmt_usd(0.3)}**" in totals_row and "$0.30" in totals_row
    assert "3.54M" in totals_row and fmt_sci(3_540_000 * 8.0e5) in totals_row and "2.8 h" in totals_row
    assert "3.0000 CPU-h" not in totals_row and "3.00 CPU-h" in totals_row
    assert "| $0.20 | $0.05 |" in rows[2]  # rl: its own $0.20/h

    for png in ("report_cost.png", "report_losses.png"):
        blob = (speedrun / png).read_bytes()
        assert blob.startswith(PNG_MAGIC) and len(blob) > 5000
        assert f"]({png})" in card


def test_price_override_reprices_every_stage(speedrun):
    out = write_report_card([speedrun], speedrun / "card" / "c.md", price_per_hour=2.0, title="T")
    data = json.loads(out.with_suffix(".json").read_text())
    assert [s["cost_usd"] for s in data["stages"]] == pytest.approx([4.0, 1.0, 0.5], rel=1e-12)
    assert data["totals"]["cost_usd"] == pytest.approx(5.5, rel=1e-12)
    text = out.read_text()
    assert text.startswith("# T\n") and "**$5.50**" in text and "$2.00/machine-hour" in text
    assert (out.parent / "c_cost.png").is_file() and (out.parent / "c_losses.png").is_file()


def test_evals_recognised_by_keys_and_gains_between_stages(speedrun):
    write_report_card([speedrun], speedrun / "report.md")
    data = json.loads((speedrun / "report.json").read_text())
    assert [(e["label"], e["n"]) for e in data["evals"]] == [("sft (b_sft)", 50), ("rl (a_rl)", 50),
                                                            ("somewhere/else/final", 7)]
    # only the two evals on the same 50 problems are comparable
    (gain,) = data["gains"]
    assert (gain["from"], gain["to"]) == ("sft (b_sft)", "rl (a_rl)")
    assert gain["greedy"]["delta"] == pytest.approx(0.1) and gain["greedy"]["ci_overlap"]
    assert gain["sampled"]["delta"] == pytest.approx(0.15) and gain["sampled"]["ci_overlap"]
    card = (speedrun / "report.md").read_text()
    assert "| sft (b_sft) → rl (a_rl) | `arithmetic` | 50 | +0.100 (CIs overlap) | +0.150 (CIs overlap) |  |" in card
    assert "| sft (b_sft) | `arithmetic` | 50 | 4 | 0.400 [0.300, 0.500] | 0.300 [0.200, 0.400] |" in card


def test_gains_follow_the_runs_lineage(tmp_path):
    """With started_from / teacher in the run records (the speedrun's layout: a GRPO-alone student between the GRPO
    teacher and the distilled student in stage order), each model is compared with the model its run started from,
    and the distilled student with its teacher: never the student trained by GRPO alone with the distilled one."""
    import dataclasses

    runs = {"sft": record("sft", 60.0, 50.0, 1000), "rl": record("rl", 60.0, 50.0, 1000),
            "rl_student": record("rl", 60.0, 50.0, 1000), "distill": record("distill", 60.0, 50.0, 1000)}
    lineage = {"sft": (None, None), "rl": (str(tmp_path / "sft" / "final"), None),
               "rl_student": (str(tmp_path / "student_base" / "final"), None),
               "distill": ("runs/student_base/final", "elsewhere/rl/final")}  # relative: matched by directory name
    (tmp_path / "eval").mkdir()
    for i, (name, rec) in enumerate(runs.items()):
        (tmp_path / name).mkdir()
        started, teacher = lineage[name]
        dataclasses.replace(rec, started_from=started, teacher=teacher).write(tmp_path / name / "run.json")
        (tmp_path / "eval" / f"{name}.json").write_text(json.dumps(eval_json(str(tmp_path / name / "final"),
                                                                             0.1 * i, 0.1 * i)))
    write_report_card([tmp_path], tmp_path / "report.md")
    gains = json.loads((tmp_path / "report.json").read_text())["gains"]
    assert [(g["from"], g["to"], g["note"]) for g in gains] == [
        ("sft", "rl", ""), ("rl", "distill", "a distilled student vs its teacher")]
    assert RunRecord.from_dict(json.loads((tmp_path / "distill" / "run.json").read_text())).teacher == \
        "elsewhere/rl/final"


def test_eval_matched_by_file_name_when_model_path_is_elsewhere(tmp_path):
    rec = record("sft", wall=60.0, train=50.0, tokens=1000)
    (tmp_path / "sft").mkdir()
    rec.write(tmp_path / "sft" / "run.json")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "sft.json").write_text(json.dumps(eval_json("/elsewhere/runs/x/final", 0.2, 0.1)))
    write_report_card([tmp_path], tmp_path / "report.md")
    assert json.loads((tmp_path / "report.json").read_text())["evals"][0]["label"] == "sft"


def test_v3_table_equals_the_formulas(speedrun):
    write_report_card([speedrun], speedrun / "report.md")
    data = json.loads((speedrun / "report.json").read_text())
    v3 = data["v3"]
    fpt = get_preset("deepseek-v3").flops_per_token(4096)
    assert v3["flops_per_token"] == fpt and 2.4e11 < fpt < 2.7e11  # ~6 x 37B activated, + attention and MTP
    assert v3["flops"] == fpt * 14.8e12
    for p in v3["peaks"]:
        peak = H800_PEAK_FLOPS[p["dtype"]]
        assert p["h800_hours_at_peak"] == pytest.approx(fpt * 14.8e12 / peak / 3600, rel=1e-12)
        assert p["mfu_pretrain_hours"] == pytest.approx(fpt * 14.8e12 / (2.664e6 * 3600) / peak, rel=1e-12)
        assert p["mfu_all_hours"] == pytest.approx(fpt * 14.8e12 / (2.788e6 * 3600) / peak, rel=1e-12)
    bf16 = next(p for p in v3["peaks"] if p["dtype"] == "BF16")
    assert 0.35 < bf16["mfu_pretrain_hours"] < 0.45  # what V3's hours imply at 989.5 TFLOP/s dense BF16
    assert (V3_PRETRAIN_GPU_HOURS, V3_GPU_HOURS, v3["cost_usd"]) == (2.664e6, 2.788e6, 5.576e6)

    pre = data["stages"][0]
    achieved = 3_000_000 * 8.0e5 / 6000.0
    assert pre["achieved_flops"] == pytest.approx(achieved, rel=1e-12)
    hours = fpt * 14.8e12 / achieved / 3600
    assert pre["v3"]["hours"] == pytest.approx(hours, rel=1e-12)
    assert pre["v3"]["x_paper_gpu_hours"] == pytest.approx(hours / 2.788e6, rel=1e-12)
    assert pre["v3"]["cost_usd"] == pytest.approx(hours * 0.1, rel=1e-12)
    assert pre["v3"]["x_paper_cost"] == pytest.approx(hours * 0.1 / 5.576e6, rel=1e-12)
    card = (speedrun / "report.md").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| pretrain (c_pretrain) | 8.00e5 |"))
    assert f"| {fmt_sci(achieved)} |" in row and f"| {fmt_sci(hours)} |" in row and f"{fmt_usd(hours * 0.1)}" in row
    assert "2.664M GPU-hours" in card and "2.788M GPU-hours = $5.576M" in card
    assert f"{fmt_sci(fpt)} FLOPs per token" in card and "BF16 989.5 TFLOP/s" in card


def test_serving_cost_per_million_tokens(speedrun, tmp_path_factory):
    serve = tmp_path_factory.mktemp("bench") / "bench_serve.json"
    serve.write_text(json.dumps({"date": "2026-11-22T10:00:00", "machine": "x86_64", "cpus": 2, "torch_threads": 1,
                                 "model": "random `cpu` preset", "params_m": 11.8, "max_batch_size": 32,
                                 "load_average": 0.5, "price_per_hour_usd": 0.1,
                                 "levels": [{"clients": 1, "tokens_per_s": 200.0},
                                            {"clients": 32, "tokens_per_s": 2000.0}]}))
    write_report_card([speedrun], speedrun / "report.md", serve_json=serve)
    sv = json.loads((speedrun / "report.json").read_text())["serving"][0]
    per_m = [0.1 / (200.0 * 3600) * 1e6, 0.1 / (2000.0 * 3600) * 1e6]
    assert [lv["usd_per_million"] for lv in sv["levels"]] == pytest.approx(per_m, rel=1e-12)
    card = (speedrun / "report.md").read_text()
    assert f"**{fmt_usd(per_m[1])} per million output tokens** at 32 clients" in card
    assert "**$0.10/hour** (the benchmark's own price)" in card and "x86_64 with 2 CPUs" in card
    # repriced with --price-per-hour, like the training stages
    write_report_card([speedrun], speedrun / "report.md", price_per_hour=1.0, serve_json=serve)
    sv = json.loads((speedrun / "report.json").read_text())["serving"][0]
    assert sv["best"]["usd_per_million"] == pytest.approx(1.0 / (2000.0 * 3600) * 1e6, rel=1e-12)


def test_errors_are_one_line_exit_2(tmp_path, speedrun, capsys):
    assert report(tmp_path / "missing") == 2
    assert "nanoseek report: error: directory not found:" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert report(tmp_path / "empty") == 2
    assert "no run records (run.json) or eval results under" in capsys.readouterr().err
    assert report(speedrun / "eval") == 2  # evals but nothing to cost
    assert "no run records (run.json) under" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    d = RUNS["b_sft"].to_dict()
    del d["wall_seconds"]
    (bad / "run.json").write_text(json.dumps(d))
    assert report(bad) == 2
    err = capsys.readouterr().err
    assert "run.json: missing field 'wall_seconds'" in err and len(err.strip().splitlines()) == 1
    assert report(speedrun / "a_rl", speedrun / "b_sft") == 2
    assert "--out FILE.md" in capsys.readouterr().err
    assert report(speedrun, "--serve-json", tmp_path / "nope.json") == 2
    assert "--serve-json: file not found" in capsys.readouterr().err


def test_real_tiny_pretrain_run(tmp_path, one_thread):
    """The card from a real `nanoseek pretrain` run: its run.json parses back and its loss history is found."""
    data = tmp_path / "tiny.txt"
    data.write_text((corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:14000])
    out = tmp_path / "pretrain"
    main(["pretrain", "--preset", "test", "--data", str(data), "--vocab-size", "300", "--batch-size", "2",
          "--seq-len", "32", "--steps", "3", "--eval-every", "3", "--eval-iters", "1", "--sample-every", "0",
          "--save-every", "0", "--threads", "1", "--out", str(out)])
    rec = RunRecord.from_dict(json.loads((out / "run.json").read_text()))
    assert rec.to_dict() == json.loads((out / "run.json").read_text())
    history = load_history(out)
    assert [r["step"] for r in history["train"]] == [1, 2, 3] and history["val"][0]["step"] == 3
    assert report(out) == 0
    card = (out / "report.md").read_text()
    assert "| pretrain | [`.`](loss.png) |" in card and "No loss history" not in card
    stage = json.loads((out / "report.json").read_text())["stages"][0]
    assert stage["cost_usd"] == pytest.approx(rec.wall_seconds / 3600 * rec.price_per_hour, rel=1e-12)
    assert math.isclose(stage["flops"], rec.flops_per_token * rec.tokens)


def test_overlapping_dirs_count_each_file_once(speedrun):
    assert report(speedrun, speedrun / "b_sft", speedrun / "eval", "--out", speedrun / "all.md") == 0
    data = json.loads((speedrun / "all.json").read_text())
    assert [s["stage"] for s in data["stages"]] == ["pretrain", "sft", "rl"] and len(data["evals"]) == 3


def test_gpu_runs_count_gpu_hours_by_world_size(tmp_path):
    gpu = record("pretrain", wall=3600.0, train=3000.0, tokens=10**9, price=20.0, device="cuda:0")
    gpu.machine = {"cuda": "Test GPU", "torch": "x", "world_size": 4}
    (tmp_path / "pretrain").mkdir()
    gpu.write(tmp_path / "pretrain" / "run.json")
    (tmp_path / "sft").mkdir()
    record("sft", wall=1800.0, train=1500.0, tokens=1000, threads=2).write(tmp_path / "sft" / "run.json")
    write_report_card([tmp_path], tmp_path / "report.md")
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["totals"]["device_hours"] == {"GPU-h": 4.0, "CPU-h": 1.0}
    assert data["totals"]["cost_usd"] == pytest.approx(20.0 + 0.05, rel=1e-12)  # $/machine-hour x wall hours
    card = (tmp_path / "report.md").read_text()
    assert "4.00 GPU-h (4 GPU)" in card and "1.00 CPU-h + 4.00 GPU-h" in card and "Test GPU" in card


def test_paired_p_values_when_evals_store_outcomes(speedrun):
    # 50 problems: sft right on the first 20, rl right on the first 20 plus 10 more and wrong on none sft got right
    for name, right, frac in (("first", 20, 0.25), ("second", 30, 0.5)):
        path = speedrun / "eval" / f"{name}.json"
        d = json.loads(path.read_text())
        d["outcomes"] = {"problem": [f"q{i}" for i in range(50)], "greedy": [float(i < right) for i in range(50)],
                         "sampled": [frac if i < right else 0.0 for i in range(50)]}
        path.write_text(json.dumps(d))
    write_report_card([speedrun], speedrun / "report.md")
    (gain,) = json.loads((speedrun / "report.json").read_text())["gains"]
    assert gain["greedy"]["p"] == pytest.approx(2 / 2**10) and gain["greedy"]["test"] == "McNemar exact"
    assert gain["sampled"]["test"] == "paired bootstrap" and gain["sampled"]["p"] < 0.01
    assert "+0.100 (CIs overlap; p = 0.002, McNemar exact)" in (speedrun / "report.md").read_text()
