"""Train a personalisation method: `python train.py fit --config configs/demo.yaml`.

The Lightning CLI: `fit`, `validate`, `--print_config`, and every argument of the module, data module and
trainer from YAML or the command line (`--model.init_args.concept_word dog`, `--trainer.max_steps 500`).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from tea_lightning.data import ConceptDataModule
from tea_lightning.module import DiffusionModule


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return LightningCLI(DiffusionModule, ConceptDataModule, subclass_mode_model=True, args=args, run=run,
                        save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
