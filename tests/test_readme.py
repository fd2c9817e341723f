"""README stays true: it documents every config field with its default, and its quick start runs."""
import dataclasses
import re
from pathlib import Path

from moe_dist import config as C

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _fmt(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def test_every_config_field_is_documented_with_its_default():
    rows = dict(re.findall(r"^\| `([a-z_]+(?:\.[a-z_0-9]+)+)` \| `([^`]*)` \|", README, flags=re.M))
    expected = {}

    def walk(prefix: str, obj) -> None:
        for f in dataclasses.fields(obj):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                walk(f"{prefix}{f.name}.", default)
            else:
                expected[f"{prefix}{f.name}"] = _fmt(default)

    walk("", C.Config())
    missing = sorted(set(expected) - set(rows))
    stale = sorted(set(rows) - set(expected))
    assert not missing, f"README lacks config fields: {missing}"
    assert not stale, f"README documents fields that no longer exist: {stale}"
    wrong = {k: (rows[k], v) for k, v in expected.items() if rows[k] != v}
    assert not wrong, f"README defaults differ from config/schema.py (readme, actual): {wrong}"


def test_quick_start_runs():
    block = README.split("## Library quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    assert "from moe_dist import MoETransformerLM, HybridMoETransformerLM" in block
    scope: dict = {}
    exec(compile(block, "README.md quick start", "exec"), scope)
    assert tuple(scope["logits"].shape) == (2, 64, 10000)
    assert scope["aux_loss"].ndim == 0 and scope["aux_loss"].item() > 0
    assert [i for i, layer in enumerate(scope["hybrid"].layers) if hasattr(layer.ffn, "router")] == [2, 5, 8, 11]


def test_readme_commands_match_ci():
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    command = "bash launch/setup_env.sh --dev && .venv/bin/python -m pytest -q tests"
    assert command in README and command in ci
    assert "bash launch/setup_env.sh && .venv/bin/moe-dist train --config configs/tiny.yaml" in README
