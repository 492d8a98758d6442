"""Grammar-library benchmark for constrained decoding: llguidance, xgrammar and outlines-core side by side.

    python benchmarks/bench_grammar.py                      # vocabularies of 4096 and 16384 tokens, ~2 min
    python benchmarks/bench_grammar.py --vocab-sizes 2048 --repeats 1 --no-engine

What a serving engine pays for a constrained request, measured with nanoseek's own byte-level BPE (tokenizer.py,
trained here on the bundled corpus at each --vocab-sizes; or --tokenizer DIR):
  import           the library's first import (in a process that has imported torch already)
  tokenizer prep   once per served model: the library's view of the vocabulary (llguidance LLTokenizer, as
                   grammar.Prepared builds it; xgrammar TokenizerInfo + GrammarCompiler; outlines-core Vocabulary)
  compile          a schema seen for the first time: grammar -> its compiled form (llguidance LLMatcher;
                   xgrammar compile_json_schema + GrammarMatcher; outlines-core build_regex_from_schema + Index +
                   Guide; nanoseek grammar.json_schema() + new_state())
  compile again    a matcher for each request, from the compiled form: llguidance deep_copy() of the pristine
                   matcher (what nanoseek/grammar.py caches); xgrammar's own compile cache + GrammarMatcher;
                   outlines-core a new Guide over the cached Index; nanoseek Constraint.new_state()
  mask / advance   per generated token: the allowed-token bitmask ([V/32] int32, written in place) and consuming the
                   token; over the canonical tokenization of --instances valid JSON documents, one fresh matcher per
                   document (so lazily built lexer states are paid for, as in a real request); mean and p95 in us
  nanoseek         llguidance as the engine drives it: GrammarState.allowed() (the mask unpacked to a bool [V]
                   tensor) and advance()
  engine           the decode step with and without a json_schema constraint on every request (the "small" preset,
                   random weights, greedy, batch 1 and 8): what a constrained token costs in the engine, masking
                   included
  install          the package's own files, and what it pulls in besides (pip metadata)
Grammars: "schema" is a realistic order schema (nested objects, an array of objects, enum, pattern, integer bounds,
a nullable field); "object" is any JSON object ({"type": "object"}). All three libraries get the same JSON format
(", " and ": " between items, no other whitespace: what grammar.py uses). Every token of every document must be
allowed by each mask and EOS allowed at the end, or the library's row reports the failure. One thread; wall-clock
timings (perf_counter_ns).

Writes benchmarks/results/bench_grammar.json and docs/bench_grammar.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.data import corpus_dir  # noqa: E402
from nanoseek.osutil import cpu_model  # noqa: E402
from nanoseek.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "customer": {"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40},
            "vip": {"type": "boolean"}}, "required": ["name", "vip"], "additionalProperties": False},
        "items": {"type": "array", "minItems": 1, "maxItems": 8, "items": {
            "type": "object", "properties": {
                "sku": {"type": "string"},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                "unit_price": {"type": "number"}},
            "required": ["sku", "quantity", "unit_price"], "additionalProperties": False}},
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "customer", "items", "status", "notes"],
    "additionalProperties": False,
}
EOS = 1
LIBRARIES = ("llguidance", "xgrammar", "outlines-core")  # and "nanoseek": llguidance through grammar.py


def documents(n: int) -> list[str]:
    """n valid instances of SCHEMA (also JSON objects), in the schema's property order, as json.dumps writes them."""
    rng = random.Random(0)
    words = ["Ada Lovelace", "Grace Hopper", "Élodie Durand", "李雷", "Bob", "Zoë O'Neil"]
    out = []
    for i in range(n):
        items = [{"sku": f"SKU-{rng.randrange(10**5):05d}", "quantity": rng.randint(1, 999),
                  "unit_price": round(rng.uniform(0.5, 500), 2)} for _ in range(rng.randint(1, 4))]
        doc = {"order_id": f"{''.join(rng.choice('ABCDEFGHIJ') for _ in range(3))}-{rng.randrange(10**6):06d}",
               "customer": {"name": words[i % len(words)], "vip": rng.random() < 0.3},
               "items": items, "status": rng.choice(["pending", "paid", "shipped", "cancelled"]),
               "notes": None if i % 2 else "leave at the door, \"please\""}
        out.append(json.dumps(doc, ensure_ascii=False))
    return out


# --- one adapter per library: prep(tokenizer) -> state; compile(state, schema) -> matcher; mask(m, buf); advance ---
class LLGuidance:
    """llguidance as nanoseek/grammar.py drives it: its tokenizer view and JSON format (", " and ": ", no free
    whitespace); the bare matcher, without the engine's bool unpacking (that is the "nanoseek" row)."""

    name = "llguidance"

    def load(self) -> None:
        import llguidance

        self.llg = llguidance

    def prep(self, tok: Tokenizer):
        from nanoseek.grammar import Prepared

        return Prepared(tok)

    def compile(self, state, schema: dict):
        from nanoseek.grammar import JSON_FORMAT

        grammar = self.llg.LLMatcher.grammar_from_json_schema({**schema, "x-guidance": JSON_FORMAT})
        m = self.llg.LLMatcher(state.ll_tokenizer, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return m

    def fresh(self, state, compiled):  # a copy of a matcher in its initial state (nanoseek's grammar cache)
        return compiled.deep_copy()

    def mask(self, m, buf: torch.Tensor) -> None:
        m.unsafe_compute_mask_ptr(buf.data_ptr(), buf.numel() * 4)

    def advance(self, m, token: int) -> None:
        assert m.consume_token(token), m.get_error()

    def is_allowed(self, m, buf: torch.Tensor, token: int) -> bool:
        return bool((int(buf[token // 32]) >> (token % 32)) & 1)


class Nanoseek(LLGuidance):
    """What the engine pays per constrained token outside the model: GrammarState.allowed() (llguidance's mask,
    unpacked to a bool [V] tensor) and advance(); compile = grammar.json_schema() + new_state()."""

    name = "nanoseek"

    def prep(self, tok: Tokenizer):
        from nanoseek import grammar

        self.tok = tok
        return grammar.prepare(tok)

    def compile(self, state, schema: dict):
        from nanoseek import grammar

        state._compiled.clear()  # a schema seen for the first time
        self.constraint = grammar.json_schema(self.tok, schema)
        return self.constraint.new_state()

    def fresh(self, state, compiled):
        return self.constraint.new_state()

    def mask(self, m, buf: torch.Tensor) -> None:
        self.last = m.allowed()

    def advance(self, m, token: int) -> None:
        m.advance(token)
        assert m.error is None, m.error

    def is_allowed(self, m, buf: torch.Tensor, token: int) -> bool:
        return bool(self.last[token])


class XGrammar:
    name = "xgrammar"

    def load(self) -> None:
        import xgrammar

        self.xgr = xgrammar

    def prep(self, tok: Tokenizer):
        xgrammar = self.xgr
        # raw bytes per id; special tokens (ids 0..6) as empty strings, which xgrammar treats as special
        vocab = [b"" if i < 7 else tok.token_bytes(i) for i in range(tok.vocab_size)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.RAW, vocab_size=tok.vocab_size, stop_token_ids=[EOS])
        return xgrammar.GrammarCompiler(info, max_threads=1)

    def compile(self, state, schema: dict):  # the same JSON format as nanoseek's
        return self.xgr.GrammarMatcher(state.compile_json_schema(json.dumps(schema), any_whitespace=False,
                                                                 separators=(", ", ": ")))

    def fresh(self, state, compiled):  # the compiler's own cache
        return self.xgr.GrammarMatcher(state.compile_json_schema(json.dumps(self.schema), any_whitespace=False,
                                                                 separators=(", ", ": ")))

    def mask(self, m, buf: torch.Tensor) -> None:
        m.fill_next_token_bitmask(buf[None])

    def advance(self, m, token: int) -> None:
        assert m.accept_token(token)

    is_allowed = LLGuidance.is_allowed


class OutlinesCore:
    name = "outlines-core"

    def load(self) -> None:
        import outlines_core

        self.oc = outlines_core

    def prep(self, tok: Tokenizer):
        outlines_core = self.oc
        tokens: dict[bytes, list[int]] = {}
        for i in range(7, tok.vocab_size):  # the special tokens are not text (EOS is given apart)
            tokens.setdefault(tok.token_bytes(i), []).append(i)
        return outlines_core.Vocabulary(EOS, tokens)

    def compile(self, state, schema: dict):
        from outlines_core.json_schema import build_regex_from_schema

        # separators are "," and ":" followed by the whitespace pattern: " ?" gives json.dumps' ", " and ": "
        self.index = self.oc.Index(build_regex_from_schema(json.dumps(schema), whitespace_pattern=" ?"), state)
        return self.oc.Guide(self.index)

    def fresh(self, state, compiled):  # a new Guide over the cached Index
        return self.oc.Guide(self.index)

    def mask(self, m, buf: torch.Tensor) -> None:
        m.write_mask_into(buf.data_ptr(), buf.numel(), 4)

    def advance(self, m, token: int) -> None:
        m.advance(token, return_tokens=False)

    is_allowed = LLGuidance.is_allowed


ADAPTERS = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines-core": OutlinesCore, "nanoseek": Nanoseek}


def measure(adapter, tok: Tokenizer, docs: list[list[int]], repeats: int) -> dict:
    t0 = time.perf_counter()
    adapter.load()
    import_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state = adapter.prep(tok)
    prep_s = time.perf_counter() - t0
    buf = torch.zeros((tok.vocab_size + 31) // 32, dtype=torch.int32)
    out = {"import_ms": import_s * 1e3, "tokenizer_prep_ms": prep_s * 1e3}
    for grammar, schema in (("schema", SCHEMA), ("object", {"type": "object"})):
        adapter.schema = schema
        t0 = time.perf_counter_ns()
        compiled = adapter.compile(state, schema)
        compile_ms = (time.perf_counter_ns() - t0) / 1e6
        again, masks, advances = [], [], []
        for _ in range(repeats):
            for ids in docs:
                t0 = time.perf_counter_ns()
                m = adapter.fresh(state, compiled)  # the compiled form stays pristine
                again.append((time.perf_counter_ns() - t0) / 1e6)
                for t in ids:
                    t0 = time.perf_counter_ns()
                    adapter.mask(m, buf)
                    t1 = time.perf_counter_ns()
                    if not adapter.is_allowed(m, buf, t):
                        raise AssertionError(f"{adapter.name} {grammar}: token {t} ({tok.decode([t])!r}) masked")
                    t2 = time.perf_counter_ns()
                    adapter.advance(m, t)
                    t3 = time.perf_counter_ns()
                    masks.append((t1 - t0) / 1e3)
                    advances.append((t3 - t2) / 1e3)
                adapter.mask(m, buf)
                if not adapter.is_allowed(m, buf, EOS):
                    raise AssertionError(f"{adapter.name} {grammar}: EOS not allowed after a complete document")
        q = statistics.quantiles(masks, n=20)
        out[grammar] = {"compile_ms": compile_ms, "compile_again_ms": statistics.median(again),
                        "mask_us_mean": statistics.fmean(masks), "mask_us_p95": q[-1],
                        "advance_us_mean": statistics.fmean(advances), "tokens": len(masks)}
    return out


def engine_overhead(tok: Tokenizer, repeats: int, new: int = 48) -> dict:
    """Engine decode step, ms, with and without a json_schema constraint on every request: the "small" preset
    (random weights, vocabulary = the tokenizer's), greedy, batch 1 and 8, `repeats` interleaved runs, the best.
    The constrained requests may end early (their grammar complete): the step time is per step, not per request."""
    from nanoseek import Transformer, get_preset
    from nanoseek import grammar as G
    from nanoseek.engine import Engine, SamplingParams

    torch.manual_seed(0)
    model = Transformer(get_preset("small", vocab_size=tok.vocab_size)).eval()
    constraint = G.json_schema(tok, SCHEMA)
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        for bsz in (1, 8):
            for constrained in (False, True):
                engine = Engine(model, max_batch_size=8, max_seq_len=256)
                for i in range(bsz):
                    engine.submit([(7 * i + j) % (tok.vocab_size - 20) + 20 for j in range(32)],
                                  SamplingParams(new, stop_token_ids=[], constraint=constraint if constrained
                                                 else None))
                engine.step()  # the prefill (and a first decode step)
                steps, t0 = 0, time.perf_counter()
                while engine.active:
                    engine.step()
                    steps += 1
                key = f"b{bsz}_{'constrained' if constrained else 'plain'}_ms"
                out.setdefault(key, []).append((time.perf_counter() - t0) / max(steps, 1) * 1e3)
    return {k: min(v) for k, v in out.items()}  # the least disturbed run (a shared machine only adds time)


def install_info(name: str) -> dict:
    dist = md.distribution(name)
    size = sum((f.size or 0) for f in dist.files or [])
    requires = [r.split(";")[0].strip() for r in dist.requires or [] if "extra ==" not in r]
    pulled = {}
    for r in requires:  # what it pulls in beyond nanoseek's own dependencies (torch, numpy, ...)
        dep = r.split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].split("~")[0].strip()
        if dep.lower() in ("torch", "numpy", "typing-extensions", "typing_extensions", "pydantic"):
            continue
        try:
            pulled[dep] = round(sum((f.size or 0) for f in md.distribution(dep).files or []) / 2**20, 1)
        except md.PackageNotFoundError:
            pulled[dep] = None
    return {"version": dist.version, "size_mb": round(size / 2**20, 1), "requires": requires,
            "pulls_in_mb": pulled}


def report(res: dict, path: Path) -> None:
    lines = ["# Grammar libraries for constrained decoding: per-token overhead", "",
             f"Run {res['date']}, `{res['command']}`. Generated by `benchmarks/bench_grammar.py` (column definitions "
             "in its docstring); the choice and how the engine uses it: [engine.md](engine.md#sampling-parameters-"
             "and-constrained-decoding).", "",
             f"- **Machine:** {res['cpu']}, Python {res['python']}, torch {res['torch']}; one thread.",
             f"- **Workload:** nanoseek byte-level BPE tokenizers trained on the bundled corpus; {res['instances']} "
             f"JSON documents x {res['repeats']} repeats per grammar (the canonical tokenization of each), a fresh "
             "matcher per document.", ""]
    lines += ["| library | vocab | import ms | tokenizer prep ms | grammar | compile ms | compile again ms | "
              "mask us/token (mean) | mask p95 | advance us/token | tokens |",
              "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for v in res["vocabularies"]:
        for lib, r in v["libraries"].items():
            if "error" in r:
                lines.append(f"| {lib} | {v['vocab_size']} | — | — | — | failed: {r['error']} | | | | | |")
                continue
            for g in ("schema", "object"):
                x = r[g]
                lines.append(f"| {lib} | {v['vocab_size']} | {r['import_ms']:.0f} | {r['tokenizer_prep_ms']:.1f} | "
                             f"{g} | "
                             f"{x['compile_ms']:.2f} | {x['compile_again_ms']:.2f} | {x['mask_us_mean']:.1f} | "
                             f"{x['mask_us_p95']:.1f} | {x['advance_us_mean']:.1f} | {x['tokens']} |")
    rows = [(v["vocab_size"], v["engine"]) for v in res["vocabularies"] if "engine" in v]
    if rows:
        lines += ["", "Engine decode step (ms; `small` preset, random weights, greedy, every request constrained by "
                  f"the order schema or none; best of {res['engine_repeats']} interleaved runs):", "",
                  "| vocab | b1 plain | b1 constrained | b1 overhead | b8 plain | b8 constrained | b8 overhead |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for vocab, e in rows:
            lines.append(f"| {vocab} | {e['b1_plain_ms']:.3f} | {e['b1_constrained_ms']:.3f} | "
                         f"{e['b1_constrained_ms'] - e['b1_plain_ms']:+.3f} | {e['b8_plain_ms']:.3f} | "
                         f"{e['b8_constrained_ms']:.3f} | {e['b8_constrained_ms'] - e['b8_plain_ms']:+.3f} |")
    lines += ["", "| library | version | own size MB | requires | pulls in besides nanoseek's deps (MB) |",
              "|---|---|---:|---|---|"]
    for lib, i in res["install"].items():
        if lib == "nanoseek":
            continue
        if i is None:
            lines.append(f"| {lib} | not installed | | | |")
            continue
        pulled = ", ".join(f"{k} {v}" for k, v in i["pulls_in_mb"].items()) or "nothing"
        lines.append(f"| {lib} | {i['version']} | {i['size_mb']} | {', '.join(i['requires']) or '—'} | {pulled} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab-sizes", type=int, nargs="+", default=[4096, 16384],
                    help="tokenizers to train on the bundled corpus (default 4096 16384)")
    ap.add_argument("--tokenizer", type=Path, help="use this tokenizer directory instead of training")
    ap.add_argument("--libraries", nargs="+", choices=list(ADAPTERS), default=list(ADAPTERS))
    ap.add_argument("--instances", type=int, default=8, help="JSON documents per grammar (default 8)")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the documents (default 3)")
    ap.add_argument("--no-engine", action="store_true", help="skip the engine decode-step comparison")
    ap.add_argument("--engine-repeats", type=int, default=7, help="interleaved engine runs, best kept (default 7)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_grammar.json")
    ap.add_argument("--report", type=Path, default=ROOT / "docs" / "bench_grammar.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    texts = documents(args.instances)
    corpus = [(corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8"), *texts]
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
           "command": " ".join(["python benchmarks/bench_grammar.py", *sys.argv[1:]]), "cpu": cpu_model(),
           "python": platform.python_version(), "torch": torch.__version__, "instances": args.instances,
           "repeats": args.repeats, "engine_repeats": args.engine_repeats, "schema": SCHEMA, "vocabularies": [],
           "install": {}}
    for lib in args.libraries:
        try:
            res["install"][lib] = install_info("llguidance" if lib == "nanoseek" else lib)
        except md.PackageNotFoundError:
            res["install"][lib] = None
    with tempfile.TemporaryDirectory() as tmp:
        toks = ([Tokenizer.from_dir(args.tokenizer)] if args.tokenizer else
                [train_tokenizer(corpus, v, Path(tmp) / str(v)) for v in args.vocab_sizes])
        for tok in toks:
            docs = [tok.encode(t) for t in texts]
            entry = {"vocab_size": tok.vocab_size, "tokens_per_document": statistics.fmean(map(len, docs)),
                     "libraries": {}}
            for lib in args.libraries:
                if res["install"][lib] is None:
                    continue
                try:
                    entry["libraries"][lib] = r = measure(ADAPTERS[lib](), tok, docs, args.repeats)
                except Exception as e:  # a library that cannot compile the schema is reported, not fatal
                    entry["libraries"][lib] = r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                print(f"vocab {tok.vocab_size} {lib}: {json.dumps(r)}", flush=True)
            if "nanoseek" in args.libraries and not args.no_engine:
                entry["engine"] = engine_overhead(tok, args.engine_repeats)
                print(f"vocab {tok.vocab_size} engine: {json.dumps(entry['engine'])}", flush=True)
            res["vocabularies"].append(entry)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    report(res, args.report)
    print(f"wrote {args.out} and {args.report}")


if __name__ == "__main__":
    main()
