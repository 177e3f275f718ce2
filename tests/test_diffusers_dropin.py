"""The drop-in on diffusers models: a fresh injection changes no output, and the library
API trains the LoRA (UNet2DConditionModel reading its time embedding, DiT its ada-norm one)."""

import pytest
import torch

from condlora.lora import LoRAConfig, conditioning, inject, lora_parameters, remove

from .conftest import assert_same_function

diffusers = pytest.importorskip("diffusers")

ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


def condition_unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def dit():
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_num_groups=8,
    )


# model -> (builder, module whose output UC-LoRA reads, call)
MODELS = {
    "unet2d-condition": (
        condition_unet,
        "time_embedding",
        lambda m, x, t, y, c: m(x, t, encoder_hidden_states=c).sample,
    ),
    "dit": (
        dit,
        "transformer_blocks.0.norm1.emb",
        lambda m, x, t, y, c: m(x, timestep=t, class_labels=y).sample,
    ),
}


def model_inputs(shared: bool) -> tuple:
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 5, 32, generator=g)
    steps, labels = torch.tensor([10, 500, 990]), torch.tensor([1, 7, 3])
    if shared:
        steps, labels = steps[:1].expand(3), labels[:1].expand(3)
    return x, steps, labels, context


def config(method: str, emb_module: str) -> LoRAConfig:
    cfg = LoRAConfig(method=method, targets=ATTENTION, bias=True, mlp_widths=[32, 16])
    cfg.emb_module = emb_module if method == "uc" else None
    return cfg


def run(model, call, inputs, seed=0):
    torch.manual_seed(seed)  # DiT drops class labels at random in training mode
    x, steps, labels, context = inputs
    with conditioning(model, t=steps / 999, y=labels):
        return call(model, *inputs)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["time", "uc"])
@pytest.mark.parametrize("mode", ["train", "sample"])
def test_fresh_injection_leaves_outputs_unchanged(name, method, mode, one_thread):
    """Training mode with per-sample timesteps (low-rank path): the same function to float
    rounding; sampling mode with one timestep and class for the batch (merged path): the
    same bits as without LoRA."""
    builder, emb_module, call = MODELS[name]
    model = builder().train(mode == "train")
    inputs = model_inputs(shared=mode == "sample")
    with torch.set_grad_enabled(mode == "train"):
        expected = run(model, call, inputs)
        names = inject(model, config(method, emb_module))
        assert len(names) >= 8
        if mode == "sample":
            assert torch.equal(run(model, call, inputs), expected)
        else:
            assert_same_function(run(model, call, inputs), expected)
        remove(model)
        assert torch.equal(run(model, call, inputs), expected)


@pytest.mark.parametrize("name", list(MODELS))
def test_library_api_trains_the_lora(name, one_thread):
    """inject -> lora_parameters -> optimizer: the LoRA learns, the frozen model stays."""
    builder, emb_module, call = MODELS[name]
    model = builder().train()
    model.requires_grad_(False)
    inject(model, config("uc", emb_module))
    params = lora_parameters(model)
    assert params and all(p.requires_grad for p in params)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    frozen = {k: v for k, v in frozen.items() if ".composer." not in k}
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, steps, labels, context = model_inputs(shared=False)
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    losses = []
    for step in range(4):
        loss = torch.nn.functional.mse_loss(
            run(model, call, (x, steps, labels, context), step), target
        )
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("lora_B"))
