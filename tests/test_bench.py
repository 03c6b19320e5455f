"""The training-step benchmark (`bench/`): the reference trains what tea-lightning trains, and the script runs."""

import functools

import lightning as L
import pytest
import torch

from bench import train_step
from bench.reference import ReferenceStep, Template
from helpers import make_trainer, star_data


class _Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def _method(name: str):
    try:
        return train_step.method_class(name)
    except train_step.MethodUnavailable as error:
        pytest.skip(str(error))


@pytest.mark.parametrize("method", list(train_step.METHODS))
def test_reference_step_computes_our_loss_and_trains_the_same_tensors(tmp_path, method):
    _assert_reference_trains_what_we_train(tmp_path, method, "tiny")


@pytest.mark.parametrize("method", list(train_step.METHODS))
def test_the_sdxl_reference_step_computes_our_loss_and_trains_the_same_tensors(tmp_path, method):
    _assert_reference_trains_what_we_train(tmp_path, method, "tiny-sdxl")


def _assert_reference_trains_what_we_train(tmp_path, method: str, pretrained: str) -> None:
    # Weight decay on: the reference must restore (TI) or shield (CD) the frozen rows it holds in its optimiser.
    # A large epsilon keeps Adam from blowing rounding-level gradient differences up to whole steps where a gradient
    # is near zero (LoRA's up weights start at zero), so the trained tensors can be compared closely.
    adam = dict(lr=5e-2, weight_decay=1e-2, eps=1e-3)
    ours = _method(method)(pretrained=pretrained, seed=3, optimizer=functools.partial(torch.optim.AdamW, **adam),
                           **train_step.METHODS[method].kwargs)
    reference = ReferenceStep(Template.of(ours), torch.device("cpu"), "32", **adam)
    rows_before = [e.get_input_embeddings().weight.detach().clone() for e in reference.text_encoders]
    record = _Record()

    make_trainer(tmp_path, max_steps=3, callbacks=[record]).fit(ours, star_data(batch_size=1))
    batches = iter(star_data(batch_size=1).train_dataloader())
    reference_losses = [reference.step(next(batches)) for _ in range(3)]

    torch.testing.assert_close(torch.stack(reference_losses), torch.stack(record.losses), rtol=1e-4, atol=1e-6)
    close = dict(rtol=1e-3, atol=1e-4)  # lr 5e-2: a fraction of a percent of one step
    trained = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    encoders = zip(("text_encoder", "text_encoder_2"), reference.text_encoders, strict=False)
    models = {"unet": reference.unet, **dict(encoders)}
    for prefix, model in models.items():  # LoRA / Custom Diffusion tensors, same names on both sides
        for name, p in model.named_parameters():
            if p.requires_grad and f"{prefix}.{name}" in trained:
                torch.testing.assert_close(p.detach(), trained[f"{prefix}.{name}"].detach(), **close)
    for e, encoder in enumerate(reference.text_encoders):
        if reference.encoder_ids[e]:  # TI placeholder / CD modifier rows
            torch.testing.assert_close(reference.learned_rows(e), ours.learned_vectors(e)[0].detach(), **close)
            rows = encoder.get_input_embeddings().weight.detach()
            frozen = torch.ones(len(rows), dtype=torch.bool)
            frozen[reference.encoder_ids[e]] = False
            if method == "ti":  # textual_inversion.py restores them bit for bit
                assert torch.equal(rows[frozen], rows_before[e][frozen]), "weight decay moved frozen rows"


def test_benchmark_runs_on_the_tiny_model_and_prints_the_table(capsys):
    results = train_step.main(["--arch", "tiny", "--method", "ti", "--steps", "2", "--warmup", "1"])

    out = capsys.readouterr().out
    assert "| contestant | steps/s | ×ref | peak MiB (steps)" in out
    assert {r["contestant"] for r in results} == {"ours", "reference"}
    for row in results:
        assert row["error"] is None, row["error"]
        assert row["steps_per_s"] > 0 and row["steps"] == 2
        assert f"| {row['contestant']} | {row['steps_per_s']:.3g} |" in out
