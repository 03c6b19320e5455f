"""Baked TEA: TEA applied once to a checkpoint's learned token rows and written as plain embedding files, so that
AUTOMATIC1111, ComfyUI and stock diffusers get TEA without tea-lightning at generation time.

    python -m tea_lightning.bake runs/demo/lightning_logs/version_0/exports/final --rho 0.2 --alpha 0.5 --out baked

Token-level TEA replaces each learned row v by adjust(v, c) (c: the concept word's row) while a prompt is encoded,
and the text encoder reads nothing else of v; so a file holding adjust(v, c) as the token's rows gives the same
prompt embeddings in any loader. Only learned token rows bake (Textual Inversion, Custom Diffusion's modifier
tokens): prompt-level TEA (a LoRA keyword such as "sks dog") adjusts the encoded prompt, which no file can hold.

OUT holds, per learned token (NAME: the token as a file name, `<pink-star>` → `pink-star`):

- `webui/NAME.safetensors`: AUTOMATIC1111 / ComfyUI / kohya (`emb_params`; `clip_l` + `clip_g` for SDXL's two text
  encoders); those UIs take the file name as the prompt word;
- `diffusers/NAME.safetensors`: `{token: [k, D]}` for `pipe.load_textual_inversion(path)` (models with one text
  encoder; diffusers loads an SDXL embedding from the webui file, one call per encoder, docs/formats.md);
- `tea-bake.json`: rho, alpha, the checkpoint and base model, and per token its keyword, concept word and files.

Each file's safetensors metadata records rho, alpha, the concept word and the base model as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from tea_lightning import checkpoints, export, personalized
from tea_lightning.components import text_parts
from tea_lightning.inference import check_factors
from tea_lightning.personalized import LearnedRows, Personalized
from tea_lightning.tea import adjust
from tea_lightning.user_errors import OneLineParser, run_command

BAKE_JSON = "tea-bake.json"


@dataclass
class BakedToken:
    """One learned token with TEA applied: its rows `[k, D_e]` per text encoder, in the model's order."""

    token: str
    keyword: str
    concept_word: str
    rows: list[Tensor]


def bake_rows(pairs: Sequence[tuple[Tensor, Tensor]], rho: float, alpha: float) -> list[Tensor]:
    """TEA applied to one token's rows in each text encoder.

    Args:
        pairs: (learned rows `[k, D_e]`, concept row `[D_e]` or `[k, D_e]`) per text encoder, in the model's order
            (SD 1.x/2.x: one; SDXL: CLIP-L, then OpenCLIP-G).
        rho: Rotation factor in [0, 1].
        alpha: Norm factor in [0, 1].
    """
    return [adjust(rows.float(), target.float(), rho, alpha) for rows, target in pairs]


def baked_tokens(model: Personalized, rho: float, alpha: float) -> list[BakedToken]:
    """Every learned token of `model` with TEA applied, named as the tokenizer knows it: one (rows, concept row) pair
    per text encoder (SDXL: each encoder's rows towards the concept word's row in that encoder), so the files follow
    (`export.webui_embedding` writes `clip_l`/`clip_g` for two)."""
    tokenizers = text_parts(model.pipe)[0]
    by_token: dict[str, list[LearnedRows]] = {}
    for rows in model.rows:
        by_token.setdefault(tokenizers[rows.encoder].convert_ids_to_tokens(rows.first_id), []).append(rows)
    tokens = []
    for token, per_encoder in by_token.items():
        concept = checkpoints.owner(model.concepts, token)
        pairs = [(rows.vectors, rows.targets) for rows in sorted(per_encoder, key=lambda r: r.encoder)]
        tokens.append(BakedToken(token, concept.keyword, concept.concept_word, bake_rows(pairs, rho, alpha)))
    return tokens


def write_bake(folder: Path, tokens: Sequence[BakedToken], *, rho: float, alpha: float, checkpoint: str,
               base_model: str) -> None:
    """The files of the module docstring, for `tokens`, into `folder`."""
    names = [export.file_stem(t.token) for t in tokens]
    if len(set(names)) < len(names):
        raise ValueError(f"The tokens {[t.token for t in tokens]} share a file name {names}; bake them one checkpoint "
                         "at a time.")
    listed = []
    for name, baked in zip(names, tokens, strict=True):
        metadata = {"name": baked.token, "tea_rho": f"{rho:g}", "tea_alpha": f"{alpha:g}",
                    "tea_concept_word": baked.concept_word, "tea_base_model": base_model, "format": "pt"}
        files = {"webui": f"webui/{name}.safetensors"}
        export.write_safetensors(export.webui_embedding(baked.rows), folder / files["webui"], metadata)
        if len(baked.rows) == 1:
            files["diffusers"] = f"diffusers/{name}.safetensors"
            export.write_safetensors({baked.token: baked.rows[0]}, folder / files["diffusers"], metadata)
        listed.append({"token": baked.token, "keyword": baked.keyword, "concept_word": baked.concept_word,
                       "vectors": len(baked.rows[0]), "webui_word": name, "files": files})
    export.write_json({"format_version": export.FORMAT_VERSION, "rho": rho, "alpha": alpha, "checkpoint": checkpoint,
                       "base_model": base_model, "tokens": listed}, folder / BAKE_JSON)


def bake(checkpoint: str | Path | Sequence[str | Path], out: str | Path, *, rho: float = 0.2, alpha: float = 0.5,
         pretrained: str | None = None, concepts: Sequence[str] | None = None, concept_word: str | None = None,
         concept_reduce: str = "error") -> list[BakedToken]:
    """Write TEA-adjusted embedding files of a checkpoint's learned tokens to `out` (module docstring).

    Args:
        checkpoint: An export folder, a `.ckpt`, or an embedding file (any format `infer.py` reads); several for
            several concepts.
        out: Output folder; a folder holding an earlier bake is replaced, any other non-empty folder is refused.
        rho: Rotation factor in [0, 1] (how far each row turns towards its concept word).
        alpha: Norm factor in [0, 1] (0 keeps the learned norm, 1 takes the concept word's).
        pretrained: Base model (its vocabulary gives the concept rows); default: the one the checkpoint records.
        concepts: "KEYWORD=WORD" per concept, for files that do not record their concept word.
        concept_word: The concept word of the only keyword, when the checkpoint does not record it.
        concept_reduce: error, or mean: a concept word of several tokens pulls towards the mean of its rows.

    Returns:
        The baked tokens.
    """
    rho, alpha = check_factors("rho", [rho])[0], check_factors("alpha", [alpha])[0]
    out = Path(out).expanduser()
    export.check_writable_folder(out, "out")
    if out.is_dir() and any(out.iterdir()) and not (out / BAKE_JSON).is_file():
        raise ValueError(f"out={str(out)!r} already holds files that are not a bake; choose a new or empty folder "
                         "(nothing is overwritten).")
    paths = [checkpoint] if isinstance(checkpoint, (str, Path)) else list(checkpoint)
    source = checkpoints.merge([checkpoints.read(p, pretrained) for p in paths])
    found = checkpoints.resolve_concepts(source.concepts, concept_word, concepts)
    unbakeable = ValueError(f"{source.path} (a {source.kind}) has no learned token rows, so there is nothing to bake: "
                            "TEA for a keyword without them is prompt-level, which no embedding file can hold. Use "
                            "infer.py to generate with it.")
    if not source.embeddings and source.module is None:
        raise unbakeable
    model = personalized.build(source, found, pretrained, concept_reduce)
    if not model.rows:  # a .ckpt of a method without learned tokens
        raise unbakeable
    tokens = baked_tokens(model, rho, alpha)
    export.write_export_folder(out, lambda folder: write_bake(folder, tokens, rho=rho, alpha=alpha,
                                                              checkpoint=source.path, base_model=model.base_model))
    return tokens


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m tea_lightning.bake CHECKPOINT...`; a user error is one line and exit code 2."""
    run_command(_bake_command, None if argv is None else list(argv), prog="-m tea_lightning.bake")


def _bake_command(argv: list[str] | None) -> None:
    parser = OneLineParser(
        prog="python -m tea_lightning.bake", description="Write TEA-adjusted embedding files (AUTOMATIC1111, "
        "ComfyUI, diffusers) of a checkpoint's learned tokens, so other tools get TEA without tea-lightning.")
    parser.add_argument("checkpoint", nargs="+", help="export folder, .ckpt or embedding file(s)")
    parser.add_argument("--out", default="baked", help="output folder (default: baked)")
    parser.add_argument("--rho", type=float, default=0.2, help="rotation factor in [0, 1] (default: 0.2)")
    parser.add_argument("--alpha", type=float, default=0.5, help="norm factor in [0, 1] (default: 0.5)")
    parser.add_argument("--pretrained", help="base model, when the checkpoint does not record it")
    parser.add_argument("--concept", action="append", help="KEYWORD=WORD, one per concept ('pink star=star')")
    parser.add_argument("--concept_word", help="the concept word of the only keyword")
    parser.add_argument("--concept_reduce", choices=["error", "mean"], default="error",
                        help="a concept word of several tokens: error, or mean of its rows")
    args = parser.parse_args(argv)
    tokens = bake(args.checkpoint, args.out, rho=args.rho, alpha=args.alpha, pretrained=args.pretrained,
                  concepts=args.concept, concept_word=args.concept_word, concept_reduce=args.concept_reduce)
    for token in tokens:
        name = export.file_stem(token.token)
        print(f"{token.token} (towards {token.concept_word!r}, rho {args.rho:g}, alpha {args.alpha:g}): "
              f"{args.out}/webui/{name}.safetensors for AUTOMATIC1111/ComfyUI (write '{name}' in prompts)"
              + (f", {args.out}/diffusers/{name}.safetensors for diffusers" if len(token.rows) == 1 else ""))


if __name__ == "__main__":
    main()
