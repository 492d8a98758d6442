"""The package surface: lazy public names, and dependency ranges (no exact pins)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_import_nanoseek_is_light_and_engine_names_are_lazy():
    code = ("import sys, nanoseek\n"
            "assert 'nanoseek.engine' not in sys.modules and 'torch' not in sys.modules, 'eager import'\n"
            "from nanoseek import Engine, SamplingParams, load_model, NanoseekError\n"
            "import nanoseek.engine\n"
            "assert Engine is nanoseek.engine.Engine and SamplingParams is nanoseek.engine.SamplingParams\n"
            "assert {'Engine', 'SamplingParams', 'load_model'} <= set(dir(nanoseek))\n"
            "try:\n    nanoseek.no_such_name\nexcept AttributeError as e:\n    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "module 'nanoseek' has no attribute 'no_such_name'"


def test_dependencies_are_ranges_not_pins():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    assert not [d for d in deps if "==" in d]
    names = {re.split(r"[ <>=!~;\[]", d, maxsplit=1)[0].lower() for d in deps}
    assert {"torch", "pydantic", "transformers"} <= names  # pydantic: the server imports it
    torch_spec = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert ">=" in torch_spec and "<" in torch_spec.replace("<=", "")
