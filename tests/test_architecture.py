"""The house, held against its design (docs/architecture.md): every `import` in cai_lite, module
level or inside a function, read with `ast`, and checked against the floors. Arrows run down only:
the entry (cli, pipeline, stage_plan, planner, estimate, probe, recipe) may use stages; stages use
the machinery and never one another; the machinery never reaches up into a stage or the entry;
config and stage_config are the ground floor. The lab is a wing: it uses only the pure prompt builders and data helpers, and
only evaluate (its oracle) and the pipeline (building its base folder; stage_plan hashing it) read it.

    python -m pytest -q tests/test_architecture.py
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "cai_lite"
ENTRY = {"cli", "__main__", "pipeline", "stage_plan", "planner", "estimate", "probe", "recipe"}
GROUND = {"config", "stage_config", "typed_yaml"}
LAB_MAY_USE = {"constitution", "data", "tiny", "config", "typed_yaml"}  # pure builders, data helpers, tokenizer
READS_LAB = {"stages.evaluate", "pipeline", "stage_plan"}


def _module(path: Path) -> str:
    rel = path.relative_to(PKG).with_suffix("")
    return ".".join(rel.parts).removesuffix(".__init__")


def imports() -> dict[str, set[str]]:
    """Module -> the cai_lite modules it imports (as dotted names relative to cai_lite)."""
    out: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        mod, found = _module(path), set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cai_lite"):
                base = node.module.removeprefix("cai_lite").lstrip(".")
                for alias in node.names:  # `from cai_lite import x` imports module x; `from cai_lite.x import y` imports x
                    name = f"{base}.{alias.name}" if base else alias.name
                    found.add(name if (PKG / (name.replace(".", "/") + ".py")).exists()
                              or (PKG / name.replace(".", "/")).is_dir() else base)
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("cai_lite.") for a in node.names if a.name.startswith("cai_lite.")}
        out[mod] = {m for m in found if m and m != mod}
    return out


def floor(mod: str) -> int:
    if mod.split(".")[0] in ENTRY:
        return 0
    if mod.startswith("stages"):
        return 1
    if mod in GROUND:
        return 3
    return 2


def test_arrows_run_down_only():
    up = [(m, i) for m, deps in imports().items() if not m.startswith("lab") for i in deps
          if not i.startswith("lab") and floor(i) < floor(m)]
    assert up == [], f"imports that run back up a floor: {up}"


def test_stages_never_import_one_another():
    side = [(m, i) for m, deps in imports().items() if m.startswith("stages.") for i in deps if i.startswith("stages.")]
    assert side == []


def test_the_lab_knows_no_stage_and_no_shared_base():
    for m, deps in imports().items():
        if m.startswith("lab"):
            outside = {i for i in deps if not i.startswith("lab")}
            assert outside <= LAB_MAY_USE, f"{m} imports {outside - LAB_MAY_USE}"
        elif any(i.startswith("lab") for i in deps):
            assert m in READS_LAB, f"{m} reads the lab wing"


def test_the_reader_sees_real_imports():
    """The checks above are not vacuous: known arrows are found."""
    got = imports()
    assert "models" in got["stages.sft"] and "stages.sft" in got["stage_plan"] and "stage_plan" in got["pipeline"]
    assert "lab.oracle" in got["stages.evaluate"] and "lab.world" in got["lab.corpus"]
    assert floor("stages.sft") == 1 and floor("models") == 2 and floor("config") == 3 and floor("cli") == 0
