"""Train a personalisation method: `python train.py fit --config configs/demo.yaml`.

The Lightning CLI: `fit`, `validate`, `--print_config`, and every argument of the module, data module and
trainer from YAML or the command line (`--model.init_args.concept_word dog`, `--trainer.max_steps 500`).
Methods: `tea_lightning.TextualInversion`, `tea_lightning.DreamBoothLoRA`, `tea_lightning.CustomDiffusion`.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import tea_lightning
from tea_lightning.data import ConceptDataModule
from tea_lightning.module import DiffusionModule


class TeaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # A multi-concept list is written once, under `data.concepts`; Custom Diffusion reads the same list.
        parser.link_arguments("data.concepts", "model.init_args.concepts")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return TeaCLI(DiffusionModule, ConceptDataModule, subclass_mode_model=True, args=args, run=run,
                  save_config_kwargs={"overwrite": True})


def input_error(error: BaseException) -> BaseException | None:
    """The check of ours that rejected the user's input, if that is what `error` is.

    jsonargparse wraps errors raised while instantiating the model in its own (a long "Union subtypes" dump); the
    original is at the end of the `__cause__` chain. Ours are ValueError/FileNotFoundError raised inside this package.
    """
    while error.__cause__ is not None:
        error = error.__cause__
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    ours = frame is not None and Path(frame.tb_frame.f_code.co_filename).is_relative_to(
        Path(tea_lightning.__file__).parent)
    return error if ours and isinstance(error, (ValueError, FileNotFoundError)) else None


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        cause = input_error(error)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)
