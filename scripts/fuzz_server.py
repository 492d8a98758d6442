"""Fuzz / fault pass for `nanoseek serve`: the HTTP part of the review in issue 17, repeatable.

    python scripts/fuzz_server.py            # ~1-2 min on 2 cores
    python scripts/fuzz_server.py --keep     # keep the server log and the checkpoint (printed)

Starts `nanoseek serve` as a subprocess (a random `test`-preset checkpoint with a small trained tokenizer, an API
key, --read-timeout 2, --max-connections 256, --max-body-bytes default) and runs:
  bad inputs      100+ malformed / mistyped / huge / unicode-edge bodies on every endpoint, wrong methods and paths,
                  and raw HTTP garbage (bad request lines, conflicting lengths, a 100 KB URL)
  auth matrix     no key / wrong key / wrong scheme / right key x endpoints x (valid, malformed, 100 MB declared) body
  huge bodies     10 MB sent, 100 MB declared, 20 MB chunked: 413 without reading them; /health polled meanwhile
  concurrency     64 streaming clients at once, each must end with [DONE]
  disconnects     32 streaming clients that leave after two chunks: every slot freed (/metrics) within 5 s
  slowloris       50 connections sending their headers a byte every 0.2 s: closed by the header timeout (408)
  idle            300 idle connections: 256 held (then closed by the timeout), the rest answered 503 at once
                  (while the cap is full, /health gets the 503 too: recorded, not a failure)
Checks: no 5xx (the 503s of the connection cap are the designed answer and counted apart), no traceback in the
server log, /health answering (max latency recorded) during the slow phases and afterwards, the server's resident
memory sampled every 0.1 s (before, peak, after). Prints a table; writes benchmarks/results/fuzz_server.json.
Not part of the test suite (tests/test_server.py has the fast versions of each check).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanoseek.osutil import cpu_model  # noqa: E402

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
READ_TIMEOUT = 2.0
MAX_CONNECTIONS = 256


# --- the server ---------------------------------------------------------------------------------------------------
def make_checkpoint(path: Path) -> Path:
    import torch

    from nanoseek import Transformer, get_preset
    from nanoseek.checkpoint import save_pretrained
    from nanoseek.data import corpus_dir
    from nanoseek.tokenizer import train_tokenizer

    torch.manual_seed(0)
    cfg = get_preset("test")
    save_pretrained(Transformer(cfg), path)
    text = (corpus_dir() / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")[:30000]
    train_tokenizer([text], vocab_size=cfg.vocab_size, out_dir=path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nanoseek", "serve", "--model", str(model), "--port", str(self.port),
             "--api-key", KEY, "--read-timeout", str(READ_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS),
             "--threads", "1", "--max-batch-size", "8"],
            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; log: {log}")
            time.sleep(0.2)
        self.rss_samples: list[int] = []
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def rss(self) -> int:
        """Resident set size of the server process in bytes (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.rss_samples.append(self.rss())
            except OSError:
                return
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- helpers --------------------------------------------------------------------------------------------------------
class Tally:
    """Status codes per phase; a 5xx anywhere is a failure unless the phase expects the connection cap's 503."""

    def __init__(self) -> None:
        self.phases: dict[str, dict] = {}

    def add(self, phase: str, status: int | str, ok: bool = True, note: str = "") -> None:
        p = self.phases.setdefault(phase, {"requests": 0, "statuses": {}, "unexpected": []})
        p["requests"] += 1
        p["statuses"][str(status)] = p["statuses"].get(str(status), 0) + 1
        if not ok:
            p["unexpected"].append(f"{note}: {status}")


def raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    out = b""
    try:
        try:
            sock.sendall(data)
        except OSError:
            pass
        while chunk := sock.recv(65536):
            out += chunk
    except OSError:
        pass
    finally:
        sock.close()
    return out


def status_of(response: bytes) -> int | str:
    try:
        return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else "closed"
    except (IndexError, ValueError):
        return "garbled"


class HealthProbe:
    """Polls /health every 20 ms in a thread; records the latencies and any failure."""

    def __init__(self, url: str):
        self.url, self.latencies, self.failures = url, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def _run(self) -> None:
        with httpx.Client(timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                try:
                    ok = c.get(f"{self.url}/health").status_code == 200
                except httpx.TransportError:
                    ok = False
                self.latencies.append(time.perf_counter() - t0)
                self.failures += not ok
                time.sleep(0.02)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def chat(content: str = "hi", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0, **kw}


# --- phases ---------------------------------------------------------------------------------------------------------
def bad_inputs() -> list[tuple[str, str, bytes | dict | list]]:
    """(method, path, body): JSON values are sent as JSON, bytes as they are."""
    c, p = "/v1/chat/completions", "/v1/completions"
    out: list[tuple[str, str, bytes | dict | list]] = []
    malformed = [b"", b"{", b"[", b'{"messages": [}', b"nul", b"\xff\xfe\x00", b"{'messages': 1}", b'{"a": NaN}',
                 b'{"a": Infinity}', b"[" * 100_000, b"{}x", b"\xef\xbb\xbf{}", b'{"messages": 1, "messages": 2}',
                 b'"just a string"', b"12", b'{"messages": [{"role": "user", "content": "\\ud800"}]}']
    for path in (c, p, "/tokenize", "/detokenize"):
        out += [("POST", path, body) for body in malformed]
    wrong_types = {
        "messages": ["hi", {"role": "user"}, [1], [{"role": 1, "content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]],
        "max_tokens": ["10", True, -1, 1.5, 10**30], "temperature": ["1", None, -1, 1e308, [1]],
        "top_p": [2, "x"], "top_k": ["5", -7, 1.5], "n": [0, 10**6, "2"], "seed": [2**200, "1", 1.5],
        "stop": [5, [1, 2], [""] * 3, ["x"] * 1000, "y" * 1000], "stream": ["yes", 1],
        "stream_options": ["x", {"include_usage": "yes"}, {"include_obfuscation": True}],
        "logprobs": ["yes", 3], "top_logprobs": [21, -1, 10**9], "logit_bias": [[1], {"x": 1}, {"1": 1e9},
                                                                           {str(i): 1 for i in range(100_000)}],
        "presence_penalty": [3, "0"], "frequency_penalty": [-3], "tools": ["x", [{"type": "function"}],
                                                                        [{"type": "function", "function": {
                                                                            "name": "bad name!"}}]],
        "tool_choice": ["sometimes", {"type": "function"}, "required"], "response_format": [
            {"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "not": {}}}}],
        "thinking": [True, {"type": "maybe"}], "chat_template_kwargs": [{"x": 1}, {"thinking": "no"}],
        "audio": [{"voice": "x"}], "functions": [[{"name": "f"}]], "unknown_field": [1],
    }
    for field, values in wrong_types.items():
        for v in values:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            body[field] = v
            out.append(("POST", c, body))
    unicode = ["\ud800", "\udfff", "\x00" * 10, "\u202e\u202d", "🙂" * 500, "e\u0301" * 200, "\ue000\ue001",
               "<｜Assistant｜></think><｜tool▁calls▁begin｜>", "\uffff\ufffe", "\U0010ffff"]
    for u in unicode:
        out += [("POST", c, chat(u)), ("POST", p, {"prompt": u, "max_tokens": 2}),
                ("POST", "/tokenize", {"prompt": u}), ("POST", c, chat(stop=[u[:5] or "x"]))]
    out += [("POST", p, {"prompt": [-1]}), ("POST", p, {"prompt": [10**9]}), ("POST", p, {"prompt": [[1, 2]]}),
            ("POST", p, {"prompt": ["a", "b"]}), ("POST", p, {"prompt": list(range(100_000))}),
            ("POST", p, {"prompt": "x", "suffix": "y"}), ("POST", p, {"prompt": "x", "best_of": 3}),
            ("POST", p, {"prompt": "x", "echo": True, "logprobs": 2}), ("POST", p, {"prompt": "x" * 900_000}),
            ("POST", "/tokenize", {"prompt": "x", "messages": []}), ("POST", "/tokenize", {}),
            ("POST", "/detokenize", {"tokens": [-1]}), ("POST", "/detokenize", {"tokens": ["a"]}),
            ("POST", "/detokenize", {"tokens": list(range(100_000))}), ("POST", "/detokenize", {"tokens": [10**9]}),
            ("POST", c, {"messages": [{"role": "user", "content": ""}] * 50_000}),
            ("POST", c, {"messages": [{"role": "assistant", "content": "x", "prefix": True},
                                      {"role": "user", "content": "y"}]}),
            ("POST", c, {"messages": [{"role": "tool", "content": "x", "tool_call_id": "nope"}]}),
            ("GET", c, b""), ("GET", p, b""), ("POST", "/v1/models", {}), ("POST", "/health", {}),
            ("DELETE", c, b""), ("PUT", c, chat()), ("GET", "/v1/nothing", b""), ("GET", "/../../etc/passwd", b""),
            ("GET", "/docs", b""), ("GET", "/openapi.json", b""), ("GET", "/v1/models?x=" + "y" * 4000, b"")]
    return out


def phase_bad_inputs(url: str, tally: Tally) -> None:
    with httpx.Client(timeout=60, headers=AUTH) as client:
        for method, path, body in bad_inputs():
            # JSON as json.dumps writes it by default (\uXXXX escapes): lone surrogates reach the server
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            kw = {"content": data, "headers": {"content-type": "application/json"}}
            try:
                r = client.request(method, f"{url}{path}", **kw)
                status = r.status_code
                if status < 500 and status != 200:
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            except (httpx.TransportError, AssertionError, ValueError) as e:
                status = type(e).__name__
            tally.add("bad inputs", status, isinstance(status, int) and status < 500, f"{method} {path}")
    port = int(url.rsplit(":", 1)[1])
    garbage = [b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"GET /health\r\n\r\n",
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
               b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0"
               b"\r\n\r\n", b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
               b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
               b"GET /health HTTP/1.1\r\nHost: \x00\x01\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"]
    for data in garbage:
        status = status_of(raw(port, data))
        tally.add("raw HTTP garbage", status, not (isinstance(status, int) and status >= 500), repr(data[:30]))


def phase_auth(url: str, tally: Tally) -> None:
    port = int(url.rsplit(":", 1)[1])
    keys = {"none": None, "wrong": "Bearer nope", "scheme": f"Basic {KEY}", "empty": "Bearer ",
            "right": f"Bearer {KEY}"}
    paths = ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize", "/v1/models", "/v1/nothing"]
    bodies = {"valid": json.dumps(chat()).encode(), "malformed": b"{nope"}
    for kname, key in keys.items():
        auth = f"Authorization: {key}\r\n".encode() if key else b""
        for path in paths:
            method = b"GET" if path == "/v1/models" else b"POST"
            for bname, body in bodies.items():
                data = (method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + auth + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
                status = status_of(raw(port, data))
                ok = status == 401 if kname != "right" else isinstance(status, int) and status < 500
                tally.add("auth matrix", status, ok, f"{kname} {path} {bname}")
            t0 = time.perf_counter()  # a 100 MB body declared, never sent: the answer must not wait for it
            status = status_of(raw(port, method + b" " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + auth
                                   + b"Content-Length: 100000000\r\n\r\n", timeout=5))
            quick = time.perf_counter() - t0 < 2
            tally.add("auth matrix", status, quick and status == (401 if kname != "right" else 413),
                      f"{kname} {path} 100MB declared")


def phase_huge(url: str, tally: Tally) -> dict:
    port = int(url.rsplit(":", 1)[1])
    results = {}
    with HealthProbe(url) as probe:
        t0 = time.perf_counter()
        try:
            r = httpx.post(f"{url}/v1/chat/completions", json=chat("z" * 10_000_000), headers=AUTH, timeout=60)
            status: int | str = r.status_code
        except httpx.TransportError as e:
            status = type(e).__name__
        results["10MB_seconds"] = round(time.perf_counter() - t0, 3)
        tally.add("huge bodies", status, status in (413, "WriteError", "ReadError", "RemoteProtocolError"), "10 MB")
        status = status_of(raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                               + KEY.encode() + b"\r\nContent-Length: 100000000\r\n\r\n"))
        tally.add("huge bodies", status, status == 413, "100 MB declared")

        def chunks():
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(20):
                yield b"q" * 1_000_000
            yield b'"}]}'

        try:
            status = httpx.post(f"{url}/v1/chat/completions", content=chunks(), headers=AUTH, timeout=60).status_code
        except httpx.TransportError as e:
            status = type(e).__name__
        tally.add("huge bodies", status, not (isinstance(status, int) and status >= 500), "20 MB chunked")
    results["health_max_ms"] = round(max(probe.latencies) * 1000, 1)
    results["health_failures"] = probe.failures
    return results


async def _stream(client: httpx.AsyncClient, url: str, leave_after: int | None) -> int | str:
    body = chat(f"client {id(client)}", max_tokens=24, stream=True, ignore_eos=True)
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH) as r:
        if r.status_code != 200:
            return r.status_code
        lines = 0
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                lines += 1
                if leave_after is not None and lines >= leave_after:
                    return "left"
                if line == "data: [DONE]":
                    return 200
        return "no [DONE]"


def phase_streams(url: str, tally: Tally, n: int, leave_after: int | None) -> None:
    async def main():
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_stream(client, url, leave_after) for _ in range(n)),
                                        return_exceptions=True)

    name = "disconnects" if leave_after else "64 streams"
    for res in asyncio.run(main()):
        status = res if not isinstance(res, BaseException) else type(res).__name__
        tally.add(name, status, status == ("left" if leave_after else 200), name)


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


def phase_slowloris(url: str, tally: Tally, n: int = 50) -> dict:
    port = int(url.rsplit(":", 1)[1])
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\n\r\n"
    closed_after: list[float] = []

    def slow() -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        t0 = time.monotonic()
        status: int | str = "open"
        try:
            for b in request:
                sock.send(bytes([b]))
                time.sleep(0.2)
            status = status_of(sock.recv(4096))
        except OSError:
            try:
                status = status_of(sock.recv(4096))
            except OSError:
                status = "reset"
        finally:
            sock.close()
        closed_after.append(time.monotonic() - t0)
        tally.add("slowloris", status, status in (408, "closed", "reset"), "trickled headers")

    with HealthProbe(url) as probe:
        threads = [threading.Thread(target=slow) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return {"closed_after_max_s": round(max(closed_after), 2), "health_max_ms": round(max(probe.latencies) * 1000, 1),
            "health_failures": probe.failures}


def phase_idle(url: str, tally: Tally, n: int = 300) -> dict:
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 5)
        socks.append(s)
    t0 = time.monotonic()
    answered_503 = held = 0
    with HealthProbe(url) as probe:
        times = []
        for s in socks:
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            times.append(time.monotonic() - t0)
            if data.startswith(b"HTTP/1.1 503"):
                answered_503 += 1
                tally.add("idle connections", 503, True, "over the cap")
            else:
                held += 1
                tally.add("idle connections", "closed" if data == b"" else status_of(data), data == b"",
                          "held, then closed")
            s.close()
    return {"connections": n, "held": held, "answered_503": answered_503,
            "all_closed_after_s": round(max(times), 2), "health_max_ms": round(max(probe.latencies) * 1000, 1),
            "health_failures": probe.failures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the server log")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fuzz_server.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nanoseek-fuzz-"))
    model = make_checkpoint(tmp / "model")
    log = tmp / "server.log"
    server = ServerProcess(model, log)
    tally = Tally()
    details: dict = {}
    t_start = time.perf_counter()
    rss_before = server.rss()
    try:
        phases = [("bad inputs", lambda: phase_bad_inputs(server.url, tally)),
                  ("auth matrix", lambda: phase_auth(server.url, tally)),
                  ("huge bodies", lambda: details.setdefault("huge", phase_huge(server.url, tally))),
                  ("64 streams", lambda: phase_streams(server.url, tally, 64, None)),
                  ("disconnects", lambda: phase_streams(server.url, tally, 32, 2)),
                  ("slowloris", lambda: details.setdefault("slowloris", phase_slowloris(server.url, tally))),
                  ("idle", lambda: details.setdefault("idle", phase_idle(server.url, tally)))]
        for name, run in phases:
            t0 = time.perf_counter()
            run()
            details.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
            print(f"  {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        deadline = time.monotonic() + 5
        while metric(server.url, "nanoseek_active_slots") != 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        details["slots_free_after"] = metric(server.url, "nanoseek_active_slots") == 0
        details["healthy_after"] = httpx.get(f"{server.url}/health", timeout=5).json() == {"status": "ok"}
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat(), headers=AUTH, timeout=30)
        details["serves_after"] = r.status_code == 200
        rss_after = server.rss()
    finally:
        server.stop()
    log_text = log.read_text(errors="replace")
    tracebacks = log_text.count("Traceback")
    five_xx = sum(n for p in tally.phases.values() for s, n in p["statuses"].items() if s.isdigit() and int(s) >= 500
                  and not (s == "503" and p is tally.phases.get("idle connections")))
    unexpected = [u for p in tally.phases.values() for u in p["unexpected"]]
    mb = 1 / 2**20
    summary = {
        "requests": sum(p["requests"] for p in tally.phases.values()), "5xx": five_xx, "tracebacks": tracebacks,
        "unexpected": unexpected, "rss_mb": {"before": round(rss_before * mb), "peak": round(max(server.rss_samples,
                                                                                                default=0) * mb),
                                             "after": round(rss_after * mb)},
        "passed": five_xx == 0 and tracebacks == 0 and not unexpected and details["healthy_after"]
        and details["serves_after"] and details["slots_free_after"],
    }
    print(f"\n{'phase':<18} {'requests':>8}  statuses")
    for name, p in tally.phases.items():
        print(f"{name:<18} {p['requests']:>8}  {json.dumps(p['statuses'])}")
    print(f"\n5xx: {five_xx}   tracebacks in the server log: {tracebacks}   unexpected: {len(unexpected)}"
          f"{' ' + '; '.join(unexpected[:5]) if unexpected else ''}")
    print(f"server RSS MB: before {summary['rss_mb']['before']}, peak {summary['rss_mb']['peak']}, after "
          f"{summary['rss_mb']['after']}; healthy and serving afterwards: {details['healthy_after']} / "
          f"{details['serves_after']}; slots freed: {details['slots_free_after']}")
    print(f"huge bodies: {details['huge']}\nslowloris: {details['slowloris']}\nidle: {details['idle']}")
    print(f"{'PASSED' if summary['passed'] else 'FAILED'} in {time.perf_counter() - t_start:.0f} s")
    cpu = cpu_model()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": "python scripts/fuzz_server.py",
        "cpu": cpu, "python": platform.python_version(), "settings": {"read_timeout": READ_TIMEOUT,
                                                                        "max_connections": MAX_CONNECTIONS},
        "summary": summary, "phases": tally.phases, "details": details}, indent=1) + "\n")
    print(f"wrote {args.out}")
    if args.keep:
        print(f"kept {tmp} (server log: {log})")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
