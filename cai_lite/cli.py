"""The `cai-lite` command (also `python -m cai_lite`, and `python run.py` in a checkout).

    cai-lite [recipe=NAME | --config FILE.yaml] [key=value | --key value ...]
    cai-lite --help recipe=7b_qlora     # every key, with the values that recipe gives it, and examples
    cai-lite recipe=7b_qlora plan=true  # each stage's estimated peak memory, every missing input, and each
                                        # stage's time from a short probe of base.model (plan.probe=false: none)
    cai-lite report RUN_DIR             # RUN_DIR/report.html: the run browser of whatever RUN_DIR holds
    cai-lite --version

Reads the recipe and overrides (recipe.load_config), checks config, device, files and servers before
any model loads, then runs the selected stages into `./runs/<run_name>/` of the current directory and
prints a summary; library messages go to `runs/<run_name>/run.log` (logs.py). Exit status 0 on
success (`plan=true`: 1 where a stage does not fit), 2 on a problem with the config or the inputs
(each printed on its own line, naming its key).

The package's `__init__` has already turned the Hugging Face libraries offline and their telemetry
off by the time this runs: nothing here downloads, and only a configured judge URL opens a socket.
"""

from __future__ import annotations

import sys

HELP = ("-h", "--help", "help")
EXAMPLES = """examples:
  cai-lite                                      the teaching lab: pretrains a tiny world model, then every stage
  cai-lite recipe=tiny_cpu                      a random tiny model through every stage (a minute on CPU)
  cai-lite recipe=7b_qlora base.model=models/Qwen2.5-7B-Instruct
                                                a real model (fetch it and the data first: README, "For a real model")
  cai-lite recipe=7b_qlora plan=true            memory per stage on a 24 GB card, every missing input, and each
                                                stage's time from a short probe (plan.probe=false: loads nothing)
  cai-lite recipe=tiny_cpu                      the same again after a crash or Ctrl-C: it resumes
  cai-lite recipe=tiny_cpu force=[sft]          redo sft (and the stages that read it) with changed settings
  cai-lite recipe=tiny_cpu sft.lr=1e-4 stages=[critique_revise,sft] report_to=[tensorboard,wandb]"""


def version() -> str:
    """`cai_lite VERSION`, and the git commit when running from a checkout."""
    import importlib.metadata as md

    from cai_lite import __version__, rundir

    try:
        number = md.version("cai_lite")
    except md.PackageNotFoundError:  # run from a checkout that was never installed
        number = __version__
    commit = rundir.git_commit()
    return f"cai_lite {number}" + (f" (git {commit[:12]})" if commit else "")


def main(argv: list[str] | None = None) -> int:
    # Imported here, not at the top: `cai_lite.recipe` is light, but pipeline pulls in torch.
    from cai_lite import distributed, recipe
    from cai_lite.constitution import ConstitutionError
    from cai_lite.data import DataError
    from cai_lite.typed_yaml import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        return report(argv[1:])
    try:
        if "--version" in argv:
            print(version())
            return 0
        if any(a in HELP for a in argv):
            print(recipe.help_text([a for a in argv if a not in HELP]) + "\n\n" + EXAMPLES)
            return 0
        errors: list[str] = []
        argv = recipe.normalize_argv(argv, errors)  # `--plan true` is plan=true, as every --key value is
        if errors:
            raise ConfigError(errors)
        # plan=true is an action, not a setting: a dry run that writes nothing (plan.* are its settings).
        dry = [a for a in argv if a.lower() in ("plan=true", "plan=false")]
        argv = [a for a in argv if a not in dry]
        cfg = recipe.load_config(argv)
        from cai_lite import logs

        logs.setup(cfg.log_level)  # before pipeline imports the libraries: what they say at import is caught
        if dry and dry[-1].lower() == "plan=true":
            return _plan(cfg)
        from cai_lite import pipeline

        results = pipeline.run(cfg)
    except ConfigError as e:
        if not distributed.is_main():  # the checks are rank 0's; the launcher then ends the others
            return 2
        print(f"cai_lite: {len(e.errors)} problem(s), nothing was run:", file=sys.stderr)
        for line in e.errors:
            print(f"  - {line}", file=sys.stderr)
        return 2
    except (DataError, ConstitutionError) as e:
        # Bad input found while a stage ran; finished stages and shards stay on disk for the rerun.
        print(f"cai_lite: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncai_lite: interrupted. Finished stages and shards are kept; run the same command again to "
              "resume (training continues from its last checkpoint, <stage>/checkpoint/; a redo that was under "
              "way puts the output it replaced back).", file=sys.stderr)
        return 130
    if distributed.is_main():  # under torchrun/accelerate the other processes trained too, but say nothing
        print(pipeline.summary(cfg, results))
        if n := logs.library_warnings():
            from cai_lite import rundir

            print(f"{n} warning(s) from the libraries (deprecations and the like) are in {rundir.log_path(cfg.path)}")
    return 0


def report(argv: list[str]) -> int:
    """`cai-lite report RUN_DIR`: write RUN_DIR/report.html from the files the run dir holds now,
    with the row cap of its config.yaml (`evaluate.report_rows`). Loads no model."""
    from pathlib import Path

    from cai_lite import browse
    from cai_lite.data import DataError

    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: cai-lite report RUN_DIR   (writes RUN_DIR/report.html)", file=sys.stderr)
        return 2
    run = Path(argv[0])
    try:
        path = browse.write(run, run / "report.html", browse.saved_rows(run))
    except DataError as e:
        print(f"cai_lite: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path} (open it in a browser; it needs no server)")
    return 0


def _plan(cfg) -> int:
    """plan=true: the memory table, then every input a run would stop on, then the time estimate.
    Raises ConfigError (exit 2) listing the missing inputs and any problem with the plan's shape,
    all together."""
    from cai_lite import pipeline, planner, probe
    from cai_lite.typed_yaml import ConfigError

    try:
        table, fits = planner.plan(cfg)
        problems = []
    except ConfigError as e:
        table, fits, problems = "", False, list(e.errors)
    if table:
        print(table)
    problems += pipeline.check_inputs(cfg)
    if problems:
        raise ConfigError(problems)
    print("inputs: every file, folder and server the selected stages read is in place")
    print(probe.report(cfg))  # after the checks: it reads every prompt file, and may load the base
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
