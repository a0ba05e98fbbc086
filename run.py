"""Run a cai_lite recipe: `python run.py [recipe=NAME] [key=value ...]`.

Reads recipes/NAME.yaml (default: tiny_cpu) plus dotted overrides, checks everything before any
model loads, then runs the selected stages into runs/<run_name>/. `python run.py --help` lists the
recipes and every config key.
"""

import sys

from cai_lite.constitution import ConstitutionError
from cai_lite.data import DataError
from cai_lite.typed_yaml import ConfigError


def main(argv: list[str]) -> int:
    from cai_lite import recipe

    if any(a in ("-h", "--help", "help") for a in argv):
        print(recipe.help_text())
        return 0
    try:
        cfg = recipe.load_config(argv)
        from cai_lite import pipeline

        pipeline.setup_logging(cfg.log_level)
        results = pipeline.run(cfg)
    except ConfigError as e:
        print(f"cai_lite: {len(e.errors)} problem(s), nothing was run:", file=sys.stderr)
        for line in e.errors:
            print(f"  - {line}", file=sys.stderr)
        return 2
    except (DataError, ConstitutionError) as e:
        # Bad input found while a stage ran; finished stages and shards stay on disk for the rerun.
        print(f"cai_lite: {e}", file=sys.stderr)
        return 2
    print(pipeline.summary(cfg, results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
