"""Min-SNR-γ loss weighting (`model.init_args.snr_gamma`): every prediction type weights its clean-image error alike."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from helpers import ti_module
from tea_lightning.module import min_snr_weight


@pytest.mark.parametrize("floor", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_every_prediction_type_weights_its_implied_clean_image_error_by_min_snr_gamma(prediction_type, floor):
    # If this broke, switching a model between epsilon, v and x0 prediction would silently change what training
    # emphasises, and `snr_gamma: 5` would not mean what the Min-SNR paper and diffusers' scripts mean by it.
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    torch.manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 10, 150, 400, 700, 999])
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = scheduler.add_noise(x0, noise, t)
    x0_hat = x0 + 0.1 * torch.randn_like(x0)  # a prediction of the clean image, expressed in each parametrisation
    eps_hat = (noisy - a.sqrt() * x0_hat) / (1 - a).sqrt()
    prediction, target = {
        "epsilon": (eps_hat, noise),
        "v_prediction": (a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat, scheduler.get_velocity(x0, noise, t)),
        "sample": (x0_hat, x0),
    }[prediction_type]
    target_error = F.mse_loss(prediction, target, reduction="none").mean(dim=(1, 2, 3))
    clean_error = F.mse_loss(x0_hat, x0, reduction="none").mean(dim=(1, 2, 3))
    snr = (a / (1 - a)).flatten()
    weights = min_snr_weight(scheduler.alphas_cumprod, t, prediction_type, gamma=5.0, floor=floor)
    torch.testing.assert_close(weights * target_error, snr.clamp(min=floor, max=5.0) * clean_error, rtol=1e-3,
                               atol=1e-6)


def test_the_training_loss_is_the_plain_loss_times_the_weights_of_the_drawn_timesteps():
    plain, weighted = ti_module(), ti_module(snr_gamma=2.0)
    latents, states = torch.randn(4, 4, 8, 8), plain.encode_prompts(["a photo of a <v>"] * 4).detach()
    with torch.no_grad():
        unweighted = plain.diffusion_loss(latents, states, torch.Generator().manual_seed(5))
        loss = weighted.diffusion_loss(latents, states, torch.Generator().manual_seed(5))
    draws = torch.Generator().manual_seed(5)
    torch.randn(latents.shape, generator=draws)  # the step's noise comes first, then its timesteps
    t = torch.randint(0, 1000, (4,), generator=draws)
    scheduler = plain.noise_scheduler
    expected = unweighted * min_snr_weight(scheduler.alphas_cumprod, t, scheduler.config.prediction_type, 2.0)
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, unweighted)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"snr_gamma": 0.0}, "model.snr_gamma=0.0 must be positive"),
    ({"snr_gamma": -5.0}, "model.snr_gamma=-5.0 must be positive"),
    ({"snr_floor": 1.0}, "model.snr_floor=1.0 needs model.snr_gamma set"),
    ({"snr_gamma": 5.0, "snr_floor": 5.0}, r"must lie in \[0, snr_gamma\)"),
    ({"snr_gamma": 5.0, "snr_floor": -1.0}, "model.snr_floor=-1.0"),
])
def test_bad_loss_weighting_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ti_module(**kwargs)
