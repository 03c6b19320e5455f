"""The training-step benchmark (`bench/`): the reference trains what tea-lightning trains, and the script runs."""

import functools

import lightning as L
import torch

from bench import train_step
from bench.reference import ReferenceStep, Template
from helpers import make_trainer, star_data, ti_module


class _Record(L.Callback):
    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(outputs["loss"].detach().clone())


def test_reference_step_computes_our_loss_and_trains_the_same_vectors(tmp_path):
    # Weight decay on: the reference must restore the frozen rows it decays, and decay the learned row as we do.
    ours = ti_module(optimizer=functools.partial(torch.optim.AdamW, lr=5e-2, weight_decay=1e-2), seed=3)
    reference = ReferenceStep(Template.of(ours), torch.device("cpu"), "32", lr=5e-2, weight_decay=1e-2)
    frozen_before = reference.text_encoder.get_input_embeddings().weight.detach().clone()
    record = _Record()

    make_trainer(tmp_path, max_steps=3, callbacks=[record]).fit(ours, star_data(batch_size=2))
    batches = iter(star_data(batch_size=2).train_dataloader())
    reference_losses = [reference.step(next(batches)) for _ in range(3)]

    torch.testing.assert_close(torch.stack(reference_losses), torch.stack(record.losses), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference.learned_rows(), ours.learned.vectors.detach(), rtol=1e-5, atol=1e-6)
    rows = reference.text_encoder.get_input_embeddings().weight.detach()
    frozen = torch.ones(len(rows), dtype=torch.bool)
    frozen[reference.new_ids] = False
    assert torch.equal(rows[frozen], frozen_before[frozen]), "the reference let weight decay move frozen rows"


def test_benchmark_runs_on_the_tiny_model_and_prints_the_table(capsys):
    results = train_step.main(["--arch", "tiny", "--method", "all", "--steps", "2", "--warmup", "1"])

    out = capsys.readouterr().out
    assert "| contestant | steps/s | ×ref | peak MiB (steps)" in out
    ran = [r for r in results if not r.get("skipped")]
    assert {r["contestant"] for r in ran if r["method"] == "ti"} == {"ours", "reference"}
    for row in ran:
        assert row["error"] is None, row["error"]
        assert row["steps_per_s"] > 0 and row["steps"] == 2
        assert f"| {row['contestant']} | {row['steps_per_s']:.3g} |" in out
    for row in results:
        if row.get("skipped"):
            assert "skipped" in out and row["method"] in ("lora", "cd")
