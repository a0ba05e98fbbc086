"""Mutation score of the code that decides what the model learns (mutmut 3), module by module.

mutmut plants one small bug at a time (a flipped sign, `<` for `<=`, a changed constant, a dropped
argument, ...) and runs the tests that reach the mutated function; a mutant is killed when one of
them fails. The score is killed / all mutants ("no tests" and survivors count against it).

Each module is mutated against a chosen, fast set of tests (GROUPS below): the slow end-to-end
learning tests (PPO/RLOO/DPO training runs, the whole tiny_cpu pipeline) are left out, because
mutmut reruns the covering tests once per mutant. Where only part of a module decides what is
learned, only those functions are mutated (`functions`); the others get mutmut's
`# pragma: no mutate block` in the copy. Functions decorated with `@torch.no_grad()` are rewritten
in the copy as `f = torch.no_grad()(f)` after the definition (same behaviour), since mutmut skips
decorated functions.

Runs in a temporary copy of the tree (git-tracked and untracked, not ignored, files), never in
the checkout. Needs `pip install mutmut==3.8.1`. Not part of CI. Prints one result line per module,
then every surviving mutant as a diff.

    python benchmarks/mutation.py [--only losses,voting] [--jobs 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Group:
    module: str  # the file to mutate
    tests: tuple[str, ...]  # pytest node ids or files: the fast tests that cover it
    functions: tuple[str, ...] = ()  # mutate only these ("Class.method" for methods); empty = all


T_RL = "tests/test_rl.py::"
T_JUDGES = "tests/test_judges.py::"
T_PLAN = ("tests/test_pipeline.py::test_speed_only_judge_keys_do_not_refuse",
          "tests/test_pipeline.py::test_reading_a_missing_stage_is_refused_before_loading", "tests/test_run_dir.py",
          "tests/test_lab_plan.py", "tests/test_stage_contract.py")
GROUPS = {
    "losses": Group("cai_lite/losses.py", (
        T_RL + "test_soft_label_loss_matches_hand_computation", T_RL + "test_gae_and_ppo_losses_by_hand",
        "tests/test_silent_defects.py::test_margin_loss_gives_ties_no_gradient", "tests/test_directions.py",
        "tests/test_losses.py")),
    "voting": Group("cai_lite/voting.py", (
        T_JUDGES + "test_both_orders_remove_a_planted_position_bias", T_JUDGES + "test_cot_probabilities_are_clamped",
        T_JUDGES + "test_voting_on_hand_made_inputs", T_JUDGES + "test_failures_are_kept_as_none",
        "tests/test_directions.py")),
    "rollout": Group("cai_lite/rollout.py", (
        T_RL + "test_rollout_logprobs_match_what_generate_sampled", "tests/test_masks.py", "tests/test_directions.py",
        "tests/test_rollout_padding.py")),
    "ppo": Group("cai_lite/stages/ppo.py", ("tests/test_directions.py", "tests/test_ppo_update.py"),
                 ("KLController.update", "prompt_stream", "ppo_step", "_update")),
    "reward_model": Group("cai_lite/stages/reward_model.py", ("tests/test_directions.py",
                                                              "tests/test_reward_model_steps.py")),
    "critique_revise": Group("cai_lite/stages/critique_revise.py", ("tests/test_masks.py", "tests/test_run_dir.py",
                                                                    "tests/test_critique_rows.py"),
                             ("clean_revision", "run", "_shard_rows")),
    "evaluate": Group("cai_lite/stages/evaluate.py", (
        "tests/test_evaluate.py::test_classification_rates_follow_the_judge_not_its_position",
        "tests/test_directions.py", "tests/test_evaluate_numbers.py"), ("_vote", "_judge_everything", "_rates")),
    "stage_plan": Group("cai_lite/stage_plan.py", T_PLAN,
                        ("_pick", "_flatten", "read_stage_json", "_stale", "plan", "_own_changes", "_lab_hash")),
    "pipeline": Group("cai_lite/pipeline.py", T_PLAN, ("run",)),
}
KILLED = {"killed", "timeout", "caught by type check"}
PLACEHOLDER = "tests/test_ratings.py::test_rate_with_ci"  # a pure test that reaches none of the modules


def copy_tree(dst: Path) -> None:
    """The checkout as git sees it (tracked and untracked, minus ignored files)."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def _exists(work: Path, test: str) -> bool:
    file, _, func = test.partition("::")
    return (work / file).is_file() and (not func or f"def {func}(" in (work / file).read_text())


def prepare(path: Path, functions: tuple[str, ...]) -> None:
    """Fence off the functions out of scope; move `@torch.no_grad()` below the definitions in scope."""
    import libcst as cst

    class Rewrite(cst.CSTTransformer):
        def __init__(self):
            self.classes: list[str] = []
            self.undecorated: list[str] = []

        def visit_ClassDef(self, node):
            self.classes.append(node.name.value)

        def leave_ClassDef(self, original, updated):
            self.classes.pop()
            return updated

        def leave_FunctionDef(self, original, updated):
            name = ".".join(self.classes + [updated.name.value])
            if functions and name not in functions:
                pragma = cst.TrailingWhitespace(whitespace=cst.SimpleWhitespace("  "),
                                                comment=cst.Comment("# pragma: no mutate block"))
                return updated.with_changes(body=updated.body.with_changes(header=pragma))
            decorators = [d.decorator for d in updated.decorators]
            if not self.classes and len(decorators) == 1 and cst.Module([]).code_for_node(decorators[0]) == \
                    "torch.no_grad()":
                self.undecorated.append(updated.name.value)
                return updated.with_changes(decorators=[])
            return updated

    rewrite = Rewrite()
    module = cst.parse_module(path.read_text()).visit(rewrite)
    missing = {f for f in functions if f not in module.code and f.split(".")[-1] not in module.code}
    if missing:
        raise SystemExit(f"{path}: no function named {sorted(missing)}: update GROUPS")
    tail = "".join(f"\n{name} = torch.no_grad()({name})  # moved below for mutmut\n" for name in rewrite.undecorated)
    path.write_text(module.code + tail)


def setup_cfg(group: Group) -> str:
    lines = "\n    ".join
    return (f"[mutmut]\nsource_paths = cai_lite\nonly_mutate = {group.module}\n"
            f"pytest_add_cli_args_test_selection =\n    {lines(group.tests)}\n"
            "pytest_add_cli_args =\n    -p\n    no:cacheprovider\n"
            "also_copy =\n    recipes\n    constitutions\n    run.py\n"
            "do_not_mutate_patterns =\n    ^\\s*log\\.\n"  # log lines decide nothing the model learns
            # mutmut sends SIGXCPU after (tests' time + constant) * multiplier seconds of wall time: its
            # default (1 s) counts a fixture's setup on a busy machine as a timeout, i.e. a kill.
            "timeout_constant = 10\ntimeout_multiplier = 10\n"
            "use_git_change_detection = false\nprocess_isolation = forkserver\n")


def run_group(name: str, group: Group, jobs: int, keep: bool, without: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix=f"cai_mutation_{name}_"))
    copy_tree(work)
    for test_file in without:
        (work / test_file).unlink(missing_ok=True)
    # Tests not written yet (the "before" run) are left out; with none left, every mutant is "no tests".
    present = tuple(t for t in group.tests if _exists(work, t)) or (PLACEHOLDER,)
    group = Group(group.module, present, group.functions)
    prepare(work / group.module, group.functions)
    (work / "setup.cfg").write_text(setup_cfg(group))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONDONTWRITEBYTECODE": "1"}
    shared = ROOT.parent / "shared" / "data"
    if "CAI_LITE_SHARED_DATA" not in env and shared.is_dir():
        env["CAI_LITE_SHARED_DATA"] = str(shared)
    start = time.perf_counter()
    with (work / "mutmut.log").open("w") as log:
        rc = subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs)], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    meta = work / "mutants" / (group.module + ".meta")
    uncovered = "could not find any test case" in (work / "mutmut.log").read_text()  # mutmut stops: score 0
    if (rc != 0 and not uncovered) or not meta.is_file():
        print(f"{name}: mutmut failed (exit {rc}); see {work / 'mutmut.log'}")
        return {"module": group.module, "error": rc, "seconds": seconds}
    from mutmut.stats import status_by_exit_code

    codes = json.loads(meta.read_text())["exit_code_by_key"]
    status = {k: "no tests" if uncovered else status_by_exit_code[v] for k, v in codes.items()}
    survivors = sorted(k for k, s in status.items() if s not in KILLED)
    diffs = _diffs(work, group.module, survivors)
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    killed = sum(s in KILLED for s in status.values())
    return {"module": group.module, "killed": killed, "total": len(status), "seconds": seconds,
            "timeouts": sum(s == "timeout" for s in status.values()),
            "survivors": [(k, status[k], diffs.get(k, "")) for k in survivors], "work": str(work)}


def _diffs(work: Path, module: str, names: list[str]) -> dict[str, str]:
    """The changed lines of each mutant, from mutmut's own diff."""
    if not names:
        return {}
    code = ("import json, sys\nfrom mutmut.mutation.diff_apply import get_diff_for_mutant\n"
            "print(json.dumps({n: get_diff_for_mutant(n, path=sys.argv[1]) for n in sys.argv[2:]}))")
    out = subprocess.run([sys.executable, "-c", code, module, *names], cwd=work, capture_output=True, text=True)
    if out.returncode != 0:
        return {n: f"(no diff: {out.stderr.strip().splitlines()[-1:]})" for n in names}
    return {n: "\n".join(line for line in d.splitlines()[2:] if re.match(r"[-+] ", line) or line in "+-")
            for n, d in json.loads(out.stdout).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated group names (default: all)")
    ap.add_argument("--jobs", type=int, default=2, help="mutants tested in parallel")
    ap.add_argument("--keep", action="store_true", help="keep each temporary copy (its mutants/ and mutmut.log)")
    ap.add_argument("--json", default="", help="also write the results to this file")
    ap.add_argument("--without", default="", help="comma-separated test files to leave out, e.g. to measure the "
                                                    "score before they were written")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(GROUPS)
    start, results = time.perf_counter(), {}
    for name in names:
        results[name] = r = run_group(name, GROUPS[name], args.jobs, args.keep, list(filter(None,
                                                                                      args.without.split(","))))
        if args.json:  # after every group, so an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        if "error" not in r:
            print(f"mutation score {r['module']}: {r['killed']}/{r['total']} killed "
                  f"({100 * r['killed'] / max(r['total'], 1):.1f}%; {r['timeouts']} of them by timeout) "
                  f"in {r['seconds']:.0f} s", flush=True)
    killed = sum(r.get("killed", 0) for r in results.values())
    total = sum(r.get("total", 0) for r in results.values())
    print(f"mutation score, all modules: {killed}/{total} killed ({100 * killed / max(total, 1):.1f}%) "
          f"in {time.perf_counter() - start:.0f} s")
    for name, r in results.items():
        for key, status, diff in r.get("survivors", []):
            print(f"\n# {status}: {key}\n{diff}")


if __name__ == "__main__":
    main()
