"""Drift monitors (method.md §3): watch the learned keyword V* move away from its concept word c while training.

- `EmbeddingDrift`: the learned token vectors themselves (Textual Inversion, Custom Diffusion): norm, ratio to the
  concept word's norm, cosine and angle to c and to V*'s initial value, percentile among the vocabulary norms, and
  a histogram image of the vocabulary norms with V* marked (the paper's Figure 4).
- `ContextualDrift`: the text encoder's view of whole sentences (the paper's Figure 2): the contextual set P
  filled with V* against P filled with c (inter-set), against itself (intra-set) and against the simple set S.

Both read the module only through the method contract (`keyword`, `concept_word`, `trains_text_encoder`,
`learned_vectors(encoder)`, `encode_prompts`, `tokenize`, `text_encoders`, `tokenizers`), run on rank 0 only, under
`no_grad`, in the trainer's precision, and leave train/eval flags and the global RNG as they found them: a run with
them ends with the same trainables as one without. A UNet-only method (DreamBooth LoRA without the text encoder)
learns nothing in text space, so its text-space drift is zero by construction; the callbacks say so once and skip.
SDXL's two text encoders are measured each on its own, under keys that name them (`drift/clip_l/norm`,
`drift_sets/clip_g/inter_l2`, `drift/clip_l/vocab_norms`); SD 1.x/2.x keys name none.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from tea_lightning import drift
from tea_lightning.adapters import adapters_disabled
from tea_lightning.callbacks.export import check_every_n_steps
from tea_lightning.conditioning import SUFFIXES, widths
from tea_lightning.drift_measure import (
    BLUE,
    GREY,
    RED,
    SETS_PREFIX,
    VECTOR_PREFIX,
    contextual_templates,
    embedding_drift,
    encode_set,
    histogram_image,
    load_prompt_set,
    metric_key,
    vocabulary_norms,
)
from tea_lightning.prompt_sets import fill

# ------------------------------------------------------------------------------------------------- shared helpers


@contextlib.contextmanager
def measuring(module: torch.nn.Module, forward_context: contextlib.AbstractContextManager | None = None) -> Iterator:
    """No gradients, the text encoder in eval mode, the trainer's precision; train/eval flags and the global RNG
    (CPU and the module's accelerator) are put back afterwards, so measuring never changes what training does."""
    modes = [(m, m.training) for encoder in module.text_encoders for m in encoder.modules()]
    device = module.device
    fork = (torch.random.fork_rng(devices=[]) if device.type == "cpu" else
            torch.random.fork_rng(devices=[device.index or 0], device_type=device.type))
    with fork, torch.no_grad(), forward_context or contextlib.nullcontext():
        for encoder in module.text_encoders:
            encoder.eval()
        try:
            yield
        finally:
            for m, mode in modes:
                m.training = mode


def learns_token_vectors(module: Any) -> bool:
    """Whether the method learns token rows (`learned_vectors()` works) rather than only network weights."""
    try:
        module.learned_vectors()
    except NotImplementedError:
        return False
    return True


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def _tensorboards(trainer: L.Trainer) -> list:
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def log_note(trainer: L.Trainer, tag: str, text: str) -> None:
    """Say something once: on the console and, when TensorBoard logs the run, under its Text tab."""
    rank_zero_info(text)
    for writer in _tensorboards(trainer):
        writer.add_text(tag, text, global_step=trainer.global_step)


class _EveryNSteps(L.Callback):
    """Calls `measure` at step 0 (train start) and after every `every_n_steps`-th optimiser step, rank 0 only."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = check_every_n_steps(every_n_steps, type(self).__name__)
        self._last_step = -1

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        raise NotImplementedError

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        if trainer.global_step == 0 and trainer.is_global_zero:
            self.measure(trainer, pl_module)  # the starting point of every curve

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # With gradient accumulation this hook runs once per micro-batch; measure once per optimiser step.
        step = trainer.global_step
        if step != self._last_step and step % self.every_n_steps == 0 and trainer.is_global_zero:
            self.measure(trainer, pl_module)
        self._last_step = step


# ------------------------------------------------------------------------------------------------ token level


class EmbeddingDrift(_EveryNSteps):
    """Log the learned keyword's vector drift every `every_n_steps` steps (and at step 0).

    Scalars (means over the vectors of a multi-vector token): `drift/norm` |V*|, `drift/concept_norm` |c|,
    `drift/norm_ratio` |V*|/|c|, `drift/cosine_concept` and `drift/angle_concept_deg` between V* and c,
    `drift/cosine_initial` between V* and its value at the start of training, `drift/norm_percentile` the
    percentage of vocabulary norms below |V*|. Image (TensorBoard only): `drift/vocab_norms`, the histogram of the
    vocabulary norms with V*, c and the start/end-of-text tokens marked. On SDXL each text encoder's rows are
    measured against that encoder's vocabulary: `drift/clip_l/norm`, `drift/clip_g/norm`, ... Methods that learn no
    token vectors (DreamBooth) are skipped with a note: their drift shows at the prompt level, in `ContextualDrift`.

    Args:
        every_n_steps: Steps between measurements (each costs a few vector norms: any value is cheap).
        histogram: Also log the histogram image.
    """

    def __init__(self, every_n_steps: int = 100, histogram: bool = True) -> None:
        super().__init__(every_n_steps)
        self.histogram = histogram
        # V* at the start of training, per text encoder (SDXL: two); kept in checkpoints.
        self.initial: list[Tensor | None] = [None] * len(SUFFIXES)
        self._applies = True
        self._vocab_norms: list[Tensor] | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._applies = learns_token_vectors(pl_module)
        if not self._applies and trainer.is_global_zero:
            log_note(trainer, VECTOR_PREFIX + "note",
                     f"EmbeddingDrift: {type(pl_module).__name__} learns no token vectors, so there is no vector "
                     "drift to log; its drift shows at the prompt level (ContextualDrift) when it trains the text "
                     "encoder, and is zero by construction when it does not.")

    def _initial(self, encoder: int, vectors: Tensor) -> Tensor:
        """V* of text encoder `encoder` at the start of training (`vectors` when not yet recorded)."""
        if self.initial[encoder] is None:
            self.initial[encoder] = vectors.detach().float().cpu().clone()
        return self.initial[encoder]

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._applies:
            for e in range(pl_module.num_text_encoders):
                self._initial(e, pl_module.learned_vectors(e)[0])
        super().on_train_start(trainer, pl_module)

    def compute(self, module: L.LightningModule) -> dict[str, float]:
        """The vector drift of `module`'s learned rows now, keyed like the logged scalars."""
        count, values, vocab_norms = module.num_text_encoders, {}, self.vocab_norms(module)
        with torch.no_grad():
            for e in range(count):
                vectors, concept_rows = module.learned_vectors(e)
                measured = embedding_drift(vectors, concept_rows, self._initial(e, vectors), vocab_norms[e])
                values.update({metric_key(VECTOR_PREFIX, key, e, count): value for key, value in measured.items()})
        return values

    def vocab_norms(self, module: L.LightningModule) -> list[Tensor]:
        """The vocabulary norms `[V]` of each text encoder."""
        # The vocabulary is frozen unless the text encoder trains: compute its norms once.
        if self._vocab_norms is None or module.trains_text_encoder:
            self._vocab_norms = [vocabulary_norms(t, e) for t, e in zip(module.tokenizers, module.text_encoders,
                                                                        strict=True)]
        return self._vocab_norms

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self._applies:
            return
        metrics = self.compute(module)
        step = trainer.global_step
        log_metrics(trainer, metrics, step)
        writers = _tensorboards(trainer)
        if self.histogram and writers:
            count = module.num_text_encoders
            for e in range(count):
                image = histogram_image(self.vocab_norms(module)[e], self._marks(module, metrics, e))
                for writer in writers:
                    writer.add_image(metric_key(VECTOR_PREFIX, "vocab_norms", e, count), image, global_step=step,
                                     dataformats="HWC")

    def _marks(self, module: L.LightningModule, metrics: dict[str, float],
               encoder: int) -> dict[str, tuple[float, tuple]]:
        tokenizer, norms = module.tokenizers[encoder], self.vocab_norms(module)[encoder]
        count = module.num_text_encoders
        marks = {"V*": (metrics[metric_key(VECTOR_PREFIX, "norm", encoder, count)], RED),
                 str(module.concept_word): (metrics[metric_key(VECTOR_PREFIX, "concept_norm", encoder, count)], BLUE)}
        for name, token_id in (("start", tokenizer.bos_token_id), ("end", tokenizer.eos_token_id)):
            if token_id is not None and token_id < len(norms):
                marks[name] = (float(norms[token_id]), GREY)
        return marks

    @override
    def state_dict(self) -> dict[str, Any]:
        return {f"initial{suffix}": initial for suffix, initial in zip(SUFFIXES, self.initial, strict=True)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = [state_dict.get(f"initial{suffix}") for suffix in SUFFIXES]


# ----------------------------------------------------------------------------------------------- prompt level


class ContextualDrift(_EveryNSteps):
    """Log the contextual set distances (the paper's Figure 2) every `every_n_steps` steps (and at step 0).

    P is the contextual set (about 200 sentences with a `{}` slot), S the simple set ("a photo of a {}").
    Scalars: `drift_sets/inter_<m>` = d(P(V*), P(c)) for `l2`, `hausdorff`, `mahalanobis`, `kl` (grows as V*
    drifts); `drift_sets/intra_<m>` = d(P(V*), P(V*)) for `l2`, `hausdorff` and `spread` (shrinks as V* makes the
    sentences alike); `drift_sets/simple_<m>` = d(P(V*), S(V*)) for the four (shrinks as complex prompts collapse
    onto simple ones). See `drift.contextual_distances`. P(c) is encoded once when the text encoder is frozen
    (Textual Inversion, Custom Diffusion) and again at every measurement when it trains (DreamBooth with
    text-encoder LoRA). For such a method the authors' own drift is logged too, the same "sks dog" sentences
    encoded by the trained encoder and by the base encoder (adapters off): `drift_sets/base_paired_l2` (mean
    distance sentence by sentence, starts at 0) and `drift_sets/base_cosine` (starts at 1), the authors' two
    DreamBooth curves, and `drift_sets/base_<m>` for the four set distances (Hausdorff and KL start at 0). The
    sentences are the states the UNet reads (SDXL: both encoders' penultimate states), each encoder's part measured
    on its own on SDXL: `drift_sets/clip_l/inter_l2`, `drift_sets/clip_g/base_cosine`, ... For a method that learns
    neither token vectors nor text-encoder weights (UNet-only LoRA) the text-space drift is zero by construction:
    that is logged once and nothing is encoded.

    Args:
        every_n_steps: Steps between measurements. Each encodes P(V*) and S(V*) (about 400 sentences); at 100 that
            was 1.5-2.2% of an SD 1.5 Textual Inversion run's time on CPU (bench/drift_callback.md).
        prompt_set: Contextual set P: a shipped concept name (`man`, `dog`, `tortoise plushy`, ...) or a file with
            one sentence per line, each holding one `{}`. Default: the shipped set of the module's concept word.
        simple_set: Simple set S: `simple` (shipped) or a file.
        hidden_state: One vector per sentence from the last hidden state: `last` (position 77, the authors'
            choice), `eos` (first end-of-text position), `mean` (over the real tokens) or `flatten` (all positions).
        batch_size: Sentences per text-encoder call.
        temperature: KL temperature tau.
        shrinkage: lambda of the Mahalanobis covariance, (1 - lambda)·Sigma + lambda·(trace/d)·I. The default
            0.1 sees every direction and does not swing with the precision (docs/drift_metrics.md has the
            measurements); 0 is the authors' pseudo-inverse.
        reproduce_authors: Compute as the authors' code did: P(c) scored against P(V*) in inter_mahalanobis and
            inter_kl (default: P(V*) against P(c)), simple_kl cut after the softmax (default: before).
    """

    def __init__(self, every_n_steps: int = 100, prompt_set: str | None = None, simple_set: str = "simple",
                 hidden_state: str = "last", batch_size: int = 128, temperature: float = 1.0,
                 shrinkage: float = drift.DEFAULT_SHRINKAGE, reproduce_authors: bool = False) -> None:
        super().__init__(every_n_steps)
        if hidden_state not in drift.HIDDEN_STATES:
            raise ValueError(f"ContextualDrift(hidden_state={hidden_state!r}) does not exist; choose one of "
                             f"{', '.join(drift.HIDDEN_STATES)} ('last' reproduces the paper)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ContextualDrift(batch_size={batch_size!r}): use 1 or more sentences per call")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise ValueError(f"ContextualDrift(temperature={temperature!r}): use a positive number (default 1.0)")
        drift.check_shrinkage(shrinkage, "ContextualDrift(shrinkage=...)")
        self.hidden_state, self.batch_size, self.temperature = hidden_state, batch_size, float(temperature)
        self.shrinkage, self.reproduce_authors = float(shrinkage), bool(reproduce_authors)
        self.prompt_templates = None if prompt_set is None else load_prompt_set(prompt_set, "prompt_set")
        self.simple_templates = load_prompt_set(simple_set, "simple_set")
        self._applies = True
        self._ids: dict[str, tuple[list[str], Tensor]] = {}  # set name → (filled prompts, token ids), per keyword
        self._ids_keyword: str | None = None
        self._p_concept: list[Tensor] | None = None  # P(c) per text encoder, reused while the encoders are frozen
        self._p_base: list[Tensor] | None = None  # P(V*) under the base encoders (adapters off), which never change

    def check_module(self, pl_module: L.LightningModule) -> None:
        """Refuse a method without a concept word, or whose concept word has no shipped contextual set when no
        `prompt_set` is given (train.py calls this before the run folder exists; `setup` again)."""
        if pl_module.concept_word is None:
            raise ValueError(f"ContextualDrift needs the module's concept_word to fill P(c); "
                             f"{type(pl_module).__name__} has none. Set model.init_args.concept_word.")
        if self.prompt_templates is None and (pl_module.trains_text_encoder or learns_token_vectors(pl_module)):
            self.prompt_templates = contextual_templates(
                None, pl_module.concept_word, "Set prompt_set in the ContextualDrift entry of your config (or remove "
                "that entry)")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.check_module(pl_module)
        self._applies = pl_module.trains_text_encoder or learns_token_vectors(pl_module)
        if not self._applies:
            if trainer.is_global_zero:
                log_note(trainer, SETS_PREFIX + "note",
                         f"ContextualDrift: {type(pl_module).__name__} trains neither token vectors nor the text "
                         "encoder, so every prompt encodes exactly as in the base model: the text-space drift is zero "
                         "by construction, and nothing is measured.")

    def compute(self, module: L.LightningModule, forward_context: contextlib.AbstractContextManager | None = None
                ) -> dict[str, float]:
        """The set distances of `module` now, keyed like the logged scalars."""
        with measuring(module, forward_context):
            sets = self._tokenized(module)
            encode = self._encoder(module)
            if self._p_concept is None or module.trains_text_encoder:
                self._p_concept = encode(*sets["p_concept"])
            p_keyword, s_keyword = encode(*sets["p_keyword"]), encode(*sets["s_keyword"])
            if module.trains_text_encoder and self._p_base is None:
                with adapters_disabled(*module.text_encoders):
                    self._p_base = encode(*sets["p_keyword"])
        count, values = module.num_text_encoders, {}
        for e in range(count):
            measured = drift.contextual_distances(p_keyword[e], self._p_concept[e], s_keyword[e], self.temperature,
                                                  self.shrinkage, self.reproduce_authors)
            if module.trains_text_encoder:  # the authors' DreamBooth drift: the same sentences, base vs trained
                base = {**drift.paired_drift(p_keyword[e], self._p_base[e]),
                        **drift.pair_distances(p_keyword[e], self._p_base[e], self.temperature, self.shrinkage)}
                measured.update({f"base_{name}": value for name, value in base.items()})
            values.update({metric_key(SETS_PREFIX, key, e, count): value for key, value in measured.items()})
        return values

    def measure(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._applies:
            log_metrics(trainer, self.compute(module, trainer.precision_plugin.forward_context()), trainer.global_step)

    def _encoder(self, module: L.LightningModule) -> Callable[[list[str], Tensor], list[Tensor]]:
        eos, parts = module.tokenizer.eos_token_id, widths(module.text_encoders)
        return lambda prompts, ids: encode_set(lambda batch: module.encode_prompts(batch).states, prompts, ids, eos,
                                               self.hidden_state, self.batch_size, parts)

    def _tokenized(self, module: L.LightningModule) -> dict[str, tuple[list[str], Tensor]]:
        # Token ids only depend on the text: tokenize each set once per keyword.
        if self.prompt_templates is None:  # `compute` called without `setup`
            self.prompt_templates = contextual_templates(None, module.concept_word, "Pass prompt_set")
        if self._ids_keyword != module.keyword:
            fills = {"p_keyword": (self.prompt_templates, module.keyword),
                     "p_concept": (self.prompt_templates, module.concept_word),
                     "s_keyword": (self.simple_templates, module.keyword)}
            self._ids = {}
            for name, (templates, word) in fills.items():
                prompts = [fill(t, word) for t in templates]
                self._ids[name] = (prompts, module.tokenize(prompts))
            self._ids_keyword, self._p_concept, self._p_base = module.keyword, None, None
        return self._ids
