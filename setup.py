"""The optional native decode kernels (nanoseek/kernels/, docs/kernels.md): plain C, no Python or torch headers,
built by `pip install -e .` in seconds. `optional=True`: without a C compiler the install still succeeds and the
engine runs its PyTorch path. Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

KERNELS = "nanoseek/kernels/"

setup(ext_modules=[Extension(
    "nanoseek.kernels._native",  # loaded with ctypes, not imported: it defines no Python module
    sources=[KERNELS + f for f in ("native.c", "isa_generic.c", "isa_avx2.c", "isa_avx512.c")],
    depends=[KERNELS + "native.h", KERNELS + "forward.h"],
    extra_compile_args=["-O3", "-g0", "-std=gnu11", "-fvisibility=hidden", "-fno-math-errno"],  # -g0: 25% faster build
    optional=True,
)])
