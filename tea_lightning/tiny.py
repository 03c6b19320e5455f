"""The built-in `tiny` and `tiny-sdxl` models: real Stable Diffusion (1.x and XL) pipelines with small random
weights, built in code.

Nothing here downloads. The tokenizer is a CLIP-style byte-level BPE whose merges are learned, at build time,
from the words of every shipped prompt set plus the common concept words, so each of those words is one
word-final token (`man</w>`) exactly as with the real CLIP vocabulary. The non-final sub-word rows of the concept
words (`man`, without `</w>`) exist too, so code that looks a word up with `convert_tokens_to_ids` lands on a
different row than a prompt does, as it would with SD 1.5.
"""

from __future__ import annotations

import functools

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from tea_lightning.prompt_sets import package_prompt_files, words

TINY = "tiny"
TINY_SDXL = "tiny-sdxl"
START, END = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
HIDDEN = 32
HIDDEN_2, POOLED, TIME_EMBED = 48, 40, 8  # tiny-sdxl: second encoder, its projection, each time id's embedding
TEXT_GAIN = 8.0

# Words every test, template and demo relies on, beside the words of the shipped prompt files.
CONCEPT_WORDS = (
    "man woman person people boy girl child baby face dog cat puppy kitten toy barn tortoise plushy teddy bear "
    "wooden pot flower table chair star circle square triangle shape car house tree bird horse"
).split()
EXTRA_WORDS = (
    "a an the of in on at with and or to for from by photo picture image rendering painting drawing portrait "
    "close up close-up cropped bright dark clean dirty cool weird small large big nice good one my this that "
    "style art artwork sks red green blue yellow pink white black purple orange brown gray grey background "
    "wearing glasses playing guitar far away zoomed"
).split()


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable characters (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return dict(zip(range(256), chars, strict=True))


def corpus_words() -> list[str]:
    """Every distinct word the tiny tokenizer must keep whole, sorted for a deterministic build."""
    found = set(CONCEPT_WORDS) | set(EXTRA_WORDS)
    for path in package_prompt_files():
        found.update(words(path.read_text(encoding="utf-8")))
    return sorted(w for w in found if w not in (START, END))


def _segmenter(base: list[str], merges: list[tuple[str, str]]):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for token in base + ["".join(m) for m in merges]:
        vocab.setdefault(token, len(vocab))
    segmenter = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>",
                                     continuing_subword_prefix=""))
    segmenter.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return segmenter


def learn_merges(corpus: list[str], base: list[str], max_rounds: int = 50) -> list[tuple[str, str]]:
    """BPE merges under which every word of `corpus` is one word-final token, learned deterministically.

    Each round segments every word with the merges so far and appends the merges that join what is still split,
    left to right; a new merge can re-split a word handled earlier, so rounds repeat until nothing changes. (The
    `tokenizers` trainer breaks frequency ties differently from one process to the next, which would give words
    different ids, and so different embedding rows, in every process.)
    """
    merges: list[tuple[str, str]] = []
    known: set[tuple[str, str]] = set()
    for _ in range(max_rounds):
        added = False
        for encoding in _segmenter(base, merges).encode_batch(corpus):
            pieces = encoding.tokens
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                if pair not in known:
                    known.add(pair)
                    merges.append(pair)
                    added = True
                pieces = ["".join(pair)] + pieces[2:]
        if not added:
            return merges
    raise RuntimeError(f"BPE merges did not settle in {max_rounds} rounds")


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    alphabet = list(bytes_to_unicode().values())
    base = alphabet + [c + "</w>" for c in alphabet]
    merges = learn_merges(corpus_words(), base)
    tokens = base + ["".join(m) for m in merges]
    # Non-final sub-word rows of the concept words: present in the vocabulary, never produced for a whole word.
    tokens += [w for w in CONCEPT_WORDS if w not in set(tokens)]
    tokens += [START, END]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, tuple(merges)


def tiny_tokenizer() -> CLIPTokenizer:
    """A fresh CLIP-style tokenizer (fresh because methods add placeholder tokens to it)."""
    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=MAX_LENGTH)


def _unet(**kwargs) -> UNet2DConditionModel:
    """A two-level UNet at toy size (VAE latents of 8×8 for 64 px images); `kwargs` give the family's layout."""
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), attention_head_dim=8, norm_num_groups=32, **kwargs)


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), norm_num_groups=8,
    )


def _text_encoder(tokenizer: CLIPTokenizer, hidden: int, model: type = CLIPTextModel, projection_dim: int = HIDDEN,
                  hidden_act: str = "quick_gelu") -> CLIPTextModel:
    return model(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_LENGTH, projection_dim=projection_dim,
        hidden_act=hidden_act, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


@torch.no_grad()
def _like_a_trained_model(unet: UNet2DConditionModel, text_encoders: list, tokenizer: CLIPTokenizer) -> None:
    # Real CLIP keeps its start/end rows in the far tail of the norm distribution; mirror that so drift
    # percentiles and collapse alarms have a tail to measure against.
    for text_encoder in text_encoders:
        rows = text_encoder.get_input_embeddings().weight
        for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
            rows[token_id] *= 3.0
    # A random UNet hardly listens to its prompt: its cross-attention outputs are small beside the conv path.
    # Amplify them so the text matters, as in a trained model, and tests can see what TEA changes.
    for name, module in unet.named_modules():
        if name.endswith("attn2.to_out.0"):
            module.weight *= TEXT_GAIN


def tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A seeded `StableDiffusionPipeline` with SD 1.5's layout at toy size (VAE factor 8, 77 text positions)."""
    tokenizer = tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=HIDDEN)
        vae = _vae()
        text_encoder = _text_encoder(tokenizer, HIDDEN)
        _like_a_trained_model(unet, [text_encoder], tokenizer)
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A seeded `StableDiffusionXLPipeline` with SDXL's layout at toy size: a CLIP text encoder (`HIDDEN` wide) and a
    second one with a projection (`HIDDEN_2` wide, pooled output `POOLED` wide) whose penultimate states are
    concatenated for the UNet, and a UNet conditioned on the pooled output and the six size/crop time ids.

    The widths differ on purpose (32, 48, pooled 40), so mixing up the encoders, or the pooled output with a hidden
    state, fails on shapes instead of passing silently.
    """
    tokenizer, tokenizer_2 = tiny_tokenizer(), tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _unet(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=HIDDEN + HIDDEN_2,
                     use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=TIME_EMBED, projection_class_embeddings_input_dim=POOLED + 6 * TIME_EMBED)
        vae = _vae()
        text_encoder = _text_encoder(tokenizer, HIDDEN)
        text_encoder_2 = _text_encoder(tokenizer_2, HIDDEN_2, CLIPTextModelWithProjection, projection_dim=POOLED,
                                       hidden_act="gelu")
        _like_a_trained_model(unet, [text_encoder, text_encoder_2], tokenizer)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
