"""``medattn``: the LightningCLI runner (``fit``, ``validate``, ``test``, ``predict``).

Configs compose from small YAML files (``-c`` may be repeated; later files and flags win)::

    medattn fit -c experiments/cam_baseline/synthetic.yaml                 # one complete experiment
    medattn fit -c experiments/configs/trainer/cpu.yaml -c experiments/configs/logger/wandb.yaml \\
                -c experiments/configs/model/cam_baseline.yaml -c experiments/configs/data/synthetic.yaml
    medattn fit -c experiments/pcam/synthetic.yaml --trainer.max_epochs 3 --seed_everything 1

Values the data knows (class count and names, channels, ``spatial_dims``, per-slice feature size, sliding-window
ROI) are linked from the DataModule to the model, and ``${MEDATTN_DATA}`` in a config names the data root: see
``experiments/config_links.py``.

Environment variables override too (``PL_TRAINER__MAX_EPOCHS=3``). ``HF_HUB_OFFLINE`` defaults to 1, so a
``pretrained`` backbone without a local ``weights_file`` fails at once with instructions instead of hanging.

Resuming (``fit``). A run resumes only when asked; a leftover checkpoint never changes what a fresh run does::

    medattn fit -c experiments/pcam/synthetic.yaml --ckpt_path last          # the newest run of this experiment
    medattn fit -c experiments/pcam/synthetic.yaml --ckpt_path runs/pcam-synthetic/pcam-synthetic-<id>/checkpoints/last.ckpt

* ``--ckpt_path last`` looks at the runs ``<save_dir>/<group>/<name>-*/`` of the config's ``MedAttnLogger`` whose
  ``config.yaml`` names the same logger ``name``, takes each run's newest resumable checkpoint (``checkpoints/
  last.ckpt``, ``checkpoints/on_exception.ckpt`` or a SLURM ``hpc_ckpt_*.ckpt``) and resumes the newest of them.
  None: an error naming the folder it looked in (never a silent fresh start).
* A checkpoint inside a run directory (``<run dir>/checkpoints/*.ckpt``, with ``last`` always) is continued **in
  that run directory**: same run id, same W&B run (``resume="allow"``), ``metrics.csv`` kept up to the checkpoint's
  step and appended to, the previous ``config.yaml`` kept as ``config.attempt<k>.yaml``. ``ModelCheckpoint`` then
  restores its best score and ``best.ckpt`` (it only does so in the same folder), so a worse epoch after the resume
  never becomes ``best.ckpt`` and the after-fit test uses the true best. A checkpoint elsewhere starts a new run
  directory (with a warning that the best score before it is not known there).
* Resume means "the same experiment": a ``--model...``/``--data...`` value (flag or YAML) that differs from the
  checkpoint's hyper-parameters is refused, naming the argument and both values (Lightning would silently replace
  model arguments with the checkpoint's). Trainer flags (``--trainer.max_epochs``, devices ...) may change. A value
  left at ``None`` takes the checkpoint's. ``test``/``validate``/``predict --ckpt_path`` likewise refuse differing
  ``--model...`` values (the model is rebuilt from the checkpoint's hyper-parameters); ``--data...`` may differ there.
* SLURM requeue (``SLURM_JOB_ID`` set, ``SLURM_RESTART_COUNT`` > 0, no ``--ckpt_path``): the run id (from the job id)
  names an existing run directory, so the run continues there from its resumable checkpoint (from scratch in the
  same directory if it has none) instead of refusing the reused run id.
* SIGTERM (preemption) writes ``checkpoints/on_exception.ckpt`` and exits with status 143 (128 + SIGTERM), so a
  scheduler does not mistake the run for finished. A ``fast_dev_run`` writes nothing outside its run directory and
  no checkpoint.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from callbacks.checkpoint_io import CheckpointError, load_checkpoint_file
from callbacks.reliability import reliability_callbacks
from callbacks.image_logger import ImageLogger
from callbacks.run_info import RunSummary, SplitSummaryLogger
from datamodules.manifest import DataError
from experiments import cli_support
from experiments.checkpoint_args import changed_arguments, preprocessing_changes
from experiments.cpu_precision import apply_cpu_precision
from experiments.config_links import (DATA_LINKS, DATA_PLACEHOLDER, DATA_VAR, ConfigLinkError, _LinkedInstantiator,  # noqa: F401
                                      check_forced_links, data_root, expand_data_root, forced_link_values)
from experiments.logging import (continue_run, default_run_dir, experiment_dir, experiment_runs,
                                 medattn_logger_args, resumable_checkpoint)

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process killed by SIGTERM


class ResumeError(ValueError):
    """``--ckpt_path`` (or a SLURM requeue) cannot be honoured as given; the message says why and what to do."""


class RunConfigSaver(SaveConfigCallback):
    """Write the resolved config into the run's own directory (``trainer.log_dir``, which ``MedAttnLogger``
    makes unique per run, so a later run never overwrites it) and send it to the loggers as hyperparameters.
    A run without a logger has no run directory, so nothing is written (rather than a ``config.yaml`` in the
    working directory that the next run would collide with)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.logger is None:
            return
        run_dir = Path(getattr(trainer.logger, "run_dir", "") or ".")
        if getattr(trainer.logger, "continued", False) and trainer.is_global_zero and (run_dir / "config.yaml").is_file():
            attempt = 1 + len(list(run_dir.glob("config.attempt*.yaml")))  # keep what the earlier attempt ran with
            (run_dir / "config.yaml").rename(run_dir / f"config.attempt{attempt}.yaml")
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False, format="yaml")
        for logger in trainer.loggers:
            try:
                import yaml

                logger.log_hyperparams({"config": yaml.safe_load(config)})
            except Exception:  # noqa: BLE001 - a logger that cannot take nested params must not stop the run
                pass


def _requeued() -> bool:
    """A SLURM job started again under the same job id (``scontrol requeue``, preemption with ``--requeue``)."""
    try:
        return bool(os.environ.get("SLURM_JOB_ID")) and int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    except ValueError:
        return False


def _as_recorded(run_dir: Path, checkpoint: dict) -> Path:
    """``run_dir`` spelled as the checkpoint's ``ModelCheckpoint`` recorded it (relative or absolute) when both name
    the same folder: ``ModelCheckpoint`` restores its best score only when the ``dirpath`` string is equal."""
    for state in (checkpoint.get("callbacks") or {}).values():
        recorded = state.get("dirpath") if isinstance(state, dict) else None  # a ModelCheckpoint's state
        if isinstance(recorded, str) and Path(recorded).name == "checkpoints" and \
                Path(recorded).resolve() == (run_dir / "checkpoints").resolve():
            return Path(recorded).parent
    return run_dir




class MedAttnCLI(LightningCLI):
    _continue: Path | None = None
    _resume_from: dict | None = None

    def _parse_ckpt_path(self) -> None:
        """Before Lightning's (which replaces the model's arguments with the checkpoint's): resolve ``last`` and a
        SLURM requeue, pick the run directory to continue, and refuse arguments that differ from the checkpoint's."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            expand_data_root(config)  # before the comparison: the checkpoint records the resolved data root
            if subcommand == "fit":
                self._resolve_resume(config)
            ckpt = config.get("ckpt_path")
            if ckpt and Path(ckpt).is_file():
                self._refuse_changed_arguments(subcommand, Path(ckpt))
            if self._continue is not None and self._resume_from is not None:
                self._continue = _as_recorded(self._continue, self._resume_from)
        super()._parse_ckpt_path()

    def _resolve_resume(self, config) -> None:
        ckpt, logger = config.get("ckpt_path"), medattn_logger_args(config.get("trainer"))
        if ckpt == "last":
            if logger is None:
                raise ResumeError("--ckpt_path last resumes the newest run of this experiment, found through the "
                                  "MedAttnLogger run directories, but this config has no MedAttnLogger "
                                  "(trainer.logger): give the checkpoint file instead")
            found = [(c, run) for run in experiment_runs(**logger) if (c := resumable_checkpoint(run)) is not None]
            if not found:
                folder, name = experiment_dir(**logger)
                raise ResumeError(f"--ckpt_path last: no run of experiment '{name}' has a resumable checkpoint "
                                  f"(checkpoints/last.ckpt, checkpoints/on_exception.ckpt or hpc_ckpt_*.ckpt); looked "
                                  f"in {folder}/{name}-*/ ({len(experiment_runs(**logger))} run(s) of it there). "
                                  "Start a fresh run without --ckpt_path, or give a checkpoint file.")
            ckpt, self._continue = max(found, key=lambda pair: pair[0].stat().st_mtime)
            config.ckpt_path = str(ckpt)
            print(f"[medattn] --ckpt_path last: resuming {ckpt} (continuing in {self._continue})")
        elif ckpt is None and logger is not None and _requeued():
            run_dir = default_run_dir(**logger)
            if run_dir.is_dir():
                self._continue, found = run_dir, resumable_checkpoint(run_dir)
                config.ckpt_path = str(found) if found else None
                print(f"[medattn] SLURM requeue (job {os.environ['SLURM_JOB_ID']}, restart "
                      f"{os.environ['SLURM_RESTART_COUNT']}): continuing in {run_dir} "
                      + (f"from {found}" if found else "from scratch (no resumable checkpoint there)"))
        elif ckpt and Path(ckpt).is_file():
            path = Path(ckpt)
            if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
                self._continue = path.parent.parent
            else:
                warnings.warn(f"--ckpt_path {ckpt} is not inside a run directory (<run dir>/checkpoints/): the "
                              "resumed run gets a new run directory, where ModelCheckpoint does not know the best "
                              "score before the checkpoint", stacklevel=2)

    def _refuse_changed_arguments(self, subcommand: str, ckpt: Path) -> None:
        checkpoint = load_checkpoint_file(ckpt, map_location="cpu")  # verified, data only
        if subcommand == "fit":
            self._resume_from = checkpoint
        dumped = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_none=False))
        dumped = dumped.get(subcommand, dumped)
        # the run's config.yaml has every argument (the checkpoint's hyper-parameters lack those a module does not
        # save, such as the network and the optimiser); both are compared
        run_config = {}
        if self._continue is not None and (self._continue / "config.yaml").is_file():
            run_config = yaml.safe_load((self._continue / "config.yaml").read_text()) or {}
        sections = [("model", "hyper_parameters")] + ([("data", "datamodule_hyper_parameters")]
                                                      if subcommand == "fit" else [])
        changed = []
        for section, key in sections:
            for saved in (run_config.get(section), checkpoint.get(key)):
                changed += [c for c in changed_arguments(dumped.get(section), saved, f"--{section}")
                            if c.split(":")[0] not in {d.split(":")[0] for d in changed}]
        # a DATA_LINKS target is filled from the data on instantiation (the dump holds its pre-link default): the
        # data arguments it derives from are compared above, and check_forced_links refuses a contradicting value
        linked = {f"--model.init_args.{target}" for _, target in DATA_LINKS}
        changed = [c for c in changed if c.split(":")[0] not in linked]
        if subcommand != "fit":  # evaluating on other data is allowed; a change of preprocessing is said aloud
            differs = []
            for saved in (run_config.get("data"), checkpoint.get("datamodule_hyper_parameters")):
                differs += [c for c in preprocessing_changes(dumped.get("data"), saved) if c not in differs]
            if differs:
                warnings.warn(f"--ckpt_path {ckpt}: {subcommand} prepares the data differently from training (the "
                              "numbers describe the model under these inputs, not as trained):\n  " + "\n  ".join(differs),
                              stacklevel=2)
        if changed:
            what = ("a resumed run continues the same experiment, so model and data arguments must equal the "
                    "checkpoint's; trainer flags such as --trainer.max_epochs may change" if subcommand == "fit" else
                    "the model is rebuilt from the checkpoint's hyper-parameters, which would silently replace them")
            raise ResumeError(f"--ckpt_path {ckpt}: these arguments differ from the checkpoint's ({what}):\n  "
                              + "\n  ".join(changed) + "\nUse the checkpoint's values, or start a new run.")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        expand_data_root(config)
        apply_cpu_precision(config)  # bf16-mixed on a CPU without native bf16 -> 32-true, with a warning

    def _add_instantiators(self) -> None:
        self.parser.add_instantiator(_LinkedInstantiator(cli=self, key="model"), LightningModule, subclasses=True)
        self.parser.add_instantiator(_LinkedInstantiator(cli=self, key="data"), LightningDataModule, subclasses=True)

    def instantiate_classes(self) -> None:
        forced = forced_link_values(self.config.get(self.subcommand, self.config) if self.subcommand else self.config)
        if self._continue is None:
            super().instantiate_classes()
        else:
            with continue_run(self._continue, self._resume_from):
                super().instantiate_classes()
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        ckpt = config.get("ckpt_path") if self.subcommand != "fit" else None
        check_forced_links(forced, self.datamodule, checkpoint=ckpt if ckpt and Path(ckpt).is_file() else None)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer_config = self._get(self.config_init, "trainer", default={})
        run_dir = getattr(trainer_config.get("logger"), "run_dir", None)
        if run_dir is not None and not trainer_config.get("default_root_dir"):
            # Lightning's own files (a SLURM hpc_ckpt_*.ckpt, profiler output) go into the run directory, not the cwd
            kwargs.setdefault("default_root_dir", str(run_dir))
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.fast_dev_run:
            for callback in trainer.checkpoint_callbacks:
                if isinstance(callback, ModelCheckpoint):
                    callback.save_last = False  # Lightning 2.6 writes last.ckpt in on_train_end even in fast_dev_run
        return trainer

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="after `fit`, evaluate the best checkpoint (or the final weights) on the test split")
        # Values the data knows go to the model (see DATA_LINKS). jsonargparse skips a link whose source attribute
        # the DataModule lacks or whose target the chosen network/module class lacks, so one parser serves all.
        for source, target in DATA_LINKS:
            parser.link_arguments(f"data.{source}", f"model.init_args.{target}", apply_on="instantiate")

    def after_fit(self) -> None:
        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        if not config.get("test_after_fit", False) or self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = "best" if checkpoint is not None and getattr(checkpoint, "best_model_path", "") else None
        self._evaluate("test", model=self.model, datamodule=self.datamodule, ckpt_path=best)

    # `medattn test|validate` run these (LightningCLI calls a CLI method named after the subcommand when it exists)
    def test(self, **kwargs: Any):
        return self._evaluate("test", **kwargs)

    def validate(self, **kwargs: Any):
        return self._evaluate("validate", **kwargs)

    def _evaluate(self, stage: str, verbose: bool = True, **kwargs: Any):
        """``trainer.test``/``validate`` printing the headline metrics only (cli_support.headline_table): the
        per-class values go to metrics.csv and W&B."""
        results = getattr(self.trainer, stage)(verbose=False, **kwargs)
        data = self._evaluated_data(stage)
        if verbose and self.trainer.is_global_zero and results:
            names = getattr(self.model, "class_names", None) or getattr(self.datamodule, "class_names", None) or []
            table = cli_support.headline_table(results, names, title=stage.capitalize())
            if table:
                # which data the numbers are of (split=all on another dataset vs the in-distribution test split)
                print((f"{stage.capitalize()} data: {data}\n" if data else "") + table)
        return results

    def _evaluated_data(self, stage: str) -> str | None:
        """The DataModule's description of the split ``stage`` evaluated (``describe_split``), also written to the
        run's ``summary.json`` (and the W&B summary) as ``<split>_data``, so a number is never read without it."""
        describe = getattr(self.datamodule, "describe_split", None)
        split = "test" if stage in ("test", "predict") else "val"
        if not callable(describe):
            return None
        text = describe(split)
        RunSummary._write(self.trainer, {f"{split}_data": text})  # on every rank: it resolves log_dir (a collective)
        return text

    def parse_arguments(self, parser, args) -> None:
        if isinstance(args, (list, tuple)):
            args = cli_support.rewrite_nulls(args)
        elif args is None and sys.argv[1:] != (rewritten := cli_support.rewrite_nulls(sys.argv[1:])):
            sys.argv[1:] = rewritten  # not passed as args: Lightning warns when both args and sys.argv are given
        super().parse_arguments(parser, args)
        argv = sys.argv[1:] if args is None else args
        if isinstance(argv, (list, tuple)):  # `--x.init_args.y.init_args.z null` means None (see restore_nulls)
            cli_support.restore_nulls(self.config, argv, self.config.get("subcommand"))

    def _add_subcommands(self, parser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # `compare` and `prepare` are dispatched by main() before the CLI parses anything; registered here so --help
        # lists them
        from jsonargparse import ArgumentParser

        for name, description in (
                ("compare", "tabulate finished runs (CSV/Markdown/PNG); `medattn compare --help` for its options"),
                ("prepare", "decode and letterbox a dataset once for fast loading; `medattn prepare --help`")):
            parser._subcommands_action.add_subcommand(name, ArgumentParser(description=description), help=description)

    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=RunConfigSaver,
            save_config_kwargs={"overwrite": False},
            # allow_abbrev=False: a typo (--trainer.max_epoch) is an error, never a silent prefix match; the
            # subcommand parsers take their own kwargs, so it is given to each of them too
            parser_kwargs={"default_env": True, "allow_abbrev": False,
                           **{name: {"allow_abbrev": False} for name in LightningCLI.subcommands()}},
            seed_everything_default=0,
            auto_configure_optimizers=False,
            # added to every run, on top of the callbacks a config lists
            trainer_defaults={"callbacks": [SplitSummaryLogger(), ImageLogger(fallback=True), RunSummary(),
                                            *reliability_callbacks()],
                              "plugins": [{"class_path": "callbacks.checkpoint_io.AtomicCheckpointIO"}]},
            args=args,
            run=run,
        )


# errors a user fixes (a path, a file, a flag): one line, no traceback (cli_support); anything else is a bug
USER_ERRORS = (DataError, FileNotFoundError, CheckpointError, ResumeError, ConfigLinkError)


def main(args=None) -> None:
    """Run the CLI. A data, weights, checkpoint or config error (and the original error jsonargparse wraps when a
    class refuses its arguments) is printed as one line naming the file and what to do, exit status 2;
    ``MEDATTN_DEBUG=1`` shows the traceback instead. SIGTERM exits with 143."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["compare"]:  # `medattn compare ...`: tabulate finished runs (experiments/compare.py)
        from experiments.compare import main as compare

        compare(argv[1:])
        return
    if argv[:1] == ["prepare"]:  # `medattn prepare -c <config> --out <dir>` (experiments/prepare.py)
        from experiments.prepare import main as prepare

        prepare(argv[1:])
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        MedAttnCLI(args=args)
    except SIGTERMException:
        # Lightning raises it as SystemExit() (status 0) after the crash checkpoint is written: a preempted run must
        # not look finished to the scheduler
        print(f"[medattn] stopped by SIGTERM: exit status {SIGTERM_EXIT}", file=sys.stderr)
        sys.exit(SIGTERM_EXIT)
    except Exception as err:  # noqa: BLE001 - reported in one line when it is a user's error, re-raised otherwise
        found = cli_support.user_error(err, USER_ERRORS)
        if found is None or cli_support.debug():
            raise
        cli_support.report_and_exit(found)


if __name__ == "__main__":
    main(sys.argv[1:])
