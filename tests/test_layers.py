"""Imports point down the layers: cli -> pipeline/convert/app/batch/prediction -> bundle/store/pulling
-> hub/download -> mil -> errors/paths. Read from the source (every import statement, also those inside functions),
so a lazy import cannot hide an upward dependency or an import cycle across layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import coreml_hub

PACKAGE = Path(coreml_hub.__file__).resolve().parent

# Layer of each module, by the longest matching dotted prefix (relative to coreml_hub). A module
# may import its own layer and the layers below it, never one above.
LAYERS: dict[str, int] = {
    # 0: the bottom: plain helpers that know nothing of the Hub, the store or Core ML
    "errors": 0,
    "paths": 0,
    "atomic": 0,
    "human": 0,
    "version": 0,
    "safeserve": 0,  # serve's and the app's path and body rules: stdlib only
    # 1: the ML Program tooling and runtime
    "mil": 1,
    # 2: the remote side, and what it is described with (variants, plugin discovery)
    "hub": 2,
    "download": 2,
    "archive": 2,
    "layouts": 2,
    "plugins": 2,
    "hookspecs": 2,
    "tokenizer_source": 2,  # where a task's tokenizer files come from: a folder or a Hub repo
    # 3: the local store, pulls, and the checks a variant passes
    "store": 3,
    "pulling": 3,
    "bundle": 3,
    "validate": 3,
    "validate_sd3": 3,
    "validate_refiner": 3,
    "controlnet_io": 3,  # ControlNet and controlled-Unet ports read from bundle descriptions (validate, pull, run)
    "controlnets": 3,  # pulling one ControlNet into a pulled variant
    # 4: what is built on a variant: images, predictions, conversions, servers, batches, the test factory;
    # and the package facade, whose names load those modules on first use (and which arms the
    # coremltools drop-in when COREML_HUB_COREMLTOOLS is set)
    "": 4,
    "pipeline": 4,
    "prediction": 4,
    "coremltools_compat": 4,
    "convert": 4,
    "server": 4,
    "app": 4,
    "batch": 4,
    "tasks": 4,  # what `run` does with a model: the task core that task plugins build on
    "testing": 4,
    # 5: the command line
    "cli": 5,
    "__main__": 5,
    "pytest_plugin": 5,  # an entry point (pytest's), like the command line
}
NAMES = {0: "errors/paths", 1: "mil", 2: "hub/download", 3: "bundle/store/pulling",
         4: "pipeline/convert/app/batch/prediction", 5: "cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer of a module relative to coreml_hub ("" is the package itself, and only it: a
    module missing from LAYERS has no layer rather than the facade's)."""
    if not module:
        return LAYERS[""]
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix]
    return None


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Lines inside `if TYPE_CHECKING:` blocks: those imports never run, they only name types."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(module: str) -> list[tuple[int, str]]:
    """(line, imported coreml_hub module) for every import statement in a module, at any depth.

    `from X import name` counts as importing `X.name` when that is a module, else `X`; a name the
    package facade loads lazily counts as the module that defines it.
    """
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "coreml_hub" or alias.name.startswith("coreml_hub."):
                    found.append((node.lineno, alias.name.removeprefix("coreml_hub").lstrip(".")))
                if alias.name.startswith("coreml_hub_plugins"):
                    found.append((node.lineno, "<plugin>"))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package.split(".") if package else []
            base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            target = ".".join(base + ([node.module] if node.module else []))
        elif node.module and (node.module == "coreml_hub" or node.module.startswith("coreml_hub.")):
            target = node.module.removeprefix("coreml_hub").lstrip(".")
        else:
            if node.module and node.module.startswith("coreml_hub_plugins"):
                found.append((node.lineno, "<plugin>"))
            continue
        for alias in node.names:
            sub = f"{target}.{alias.name}" if target else alias.name
            if _is_module(sub):
                found.append((node.lineno, sub))
            elif target == "" and alias.name in coreml_hub._API:
                found.append((node.lineno, coreml_hub._API[alias.name]))
            else:
                found.append((node.lineno, target))
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in MODULES if layer_of(m) is None]
    assert not unplaced, f"add these modules to LAYERS in {Path(__file__).name}: {unplaced}"


def test_the_map_reads_real_imports() -> None:
    # the parser resolves relative, absolute, nested and facade imports (a guard on the guard)
    cli_imports = {m for _, m in imports_of("cli")}
    assert {"errors", "paths", "plugins"} <= cli_imports
    assert "mil.program" in {m for _, m in imports_of("bundle")}  # imported inside a function
    assert "store" in {m for _, m in imports_of("pipeline.resolve")}  # `from .. import store`
    assert layer_of("no_such_module") is None  # a module missing from LAYERS is caught, not given the facade's
    assert layer_of("pipeline.generate") == LAYERS["pipeline"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    mine = layer_of(module)
    assert mine is not None
    upward = []
    for line, target in imports_of(module):
        if target == "<plugin>":
            upward.append(f"line {line}: imports a built-in plugin by name (the core finds plugins by entry point)")
            continue
        theirs = layer_of(target)
        if theirs is not None and theirs > mine:
            upward.append(f"line {line}: imports {target or 'coreml_hub'} ({NAMES[theirs]}), "
                          f"above its own layer ({NAMES[mine]})")
    assert not upward, f"coreml_hub.{module or '__init__'}:\n  " + "\n  ".join(upward)
