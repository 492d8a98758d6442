"""The package's layering rule, read from the source with `ast` (docs/architecture.md):

    core (config, model, checkpoint, tokenizer, data, tasks, kernels, ...) < engine/ < train/, serving/ < commands/

A module may import only from its own layer or below (imports inside functions count too); train/ and serving/ are
peers that never import each other; commands never import each other and nothing but cli.py imports a command; the
core modules import each other without a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nanoseek"
UPPER = ("engine", "train", "serving", "commands")
# what each layer must not import
FORBIDDEN = {
    "core": ("nanoseek.engine", "nanoseek.train", "nanoseek.serving", "nanoseek.commands", "nanoseek.cli"),
    "engine": ("nanoseek.train", "nanoseek.serving", "nanoseek.commands", "nanoseek.cli"),
    "train": ("nanoseek.serving", "nanoseek.commands", "nanoseek.cli"),
    "serving": ("nanoseek.train", "nanoseek.commands", "nanoseek.cli"),
    "commands": ("nanoseek.cli",),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in UPPER:
        return parts[1]
    return "cli" if module in ("nanoseek.cli", "nanoseek.__main__") else "core"


def imports(path: Path) -> set[str]:
    """Every nanoseek module this file imports (absolute names; `from nanoseek import x` counts as nanoseek.x)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("nanoseek"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanoseek") and not node.level:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {m: {i for i in imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def test_the_layers_exist():
    for pkg in UPPER:
        assert (PACKAGE / pkg / "__init__.py").is_file(), f"nanoseek/{pkg}/ is missing"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_upward_import(module):
    lay = layer(module)
    bad = sorted(i for i in imports(MODULES[module]) if i.startswith(FORBIDDEN.get(lay, ())))
    assert not bad, f"{module} ({lay}) imports {bad}"


def test_only_the_cli_imports_commands():
    """Commands never import each other; their shared helpers (commands/_flags.py: a leading underscore, not a
    command) are theirs alone."""
    for module, path in MODULES.items():
        if layer(module) == "cli":
            continue
        shared_ok = layer(module) == "commands"
        cmds = {i for i in imports(path) if i.startswith("nanoseek.commands.")
                and not (shared_ok and i.split(".")[2].startswith("_"))}
        assert not cmds, f"{module} imports the command(s) {sorted(cmds)}"


def test_commands_live_in_commands():
    """A module with the command interface (add_arguments + run) is a command: it belongs in nanoseek/commands/."""
    for module, path in MODULES.items():
        if layer(module) == "commands":
            continue
        names = {n.name for n in ast.parse(path.read_text(encoding="utf-8")).body if isinstance(n, ast.FunctionDef)}
        assert not {"add_arguments", "run"} <= names, f"{module} looks like a command (add_arguments + run)"


def test_core_has_no_import_cycle():
    core = {m for m in MODULES if layer(m) == "core"}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m] & core):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(core):
        if m not in state:
            visit(m, [m])
