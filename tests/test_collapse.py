"""CollapseAlarm: warns, or stops cleanly with a checkpoint, when the keyword drifts into the special-token tail."""

import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from helpers import make_trainer, star_data, ti_module
from tea_lightning.callbacks import CollapseAlarm, Export
from tea_lightning.textual_inversion import TextualInversion


def with_vector(module, vector: torch.Tensor):
    with torch.no_grad():
        module.learned.vectors.copy_(vector)
    return module


def special_tail_keyword():
    """A keyword pointing at its concept word but as long as `<|endoftext|>`: in the tail, not turned away."""
    module = ti_module(lr=0.0)
    eos = module.text_encoder.get_input_embeddings().weight[module.tokenizer.eos_token_id]
    concept = module.concept_vector
    return with_vector(module, concept * (eos.norm() / concept.norm()))


def turned_away_keyword():
    """A keyword as long as its concept word but orthogonal to it: turned away, not in the tail."""
    module = ti_module(lr=0.0)
    concept = module.concept_vector
    other = torch.randn(concept.shape, generator=torch.Generator().manual_seed(0))
    orthogonal = other - (other @ concept) / (concept @ concept) * concept
    return with_vector(module, orthogonal * (concept.norm() / orthogonal.norm()))


def test_alarm_warns_when_the_keyword_norm_enters_the_special_token_tail(tmp_path):
    module = special_tail_keyword()
    with pytest.warns(UserWarning, match=r"CollapseAlarm at step 1: .*above 99\.9\d% of vocabulary norms") as caught:
        make_trainer(tmp_path, max_steps=1, callbacks=[CollapseAlarm(every_n_steps=1)]).fit(module, star_data())
    assert not any("cos(V*" in str(w.message) for w in caught), "the direction was fine"


def test_alarm_warns_when_the_keyword_turns_away_from_its_concept_word(tmp_path):
    module = turned_away_keyword()
    with pytest.warns(UserWarning, match=r"CollapseAlarm at step 1: .*cos\(V\*, 'star'\) = -?0\.0\d\d \(limit 0\.2\)"):
        make_trainer(tmp_path, max_steps=1, callbacks=[CollapseAlarm(every_n_steps=1)]).fit(module, star_data())


def test_alarm_stays_quiet_while_the_keyword_is_healthy(tmp_path):
    module = ti_module(lr=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, max_steps=2, callbacks=[CollapseAlarm(every_n_steps=1)]).fit(
            module, star_data(batch_size=1))
    assert [str(w.message) for w in caught if "CollapseAlarm" in str(w.message)] == []


def test_stop_action_ends_the_run_with_a_checkpoint_and_a_final_export(tmp_path):
    module = special_tail_keyword()
    alarm = CollapseAlarm(every_n_steps=2, action="stop")
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=100)
    trainer = make_trainer(tmp_path, max_steps=10, callbacks=[alarm, checkpoints, Export(every_n_steps=0)],
                           enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"Stopping \(action='stop'\); checkpoint saved to .*collapse-step=000002"):
        trainer.fit(module, star_data(batch_size=1))

    assert trainer.global_step == 2 and alarm.stopped_at == 2
    assert trainer.state.finished, "the run should end normally, not crash"
    saved = torch.load(tmp_path / "checkpoints" / "collapse-step=000002.ckpt", weights_only=False)
    assert saved["global_step"] == 2
    torch.testing.assert_close(saved["state_dict"]["learned.vectors"], module.learned.vectors.detach(), rtol=0, atol=0)
    assert (tmp_path / "exports" / "final" / "learned_embeds.safetensors").is_file()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"every_n_steps": 0}, r"every_n_steps=0"),
    ({"max_norm_percentile": 100.5}, r"max_norm_percentile=100.5.*0 to 100"),
    ({"max_norm_percentile": -1}, r"max_norm_percentile=-1"),
    ({"min_cosine": 1.5}, r"min_cosine=1.5.*-1 to 1"),
    ({"action": "halt"}, r"action='halt'.*\['warn', 'stop'\]"),
])
def test_bad_alarm_settings_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CollapseAlarm(**kwargs)


def test_alarm_on_a_method_without_learned_vectors_is_refused_before_training(tmp_path):
    class NoTokens(TextualInversion):
        def learned_vectors(self):
            raise NotImplementedError

    module = NoTokens(concept_word="star", pretrained="tiny")
    with pytest.raises(ValueError, match="CollapseAlarm watches learned token vectors, but NoTokens learns none"):
        make_trainer(tmp_path, max_steps=1, callbacks=[CollapseAlarm()]).fit(module, star_data())
