"""The layers of the package, as the README's Architecture section draws them:
every import points down, no module imports itself back through others, and
each room imports only the rooms below it that the README names."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "blynkota"

# Small shared modules any layer may use.
SHARED = {"config", "logs", "logsafe", "metrics", "numbers", "peeking", "patching"}
# Each room, and the rooms it may import (besides SHARED and itself).
MAY_IMPORT = {
    "protocol": set(),
    "store": set(),
    "tls": set(),
    "http_handler": set(),
    "cluster": {"store"},
    "ota.errors": set(),
    "ota.fleet": {"store", "ota.errors"},
    "ota.firmware": {"store", "protocol", "ota.errors"},
    "ota.rollouts": {"store", "cluster", "ota.errors", "ota.fleet", "ota.firmware"},
    "ota": {
        "store",
        "cluster",
        "protocol",
        "ota.errors",
        "ota.fleet",
        "ota.firmware",
        "ota.rollouts",
    },  # fmt: skip
    "hardware": {"ota", "protocol", "store", "http_handler"},
    "web": {"ota", "ota.errors", "ota.fleet", "ota.rollouts", "store", "http_handler"},
    "status_text": {"store"},
    "cli": {"ota", "store", "status_text"},
    "simulator": {"protocol", "ota.firmware"},
    "app": {"web", "cli", "ota", "ota.firmware", "cluster", "store"},
    "runner": {"hardware", "web", "cluster", "store", "tls"},
    "serving": {"app", "runner", "store"},
    "console": {"app", "cli", "serving", "status_text", "store"},
    "blynkota": {"app"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.relative_to(PACKAGE).parts:
            continue
        parts = ["blynkota", *path.relative_to(PACKAGE).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _room(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "blynkota"
    if (
        parts[1] == "ota"
        and len(parts) > 2
        and parts[2] in ("fleet", "firmware", "rollouts", "errors")
    ):
        return f"ota.{parts[2]}"
    return parts[1]


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Each module's imports of other modules of the package."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        named = graph.setdefault(module, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
                named |= submodules or ({source} & modules.keys())
            elif isinstance(node, ast.Import):
                named |= {alias.name for alias in node.names} & modules.keys()
        named.discard(module)
    return graph


def test_every_import_points_down_to_a_room_the_readme_names():
    graph = _imports(_modules())
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if _room(target) != _room(module)
        and _room(target) not in SHARED
        and _room(target) not in MAY_IMPORT.get(_room(module), set())
        and _room(module) not in SHARED  # the shared modules are checked for circles only
    )
    assert wrong == []
    assert set(MAY_IMPORT) | SHARED >= {_room(module) for module in graph}, "a room not drawn"


def test_no_module_imports_itself_back():
    graph = _imports(_modules())
    circles, state = [], {}  # module -> "open" while its imports are walked, "done" after

    def walk(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                walk(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert circles == []
