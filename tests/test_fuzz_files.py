"""Fuzzed safetensors files (headers, shapes, dtypes, offsets, metadata, bytes) for checkpoints
and LoRA files: a load succeeds correctly or raises condlora's error, never anything else, and
never reads more tensor bytes than the file holds."""

import json
import math
import struct
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open as real_safe_open
from safetensors.torch import save_file
from torch import nn

import condlora.core.safetensors_io as sio
from condlora.core.errors import CondloraError
from condlora.lora import LoRAConfig, inject, load_lora, lora_layers, save_lora
from condlora.lora.formats import read_lora
from condlora.train.checkpoint import load_training_state, read_checkpoint, save_checkpoint
from condlora.train.config import TrainConfig

DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "U16", "X"]
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


@dataclass
class ToyConfig:
    width: int = 4
    train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=2))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(self.qkv(x)[:, :4])


def _toy_checkpoint(path):
    torch.manual_seed(0)
    model, ema = Toy(), Toy()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    save_checkpoint(path, ToyConfig(), "toy", 7, model, ema, opt)


def _toy_lora(path):
    torch.manual_seed(0)
    model = Toy()
    inject(model, LoRAConfig(method="time", rank=2, num_bases=2, num_time_rows=5))
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B)
    save_lora(model, path)


def _kohya(path):
    stem = "lora_unet_mid_block_attentions_0_proj_in"
    tensors = {
        f"{stem}.lora_down.weight": torch.randn(2, 8),
        f"{stem}.lora_up.weight": torch.randn(8, 2),
        f"{stem}.alpha": torch.tensor(2.0),
    }
    save_file(tensors, str(path))


def _lycoris(path):
    """One module of each LyCORIS kind (LoHa, LoKr, full, Tucker conv) and an old diffusers key."""
    r = torch.randn
    tensors = {
        "lycoris_a.hada_w1_a": r(4, 2),
        "lycoris_a.hada_w1_b": r(2, 6),
        "lycoris_a.hada_w2_a": r(4, 2),
        "lycoris_a.hada_w2_b": r(2, 6),
        "lycoris_a.alpha": torch.tensor(1.0),
        "lycoris_b.lokr_w1": r(2, 2),
        "lycoris_b.lokr_w2_a": r(2, 1),
        "lycoris_b.lokr_w2_b": r(1, 3),
        "lycoris_b.alpha": torch.tensor(1.0),
        "lycoris_c.diff": r(4, 6),
        "lycoris_c.diff_b": r(4),
        "lycoris_d.lora_down.weight": r(2, 3, 1, 1),
        "lycoris_d.lora_mid.weight": r(2, 2, 3, 3),
        "lycoris_d.lora_up.weight": r(4, 2, 1, 1),
        "unet.e.processor.to_q_lora.down.weight": r(2, 6),
        "unet.e.processor.to_q_lora.up.weight": r(4, 2),
    }
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    makers = {"checkpoint": _toy_checkpoint, "lora": _toy_lora, "kohya": _kohya}
    makers["lycoris"] = _lycoris
    out = {}
    for name, make in makers.items():
        make(root / f"{name}.safetensors")
        out[name] = (root / f"{name}.safetensors").read_bytes()
    return out


def split(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header, body, length=None):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


# --- mutations: each takes (hypothesis data, original bytes) and returns new bytes --------


def tensor_names(header):
    return sorted(k for k in header if k != "__metadata__")


def json_values():
    leaf = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    return st.recursive(
        leaf,
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c),
        max_leaves=4,
    )


def edit_entry(draw, data):
    header, body = split(data)
    name = draw(st.sampled_from(tensor_names(header)))
    entry = header[name]
    key = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "extra", "junk"]))
    if key == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif key == "shape":
        entry["shape"] = draw(st.lists(st.integers(-3, 2**40), max_size=4))
    elif key == "data_offsets":
        big = st.integers(-10, 2**64)
        entry["data_offsets"] = draw(st.lists(big, min_size=0, max_size=3))
    elif key == "drop":
        del header[name]
    elif key == "extra":
        header[draw(st.text(min_size=1, max_size=6))] = entry
    else:
        header[name] = draw(json_values())
    return join(header, body)


def edit_metadata(draw, data):
    header, body = split(data)
    meta = header.setdefault("__metadata__", {})
    key = draw(st.sampled_from(sorted(meta) + ["new"]))
    action = draw(st.sampled_from(["text", "json", "drop", "value", "whole"]))
    if action == "text":
        meta[key] = draw(st.text(max_size=20))
    elif action == "json":
        meta[key] = json.dumps(draw(json_values()))
    elif action == "drop":
        meta.pop(key, None)
    elif action == "value":
        meta[key] = draw(json_values())
    else:
        header["__metadata__"] = draw(json_values())
    return join(header, body)


def edit_config(draw, data):
    """A stored config (checkpoint or LoRA) with one value replaced by another JSON value."""
    header, body = split(data)
    meta = header.get("__metadata__", {})
    key = "config" if "config" in meta else "condlora.lora_config"
    if key not in meta:
        return data
    cfg = json.loads(meta[key])
    node = cfg["train"] if "train" in cfg and draw(st.booleans()) else cfg
    field_name = draw(st.sampled_from(sorted(node)))
    node[field_name] = draw(json_values() | st.integers(-5, 10**6))
    meta[key] = json.dumps(cfg)
    return join(header, body)


def edit_bytes(draw, data):
    action = draw(st.sampled_from(["truncate", "flip", "length", "append", "random", "values"]))
    if action == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if action == "flip":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
    if action == "length":
        header, body = split(data)
        return join(json.dumps(header).encode(), body, draw(st.integers(0, 2**64 - 1)))
    if action == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    if action == "values":  # the tensors' bytes: NaN, inf and anything else
        header, body = split(data)
        fill = draw(
            st.sampled_from([b"\x00\x00\xc0\x7f", b"\x00\x00\x80\x7f", b"\xff\xff\xff\xff"])
        )
        start = draw(st.integers(0, max(0, len(body) - 4)))
        return join(header, body[:start] + fill + body[start + 4 :])
    return draw(st.binary(max_size=256))


MUTATIONS = [edit_entry, edit_metadata, edit_config, edit_bytes]


@st.composite
def mutated(draw, original):
    return draw(st.sampled_from(MUTATIONS))(draw, original)


# --- loading under a spy that counts the tensor bytes read --------------------------------


class ReadSpy:
    """safe_open, counting the bytes of every tensor read."""

    def __init__(self):
        self.bytes = 0

    def __call__(self, path, framework):
        spy, handle = self, real_safe_open(path, framework=framework)

        class Counted:
            def __enter__(self):
                self.f = handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return self.f.keys()

            def metadata(self):
                return self.f.metadata()

            def get_tensor(self, key):
                tensor = self.f.get_tensor(key)
                spy.bytes += tensor.numel() * tensor.element_size()
                return tensor

        return Counted()


def load_checkpoint(path):
    cfg, step, parts = read_checkpoint(path, ToyConfig, "toy")
    model, ema = Toy(), Toy()
    opt = torch.optim.AdamW(model.parameters())
    load_training_state(path, parts, model, ema, opt)
    assert isinstance(cfg, ToyConfig) and step >= 0
    for module in (model, ema):
        assert all(torch.isfinite(p).all() for p in module.parameters())


def load_condlora_lora(path):
    model = Toy()
    try:
        names = load_lora(model, path)
    except CondloraError:
        assert not lora_layers(model), "a failed load must leave the model as it was"
        raise
    assert names and all(torch.isfinite(p).all() for p in model.parameters())


def load_kohya(path):
    weights = read_lora(path)
    for m in weights.modules.values():
        assert m.A.is_floating_point() and torch.isfinite(m.A).all() and torch.isfinite(m.B).all()


def load_lycoris(path):
    weights = read_lora(path, other_kinds=True, unmapped_ok=True)
    for m in weights.others.values():
        assert torch.isfinite(m.delta()).all() and m.delta_norm() >= 0


LOADERS = {"checkpoint": load_checkpoint, "lora": load_condlora_lora, "kohya": load_kohya}
LOADERS["lycoris"] = load_lycoris


def check_load(kind, data, path, monkeypatch):
    path.write_bytes(data)
    spy = ReadSpy()
    monkeypatch.setattr(sio, "safe_open", spy)
    try:
        LOADERS[kind](path)
    except CondloraError as err:
        assert str(err) and "\n" not in str(err)
    assert spy.bytes <= len(data), (spy.bytes, len(data))


@pytest.mark.parametrize("kind", list(LOADERS))
def test_the_originals_load(kind, originals, tmp_path, monkeypatch):
    check_load(kind, originals[kind], tmp_path / "f.safetensors", monkeypatch)
    LOADERS[kind](tmp_path / "f.safetensors")  # and without the spy: no error at all


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(LOADERS))
def test_fuzzed_files_load_or_raise_condlora_errors(kind, originals, tmp_path, monkeypatch):
    @FUZZ
    @given(data=st.data())
    def run(data):
        check_load(
            kind, data.draw(mutated(originals[kind])), tmp_path / "f.safetensors", monkeypatch
        )

    run()


def test_a_lora_config_that_would_exhaust_memory_is_refused_before_allocating(tmp_path):
    path = tmp_path / "huge.safetensors"
    _toy_lora(path)
    header, body = split(path.read_bytes())
    cfg = json.loads(header["__metadata__"]["condlora.lora_config"])
    cfg.update(rank=2**16, num_bases=2**16, num_time_rows=2**16)  # A: 2^32 x 4 floats, 64 GiB
    header["__metadata__"]["condlora.lora_config"] = json.dumps(cfg)
    path.write_bytes(join(header, body))
    model = Toy()
    with pytest.raises(CondloraError, match="does not fit the model"):
        load_lora(model, path)
    assert not lora_layers(model)


# --- peft adapter folders and diffusers adapter metadata ----------------------------------

FEW = settings(FUZZ, max_examples=40)
PEFT_KEYS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "target_modules", "use_rslora"]
PEFT_KEYS += ["use_dora", "peft_type", "base_model_name_or_path", "bias", "modules_to_save"]
PEFT_CONFIG = {"r": 2, "lora_alpha": 4, "target_modules": ["to_q", "to_v"], "peft_type": "LORA"}
PEFT_CONFIG |= {"rank_pattern": {"to_v": 1}, "alpha_pattern": {"to_v": 3}}


def _adapter_tensors(prefix):
    g = torch.Generator().manual_seed(0)
    return {
        f"{prefix}mid.to_q.lora_A.weight": torch.randn(2, 8, generator=g),
        f"{prefix}mid.to_q.lora_B.weight": torch.randn(8, 2, generator=g),
        f"{prefix}mid.to_v.lora_A.weight": torch.randn(1, 8, generator=g),
        f"{prefix}mid.to_v.lora_B.weight": torch.randn(8, 1, generator=g),
    }


def config_values():
    """What a JSON config may hold: numbers of every kind, text, lists, mappings."""
    numbers = st.floats(allow_nan=False) | st.integers(-(2**70), 2**70)
    odd = st.sampled_from([0, -1, 0.5, 1e308, "2", "", [], {}, None, True])
    return json_values() | numbers | odd | st.dictionaries(st.sampled_from(["to_q", "x"]), numbers)


@st.composite
def adapter_config_edits(draw, config):
    """adapter_config.json text: one value replaced or dropped, the whole value, or bytes."""
    action = draw(st.sampled_from(["value", "drop", "whole", "text"]))
    config = json.loads(json.dumps(config))
    if action == "value":
        config[draw(st.sampled_from(PEFT_KEYS + sorted(config)))] = draw(config_values())
    elif action == "drop":
        config.pop(draw(st.sampled_from(sorted(config))), None)
    elif action == "whole":
        config = draw(json_values())
    else:
        return draw(st.text(max_size=40))
    return json.dumps(config)


def read_any(path):
    """read_lora, checked like load_kohya: finite float factors or one line of LoRAError."""
    try:
        weights = read_lora(path)
    except CondloraError as err:
        assert str(err) and "\n" not in str(err)
        return
    for m in weights.modules.values():
        assert m.A.is_floating_point() and torch.isfinite(m.A).all() and math.isfinite(m.scale)


def test_fuzzed_peft_folders_read_or_raise_one_line(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_file(_adapter_tensors("base_model.model."), str(folder / "adapter_model.safetensors"))
    tensors = (folder / "adapter_model.safetensors").read_bytes()
    (folder / "adapter_config.json").write_text(json.dumps(PEFT_CONFIG))
    read_lora(folder)  # the original reads

    @FEW
    @given(data=st.data())
    def run(data):
        config = data.draw(adapter_config_edits(PEFT_CONFIG))
        weights = data.draw(mutated(tensors)) if data.draw(st.booleans()) else tensors
        (folder / "adapter_config.json").write_text(config)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        read_any(folder)

    run()


def test_fuzzed_diffusers_adapter_metadata_reads_or_raises_one_line(tmp_path):
    path = tmp_path / "d.safetensors"
    unet = {f"unet.{k}": v for k, v in PEFT_CONFIG.items()}
    save_file(_adapter_tensors("unet."), str(path), metadata={"lora_adapter_metadata": "{}"})
    original = path.read_bytes()

    @FEW
    @given(data=st.data())
    def run(data):
        text = data.draw(adapter_config_edits(unet if data.draw(st.booleans()) else PEFT_CONFIG))
        header, body = split(original)
        header["__metadata__"] = {"lora_adapter_metadata": text}
        path.write_bytes(join(header, body))
        read_any(path)

    run()
