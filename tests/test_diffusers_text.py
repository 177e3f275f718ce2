"""net.arch diffusers on a text model: a UNet2DConditionModel with its pipeline's CLIP text
encoder and tokenizer (and a VAE: a latent model), trained from captions, sampled with a
prompt, baked; and the one-line errors of folders and options that do not fit."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from condlora.cli import main
from condlora.core.errors import ConfigError
from condlora.core.safetensors_io import read_weights, write_weights
from condlora.image.config import load_config
from condlora.image.task import load_run
from condlora.lora.runtime import lora_layers

from .conftest import CONFIGS, TINY

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

LETTERS = "abcdefghijklmnopqrstuvwxyz"
UC = ["lora.method=uc", "lora.mlp_widths=[16, 8]", "lora.mlp_groups=4"]  # a UC-LoRA MLP


def tiny_tokenizer(folder):
    """A CLIPTokenizer of single letters (no merges), written offline into `folder`."""
    folder.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab |= {
        c + end: 2 + i + 26 * k for k, end in enumerate(("", "</w>")) for i, c in enumerate(LETTERS)
    }
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(
        str(folder / "vocab.json"),
        str(folder / "merges.txt"),
        model_max_length=8,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(folder)
    return len(vocab)


def text_pipeline(root, latent=False, text=True):
    """A text-to-image pipeline folder made by diffusers and transformers themselves: unet/
    (a UNet2DConditionModel on 3 x 8 x 8, or on a VAE's 4 x 4 x 4 latents of 3 x 8 x 8
    images), text_encoder/ (a CLIPTextModel), tokenizer/, scheduler/ (Stable Diffusion's
    scaled_linear betas) and, if latent, vae/."""
    torch.manual_seed(0)
    channels = 4 if latent else 3
    diffusers.UNet2DConditionModel(
        sample_size=4 if latent else 8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=4,
    ).save_pretrained(root / "unet")
    if text:
        size = tiny_tokenizer(root / "tokenizer")
        config = transformers.CLIPTextConfig(
            vocab_size=size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
        transformers.CLIPTextModel(config).save_pretrained(root / "text_encoder")
    if latent:
        diffusers.AutoencoderKL(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=8,
        ).save_pretrained(root / "vae")
    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    diffusers.DDPMScheduler(**sd).save_pretrained(root / "scheduler")  # Stable Diffusion's
    return root


def captioned_images(folder, n=6, how="txt"):
    """n random 8 x 8 RGB images with captions: a .txt beside each, or a metadata.jsonl."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        caption = ["a red cat", "a blue dog"][i % 2]
        if how == "txt":
            (folder / f"{i}.txt").write_text(caption)
        rows.append(json.dumps({"file_name": f"{i}.png", "text": caption}))
    if how == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


BASE = CONFIGS / "digits-baseline.yaml"


def overrides(root, data, *extra):
    """`condlora train` overrides of a tiny run of the text pipeline `root` on `data`."""
    args = [*TINY, "net.arch=diffusers", f"net.pretrained={root}", "data.name=folder"]
    args += [f"data.path={data}", "data.resolution=8", "data.channels=3", "data.holdout=1"]
    args += ["net.class_conditional=false", "diffusion.objective=ddpm"]
    args += ["diffusion.schedule=scaled_linear"]  # SD's betas (the default 0.00085..0.012)
    args += ["diffusion.sampler=ddim", "train.max_steps=2", "train.batch_size=4"]
    args += ["lora.method=time", "lora.targets=[to_q, to_v]", "net.cond_mode=scale_shift"]
    return [*args, *extra]


def config(root, data, *extra):
    return load_config(BASE, overrides(root, data, *extra))


def reference_prompts(root, prompts):
    """(encoder_hidden_states, pooled) of prompts by the pipeline's own tokenizer and CLIP,
    as StableDiffusionPipeline.encode_prompt computes them."""
    tokenizer = transformers.CLIPTokenizer.from_pretrained(root / "tokenizer")
    encoder = transformers.CLIPTextModel.from_pretrained(root / "text_encoder").eval()
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        out = encoder(ids)
    return out[0], out.pooler_output


@pytest.mark.parametrize("method", ["time", "uc"])
def test_a_fresh_lora_computes_what_the_text_model_computed(tmp_path, method):
    from condlora.image.build import build_denoiser

    root = text_pipeline(tmp_path / "pipe")
    data = captioned_images(tmp_path / "data")
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").eval()
    extra = [f"lora.method={method}", *UC[1:]]
    denoiser = build_denoiser(config(root, data, *extra)).eval()
    prompts = ["a red cat", "", "a blue dog"]
    denoiser.net.net.text.set_prompts(prompts)
    hidden, pooled = reference_prompts(root, prompts)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 3, 8, 8, generator=g), torch.tensor([5.0, 300.0, 900.0])
    seen = []  # UC-LoRA's condition: [time embedding, pooled text]
    denoiser.net.net.text_condition.register_forward_hook(lambda m, a, out: seen.append(out))
    temb = []
    unet.time_embedding.register_forward_hook(lambda m, a, out: temb.append(out))
    with torch.no_grad():
        want = unet(x, t, encoder_hidden_states=hidden).sample
        got = denoiser.net(x, t, torch.arange(3))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # no labels: the empty prompt, as the pipelines' unconditional prompt
        empty = unet(x, t, encoder_hidden_states=hidden[1:2].expand(3, -1, -1)).sample
        torch.testing.assert_close(denoiser.net(x, t), empty, rtol=1e-5, atol=1e-5)
        # index -1 (a dropped caption, guidance's unconditional half): the empty prompt too
        mixed = denoiser.net(x, t, torch.tensor([0, -1, 2]))
        torch.testing.assert_close(mixed[1], empty[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixed[::2], want[::2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen[0], torch.cat([temb[0], pooled], -1))


@pytest.mark.parametrize("how", ["txt", "jsonl"])
def test_captions_are_read_beside_the_images_or_from_metadata(tmp_path, how):
    from condlora.data import load_captions

    data = captioned_images(tmp_path / "data", n=3, how=how)
    assert load_captions(data) == ["a red cat", "a blue dog", "a red cat"]


def test_a_latent_text_model_trains_samples_a_prompt_and_bakes(tmp_path, capsys, monkeypatch):
    from peft.tuners.lora import LoraLayer

    from condlora.image.bake import bake
    from condlora.image.diffusers_text import LatentCodec
    from condlora.lora.formats import read_lora

    root = text_pipeline(tmp_path / "pipe", latent=True)
    data = captioned_images(tmp_path / "data", how="jsonl")
    args = overrides(root, data, *UC)
    base = diffusers.UNet2DConditionModel.from_pretrained(root / "unet").state_dict()
    run = tmp_path / "run"
    assert main(["train", "--config", str(BASE), "--out", str(run), "--quiet", *args]) == 0
    cfg, denoiser, step = load_run(run)
    assert step == 2 and cfg.data.cache_latents
    state = {k.replace(".base_layer", ""): v for k, v in denoiser.net.net.unet.state_dict().items()}
    assert all(torch.equal(state[k], v) for k, v in base.items())  # the U-Net stayed frozen
    lora = {k: v for k, v in denoiser.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())  # the LoRA trained
    assert not any("text_encoder" in k or "vae" in k for k in load_file(run / "ema.safetensors"))
    # the run's grid: one row per training caption (in order of first use), listed beside it
    rows = (run / "samples" / "step_0000002.txt").read_text().splitlines()
    assert rows == [f"row {r + 1}: {('a red cat', 'a blue dog')[r % 2]}" for r in range(10)]
    from condlora.image import generate as generate_mod

    drawn_labels = []
    fake = lambda *args, **kw: drawn_labels.append(args[3]) or torch.zeros(100, 3, 8, 8)  # noqa: E731
    with monkeypatch.context() as patch:
        patch.setattr(generate_mod, "generate", fake)
        denoiser.net.net.text.set_prompts(["x", "y", "z"])
        generate_mod.save_sample_grid(denoiser, cfg, tmp_path / "grid.png", seed=0)
    assert torch.equal(drawn_labels[0], torch.arange(100) // 10 % 3)  # row r: caption r mod 3
    # sampled with a prompt: latents of the U-Net's shape, decoded by the pipeline's VAE
    args = ["sample", "--run", str(run), "--num", "2", "--steps", "3", "--out"]
    assert main([*args, str(tmp_path / "cat.png"), "--prompt", "a red cat"]) == 0
    assert (tmp_path / "cat.png").is_file() and "wrote 2 samples" in capsys.readouterr().out
    vae = diffusers.AutoencoderKL.from_pretrained(root / "vae").eval()
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    codec = LatentCodec(root / "vae")
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor).sample
        torch.testing.assert_close(codec.decode(z), want, rtol=1e-5, atol=1e-5)
        x = torch.rand(2, 3, 8, 8) * 2 - 1
        want = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        torch.testing.assert_close(codec.encode(x), want, rtol=1e-5, atol=1e-5)
    # baked (at the empty prompt) into a file the U-Net loads with every key
    out = tmp_path / "baked.safetensors"
    bake_args = ["lora", "bake", str(run), "--t", "0.0:0.4", "--format", "diffusers"]
    assert main([*bake_args, "--out", str(out)]) == 0
    unet = diffusers.UNet2DConditionModel.from_pretrained(root / "unet")
    state = read_lora(out)
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Pipeline

    sd, alphas, meta = Pipeline.lora_state_dict(out, return_lora_metadata=True)
    unet.load_lora_adapter(
        sd, prefix="unet", network_alphas=alphas, metadata=meta, adapter_name="b"
    )
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == len(state.modules) == len(lora) and len(sd) == 2 * len(layers)
    denoiser.net.net.text.set_prompts([""])  # what `lora bake` reads without --prompt
    want = bake(denoiser, cfg, 0.0, 0.4).weights.modules
    for name, layer in layers.items():
        torch.testing.assert_close(
            layer.get_delta_weight("b"), want[name].delta(), rtol=1e-4, atol=1e-6
        )
    # at a prompt: UC-LoRA's condition holds the pooled prompt, so another static LoRA
    cat = tmp_path / "cat.safetensors"
    assert main([*bake_args, "--out", str(cat), "--prompt", "a red cat"]) == 0
    cat_delta = read_lora(cat).modules[name].delta()
    assert not torch.allclose(cat_delta, read_lora(out).modules[name].delta())
    one_line_error(capsys, [*bake_args, "--out", str(cat), "--label", "1"], "give --prompt")
    # latents not cached: a draw from the VAE's posterior per batch, so another LoRA
    from condlora.image.task import train

    train(config(root, data, *UC, "data.cache_latents=false"), tmp_path / "drawn", progress=False)
    drawn = load_file(tmp_path / "drawn" / "ema.safetensors")
    assert any(not torch.equal(drawn[k], v) for k, v in lora.items())
    # the strengths per step (at the empty prompt); no callback file for a text UC-LoRA
    assert main(["lora", "schedule", str(run), "--out", str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "strengths.csv").is_file()
    assert not (tmp_path / "s" / "condlora_lora.safetensors").exists()
    assert "no diffusers callback file" in capsys.readouterr().out


def one_line_error(capsys, args, message):
    """`condlora ARGS` exits 2 with one line `condlora: error: ...` holding `message`."""
    capsys.readouterr()  # what building the fixtures printed
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("condlora: error:") and message in err and err.count("\n") == 1, err


def test_folders_and_data_that_do_not_fit_are_one_line_and_write_nothing(tmp_path, capsys):
    import shutil

    root = text_pipeline(tmp_path / "pipe")
    data = captioned_images(tmp_path / "data")
    run = tmp_path / "run"

    def train_args(pipe, *extra):
        command = ["train", "--config", str(BASE), "--out", str(run), "--quiet"]
        return command + overrides(pipe, data, *extra)

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a model")
    one_line_error(capsys, train_args(tmp_path / "notes"), "holds no diffusers config.json")
    for part in ("text_encoder", "tokenizer"):
        broken = tmp_path / f"no-{part}"
        shutil.copytree(root, broken)
        shutil.rmtree(broken / part)
        one_line_error(capsys, train_args(broken), "needs its pipeline's text_encoder/")
    one_line_error(capsys, train_args(root / "unet"), "give net.pretrained the pipeline folder")
    (data / "3.txt").unlink()
    one_line_error(capsys, train_args(root), "1 of 6 images in")
    (data / "3.txt").write_text("a blue dog")
    one_line_error(capsys, train_args(root, "lora.method=class"), "need class labels")
    assert not run.exists()


def test_prompt_and_label_go_to_the_model_that_takes_them(tmp_path, capsys):
    from condlora.image.generate import generate
    from condlora.image.task import train

    from .test_diffusers_arch import config as class_config
    from .test_diffusers_arch import tiny_pipeline

    root = tiny_pipeline(tmp_path / "classes", classes=10)
    train(class_config(root, "net.class_conditional=true"), tmp_path / "class-run", progress=False)
    sample = ["sample", "--num", "2", "--steps", "2", "--out", str(tmp_path / "s.png"), "--run"]
    prompt = [*sample, str(tmp_path / "class-run"), "--prompt", "a cat"]
    one_line_error(capsys, prompt, "--prompt applies to a text model")
    bake = ["lora", "bake", str(tmp_path / "class-run"), "--t", "0:1", "--format", "kohya"]
    bake += ["--out", str(tmp_path / "b.safetensors"), "--prompt", "a cat"]
    one_line_error(capsys, bake, "--prompt applies to a text model")
    text = text_pipeline(tmp_path / "pipe")
    data = captioned_images(tmp_path / "data")
    train_args = ["train", "--config", str(BASE), "--out", str(tmp_path / "text-run"), "--quiet"]
    assert main([*train_args, *overrides(text, data)]) == 0
    one_line_error(capsys, [*sample, str(tmp_path / "text-run"), "--label", "3"], "give --prompt")
    assert not (tmp_path / "s.png").exists()
    # a prompt reaches the U-Net: two prompts, the same noise, two different images
    _, denoiser, _ = load_run(tmp_path / "text-run")
    cfg = config(text, data)
    images = []
    for prompt in ("a red cat", "a blue dog"):
        denoiser.net.net.text.set_prompts([prompt])
        images.append(generate(denoiser, cfg, 2, torch.zeros(2, dtype=torch.long), steps=2))
    assert images[0].shape == (2, 3, 8, 8) and (images[0] - images[1]).abs().max() > 1e-4


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_sampling_a_prompt_is_what_the_diffusers_pipeline_computes(tmp_path, guidance):
    """`sample --prompt [--guidance]` (ddim on the run's discrete grid) equals
    StableDiffusionPipeline with an Euler scheduler on the same timesteps, the same
    guidance_scale (the empty prompt as the unconditional half) and the run's TimeLoRA in its
    U-Net (`lora schedule`'s file through ConditionalLoRA), from the same noise."""
    from condlora.image.checks import sampling_config
    from condlora.image.generate import generate
    from condlora.image.task import train
    from condlora.lora.diffusers_callback import ConditionalLoRA

    root = text_pipeline(tmp_path / "pipe", latent=True)
    data = captioned_images(tmp_path / "data")
    cfg = config(root, data, "lora.num_bases=2", "train.label_dropout=0.2")
    train(cfg, tmp_path / "run", progress=False)
    strong_lora(tmp_path / "run")
    assert main(["lora", "schedule", str(tmp_path / "run"), "--out", str(tmp_path / "s")]) == 0
    _, denoiser, _ = load_run(tmp_path / "run")
    denoiser.net.net.text.set_prompts(["a red cat"])
    cfg = sampling_config(cfg, guidance=guidance)
    ours = generate(denoiser, cfg, 1, torch.zeros(1, dtype=torch.long), steps=4, seed=0)

    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(root / "vae"),
        text_encoder=transformers.CLIPTextModel.from_pretrained(root / "text_encoder"),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(root / "tokenizer"),
        unet=diffusers.UNet2DConditionModel.from_pretrained(root / "unet"),
        scheduler=diffusers.EulerDiscreteScheduler.from_pretrained(
            root / "scheduler", timestep_spacing="linspace"
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    lora = ConditionalLoRA(pipe.unet, tmp_path / "s" / "condlora_lora.safetensors")
    lora.start(pipe, num_inference_steps=4)
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma_max = denoiser.precond.sigma_max  # condlora starts at sigma_max * noise
    call = {"height": 8, "width": 8, "num_inference_steps": 4, "guidance_scale": guidance}
    call |= {"latents": noise * sigma_max / pipe.scheduler.init_noise_sigma, "output_type": "pt"}
    theirs = pipe("a red cat", **call, callback_on_step_end=lora.callback_on_step_end).images
    torch.testing.assert_close(ours, theirs * 2 - 1, rtol=1e-4, atol=1e-4)
    for layer in lora_layers(pipe.unet).values():  # the LoRA off: another image
        layer.scale = 0.0
    assert (pipe("a red cat", **call).images - theirs).abs().max() > 1e-2


def strong_lora(run):
    """Random B in the run's EMA file, so its LoRA changes the U-Net's output clearly."""
    meta, tensors = read_weights(run / "ema.safetensors", None, "ema", RuntimeError)
    g = torch.Generator().manual_seed(1)
    for key, value in tensors.items():
        if key.endswith("lora_B"):
            value.copy_(torch.randn(value.shape, generator=g))
    write_weights(run / "ema.safetensors", tensors, meta)


@pytest.mark.parametrize("method", ["time", "uc"])
def test_gradient_checkpointing_recomputes_the_lora_inside_a_block_as_it_ran(tmp_path, method):
    """A UNet2DConditionModel checkpoints its transformer blocks, which hold the LoRA
    layers: the recomputation sees the pass's condition again, the gradients are the same."""
    from condlora.image.build import build_denoiser

    from .test_diffusers_arch import counted

    root = text_pipeline(tmp_path / "pipe")
    data = captioned_images(tmp_path / "data")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        flag = f"net.gradient_checkpointing={str(checkpointing).lower()}"
        denoiser = build_denoiser(config(root, data, f"lora.method={method}", *UC[1:], flag))
        denoiser.net.net.text.set_prompts(["a red cat", "a blue dog"])
        with torch.no_grad():  # a fresh LoRA's B = 0 would give A no gradient
            for name, p in denoiser.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
        block = denoiser.net.net.unet.up_blocks[1].attentions[1].transformer_blocks[0]
        calls = counted(block)  # the last block with LoRA layers
        g = torch.Generator().manual_seed(2)
        x0, labels = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([0, 1, 1, 0])
        denoiser.train().loss(x0, class_labels=labels, generator=g).backward()
        assert len(calls) == (2 if checkpointing else 1)
        grads.append({n: p.grad for n, p in denoiser.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6)


def test_commands_that_feed_pixels_refuse_a_text_pipeline_in_one_line(tmp_path, capsys):
    root = text_pipeline(tmp_path / "pipe", latent=True)
    data = captioned_images(tmp_path / "data")
    fit = ["schedule", "fit", "--base", str(root), "--lora", str(tmp_path / "none")]
    one_line_error(
        capsys, [*fit, "--data", str(data), "--out", str(tmp_path / "o")], "not supported"
    )
    assert not (tmp_path / "o").exists()


def test_stable_diffusions_betas_come_from_the_scheduler(tmp_path):
    """scaled_linear is diffusers' own schedule; a config with other betas is one line."""
    from condlora.diffusion.precond import SCHEDULES
    from condlora.image.build import build_denoiser

    sd = {"beta_schedule": "scaled_linear", "beta_start": 0.001, "beta_end": 0.015}
    want = diffusers.DDPMScheduler(**sd).alphas_cumprod.double()
    got = torch.cumprod(1 - SCHEDULES["scaled_linear"](1000, 0.001, 0.015), 0)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    root = text_pipeline(tmp_path / "pipe")
    data = captioned_images(tmp_path / "data")
    with pytest.raises(ConfigError, match="beta_start 0.00085"):
        build_denoiser(config(root, data, "diffusion.schedule=linear"))
    with pytest.raises(ConfigError, match="beta_end 0.012"):
        build_denoiser(config(root, data, "diffusion.beta_end=0.02"))
    with pytest.raises(ConfigError, match="go with diffusion.schedule linear or scaled_linear"):
        config(root, data, "diffusion.schedule=cosine", "diffusion.beta_end=0.02")
