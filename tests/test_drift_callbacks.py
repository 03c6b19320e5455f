"""The drift callbacks on tiny runs: what they log and when, that they change nothing, and bad input."""

import logging
import re
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import RecordingLogger, adamw, lora_module, make_trainer, star_data, ti_module
from tea_lightning import drift
from tea_lightning.adapters import adapters_disabled
from tea_lightning.callbacks import ContextualDrift, EmbeddingDrift
from tea_lightning.module import DiffusionModule
from tea_lightning.prompt_sets import contextual_set, fill, simple_set
from tea_lightning.textual_inversion import TextualInversion

VECTOR_KEYS = {f"drift/{k}" for k in ("norm", "concept_norm", "norm_ratio", "cosine_concept", "angle_concept_deg",
                                      "cosine_initial", "norm_percentile")}
SET_KEYS = {f"drift_sets/{k}" for k in ("inter_l2", "inter_hausdorff", "inter_mahalanobis", "inter_kl", "intra_l2",
                                        "intra_hausdorff", "intra_spread", "simple_l2", "simple_hausdorff",
                                        "simple_mahalanobis", "simple_kl")}


def _drift_keys(metrics: dict) -> set:
    return {k for k in metrics if k.startswith("drift")}


def test_callbacks_log_every_documented_key_at_step_0_and_every_n_steps(drift_run):
    run, logged, _ = drift_run
    assert {step: _drift_keys(m) for step, m in logged.items() if _drift_keys(m)} == {
        0: VECTOR_KEYS | SET_KEYS, 2: VECTOR_KEYS | SET_KEYS, 4: VECTOR_KEYS | SET_KEYS}
    events = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0}).Reload()
    assert VECTOR_KEYS | SET_KEYS <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("drift/vocab_norms")] == [0, 2, 4]


def test_drift_starts_at_zero_and_grows_as_the_vector_trains(drift_run):
    _, logged, _ = drift_run
    start, end = logged[0], logged[4]
    # Textual Inversion starts V* at the concept row: the same vector, so P(V*) and P(c) are the same sentences.
    assert start["drift/norm_ratio"] == pytest.approx(1) and start["drift/cosine_initial"] == pytest.approx(1)
    assert start["drift_sets/inter_hausdorff"] == pytest.approx(0, abs=1e-5)
    assert start["drift_sets/inter_kl"] == pytest.approx(0, abs=1e-7)
    assert start["drift_sets/inter_l2"] == pytest.approx(start["drift_sets/intra_l2"])  # mean over all pairs
    assert end["drift/cosine_initial"] < 0.99 and end["drift/norm_ratio"] != pytest.approx(1)
    assert end["drift_sets/inter_hausdorff"] > 1e-3


def test_logged_set_distances_match_the_trained_module_encoded_from_scratch(drift_run):
    _, logged, module = drift_run
    expected = _distances_from_scratch(module, contextual_set("toy"))
    for key in ("inter_l2", "intra_hausdorff", "simple_mahalanobis", "inter_kl"):
        assert logged[4][f"drift_sets/{key}"] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key


def _distances_from_scratch(module, templates: list[str]) -> dict[str, float]:
    """Each set encoded now in one call, the last position: no cache, no batching, no pooling helper."""
    def encode(prompts):
        with torch.no_grad():
            return module.encode_prompts(prompts)[:, -1]

    p_keyword = encode([fill(t, module.keyword) for t in templates])
    p_concept = encode([fill(t, module.concept_word) for t in templates])
    s_keyword = encode([fill(t, module.keyword) for t in simple_set()])
    return {"inter_l2": drift.l2_distance(p_keyword, p_concept).item(),
            "intra_hausdorff": drift.intra_hausdorff(p_keyword).item(),
            "simple_mahalanobis": drift.mahalanobis_distance(p_keyword, s_keyword, drift.DEFAULT_SHRINKAGE).item(),
            "inter_kl": drift.kl_divergence(p_keyword, p_concept).item()}


class NoisyTextualInversion(TextualInversion):
    """Textual Inversion whose training noise comes from the global RNG and whose text encoding draws from it (as
    dropout does), and which records the text encoder's train/eval flag at every step."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.encoder_modes: list[bool] = []

    def step_generator(self, batch_idx: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))

    def encode_prompts(self, prompts):
        torch.rand(1)
        return super().encode_prompts(prompts)

    def training_step(self, batch, batch_idx):
        self.encoder_modes.append(self.text_encoder.training)
        return super().training_step(batch, batch_idx)


def _noisy_run(tmp_path, callbacks) -> NoisyTextualInversion:
    module = NoisyTextualInversion(concept_word="star", pretrained="tiny", optimizer=adamw(5e-2))
    module.text_encoder.train()  # as a text encoder with LoRA dropout trains
    torch.manual_seed(0)
    make_trainer(tmp_path, max_steps=4, callbacks=callbacks).fit(module, star_data())
    return module


def test_a_run_with_the_callbacks_ends_with_the_same_trainables_as_one_without(tmp_path):
    plain = _noisy_run(tmp_path / "plain", [])
    watched = _noisy_run(tmp_path / "watched", [EmbeddingDrift(every_n_steps=1),
                                                 ContextualDrift(every_n_steps=1, prompt_set="toy")])
    torch.testing.assert_close(watched.learned.vectors, plain.learned.vectors, rtol=0, atol=0)
    assert watched.encoder_modes == [True] * 4, "measuring left the text encoder in eval mode"


class TextEncoderTuning(DiffusionModule):
    """Stands in for DreamBooth with text-encoder LoRA: `sks star` in prompts, the text encoder's last layer norm
    trains, no token vectors are learned."""

    method = "text_encoder_tuning"
    concept_word = "star"
    trains_text_encoder = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.text_encoder.final_layer_norm.requires_grad_(True)

    @property
    def keyword(self) -> str:
        return "sks star"


class UNetTuning(DiffusionModule):
    """Stands in for UNet-only DreamBooth LoRA: only a UNet layer trains."""

    method = "unet_tuning"
    concept_word = "star"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.unet.conv_out.requires_grad_(True)

    @property
    def keyword(self) -> str:
        return "sks star"


def test_prompt_level_drift_follows_a_training_text_encoder(tmp_path):
    module = TextEncoderTuning(pretrained="tiny", optimizer=adamw(5e-2))
    recorder = RecordingLogger()
    callbacks = [EmbeddingDrift(every_n_steps=2), ContextualDrift(every_n_steps=2, prompt_set="toy")]
    make_trainer(tmp_path, max_steps=4, callbacks=callbacks, logger=recorder).fit(module, star_data())
    logged = recorder.by_step()
    assert {s for s, m in logged.items() if _drift_keys(m)} == {0, 2, 4}
    assert not any(VECTOR_KEYS & _drift_keys(m) for m in logged.values()), "no token vectors: no vector drift"
    # P(c) moves with the encoder; a P(c) encoded once at the start would give other inter-set distances.
    expected = _distances_from_scratch(module, contextual_set("toy"))
    assert logged[4]["drift_sets/inter_l2"] == pytest.approx(expected["inter_l2"], rel=1e-4)
    assert logged[4]["drift_sets/inter_kl"] == pytest.approx(expected["inter_kl"], rel=1e-3, abs=1e-7)


def test_dreambooth_drift_as_the_authors_defined_it_starts_at_zero_and_matches_base_vs_adapted_encoding(tmp_path):
    module = lora_module(lr=5e-2)
    recorder = RecordingLogger()
    make_trainer(tmp_path, max_steps=4, callbacks=[ContextualDrift(every_n_steps=2, prompt_set="toy")],
                 logger=recorder).fit(module, star_data())
    logged = recorder.by_step()
    base_keys = {f"drift_sets/base_{m}" for m in ("paired_l2", "cosine", "l2", "hausdorff", "mahalanobis", "kl")}
    assert all(base_keys <= set(logged[step]) for step in (0, 2, 4)), "the authors' DreamBooth drift was not logged"
    # The LoRA starts as the identity, so base and adapted encodings agree at step 0.
    assert logged[0]["drift_sets/base_paired_l2"] == 0 and logged[0]["drift_sets/base_cosine"] == pytest.approx(1)
    assert logged[0]["drift_sets/base_hausdorff"] == 0 and logged[0]["drift_sets/base_kl"] == 0
    assert logged[4]["drift_sets/base_paired_l2"] > 0
    templates = [fill(t, module.keyword) for t in contextual_set("toy")]
    with torch.no_grad():
        adapted = module.encode_prompts(templates)[:, -1]
        with adapters_disabled(module.text_encoder):
            base = module.encode_prompts(templates)[:, -1]
    assert logged[4]["drift_sets/base_paired_l2"] == pytest.approx((adapted - base).norm(dim=1).mean().item(), rel=1e-4)
    assert logged[4]["drift_sets/base_l2"] == pytest.approx(drift.l2_distance(adapted, base).item(), rel=1e-4)
    assert logged[4]["drift_sets/base_kl"] == pytest.approx(drift.kl_divergence(adapted, base).item(), rel=1e-3,
                                                            abs=1e-7)


def test_unet_only_training_says_once_that_text_drift_is_zero_and_logs_none(tmp_path, caplog):
    module = UNetTuning(pretrained="tiny", optimizer=adamw(1e-3))
    recorder = RecordingLogger()
    callbacks = [EmbeddingDrift(every_n_steps=1), ContextualDrift(every_n_steps=1)]
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, max_steps=2, callbacks=callbacks, logger=recorder).fit(module, star_data())
    assert not any(_drift_keys(m) for m in recorder.by_step().values())
    assert sum("zero by construction" in r.getMessage() for r in caplog.records) == 2  # one per callback


@pytest.mark.parametrize("callback", [EmbeddingDrift(every_n_steps=2), ContextualDrift(every_n_steps=2)])
def test_only_rank_zero_measures(callback):
    module = mock.MagicMock()
    trainer = SimpleNamespace(is_global_zero=False, global_step=2, loggers=[])
    callback.on_train_batch_end(trainer, module, None, None, 0)
    assert module.mock_calls == []


def _prompt_file(tmp_path, text: str) -> str:
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda tmp: EmbeddingDrift(every_n_steps=0), "every_n_steps=0"),
    (lambda tmp: ContextualDrift(every_n_steps=-5), "every_n_steps=-5"),
    (lambda tmp: ContextualDrift(hidden_state="first"), "hidden_state='first') does not exist"),
    (lambda tmp: ContextualDrift(prompt_set=_prompt_file(tmp, "a {} on a bench\na dog on a bench\n")),
     "prompts.txt:2: template 'a dog on a bench' has no '{}'"),
    (lambda tmp: ContextualDrift(simple_set=_prompt_file(tmp, "a {} and a {}\na {}\n")), "prompts.txt:1:"),
    (lambda tmp: ContextualDrift(prompt_set=_prompt_file(tmp, "# nothing here\n\n")), "no templates found"),
    (lambda tmp: ContextualDrift(prompt_set=_prompt_file(tmp, "a {} alone\n")), "at least 2"),
    (lambda tmp: ContextualDrift(prompt_set=str(tmp / "missing.txt")), "missing.txt"),
])
def test_bad_input_is_refused_when_the_callback_is_made(tmp_path, make, message):
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        make(tmp_path)


def test_a_concept_without_a_shipped_set_is_refused_before_training_with_the_fix():
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, loggers=[])
    with pytest.raises(ValueError, match=r"concept_word='star'.*Set prompt_set"):
        ContextualDrift().setup(trainer, ti_module(), "fit")  # the tiny module's concept word is "star"
