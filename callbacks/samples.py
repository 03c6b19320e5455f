"""Sample images while training: the baseline beside TEA, from fixed seeds, every N steps."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from tea_lightning.callbacks.export import check_every_n_steps, run_dir
from tea_lightning.export import write_png
from tea_lightning.prompt_sets import check_template

DEFAULT_PROMPTS = ("a photo of a {}", "a photo of a {} wearing glasses and playing guitar")


class SampleImages(L.Callback):
    """Every `every_n_steps`, a grid of images of a simple and a complex prompt, without and with TEA (one column
    each, one row per prompt and image), logged to TensorBoard as `samples` and saved as
    `<run>/samples/step-NNNNNN.png`. The seeds are fixed, so grids of different steps differ only by training.

    Rank 0 only, under `no_grad`, on the module's own parts in their precision (through `tea_lightning.inference`,
    the code `infer.py` runs); the module's train/eval modes and the RNG states are restored afterwards, so a run
    with this callback ends with the same trained tensors as one without.

    Args:
        every_n_steps: Optimiser steps between grids (1 or more).
        prompts: Templates with one `{}` for the keyword; default: a simple and a complex prompt.
        rho: TEA rotation factor of the TEA column, in [0, 1].
        alpha: TEA norm factor of the TEA column, in [0, 1].
        num_images: Images per prompt.
        steps: Denoising steps (a preview needs fewer than a final image).
        guidance: Classifier-free guidance scale.
        resolution: Image size in pixels; default: the model's.
        seed: Seed of the images (fixed across steps).
        scheduler: dpm (DPM-Solver multistep), ddim, euler, euler_a, pndm or ddpm.
    """

    def __init__(self, every_n_steps: int = 100, prompts: list[str] | None = None, rho: float = 0.2,
                 alpha: float = 0.5, num_images: int = 1, steps: int = 25, guidance: float = 7.0,
                 resolution: int | None = None, seed: int = 0, scheduler: str = "dpm") -> None:
        from tea_lightning.inference import SCHEDULERS, check_factors

        check_every_n_steps(every_n_steps, "SampleImages")
        if num_images < 1 or steps < 1:
            raise ValueError(f"num_images={num_images} and steps={steps} must both be 1 or more.")
        self.prompts = list(prompts or DEFAULT_PROMPTS)
        for template in self.prompts:
            problem = check_template(template)
            if problem:
                raise ValueError(f"SampleImages prompt {template!r} has {problem}; write one '{{}}' where the keyword "
                                 "goes, e.g. 'a photo of a {}'.")
        check_factors("rho", [rho])
        check_factors("alpha", [alpha])
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler={scheduler!r} is not one of {sorted(SCHEDULERS)}.")
        self.every_n_steps, self.rho, self.alpha = every_n_steps, rho, alpha
        self.num_images, self.steps, self.guidance = num_images, steps, guidance
        self.resolution, self.seed, self.scheduler = resolution, seed, scheduler
        self._last_step = -1

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # With gradient accumulation this hook runs once per micro-batch; sample once per optimiser step.
        step = trainer.global_step
        if step and step != self._last_step and step % self.every_n_steps == 0:
            self.sample(trainer, pl_module)
        self._last_step = step

    @rank_zero_only
    def sample(self, trainer: L.Trainer, module: L.LightningModule):
        """Make, log and save the grid of the module's current state; returns it (a PIL image)."""
        from tea_lightning.inference import sample_grid

        modes = {m: m.training for m in module.modules()}
        devices = [module.device.index or 0] if module.device.type == "cuda" else []
        module.eval()
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                grid = sample_grid(module, self.prompts, rho=self.rho, alpha=self.alpha, num_images=self.num_images,
                                   seed=self.seed, steps=self.steps, guidance=self.guidance,
                                   resolution=self.resolution, scheduler=self.scheduler)
        finally:
            for m, training in modes.items():
                m.train(training)
        step = trainer.global_step
        for logger in trainer.loggers:
            if hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
                logger.experiment.add_image("samples", np.asarray(grid), step, dataformats="HWC")
        write_png(grid, run_dir(trainer) / "samples" / f"step-{step:06d}.png")
        return grid
