"""`python -m cai_lite [recipe=NAME] [key=value ...]`: the same as the `cai-lite` command (cli.py)."""

import sys

from cai_lite.cli import main

sys.exit(main())
