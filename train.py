"""Train a personalisation method: `python train.py fit --config configs/demo.yaml`.

The Lightning CLI: `fit`, `validate`, `--print_config`, and every argument of the module, data module and
trainer from YAML or the command line (`--model.init_args.concept_word dog`, `--trainer.max_steps 500`).
Methods: `tea_lightning.TextualInversion`, `tea_lightning.DreamBoothLoRA`, `tea_lightning.CustomDiffusion`.
A user error ends the command with one line, `error: ...`, and exit code 2, before anything is written.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from tea_lightning.data import ConceptDataModule
from tea_lightning.export import remove_stale_temporaries
from tea_lightning.module import DiffusionModule
from tea_lightning.regularizers import check_regularizers
from tea_lightning.resume import check_resume, is_file_path, run_folder
from tea_lightning.user_errors import run_command

# The seed is recorded in the run's config.yaml; the console is kept for what a user must read.
logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)


class TeaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # A multi-concept list is written once, under `data.concepts`; Custom Diffusion reads the same list.
        parser.link_arguments("data.concepts", "model.init_args.concepts")

    def before_instantiate_classes(self) -> None:
        # One seed per run draws the samples (data.seed) and the noise (model.init_args.seed). Not a jsonargparse
        # link: a link target set in a YAML file is silently dropped. Differing seeds would also clash when the
        # logger merges both modules' hyper-parameters, after the run folder exists.
        config = self.config[self.config.subcommand] if self.config.get("subcommand") else self.config
        model, data = config.get("model"), config.get("data")
        if not model or not data:
            return
        data_seed, model_seed = data.seed, (model.get("init_args") or {}).get("seed", data.seed)
        if data_seed != model_seed:
            seed = model_seed if data_seed == 0 else data_seed
            raise ValueError(f"data.seed={data_seed} and model.init_args.seed={model_seed} differ, but one seed draws "
                             f"a run's samples and its noise. Set both to one value: --data.seed {seed} "
                             f"--model.init_args.seed {seed}.")

    def _parse_ckpt_path(self) -> None:
        """Check `--ckpt_path` against this run instead of applying its hyper-parameters over the configuration
        (what LightningCLI does; see `tea_lightning.resume`). Runs before any model is built or file written."""
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not is_file_path(str(ckpt_path)):
            return
        run = yaml.safe_load(self.parser.dump(self.config, skip_link_targets=False, skip_unset=False))[subcommand]
        check_resume(str(ckpt_path), run.get("model") or {}, run.get("data"), run["trainer"].get("max_steps"),
                     fit=subcommand == "fit")

    def instantiate_trainer(self, **kwargs: Any):
        # Model and data are built; check that they and the callbacks fit together before the Trainer exists, so a
        # mismatch is reported before the logger creates the run folder.
        callbacks = self._get(self.config_init, "trainer", default={}).get("callbacks") or []
        preflight(self.model, self.datamodule, callbacks if isinstance(callbacks, list) else [callbacks])
        try:
            return super().instantiate_trainer(**kwargs)
        except (ValueError, TypeError, MisconfigurationException) as error:  # trainer.* settings that contradict
            raise ValueError(f"The Trainer refused the trainer settings: {error} Change the trainer.* option it "
                             "names (`python train.py fit --help` lists them).") from error

    def before_fit(self) -> None:
        # A run killed mid-write left hidden temporaries in the folder it resumes from: remove them.
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        folder = run_folder(ckpt_path) if ckpt_path and is_file_path(str(ckpt_path)) else None
        if folder is not None and rank_zero_only.rank == 0:  # the Trainer's own rank is set inside fit
            remove_stale_temporaries(folder)


def preflight(model: DiffusionModule, datamodule: Any, callbacks: list) -> None:
    """The checks that need model, data and callbacks together: each part's `check_module(model)` (when it has one)
    and the regularisers."""
    check_regularizers(model)
    for part in [datamodule, *callbacks]:
        check = getattr(part, "check_module", None)
        if callable(check):
            check(model)


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return TeaCLI(DiffusionModule, ConceptDataModule, subclass_mode_model=True, args=args, run=run,
                  save_config_kwargs={"overwrite": True}, parser_kwargs={"exit_on_error": False})


if __name__ == "__main__":
    run_command(main, prog="train.py")
