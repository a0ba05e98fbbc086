"""What a run shows on the terminal, and what it keeps in `runs/<run>/run.log`.

The terminal gets cai_lite's own lines (each prefixed with the stage that runs), errors from any
library, and one progress bar per stage. The rest of what the libraries say (bitsandbytes' note
about an optional CPU kernel, transformers' deprecations, Python warnings) goes to `run.log`,
beside a copy of cai_lite's lines, so nothing is lost: the CLI says how many such messages it holds.
What the libraries say before the run dir may be written (at import, during the checks) is held in
memory and written first. Only rank 0 writes the file under torchrun/accelerate.

    python run.py recipe=tiny_cpu && less runs/tiny_cpu/run.log
"""

from __future__ import annotations

import contextvars
import logging
import sys
from pathlib import Path

from cai_lite import distributed

current_stage: contextvars.ContextVar[str] = contextvars.ContextVar("stage", default="setup")
FORMAT = "%(asctime)s {rank}[%(stage)s] %(message)s"
FILE_FORMAT = "%(asctime)s [%(stage)s] %(name)s %(levelname)s: %(message)s"


class StageLogFilter(logging.Filter):
    """Prefix every log line with the stage that is running."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.stage = current_stage.get()
        return True


class _Held(logging.Handler):
    """Library records kept until the run's log file exists (or for good, when no run starts);
    counts those at WARNING and above, which the CLI reports."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.target: logging.Handler | None = None
        self.warnings = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.warnings += record.levelno >= logging.WARNING and not record.name.startswith("cai_lite")
        if self.target is None:
            self.records.append(record)
        else:
            self.target.handle(record)


_library = _Held()
_library.addFilter(StageLogFilter())
_added: list[logging.Handler] = []  # what setup() put on the root logger


def setup(level: str) -> None:
    """Route cai_lite's lines to the terminal and the libraries' to `_library`; call before the
    libraries are imported (pipeline imports them), so what they say at import is caught too."""
    import datasets
    import transformers

    stage = StageLogFilter()
    console = logging.StreamHandler()
    console.addFilter(stage)
    # Under torchrun/accelerate the other ranks log only warnings, tagged with their rank: rank 0 tells the story.
    rank = "" if distributed.is_main() else f"rank {distributed.rank()} "
    console.setFormatter(logging.Formatter(FORMAT.format(rank=rank), "%H:%M:%S"))
    ours = logging.getLogger("cai_lite")
    ours.handlers[:] = [console, _library]  # _library forwards ours to the file too, once there is one
    ours.setLevel(level if distributed.is_main() else max(logging.getLevelName(level), logging.WARNING))
    ours.propagate = False
    # The libraries' records reach the root logger: transformers and datasets print through handlers of
    # their own unless told to propagate. Errors still reach the terminal.
    for name in ("transformers", "datasets"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    errors = logging.StreamHandler()
    errors.setLevel(logging.ERROR)
    errors.addFilter(stage)
    errors.setFormatter(logging.Formatter(FORMAT.format(rank=rank) + " (%(name)s)", "%H:%M:%S"))
    root = logging.getLogger()
    for handler in _added:  # a second setup in one process replaces what the first added, and only that
        root.removeHandler(handler)
    _added[:] = [errors, _library]
    for handler in _added:
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)  # warnings.warn() becomes a record of the py.warnings logger
    # Progress bars: the stage loops' own. Not the ones datasets' map() and transformers' loader draw
    # for every tokenisation pass and every model load.
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def to_file(path: Path) -> None:
    """From now on, write every record (cai_lite's and the libraries') to `path`, appending; the
    library records held so far go first."""
    if not distributed.is_main():
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.addFilter(StageLogFilter())
    handler.setFormatter(logging.Formatter(FILE_FORMAT, "%Y-%m-%d %H:%M:%S"))
    handler.handle(logging.makeLogRecord({"msg": "cai-lite " + " ".join(sys.argv[1:]), "levelno": logging.INFO,
                                          "levelname": "INFO", "name": "cai_lite"}))
    if _library.target is not None:
        _library.target.close()
    for record in _library.records:
        handler.handle(record)
    _library.records.clear()
    _library.target = handler


def library_warnings() -> int:
    """How many library records at WARNING or above this process kept out of the terminal."""
    return _library.warnings
