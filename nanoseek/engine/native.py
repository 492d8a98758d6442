"""The native decode path as the engine's default on the CPU: which path a ModelRunner's decode steps take, and why.

`choose(runner, native, compiled)` returns a `kernels.NativeDecoder` over the runner's weights and caches (or None)
and one line saying which path runs and why; the runner keeps both (`runner.native`, `runner.decode_path`). With a
decoder, ModelRunner.decode / verify_forward / mtp_step call it (one C call a step, docs/kernels.md): it returns
logits and hidden states, and sampling, the scheduler, prefill and cache compaction stay in Python, on the same
cache tensors. Without one they run the PyTorch forward (layers.py), the reference and the fallback.

- native=None (auto): native whenever kernels.native_decoder can run the engine (an fp32 CPU engine, fp32 or
  int8/int4 weights, the library built, NANOSEEK_KERNELS not "off"); compile=True keeps its compiled graphs.
- native=True: the same, but a NanoseekError naming the reason where it cannot run.
- native=False: the PyTorch path.
"""

from __future__ import annotations

from nanoseek.errors import NanoseekError
from nanoseek.kernels import NativeDecoder, native_decoder


def choose(runner, native: bool | None, compiled: bool = False) -> tuple[NativeDecoder | None, str]:
    """(a NativeDecoder for the runner, or None; "native avx512 decode (...)" or "PyTorch decode (<why>)")."""
    if native not in (None, True, False):
        raise NanoseekError(f"engine: native must be None (auto), True or False, got {native!r}")
    if native is False:
        return None, "PyTorch decode (native=False)"
    if compiled:
        why = "compile=True runs the decode step as torch.compile'd graphs"
        if native:
            raise NanoseekError(f"engine: native=True and compile=True exclude each other ({why}); choose one")
        return None, f"PyTorch decode ({why})"
    decoder, why = native_decoder(runner)
    if decoder is None and native:
        raise NanoseekError(f"engine: native=True, but the native kernels cannot run this engine: "
                            f"{why.removeprefix('PyTorch decode ')[1:-1]}")
    return decoder, why
