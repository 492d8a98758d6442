"""Prefix caching and chunked prefill (nanoseek/engine/prefix_cache.py, the paged cache in forward.py, the scheduler):
the block pool and the radix tree (matching, reference counts, LRU eviction), outputs identical with and without the
cache (greedy and seeded sampling, a multi-turn chat, shared system prompts, eviction under a small budget), a suffix
prefilled over a cached prefix equal to a full prefill, chunked prefill, the on-disk tier (restart, damaged and
foreign files, the byte budget), and the native kernels on shared, scattered blocks."""

import pytest
import torch

from nanoseek import NanoseekError, Transformer, get_preset
from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.prefix_cache import BlockPool, PrefixTree, shared_blocks
from nanoseek.kernels import NativeDecoder, library

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

BS = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(get_preset("test", initializer_range=0.1)).eval()


def rand(n: int, seed: int) -> list[int]:
    return torch.randint(2, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


SYSTEM = rand(50, 1)  # a shared prefix: 3 whole blocks and 2 tokens
PROMPTS = [SYSTEM + rand(n, 10 + n) for n in (5, 17, 3, 40)]


def plain(model, prompts, n=12, **kw):
    return Engine(model, max_batch_size=4, max_seq_len=160).generate(prompts, n, stop_token_ids=[], **kw)


def cached(model, **kw):
    return Engine(model, **{"max_batch_size": 2, "max_seq_len": 160, "prefix_cache": True, **kw})


# --- the pool and the tree ------------------------------------------------------------------------------------------
def test_tree_match_insert_and_reference_counts():
    pool = BlockPool(10)
    tree = PrefixTree(pool, 4)
    tokens = list(range(11))  # 2 full blocks of 4 and a partial one
    row = pool.allocate(3)
    pool.hold(row)
    assert tree.insert(tokens, row) == 2 and len(tree) == 2  # the partial block is not cached
    assert tree.match(tokens, 5) == row[:2]  # held once more by the matcher
    assert tree.match(tokens[:7] + [99], 5) == row[:1]  # diverges inside the second block
    assert tree.match([5] + tokens, 5) == []
    assert tree.match(tokens, 1) == row[:1]  # at most max_blocks
    assert [pool.ref[b] for b in row] == [4, 2, 1]
    pool.drop(row)
    pool.drop(row[:2])
    pool.drop(row[:1])
    pool.drop(row[:1])
    assert [pool.ref[b] for b in row] == [0, 0, 0]
    assert row[2] in pool.free and row[0] not in pool.free  # cached blocks stay out of the free list
    assert pool.used == 2


def test_tree_dedupes_a_prefix_computed_twice():
    pool = BlockPool(10)
    tree = PrefixTree(pool, 4)
    a, b = pool.allocate(2), pool.allocate(2)
    pool.hold(a)
    pool.hold(b)
    tree.insert(list(range(8)), a)
    assert tree.insert(list(range(8)), b) == 0  # the same prefix: b stays the caller's
    pool.drop(b)
    assert set(b) <= set(pool.free) and tree.match(list(range(8)), 2) == a


def test_lru_eviction_of_unreferenced_leaves():
    pool = BlockPool(7)  # 6 usable blocks
    tree = PrefixTree(pool, 2)

    def cache(tokens):  # what a request does: reuse the cached prefix, fill the rest, cache it all, let go
        hit = tree.match(tokens, len(tokens) // 2)
        row = hit + pool.allocate(len(tokens) // 2 - len(hit))
        tree.insert(tokens, row)
        pool.drop(hit)
        return row

    a, b, c = cache([1, 2, 3, 4]), cache([1, 2, 5, 6]), cache([7, 8])
    assert b[0] == a[0] and len(tree) == 4 and len(pool.free) == 2
    pool.drop(tree.match([1, 2, 3, 4], 2))  # a is now the most recently used
    held = pool.allocate(4)  # two evictions: the least recently used leaves, b's second block and c
    pool.hold(held)
    assert len(tree) == 2 and {b[1], c[0]} <= set(held)
    assert tree.match([7, 8], 1) == []
    pool.drop(tree.match([1, 2, 5, 6], 2) + [])
    hit = tree.match([1, 2, 3, 4], 2)
    assert hit == a
    with pytest.raises(NanoseekError, match="free blocks"):
        pool.allocate(1)  # a's blocks are held: nothing can be evicted
    pool.drop(hit)
    assert sorted(pool.allocate(2)) == sorted(a) and len(tree) == 0  # the leaf first, then its parent


def test_shared_blocks():
    assert shared_blocks(list(range(40)), list(range(33)) + [0], 16, 9) == 2
    assert shared_blocks(list(range(40)), list(range(31)) + [0], 16, 9) == 1
    assert shared_blocks(list(range(40)), list(range(40)), 16, 1) == 1


# --- outputs identical with and without the cache -------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 7])
def test_greedy_and_sampled_outputs_identical(model, chunk):
    engine = cached(model, prefill_chunk=chunk)
    one_by_one = [engine.generate([p], 12, stop_token_ids=[])[0] for p in PROMPTS]
    assert one_by_one == plain(model, PROMPTS)
    s = engine.stats()
    # the first request caches 3 blocks of SYSTEM; each later one reads them (48 tokens)
    assert [s["cached_prompt_tokens"], s["prompt_tokens"]] == [3 * 48, sum(map(len, PROMPTS))]
    assert s["prefill_tokens"] == s["prompt_tokens"] - s["cached_prompt_tokens"]
    assert s["prefix_cache_hit_rate"] == pytest.approx(144 / s["prompt_tokens"])
    sampled = engine.generate(PROMPTS, 12, temperature=0.9, top_p=0.9, seed=5, stop_token_ids=[])
    assert sampled == plain(model, PROMPTS, temperature=0.9, top_p=0.9, seed=5)
    assert engine.generate(PROMPTS, 12, stop_token_ids=[]) == plain(model, PROMPTS)  # now whole prompts hit


@pytest.mark.parametrize("native", [False, pytest.param(True, marks=pytest.mark.skipif(
    library() is None, reason="the native library was not built"))])
def test_outputs_identical_on_each_decode_path(model, native):
    """With and without the cache, decoding through the native kernels or PyTorch: the same tokens."""
    engine = cached(model, native=native)
    assert (engine.runner.native is not None) == native
    out = [engine.generate([p], 12, stop_token_ids=[])[0] for p in PROMPTS]
    ref = Engine(model, max_batch_size=4, max_seq_len=160, native=native)
    assert out == ref.generate(PROMPTS, 12, stop_token_ids=[]) and engine.stats()["cached_prompt_tokens"] == 3 * 48


def test_multi_turn_chat_reuses_its_history(model):
    """Each turn re-sends the history: turn t reads all the whole blocks of turn t-1's prompt and answer."""
    engine, history, hits = cached(model), rand(20, 3), []
    for turn in range(4):
        req = engine.submit(history, SamplingParams(10, stop_token_ids=[]))
        while not req.finished:
            engine.step()
        out = req.output_ids
        assert out == plain(model, [history], 10)[0]
        hits.append(req.cached_tokens)
        history = history + out + rand(6, 100 + turn)
    # the cache holds prompt + answer but the answer's last token (never fed): whole blocks of it
    assert hits == [0, 16, 32, 48]


@pytest.mark.parametrize("expand", [True, False])
def test_suffix_prefill_over_a_cached_prefix_equals_full_prefill(model, expand):
    """Both forms of the attention over cached positions: keys and values expanded (masked SDPA) and absorbed."""
    prompt = rand(70, 4)
    for mode in ("naive", "absorbed"):
        ref = Engine(model, max_batch_size=1, max_seq_len=128, prefill_mode=mode)
        full = ref.prefill([prompt])
        eng = Engine(model, max_batch_size=1, max_seq_len=128, prefill_mode=mode)
        eng.runner.expand_pays = lambda seqlen: expand  # noqa: B023 (the test preset would always absorb)
        eng.prefill([prompt[:32]])
        hidden, _, _, _ = eng.runner.prefill_hidden([prompt[32:]], 0, [32])
        suffix = eng.logits(hidden[:, -1])
        assert (suffix - full).abs().max() < 1e-4 and torch.equal(suffix.argmax(-1), full.argmax(-1))
        assert eng.slot_lengths[0] == 70
        a, b = (e.runner.slot_view(e.caches[1])[0, :70] for e in (eng, ref))
        assert (a - b).abs().max() < 1e-5


def test_requests_sharing_a_prompt_wait_for_its_prefill(model):
    """Requests that arrive together with a shared prefix: the first prefills it, the others wait one step and read
    it (the slots are free, but computing the prefix again would be waste)."""
    engine = cached(model, max_batch_size=4)
    reqs = [engine.submit(p, SamplingParams(5, stop_token_ids=[])) for p in PROMPTS]
    engine.step()
    assert [r.cached_tokens for r in reqs[:1]] == [0] and engine.stats()["waiting"] == 3
    while not all(r.finished for r in reqs):
        engine.step()
    assert [r.cached_tokens for r in reqs] == [0, 48, 48, 48]
    assert [r.output_ids for r in reqs] == plain(model, PROMPTS, 5)


def test_a_fully_cached_prompt_still_prefills_its_last_token(model):
    engine = cached(model)
    p = rand(48, 6)  # exactly 3 blocks
    a = engine.generate([p], 5, stop_token_ids=[])
    req = engine.submit(p, SamplingParams(5, stop_token_ids=[]))
    while not req.finished:
        engine.step()
    assert req.output_ids == a[0] == plain(model, [p], 5)[0]
    assert req.cached_tokens == 32  # 2 of its 3 blocks: the last block holds the token whose logits are needed


def test_eviction_under_a_small_budget(model):
    engine = cached(model, cache_budget_bytes=6 * Engine(model, max_seq_len=160).block_bytes)
    s = engine.stats()
    assert s["cache_blocks"] == 2 * 10 + 6  # 2 slots of 160 positions, and a budget of 6 blocks
    assert s["prefix_cache_budget_bytes"] == 6 * engine.block_bytes
    prompts = [rand(60, 20 + i) for i in range(8)]  # 4 cached blocks each after 8 new tokens: 32 > 26
    for _ in range(2):
        assert [engine.generate([p], 8, stop_token_ids=[])[0] for p in prompts] == plain(model, prompts, 8)
    s = engine.stats()
    # idle slots' blocks cache prefixes too: all 26 but the last request's fifth (partial) block
    assert s["prefix_cache_blocks"] == s["cache_blocks_used"] == 25
    assert s["prefix_cache_bytes"] == 25 * engine.block_bytes
    # least recently used first: the last prompts are still cached, the first ones were evicted
    hits = []
    for p in (prompts[-1], prompts[0]):
        req = engine.submit(p, SamplingParams(3, stop_token_ids=[]))
        while not req.finished:
            engine.step()
        hits.append(req.cached_tokens)
    assert hits == [48, 0]


def test_cancel_mid_prefill_and_errors(model):
    engine = cached(model, prefill_chunk=8)
    busy = engine.submit(rand(3, 50), SamplingParams(20, stop_token_ids=[]))
    engine.step()  # decoding from now on: prompts are prefilled 8 tokens a step
    req = engine.submit(PROMPTS[3], SamplingParams(5))
    engine.step()
    engine.step()  # 16 tokens prefilled
    req.cancel()
    engine.step()
    assert req.finish_reason == "cancelled" and engine.stats()["active_slots"] == 1
    assert engine.stats()["prefix_cache_blocks"] == 1  # the block it had completed is cached
    busy.cancel()
    engine.step()
    assert engine.generate([PROMPTS[3]], 6, stop_token_ids=[]) == plain(model, [PROMPTS[3]], 6)
    with pytest.raises(NanoseekError, match="cache_dir needs prefix_cache"):
        Engine(model, cache_dir="/tmp/x")
    with pytest.raises(NanoseekError, match="prefill_chunk"):
        Engine(model, prefill_chunk=0)
    with pytest.raises(NanoseekError, match="cache_budget_bytes"):
        Engine(model, prefix_cache=True, cache_budget_bytes=-1)


# --- chunked prefill -------------------------------------------------------------------------------------------------
def test_chunked_prefill_keeps_decoding(model):
    """While a long prompt is prefilled in chunks, the decoding requests get a token every step."""
    short = [rand(5, 30 + i) for i in range(3)]
    long = rand(120, 40)
    engine = Engine(model, max_batch_size=4, max_seq_len=160, prefill_chunk=16)
    reqs = [engine.submit(p, SamplingParams(20, stop_token_ids=[])) for p in short]
    engine.step()
    slow = engine.submit(long, SamplingParams(5, stop_token_ids=[]))
    steps = 0
    while not slow.output_ids:
        before = [len(r.output_ids) for r in reqs]
        engine.step()
        steps += 1
        assert [len(r.output_ids) for r in reqs] == [n + 1 for n in before]
    assert steps == 8  # 120 tokens in chunks of 16
    while not all(r.finished for r in reqs + [slow]):
        engine.step()
    assert [r.output_ids for r in reqs + [slow]] == plain(model, short, 20) + plain(model, [long], 5)
    assert engine.stats()["prefill_steps"] == 1 + 8
    alone = engine.submit(long, SamplingParams(2, stop_token_ids=[]))  # nobody decoding: prefilled whole
    engine.step()
    assert alone.output_ids and engine.stats()["prefill_steps"] == 1 + 8 + 1


# --- the disk tier ---------------------------------------------------------------------------------------------------
def test_disk_tier_survives_a_restart(model, tmp_path, capsys):
    prompt = rand(70, 7)
    first = cached(model, cache_dir=tmp_path)
    out = first.generate([prompt], 6, stop_token_ids=[])
    node, files = first.tree.root, []  # the files of the prompt's blocks, in order
    while node.children:
        (node,) = node.children.values()
        files.append(first.tree.disk.file(node.digest))
    assert sorted(files) == sorted(tmp_path.glob("*/*.blk"))
    assert len(files) == 4 and first.stats()["prefix_cache_disk_writes"] == 4  # 70 + 5 fed tokens: 4 blocks
    assert not list(tmp_path.glob("*/*.tmp"))
    size = files[0].stat().st_size
    latents = first.stats()["kv_cache_bytes_per_token"] * BS  # the main layers' (no MTP latents: not speculative)
    assert latents < size < latents + 1024  # and a small header
    again = cached(model, cache_dir=tmp_path)  # a new process, an empty memory cache
    req = again.submit(prompt, SamplingParams(6, stop_token_ids=[]))
    while not req.finished:
        again.step()
    assert [req.output_ids] == out == plain(model, [prompt], 6)
    assert req.cached_tokens == 64 and again.stats()["prefix_cache_disk_hit_blocks"] == 4
    assert capsys.readouterr().err == ""
    # a file written for another model at this prefix's name, then a damaged one: each is refused (one warning),
    # read as a miss, and the block recomputed and written again
    other = Transformer(get_preset("test", initializer_range=0.1, rms_norm_eps=1e-5)).eval()
    foreign = cached(other, cache_dir=tmp_path / "other")
    foreign.generate([prompt], 2, stop_token_ids=[])
    files[1].write_bytes(next((tmp_path / "other").glob("*/*.blk")).read_bytes())
    for damage, hit, why in ((files[1], 16, "another model"), (files[0], 0, "checksum")):
        if damage is files[0]:
            damage.write_bytes(damage.read_bytes()[:-9] + b"x" * 9)
        engine = cached(model, cache_dir=tmp_path)
        req = engine.submit(prompt, SamplingParams(6, stop_token_ids=[]))
        while not req.finished:
            engine.step()
        assert req.output_ids == out[0] and req.cached_tokens == hit
        err = capsys.readouterr().err
        assert err.count("ignoring prefix cache file") == 1 and why in err
        assert engine.stats()["prefix_cache_disk_writes"] == 1  # the refused file, rewritten
    engine = cached(model, cache_dir=tmp_path)
    engine.generate([prompt], 6, stop_token_ids=[])
    assert engine.stats()["prefix_cache_disk_hit_blocks"] == 4 and capsys.readouterr().err == ""


def test_disk_budget_deletes_the_least_recently_used(model, tmp_path):
    engine = cached(model, cache_dir=tmp_path, cache_disk_bytes=1)
    engine.generate([rand(40, 8)], 3, stop_token_ids=[])
    assert engine.stats()["prefix_cache_disk_bytes"] <= 1 and not list(tmp_path.glob("*/*.blk"))
    engine = cached(model, cache_dir=tmp_path)
    engine.generate([rand(40, 8)], 3, stop_token_ids=[])
    size = sum(f.stat().st_size for f in tmp_path.glob("*/*.blk"))
    assert engine.stats()["prefix_cache_disk_bytes"] == size > 0
    with pytest.raises(NanoseekError, match="cache_disk_bytes"):
        cached(model, cache_dir=tmp_path, cache_disk_bytes=0)


# --- the native kernels on paged caches ------------------------------------------------------------------------------
@pytest.mark.skipif(library() is None, reason="the native library was not built")
def test_native_decode_matches_pytorch_on_shared_blocks(model):
    """Slots whose rows share cached blocks and hold scattered ones: the C kernel reads through the same block table
    as PyTorch. Decode steps through native vs PyTorch: same tokens, logits within 1e-4, same latents written."""
    engines = [cached(model, max_batch_size=4) for _ in range(2)]
    for e in engines:
        e.generate([PROMPTS[0]], 3, stop_token_ids=[])  # caches SYSTEM's blocks
        for p in PROMPTS:
            e.submit(p, SamplingParams(30, stop_token_ids=[]))
        e.step()  # prefill (3 requests read SYSTEM from the cache) and the first decode
    runner = engines[0].runner
    assert len({tuple(runner.slot_blocks[i][:3]) for i in range(4)}) == 1  # one shared prefix...
    assert all(runner.slot_blocks[i][3] != runner.slot_blocks[i][2] + 1 for i in (1, 2, 3))  # ... then their own
    ref, eng = engines
    native = NativeDecoder(eng)
    for _ in range(10):
        tokens = torch.tensor([r.output_ids[-1] for r in ref.active])
        logits_ref = ref.decode(tokens)
        logits = native.decode(tokens, eng.slot_lengths[:4])
        eng.runner.set_lengths(0, [m + 1 for m in eng.slot_lengths[:4]])
        assert (logits - logits_ref).abs().max() < 1e-4
        assert torch.equal(logits.argmax(-1), logits_ref.argmax(-1))
        for r, e, t in zip(ref.active, eng.active, logits_ref.argmax(-1).tolist(), strict=True):
            r.output_ids.append(t)
            e.output_ids.append(t)
    for a, b in zip(eng.caches, ref.caches, strict=True):
        assert (a - b).abs().max() < 1e-5


def test_compiled_decode_over_shared_blocks(model, monkeypatch):
    """compile=True's graphs read the cache through the same per-position map of the block table."""
    import nanoseek.engine

    monkeypatch.setattr(nanoseek.engine, "COMPILE_BACKEND", "aot_eager")  # graph capture without codegen: seconds
    engine = cached(model, max_batch_size=4, compile=True)
    engine.generate([PROMPTS[0]], 3, stop_token_ids=[])
    assert engine.generate(PROMPTS, 12, stop_token_ids=[]) == plain(model, PROMPTS)
    assert engine.stats()["cached_prompt_tokens"] == 4 * 48
