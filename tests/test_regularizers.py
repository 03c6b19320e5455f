"""Training-time regularisation: norm and direction penalties, and the spherical (fixed-norm) parametrisation."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

import train
from helpers import ROOT, make_trainer, star_data, ti_module
from tea_lightning.callbacks import CollapseAlarm, Export
from tea_lightning.drift import cosine
from tea_lightning.regularizers import DirectionPenalty, NormPenalty
from tea_lightning.textual_inversion import TextualInversion


class NormsAfterEachStep(L.Callback):
    """Records the learned rows' norms `[k]` after every optimiser step."""

    def __init__(self) -> None:
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.norms.append(pl_module.learned.vectors.detach().norm(dim=-1).clone())


def norm_ratio(module) -> float:
    vectors, concept = module.learned_vectors()
    return float((vectors.norm(dim=-1) / concept.norm(dim=-1)).mean())


def test_high_lr_grows_the_keyword_norm_and_norm_penalty_ends_it_lower(tmp_path):
    ratios = {}
    for name, regularizers in (("free", []), ("penalised", [NormPenalty(weight=1e-3, max_ratio=1.5)])):
        module = ti_module(lr=5e-2, regularizers=regularizers)
        make_trainer(tmp_path / name, max_steps=6).fit(module, star_data(batch_size=1))
        ratios[name] = norm_ratio(module)
    assert ratios["free"] > 2.0, f"the unconstrained keyword should drift in norm at lr 5e-2: {ratios}"
    assert ratios["penalised"] < ratios["free"] - 0.5, ratios


def test_spherical_norm_equals_the_concept_norm_after_every_step_and_in_the_export(tmp_path):
    module = ti_module(lr=5e-2, num_vectors=2, parametrization="spherical")
    target = float(module.concept_vector.norm())
    start = module.learned.vectors.detach().clone()
    recorder = NormsAfterEachStep()
    make_trainer(tmp_path, max_steps=4, callbacks=[recorder, Export(every_n_steps=0)]).fit(module, star_data())

    assert len(recorder.norms) == 4
    for norms in recorder.norms:
        torch.testing.assert_close(norms, torch.full((2,), target), rtol=1e-6, atol=0)
    assert float(cosine(module.learned.vectors, start).min()) < 0.999, "the direction should still be learned"
    exported = load_file(tmp_path / "exports" / "final" / "learned_embeds.safetensors")["<v>"]
    torch.testing.assert_close(exported.norm(dim=-1), torch.full((2,), target), rtol=1e-6, atol=0)
    torch.testing.assert_close(exported, module.learned.vectors.detach(), rtol=0, atol=0)


def test_sphere_norm_sets_the_norm_and_keeps_the_concept_direction():
    module = ti_module(parametrization="spherical", sphere_norm=0.3)
    vectors, concept = module.learned_vectors()
    torch.testing.assert_close(vectors.norm(dim=-1), torch.tensor([0.3]), rtol=1e-6, atol=0)
    assert float(cosine(vectors, concept)) == pytest.approx(1.0, abs=1e-6)


def test_spherical_run_resumed_from_a_checkpoint_ends_where_an_uninterrupted_one_does(tmp_path):
    straight = ti_module(lr=5e-2, parametrization="spherical")
    make_trainer(tmp_path / "a", max_steps=4).fit(straight, star_data(batch_size=1))

    first = ti_module(lr=5e-2, parametrization="spherical")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    make_trainer(tmp_path / "b", max_steps=2, callbacks=[checkpoint], enable_checkpointing=True).fit(
        first, star_data(batch_size=1))
    resumed = ti_module(lr=5e-2, parametrization="spherical")
    make_trainer(tmp_path / "c", max_steps=4).fit(resumed, star_data(batch_size=1),
                                                  ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    torch.testing.assert_close(resumed.learned.vectors, straight.learned.vectors, rtol=0, atol=0)


@pytest.fixture(scope="module")
def drifted():
    """A module whose learned vector is 3 × the concept norm and turned away from it (so both penalties bite)."""
    module = ti_module(num_vectors=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        concept = module.concept_vector
        away = torch.randn(2, concept.numel(), generator=generator)
        module.learned.vectors.copy_(3 * concept.norm() * torch.nn.functional.normalize(concept + 0.1 * away, dim=-1))
    return module


def direct_norm_penalty(vectors, concept, weight, max_ratio) -> float:
    total = 0.0
    for v, c in zip(vectors.double(), concept.double(), strict=True):
        total += max(0.0, float(v.norm() / c.norm()) - max_ratio) ** 2
    return weight * total / len(vectors)


def direct_direction_penalty(vectors, concept, weight) -> float:
    total = sum(1.0 - float(v @ c / (v.norm() * c.norm())) for v, c in zip(vectors.double(), concept.double(),
                                                                              strict=True))
    return weight * total / len(vectors)


@pytest.mark.parametrize("regularizer", [NormPenalty(weight=0.5, max_ratio=1.5), DirectionPenalty(weight=0.5)],
                         ids=["norm", "direction"])
def test_each_regulariser_value_matches_a_direct_computation_and_only_the_learned_vectors_get_gradient(
        drifted, regularizer):
    module = drifted
    module.zero_grad(set_to_none=True)
    vectors, concept = module.learned_vectors()
    if isinstance(regularizer, NormPenalty):
        expected = direct_norm_penalty(vectors.detach(), concept, 0.5, 1.5)
    else:
        expected = direct_direction_penalty(vectors.detach(), concept, 0.5)
    value = regularizer(vectors, concept)
    assert value.ndim == 0 and float(value) > 0
    assert float(value) == pytest.approx(expected, rel=1e-5)

    value.backward()
    grad = module.learned.vectors.grad
    assert grad is not None and bool((grad.norm(dim=-1) > 0).all()), "every learned vector should be pulled"
    others = [name for name, p in module.named_parameters() if p.grad is not None and name != "learned.vectors"]
    assert others == []
    assert module.concept_vector.grad is None


def test_norm_penalty_costs_nothing_inside_the_allowed_norm():
    module = ti_module()  # vectors start at the concept word: ratio 1 ≤ 1.5
    vectors, concept = module.learned_vectors()
    value = NormPenalty(weight=1.0, max_ratio=1.5)(vectors, concept)
    value.backward()
    assert float(value) == 0.0 and float(module.learned.vectors.grad.abs().sum()) == 0.0


def readme_yaml(section: str) -> str:
    """The first ```yaml block under a README heading."""
    body = (ROOT / "README.md").read_text(encoding="utf-8").split(f"## {section}\n", 1)[1]
    return body.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_configures_penalties_and_alarm_and_logs_each_penalty_beside_the_loss(
        tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    example = tmp_path / "regularising.yaml"
    example.write_text(readme_yaml("Regularising during training"))
    cli = train.main(["fit", "--config", "configs/demo.yaml", "--config", str(example), "--trainer.max_steps", "2",
                      "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                      "--data.batch_size", "1"])
    assert [type(r) for r in cli.model.regularizers] == [NormPenalty, DirectionPenalty]
    assert any(isinstance(c, CollapseAlarm) for c in cli.trainer.callbacks)
    assert {"train/loss", "train/norm_penalty", "train/direction_penalty"} <= set(cli.trainer.callback_metrics)


def test_the_regularised_demo_config_holds_the_keyword_at_the_concept_norm(monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = train.main(["--config", "configs/demo_regularized.yaml"], run=False)
    assert cli.model.learned.norm == pytest.approx(float(cli.model.concept_vector.norm()))
    assert [type(r) for r in cli.model.regularizers] == [DirectionPenalty]


def test_sphere_norm_is_set_from_the_command_line(monkeypatch):
    monkeypatch.chdir(ROOT)
    cli = train.main(["--config", "configs/demo.yaml", "--model.init_args.parametrization", "spherical",
                      "--model.init_args.sphere_norm", "0.25"], run=False)
    torch.testing.assert_close(cli.model.learned.vectors.norm(dim=-1), torch.tensor([0.25]), rtol=1e-6, atol=0)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: NormPenalty(weight=-1e-3), r"NormPenalty\(weight=-0.001\).*≥ 0"),
    (lambda: NormPenalty(weight=float("nan")), r"NormPenalty\(weight=nan\)"),
    (lambda: NormPenalty(max_ratio=0), r"NormPenalty\(max_ratio=0\).*> 0"),
    (lambda: NormPenalty(max_ratio=-1.5), r"NormPenalty\(max_ratio=-1.5\)"),
    (lambda: DirectionPenalty(weight=-1), r"DirectionPenalty\(weight=-1\)"),
    (lambda: TextualInversion(concept_word="star", parametrization="spherical", sphere_norm=0),
     r"sphere_norm=0: .*> 0"),
    (lambda: TextualInversion(concept_word="star", parametrization="spherical", sphere_norm=-0.4),
     r"sphere_norm=-0.4"),
    (lambda: TextualInversion(concept_word="star", parametrization="sphere"), r"parametrization='sphere'"),
    (lambda: TextualInversion(concept_word="star", sphere_norm=0.4), r"only applies with .*spherical"),
], ids=["negative-weight", "nan-weight", "zero-ratio", "negative-ratio", "negative-direction-weight",
        "zero-sphere-norm", "negative-sphere-norm", "unknown-parametrization", "sphere-norm-without-spherical"])
def test_bad_regularisation_settings_are_refused_before_the_model_loads(make, message, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the settings were checked")

    monkeypatch.setattr("tea_lightning.module.load_components", no_loading)
    with pytest.raises(ValueError, match=message):
        make()


def test_a_concept_regulariser_without_a_concept_word_stops_before_the_first_step(tmp_path):
    module = ti_module(regularizers=[DirectionPenalty()])
    module.concept_word = None  # a method that learns a token but has no concept word
    with pytest.raises(ValueError, match=r"\['direction_penalty'\] pull the keyword towards its concept word"):
        make_trainer(tmp_path, max_steps=1).fit(module, star_data())
    assert module.global_step == 0


def test_regularisers_on_a_method_without_learned_vectors_are_refused(tmp_path):
    class NoTokens(TextualInversion):
        def learned_vectors(self):
            raise NotImplementedError

    module = NoTokens(concept_word="star", pretrained="tiny", regularizers=[NormPenalty()])
    with pytest.raises(ValueError, match="act on learned token vectors, but NoTokens learns none"):
        make_trainer(tmp_path, max_steps=1).fit(module, star_data())


def test_two_regularisers_with_one_log_name_are_refused(tmp_path):
    module = ti_module(regularizers=[NormPenalty(1e-3, 1.5), NormPenalty(1e-2, 3.0)])
    with pytest.raises(ValueError, match=r"several entries named \['norm_penalty'\]"):
        make_trainer(tmp_path, max_steps=1).fit(module, star_data())
