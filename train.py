"""Train a personalisation method: `python train.py fit --config configs/demo.yaml`.

The Lightning CLI: `fit`, `validate`, `--print_config`, and every argument of the module, data module and
trainer from YAML or the command line (`--model.init_args.concept_word dog`, `--trainer.max_steps 500`).
Methods: `tea_lightning.TextualInversion`, `tea_lightning.DreamBoothLoRA`, `tea_lightning.CustomDiffusion`.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from tea_lightning.data import ConceptDataModule
from tea_lightning.module import DiffusionModule


class TeaCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # A multi-concept list is written once, under `data.concepts`; Custom Diffusion reads the same list.
        parser.link_arguments("data.concepts", "model.init_args.concepts")


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return TeaCLI(DiffusionModule, ConceptDataModule, subclass_mode_model=True, args=args, run=run,
                  save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
