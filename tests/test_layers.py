"""The package's layering (docs/ARCHITECTURE.md section 2): each subpackage imports only
itself and the layers below it, modules import each other without a cycle, and the model,
diffusion and decoding code never loads ray."""

from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import echo_ray

ROOT = Path(echo_ray.__file__).parent

# Lowest first. A package may import the packages of its own layer's lower layers; packages
# that share a layer never import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config",),
    ("runtime",),
    ("text",),
    ("data",),
    ("model",),
    ("diffusion",),
    ("decode",),
    ("interop",),
    ("distill",),
    ("train", "eval", "serving", "batch", "listener"),
    ("quickstart",),
    ("cli",),
)
# synth is a tool beside the pipeline: it builds archives from data and text, and only the
# command line runs it.
SYNTH_MAY_IMPORT = {"config", "text", "data"}
SYNTH_IMPORTED_BY = {"cli", "quickstart"}
NO_RAY = ("model", "diffusion", "decode", "config", "text")


def _package(module: str) -> str:
    return module.split(".")[1]


def _modules() -> dict[str, Path]:
    """Every module of echo_ray, by dotted name."""
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """echo_ray modules `path` imports (at module level only, or anywhere in it)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("echo_ray."))
    return found


def _layer(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"package {package!r} is in no layer: add it to LAYERS")


def test_every_package_has_a_layer_and_says_what_lives_there():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    for package in packages - {"synth"}:
        _layer(package)
    for package in packages:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"echo_ray/{package}/__init__.py needs its docstring"


def test_lower_layers_never_import_higher_ones():
    bad = []
    for module, path in _modules().items():
        if module == "echo_ray":
            continue
        own = _package(module)
        for target in _imports(path, top_level_only=False):
            other = _package(target)
            if other == own:
                continue
            if own == "synth":
                ok = other in SYNTH_MAY_IMPORT
            elif other == "synth":
                ok = own in SYNTH_IMPORTED_BY
            else:
                ok = _layer(other) < _layer(own)
            if not ok:
                bad.append(f"{module} imports {target}")
    assert not bad, "layering violations:\n" + "\n".join(sorted(bad))


def test_modules_import_each_other_without_a_cycle():
    modules = _modules()
    graph = defaultdict(set)
    for module, path in modules.items():
        for target in _imports(path, top_level_only=True):
            while target not in modules and "." in target:  # `from pkg.mod import name`
                target = target.rsplit(".", 1)[0]
            if target != module:
                graph[module].add(target)
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()

    for module in sorted(modules):
        visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_model_diffusion_decode_config_and_text_never_import_ray():
    names = [m.name for package in NO_RAY
             for m in pkgutil.walk_packages([str(ROOT / package)], f"echo_ray.{package}.")]
    assert len(names) >= 15, names
    code = (
        f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
        "print(','.join(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", out.stdout


def test_the_layer_check_catches_a_violation(tmp_path):
    """The checker itself: a lower layer importing a higher one is reported."""
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from echo_ray.serving.app import build_app\n")
    assert _imports(module, top_level_only=False) == {"echo_ray.serving.app"}
    assert _imports(module, top_level_only=True) == set()
    assert _layer("serving") > _layer("model")
