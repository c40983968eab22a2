"""Imports point one way: core <- GPT-J pieces <- applications, and no module imports in a cycle.

Every `import gptj...` / `from gptj... import ...` in gptj/, at module level or
inside a function, counts: a lazy import is still a dependency.
"""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gptj"

# The generic core: knows nothing of GPT-J, so any model or task can use it.
CORE = {"trainer", "train_hooks", "partitioning", "checkpoint", "integrity", "storage", "streaming", "metrics", "optimizer",
        "losses", "driver", "runtime"}
# What makes it GPT-J: the model, its weights and formats, data, tokenizer, config checks.
PIECES = {"model", "attention", "lora", "weights", "params_io", "data", "vocab", "vocab_seqio", "config_validation",
          "sampling_ops", "eval_tasks", "tasks", "configs", "convert.hf", "convert.hf_files", "convert.mtj",
          "convert.slim", "convert.peft", "convert", "quantize", "convert.quantize"}
# Everything else is an application (train_lm, sampling, serve, eval_harness, evaluate, plan, ...).


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:
            found[".".join(parts)] = path
    return found


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if module in CORE or top in CORE:
        return 0
    if module in PIECES or top in ("tasks", "configs"):
        return 1
    return 2


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The gptj modules a file imports (names relative to the package)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "gptj" or not name.startswith("gptj."):
                continue
            relative = name[len("gptj."):]
            if relative in modules:
                out.add(relative)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_no_module_imports_one_above_it():
    violations = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
                  for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m)]
    assert not violations, "\n".join(sorted(violations))


def test_core_names_nothing_of_gptj():
    graph = _graph()
    for module in CORE:
        assert graph[module] <= CORE, f"{module} imports {sorted(graph[module] - CORE)}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_checker_sees_lazy_imports_and_cycles():
    """The parser counts a function-level import, so the tests above cannot pass by not looking."""
    graph = _graph()
    assert "eval_harness" in graph["train_lm"]  # imported inside a function only
    assert "checkpoint" in graph["params_io"]


def test_importing_the_trainer_loads_no_gpt_j_code():
    code = ("import sys, gptj.trainer, gptj.driver; "
            "print(sorted(m for m in sys.modules if m.startswith('gptj')))")
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    modules = {m[len("gptj."):] for m in eval(loaded.stdout) if m != "gptj"}
    assert modules <= CORE, f"importing the trainer loaded {sorted(modules - CORE)}"
    assert "model" not in modules


def test_public_api_names_resolve():
    import gptj

    for name in gptj.__all__:
        assert getattr(gptj, name) is not None, name
    assert {"Trainer", "Hook", "Partitioner", "make_mesh", "RULE_SETS", "Checkpointer",
            "train_in_workdir"} <= set(gptj.__all__)
