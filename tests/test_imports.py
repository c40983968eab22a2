"""Imports point one way, and a module's folder is its layer.

    errors.py                      imports nothing of gptj; every layer may raise its errors
    core/                          the generic core: trainer, checkpoints, partitioning, ... (no word of GPT-J)
    model/, data/, weights/        the GPT-J pieces; weights/ builds on model/, data/ on nothing but core/
    everything else                the applications: the top-level modules of gptj/ (recipe, train, plan,
                                   settings, ...), inference/, evaluation/, convert/ (the converter CLI,
                                   above the weights service), configs/

A new file is placed by where it lives: no table of module names to keep up.
Every `import gptj...` / `from gptj... import ...`, at module level or inside a
function, counts: a lazy import is still a dependency.
"""

import ast
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gptj"

APPLICATIONS = 3
# The folders below the applications, their layer, and the folders each may import besides its own.
FOLDER_LAYERS = {"core": 1, "model": 2, "data": 2, "weights": 2}
PIECES_BUILD_ON = {"model": {"core"}, "data": {"core"}, "weights": {"core", "model"}}


def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module names relative to the package ('core.trainer', 'data.tasks', ...) -> file."""
    found = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _folder(module: str, modules: dict[str, pathlib.Path]) -> str:
    """The top-level folder a module lives in ('' for a module directly in gptj/)."""
    top = module.split(".")[0]
    is_folder = (modules.get(top) or modules[module]).name == "__init__.py" or "." in module
    return top if is_folder else ""


def _layer(module: str, modules: dict[str, pathlib.Path]) -> int:
    if module == "errors":
        return 0
    return FOLDER_LAYERS.get(_folder(module, modules), APPLICATIONS)


def _imports(path: pathlib.Path, modules) -> set[str]:
    """The gptj modules a file imports (names relative to the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from gptj.inference import server` imports the module; `from gptj.model.lora import merge`, a name
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}"[len("gptj."):] in modules
                     else node.module for a in node.names]
        else:
            continue
        for name in names:
            if name == "gptj" or not name.startswith("gptj."):
                continue
            relative = name[len("gptj."):]
            if relative in modules:
                out.add(relative)
    return out


def _graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def layer_violations(package: pathlib.Path = PACKAGE) -> list[str]:
    """Every import that points up a layer, or into a sibling folder of the pieces it does not build on."""
    modules = _modules(package)
    found = []
    for module, deps in _graph(package).items():
        for dep in deps:
            here, there = _layer(module, modules), _layer(dep, modules)
            folder, dep_folder = _folder(module, modules), _folder(dep, modules)
            if there > here:
                found.append(f"{module} (layer {here}) imports {dep} (layer {there})")
            elif (folder in PIECES_BUILD_ON and there == here and dep_folder != folder
                  and dep_folder not in PIECES_BUILD_ON[folder]):
                found.append(f"{module} ({folder}/) imports {dep} ({dep_folder}/), which {folder}/ does not build on")
            elif module != "errors" and module.split(".")[0] == "errors":
                found.append(f"{module} must import nothing of gptj")
    return sorted(found)


def import_cycle(package: pathlib.Path = PACKAGE) -> list[str] | None:
    """One import cycle (as a path of modules), or None."""
    graph = _graph(package)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                cycle = visit(dep)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def test_no_module_imports_a_higher_layer():
    violations = layer_violations()
    assert not violations, "\n".join(violations)


def test_errors_import_nothing_of_gptj():
    assert _graph()["errors"] == set()


def test_no_import_cycles():
    cycle = import_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_planted_upward_import_and_cycle_are_caught(tmp_path):
    """The checker on a copy of the package with lazy imports planted: upward, into a cycle, sideways."""
    copy = tmp_path / "gptj"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert layer_violations(copy) == [] and import_cycle(copy) is None
    trainer = copy / "core" / "trainer.py"
    trainer.write_text(trainer.read_text() + "\n\ndef _planted():\n    from gptj.inference import server\n")
    assert layer_violations(copy) == ["core.trainer (layer 1) imports inference.server (layer 3)"]

    partitioning = copy / "core" / "partitioning.py"  # a cycle inside one layer: the trainer imports partitioning
    partitioning.write_text(partitioning.read_text() + "\n\ndef _planted():\n    from gptj.core import trainer\n")
    assert set(import_cycle(copy)) == {"core.partitioning", "core.trainer"}

    data = copy / "data" / "pipeline.py"  # a piece reaching into a sibling it does not build on
    data.write_text(data.read_text() + "\n\ndef _planted():\n    from gptj.model import transformer\n")
    assert "data.pipeline (data/) imports model.transformer (model/), which data/ does not build on" in \
        layer_violations(copy)


def test_the_checker_sees_lazy_imports_and_folders():
    """The parser counts a function-level import, and a folder's modules take its layer."""
    graph, modules = _graph(), _modules(PACKAGE)
    assert "evaluation.harness" in graph["train"]  # imported inside a function only
    assert "core.checkpoint" in graph["weights.params_dir"]
    assert {_layer(m, modules) for m in ("core.trainer", "model.transformer", "weights.formats.hf",
                                          "data.tasks.sft", "convert.slim", "plan", "inference.server")} == \
        {1, 2, APPLICATIONS}
    assert _layer("weights.formats.hf", modules) == 2 and _layer("convert.quantize", modules) == APPLICATIONS


def test_scaling_is_imported_by_no_module_of_gptj():
    """The scaling model is an application of its own (python -m gptj.scaling) and a benchmark's helper."""
    importers = sorted(m for m, deps in _graph().items() if "scaling" in deps)
    assert importers == [], importers


def test_importing_the_trainer_loads_no_gpt_j_code():
    code = ("import sys, gptj.core.trainer, gptj.core.driver; "
            "print(sorted(m for m in sys.modules if m.startswith('gptj')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = {m[len("gptj."):] for m in eval(loaded.stdout) if m != "gptj"}
    outside = sorted(m for m in modules if m != "errors" and m.split(".")[0] != "core")
    assert not outside, f"importing the trainer loaded {outside}"


def test_public_api_names_resolve():
    import gptj

    for name in gptj.__all__:
        assert getattr(gptj, name) is not None, name
    assert {"Trainer", "Hook", "Partitioner", "make_mesh", "RULE_SETS", "Checkpointer",
            "train_in_workdir", "GptjError", "ConfigError", "WeightsError"} <= set(gptj.__all__)
    assert all(issubclass(getattr(gptj, name), gptj.GptjError) for name in gptj.__all__ if name.endswith("Error"))
