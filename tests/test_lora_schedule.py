"""Strength schedules for a static LoRA (lora/schedule.py): all ones is the static LoRA,
constants are strengths, exports reproduce s(t, block) at every sampler step."""

import csv
import io
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from condlora.core.errors import LoRAError
from condlora.diffusion import EDMPrecond
from condlora.lora.schedule import apply_schedule, block_of, scheduled


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])
        self.out = nn.Conv2d(6, 6, 1)

    def forward(self, x):
        h = self.enc[1](self.enc[0](x).relu())
        return self.out(h[:, :, None, None])[:, :, 0, 0]


def deltas_for(model):
    g = torch.Generator().manual_seed(1)
    return {
        name: 0.1 * torch.randn(m.weight.shape, generator=g)
        for name, m in model.named_modules()
        if name in ("enc.0", "enc.1", "out")
    }


def static_reference(model, deltas, x, strength=1.0):
    """The static LoRA written out: every layer W x + b + strength * dW x (dW x by the same
    kernels as the layer's, so strength 1 is comparable bit for bit)."""
    h = model.enc[0](x) + strength * F.linear(x, deltas["enc.0"])
    h = model.enc[1](h.relu()) + strength * F.linear(h.relu(), deltas["enc.1"])
    h = h[:, :, None, None]
    return (model.out(h) + strength * F.conv2d(h, deltas["out"]))[:, :, 0, 0]


@pytest.mark.parametrize("per_block", [False, True])
def test_a_schedule_of_all_ones_is_the_static_lora_and_constants_are_strengths(per_block):
    torch.manual_seed(0)
    model, x = TwoBlocks(), torch.randn(5, 6)
    reference = TwoBlocks()
    reference.load_state_dict(model.state_dict())
    deltas = deltas_for(model)
    schedule = apply_schedule(model, deltas, bins=5, per_block=per_block)
    t = torch.rand(5)
    with torch.no_grad(), scheduled(schedule, t):
        assert torch.equal(model(x), static_reference(reference, deltas, x))
        schedule.table.fill_(0.4)
        assert torch.allclose(model(x), static_reference(reference, deltas, x, 0.4), atol=1e-6)
        schedule.table.fill_(0.0)
        assert torch.equal(model(x), reference(x))  # strength 0: the base model
    assert schedule.blocks == (["enc.0", "enc.1", "out"] if per_block else ["all"])
    assert [p for p in model.parameters() if p.requires_grad] == []  # the base is frozen
    assert schedule.table.requires_grad  # the table is what a fit learns


def test_strength_interpolates_the_table_between_its_knots():
    model = TwoBlocks()
    schedule = apply_schedule(model, deltas_for(model), bins=3, per_block=True)
    with torch.no_grad():
        schedule.table.copy_(torch.tensor([[0.0, 1.0, 3.0], [1.0, 1.0, 1.0], [2.0, 0.0, 2.0]]))
    s = schedule.strength(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    expected = torch.tensor(
        [[0.0, 1, 2], [0.5, 1, 1], [1.0, 1, 0], [2.0, 1, 1], [3.0, 1, 2]]  # (t, block)
    )
    assert torch.allclose(s, expected)


def test_csv_and_keyframes_reproduce_the_schedule_at_each_of_18_steps():
    model = TwoBlocks()
    schedule = apply_schedule(model, deltas_for(model), bins=6, per_block=True)
    with torch.no_grad():
        schedule.table.copy_(torch.rand(3, 6, generator=torch.Generator().manual_seed(3)) * 2)
    precond = EDMPrecond()
    sigmas = precond.sampling_sigmas(18)[:-1]  # the 18 noise levels a Heun sampler visits
    ts = precond.time_of_label(precond.noise_label(sigmas)).tolist()
    truth = schedule.strength(torch.tensor(ts)).detach()  # (18, blocks)
    rows = list(csv.DictReader(io.StringIO(schedule.to_csv(ts))))
    assert [int(r["step"]) for r in rows] == list(range(18))
    for k, row in enumerate(rows):
        for b, block in enumerate(schedule.blocks):
            assert float(row[block]) == pytest.approx(float(truth[k, b]), abs=1e-5)
    frames = json.loads(schedule.keyframes(ts))
    assert frames["steps"] == 18
    for b, block in enumerate(schedule.blocks):
        keys = frames["keyframes"][block]
        assert [f["start_percent"] for f in keys] == pytest.approx(
            [k / 18 for k in range(18)], abs=1e-6
        )
        assert [f["strength"] for f in keys] == pytest.approx(truth[:, b].tolist(), abs=1e-5)


def test_a_lora_that_does_not_fit_the_base_is_refused_in_one_line():
    model = TwoBlocks()
    with pytest.raises(LoRAError, match=r"\['dec.0'\] are not in the base model"):
        apply_schedule(model, {"dec.0": torch.zeros(6, 6)})
    with pytest.raises(LoRAError, match=r"shape \(6, 5\) does not fit the layer's weight"):
        apply_schedule(TwoBlocks(), {"enc.0": torch.zeros(6, 5)})
    model = TwoBlocks()
    apply_schedule(model, deltas_for(model))
    with pytest.raises(LoRAError, match="inside `scheduled`"):
        model(torch.randn(2, 6))


def test_blocks_are_top_level_parts_with_their_index():
    assert block_of("enc.2.attn.qkv", True) == "enc.2"
    assert block_of("mid.attn.proj", True) == "mid"
    assert block_of("enc.2.attn.qkv", False) == "all"


def test_the_diffusers_callback_sets_each_steps_strength(tmp_path):
    import importlib.util

    model = TwoBlocks()
    schedule = apply_schedule(model, deltas_for(model), bins=4)
    with torch.no_grad():
        schedule.table.copy_(torch.tensor([[0.2, 1.0, 1.4, 0.6]]))
    ts = torch.linspace(1, 0, 18).tolist()
    path = tmp_path / "diffusers_callback.py"
    path.write_text(schedule.diffusers_callback(ts, adapter="style"))
    spec = importlib.util.spec_from_file_location("callback", path)
    callback = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(callback)

    class Pipe:  # records what a diffusers pipeline would be told
        weights = []

        def set_adapters(self, names, adapter_weights):
            assert names == ["style"]
            self.weights.append(adapter_weights[0])

    pipe = Pipe()
    callback.set_first(pipe)
    for step in range(18):  # the pipeline calls it after every step
        assert callback.strength_callback(pipe, step, 0, {"latents": 1}) == {"latents": 1}
    truth = schedule.strength(torch.tensor(ts))[:, 0]
    assert pipe.weights == pytest.approx(truth.tolist(), abs=1e-6)
