"""The package's layout holds: no import cycle among its modules, nothing outside pipeline/demo/ reaching the demo but
through its door (and nothing in data/ reaching it at all), and the README's file tree true to the files."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.parent.parent.name != "metrics"}


def imported(path: Path) -> set[str]:
    """The project's modules a file imports, at its top or inside functions (`from pipeline import demo` counts)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif (
            isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline") and not node.level
        ):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    return {m for m in out if m in MODULES}


GRAPH = {name: imported(path) for name, path in MODULES.items()}


def test_no_import_cycle_among_the_projects_modules():
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for other in sorted(GRAPH[name]):
            if state.get(other) == 1:
                cycles.append(" -> ".join([*stack[stack.index(other) :], other]))
            elif other not in state:
                visit(other, [*stack, other])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles


def test_the_demo_is_reached_only_through_its_door():
    inside = {name for name in MODULES if name.startswith("pipeline.demo")}
    for name, targets in GRAPH.items():
        if name in inside:
            continue
        assert not (targets & (inside - {"pipeline.demo"})), f"{name} reaches into the demo: {targets & inside}"
        if name.startswith("pipeline.data"):
            assert "pipeline.demo" not in targets, f"{name}: a user's data path imports the demo"
    # and the door is used: the stages that read the demo do so through it
    users = {name for name, targets in GRAPH.items() if "pipeline.demo" in targets} - inside
    assert {
        "pipeline.webtext.stage",
        "pipeline.sft",
        "pipeline.reward.data",
        "pipeline.ppo.loop",
        "pipeline.judge",
    } <= users


def test_readme_file_tree_lists_every_module_of_the_package():
    """The README's layout block names every file of pipeline/ (one line each) and no file that does not exist."""
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Layout") :].split("```")[1]
    listed, folders = set(), []
    for line in block.splitlines():
        name = line.strip().split(" ")[0]
        if not name:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        folders = folders[:depth]
        if name.endswith("/"):
            folders.append(name.rstrip("/"))
            listed.add("/".join([*folders, "__init__.py"]))  # a package's line stands for its __init__.py
        elif name.endswith(".py"):
            listed.add("/".join([*folders, name]))
    package = PACKAGE
    actual = {str(p.relative_to(REPO)) for p in package.rglob("*.py") if p.parent.parent.name != "metrics"}
    listed = {name for name in listed if (REPO / name).is_file() or not name.endswith("__init__.py")}
    assert listed == actual, (
        f"missing from the README: {sorted(actual - listed)}; not in the tree: {sorted(listed - actual)}"
    )
