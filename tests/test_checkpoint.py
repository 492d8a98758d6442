"""HF-layout checkpoints: names, shards, dtypes, FP8 dequantisation, atomic writes and every bad input."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek import NanoseekError, Transformer, get_preset, load_model
from nanoseek.checkpoint import save_pretrained, to_hf_state_dict
from nanoseek.cli import main


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = Transformer(get_preset("test")).eval()
    for gate in m.gates():
        gate.e_score_correction_bias.normal_(0, 0.1)
    return m


def logits(m, seed=0):
    ids = torch.randint(0, m.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return m(ids)


def test_hf_tensor_names(model):
    names = set(to_hf_state_dict(model))
    n = model.config.num_hidden_layers
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in names
    assert "model.layers.1.mlp.experts.0.down_proj.weight" in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names  # first_k_dense_replace = 1: layer 0 is dense
    assert "model.layers.0.self_attn.q_a_proj.weight" in names and "lm_head.weight" in names
    for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                   "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                   "mlp.experts.3.up_proj.weight"):
        assert f"model.layers.{n}.{suffix}" in names  # MTP as an extra layer, as in the official release
    assert not any(k.startswith("mtp.") or "gate_up_proj" in k for k in names)


def test_roundtrip_exact_with_mtp(model, tmp_path):
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_model(tmp_path / "ckpt")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["num_key_value_heads"] == 2


def test_sharded_and_bf16(model, tmp_path):
    save_pretrained(model, tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    torch.testing.assert_close(logits(load_model(tmp_path / "sharded")), logits(model), rtol=0, atol=0)
    save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
    torch.testing.assert_close(logits(load_model(tmp_path / "bf16")), logits(model), rtol=0.05, atol=0.05)


def test_fp8_block_weights_are_dequantised(model, tmp_path):
    """The official release stores e4m3 weights with one fp32 `weight_scale_inv` per 128x128 block."""
    save_pretrained(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    w = tensors[name]  # [64, 16]: one block
    scale = w.abs().max() / 448.0
    tensors[name] = (w / scale).to(torch.float8_e4m3fn)
    tensors[name + "_scale_inv"] = scale.reshape(1, 1).float()
    save_file(tensors, str(path), metadata={"format": "pt"})
    loaded = load_model(tmp_path / "ckpt")
    got = loaded.layers[0].self_attn.kv_b_proj.weight
    assert (got - w).abs().max() <= w.abs().max() / 8  # e4m3 has a 3-bit mantissa
    assert not torch.equal(got, w)


def test_interrupted_save_keeps_previous(model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_pretrained(model, target)
    before = logits(load_model(target))
    import nanoseek.checkpoint as ckpt

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", crash)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, target)
    torch.testing.assert_close(logits(load_model(target)), before, rtol=0, atol=0)


@pytest.mark.parametrize("damage, message", [
    ("drop", "missing tensor model.layers.1.mlp.experts.3.up_proj.weight"),
    ("reshape", "has shape"),
    ("extra", "does not describe"),
])
def test_bad_tensors(model, tmp_path, damage, message):
    save_pretrained(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if damage == "drop":
        del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    elif damage == "reshape":
        tensors["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    else:
        tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(NanoseekError, match=message):
        load_model(tmp_path / "ckpt")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(NanoseekError, match="not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(NanoseekError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NanoseekError, match="not a checkpoint directory"):
        load_model(tmp_path / "file.txt")
    get_preset("test").save(tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(NanoseekError, match="never loaded"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(NanoseekError, match="invalid JSON"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "n_group": 3}))
    with pytest.raises(NanoseekError, match="n_group"):
        load_model(tmp_path)


def test_cli_reports_one_line_without_traceback(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"topk_group": 9}))
    with pytest.raises(SystemExit) as exit_info:
        main(["info", "--config", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "topk_group" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_mtp_weights_kept_partial_mtp_refused(tmp_path):
    torch.manual_seed(0)
    two = Transformer(get_preset("test", num_nextn_predict_layers=2))
    save_pretrained(two, tmp_path / "two")
    assert load_model(tmp_path / "two").config.num_nextn_predict_layers == 2  # present: kept
    tensors = _tensors(tmp_path / "two" / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("model.layers.3.")},
              str(tmp_path / "two" / "model.safetensors"))
    with pytest.raises(NanoseekError, match=r"declares 2 MTP layers .* model\.layers\.3\.\*: the MTP weights are "
                                            r"incomplete"):
        load_model(tmp_path / "two")
    del tensors["model.layers.2.eh_proj.weight"]  # one layer, one tensor short
    save_file(tensors, str(tmp_path / "two" / "model.safetensors"))
    with pytest.raises(NanoseekError, match="missing MTP tensor model.layers.2.eh_proj.weight"):
        load_model(tmp_path / "two")


def test_shape_mismatch_is_found_before_the_model_is_allocated(model, tmp_path, monkeypatch):
    import nanoseek.checkpoint as ckpt

    save_pretrained(model, tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    built_on = []

    class Recording(Transformer):
        def __init__(self, config):
            built_on.append(torch.get_default_device().type)
            super().__init__(config)

    monkeypatch.setattr(ckpt, "Transformer", Recording)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "q_lora_rank": 16}))  # fewer params: same size
    with pytest.raises(NanoseekError, match="q_a_proj.weight has shape"):
        load_model(tmp_path / "ckpt")
    assert built_on == ["meta"]
    built_on.clear()
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "hidden_size": 10**7}))
    with pytest.raises(NanoseekError, match="describes .* parameters but the checkpoint holds"):
        load_model(tmp_path / "ckpt")
    assert built_on == []  # refused from the headers alone: nothing built, not even on meta


def test_integer_weights_are_refused(model, tmp_path):
    save_pretrained(model, tmp_path / "ckpt")
    tensors = _tensors(tmp_path / "ckpt" / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].long()
    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(NanoseekError, match="model.norm.weight has dtype I64"):
        load_model(tmp_path / "ckpt")


def _sharded(model, path):
    save_pretrained(model, path, max_shard_bytes=100_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return index, sorted(set(index["weight_map"].values()))


@pytest.mark.parametrize("escape", ["absolute", "dotdot", "symlink", "fifo"])
def test_index_shard_outside_the_checkpoint_is_refused(model, tmp_path, escape):
    import os

    ckpt = tmp_path / "ckpt"
    index, shards = _sharded(model, ckpt)
    outside = tmp_path / "elsewhere.safetensors"
    (ckpt / shards[0]).rename(outside)
    if escape == "absolute":
        name = str(outside)
    elif escape == "dotdot":
        name = "../elsewhere.safetensors"
    elif escape == "symlink":
        name = shards[0]
        (ckpt / name).symlink_to(outside)
    else:
        name = shards[0]
        os.mkfifo(ckpt / name)  # opening it for reading would block forever
    index["weight_map"] = {k: (name if v == shards[0] else v) for k, v in index["weight_map"].items()}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    message = "not a regular file" if escape == "fifo" else "outside the checkpoint directory"
    with pytest.raises(NanoseekError, match=message):
        load_model(ckpt)


def test_hub_cache_symlinks_into_blobs_load(model, tmp_path):
    """huggingface_hub's cache: snapshots/<rev>/<file> -> ../../blobs/<hash>."""
    repo = tmp_path / "models--x--y"
    save_pretrained(model, tmp_path / "plain")
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in (tmp_path / "plain").iterdir():
        f.rename(repo / "blobs" / f"hash-{f.name}")
        (snap / f.name).symlink_to(f"../../blobs/hash-{f.name}")
    torch.testing.assert_close(logits(load_model(snap)), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a valid safetensors index"),
    ("[1, 2]", "no 'weight_map'"),
    ('{"weight_map": "model.safetensors"}', "no 'weight_map'"),
    ('{"weight_map": {}}', "no 'weight_map'"),
    ('{"weight_map": {"model.norm.weight": 3}}', r"weight_map\['model.norm.weight'\] must be a shard file name"),
    ('{"weight_map": {"model.norm.weight": "model.safetensors", "lm_head.weight": "model.safetensors", '
     '"model.nope": "model.safetensors"}}', "maps model.nope to model.safetensors, which does not hold it"),
    ('{"weight_map": {"model.norm.weight": "gone.safetensors"}}', "shard gone.safetensors listed in the index is "
                                                                  "missing"),
])
def test_malformed_index_is_one_line(model, tmp_path, content, message):
    save_pretrained(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(content)
    with pytest.raises(NanoseekError, match=message):
        load_model(tmp_path / "ckpt")


@pytest.mark.parametrize("tied", [False, True])
def test_owned_export_empties_the_state_and_writes_the_same_bytes(tmp_path, tied):
    """save_state_dict(owned=True), the HF export of a gathered copy (Trainer.save_final): the caller's dict is
    emptied as the tensors are taken over (one copy of the weights, not two) and the files equal the copying path's."""
    from nanoseek.checkpoint import save_state_dict

    torch.manual_seed(0)
    m = Transformer(get_preset("test", tie_word_embeddings=tied))
    save_state_dict(m.config, m.state_dict(), tmp_path / "copied")
    state = {k: v.detach().clone() for k, v in m.state_dict().items()}
    save_state_dict(m.config, state, tmp_path / "owned", owned=True)
    assert state == {}
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "owned" / name).read_bytes() == (tmp_path / "copied" / name).read_bytes(), name
    for (k, a), (_, b) in zip(m.state_dict().items(), load_model(tmp_path / "owned").state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), k
