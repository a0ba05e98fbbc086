"""Run a cai_lite recipe from a checkout: `python run.py [recipe=NAME | --config FILE.yaml] [key=value ...]`.

The same as the installed `cai-lite` command and `python -m cai_lite` (see cai_lite/cli.py): reads
recipes/NAME.yaml (default: lab, the teaching lab) plus overrides, checks everything before any model loads,
then runs the selected stages into runs/<run_name>/. `python run.py --help` lists the recipes and
every config key with its value in the chosen recipe.
"""

import sys

from cai_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
