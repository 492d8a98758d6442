"""Pre-training data: documents -> token ids on disk -> random (x, y) batches.

Pipeline (nanoGPT-style): read_documents() turns .txt / .jsonl files into text documents; prepare_data() tokenizes
each document followed by <｜end▁of▁sentence｜>, splits whole documents into train/val, and writes flat uint16/uint32
arrays `train.bin` / `val.bin` plus `meta.json`; TokenDataset memory-maps a .bin and samples windows whose positions
depend only on (seed, step, micro, rank), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.errors import NanoseekError
from nanoseek.osutil import write_failed, write_text_atomically
from nanoseek.tokenizer import Tokenizer

DOC_CHARS = 4096  # .txt files are cut into documents of about this many characters at blank lines
META_VERSION = 1  # bump when the .bin layout or the document rendering changes, to invalidate old caches
ENCODE_BATCH = 256  # documents per tokenizers.encode_batch call


def corpus_dir() -> Path:
    """The data bundled with the package (see nanoseek/corpus/README.md)."""
    return Path(__file__).parent / "corpus"


def default_corpus_files() -> list[Path]:
    """Pre-training sources. GSM8K test.jsonl is evaluation-only and deliberately absent."""
    return [corpus_dir() / "tinyshakespeare" / "input.txt", corpus_dir() / "gsm8k" / "train.jsonl"]


# ----- documents ----------------------------------------------------------------------------------------------------
def read_documents(path: str | Path) -> Iterator[str]:
    """Yield the text documents of one file.

    .txt:   paragraphs (blank-line separated) grouped into documents of ~DOC_CHARS characters, joined by a blank
            line. Whole paragraphs keep a speech or scene together, and many documents make a real val split possible.
    .jsonl: one JSON object a line with either `text`; or `question` + `answer` (GSM8K), rendered as
            "Question: …\\nAnswer: …"; or `messages` (a chat), rendered as plain text with role names.
    The path and extension are checked at call time; bad lines raise NanoseekError("file:line: …") while iterating.
    """
    path = Path(path)
    if not path.is_file():
        raise NanoseekError(f"data: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_documents(path)
    if suffix == ".jsonl":
        return _jsonl_documents(path)
    raise NanoseekError(f"data: {path}: unknown file type {path.suffix!r} (expected .txt or .jsonl)")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise NanoseekError(f"data: {path}: not valid UTF-8 (byte {e.start})") from e


def _txt_documents(path: Path) -> Iterator[str]:
    chunk: list[str] = []
    size = 0
    for para in re.split(r"\n[ \t\r]*\n", _read_text(path)):
        para = para.strip("\n")
        if not para.strip():
            continue
        chunk.append(para)
        size += len(para) + 2
        if size >= DOC_CHARS:
            yield "\n\n".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield "\n\n".join(chunk)


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open("r", encoding="utf-8") as f:
        lineno = 0
        while True:
            lineno += 1
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise NanoseekError(f"data: {path}:{lineno}: not valid UTF-8") from e
            if not line:
                return
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise NanoseekError(f"data: {path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
            yield _render_record(obj, f"{path}:{lineno}")


def _render_record(obj: Any, where: str) -> str:
    if not isinstance(obj, dict):
        raise NanoseekError(f"data: {where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise NanoseekError(f"data: {where}: field 'text' must be a string")
        return obj["text"]
    if "question" in obj and "answer" in obj:
        if not isinstance(obj["question"], str) or not isinstance(obj["answer"], str):
            raise NanoseekError(f"data: {where}: fields 'question' and 'answer' must be strings")
        return f"Question: {obj['question']}\nAnswer: {obj['answer']}"
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise NanoseekError(f"data: {where}: field 'messages' must be a non-empty list")
        parts = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise NanoseekError(f"data: {where}: messages[{i}] needs string 'role' and 'content'")
            role = m["role"].capitalize()
            if isinstance(m.get("reasoning_content"), str):
                parts.append(f"{role} (thinking): {m['reasoning_content']}")
            parts.append(f"{role}: {m['content']}")
        return "\n\n".join(parts)
    raise NanoseekError(f"data: {where}: object needs 'text', 'question'+'answer', or 'messages' "
                        f"(has: {', '.join(sorted(obj)) or 'no fields'})")


# ----- tokenize to .bin ---------------------------------------------------------------------------------------------
def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    # ids run 0..vocab_size-1, so uint16 holds vocabularies up to 65536 tokens at half the disk/memory of uint32
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _cached_meta(out_dir: Path, key: dict[str, Any], sources: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The existing meta.json if it was made from the same sources (sha256, size), tokenizer and split settings."""
    try:
        meta = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))
        if any(meta.get(k) != v for k, v in key.items()):
            return None
        if [(s["sha256"], s["size"]) for s in meta["sources"]] != [(s["sha256"], s["size"]) for s in sources]:
            return None
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            if (out_dir / f"{split}.bin").stat().st_size != meta[f"{split}_tokens"] * itemsize:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def prepare_data(paths: list[Path], tokenizer: Tokenizer, out_dir: str | Path, val_fraction: float = 0.02,
                 seed: int = 0) -> dict[str, Any]:
    """Tokenize `paths` into out_dir/{train,val}.bin + meta.json and return the meta dict.

    Every document becomes its tokens followed by eos. Whole documents go to val: round(val_fraction * n_docs) of
    them (at least one when there are two or more documents), picked by a permutation seeded with `seed`. If meta.json
    already matches the sources' sha256/size, the tokenizer and the split settings, nothing is redone.
    """
    out_dir = Path(out_dir)
    paths = [Path(p) for p in paths]
    if not paths:
        raise NanoseekError("data: no input files given")
    if not 0.0 <= val_fraction < 1.0:
        raise NanoseekError(f"data: val_fraction must be in [0, 1), got {val_fraction}")
    for p in paths:
        read_documents(p)  # checks existence and extension up front, before any long work
    sources = [{"path": str(p), "sha256": _file_sha256(p), "size": p.stat().st_size} for p in paths]
    key = {"version": META_VERSION, "tokenizer_sha256": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
           "val_fraction": val_fraction, "seed": seed}
    cached = _cached_meta(out_dir, key, sources)
    if cached is not None:
        return cached

    # Pass 1 counts documents (cheap next to tokenizing), so the val split is exact and the progress bar has a total.
    for s, p in zip(sources, paths, strict=True):
        s["documents"] = sum(1 for _ in read_documents(p))
    n_docs = sum(s["documents"] for s in sources)
    n_val = round(val_fraction * n_docs)
    if val_fraction > 0 and n_docs >= 2:
        n_val = min(max(n_val, 1), n_docs - 1)
    val_docs = set(np.random.default_rng(seed).permutation(n_docs)[:n_val].tolist())

    dtype = token_dtype(tokenizer.vocab_size)
    counts = {"train": 0, "val": 0}
    tmp = {split: out_dir / f"{split}.bin.tmp" for split in counts}
    total_bytes = sum(s["size"] for s in sources)
    docs = (doc for p in paths for doc in read_documents(p))
    try:  # a full disk or read-only out_dir: one line, and no partial .bin or meta.json left behind
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "meta.json").unlink(missing_ok=True)  # it describes the files about to be replaced
        with tqdm(total=n_docs, unit="doc", desc="tokenizing", disable=total_bytes < 1 << 20) as bar, \
                tmp["train"].open("wb") as train_file, tmp["val"].open("wb") as val_file:
            files = {"train": train_file, "val": val_file}
            doc_index = 0
            while batch := list(itertools.islice(docs, ENCODE_BATCH)):
                for ids in tokenizer.encode_batch(batch):
                    split = "val" if doc_index in val_docs else "train"
                    arr = np.array([*ids, tokenizer.eos_id], dtype=dtype)
                    files[split].write(arr.tobytes())
                    counts[split] += len(arr)
                    doc_index += 1
                bar.update(len(batch))
        for split in counts:
            os.replace(tmp[split], out_dir / f"{split}.bin")
        meta = {**key, "dtype": dtype.name, "train_tokens": counts["train"], "val_tokens": counts["val"],
                "train_documents": n_docs - n_val, "val_documents": n_val, "eos_id": tokenizer.eos_id,
                "sources": sources}
        # meta.json is written last: an interrupted run never leaves a meta that claims complete .bin files
        write_text_atomically(out_dir / "meta.json", json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise write_failed(out_dir, e) from None
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    return meta


# ----- batches ------------------------------------------------------------------------------------------------------
class TokenDataset:
    """A flat token array on disk (train.bin / val.bin), memory-mapped so it is never loaded whole."""

    def __init__(self, bin_path: str | Path, dtype: str | np.dtype = "uint16"):
        self.path = Path(bin_path)
        try:
            self.dtype = np.dtype(dtype)
        except TypeError as e:
            raise NanoseekError(f"data: unknown token dtype {dtype!r}") from e
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise NanoseekError(f"data: token dtype must be uint16 or uint32, got {self.dtype.name}")
        if not self.path.is_file():
            raise NanoseekError(f"data: token file not found: {self.path} (run data preparation first)")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise NanoseekError(f"data: {self.path}: size {size} bytes is not a multiple of {self.dtype.name}")
        # np.memmap cannot map an empty file
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.tokens)

    def get_batch(self, batch_size: int, seq_len: int, step: int, micro: int = 0, seed: int = 0, rank: int = 0,
                  world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), both int64 (batch_size, seq_len); y is x shifted by one: y[:, t] is the token after x[:, t].

        Window starts are uniform random, drawn from a generator seeded by (seed, step, micro, rank) only: the same
        arguments always give the same batch (exact resume), and every rank draws its own windows. world_size is only
        checked against rank.
        """
        if not 0 <= rank < world_size:
            raise NanoseekError(f"data: rank {rank} is outside world_size {world_size}")
        if min(seed, step, micro) < 0 or batch_size < 1 or seq_len < 1:
            raise NanoseekError(f"data: get_batch needs positive sizes and non-negative seed/step/micro, got "
                                f"batch_size={batch_size} seq_len={seq_len} seed={seed} step={step} micro={micro}")
        n = len(self.tokens)
        if n < seq_len + 1:
            raise NanoseekError(f"data: {self.path} has {n} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        # SeedSequence hashes the four ints into a well-mixed seed (nearby steps give unrelated streams)
        rng = np.random.default_rng(np.random.SeedSequence([seed, step, micro, rank]))
        starts = rng.integers(0, n - seq_len, size=batch_size)  # last valid start is n - seq_len - 1
        window = self.tokens[starts[:, None] + np.arange(seq_len + 1)]  # (batch_size, seq_len + 1)
        window = torch.from_numpy(window.astype(np.int64))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()
