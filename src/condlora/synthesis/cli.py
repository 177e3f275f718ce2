"""`condlora synth ...`: the synthesis half's commands, one group with its own subcommands.

To add a subcommand, write an `_add_<name>(synth_sub)` function and list it in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from condlora.core.errors import CondloraError
from condlora.core.files import default_run_folder, undone_on_error

# Imports of torch-heavy modules happen inside the commands, so `condlora --help` is quick.


def _collect(args: argparse.Namespace) -> None:
    from condlora.lora.formats import load_base_modules
    from condlora.synthesis.collection import collect

    base = load_base_modules(args.base_modules) if args.base_modules else None
    report = collect(
        args.loras,
        args.out,
        args.embeddings,
        base,
        skip_bad=args.skip_bad,
        aligned=not args.no_align,
        align_to=args.align_to,
    )
    for name in report.refit:
        print(f"re-factorised {name}: another rank, its dW fits the collection's exactly")
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}")
    print(f"took {len(report.taken)} LoRAs, skipped {len(report.skipped)}")
    print(f"wrote {report.path} ({len(report.taken)} x {report.dim})")


def _add_collect(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("collect", help="a folder of LoRAs -> one dataset of vectors")
    p.add_argument("--loras", required=True, metavar="DIR", help="folder of LoRAs, any layout")
    p.add_argument("--out", required=True, metavar="DATASET", help="dataset file to write")
    p.add_argument("--embeddings", metavar="FILE", help="safetensors: LoRA name -> vector")
    p.add_argument(
        "--base-modules",
        metavar="FILE",
        help="base model's modules (a condlora run, .safetensors, JSON, text)",
    )
    p.add_argument(
        "--skip-bad", action="store_true", help="skip unreadable LoRAs instead of stopping"
    )
    p.add_argument(
        "--align-to",
        metavar="DS",
        help="align to this dataset's reference (e.g. held-out LoRAs to the training set's)",
    )
    p.add_argument(
        "--no-align",
        action="store_true",
        help="per-LoRA sign rule only, no alignment across the collection",
    )
    p.set_defaults(func=_collect)


def _import_w2w(args: argparse.Namespace) -> None:
    from condlora.lora.formats import load_base_modules
    from condlora.synthesis.w2w import import_w2w

    base = load_base_modules(args.base_modules) if args.base_modules else None
    path, n, dim = import_w2w(
        args.weights, args.out, args.dims, base, args.alpha, args.embeddings, progress=True
    )
    print(f"wrote {path} ({n} x {dim})")


def _add_import_w2w(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser(
        "import-w2w", help="weights2weights' all_weights.pt -> one dataset of vectors"
    )
    p.add_argument("weights", metavar="ALL_WEIGHTS", help="w2w's all_weights.pt [N, D]")
    p.add_argument("--out", required=True, metavar="DATASET", help="dataset file to write")
    p.add_argument("--dims", metavar="FILE", help="w2w's weight_dimensions.pt (the row layout)")
    p.add_argument(
        "--base-modules",
        metavar="FILE",
        help="the U-Net's config.json (without --dims: rank 1 on to_q / to_v in w2w's order)",
    )
    p.add_argument(
        "--alpha", type=float, default=27.0, help="alpha the LoRAs act with (w2w: 27; 1: as is)"
    )
    p.add_argument("--embeddings", metavar="FILE", help="safetensors: row name -> vector")
    p.set_defaults(func=_import_w2w)


def _config(args: argparse.Namespace):  # noqa: ANN202  a SynthConfig (imported lazily)
    """The command's SynthConfig: --config (or the defaults), overrides, then --dataset."""
    import dataclasses

    from condlora.synthesis.config import load_synth_config

    cfg = load_synth_config(args.config, args.overrides)
    if getattr(args, "dataset", None):
        cfg = dataclasses.replace(cfg, dataset=args.dataset)
    return cfg


def _add_training_options(p: argparse.ArgumentParser, config_required: bool = False) -> None:
    p.add_argument("--config", required=config_required, help="synthesis YAML config")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. vae.latent=64")


def _unless_resumed(args: argparse.Namespace, out: str | Path) -> AbstractContextManager:
    """A fresh training that fails leaves `out` as it was; a resume keeps what it saved."""
    return nullcontext() if args.resume else undone_on_error(out)


def _train_vae(args: argparse.Namespace) -> None:
    from condlora.synthesis.training import train_vae

    with _unless_resumed(args, args.out):
        out = train_vae(_config(args), args.out, resume=args.resume, progress=not args.quiet)
    print(f"model folder: {out} (VAE trained; next: synth train-prior --vae {out})")


def _add_train_vae(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("train-vae", help="train the VAE over a collection's LoRA vectors")
    p.add_argument("--dataset", required=True, metavar="DS", help="dataset from synth collect")
    p.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    _add_training_options(p)
    p.set_defaults(func=_train_vae)


def _train_prior(args: argparse.Namespace) -> None:
    from condlora.synthesis.training import train_prior

    cfg = _config(args)
    with _unless_resumed(args, args.out):
        out = train_prior(cfg, args.out, args.vae, resume=args.resume, progress=not args.quiet)
    print(f"model folder: {out}")


def _add_train_prior(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("train-prior", help="train the diffusion prior (on VAE latents)")
    p.add_argument("--dataset", required=True, metavar="DS", help="dataset from synth collect")
    p.add_argument("--vae", metavar="DIR", help="model folder with the VAE (default: --out)")
    p.add_argument("--out", required=True, metavar="DIR", help="model folder to write")
    _add_training_options(p)
    p.set_defaults(func=_train_prior)


def _train(args: argparse.Namespace) -> None:
    from condlora.synthesis.training import train_synthesis

    cfg = _config(args)
    out = Path(args.out) if args.out else default_run_folder(cfg.name)
    with _unless_resumed(args, out):
        train_synthesis(cfg, out, resume=args.resume, progress=not args.quiet)
    print(f"model folder: {out}")


def _add_train(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("train", help="train what a config's method names (VAE + prior, ...)")
    p.add_argument("--dataset", metavar="DS", help="dataset (default: the config's)")
    p.add_argument("--out", metavar="DIR", help="model folder (default: runs/<name>)")
    _add_training_options(p, config_required=True)
    p.set_defaults(func=_train)


def _embedding(args: argparse.Namespace, model):  # noqa: ANN001, ANN202
    """The subject's embedding (1, E): from --embedding, or --images through an encoder."""
    from condlora.synthesis.encoders import build_encoder, read_embeddings, subject_embedding

    if args.embedding:
        e = read_embeddings(args.embedding, args.key)
        if len(e) != 1:
            raise CondloraError(f"{args.embedding}: one embedding per call, got {len(e)} rows")
        return e
    return subject_embedding(build_encoder(_encoder_config(args, model)), args.images)[None]


def _encoder_config(args: argparse.Namespace, model):  # noqa: ANN001, ANN202
    """The model's encoder settings with --encoder / --encoder-path put over them."""
    import dataclasses

    cfg = model.info.encoder
    if args.encoder:
        cfg = dataclasses.replace(cfg, kind=args.encoder)
    if args.encoder_path:
        cfg = dataclasses.replace(cfg, path=args.encoder_path)
    if args.detector:
        cfg = dataclasses.replace(cfg, detector=args.detector)
    return cfg


def _generate(args: argparse.Namespace) -> None:
    from condlora.image.checks import check_seed
    from condlora.synthesis.generate import SynthModel, write_generated

    check_seed(args.seed)
    if args.num < 1:
        raise CondloraError(f"--num must be at least 1, got {args.num}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise CondloraError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    model = SynthModel.load(args.model)
    embedding = _embedding(args, model)
    paths = write_generated(
        model, embedding, args.out, args.format, args.num, args.guidance, args.seed
    )
    for path in paths:
        print(f"wrote {path}")


def _add_encoder_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--encoder", help=f"{what}: onnx-face, digits (the digits demo's) ...")
    p.add_argument(
        "--encoder-path",
        help="encoder model file: a face-recognition .onnx, a demo's encoder.safetensors",
    )
    p.add_argument(
        "--detector",
        metavar="DIR",
        help="onnx-face: find and align the faces first with MTCNN (facenet-pytorch's "
        "pnet.pt, rnet.pt, onet.pt in DIR); without it the images must be aligned crops",
    )


def _add_generate(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("generate", help="write a LoRA for a subject's embedding")
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (synth train)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--embedding", metavar="FILE", help="safetensors file: name -> vector")
    source.add_argument("--images", metavar="DIR", help="the subject's images (an encoder)")
    p.add_argument("--key", help="which entry of --embedding (when it holds several)")
    _add_encoder_options(p, "encoder kind for --images (default: the model's)")
    p.add_argument("--out", required=True, metavar="PATH", help="LoRA to write (_i for --num)")
    p.add_argument("--format", default="peft", choices=["peft", "diffusers", "kohya"])
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--num", type=int, default=1, help="number of LoRAs for the subject")
    p.set_defaults(func=_generate)


def _zoo(args: argparse.Namespace) -> None:
    from condlora.core.config import read_config
    from condlora.image.build import image_channels, num_classes
    from condlora.image.diffusers_net import text_encoder
    from condlora.image.task import load_base
    from condlora.synthesis.config import EncoderConfig, ZooConfig
    from condlora.synthesis.encoders import build_encoder
    from condlora.synthesis.zoo import make_zoo, model_subjects, read_subjects, write_embeddings

    cfg = read_config(ZooConfig, args.config, args.overrides)
    encoder = None  # built first, so that a bad encoder fails before any training
    if args.encoder:
        paths = {"path": args.encoder_path or "", "detector": args.detector or ""}
        encoder = build_encoder(EncoderConfig(kind=args.encoder, **paths))
    run_cfg, base = load_base(args.base, args.subjects)
    size, channels = run_cfg.data.resolution, image_channels(run_cfg)
    text = text_encoder(base) is not None
    found = read_subjects(args.subjects, size, channels, num_classes(run_cfg), text)
    found = model_subjects(base, found)  # prompts as caption indices, latents
    base_name = str(Path(args.base).resolve())
    record = make_zoo(base, found, cfg, args.out, base_name, progress=not args.quiet)
    print(f"{len(found)} subjects in {args.out} ({len(record['seconds'])} fine-tuned so far)")
    if encoder is not None:
        print(f"wrote {write_embeddings(Path(args.out), found, encoder)}")


def _add_zoo(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("zoo", help="fine-tune one LoRA per subject folder (a collection)")
    p.add_argument(
        "--base", required=True, metavar="RUN", help="the base: a condlora run or diffusers folder"
    )
    p.add_argument("--subjects", required=True, metavar="DIR", help="one image folder per subject")
    p.add_argument("--out", required=True, metavar="LORAS", help="folder of peft LoRAs to write")
    p.add_argument("--config", help="zoo YAML config (rank, targets, steps, lr, ...)")
    _add_encoder_options(p, "also write embeddings.safetensors with this encoder kind")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. rank=2 steps=300")
    p.set_defaults(func=_zoo)


def _model_dataset(args: argparse.Namespace, model):  # noqa: ANN001, ANN202
    """--dataset, else the collection the model was trained on (its config.yaml)."""
    from condlora.core.config import read_yaml
    from condlora.synthesis.collection import LoRADataset

    path = args.dataset
    if not path and (model.folder / "config.yaml").is_file():
        path = read_yaml(model.folder / "config.yaml").get("dataset", "")
    if not path:
        raise CondloraError(f"{model.folder} names no collection: give --dataset DS")
    return LoRADataset(path)


def _eval(args: argparse.Namespace) -> None:
    from condlora.image.build import image_channels, num_classes
    from condlora.image.checks import check_seed
    from condlora.image.diffusers_net import check_pixel_model
    from condlora.image.task import load_base
    from condlora.metrics import load_classifier
    from condlora.synthesis.encoders import build_encoder
    from condlora.synthesis.generate import SynthModel
    from condlora.synthesis.subject_eval import evaluate_subjects, summary_rows
    from condlora.synthesis.zoo import read_subjects

    check_seed(args.seed)
    if not 1 <= args.num <= 10_000:
        raise CondloraError(f"--num must be in 1..10000, got {args.num}")
    model = SynthModel.load(args.model)
    encoder = build_encoder(_encoder_config(args, model))
    dataset = _model_dataset(args, model)
    judge = load_classifier(args.judge) if args.judge else None
    cfg, base = load_base(args.base, args.subjects)
    check_pixel_model(base, "synth eval")
    held_out = read_subjects(
        args.subjects, cfg.data.resolution, image_channels(cfg), num_classes(cfg)
    )
    finetuned = Path(args.finetuned) if args.finetuned else None
    results = evaluate_subjects(
        model,
        dataset,
        base,
        cfg,
        held_out,
        encoder,
        args.out,
        finetuned,
        judge,
        args.num,
        args.seed,
        progress=not args.quiet,
    )
    for row in summary_rows(results):
        print(" | ".join(row))
    print(f"wrote {Path(args.out) / 'report.md'}")


def _add_eval(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("eval", help="identity benchmark: every method on held-out subjects")
    p.add_argument("--model", required=True, metavar="DIR", help="model folder (synth train)")
    p.add_argument(
        "--base", required=True, metavar="RUN", help="the base: a condlora run or diffusers folder"
    )
    p.add_argument("--subjects", required=True, metavar="DIR", help="held-out subject folders")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, grids")
    p.add_argument("--dataset", metavar="DS", help="the collection (default: the model's)")
    p.add_argument("--finetuned", metavar="DIR", help="the subjects' own LoRAs (synth zoo)")
    _add_encoder_options(p, "encoder kind (default: the model's)")
    p.add_argument("--judge", metavar="FILE", help="a digits classifier: class accuracy too")
    p.add_argument("--num", type=int, default=10, help="samples per subject and method")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval)


def print_info(path: str, overrides: list[str]) -> None:
    """Sizes and parameter counts of a synthesis config (also `condlora info`)."""
    from condlora.synthesis.model import info_lines

    for line in info_lines(path, overrides):
        print(line)


def _add_info(synth_sub: argparse._SubParsersAction) -> None:
    p = synth_sub.add_parser("info", help="sizes and parameter counts of a synthesis config")
    p.add_argument("--config", required=True, help="synthesis YAML config")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. vae.latent=256")
    p.set_defaults(func=lambda args: print_info(args.config, args.overrides))


SUBCOMMANDS = (
    _add_collect,
    _add_import_w2w,
    _add_train_vae,
    _add_train_prior,
    _add_train,
    _add_generate,
    _add_zoo,
    _add_eval,
    _add_info,
)


def register(sub: argparse._SubParsersAction, extra: Sequence[Callable] = ()) -> None:
    """Add the `synth` command group, its subcommands and those an application adds (`extra`)."""
    group = sub.add_parser("synth", help="zero-shot LoRA synthesis: collections, models")
    synth_sub = group.add_subparsers(dest="synth_command", required=True)
    for add in (*SUBCOMMANDS, *extra):
        add(synth_sub)
