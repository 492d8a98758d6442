"""The V3 model: parity with transformers, routing rules, MTP and balance losses, parameter accounting."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, NanoseekError, Transformer, get_preset, load_model, moe
from nanoseek.checkpoint import save_pretrained
from nanoseek.model import MoE

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}
CONFIGS = {
    "group-routing+q_lora": {},
    "q_proj+yarn+2-dense": dict(q_lora_rank=None, num_hidden_layers=3, first_k_dense_replace=2, rope_scaling=YARN),
    "yarn-v2-mscale+2-shared": dict(rope_scaling={**YARN, "factor": 8.0, "mscale": 0.707, "mscale_all_dim": 0.707},
                                    n_shared_experts=2, routed_scaling_factor=1.0),
    "no-group+tied": dict(n_group=1, topk_group=1, tie_word_embeddings=True, rope_interleave=False),
}


def perturb(model: Transformer, seed: int = 0) -> Transformer:
    """Random norms and a non-zero routing bias, so parity tests exercise every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
        for gate in model.gates():
            gate.e_score_correction_bias.copy_(torch.randn(gate.e_score_correction_bias.shape, generator=g) * 0.5)
    return model.eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_nanoseek_to_transformers(name, tmp_path):
    torch.manual_seed(0)
    cfg = get_preset("test", **CONFIGS[name])
    model = perturb(Transformer(cfg))
    save_pretrained(model, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.shape == (2, 48, cfg.vocab_size)
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_transformers_to_nanoseek(name, tmp_path):
    torch.manual_seed(1)
    cfg = get_preset("test", **CONFIGS[name], num_nextn_predict_layers=0)
    hf_cfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "rope_scaling"},
                                           rope_scaling=cfg.rope_scaling)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.2)
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.5)
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4


def test_routing_bias_selects_but_does_not_weight():
    torch.manual_seed(0)
    cfg = get_preset("test")
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    x = torch.randn(64, cfg.hidden_size)
    w0, idx0, scores = moe.gate(x)
    moe.gate.e_score_correction_bias[5] = 10.0  # expert 5 now always wins selection
    w1, idx1, scores1 = moe.gate(x)
    assert torch.equal(scores, scores1)
    assert (idx1 == 5).any(-1).all()
    assert not torch.equal(idx0, idx1)
    # weights are the *unbiased* sigmoid scores of the chosen experts, normalised, times routed_scaling_factor
    chosen = scores.gather(1, idx1)
    torch.testing.assert_close(w1, chosen / chosen.sum(-1, keepdim=True) * cfg.routed_scaling_factor)
    torch.testing.assert_close(w1.sum(-1), torch.full((64,), cfg.routed_scaling_factor))


def test_group_limit_holds():
    torch.manual_seed(0)
    cfg = get_preset("test", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4)
    moe = MoE(cfg)
    torch.nn.init.normal_(moe.gate.weight, std=1.0)
    moe.gate.e_score_correction_bias.normal_(0, 0.3)
    _, idx, scores = moe.gate(torch.randn(256, cfg.hidden_size))
    groups = idx // (cfg.n_routed_experts // cfg.n_group)
    assert all(len(set(row.tolist())) <= cfg.topk_group for row in groups)
    # the kept groups are those with the largest sum of their top-2 biased scores
    biased = (scores + moe.gate.e_score_correction_bias).view(256, cfg.n_group, -1)
    best = biased.topk(2, -1).values.sum(-1).topk(cfg.topk_group, -1).indices.sort(-1).values
    for row, g in zip(groups, best, strict=True):
        assert set(row.tolist()) <= set(g.tolist())


def test_moe_dispatch_matches_per_token_reference():
    torch.manual_seed(0)
    cfg = get_preset("test")
    model = Transformer(cfg)
    moe = model.layers[1].mlp
    x = torch.randn(3, 7, cfg.hidden_size)
    with torch.no_grad():
        y = moe(x)
        flat = x.view(-1, cfg.hidden_size)
        w, idx, _ = moe.gate(flat)
        ref = moe.shared_experts(flat)
        inter = cfg.moe_intermediate_size
        for t in range(flat.shape[0]):
            for j in range(cfg.num_experts_per_tok):
                e = idx[t, j]
                h = F.silu(moe.gate_up_proj[e, :inter] @ flat[t]) * (moe.gate_up_proj[e, inter:] @ flat[t])
                ref[t] += w[t, j] * (moe.down_proj[e] @ h)
    torch.testing.assert_close(y.view(-1, cfg.hidden_size), ref, atol=1e-5, rtol=1e-5)


def test_moe_expert_paths_agree():
    """The routed experts' three paths (grouped_mm, the per-expert loop, each pair with its expert's weights
    gathered: the accelerator's path without grouped_mm) give the same output for the same routing."""
    torch.manual_seed(0)
    cfg = get_preset("test")
    moe_layer = Transformer(cfg).layers[1].mlp
    x = torch.randn(21, cfg.hidden_size)
    with torch.no_grad():
        w, idx, _ = moe_layer.gate(x)
        gu, dn = moe_layer.gate_up_proj, moe_layer.down_proj
        assert moe.grouped_mm_ok(x, gu, dn)
        grouped = moe.dispatch(x, w, idx, cfg.n_routed_experts, lambda xs, c: moe.grouped_swiglu(xs, c, gu, dn))
        looped = moe.dispatch(x, w, idx, cfg.n_routed_experts,
                              lambda xs, c: moe.looped_swiglu(xs, c, gu.unbind(0), dn.unbind(0)))
        gathered = moe.gathered_swiglu(x, w, idx, gu, dn, torch.zeros_like(x))
    torch.testing.assert_close(looped, grouped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gathered, grouped, atol=1e-5, rtol=1e-5)
    counts = moe.expert_counts(idx.flatten(), cfg.n_routed_experts)
    assert torch.equal(counts, torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts))


def test_moe_dispatch_reads_nothing_back_to_the_host():
    """On an accelerator the routing, counting and grouped_mm dispatch (forward and backward) must queue without
    waiting for the device. `meta` tensors stand in for one: any read of a value to the host (.tolist(), .item(),
    torch.bincount's size) fails on them, and grouped_mm_ok applies the CUDA rule (bf16) to them."""
    cfg = get_preset("test")
    e, d, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    with torch.device("meta"):
        x = torch.randn(40, d, dtype=torch.bfloat16, requires_grad=True)
        gu = torch.randn(e, 2 * i, d, dtype=torch.bfloat16, requires_grad=True)
        dn = torch.randn(e, d, i, dtype=torch.bfloat16, requires_grad=True)
        w, idx = moe.select_experts(torch.rand(40, e), torch.zeros(e), cfg)
    assert moe.grouped_mm_ok(x, gu, dn) and not moe.grouped_mm_ok(x.float(), gu.float(), dn.float())
    y = moe.dispatch(x, w, idx, e, lambda xs, c: moe.grouped_swiglu(xs, c, gu, dn))
    y.float().sum().backward()
    assert y.shape == (40, d) and gu.grad.shape == gu.shape
    assert moe.expert_counts(idx.flatten(), e).shape == (e,)
    with pytest.raises(NotImplementedError):  # what the old counting did: torch.bincount sizes its output on the host
        torch.bincount(idx.flatten(), minlength=e)


def test_mtp_loss_matches_manual_computation():
    torch.manual_seed(0)
    cfg = get_preset("test")
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    loss0, stats0 = model.compute_loss(x, y)
    torch.testing.assert_close(loss0, F.cross_entropy(model(x).flatten(0, 1), y.flatten()))
    assert "loss_mtp" not in stats0
    loss, stats = model.compute_loss(x, y, mtp_lambda=0.3)
    # depth 1: combine h_i with Emb(t_{i+1}) and predict t_{i+2} = y[:, 1:]
    with torch.no_grad():
        h = model.hidden_states(x)
        cos, sin = model.rotary(torch.arange(x.shape[1] - 1))
        m = model.mtp[0]
        h1 = m(h[:, :-1], model.embed_tokens(x[:, 1:]), cos, sin)
        mtp = F.cross_entropy(model.lm_head(m.shared_head.norm(h1)).flatten(0, 1), y[:, 1:].flatten())
    assert math.isclose(stats["loss_mtp"], mtp.item(), rel_tol=1e-6)
    assert math.isclose(loss.item(), stats["loss_main"] + 0.3 * mtp.item(), rel_tol=1e-6)
    loss.backward()
    assert model.mtp[0].eh_proj.weight.grad.abs().sum() > 0


def test_balance_loss_formula_and_gradient():
    torch.manual_seed(0)
    cfg = get_preset("test")
    moe = MoE(cfg)
    Transformer(cfg)  # same init path as the model uses
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    for p in (moe.gate_up_proj, moe.down_proj):
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(2, 5, cfg.hidden_size)
    moe(x, balance_alpha=1.0)
    _, idx, s = moe.gate(x.view(-1, cfg.hidden_size))
    e, k, t = cfg.n_routed_experts, cfg.num_experts_per_tok, 5
    expected = 0.0
    for b in range(2):
        rows = slice(b * t, (b + 1) * t)
        f = torch.bincount(idx[rows].flatten(), minlength=e).float() * e / (k * t)
        p = (s[rows] / s[rows].sum(-1, keepdim=True)).mean(0)
        expected += (f * p).sum().item() / 2
    assert math.isclose(moe.aux_loss.item(), expected, rel_tol=1e-5)
    moe.aux_loss.backward()
    assert moe.gate.weight.grad.abs().sum() > 0


def test_aux_free_bias_update_moves_toward_balance():
    cfg = get_preset("test")
    model = Transformer(cfg)
    gate = model.layers[1].mlp.gate
    load = torch.zeros(cfg.n_routed_experts)
    load[0], load[1:] = 100.0, 10.0
    gate.expert_load.copy_(load)
    maxvio = model.update_expert_bias(gamma=0.001)
    bias = gate.e_score_correction_bias
    assert bias[0].item() == pytest.approx(-0.001) and (bias[1:] == 0.001).all()
    assert maxvio == pytest.approx(100.0 / load.mean().item() - 1)
    assert gate.expert_load.sum() == 0  # reset after each update


@pytest.mark.parametrize("preset", ["test", "cpu"])
def test_parameter_counts_match_allocation(preset):
    cfg = get_preset(preset)
    counted = Transformer(cfg).num_params()
    analytic = cfg.num_params()
    assert counted["total"] == analytic["total"] and counted["mtp_total"] == analytic["mtp_total"]


def test_deepseek_v3_shape_accounting():
    cfg = get_preset("deepseek-v3")
    n = cfg.num_params()
    assert round(n["total"] / 1e9) == 671 and round(n["active"] / 1e9, 1) == 37.6
    assert (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2 == 70_272  # bytes/token in bf16
    assert cfg.softmax_scale == pytest.approx(0.135234, abs=1e-6)


@pytest.mark.parametrize("bad, message", [
    (dict(topk_group=5), "topk_group"),
    (dict(n_group=3), "n_group"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    # wrong types from a config.json: one line naming the field, not a TypeError deep in the model
    (dict(rope_theta="10000"), "rope_theta must be a finite number, got '10000'"),
    (dict(initializer_range="0.02"), "initializer_range must be a finite number"),
    (dict(rope_theta=float("nan")), "rope_theta must be a finite number, got nan"),
    (dict(rms_norm_eps=float("inf")), "rms_norm_eps must be a finite number"),
    (dict(rope_theta=-1.0), "rope_theta must be > 0"),
    (dict(num_hidden_layers=True), "num_hidden_layers must be an integer, got True"),
    (dict(n_group=4.0), "n_group must be an integer, got 4.0"),
    (dict(vocab_size="512"), "vocab_size must be an integer"),
    (dict(tie_word_embeddings="false"), "tie_word_embeddings must be true or false"),
    (dict(scoring_func=1), "scoring_func must be a string"),
    (dict(eos_token_id=-2), "eos_token_id must be >= 0"),
    (dict(q_lora_rank="32"), "q_lora_rank must be an integer"),
    (dict(rope_scaling={**YARN, "mscale": "1"}), "rope_scaling.mscale must be a finite number"),
    (dict(rope_scaling={**YARN, "factor": float("nan")}), "rope_scaling.factor must be a number >= 1"),
    (dict(rope_scaling={**YARN, "original_max_position_embeddings": 0}), "original_max_position_embeddings"),
])
def test_invalid_config_values(bad, message):
    with pytest.raises(NanoseekError, match=message):
        get_preset("test", **bad)


def test_config_json_with_wrong_types_is_one_line(tmp_path):
    from nanoseek.cli import main

    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3", "rope_theta": NaN, "eos_token_id": []}')
    with pytest.raises(NanoseekError, match="rope_theta must be a finite number, got nan") as e:
        ModelConfig.load(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: rope_theta")  # names the file
    (tmp_path / "config.json").write_text('{"eos_token_id": []}')  # an empty list of stop tokens: the default eos
    assert ModelConfig.load(tmp_path).eos_token_id == ModelConfig().eos_token_id
    (tmp_path / "config.json").write_text('{"initializer_range": "0.02"}')
    with pytest.raises(SystemExit) as e:
        main(["info", "--config", str(tmp_path)])
    assert e.value.code == 2


def test_config_json_roundtrip(tmp_path):
    cfg = get_preset("test", rope_scaling=YARN, q_lora_rank=None)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path) == cfg
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.num_key_value_heads == cfg.num_attention_heads and hf.q_lora_rank is None


def test_transformers_checkpoint_declaring_mtp_without_weights_loads_without_mtp(tmp_path, capsys):
    """transformers' save_pretrained keeps num_nextn_predict_layers = 1 in config.json but writes no MTP weights."""
    from nanoseek.cli import main
    from nanoseek.engine import Engine

    torch.manual_seed(2)
    cfg = get_preset("test")
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    capsys.readouterr()
    model = load_model(tmp_path)
    load_model(tmp_path)  # warned once per checkpoint
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds no MTP weights" in err and "warning" in err
    assert model.config.num_nextn_predict_layers == 0 and len(model.mtp) == 0
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    with pytest.raises(NanoseekError, match="MTP module"):
        Engine(model, max_batch_size=1, max_seq_len=64, speculative=True)
    (tmp_path / "tokenizer.json").write_text("{}")  # never read: the MTP check comes first
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--speculate"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "--speculate needs the checkpoint's MTP module" in err and "holds no MTP weights" in err
