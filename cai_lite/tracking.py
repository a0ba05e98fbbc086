"""Where training curves go: `report_to` (tensorboard, wandb, mlflow, trackio), through the
callbacks transformers ships for each (`transformers.integrations`), for every training stage.

TRL's trainers (sft, rloo, dpo) take them as callbacks; our own loops (reward_model, ppo) drive the
same callback objects through `tracker()`, as Trainer drives them. Every stage numbers its steps as
Trainer does: the scalars logged after N optimizer steps are at step N, from 1, so all stages share
one x-axis. TensorBoard writes `<stage>/tensorboard/` (a resumed stage first drops what the killed
run logged after its checkpoint); wandb, mlflow and trackio keep their own settings (`WANDB_MODE`,
`WANDB_PROJECT`, `MLFLOW_TRACKING_URI`, ...), and each stage is one run there, named `<run>/<stage>`.
Only rank 0 reports under torchrun/accelerate. Writes nothing itself.

    WANDB_MODE=offline python run.py recipe=tiny_cpu report_to=[tensorboard,wandb]
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback, WandbCallback, get_reporting_integration_callbacks
from transformers.trainer_callback import ProgressCallback

from cai_lite import distributed
from cai_lite.config import Config

log = logging.getLogger(__name__)
def check(cfg: Config) -> list[str]:
    """Each `report_to` integration's package is installed (checked before any model loads)."""
    from transformers.integrations import integration_utils as iu

    available = {"wandb": iu.is_wandb_available, "mlflow": iu.is_mlflow_available,
                 "trackio": iu.is_trackio_available, "tensorboard": iu.is_tensorboard_available}
    return [f"report_to: {name} is not installed (pip install {name}, or pip install 'cai_lite[tracking]' for "
            "wandb, mlflow and trackio)" for name in cfg.report_to if not available[name]()]


@contextlib.contextmanager
def callbacks(cfg: Config, out: Path, steps_done: int) -> Iterator[list[TrainerCallback]]:
    """The stage's report_to callbacks (none on ranks other than 0). `steps_done`: the checkpoint's
    step when resuming, so TensorBoard drops the steps done again (Trainer counts from 1). A wandb
    run ends on exit."""
    found: list[TrainerCallback] = []
    if distributed.is_main():
        for name in cfg.report_to:
            if name == "tensorboard":  # our writer: the stage's folder, and purge_step for a resume
                found.append(TensorBoardCallback(SummaryWriter(str(out / "tensorboard"), purge_step=steps_done + 1)))
            else:
                found += [cls() for cls in get_reporting_integration_callbacks([name])]
    try:
        yield found
    finally:
        if any(isinstance(cb, WandbCallback) for cb in found):
            import wandb

            wandb.finish()  # WandbCallback leaves its run open; the next stage is a run of its own


@contextlib.contextmanager
def tracker(cfg: Config, out: Path, steps_done: int, max_steps: int,
            **settings) -> Iterator[Callable[[int, dict], None]]:
    """For a loop of our own: yields `log(step, scalars)`, which hands the scalars to every report_to
    callback as Trainer's on_log would after `step` optimizer steps. `settings` are the loop's own
    (learning_rate, per_device_train_batch_size, ...), so the run's config in wandb/mlflow is true."""
    with callbacks(cfg, out, steps_done) as found:
        # What the integrations read from a Trainer's arguments: the run's name there (as trl_args names
        # it), and the loop's own settings for the run's config.
        targs = TrainingArguments(output_dir=str(out / "trainer"), run_name=f"{cfg.path.name}/{out.name}",
                                  report_to=[], logging_steps=1, **settings) if found else None
        state = TrainerState(global_step=steps_done, max_steps=max_steps, logging_steps=1)
        control = TrainerControl()
        for cb in found:
            cb.on_train_begin(targs, state, control)

        def log_step(step: int, scalars: dict) -> None:
            state.global_step = step
            for cb in found:
                cb.on_log(targs, state, control, logs=dict(scalars))

        try:
            yield log_step
        finally:
            for cb in found:
                cb.on_train_end(targs, state, control)


class QuietProgress(ProgressCallback):
    """Trainer's progress bar, named after the stage, without the per-step dict it prints under the
    bar: the stage's train_log.jsonl already has every step; the bar shows the loss."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{logs['loss']:.4g}")


def quiet(trainer, name: str):
    """`trainer` with QuietProgress in place of Trainer's own bar."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(QuietProgress(name))
    return trainer
