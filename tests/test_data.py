import json

import numpy as np
import pytest
import torch

from nanoseek.data import (
    TokenDataset,
    corpus_dir,
    default_corpus_files,
    prepare_data,
    read_documents,
)
from nanoseek.errors import NanoseekError
from nanoseek.tokenizer import train_tokenizer

TXT = "\n\n".join(f"Speaker {i}:\nLine {i} of the play, with words 甲乙 and 🙂.\nAnother line." for i in range(300))
JSONL_RECORDS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
    {"text": "A plain text document."},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
] * 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    (d / "a.txt").write_text(TXT, encoding="utf-8")
    (d / "b.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in JSONL_RECORDS) + "\n\n",
                               encoding="utf-8")
    return [d / "a.txt", d / "b.jsonl"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([TXT[:5000]], vocab_size=300, out_dir=tmp_path_factory.mktemp("tok"))


def test_default_corpus():
    files = default_corpus_files()
    assert [f.name for f in files] == ["input.txt", "train.jsonl"]
    assert all(f.is_file() for f in files)
    assert all("test" not in f.name for f in files)  # GSM8K test split is evaluation-only
    assert (corpus_dir() / "gsm8k" / "test.jsonl").is_file()
    gsm = next(read_documents(corpus_dir() / "gsm8k" / "train.jsonl"))
    assert gsm.startswith("Question: Natalia sold clips") and "\nAnswer: " in gsm and gsm.endswith("#### 72")


def test_read_documents(files):
    txt_docs = list(read_documents(files[0]))
    assert len(txt_docs) > 3
    assert "\n\n".join(txt_docs) == TXT  # grouping paragraphs loses nothing here
    jl = list(read_documents(files[1]))
    assert len(jl) == len(JSONL_RECORDS)  # the trailing blank line is skipped
    assert jl[0] == "Question: Tom has 3 apples and buys 4. How many?\nAnswer: 3+4=<<3+4=7>>7\n#### 7"
    assert jl[1] == "A plain text document."
    assert jl[2] == "User: hi\n\nAssistant: hello"


def test_prepare_data(files, tok, tmp_path):
    meta = prepare_data(files, tok, tmp_path / "out", val_fraction=0.1, seed=3)
    assert meta["dtype"] == "uint16"
    train = np.fromfile(tmp_path / "out" / "train.bin", dtype=np.uint16)
    val = np.fromfile(tmp_path / "out" / "val.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and len(val) == meta["val_tokens"] > 0
    docs = [d for f in files for d in read_documents(f)]
    expected = sum(len(tok.encode(d)) + 1 for d in docs)  # every document ends with eos
    assert len(train) + len(val) == expected
    assert (train == tok.eos_id).sum() + (val == tok.eos_id).sum() == len(docs)
    assert meta["val_documents"] == round(0.1 * len(docs)) and val[-1] == tok.eos_id
    assert [s["size"] for s in meta["sources"]] == [f.stat().st_size for f in files]
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta

    # deterministic: a fresh run in another directory writes identical bytes
    prepare_data(files, tok, tmp_path / "again", val_fraction=0.1, seed=3)
    for split in ("train", "val"):
        assert (tmp_path / "again" / f"{split}.bin").read_bytes() == (tmp_path / "out" / f"{split}.bin").read_bytes()

    # cached: same inputs return the meta without rewriting; a new seed redoes the split
    mtime = (tmp_path / "out" / "train.bin").stat().st_mtime_ns
    assert prepare_data(files, tok, tmp_path / "out", val_fraction=0.1, seed=3) == meta
    assert (tmp_path / "out" / "train.bin").stat().st_mtime_ns == mtime
    other = prepare_data(files, tok, tmp_path / "out", val_fraction=0.1, seed=4)
    assert other["train_tokens"] + other["val_tokens"] == expected and other["seed"] == 4


def test_get_batch(files, tok, tmp_path):
    meta = prepare_data(files, tok, tmp_path, val_fraction=0.1)
    ds = TokenDataset(tmp_path / "train.bin", meta["dtype"])
    assert len(ds) == meta["train_tokens"]
    x, y = ds.get_batch(4, 16, step=7, micro=1, seed=0)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    tokens = torch.from_numpy(np.asarray(ds.tokens).astype(np.int64))
    for row_x, row_y in zip(x, y, strict=True):  # each row is a real window of the stream
        start = next(s for s in range(len(tokens) - 16) if torch.equal(tokens[s:s + 16], row_x))
        assert torch.equal(tokens[start + 1:start + 17], row_y)

    def same(a, b):
        return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    again = TokenDataset(tmp_path / "train.bin", meta["dtype"]).get_batch(4, 16, step=7, micro=1, seed=0)
    assert same((x, y), again)  # pure function of (seed, step, micro, rank): a resumed run sees the same batch
    assert not same((x, y), ds.get_batch(4, 16, step=8, micro=1))
    assert not same((x, y), ds.get_batch(4, 16, step=7, micro=0))
    assert not same((x, y), ds.get_batch(4, 16, step=7, micro=1, seed=1))
    r0 = ds.get_batch(4, 16, step=7, micro=1, rank=0, world_size=2)
    r1 = ds.get_batch(4, 16, step=7, micro=1, rank=1, world_size=2)
    assert same(r0, (x, y)) and not same(r0, r1)
    with pytest.raises(NanoseekError, match="rank"):
        ds.get_batch(4, 16, step=0, rank=2, world_size=2)


def test_dataset_too_short(tmp_path):
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "short.bin")
    ds = TokenDataset(tmp_path / "short.bin", "uint16")
    x, y = ds.get_batch(2, 9, step=0)
    assert torch.equal(x[0], torch.arange(9)) and torch.equal(y[0], torch.arange(1, 10))
    with pytest.raises(NanoseekError, match="10 tokens"):
        ds.get_batch(2, 10, step=0)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(NanoseekError, match="0 tokens"):
        TokenDataset(tmp_path / "empty.bin", "uint32").get_batch(1, 4, step=0)
    with pytest.raises(NanoseekError, match="not found"):
        TokenDataset(tmp_path / "nope.bin", "uint16")


@pytest.mark.parametrize("line, problem", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"title": "x"}', "needs 'text'"),
    ('{"question": "q", "answer": 5}', "must be strings"),
])
def test_bad_jsonl_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(NanoseekError, match=problem) as err:
        list(read_documents(path))
    assert f"{path}:3" in str(err.value)


def test_missing_and_unknown_files(tmp_path, tok):
    with pytest.raises(NanoseekError, match="not found") as err:
        read_documents(tmp_path / "missing.txt")
    assert "missing.txt" in str(err.value)
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(NanoseekError, match="unknown file type"):
        read_documents(tmp_path / "data.csv")
    with pytest.raises(NanoseekError, match="missing.jsonl"):
        prepare_data([tmp_path / "missing.jsonl"], tok, tmp_path / "out")
