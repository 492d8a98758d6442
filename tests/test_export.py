import importlib.util
import json
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="GGUF export needs `pip install gguf`")

from nanoseek.checkpoint import load_model, save_pretrained  # noqa: E402
from nanoseek.cli import main  # noqa: E402
from nanoseek.config import get_preset  # noqa: E402
from nanoseek.data import corpus_dir  # noqa: E402
from nanoseek.errors import NanoseekError  # noqa: E402
from nanoseek.export import export_gguf, gguf_tensors  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402
from nanoseek.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, TOOL_TOKENS, Tokenizer, train_tokenizer  # noqa: E402

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
Q = gguf.GGMLQuantizationType
TOKEN_VOCAB = 400  # tokenizer size; the "test" preset's embedding has 512 rows, so 112 are padding


def make_model(seed: int = 0, **overrides) -> Transformer:
    """The "test" preset with weights large enough that logits and routing are far from uniform, and a nonzero
    routing bias so exp_probs_b matters."""
    torch.manual_seed(seed)
    model = Transformer(get_preset("test", initializer_range=0.15, **overrides))
    with torch.no_grad():
        for gate in model.gates():
            gate.e_score_correction_bias.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:6000]
    math = (corpus_dir() / "gsm8k" / "train.jsonl").read_text(encoding="utf-8")[:3000]
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([text, math], vocab_size=TOKEN_VOCAB, out_dir=out)
    return out


def save(model: Transformer, path, tok_dir):
    save_pretrained(model, path, tokenizer_dir=tok_dir)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok_dir):
    return save(make_model(), tmp_path_factory.mktemp("ckpt") / "tiny", tok_dir)


@pytest.fixture(scope="module")
def reader(ckpt, tmp_path_factory):
    return gguf.GGUFReader(export_gguf(ckpt, tmp_path_factory.mktemp("out") / "tiny.gguf"))


def field(r, key):
    return r.fields[key].contents()


def expected_shapes(cfg) -> dict[str, list[int]]:
    """Every tensor llama.cpp's deepseek2 loader reads for the test preset, as ggml dims (innermost first)."""
    d, h, v, i_ff, i_moe, e = 64, 2, 512, 128, 32, 8
    c, nope, rope, vd, qr = 16, 16, 8, 16, 32
    shapes = {"token_embd.weight": [d, v], "output_norm.weight": [d], "output.weight": [d, v]}
    for b in range(cfg.num_hidden_layers):
        p = f"blk.{b}."
        shapes.update({
            p + "attn_norm.weight": [d], p + "attn_q_a.weight": [d, qr], p + "attn_q_a_norm.weight": [qr],
            p + "attn_q_b.weight": [qr, h * (nope + rope)], p + "attn_kv_a_mqa.weight": [d, c + rope],
            p + "attn_kv_a_norm.weight": [c], p + "attn_k_b.weight": [nope, c, h], p + "attn_v_b.weight": [c, vd, h],
            p + "attn_output.weight": [h * vd, d], p + "ffn_norm.weight": [d],
        })
        if b < cfg.first_k_dense_replace:
            shapes.update({p + "ffn_gate.weight": [d, i_ff], p + "ffn_up.weight": [d, i_ff],
                           p + "ffn_down.weight": [i_ff, d]})
        else:
            shapes.update({
                p + "ffn_gate_inp.weight": [d, e], p + "exp_probs_b.bias": [e],
                p + "ffn_gate_exps.weight": [d, i_moe, e], p + "ffn_up_exps.weight": [d, i_moe, e],
                p + "ffn_down_exps.weight": [i_moe, d, e], p + "ffn_gate_shexp.weight": [d, i_moe],
                p + "ffn_up_shexp.weight": [d, i_moe], p + "ffn_down_shexp.weight": [i_moe, d],
            })
    return shapes


# --- file contents ---------------------------------------------------------------------------------------------------
def test_tensor_names_and_shapes(reader, ckpt):
    cfg = load_model(ckpt).config
    got = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    assert got == expected_shapes(cfg)  # also: no MTP tensors (layer 2 of the checkpoint is skipped)
    assert all(t.tensor_type == Q.F32 for t in reader.tensors)
    # every name is one llama.cpp's gguf-py lists for deepseek2
    arch_tensors = gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2]
    known = {gguf.TENSOR_NAMES[t].format(bid=b) for t in arch_tensors for b in range(2)}
    assert {name.rsplit(".", 1)[0] for name in got} <= known


def test_model_metadata(reader):
    assert field(reader, "general.architecture") == "deepseek2"
    expected = {
        "block_count": 2, "context_length": 256, "embedding_length": 64, "feed_forward_length": 128,
        "vocab_size": 512, "attention.head_count": 2, "attention.head_count_kv": 1,
        "attention.q_lora_rank": 32, "attention.kv_lora_rank": 16,
        "attention.key_length": 24, "attention.value_length": 16,  # latent + rope / latent (MQA view of MLA)
        "attention.key_length_mla": 24, "attention.value_length_mla": 16,  # nope + rope / v per head
        "rope.dimension_count": 8, "rope.freq_base": 10000.0,
        "leading_dense_block_count": 1, "expert_count": 8, "expert_used_count": 2, "expert_shared_count": 1,
        "expert_feed_forward_length": 32, "expert_gating_func": 2, "expert_weights_norm": True,
        "expert_weights_scale": 2.5, "expert_group_count": 4, "expert_group_used_count": 2,
    }
    for key, value in expected.items():
        assert field(reader, f"deepseek2.{key}") == pytest.approx(value), key
    assert field(reader, "deepseek2.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    assert "deepseek2.nextn_predict_layers" not in reader.fields
    assert "deepseek2.rope.scaling.type" not in reader.fields


def test_tokenizer_metadata(reader, tok_dir):
    tok = Tokenizer.from_dir(tok_dir)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "starcoder"
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 512
    n_special = len(SPECIAL_TOKENS) + len(TOOL_TOKENS)  # R1's seven, then V3's tool-call markers
    assert tokens[:n_special] == SPECIAL_TOKENS + TOOL_TOKENS
    assert types[:n_special] == [gguf.TokenType.CONTROL] * n_special
    assert set(types[n_special:TOKEN_VOCAB]) == {gguf.TokenType.NORMAL}
    assert tokens[TOKEN_VOCAB:] == [f"[PAD{i}]" for i in range(TOKEN_VOCAB, 512)]
    assert set(types[TOKEN_VOCAB:]) == {gguf.TokenType.UNUSED}
    ids = tok.encode(" the 2024")  # byte-level strings: "Ġ" is the space byte
    assert [tokens[i] for i in ids] == [tok._tok.id_to_token(i) for i in ids]
    merges = field(reader, "tokenizer.ggml.merges")
    assert len(merges) == TOKEN_VOCAB - n_special - 256 and all(len(m.split(" ")) == 2 for m in merges)
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.padding_token_id")) == (0, 1, 2)
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # the chat template writes bos itself
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


def test_tensor_values(reader, ckpt):
    model = load_model(ckpt)
    cfg = model.config
    data = {t.name: torch.from_numpy(np.array(t.data)) for t in reader.tensors}
    attn, moe = model.layers[1].self_attn, model.layers[1].mlp
    # k_b [H, c, nope] transposed back and v_b [H, v, c] restack into kv_b_proj [H*(nope+v), c]
    kv_b = torch.cat([data["blk.1.attn_k_b.weight"].transpose(1, 2), data["blk.1.attn_v_b.weight"]], dim=1)
    assert torch.equal(kv_b.reshape(-1, cfg.kv_lora_rank), attn.kv_b_proj.weight)
    gate_up = torch.cat([data["blk.1.ffn_gate_exps.weight"], data["blk.1.ffn_up_exps.weight"]], dim=1)
    assert torch.equal(gate_up, moe.gate_up_proj)
    assert torch.equal(data["blk.1.ffn_down_exps.weight"], moe.down_proj)
    assert torch.equal(data["blk.1.exp_probs_b.bias"], moe.gate.e_score_correction_bias)
    assert moe.gate.e_score_correction_bias.abs().sum() > 0
    assert torch.equal(data["blk.1.attn_q_b.weight"], attn.q_b_proj.weight)  # interleaved rope: no permutation
    assert torch.equal(data["output.weight"], model.lm_head.weight)


@pytest.mark.parametrize("dtype,weight_type", [("f16", Q.F16), ("bf16", Q.BF16), ("q8_0", Q.Q8_0)])
def test_dtypes(ckpt, tmp_path, dtype, weight_type):
    r = gguf.GGUFReader(export_gguf(ckpt, tmp_path / "m.gguf", dtype))
    types = {t.name: t.tensor_type for t in r.tensors}
    for name in ("blk.1.attn_norm.weight", "blk.1.attn_kv_a_norm.weight", "blk.1.ffn_gate_inp.weight",
                 "blk.1.exp_probs_b.bias", "output_norm.weight"):
        assert types[name] == Q.F32, name  # norms, router and its bias stay f32
    for name in ("token_embd.weight", "blk.1.attn_q_b.weight", "blk.1.ffn_gate_exps.weight", "output.weight"):
        assert types[name] == weight_type, name
    # q8_0 needs rows of 32: attn_k_b rows are qk_nope_head_dim = 16 wide, so it falls back to f16
    assert types["blk.1.attn_k_b.weight"] == (Q.F16 if dtype == "q8_0" else weight_type)
    ref = dict(gguf_tensors(load_model(ckpt)))
    for t in r.tensors:
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type).reshape(ref[t.name].shape)
        want = ref[t.name].numpy()
        # rounding error relative to the largest value: half a step of 2^-11 (f16), 2^-8 (bf16); q8_0: one step of
        # 1/127 of the block maximum (half a step, plus the f16 rounding of the block scale)
        tol = {Q.F32: 0.0, Q.F16: 2**-11, Q.BF16: 2**-8, Q.Q8_0: 1 / 127}[t.tensor_type]
        assert np.abs(got - want).max() <= tol * np.abs(want).max() + 1e-12, t.name


def test_rope_interleave_false_is_permuted_back(tmp_path, tok_dir):
    """A checkpoint stored in half-split rope order (rope_interleave=false) exports to the same GGUF tensors as the
    equivalent interleaved checkpoint."""
    a = make_model(seed=1)
    b = make_model(seed=2, rope_interleave=False)
    b.load_state_dict(a.state_dict())
    cfg = a.config
    nope, rope, c = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    half_split = torch.cat([torch.arange(0, rope, 2), torch.arange(1, rope, 2)])  # rows (x0,x2,..,x1,x3,..)
    with torch.no_grad():
        for la, lb in zip(a.layers, b.layers, strict=True):
            q = la.self_attn.q_b_proj.weight.view(cfg.num_attention_heads, nope + rope, -1)
            lb.self_attn.q_b_proj.weight.copy_(torch.cat([q[:, :nope], q[:, nope:][:, half_split]], 1).flatten(0, 1))
            kv = la.self_attn.kv_a_proj_with_mqa.weight
            lb.self_attn.kv_a_proj_with_mqa.weight.copy_(torch.cat([kv[:c], kv[c:][half_split]]))
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(a(ids), b(ids), rtol=1e-4, atol=1e-5)  # the same model in two layouts
    ra = gguf.GGUFReader(export_gguf(save(a, tmp_path / "a", tok_dir), tmp_path / "a.gguf"))
    rb = gguf.GGUFReader(export_gguf(save(b, tmp_path / "b", tok_dir), tmp_path / "b.gguf"))
    for ta, tb in zip(ra.tensors, rb.tensors, strict=True):
        assert ta.name == tb.name and np.array_equal(ta.data, tb.data), ta.name


def test_no_shared_experts_and_plain_q(tmp_path, tok_dir):
    """q_lora_rank=null writes attn_q (q_lora_rank 0); zero shared experts become one all-zero shared expert."""
    model = make_model(q_lora_rank=None, n_shared_experts=0, n_group=1, topk_group=1)
    r = gguf.GGUFReader(export_gguf(save(model, tmp_path / "c", tok_dir), tmp_path / "c.gguf"))
    names = {t.name: t for t in r.tensors}
    assert "blk.0.attn_q.weight" in names and "blk.0.attn_q_a.weight" not in names
    assert field(r, "deepseek2.attention.q_lora_rank") == 0
    assert field(r, "deepseek2.expert_shared_count") == 1
    assert not np.array(names["blk.1.ffn_down_shexp.weight"].data).any()
    assert "deepseek2.expert_group_count" not in r.fields  # one group = no group-limited routing


def test_yarn_metadata(tmp_path, tok_dir):
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
            "mscale": 0.707, "mscale_all_dim": 0.707}
    r = gguf.GGUFReader(export_gguf(save(make_model(rope_scaling=yarn), tmp_path / "y", tok_dir), tmp_path / "y.gguf"))
    assert field(r, "deepseek2.rope.scaling.type") == "yarn"
    assert field(r, "deepseek2.rope.scaling.factor") == pytest.approx(4.0)
    assert field(r, "deepseek2.rope.scaling.original_context_length") == 64
    assert field(r, "deepseek2.rope.scaling.yarn_log_multiplier") == pytest.approx(0.0707)  # 0.1 * mscale_all_dim


# --- errors and CLI --------------------------------------------------------------------------------------------------
def test_errors(ckpt, tmp_path, tok_dir, monkeypatch):
    with pytest.raises(NanoseekError, match="dtype 'q4'"):
        export_gguf(ckpt, tmp_path / "x.gguf", "q4")
    bare = tmp_path / "bare"
    save_pretrained(make_model(), bare)
    with pytest.raises(NanoseekError, match="tokenizer.json not found"):
        export_gguf(bare, tmp_path / "x.gguf")
    unsupported = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "mscale": 1.0,
                   "mscale_all_dim": 0.5}
    with pytest.raises(NanoseekError, match="mscale == mscale_all_dim"):
        export_gguf(save(make_model(rope_scaling=unsupported), tmp_path / "u", tok_dir), tmp_path / "x.gguf")
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(NanoseekError, match="pip install gguf"):
        export_gguf(ckpt, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_cli(ckpt, tmp_path, capsys):
    out = tmp_path / "cli.gguf"
    main(["export", str(ckpt), "--format", "gguf", "--dtype", "q8_0", "-o", str(out)])
    assert "wrote" in capsys.readouterr().out
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    with pytest.raises(SystemExit) as e:
        main(["export", str(tmp_path / "missing")])
    assert e.value.code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_output_directory_read_only_place_and_bad_tokenizer_are_one_line(ckpt, tmp_path, capsys, monkeypatch):
    import errno
    import os
    import shutil

    (tmp_path / "adir").mkdir()
    with pytest.raises(SystemExit) as e:
        main(["export", str(ckpt), "-o", str(tmp_path / "adir")])  # was a traceback after the whole conversion
    assert e.value.code == 2 and "is a directory" in capsys.readouterr().err

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    with monkeypatch.context() as m:
        m.setattr(gguf.GGUFWriter, "write_tensors_to_file", read_only)
        with pytest.raises(SystemExit) as e:
            main(["export", str(ckpt), "-o", str(tmp_path / "ro" / "m.gguf")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"could not write {tmp_path / 'ro' / 'm.gguf'}: Read-only file system" in err
    assert not list((tmp_path / "ro").iterdir())  # no partial .gguf, no temporary

    bad = tmp_path / "badtok"
    shutil.copytree(ckpt, bad)
    tj = json.loads((bad / "tokenizer.json").read_text())
    tj["model"]["vocab"] = list(tj["model"]["vocab"])  # a list where an object of token -> id belongs
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(NanoseekError, match="not the tokenizer files GGUF needs"):
        export_gguf(bad, tmp_path / "x.gguf")


# --- llama.cpp itself ------------------------------------------------------------------------------------------------
V2_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
V3_YARN = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
           "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama.cpp comparison needs `pip install llama-cpp-python`")
@pytest.mark.parametrize("overrides", [
    {},
    {"q_lora_rank": None, "rope_interleave": False, "rope_scaling": V2_YARN, "n_shared_experts": 0},
    {"rope_scaling": V3_YARN},
], ids=["test-preset", "plain-q+half-split-rope+v2-yarn+no-shared", "v3-yarn"])
def test_llama_cpp_logits_match(tmp_path, tok_dir, overrides):
    from llama_cpp import Llama

    model = make_model(seed=3, **overrides)
    path = export_gguf(save(model, tmp_path / "m", tok_dir), tmp_path / "m.gguf", "f32")
    tok = Tokenizer.from_dir(tok_dir)
    text = "<｜User｜>To be, or not to be: 1234 apples 深度 🚀\n\n<｜Assistant｜><think>\nthat is the question"
    ids = tok.encode(text, add_bos=True)
    # type_k/type_v 0 = GGML_TYPE_F32: llama.cpp's default f16 KV cache alone costs ~1e-3 in the logits
    llm = Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True, n_threads=1, verbose=False,
                type_k=0, type_v=0)
    assert llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids[1:]
    assert llm.token_bos() == 0 and llm.token_eos() == 1
    assert llm.metadata["tokenizer.chat_template"] == CHAT_TEMPLATE
    llm.eval(ids)
    got = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        want = model(torch.tensor([ids]))[0]
    assert want.abs().max() > 1.0  # the logits are far from uniform, so agreement means something
    assert (got - want).abs().max() < 1e-4  # fp32 vs fp32: measured ~4e-6
    assert torch.equal(got.argmax(-1), want.argmax(-1))
