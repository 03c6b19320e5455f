"""The mini world: where semantic collapse and TEA's repair can be watched offline, with no real weights and no GPU.

- `scenes`: seeded 32 px scenes of coloured shapes with captions, and their DataModule;
- `world`: the world's model (a stock `StableDiffusionPipeline` at toy size, shipped as package data in
  `tea_lightning/models/mini/` and loaded with `pretrained: mini`), making, shipping and evaluating it;
- `readout`: attribute classifiers that read what an image of the world shows (the offline counterpart of CLIP);
- `full_finetune`: `FullFineTune`, training a whole UNet and text encoder on captioned scenes;
- `experiment`: the paper's story in miniature, one command, one report.

The world depends on the core of tea-lightning; nothing in the core imports it.
"""
