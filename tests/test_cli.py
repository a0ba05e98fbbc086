"""The command line as users type it: `--config`, `--key value`, `--help` with a recipe, parent
recipes (`defaults:`), shipped files found from any directory, and the wheel that `pip install .`
builds (recipes, constitutions and prompt lists inside, a `cai-lite` console script).

    python -m pytest tests/test_cli.py -q
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cai_lite.config import RECIPES, SHIPPED
from cai_lite.recipe import help_text, load_config
from cai_lite.typed_yaml import ConfigError

from conftest import ROOT


def _same(a, b) -> bool:
    return dataclasses.asdict(a) == dataclasses.asdict(b)


def _errors(argv):
    with pytest.raises(ConfigError) as e:
        load_config(argv)
    return e.value.errors


def test_config_flag_is_the_recipe_key():
    path = str(RECIPES / "7b_qlora.yaml")
    want = load_config(["recipe=7b_qlora"])
    assert _same(load_config(["--config", path]), want)
    assert _same(load_config([f"--config={path}"]), want)
    assert _same(load_config(["--config", "7b_qlora"]), want)  # a name works too, as with recipe=


def test_double_dash_flags_are_key_value():
    want = load_config(["sft.lr=1e-4", "stages=[sft,ppo]", "run_name=007", "sft.max_steps=-1",
                        "base.gradient_checkpointing=false"])
    got = load_config(["--sft.lr", "1e-4", "--stages", "[sft,ppo]", "--run-name=007", "--sft.max_steps", "-1",
                       "--base.gradient_checkpointing", "false"])
    assert _same(got, want) and got.run_name == "007" and got.sft.max_steps == -1 != load_config([]).sft.max_steps
    errors = _errors(["--sft.lr", "--sft.lrr", "1", "stray"])
    assert errors[0] == "--sft.lr: expected a value (--sft.lr VALUE or --sft.lr=VALUE)"
    assert "sft.lrr: no such key (did you mean sft.lr?)" in errors
    assert any(e.startswith("stray: expected key=value or --key value") for e in errors)


def test_help_shows_the_values_of_the_recipe_given():
    text = help_text(["recipe=7b_qlora", "--sft.lr", "3e-4"])
    assert "base.model: str = 'models/Qwen2.5-7B-Instruct'   (default 'runs/_models/tiny-llama')" in text
    assert "sft.grad_accum: int = 8   (default 4)" in text
    assert "sft.lr: float = 0.0003   (default 0.0002)" in text
    assert "ppo.kl_target: float = 6.0" in text and "type = value in recipe 7b_qlora" in text
    assert "sft.grad_accum: int = 1   (default 4)" in help_text([])  # no recipe: the default one, lab


def _cli(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "cai_lite", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_help_and_errors_from_another_directory(tmp_path):
    r = _cli("--help", "--config", str(RECIPES / "7b_qlora.yaml"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "usage: cai-lite" in r.stdout and "base.model: str = 'models/Qwen2.5-7B-Instruct'" in r.stdout
    r = _cli("--config", "missing.yaml", "--sft.lrr", "1", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "recipe=missing.yaml: no such recipe" in r.stderr and "sft.lrr: no such key" in r.stderr
    assert not (tmp_path / "runs").exists()


def test_a_recipe_can_name_a_parent(tmp_path):
    child = tmp_path / "mine.yaml"
    child.write_text("description: tiny_cpu with a higher SFT rate\ndefaults: tiny_cpu\nsft:\n  lr: 5.0e-4\n")
    cfg, parent = load_config([f"--config={child}"]), load_config(["recipe=tiny_cpu"])
    assert cfg.recipe == "mine" and cfg.sft.lr == 5e-4
    assert cfg.sft.max_steps == parent.sft.max_steps == 8  # the rest of the section comes from the parent
    assert _same(dataclasses.replace(cfg, recipe="tiny_cpu", description=parent.description,
                                     sft=dataclasses.replace(cfg.sft, lr=parent.sft.lr)), parent)
    # A parent given as a path is read beside the child; chains work, loops and typos are named.
    (tmp_path / "grandchild.yaml").write_text("defaults: mine.yaml\nlora:\n  r: 4\n")
    gc = load_config([f"recipe={tmp_path / 'grandchild.yaml'}"])
    assert gc.lora.r == 4 and gc.lora.alpha == 16 and gc.sft.lr == 5e-4 and gc.description == cfg.description
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    (tmp_path / "b.yaml").write_text("defaults: a.yaml\n")
    (msg,) = _errors([f"recipe={tmp_path / 'a.yaml'}"])
    assert "defaults:" in msg and "loops (a -> b -> a)" in msg
    (tmp_path / "typo.yaml").write_text("defaults: tiny_cpuu\n")
    (msg,) = _errors([f"recipe={tmp_path / 'typo.yaml'}"])
    assert "defaults: 'tiny_cpuu' is no recipe" in msg and "tiny_cpu" in msg


def test_shipped_paths_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(["recipe=tiny_cpu", "constitution=constitutions/candid_tutor.yaml"])
    assert Path(cfg.data.prompts) == SHIPPED / "recipes" / "prompts" / "red_team.jsonl"
    assert Path(cfg.evaluate.helpful_prompts).is_file() and Path(cfg.constitution).is_file()
    assert cfg.base.model == "runs/_models/tiny-llama"  # built under ./runs of this directory, not the package
    # A file of the same relative name in the current directory wins over the shipped copy.
    local = tmp_path / "recipes" / "prompts" / "red_team.jsonl"
    local.parent.mkdir(parents=True)
    local.write_text('{"prompt": "mine"}\n')
    assert load_config(["recipe=tiny_cpu"]).data.prompts == "recipes/prompts/red_team.jsonl"


def _build_wheel(tmp_path: Path) -> Path:
    """`pip wheel .` on a copy of the files a clone has (so the checkout gets no build/ folder)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("cai_lite", "recipes", "constitutions"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # Without build isolation when setuptools is at hand: no index needed, and seconds instead of a minute.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("cai_lite-*.whl")
    return wheel


def test_wheel_carries_recipes_constitutions_prompts_and_the_command(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"cai_lite/{p.relative_to(ROOT)}" for d in ("recipes", "constitutions") for p in (ROOT / d).rglob("*")
               if p.is_file()}
    assert {"cai_lite/recipes/tiny_cpu.yaml", "cai_lite/recipes/prompts/red_team.jsonl",
            "cai_lite/constitutions/harmless.yaml"} <= shipped
    assert shipped <= names, f"missing from the wheel: {sorted(shipped - names)}"
    # Every module of every package (a folder with __init__.py): pyproject lists the packages by hand.
    code = {str(p.relative_to(ROOT)) for p in (ROOT / "cai_lite").rglob("*.py") if (p.parent / "__init__.py").is_file()}
    assert {"cai_lite/__main__.py", "cai_lite/cli.py", "cai_lite/stages/sft.py"} <= code
    assert code <= names, f"add these packages to [tool.setuptools] packages: {sorted(code - names)}"
    assert {"cai_lite/browse_page.html", "cai_lite/browse_page.js"} <= names  # the run browser's page, package data
    entry_points = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "cai-lite = cai_lite.cli:main" in entry_points

    # Installed as the wheel lays it out, run from elsewhere: recipes and files come from the package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = ("import cai_lite, sys; from pathlib import Path; from cai_lite.recipe import load_config, available_recipes;"
             "from cai_lite.constitution import load; cfg = load_config(['recipe=tiny_cpu']);"
             "print(cai_lite.__file__); print(cfg.data.prompts); print(load('harmless').source);"
             "print(sorted(available_recipes())); assert Path(cfg.data.prompts).is_file()")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    package, prompts, constitution, recipes = r.stdout.splitlines()
    assert all(Path(p).is_relative_to(site / "cai_lite") for p in (package, prompts, constitution)), r.stdout
    assert recipes == str(sorted(p.stem for p in RECIPES.glob("*.yaml")))
    r = _cli("--help", "recipe=tiny_cpu", cwd=elsewhere, env=env)
    assert r.returncode == 0 and str(site / "cai_lite" / "recipes") in r.stdout
