"""The package's imports run one way: core ← results ← report ← sweep ← (api, cli), read from the source."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "nsr_sweep"
LEVEL = {"core": 1, "results": 2, "report": 3, "sweep": 4, "": 5}  # "": api.py, cli.py, __init__.py
SCHEMA = {"core/spec.py", "core/schema.py", "core/identity.py", "core/sweepfile.py", "core/controls.py"}
"""The sweep file's schema and a trial's identity: read by the driver before any model code loads."""
MODEL_CODE = {"models", "surface", "cache", "corpus", "forward", "trial", "fit", "patching", "analyses"}


def _imports():
    """(importing module's package, its path, the imported module as a path of names) for every relative import,
    top-level or inside a function."""
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        here = list(rel.parts[:-1])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                names = [a.name for a in node.names]
                yield (here[0] if here else ""), rel, target, names


def test_no_import_runs_back_up_a_level_and_core_imports_only_core():
    upward = []
    for pkg, rel, target, names in _imports():
        if not target:  # `from .. import __version__`: the package's own version string
            assert names == ["__version__"], (rel, names)
            continue
        tpkg = target[0] if target[0] in LEVEL else ""
        if LEVEL[tpkg] > LEVEL[pkg]:
            upward.append(f"{rel} imports {'.'.join(target)}")
    assert upward == []


def test_results_import_nothing_of_trial_or_plotting_and_the_schema_no_model_code():
    bad = []
    for pkg, rel, target, _ in _imports():
        if pkg == "results" and (target[-1] == "trial" or target[:1] == ["report"]):
            bad.append(f"{rel} imports {'.'.join(target)}")
        if rel.as_posix() in SCHEMA and target[-1] in MODEL_CODE:
            bad.append(f"{rel} imports {'.'.join(target)}")
    assert bad == []


def _module(parts: list[str]) -> str:
    """A module's dotted name inside the package (a sub-package stands for its __init__)."""
    return ".".join(parts) or "__init__"


def test_the_modules_import_each_other_without_a_circle():
    """Every relative import, at module level or inside a function, read as an edge between modules: a DAG."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        name = _module([*rel.parts[:-1], rel.stem] if rel.stem != "__init__" else list(rel.parts[:-1]))
        here = list(rel.parts[:-1])
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                for alias in node.names:  # `from . import x` may name a module
                    sub = target + [alias.name]
                    if (PACKAGE.joinpath(*sub).with_suffix(".py")).is_file():
                        deps.add(_module(sub))
                        break
                else:
                    deps.add(_module(target))
    deps_of = {k: {d for d in v if d != k and d in graph} for k, v in graph.items()}
    seen: set[str] = set()

    def visit(n: str, stack: list[str]) -> None:
        assert n not in stack, f"import circle: {' -> '.join(stack + [n])}"
        if n in seen:
            return
        for d in sorted(deps_of[n]):
            visit(d, stack + [n])
        seen.add(n)

    for n in sorted(graph):
        visit(n, [])


def test_no_function_in_sweep_runs_over_60_lines_no_launch_phase_over_40_and_no_sweep_module_over_500():
    """The house rule for the launch's code (DEVELOPERS: short functions, one job a module), read from the source."""
    long = []
    for path in sorted((PACKAGE / "sweep").glob("*.py")):
        source = path.read_text()
        if len(source.splitlines()) > 500:
            long.append(f"{path.name}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.name}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines")
            if isinstance(node, ast.ClassDef) and node.name == "Launch":  # its phases: 40 lines at most
                long += [f"Launch.{f.name}: {f.end_lineno - f.lineno + 1} lines" for f in node.body
                         if isinstance(f, ast.FunctionDef) and f.end_lineno - f.lineno + 1 > 40]
    assert long == []


def test_only_the_cli_and_the_api_spell_out_a_launchs_options():
    """`LaunchOptions` is built by cli.py and api.py and nowhere else; every later step takes it whole."""
    builders = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                owner = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
                if name == "LaunchOptions" or (owner == "LaunchOptions" and name == "of"):
                    builders.add(path.relative_to(PACKAGE).as_posix())
    assert builders == {"cli.py", "api.py"}
