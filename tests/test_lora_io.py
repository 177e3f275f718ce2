"""save_lora / load_lora: round trip, metadata, strict loading."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from condlora.core.errors import LoRAError
from condlora.lora import (
    CONFIG_KEY,
    LoRAConfig,
    conditioning,
    inject,
    load_lora,
    lora_layers,
    lora_parameters,
    lora_state_dict,
    read_lora_config,
    save_lora,
)


class Net(nn.Module):
    """Embedding MLP, a Linear on (B, L, C) and a 1x1 Conv1d."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(1, 16), nn.SiLU(), nn.Linear(16, 16))
        self.qkv = nn.Linear(width, width)
        self.proj = nn.Conv1d(width, width, 1, bias=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        e = self.embed(t[:, None])  # runs first, so UC-LoRA can capture it
        h = self.qkv(x) + e[:, None, : x.shape[-1]]
        return self.proj(h.transpose(1, 2)).transpose(1, 2)


CONFIGS = {
    "time+class": LoRAConfig(method="time+class", num_time_rows=20, class_bases=3, bias=True),
    "uc": LoRAConfig(method="uc", mlp_widths=[8], mlp_groups=4, emb_module="embed", scale=0.5),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_round_trip(tmp_path, method):
    torch.manual_seed(0)
    base = Net()
    model = copy.deepcopy(base)
    names = inject(model, CONFIGS[method])
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_()
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)

    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(lora_state_dict(model))  # only LoRA tensors, no base weights
    assert all(".base_layer." not in k and not k.startswith("embed.") for k in keys)
    stored = json.loads(meta[CONFIG_KEY])
    assert stored["method"] == method and stored["targets"] == ["qkv", "proj"]
    config = read_lora_config(path)
    assert config.emb_dim == (16 if method == "uc" else None)  # the inferred width is stored

    fresh = copy.deepcopy(base)
    assert load_lora(fresh, path) == names
    x, t, y = torch.randn(3, 5, 8), torch.rand(3), torch.tensor([0, 4, 9])
    with conditioning(model, t=t, y=y), conditioning(fresh, t=t, y=y):
        out = model(x, t)
        assert not torch.allclose(out, base(x, t), atol=1e-3)
        assert torch.equal(fresh(x, t), out)
    assert load_lora(fresh, path) == names  # into an injected model: weights only


def test_load_errors(tmp_path):
    torch.manual_seed(0)
    model = Net()
    inject(model, CONFIGS["time+class"])
    path = tmp_path / "lora.safetensors"
    save_lora(model, path)
    wider = Net(width=12)
    with pytest.raises(LoRAError, match="does not fit the model.*shape mismatches"):
        load_lora(wider, path)
    assert not lora_layers(wider)  # a failed load leaves the model as it was
    other = Net()
    inject(other, LoRAConfig(method="time", num_time_rows=20))
    with pytest.raises(
        LoRAError, match="another config.*method 'time\\+class' \\(model: 'time'\\)"
    ):
        load_lora(other, path)
    with pytest.raises(LoRAError, match="not found"):
        load_lora(Net(), tmp_path / "nope.safetensors")
    with pytest.raises(LoRAError, match="no LoRA layers"):
        save_lora(Net(), tmp_path / "empty.safetensors")


def test_a_file_saved_at_another_scale_is_refused(tmp_path):
    """Same tensors, other scale s: loading would silently change the outputs."""
    torch.manual_seed(0)
    config = CONFIGS["time+class"]
    model = Net()
    inject(model, dataclasses.replace(config, scale=0.5))
    save_lora(model, tmp_path / "half.safetensors")
    target = Net()
    inject(target, dataclasses.replace(config, scale=1.0))
    before = {k: v.clone() for k, v in lora_state_dict(target).items()}
    with pytest.raises(
        LoRAError, match="another config than the model's LoRA: scale 0.5 \\(model: 1.0\\)"
    ):
        load_lora(target, tmp_path / "half.safetensors")
    after = lora_state_dict(target)
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing was copied
