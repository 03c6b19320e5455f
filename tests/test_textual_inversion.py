"""Textual Inversion end to end on the tiny model: what trains, what stays frozen, exports, resume, precision."""

import copy
import shutil

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from helpers import STAR_IMAGES, adamw, make_trainer, star_data, ti_module
from tea_lightning.callbacks import Export
from tea_lightning.export import read_tea_json
from tea_lightning.prompt_sets import fill
from tea_lightning.regularizers import Regularizer
from tea_lightning.tiny import tiny_pipeline


def test_only_the_new_vectors_train_and_every_frozen_weight_is_bit_identical(tmp_path):
    module = ti_module(lr=5e-2)
    frozen_before = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith("learned.")}
    start = module.learned.vectors.detach().clone()

    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["learned.vectors"]
    make_trainer(tmp_path, max_steps=5).fit(module, star_data())

    assert not torch.equal(module.learned.vectors, start), "the learned vectors did not move"
    frozen_after = {k: v for k, v in module.state_dict().items() if not k.startswith("learned.")}
    changed = [k for k in frozen_before if not torch.equal(frozen_before[k], frozen_after[k])]
    assert changed == []


def test_the_concept_row_is_the_word_final_token_not_the_subword():
    module = ti_module()
    tokenizer = module.tokenizer
    word_final = tokenizer.convert_tokens_to_ids("star</w>")
    subword = tokenizer.convert_tokens_to_ids("star")
    rows = module.text_encoder.get_input_embeddings().weight
    assert word_final != subword
    assert torch.equal(module.concept_vector, rows[word_final].float())
    assert not torch.equal(module.concept_vector, rows[subword].float())


def _fixed_loss(module, data, draws: int = 16) -> float:
    """The loss over fixed (noise, timestep) draws of one image: comparable before and after training."""
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        latents = module.encode_images(batch["pixel_values"], torch.Generator().manual_seed(0))
        states = module.encode_prompts([fill(t, module.keyword) for t in batch["template"]])
        losses = [module.diffusion_loss(latents, states, torch.Generator().manual_seed(i)).mean() for i in range(draws)]
    return float(torch.stack(losses).mean())


def test_loss_falls_when_overfitting_one_image(tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(STAR_IMAGES / "00.png", one / "star.png")
    module = ti_module(lr=0.1, num_vectors=4)
    data = star_data(instance_dir=str(one), flip_p=0.0, batch_size=4)
    before = _fixed_loss(module, data)
    make_trainer(tmp_path, max_steps=40).fit(module, data)
    after = _fixed_loss(module, data)
    # Same draws before and after, so the difference is the vectors' doing alone (untrained vectors give exactly
    # `before`). The tiny UNet is random, so the fall is about 1%, not the large fall of a real model.
    assert after < before - 2e-3, (before, after)


def test_export_loads_in_stock_diffusers_and_matches_the_trained_vectors(tmp_path):
    module = ti_module(lr=5e-2, num_vectors=2)
    make_trainer(tmp_path, max_steps=3, callbacks=[Export(every_n_steps=0)]).fit(module, star_data())
    folder = tmp_path / "exports" / "final"
    trained = module.learned.vectors.detach()

    pipe = tiny_pipeline()
    pipe.load_textual_inversion(str(folder))
    table = pipe.text_encoder.get_input_embeddings().weight
    ids = pipe.tokenizer.convert_tokens_to_ids(["<v>", "<v>_1"])
    torch.testing.assert_close(table[ids], trained, rtol=0, atol=0)

    a1111 = load_file(folder / "v.safetensors")
    torch.testing.assert_close(a1111["emb_params"], trained, rtol=0, atol=0)
    pipe_a = tiny_pipeline()
    pipe_a.load_textual_inversion(str(folder / "v.safetensors"), token="<w>")
    rows = pipe_a.text_encoder.get_input_embeddings().weight[pipe_a.tokenizer.convert_tokens_to_ids(["<w>", "<w>_1"])]
    torch.testing.assert_close(rows, trained, rtol=0, atol=0)


def test_exports_are_step_stamped_and_record_the_concept(tmp_path):
    module = ti_module()
    make_trainer(tmp_path, max_steps=4, callbacks=[Export(every_n_steps=2)]).fit(module, star_data())
    exports = sorted(p.name for p in (tmp_path / "exports").iterdir())
    assert exports == ["final", "step-000000", "step-000002", "step-000004"]
    info = read_tea_json(tmp_path / "exports" / "step-000002")
    assert (info["method"], info["keyword"], info["concept_word"], info["step"]) == (
        "textual_inversion", "<v>", "star", 2)
    start = load_file(tmp_path / "exports" / "step-000000" / "learned_embeds.safetensors")["<v>"]
    torch.testing.assert_close(start[0], module.concept_vector)


def test_resumed_run_ends_with_the_same_vectors_as_an_uninterrupted_one(tmp_path):
    straight = ti_module(lr=5e-2)
    make_trainer(tmp_path / "a", max_steps=8).fit(straight, star_data())

    first = ti_module(lr=5e-2)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    make_trainer(tmp_path / "b", max_steps=3, callbacks=[checkpoint], enable_checkpointing=True).fit(first, star_data())
    ckpt = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert ckpt.stat().st_size < 100_000, "checkpoints must hold the trainable tensors only"

    resumed = ti_module(lr=5e-2)
    make_trainer(tmp_path / "c", max_steps=8).fit(resumed, star_data(), ckpt_path=str(ckpt))
    torch.testing.assert_close(resumed.learned.vectors, straight.learned.vectors, rtol=0, atol=0)


def test_bf16_mixed_trains_with_fp32_trainables(tmp_path):
    module = ti_module()
    trainer = make_trainer(tmp_path, max_steps=2, precision="bf16-mixed")
    trainer.fit(module, star_data())
    assert module.learned.vectors.dtype == torch.float32
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


class _Poison(Regularizer):
    name = "poison"

    def __init__(self, at_call: int) -> None:
        self.calls, self.at_call = 0, at_call

    def __call__(self, vectors, concept):
        self.calls += 1
        return vectors.sum() * (float("nan") if self.calls >= self.at_call else 0.0)


def test_a_non_finite_loss_stops_the_run_and_nothing_non_finite_is_exported(tmp_path):
    module = ti_module(regularizers=[_Poison(at_call=3)])
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[Export(every_n_steps=2)])
    with pytest.raises(FloatingPointError, match="loss became nan at step 3"):
        trainer.fit(module, star_data())
    exported = sorted((tmp_path / "exports").glob("step-*"))
    assert [p.name for p in exported] == ["step-000000", "step-000002"]
    for folder in exported:
        assert torch.isfinite(load_file(folder / "learned_embeds.safetensors")["<v>"]).all()


def test_the_exporter_refuses_non_finite_vectors(tmp_path):
    module = ti_module()
    with torch.no_grad():
        module.learned.vectors[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="holds NaN or inf"):
        module.export(tmp_path, step=1)
    assert list(tmp_path.iterdir()) == []


def test_regulariser_values_are_added_to_the_loss_and_logged(tmp_path):
    class Offset(Regularizer):
        name = "offset"

        def __call__(self, vectors, concept):
            return (vectors * 0).sum() + 10.0

    plain, shifted = ti_module(), ti_module(regularizers=[Offset()])
    for module in (plain, shifted):
        trainer = make_trainer(tmp_path, max_steps=1)
        trainer.fit(module, star_data())
        module.metrics = copy.copy(trainer.callback_metrics)
    assert float(shifted.metrics["train/offset"]) == 10.0
    assert float(shifted.metrics["train/loss"]) == pytest.approx(float(plain.metrics["train/loss"]) + 10.0, rel=1e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"placeholder": "dog"}, "already in the vocabulary"),
    ({"placeholder": "<|endoftext|>"}, "already in the vocabulary"),
    ({"concept_word": "teddy bear"}, r"is 2 tokens \['teddy</w>', 'bear</w>'\]"),
    ({"num_vectors": 0}, "num_vectors=0"),
])
def test_bad_textual_inversion_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ti_module(**kwargs)


def test_adamw_sees_only_the_learned_vectors():
    module = ti_module()
    module.optimizer_factory = adamw(1e-3)
    optimizer = module.configure_optimizers()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 1 and params[0] is module.learned.vectors
