"""The paged latent cache's bookkeeping: fixed-size blocks, the prefix tree that shares them across requests, LRU
eviction, and the optional on-disk tier (docs/engine.md, "Prefix cache and chunked prefill").

- `BlockPool`: the latent caches are `num_blocks` blocks of `block_size` token positions (forward.ModelRunner owns
  the tensors); each slot's block table row lists the blocks holding its positions 0, bs, 2 bs, ... A block's
  reference count is the number of slot rows holding it. Block 0 is the null block: never handed out, it absorbs
  the writes of padding positions, and rows point at it past their own blocks (always masked).
- `PrefixTree` (prefix_cache=True): a radix tree whose nodes are full blocks, keyed by their block_size token ids
  under their parent (a trie over blocks: a path from the root spells a cached token prefix). A new request reuses
  the blocks of its longest cached prefix (whole blocks, at most (prompt - 1) // bs of them, so at least one prompt
  token is prefilled for its logits) and prefills only the rest. A request's full blocks join the tree when its
  prompt is prefilled and when it finishes; blocks no request holds stay cached and are evicted least recently used
  first, leaves only, when the pool runs out of free blocks.
- `DiskTier` (cache_dir): every block that joins the tree is also written to one file, named by a chained SHA-256 of
  the model identity and the tokens from the start of the prompt to the block's end, and read back when a prompt
  misses in memory. Files are written atomically (a temporary file, then os.replace), so several servers may share
  a directory; a damaged or foreign file is refused (one warning) and treated as a miss. The directory is kept
  under a byte budget by deleting the least recently used files (mtime, touched on every read).

Shapes: L cache layers (the main blocks, then the MTP module's when it is cached), bs block_size, W = c + r (the
latent width).
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import os
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from nanoseek.errors import NanoseekError

BLOCK_SIZE = 16  # token positions per block (docs/engine.md: why 16)


def shared_blocks(a: list[int], b: list[int], block_size: int, most: int) -> int:
    """How many whole blocks (at most `most`) the token lists a and b share from their start."""
    n = 0
    while n < most and (n + 1) * block_size <= min(len(a), len(b)) and \
            a[n * block_size:(n + 1) * block_size] == b[n * block_size:(n + 1) * block_size]:
        n += 1
    return n


class BlockPool:
    """Reference counts and the free list of the cache's blocks; `tree` (a PrefixTree, or None) keeps the
    unreferenced blocks that hold cached prefixes and gives them back, least recently used first, when the free
    list runs dry."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.ref = [0] * num_blocks  # slot rows holding each block
        self.free = list(range(num_blocks - 1, 0, -1))  # a stack; block 0 is the null block, never handed out
        self.tree: PrefixTree | None = None

    def allocate(self, n: int) -> list[int]:
        """n blocks nobody holds (reference count 0, not in the tree), evicting cached prefixes if needed."""
        if len(self.free) < n and self.tree is not None:
            self.tree.evict(n - len(self.free))
        if len(self.free) < n:  # the pool is sized so that every slot's row fits: a bug if it happens
            raise NanoseekError(f"engine: the latent cache has {len(self.free)} free blocks, {n} needed")
        out = self.free[len(self.free) - n:][::-1]  # ascending: a fresh pool gives a slot consecutive blocks
        del self.free[len(self.free) - n:]
        return out

    def hold(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] += 1

    def drop(self, blocks: list[int]) -> None:
        """Release one reference to each block: a block nobody holds goes back to the free list, or stays cached
        (evictable) when the tree holds it."""
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.tree is not None and b in self.tree.node_of:
                    self.tree.unheld(b)
                else:
                    self.free.append(b)

    @property
    def used(self) -> int:
        """Blocks held by a slot or cached in the tree."""
        return self.num_blocks - 1 - len(self.free)


class Node:
    """One full block of a cached prefix: its tokens (the key under its parent) and where its latents are."""

    __slots__ = ("key", "block", "parent", "children", "last_used", "digest")

    def __init__(self, key: tuple[int, ...], block: int, parent: Node | None, digest: bytes | None = None):
        self.key, self.block, self.parent = key, block, parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.last_used = 0
        self.digest = digest  # chained hash of the prefix up to this block's end (the disk tier's file name)


class PrefixTree:
    """The radix tree of cached prefixes over a BlockPool (see the module docstring)."""

    def __init__(self, pool: BlockPool, block_size: int, disk: DiskTier | None = None):
        self.pool, self.bs, self.disk = pool, block_size, disk
        self.root = Node((), -1, None, disk.identity if disk else None)
        self.node_of: dict[int, Node] = {}  # block -> its node
        self.clock = itertools.count(1)  # LRU time: one tick per match / insert
        self.lru: list[tuple[int, int, Node]] = []  # (last_used, tiebreak, node) of evictable leaves, lazily pruned
        self.tiebreak = itertools.count()
        self.disk_hit_blocks = 0
        pool.tree = self

    def __len__(self) -> int:
        """Blocks in the tree."""
        return len(self.node_of)

    def _digest(self, parent: Node, key: tuple[int, ...]) -> bytes:
        return hashlib.sha256(parent.digest + np.asarray(key, dtype="<i4").tobytes()).digest()

    def _evictable(self, node: Node) -> bool:
        return not node.children and self.pool.ref[node.block] == 0

    def _push(self, node: Node) -> None:
        if self._evictable(node):
            heapq.heappush(self.lru, (node.last_used, next(self.tiebreak), node))
            if len(self.lru) > 4 * self.pool.num_blocks:  # mostly stale entries: rebuild from the live leaves
                self.lru = [(n.last_used, next(self.tiebreak), n) for n in self.node_of.values()
                            if self._evictable(n)]
                heapq.heapify(self.lru)

    def unheld(self, block: int) -> None:
        """The pool's last reference to a tree block went away: it may now be evicted."""
        self._push(self.node_of[block])

    def match(self, tokens: list[int], max_blocks: int, load: Callable[[int, object], None] | None = None
              ) -> list[int]:
        """The blocks of the longest cached prefix of tokens, at most max_blocks, with one reference held on each
        (the caller's row). Misses in memory are looked up on disk (`load(block, data)` writes a block's latents
        into the caches)."""
        now, node, blocks = next(self.clock), self.root, []
        for i in range(max_blocks):
            key = tuple(tokens[i * self.bs:(i + 1) * self.bs])
            child = node.children.get(key)
            if child is None:
                if self.disk is None or load is None:
                    break
                digest = self._digest(node, key)
                data = self.disk.load(digest, key)
                if data is None:
                    break
                self.pool.hold(blocks)  # the blocks matched so far must survive the allocation's eviction
                try:
                    (block,) = self.pool.allocate(1)
                finally:
                    self.pool.drop(blocks)
                load(block, data)
                child = self._add(node, key, block, digest)
                self.disk_hit_blocks += 1
            child.last_used = now
            blocks.append(child.block)
            node = child
        self.pool.hold(blocks)
        return blocks

    def _add(self, parent: Node, key: tuple[int, ...], block: int, digest: bytes | None = None) -> Node:
        node = Node(key, block, parent, digest)
        if self.disk is not None and digest is None:
            node.digest = self._digest(parent, key)
        parent.children[key] = node
        self.node_of[block] = node
        return node

    def insert(self, tokens: list[int], blocks: list[int], save: Callable[[int], object] | None = None) -> int:
        """Add the full blocks of tokens (blocks[i] holds tokens[i*bs:(i+1)*bs]) to the tree; a block whose prefix
        is already cached (in another block) stays the caller's. New blocks are written to disk (`save(block)`
        returns a block's latents). Returns the number of blocks added."""
        now, node, added = next(self.clock), self.root, 0
        for i in range(min(len(tokens) // self.bs, len(blocks))):
            key = tuple(tokens[i * self.bs:(i + 1) * self.bs])
            child = node.children.get(key)
            if child is None:
                if blocks[i] in self.node_of:  # the block already caches another prefix: nothing sane to add
                    break
                child = self._add(node, key, blocks[i])
                added += 1
                if self.disk is not None and save is not None:
                    self.disk.store(child.digest, key, save(child.block))
            child.last_used = now
            self._push(child)
            node = child
        return added

    def evict(self, n: int) -> int:
        """Free up to n unreferenced blocks, least recently used leaves first. Returns how many were freed."""
        freed = 0
        while freed < n and self.lru:
            stamp, _, node = heapq.heappop(self.lru)
            if self.node_of.get(node.block) is not node or stamp != node.last_used or not self._evictable(node):
                continue  # a stale entry: the node was used, gained a child or left the tree since
            del self.node_of[node.block]
            del node.parent.children[node.key]
            self.pool.free.append(node.block)
            freed += 1
            if node.parent is not self.root:
                self._push(node.parent)
        return freed

    def cached_tokens(self) -> int:
        return len(self.node_of) * self.bs


# --- the on-disk tier -------------------------------------------------------------------------------------------------
MAGIC = b"NSEEKPC1"  # nanoseek prefix cache, format 1


def model_identity(config: dict, tensors: dict[str, torch.Tensor], **extra: object) -> bytes:
    """A fingerprint of a model and of how the engine computes its latents: the config, `extra` (dtype, quant mode,
    block size, which caches are stored) and every weight tensor's shape with up to 4096 of its values, evenly
    strided (a retrained checkpoint of the same shape differs in them). Keys the disk tier's files."""
    h = hashlib.sha256(json.dumps({"config": config, **{k: str(v) for k, v in extra.items()}}, sort_keys=True,
                                  default=str).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().flatten()
        step = max(1, t.numel() // 4096)
        h.update(f"{name}:{tuple(tensors[name].shape)}:{t.dtype}".encode())
        h.update(t[::step][:4096].float().cpu().numpy().tobytes())
    return h.digest()


class DiskTier:
    """Blocks of latents in files under `path`, one per cached prefix block (see the module docstring).

    File: MAGIC, a little-endian u32 header length, the JSON header (identity, digest, block size, layers, width,
    dtype, the block's tokens), the latents [L, bs, W] in the engine's dtype, then a u32 CRC-32 of everything
    before it."""

    def __init__(self, path: str | Path, identity: bytes, block_size: int, layers: int, width: int,
                 dtype: torch.dtype, budget_bytes: int | None = None):
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NanoseekError(f"cache_dir: cannot create {self.path}: {e.strerror}") from None
        if not os.access(self.path, os.W_OK):
            raise NanoseekError(f"cache_dir: {self.path} is not writable")
        self.identity, self.bs, self.layers, self.width, self.dtype = identity, block_size, layers, width, dtype
        self.budget = budget_bytes
        self.payload_bytes = layers * block_size * width * torch.empty(0, dtype=dtype).element_size()
        self.warned = False
        self.bad: set[bytes] = set()  # digests whose file was refused: the next store overwrites it
        self.bytes = sum(f.stat().st_size for f in self._files())
        self.reads = self.writes = 0

    def _files(self) -> list[Path]:
        return [f for f in self.path.glob("*/*.blk") if f.is_file()]

    def file(self, digest: bytes) -> Path:
        hexd = digest.hex()
        return self.path / hexd[:2] / f"{hexd}.blk"

    def _warn(self, path: Path, why: str) -> None:
        if not self.warned:
            self.warned = True
            print(f"nanoseek: ignoring prefix cache file {path} ({why}); further bad files are ignored silently",
                  file=sys.stderr)

    def load(self, digest: bytes, tokens: tuple[int, ...]) -> torch.Tensor | None:
        """The latents [L, bs, W] cached for this prefix block, or None (no file, or a refused one)."""
        f = self.file(digest)
        try:
            raw = f.read_bytes()
        except OSError:  # no such file (or another process deleted it meanwhile)
            return None
        data = self._parse(raw, digest, tokens, f)
        if data is None:
            self.bad.add(digest)
            return None
        try:
            os.utime(f)  # LRU for the directory's budget
        except OSError:
            pass
        self.reads += 1
        return data

    def _parse(self, raw: bytes, digest: bytes, tokens: tuple[int, ...], f: Path) -> torch.Tensor | None:
        if len(raw) < len(MAGIC) + 8 or raw[:len(MAGIC)] != MAGIC:
            self._warn(f, "not a nanoseek prefix cache file")
            return None
        if zlib.crc32(raw[:-4]) != struct.unpack("<I", raw[-4:])[0]:
            self._warn(f, "damaged: checksum mismatch")
            return None
        (n,) = struct.unpack("<I", raw[len(MAGIC):len(MAGIC) + 4])
        start = len(MAGIC) + 4 + n
        try:
            head = json.loads(raw[len(MAGIC) + 4:start])
        except ValueError:
            self._warn(f, "damaged header")
            return None
        want = dict(identity=self.identity.hex(), digest=digest.hex(), block_size=self.bs, layers=self.layers,
                    width=self.width, dtype=str(self.dtype), tokens=list(tokens))
        wrong = next((k for k, v in want.items() if head.get(k) != v), None)
        if wrong is not None:
            self._warn(f, f"written for another model or prefix: {wrong} differs")
            return None
        if len(raw) - start - 4 != self.payload_bytes:
            self._warn(f, "damaged: wrong size")
            return None
        flat = torch.frombuffer(bytearray(raw[start:-4]), dtype=self.dtype)
        return flat.view(self.layers, self.bs, self.width)

    def store(self, digest: bytes, tokens: tuple[int, ...], data: torch.Tensor) -> None:
        """Write one block's latents [L, bs, W], atomically; an existing (valid) file is left as it is."""
        f = self.file(digest)
        if f.exists() and digest not in self.bad:
            return
        head = json.dumps(dict(identity=self.identity.hex(), digest=digest.hex(), block_size=self.bs,
                               layers=self.layers, width=self.width, dtype=str(self.dtype),
                               tokens=list(tokens))).encode()
        body = MAGIC + struct.pack("<I", len(head)) + head + data.contiguous().view(torch.uint8).numpy().tobytes()
        body += struct.pack("<I", zlib.crc32(body))
        tmp = f.with_name(f"{f.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            f.parent.mkdir(exist_ok=True)
            tmp.write_bytes(body)
            os.replace(tmp, f)  # atomic: a reader sees the old file, the new one, or none
        except OSError as e:
            tmp.unlink(missing_ok=True)
            if not self.warned:
                self.warned = True
                print(f"nanoseek: cannot write the prefix cache file {f} ({e.strerror}); continuing without it",
                      file=sys.stderr)
            return
        self.bad.discard(digest)
        self.writes += 1
        self.bytes += len(body)
        if self.budget is not None and self.bytes > self.budget:
            self._shrink()

    def _shrink(self) -> None:
        """Delete the least recently used files until the directory holds at most 90% of the budget."""
        files = []
        for f in self._files():
            try:
                st = f.stat()
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, f))
        files.sort()
        self.bytes = sum(size for _, size, _ in files)
        for _, size, f in files:
            if self.bytes <= 0.9 * self.budget:
                break
            f.unlink(missing_ok=True)
            self.bytes -= size
