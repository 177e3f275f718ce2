"""Bad input through the CLI, table-driven: one line (at most two), exit 2, nothing changed.

Every case builds its input in a fresh folder beside one shared tiny trained run, runs
`condlora.cli.main` in-process, and checks: exit code 2, at most 2 lines on stderr, no
traceback, every file that existed before byte-identical afterwards, no temporary file
left. A few cases run through a subprocess to show that no traceback reaches the terminal.
"""

import json
import math
import shutil
import struct
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from condlora.cli import main
from condlora.core.config import parse_overrides
from condlora.synthesis.collection import write_dataset
from condlora.train.checkpoint import CHECKPOINT_NAME, EMA_NAME

from .conftest import CONFIGS, REPO, TINY
from .synth_common import SPEC, linear_collection
from .synth_common import TINY as SYNTH_TINY

BASE = CONFIGS / "digits-uclora.yaml"


@pytest.fixture(scope="module")
def shared(tmp_path_factory, one_thread):
    """A tiny config, a run trained 2 steps with it (label dropout on), a good kohya LoRA."""
    root = tmp_path_factory.mktemp("shared")
    settings = parse_overrides([*TINY, "train.label_dropout=0.1", "train.max_steps=2"])
    (root / "tiny.yaml").write_text(yaml.safe_dump({"base": str(BASE), **settings}))
    args = ["train", "--config", root / "tiny.yaml", "--out", root / "run", "--quiet"]
    assert main([str(a) for a in args]) == 0
    g = torch.Generator().manual_seed(0)
    stem = "lora_unet_mid_block_attentions_0_proj_in"
    lora = {
        f"{stem}.lora_down.weight": torch.randn(2, 8, generator=g),
        f"{stem}.lora_up.weight": torch.randn(8, 2, generator=g),
        f"{stem}.alpha": torch.tensor(2.0),
    }
    save_file(lora, str(root / "lora.safetensors"))
    assert main(["lora", "info", str(root / "lora.safetensors")]) == 0
    synth_model(root / "synth")
    return root


def synth_model(folder):
    """folder/data.safetensors (a tiny collection), folder/model trained on it, folder/e.safetensors
    (one embedding)."""
    folder.mkdir()
    dataset = linear_collection(folder / "data.safetensors")[0]
    args = ["synth", "train", "--config", synth_config(folder, dataset), "--out", folder / "model"]
    assert main([str(a) for a in [*args, "--quiet", *SYNTH_TINY]]) == 0
    save_file({"e": torch.randn(4)}, str(folder / "e.safetensors"))


# --- building damaged files ---------------------------------------------------------------


def checkpoint(shared):
    return shared / "run" / CHECKPOINT_NAME


def copy_run(shared, d, meta=None, tensors=None, name=EMA_NAME):
    """A copy of the shared run in d/run, its file `name` (default: the EMA model file that
    sampling reads; CHECKPOINT_NAME: what --resume reads) rewritten by meta / tensors edits."""
    run = d / "run"
    shutil.copytree(shared / "run", run)
    if meta or tensors:
        from safetensors import safe_open

        with safe_open(str(run / name), framework="pt") as f:
            metadata = f.metadata()
        weights = load_file(str(run / name))
        if meta:
            meta(metadata)
        if tensors:
            tensors(weights)
        save_file(weights, str(run / name), metadata=metadata)
    return run


def raw_run(shared, d, edit, name=EMA_NAME):
    """A copy of the run whose file `name` has its bytes replaced by edit(bytes)."""
    run = copy_run(shared, d)
    path = run / name
    path.write_bytes(edit(path.read_bytes()))
    return run


def sample(run, *extra, out=None):
    return ["sample", "--run", run, "--num", "2", "--out", out or run.parent / "s.png", *extra]


def set_config(key, value):
    def edit(meta):
        cfg = json.loads(meta["config"])
        section, name = key.split(".")
        cfg[section][name] = value
        meta["config"] = json.dumps(cfg)

    return edit


def drop_ema_tensor(weights):
    del weights[next(iter(weights))]


def reshape_ema_tensor(weights):
    key = next(k for k in weights if weights[k].dim() == 2)
    weights[key] = torch.zeros(weights[key].shape[0] + 1, weights[key].shape[1])


def poison(value, prefix):
    def edit(weights):
        key = next(k for k in weights if k.startswith(prefix) and weights[k].is_floating_point())
        weights[key] = weights[key].clone()
        weights[key].view(-1)[0] = value

    return edit


def huge_ema(weights):
    """Finite EMA weights whose samples overflow: every output-conv weight at 1e30."""
    for key in [k for k in weights if "conv_out" in k]:
        weights[key] = torch.full_like(weights[key], 1e30)


def header_edit(fn):
    """Bytes of a safetensors file with its JSON header changed by fn(header dict)."""

    def edit(data):
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        fn(header)
        raw = json.dumps(header).encode()
        return struct.pack("<Q", len(raw)) + raw + data[8 + n :]

    return edit


def header_bytes(data, raw):
    """Bytes of a safetensors file with its JSON header replaced by raw bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    return struct.pack("<Q", len(raw)) + raw + data[8 + n :]


def first_tensor(header):
    return header[next(k for k in header if k != "__metadata__")]


def write(d, name, content):
    path = d / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def yaml_config(d, text):
    return write(d, "c.yaml", f"base: {BASE}\n{text}")


def images(folder, classes, count=3, size=8):
    for name in classes:
        for i in range(count):
            path = folder / name / f"{i}.png" if name else folder / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (size, size), (40 * i, 80, 120)).save(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def folder_train(d, s, folder, *extra):
    over = [f"data.path={folder}", "data.name=folder", "data.holdout=1", "train.batch_size=2"]
    return train(s, d, *over, *extra)


def train(s, d, *extra, config=None):
    return ["train", "--config", config or s / "tiny.yaml", "--out", d / "new", "--quiet", *extra]


def foreign_folder(d, name="new"):
    """d/name holding another program's config.yaml and metrics.jsonl, and no checkpoint."""
    write(d, f"{name}/config.yaml", "something: else\n")
    write(d, f"{name}/metrics.jsonl", '{"step": 7, "loss": 0.5}\n')
    return d


def named_config(s, d, name):
    """The tiny config with `name:` set, trained without --out (runs/<name>)."""
    text = (s / "tiny.yaml").read_text() + f"name: {name!r}\n"
    return ["train", "--config", write(d, "c.yaml", text), "--quiet"]


def convert(source, to, out):
    return ["lora", "convert", source, "--to", to, "--out", out]


def info(s, *overrides, config=None):
    return ["info", "--config", config or s / "tiny.yaml", *overrides]


def lora_file(s, d, edit=None, tensors=None):
    """A copy of the good kohya LoRA, bytes edited or tensors replaced."""
    path = d / "l.safetensors"
    if tensors is not None:
        save_file(tensors, str(path))
    else:
        data = (s / "lora.safetensors").read_bytes()
        path.write_bytes(edit(data) if edit else data)
    return path


STEM = "lora_unet_mid_block_attentions_0_proj_in"


def kohya(down=None, up=None, alpha=None):
    return {
        f"{STEM}.lora_down.weight": torch.ones(2, 8) if down is None else down,
        f"{STEM}.lora_up.weight": torch.ones(8, 2) if up is None else up,
        f"{STEM}.alpha": torch.tensor(2.0) if alpha is None else alpha,
    }


TE_STEM = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
TE = {"lora_down.weight": torch.ones(2, 8), "lora_up.weight": torch.ones(8, 2)}


def peft_folder(d, config):
    """A peft adapter folder: one good module, the given adapter_config.json."""
    folder = d / "adapter"
    folder.mkdir()
    stem = "base_model.model.mid.to_q"
    tensors = {f"{stem}.lora_A.weight": torch.ones(2, 8), f"{stem}.lora_B.weight": torch.ones(8, 2)}
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    write(folder, "adapter_config.json", json.dumps({"target_modules": ["to_q"]} | config))
    return folder


def per_model(d):
    """A folder of peft adapters per model (unet/, text_encoder/) whose text_encoder/ lacks
    its weights file."""
    peft_folder(d, {"r": 2, "lora_alpha": 2}).rename(d / "unet")
    write(d / "text_encoder", "adapter_config.json", "{}")
    return d


def diffusers_file(d, metadata):
    """A diffusers LoRA file (one module) with the given adapter metadata text."""
    path = d / "d.safetensors"
    tensors = {"unet.mid.to_q.lora_A.weight": torch.ones(2, 8)}
    tensors["unet.mid.to_q.lora_B.weight"] = torch.ones(8, 2)
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": metadata})
    return path


def synth_config(d, dataset):
    return write(d, "synth.yaml", f"kind: synthesis\nname: tiny\ndataset: {dataset}\n")


def synth_train(d, dataset, *extra):
    """`synth train` of a tiny model on a dataset, into d/model."""
    config = synth_config(d, dataset)
    return [
        "synth",
        "train",
        "--config",
        config,
        "--out",
        d / "model",
        "--quiet",
        *SYNTH_TINY,
        *extra,
    ]


def damaged_dataset(s, d, edit):
    """A copy of the shared collection whose bytes are replaced by edit(bytes)."""
    return write(d, "data.safetensors", edit((s / "synth" / "data.safetensors").read_bytes()))


def generate(s, d, *extra, out="g"):
    """`synth generate` from the shared model into d/out."""
    model, embedding = s / "synth" / "model", s / "synth" / "e.safetensors"
    return [
        *["synth", "generate", "--model", model, "--embedding", embedding],
        "--out",
        d / out,
        *extra,
    ]


def lora_folder(s, d):
    """d/loras holding two good peft adapters, a and b."""
    (d / "loras").mkdir()
    for name in ("a", "b"):
        peft_folder(d, {"r": 2, "lora_alpha": 2}).rename(d / "loras" / name)
    return d / "loras"


def collected(s, d):
    """lora_folder's LoRAs, and d/ref.safetensors collected from them (with alignment)."""
    folder = lora_folder(s, d)
    assert (
        main(["synth", "collect", "--loras", str(folder), "--out", str(d / "ref.safetensors")]) == 0
    )
    return folder


def nan_dataset(d):
    """A tiny collection with one NaN among its vectors."""
    path, vectors, embeddings, _, _ = linear_collection(d / "nan.safetensors")
    vectors[3, 2] = math.nan
    names = [f"s{i:03d}" for i in range(len(vectors))]
    return write_dataset(path, names, SPEC, vectors, embeddings)


def experiment(d, text):
    return write(d, "exp.yaml", text)


EXPERIMENT = f"name: e\nsteps: 2\nvariants:\n  - {{name: a, config: {BASE}}}\n"

# --- the cases: name -> build(shared folder, case folder) -> argv ------------------------

CASES = {
    # config files
    "config missing": lambda s, d: info(s, config=d / "none.yaml"),
    "config is a folder": lambda s, d: info(s, config=d),
    "config not text": lambda s, d: info(s, config=write(d, "c.yaml", bytes(range(256)))),
    "config bad yaml": lambda s, d: info(s, config=write(d, "c.yaml", "net: [1, 2\n")),
    "config is a list": lambda s, d: info(s, config=write(d, "c.yaml", "- 1\n- 2\n")),
    "config is a scalar": lambda s, d: info(s, config=write(d, "c.yaml", "hello\n")),
    "config unknown key": lambda s, d: info(s, config=yaml_config(d, "trian: {}\n")),
    "config misspelled key": lambda s, d: info(s, config=yaml_config(d, "net: {chanels: 8}\n")),
    "config int as text": lambda s, d: info(s, config=yaml_config(d, "train: {max_steps: x}\n")),
    "config float as text": lambda s, d: info(s, config=yaml_config(d, "train: {lr: fast}\n")),
    "config float as list": lambda s, d: info(s, config=yaml_config(d, "net: {dropout: [1]}\n")),
    "config section scalar": lambda s, d: info(s, config=yaml_config(d, "net: 5\n")),
    "config base missing": lambda s, d: info(s, config=write(d, "c.yaml", "base: no.yaml\n")),
    "config base cycle": lambda s, d: info(s, config=write(d, "c.yaml", "base: c.yaml\n")),
    # config values out of range (through overrides)
    "model_channels 0": lambda s, d: info(s, "net.model_channels=0"),
    "model_channels negative": lambda s, d: info(s, "net.model_channels=-8"),
    "num_heads 0": lambda s, d: info(s, "net.num_heads=0"),
    "channel_mult empty": lambda s, d: info(s, "net.channel_mult=[]"),
    "channel_mult 0": lambda s, d: info(s, "net.channel_mult=[1, 0]"),
    "num_blocks 0": lambda s, d: info(s, "net.num_blocks=0"),
    "dropout 1.5": lambda s, d: info(s, "net.dropout=1.5"),
    "unknown arch": lambda s, d: info(s, "net.arch=transformer"),
    "unknown cond_mode": lambda s, d: info(s, "net.cond_mode=magic"),
    "resolution 0": lambda s, d: info(s, "data.resolution=0"),
    "resolution 7": lambda s, d: info(s, "data.resolution=7"),
    "unknown data set": lambda s, d: info(s, "data.name=imagenet"),
    "channels 2": lambda s, d: info(s, "data.channels=2"),
    "batch_size 0": lambda s, d: train(s, d, "train.batch_size=0"),
    "batch_size negative": lambda s, d: train(s, d, "train.batch_size=-4"),
    "grad_accum 0": lambda s, d: train(s, d, "train.grad_accum=0"),
    "lr 0": lambda s, d: train(s, d, "train.lr=0"),
    "lr negative": lambda s, d: train(s, d, "train.lr=-1e-3"),
    "lr nan": lambda s, d: train(s, d, "train.lr=.nan"),
    "lr inf": lambda s, d: train(s, d, "train.lr=.inf"),
    "max_steps 0 in config": lambda s, d: train(s, d, "train.max_steps=0"),
    "ema_decay above 1": lambda s, d: train(s, d, "train.ema_decay=1.5"),
    "ema_decay negative": lambda s, d: train(s, d, "train.ema_decay=-0.1"),
    "warmup negative": lambda s, d: train(s, d, "train.warmup_steps=-1"),
    "log_every 0": lambda s, d: train(s, d, "train.log_every=0"),
    "ckpt_every negative": lambda s, d: train(s, d, "train.ckpt_every=-5"),
    "sample_every negative": lambda s, d: train(s, d, "train.sample_every=-1"),
    "mixed precision fp8": lambda s, d: train(s, d, "train.mixed_precision=fp8"),
    "unknown lr schedule": lambda s, d: train(s, d, "train.lr_schedule=step"),
    "unknown ema schedule": lambda s, d: train(s, d, "train.ema_schedule=power"),
    "label_dropout 1": lambda s, d: train(s, d, "train.label_dropout=1"),
    "augment_p 2": lambda s, d: train(s, d, "train.augment_p=2"),
    "nonfinite_limit 0": lambda s, d: train(s, d, "train.nonfinite_limit=0"),
    "seed negative": lambda s, d: train(s, d, "train.seed=-1"),
    "lora rank 0": lambda s, d: info(s, "lora.rank=0"),
    "lora rank above the layer": lambda s, d: train(s, d, "lora.rank=1000"),
    "lora rank 60000": lambda s, d: info(s, "lora.rank=60000"),
    "lora time table exhausting memory": lambda s, d: info(
        s, "lora.method=time", "lora.num_time_rows=1000000", "lora.num_bases=60000"
    ),
    "lora num_bases 0": lambda s, d: info(s, "lora.num_bases=0"),
    "lora unknown method": lambda s, d: info(s, "lora.method=magic"),
    "lora no targets": lambda s, d: info(s, "lora.targets=[]"),
    "lora mlp width 0": lambda s, d: info(s, "lora.mlp_widths=[0]"),
    "lora scale nan": lambda s, d: info(s, "lora.scale=.nan"),
    "network too large": lambda s, d: info(s, "net.model_channels=16000", "net.channel_mult=[64]"),
    "sample_steps 0": lambda s, d: info(s, "diffusion.sample_steps=0"),
    "num_timesteps 1": lambda s, d: info(s, "diffusion.num_timesteps=1"),
    "unknown sampler": lambda s, d: info(s, "diffusion.sampler=euler"),
    "unknown objective": lambda s, d: info(s, "diffusion.objective=x1"),
    "guidance negative": lambda s, d: info(s, "diffusion.guidance=-1"),
    "sigma_data 0": lambda s, d: info(s, "diffusion.sigma_data=0"),
    "holdout negative": lambda s, d: info(s, "data.holdout=-1"),
    # overrides
    "override broken yaml": lambda s, d: info(s, "train.lr=[1, 2"),
    "override without =": lambda s, d: info(s, "train.lr"),
    "override empty key": lambda s, d: info(s, "=3"),
    "override empty part": lambda s, d: info(s, "train..lr=1"),
    "override conflict": lambda s, d: info(s, "train=1", "train.lr=2"),
    # run folders
    "out is a file": lambda s, d: [
        "train",
        "--config",
        s / "tiny.yaml",
        "--out",
        write(d, "f", "x"),
    ],
    "out under a file": lambda s, d: [
        "train",
        "--config",
        s / "tiny.yaml",
        "--out",
        write(d, "f", "x") / "r",
    ],
    "checkpoint is a folder": lambda s, d: [
        "train",
        "--config",
        s / "tiny.yaml",
        "--out",
        (d / "r" / CHECKPOINT_NAME).mkdir(parents=True) or d / "r",
    ],
    "train into a finished run": lambda s, d: [
        "train",
        "--config",
        s / "tiny.yaml",
        "--out",
        copy_run(s, d),
    ],
    "resume without checkpoint": lambda s, d: [*train(s, d), "--resume"],
    "resume other config": lambda s, d: [
        "train",
        "--config",
        s / "tiny.yaml",
        "--out",
        copy_run(s, d),
        "--resume",
        "diffusion.objective=v",
    ],
    "resume damaged checkpoint": lambda s, d: [
        "train",
        "--config",
        s / "tiny.yaml",
        "--out",
        raw_run(s, d, lambda b: b[: len(b) // 2], CHECKPOINT_NAME),
        "--resume",
    ],
    "resume nan checkpoint": lambda s, d: [
        "train",
        "--config",
        s / "tiny.yaml",
        "--out",
        copy_run(s, d, tensors=poison(math.nan, "model."), name=CHECKPOINT_NAME),
        "--resume",
    ],
    "max-steps 0": lambda s, d: [*train(s, d), "--max-steps", "0"],
    "max-steps negative": lambda s, d: [*train(s, d), "--max-steps", "-5"],
    "init-from with resume": lambda s, d: [*train(s, d), "--init-from", s / "run", "--resume"],
    "init-from missing": lambda s, d: [*train(s, d), "--init-from", d / "nowhere"],
    # checkpoints, through sample
    "run missing": lambda s, d: sample(d / "none"),
    "run is a file": lambda s, d: sample(write(d, "f", "x")),
    "run without checkpoint": lambda s, d: sample(d),
    "checkpoint zero bytes": lambda s, d: sample(raw_run(s, d, lambda b: b"")),
    "checkpoint truncated": lambda s, d: sample(raw_run(s, d, lambda b: b[: len(b) // 2])),
    "checkpoint is text": lambda s, d: sample(
        raw_run(s, d, lambda b: b"hello, I am a checkpoint\n" * 9)
    ),
    "checkpoint absurd header length": lambda s, d: sample(
        raw_run(s, d, lambda b: struct.pack("<Q", 2**62) + b[8:])
    ),
    "checkpoint header not json": lambda s, d: sample(
        raw_run(s, d, lambda b: b[:8] + b"!" + b[9:])
    ),
    "checkpoint offsets outside": lambda s, d: sample(
        raw_run(s, d, header_edit(lambda h: first_tensor(h).update(data_offsets=[0, 2**40])))
    ),
    "checkpoint unknown dtype": lambda s, d: sample(
        raw_run(s, d, header_edit(lambda h: first_tensor(h).update(dtype="Q99")))
    ),
    "checkpoint shape lies": lambda s, d: sample(
        raw_run(s, d, header_edit(lambda h: first_tensor(h).update(shape=[10**6, 10**6])))
    ),
    "config metadata not json": lambda s, d: sample(
        copy_run(s, d, meta=lambda m: m.update(config="{oops"))
    ),
    "metadata lacks step": lambda s, d: sample(copy_run(s, d, meta=lambda m: m.pop("step"))),
    "metadata step not a number": lambda s, d: sample(
        copy_run(s, d, meta=lambda m: m.update(step="x"))
    ),
    "metadata other format": lambda s, d: sample(
        copy_run(s, d, meta=lambda m: m.update(format="other"))
    ),
    "checkpoint of another kind": lambda s, d: sample(
        copy_run(s, d, meta=lambda m: m.update(kind="vae"))
    ),
    "stored config out of range": lambda s, d: sample(
        copy_run(s, d, meta=set_config("net.model_channels", 0))
    ),
    "EMA tensor missing": lambda s, d: sample(copy_run(s, d, tensors=drop_ema_tensor)),
    "EMA tensor wrong shape": lambda s, d: sample(copy_run(s, d, tensors=reshape_ema_tensor)),
    "EMA with NaN": lambda s, d: sample(copy_run(s, d, tensors=poison(math.nan, ""))),
    "finite EMA giving inf samples": lambda s, d: sample(copy_run(s, d, tensors=huge_ema)),
    "EMA with inf": lambda s, d: sample(copy_run(s, d, tensors=poison(math.inf, ""))),
    "unexpected tensor": lambda s, d: sample(
        copy_run(s, d, tensors=lambda w: w.update(junk=torch.zeros(1)))
    ),
    # sampling options
    "sample steps 0": lambda s, d: sample(s / "run", "--steps", "0", out=d / "s.png"),
    "sample steps negative": lambda s, d: sample(s / "run", "--steps", "-3", out=d / "s.png"),
    "sample guidance negative": lambda s, d: sample(s / "run", "--guidance", "-1", out=d / "s.png"),
    "guidance nan": lambda s, d: sample(s / "run", "--guidance", "nan", out=d / "s.png"),
    "guidance without label dropout": lambda s, d: sample(
        copy_run(s, d, meta=set_config("train.label_dropout", 0.0)), "--guidance", "2"
    ),
    "guidance with iddpm sampler": lambda s, d: sample(
        s / "run", "--guidance", "2", "--sampler", "iddpm", out=d / "s.png"
    ),
    "num 0": lambda s, d: ["sample", "--run", s / "run", "--num", "0", "--out", d / "s.png"],
    "num too large": lambda s, d: [
        "sample",
        "--run",
        s / "run",
        "--num",
        "10000000000",
        "--out",
        d / "s.png",
    ],
    "num not a number": lambda s, d: [
        "sample",
        "--run",
        s / "run",
        "--num",
        "many",
        "--out",
        d / "s.png",
    ],
    "sample seed negative": lambda s, d: sample(s / "run", "--seed", "-1", out=d / "s.png"),
    "label out of range": lambda s, d: sample(s / "run", "--label", "10", out=d / "s.png"),
    "label negative": lambda s, d: sample(s / "run", "--label", "-1", out=d / "s.png"),
    "nrow 0": lambda s, d: sample(s / "run", "--nrow", "0", out=d / "s.png"),
    "out is a folder": lambda s, d: sample(s / "run", out=d),
    "out without extension": lambda s, d: sample(s / "run", out=d / "grid"),
    "out unknown extension": lambda s, d: sample(s / "run", out=d / "grid.txt"),
    "sample out under a file": lambda s, d: sample(s / "run", out=write(d, "f", "x") / "g.png"),
    "unknown sampler option": lambda s, d: sample(s / "run", "--sampler", "euler", out=d / "s.png"),
    # eval and experiments
    "eval num 1": lambda s, d: ["eval", "--run", copy_run(s, d), "--num", "1"],
    "eval steps 0": lambda s, d: ["eval", "--run", copy_run(s, d), "--steps", "0"],
    "eval guidance negative": lambda s, d: ["eval", "--run", copy_run(s, d), "--guidance", "-2"],
    "eval seed negative": lambda s, d: ["eval", "--run", copy_run(s, d), "--seed", "-5"],
    "eval cache is a file": lambda s, d: [
        "eval",
        "--run",
        copy_run(s, d),
        "--cache",
        write(d, "f", "x"),
    ],
    "eval run missing": lambda s, d: ["eval", "--run", d / "none"],
    "experiment missing": lambda s, d: ["experiment", d / "none.yaml"],
    "experiment steps 0": lambda s, d: ["experiment", experiment(d, EXPERIMENT), "--steps", "0"],
    "experiment num 0": lambda s, d: ["experiment", experiment(d, EXPERIMENT), "--num", "0"],
    "experiment seeds not numbers": lambda s, d: [
        "experiment",
        experiment(d, EXPERIMENT),
        "--seeds",
        "a,b",
    ],
    "experiment seeds negative": lambda s, d: [
        "experiment",
        experiment(d, EXPERIMENT),
        "--seeds=-1",
    ],
    "experiment no variants": lambda s, d: ["experiment", experiment(d, "name: e\nsteps: 2\n")],
    "experiment bad yaml": lambda s, d: ["experiment", experiment(d, "name: [e\n")],
    "quickstart steps 0": lambda s, d: ["quickstart", "--out", d / "q", "--steps", "0"],
    # data folders
    "data folder missing": lambda s, d: folder_train(d, s, d / "none"),
    "data folder is a file": lambda s, d: folder_train(d, s, write(d, "f", "x")),
    "data folder empty": lambda s, d: folder_train(d, s, images(d / "imgs", [])),
    "data class folder empty": lambda s, d: folder_train(
        d, s, (images(d / "imgs", ["a", "b"]) / "c").mkdir() or d / "imgs"
    ),
    "data mixed layout": lambda s, d: folder_train(d, s, images(images(d / "imgs", ["a"]), [""])),
    "data corrupt image": lambda s, d: folder_train(
        d, s, write(images(d / "imgs", ["a"]), "a/9.png", b"\x89PNG\r\n\x1a\n broken").parent.parent
    ),
    "data holdout too large": lambda s, d: folder_train(
        d, s, images(d / "imgs", ["a"]), "data.holdout=50"
    ),
    "cifar10 without path": lambda s, d: train(s, d, "data.name=cifar10", "data.resolution=32"),
    "cifar10 path missing": lambda s, d: train(
        s, d, "data.name=cifar10", "data.resolution=32", f"data.path={d / 'cifar'}"
    ),
    # LoRA files
    "lora missing": lambda s, d: ["lora", "info", d / "none.safetensors"],
    "lora zero bytes": lambda s, d: ["lora", "info", lora_file(s, d, lambda b: b"")],
    "lora text": lambda s, d: ["lora", "info", lora_file(s, d, lambda b: b"not a lora\n" * 20)],
    "lora truncated": lambda s, d: ["lora", "info", lora_file(s, d, lambda b: b[:-5])],
    "lora header corrupted": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, lambda b: b[:8] + b"{{" + b[10:]),
    ],
    "lora nan": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, tensors=kohya(down=torch.full((2, 8), math.nan))),
    ],
    "lora inf alpha": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, tensors=kohya(alpha=torch.tensor(math.inf))),
    ],
    "lora integer": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, tensors=kohya(up=torch.ones(8, 2, dtype=torch.int32))),
    ],
    "lora no lora keys": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, tensors={"w": torch.ones(2)}),
    ],
    # odd but parseable LoRA contents (issue 24)
    "lora 0-d factor": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, tensors=kohya(torch.tensor(1.0))),
    ],
    "lora file rank 0": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, tensors=kohya(torch.zeros(0, 8), torch.zeros(8, 0))),
    ],
    "lora alpha of shape [0]": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, tensors=kohya(alpha=torch.zeros(0))),
    ],
    "lora alpha of two numbers": lambda s, d: [
        "lora",
        "info",
        lora_file(s, d, tensors=kohya(alpha=torch.ones(2))),
    ],
    "peft alpha text": lambda s, d: ["lora", "info", peft_folder(d, {"r": 2, "lora_alpha": "x"})],
    "peft alpha list": lambda s, d: ["lora", "info", peft_folder(d, {"r": 2, "lora_alpha": [1]})],
    "peft alpha bool": lambda s, d: ["lora", "info", peft_folder(d, {"r": 2, "lora_alpha": True})],
    "peft r 0": lambda s, d: ["lora", "info", peft_folder(d, {"r": 0, "lora_alpha": 2})],
    "peft r fractional": lambda s, d: ["lora", "info", peft_folder(d, {"r": 2.5, "lora_alpha": 2})],
    "peft rank_pattern list": lambda s, d: [
        "lora",
        "info",
        peft_folder(d, {"r": 2, "lora_alpha": 2, "rank_pattern": [1]}),
    ],
    "peft alpha_pattern value text": lambda s, d: [
        "lora",
        "info",
        peft_folder(d, {"r": 2, "lora_alpha": 2, "alpha_pattern": {"to_q": "big"}}),
    ],
    "diffusers metadata a list": lambda s, d: ["lora", "info", diffusers_file(d, "[1, 2]")],
    "diffusers metadata a number": lambda s, d: ["lora", "info", diffusers_file(d, "3")],
    "convert peft alpha list": lambda s, d: convert(
        peft_folder(d, {"r": 2, "lora_alpha": [1]}), "kohya", d / "k.safetensors"
    ),
    "synth generate negative guidance": lambda s, d: [
        "synth",
        "generate",
        "--model",
        d / "none",
        "--embedding",
        d / "e.safetensors",
        "--out",
        d / "lora",
        "--guidance",
        "-5",
    ],
    # run folders that hold something else, names that leave runs/ (issue 24)
    "train into a folder of other files": lambda s, d: train(s, foreign_folder(d)),
    "train into it with steps": lambda s, d: train(s, foreign_folder(d), "--max-steps", "2"),
    "config name absolute": lambda s, d: named_config(s, d, str(d / "elsewhere")),
    "config name climbs": lambda s, d: named_config(s, d, "../../elsewhere"),
    "config name is a path": lambda s, d: named_config(s, d, "a/b"),
    "serve runs is a file": lambda s, d: ["serve", "--runs", s / "lora.safetensors"],
    "serve runs missing": lambda s, d: ["serve", "--runs", d / "none"],
    "lora convert out under a file": lambda s, d: convert(
        s / "lora.safetensors", "peft", write(d, "afile", "x") / "peft"
    ),
    "lora convert file out under a file": lambda s, d: convert(
        s / "lora.safetensors", "kohya", write(d, "afile", "x") / "k.safetensors"
    ),
    "lora convert unknown out": lambda s, d: convert(s / "lora.safetensors", "kohya", d / "x.txt"),
    # damaged, truncated or mismatched LoRA files given to a writing command (issue 22)
    "lora convert truncated": lambda s, d: convert(
        lora_file(s, d, lambda b: b[:-5]), "kohya", d / "k.safetensors"
    ),
    "lora convert other base model": lambda s, d: [
        *convert(s / "lora.safetensors", "peft", d / "p"),
        *["--base-modules", write(d, "b.json", '{"mid_block.attentions.0.proj_in": [16, 16]}')],
    ],
    "lora convert module not in the base": lambda s, d: [
        *convert(s / "lora.safetensors", "peft", d / "p"),
        *["--base-modules", write(d, "b.json", '["mid_block.attentions.0.proj_out"]')],
    ],
    "lora convert peft over a peft LoRA of other parts": lambda s, d: convert(
        lora_file(s, d, tensors=kohya() | {f"{TE_STEM}.{k}": v for k, v in TE.items()}),
        "peft",
        peft_folder(d, {"r": 2, "lora_alpha": 2}),
    ),
    "lora peft component folder without weights": lambda s, d: ["lora", "info", per_model(d)],
    "lora convert over a model file": lambda s, d: convert(
        s / "lora.safetensors",
        "kohya",
        save_file({"w": torch.ones(3)}, str(d / "m.safetensors")) or d / "m.safetensors",
    ),
    "lora convert over a text file": lambda s, d: convert(
        s / "lora.safetensors", "kohya", write(d, "notes.safetensors", "my notes")
    ),
    "synth generate over a text file": lambda s, d: generate(
        s, d, "--format", "kohya", out=write(d, "g.safetensors", "my notes").name
    ),
    # sizes checked before allocating, headers read with the checked reader (issue 24)
    "lora convert rank 1e9": lambda s, d: [
        *convert(s / "lora.safetensors", "kohya", d / "k.safetensors"),
        "--rank",
        "1000000000",
    ],
    "lora convert rank above every module": lambda s, d: [
        *convert(s / "lora.safetensors", "kohya", d / "k.safetensors"),
        "--rank",
        "9",
    ],
    "lora convert rank 0": lambda s, d: [
        *convert(s / "lora.safetensors", "peft", d / "p"),
        "--rank",
        "0",
    ],
    "serve host unresolvable": lambda s, d: [
        "serve",
        "--runs",
        d,
        "--host",
        "no.such.host.invalid",
    ],
    "serve host not on this machine": lambda s, d: ["serve", "--runs", d, "--host", "192.0.2.1"],
    "serve host label too long": lambda s, d: ["serve", "--runs", d, "--host", "a" * 300],
    "serve host empty": lambda s, d: ["serve", "--runs", d, "--host", ""],
    "serve port 0": lambda s, d: ["serve", "--runs", d, "--port", "0"],
    "serve port above 65535": lambda s, d: ["serve", "--runs", d, "--port", "70000"],
    "lora base-modules shape a number": lambda s, d: [
        *["lora", "info", s / "lora.safetensors"],
        *["--base-modules", write(d, "b.json", '{"mid.to_q": 5}')],
    ],
    "lora base-modules shape nested": lambda s, d: [
        *["lora", "info", s / "lora.safetensors"],
        *["--base-modules", write(d, "b.json", '{"mid.to_q": [[8], 8]}')],
    ],
    "synth collect base-modules shape a number": lambda s, d: [
        *["synth", "collect", "--loras", lora_folder(s, d), "--out", d / "ds.safetensors"],
        *["--base-modules", write(d, "b.json", '{"mid.to_q": 5}')],
    ],
    "synth collect out is one of the LoRAs": lambda s, d: [
        *["synth", "collect", "--loras", lora_folder(s, d)],
        *["--out", d / "loras" / "a" / "adapter_model.safetensors"],
    ],
    "synth collect out is another file": lambda s, d: [
        *["synth", "collect", "--loras", lora_folder(s, d)],
        *["--out", write(d, "notes.safetensors", "my notes")],
    ],
    "synth collect align-to with no-align": lambda s, d: [
        *["synth", "collect", "--loras", collected(s, d), "--out", d / "ds.safetensors"],
        *["--align-to", d / "ref.safetensors", "--no-align"],
    ],
    "synth generate seed negative": lambda s, d: generate(s, d, "--seed", "-1"),
    "synth generate seed beyond 2^63": lambda s, d: generate(s, d, "--seed", str(2**70)),
    "synth train resume, batch larger than the data": lambda s, d: synth_train(
        d, s / "synth" / "data.safetensors", "--resume", "vae_train.batch_size=64"
    ),
    "serve base missing": lambda s, d: ["serve", "--runs", d, "--base", d / "none"],
    "synth generate num 1e9": lambda s, d: generate(s, d, "--num", "1000000000"),
    # failures after some work: nothing new left behind, nothing changed (issue 24)
    "synth generate a later output is a file": lambda s, d: (
        write(d, "g_1", "x") and generate(s, d, "--num", "3")
    ),
    "synth generate a later kohya output is a folder": lambda s, d: (
        (d / "g_2.safetensors").mkdir()
        or generate(s, d, "--num", "3", "--format", "kohya", out="g.safetensors")
    ),
    "synth train vae diverging": lambda s, d: synth_train(
        d, s / "synth" / "data.safetensors", "vae_train.lr=1e30"
    ),
    "synth train prior diverging": lambda s, d: synth_train(
        d, s / "synth" / "data.safetensors", "prior_train.lr=1e30"
    ),
    "synth train diverging into an empty folder": lambda s, d: (
        (d / "model").mkdir()
        or synth_train(d, s / "synth" / "data.safetensors", "prior_train.lr=1e30")
    ),
    "synth train-vae diverging": lambda s, d: [
        *["synth", "train-vae", "--dataset", s / "synth" / "data.safetensors"],
        *["--out", d / "model", "--quiet", *SYNTH_TINY, "vae_train.lr=1e30"],
    ],
    "synth train into a folder of other files": lambda s, d: synth_train(
        foreign_folder(d, "model"), s / "synth" / "data.safetensors"
    ),
    "synth train-vae into a folder of other files": lambda s, d: [
        *["synth", "train-vae", "--dataset", s / "synth" / "data.safetensors"],
        *["--out", foreign_folder(d, "model") / "model", "--quiet", *SYNTH_TINY],
    ],
    "synth train dataset with NaN": lambda s, d: synth_train(d, nan_dataset(d)),
    "synth train dataset entry without data_offsets": lambda s, d: synth_train(
        d, damaged_dataset(s, d, header_edit(lambda h: h["vectors"].pop("data_offsets")))
    ),
    "synth train dataset header a list": lambda s, d: synth_train(
        d, damaged_dataset(s, d, lambda b: header_bytes(b, b"[1, 2]"))
    ),
}


def snapshot(*folders):
    """Every file's bytes and every folder (None) under the folders."""
    paths = (p for f in folders for p in sorted(f.rglob("*")))
    return {p: p.read_bytes() if p.is_file() else None for p in paths}


def run_main(argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:  # argparse's own refusals
        return stop.code


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, shared, tmp_path, capsys):
    argv = CASES[name](shared, tmp_path)
    capsys.readouterr()
    before = snapshot(shared, tmp_path)
    code = run_main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert 1 <= len(lines) <= 2 and "Traceback" not in err, err
    assert "error" in lines[0] and "this is a bug" not in err, err
    after = snapshot(shared, tmp_path)
    assert all(after.get(p) == content for p, content in before.items()), "a file changed"
    assert not [p for p in after if p.name.endswith(".tmp")], "a temporary file was left"
    assert set(after) == set(before), f"new files or folders: {set(after) - set(before)}"


def test_there_are_at_least_200_distinct_cases():
    assert len(CASES) >= 200


@pytest.mark.slow
@pytest.mark.parametrize("name", ["checkpoint truncated", "config not text", "num not a number"])
def test_no_traceback_reaches_the_terminal(name, shared, tmp_path):
    argv = [str(a) for a in CASES[name](shared, tmp_path)]
    result = subprocess.run(
        [sys.executable, "-m", "condlora.cli", *argv], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 2


def test_an_unexpected_exception_is_a_bug_report_and_debug_shows_it(monkeypatch, capsys):
    from condlora import cli

    def broken(args):
        raise ZeroDivisionError("an internal slip")

    monkeypatch.setattr(cli, "_info", broken)  # looked up when the parser is built
    assert main(["info", "--config", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "this is a bug, please report it" in err
    assert "ZeroDivisionError: an internal slip" in err and len(err.strip().splitlines()) == 2
    assert main(["--debug", "info", "--config", "x.yaml"]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error",
    [
        MemoryError(),
        RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 64 GB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    ],
)
def test_a_failed_allocation_is_the_out_of_memory_line(error, monkeypatch, capsys):
    from condlora import cli

    def exhausted(args):
        raise error

    monkeypatch.setattr(cli, "_info", exhausted)
    assert main(["info", "--config", "x.yaml"]) == 1
    err = capsys.readouterr().err
    assert err == "condlora: error: out of memory (try a smaller model, batch or --num)\n", err
