"""``medattn``: the LightningCLI runner (``fit``, ``validate``, ``test``, ``predict``).

Configs compose from small YAML files (``-c`` may be repeated; later files and flags win)::

    medattn fit -c experiments/cam_baseline/synthetic.yaml                 # one complete experiment
    medattn fit -c experiments/configs/trainer/cpu.yaml -c experiments/configs/logger/wandb.yaml \\
                -c experiments/configs/model/cam_baseline.yaml -c experiments/configs/data/synthetic.yaml
    medattn fit -c experiments/pcam/synthetic.yaml --trainer.max_epochs 3 --seed_everything 1

Environment variables override too (``PL_TRAINER__MAX_EPOCHS=3``). ``HF_HUB_OFFLINE`` defaults to 1, so a
``pretrained`` backbone without a local ``weights_file`` fails at once with instructions instead of hanging.
"""

from __future__ import annotations

import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from callbacks.reliability import reliability_callbacks
from callbacks.run_info import SplitSummaryLogger


class RunConfigSaver(SaveConfigCallback):
    """Write the resolved config into the run's own directory (``trainer.log_dir``, which ``MedAttnLogger``
    makes unique per run, so a later run never overwrites it) and send it to the loggers as hyperparameters.
    A run without a logger has no run directory, so nothing is written (rather than a ``config.yaml`` in the
    working directory that the next run would collide with)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        for logger in trainer.loggers:
            try:
                import yaml

                logger.log_hyperparams({"config": yaml.safe_load(config)})
            except Exception:  # noqa: BLE001 - a logger that cannot take nested params must not stop the run
                pass


class MedAttnCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after `fit`, evaluate the best checkpoint (or the final weights) on the test split")

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if not config.get("test_after_fit", False) or self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = "best" if checkpoint is not None and getattr(checkpoint, "best_model_path", "") else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best)

    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": False},
            parser_kwargs={"default_env": True},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            # added to every run, on top of the callbacks a config lists
            trainer_defaults={"callbacks": [SplitSummaryLogger(), *reliability_callbacks()],
                              "plugins": [{"class_path": "callbacks.checkpoint_io.AtomicCheckpointIO"}]},
            args=args,
            run=run,
        )


def main(args=None) -> None:
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:  # `medattn compare ...`: tabulate finished runs (experiments/compare.py)
        from experiments.compare import main as compare

        compare(argv[1:])
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    MedAttnCLI(args=args)


if __name__ == "__main__":
    main(sys.argv[1:])
