"""The package's dependency rule (STYLE.md): config <- model <- parallel <- checkpoint <- train <- cli, with
data and interop beside model (config and model only), plan beside parallel and report beside cli.
Nothing imports upward, lazily or not: every import statement of every module is read, function
bodies included."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moe_dist"
_BELOW_PARALLEL = {"config", "model", "data", "interop"}
ALLOWED = {  # what each top-level module or subpackage may import from moe_dist
    "config": set(),
    "model": {"config"},
    "data": {"config", "model"},
    "interop": {"config", "model"},
    "parallel": _BELOW_PARALLEL,
    "plan": _BELOW_PARALLEL,
    "checkpoint": _BELOW_PARALLEL | {"parallel"},
    "train": _BELOW_PARALLEL | {"parallel", "plan", "checkpoint"},
    "report": _BELOW_PARALLEL | {"parallel", "plan", "checkpoint", "train"},
    "cli": _BELOW_PARALLEL | {"parallel", "plan", "checkpoint", "train", "report"},
    "__init__": {"config", "model"},
    "__main__": {"cli", "train"},
}


def layer_of(module: str) -> str:
    """'moe_dist.train.setup' -> 'train'; the package itself -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, relative ones resolved."""
    package = list(path.relative_to(root.parent).parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from moe_dist import plan` imports moe_dist.plan
            module = node.module or ""
            if node.level:
                module = ".".join(package[:len(package) - node.level + 1] + ([module] if module else []))
            found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return [(line, m) for line, m in found if m == "moe_dist" or m.startswith("moe_dist.")]


def violations(root: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        # entry points (`python -m moe_dist.train`) sit above everything, like the cli they call
        here = "__main__" if path.name == "__main__.py" else layer_of(".".join(path.relative_to(root.parent).with_suffix("").parts))
        for line, target in imports_of(path, root):
            there = layer_of(target)
            if there != here and there not in ALLOWED[here]:
                bad.append(f"{path.relative_to(root.parent)}:{line}: {here} imports {target}")
    return bad


def test_no_module_imports_upward():
    assert violations() == []


def test_an_upward_import_is_caught(tmp_path):
    """The rule bites: the same check on a copy of the package with one lazy upward import added."""
    import shutil

    copy = tmp_path / "moe_dist"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / "parallel" / "data_parallel.py"
    target.write_text(target.read_text() + "\n\ndef _lazy():\n    from ..train import trainer  # noqa\n")
    assert [v.split(": ", 1)[1] for v in violations(copy)] == ["parallel imports moe_dist.train.trainer"]


def test_every_module_has_a_place_in_the_rule():
    for path in PACKAGE.iterdir():
        if path.name != "__pycache__" and not path.name.startswith("."):
            assert path.stem in ALLOWED, f"{path.name}: give it a place in the dependency rule"
