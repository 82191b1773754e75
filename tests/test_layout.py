"""The repo's layout, read from its imports (ast, nothing is imported): three rooms, each importing only downwards.

- core: the remote-code files the Hub copies (`*_omnivmed.py` reached from configuration/modeling/processing by
  `from .x import y`); they import only each other, at module level, in that relative form.
- library: `omnivmed_tools.py`, what tools share; `omnivmed_benchmarks.py`, the public benchmarks' readers
  (evaluation scores their test splits, the instruction builder reads their train splits and guards the test ones);
  `data_omnivmed.py`, the embedded default's dataset (no command
  line of its own: train_trl.py builds, trains on and scores it; ablate_omnivmed.py and app.py use it too); they import
  the core (through the `omnivmed` package, omnivmed.py) and each other without a cycle.
- tools: the scripts (train_trl.py, evaluate_omnivmed.py, ..., bench/*); each imports the core and the library,
  never another tool (a driver may import the tool it runs: DRIVERS). bench/common.py and bench/shapes.py are the benchmarks' own harness,
  importable by bench scripts only.

Across all rooms: no import cycle, no private name (`_x`) imported from another file, no repo module imported inside
a function (that is how cycles hide); functions may import heavy optional third-party packages. Tests may import
anything and are not read.
"""

import ast
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
CORE_ENTRIES = ("configuration_omnivmed", "modeling_omnivmed", "processing_omnivmed", "collator_omnivmed")
SHIM = "omnivmed"  # omnivmed.py: makes the flat core files one package for a checkout
LIBRARY = ("omnivmed_tools", "omnivmed_benchmarks", "data_omnivmed")
BENCH_HARNESS = ("bench/common", "bench/shapes")
TOOLS = (
    "train_trl",
    "evaluate_omnivmed",
    "chat_omnivmed",
    "app",
    "build_omnivmed",
    "build_instruct_omnivmed",
    "convert_omnivmed",
    "ablate_omnivmed",
    "visualize_pruning",
    "quantize_omnivmed",
)

# A driver runs another tool in-process and may import it: an ablation arm is a training run (train_trl.main with a
# loss-recording callback, and its tower warm-up); bench/run_all.py runs every benchmark script's `run`.
DRIVERS = {
    "ablate_omnivmed": {"train_trl"},
    "bench/run_all": {"bench/bench_processor", "bench/bench_tower", "bench/bench_pruning", "bench/bench_long_video",
                      "bench/bench_llm"},
}

# What is still to be untangled (issue #20). The test fails on anything not listed AND on a listed entry that is gone,
# so the list only shrinks, in the commit that fixes an entry.
KNOWN: set[str] = set()


# ------------------------------------------------------------------------------------------------------------------
# reading the imports
# ------------------------------------------------------------------------------------------------------------------


def repo_modules(root: Path) -> dict[str, Path]:
    """'name' for a root file, 'bench/name' for a benchmark script; tests are not rooms."""
    found = {p.stem: p for p in root.glob("*.py")}
    found.update({f"bench/{p.stem}": p for p in (root / "bench").glob("*.py")})
    return found


def resolve(importer: str, dotted: str, level: int, modules: dict) -> str | None:
    """The repo module an import names, or None for a third-party/stdlib one."""
    parts = dotted.split(".") if dotted else []
    if level:  # `from .x import y`: only the core uses it, inside the Hub package
        return parts[0] if parts and parts[0] in modules else None
    if parts[:1] == [SHIM] and len(parts) > 1:
        return parts[1] if parts[1] in modules else None
    if parts[:1] == ["bench"] and len(parts) > 1:
        return f"bench/{parts[1]}" if f"bench/{parts[1]}" in modules else None
    if importer.startswith("bench/") and f"bench/{parts[0]}" in modules:  # bench scripts put bench/ on sys.path
        return f"bench/{parts[0]}"
    return parts[0] if parts and parts[0] in modules else None


class Imports(ast.NodeVisitor):
    def __init__(self, name: str, modules: dict):
        self.name, self.modules = name, modules
        self.edges = []  # (target, in_function, relative, private names)
        self.aliases = {}  # local name bound to a repo module -> that module
        self.private_attrs = []  # (module, attribute) for `alias._x`
        self.depth = 0

    def _function(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node):
        for alias in node.names:
            target = resolve(self.name, alias.name, 0, self.modules)
            if target:
                self.edges.append((target, self.depth > 0, False, []))
                self.aliases[alias.asname or alias.name.split(".")[0]] = target

    def visit_ImportFrom(self, node):
        target = resolve(self.name, node.module or "", node.level, self.modules)
        if node.module in (SHIM, "bench") and not node.level:  # `from omnivmed import modeling_omnivmed`
            prefix = "bench/" if node.module == "bench" else ""
            for alias in node.names:
                if prefix + alias.name in self.modules:
                    self.edges.append((prefix + alias.name, self.depth > 0, False, []))
                    self.aliases[alias.asname or alias.name] = prefix + alias.name
            return
        if target:
            private = [a.name for a in node.names if is_private(a.name)]
            self.edges.append((target, self.depth > 0, bool(node.level), private))

    def visit_Attribute(self, node):
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and is_private(node.attr):
            self.private_attrs.append((self.aliases[node.value.id], node.attr))
        self.generic_visit(node)


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def read_graph(root: Path) -> tuple[dict, dict]:
    modules = repo_modules(root)
    visitors = {}
    for name, path in modules.items():
        visitor = Imports(name, modules)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        visitors[name] = visitor
    return modules, visitors


def core_modules(visitors: dict) -> set:
    core, todo = set(), [m for m in CORE_ENTRIES if m in visitors]
    while todo:
        name = todo.pop()
        if name not in core:
            core.add(name)
            todo += [t for t, _, relative, _ in visitors[name].edges if relative]
    return core


def room(name: str, core: set) -> str:
    if name in core:
        return "core"
    if name == SHIM:
        return "shim"
    if name in LIBRARY:
        return "library"
    if name in BENCH_HARNESS:
        return "bench harness"
    return "tool"


def cycles(graph: dict) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


ALLOWED = {
    "core": {"core"},
    "shim": set(),
    "library": {"core", "shim", "library"},
    "bench harness": {"core", "shim", "library", "bench harness"},
    "tool": {"core", "shim", "library"},
}


def violations(root: Path) -> set[str]:
    modules, visitors = read_graph(root)
    core = core_modules(visitors)
    found = set()

    def say(importer, text):
        found.add(f"{'bench: ' if importer.startswith('bench/') else ''}{text}")

    graph = {}
    for name, v in visitors.items():
        mine = room(name, core)
        for target, in_function, relative, private in v.edges:
            if target == name:
                continue
            graph.setdefault(name, set()).add(target)
            theirs = room(target, core)
            allowed = ALLOWED[mine] | ({"bench harness"} if name.startswith("bench/") else set())
            if theirs not in allowed and target not in DRIVERS.get(name, ()):
                kind = "tool imports tool" if mine == theirs == "tool" else f"{mine} imports {theirs}"
                say(name, f"{name} -> {target} ({kind})")
            if in_function:
                say(name, f"{name} imports {target} inside a function")
            if mine == "core" and not relative:
                say(name, f"{name} imports {target} without `from .x import y`")
            for attr in private:
                say(name, f"{name} imports private {target}.{attr}")
        for target, attr in v.private_attrs:
            if target != name:
                say(name, f"{name} uses private {target}.{attr}")
    for component in cycles(graph):
        found.add("cycle: " + " <-> ".join(component))
    return found


# ------------------------------------------------------------------------------------------------------------------
# the checker can fail
# ------------------------------------------------------------------------------------------------------------------


def test_checker_reports_each_kind_of_violation(tmp_path):
    files = {
        "omnivmed.py": "import os\n",
        "configuration_omnivmed.py": "X = 1\n",
        "modeling_omnivmed.py": "from .configuration_omnivmed import X\nimport train_trl\n",
        "processing_omnivmed.py": "from .media_omnivmed import load\n",
        "media_omnivmed.py": "def load():\n    from .configuration_omnivmed import X\n",
        "omnivmed_tools.py": "from omnivmed.modeling_omnivmed import X\n",
        "train_trl.py": "import chat_omnivmed\nfrom omnivmed_tools import _helper\n",
        "chat_omnivmed.py": "import omnivmed_tools as t\n\ndef f():\n    import train_trl\n    return t._secret\n",
        "bench/common.py": "",
        "bench/bench_a.py": "from common import Row\nimport numpy\n\ndef g():\n    import torch\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert violations(tmp_path) == {
        "modeling_omnivmed -> train_trl (core imports tool)",
        "modeling_omnivmed imports train_trl without `from .x import y`",
        "media_omnivmed imports configuration_omnivmed inside a function",
        "train_trl -> chat_omnivmed (tool imports tool)",
        "train_trl imports private omnivmed_tools._helper",
        "chat_omnivmed -> train_trl (tool imports tool)",
        "chat_omnivmed imports train_trl inside a function",
        "chat_omnivmed uses private omnivmed_tools._secret",
        "cycle: chat_omnivmed <-> modeling_omnivmed <-> omnivmed_tools <-> train_trl",
    }


def test_rooms_are_those_the_readme_names():
    modules, visitors = read_graph(ROOT)
    core = core_modules(visitors)
    assert set(CORE_ENTRIES) <= core and "pruning_omnivmed" in core and "media_omnivmed" in core
    for tool in TOOLS:
        assert tool in modules and room(tool, core) == "tool", tool
    for library in LIBRARY:
        assert library in modules and room(library, core) == "library", library
    # a tool named like remote code must not be mistaken for core (the Hub copies only what the core imports)
    assert not core & set(TOOLS)


def test_every_core_file_travels_to_the_hub():
    """The folder writer copies REMOTE_CODE_FILES; the Hub (trust_remote_code) needs every file the core imports."""
    tree = ast.parse((ROOT / "omnivmed_tools.py").read_text())
    listed = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["REMOTE_CODE_FILES"]
    )
    _, visitors = read_graph(ROOT)
    assert sorted(name.removesuffix(".py") for name in listed) == sorted(core_modules(visitors))


def test_imports_follow_the_layout():
    found = violations(ROOT)
    new, fixed = sorted(found - KNOWN), sorted(KNOWN - found)
    assert not new, "layout violations:\n" + "\n".join(new)
    assert not fixed, "fixed, remove from KNOWN:\n" + "\n".join(fixed)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
