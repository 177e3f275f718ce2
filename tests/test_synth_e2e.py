"""End to end on diffusers: a zoo of rank-1 alpha-27 peft LoRAs on to_q / to_v of a tiny
UNet2DConditionModel, each a function of a random embedding -> synth collect -> train-vae ->
train-prior -> generate for an unseen embedding -> the file loads through peft's and
diffusers' own loaders and changes the U-Net's output exactly as W + dW by hand."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from condlora.cli import main
from condlora.lora.formats import LoRAWeights, make_module, read_lora, write_lora
from condlora.synthesis.encoders import read_embeddings
from condlora.synthesis.generate import SynthModel, generate_vectors, vectors_to_lora

from .synth_common import TINY

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from peft import PeftModel  # noqa: E402

from .conftest import merged_by_hand, tiny_unet2d_condition  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
E_DIM, ZOO = 8, 24


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d_condition()


def run(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([10, 500]), context).sample


def subject_lora(unet, embedding, maps):
    """A rank-1, alpha-27 LoRA on every to_q / to_v whose factors are linear in the embedding."""
    modules = {}
    for name, (pa, pb) in maps.items():
        out_f, in_f = dict(unet.named_modules())[name].weight.shape
        a = (pa @ embedding).reshape(1, in_f)
        b = 0.05 * (pb @ embedding).reshape(out_f, 1)
        modules[name] = make_module(name, a, b, 27.0, "zoo")  # alpha 27 / r 1
    return LoRAWeights(modules)


@pytest.fixture(scope="module")
def zoo(unet, tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    g = torch.Generator().manual_seed(3)
    targets = [n for n, _ in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))]
    targets += [n for n, _ in unet.named_modules() if n.endswith(("attn1.to_v", "attn2.to_q"))]
    maps = {}
    for name in targets:
        out_f, in_f = dict(unet.named_modules())[name].weight.shape
        maps[name] = (torch.randn(in_f, E_DIM, generator=g), torch.randn(out_f, E_DIM, generator=g))
    embeddings = {f"subject{i:02d}": torch.randn(E_DIM, generator=g) for i in range(ZOO)}
    for name, e in embeddings.items():
        write_lora(subject_lora(unet, e, maps), root / "loras" / name, "peft")
    save_file(embeddings, str(root / "embeddings.safetensors"))
    unseen = root / "unseen.safetensors"
    save_file({"new": torch.randn(E_DIM, generator=g)}, str(unseen))
    dataset = root / "zoo.safetensors"
    args = ["synth", "collect", "--loras", str(root / "loras"), "--out", str(dataset)]
    assert main([*args, "--embeddings", str(root / "embeddings.safetensors")]) == 0
    return root, dataset, unseen, len(targets)


def test_zoo_through_the_cli_to_loras_that_peft_and_diffusers_load(unet, zoo, tmp_path, capsys):
    root, dataset, unseen, n_modules = zoo
    zoo_lora = read_lora(root / "loras" / "subject00")
    assert {(m.rank, m.scale) for m in zoo_lora.modules.values()} == {(1, 27.0)}
    model_dir = tmp_path / "model"
    common = ["--dataset", str(dataset), "--out", str(model_dir), "--quiet", *TINY]
    assert main(["synth", "train-vae", *common]) == 0
    assert main(["synth", "train-prior", *common, "prior.cond_dropout=0.2"]) == 0
    gen = ["synth", "generate", "--model", str(model_dir), "--embedding", str(unseen)]
    assert main([*gen, "--out", str(tmp_path / "peft"), "--guidance", "2"]) == 0
    assert (
        main([*gen, "--out", str(tmp_path / "d"), "--format", "diffusers", "--guidance", "2"]) == 0
    )
    kohya = ["--out", str(tmp_path / "k.safetensors"), "--format", "kohya", "--num", "2"]
    assert main([*gen, *kohya]) == 0
    printed = capsys.readouterr().out
    assert "k_0.safetensors" in printed and "k_1.safetensors" in printed

    # the generated LoRA, computed by the library with the same seed and guidance
    vector = generate_vectors(model_dir, read_embeddings(unseen), guidance=2.0)[0, 0]
    lora = vectors_to_lora(model_dir, vector)
    assert len(lora.modules) == n_modules and all(m.rank == 1 for m in lora.modules.values())
    reference = run(merged_by_hand(unet, lora))
    base = run(unet)
    assert (reference - base).abs().max() > 1e-3  # the generated LoRA changes the output

    model = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "peft").eval()
    torch.testing.assert_close(run(model), reference, atol=1e-5, rtol=0)
    model = copy.deepcopy(unet)
    model.load_lora_adapter(
        tmp_path / "d", weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )
    torch.testing.assert_close(run(model), reference, atol=1e-5, rtol=0)
    # --num 2: two different LoRAs for one subject
    k0, k1 = (read_lora(tmp_path / f"k_{i}.safetensors") for i in range(2))
    name = next(iter(k0.modules))
    assert not torch.allclose(k0.modules[name].delta(), k1.modules[name].delta())


def test_guidance_zero_is_the_unconditional_prior(zoo, tmp_path):
    _, dataset, unseen, _ = zoo
    model_dir = tmp_path / "m"
    common = ["--dataset", str(dataset), "--out", str(model_dir), "--quiet", *TINY]
    assert main(["synth", "train-vae", *common]) == 0
    assert main(["synth", "train-prior", *common, "prior.cond_dropout=0.5"]) == 0
    model = SynthModel.load(model_dir)
    e = torch.randn(3, E_DIM)
    plain = model.vectors(e, guidance=1.0)
    # g = 0 is the unconditional model: the same sample whatever the embedding
    uncond = model.vectors(e, guidance=0.0)
    torch.testing.assert_close(uncond, model.vectors(torch.randn(3, E_DIM), guidance=0.0))
    assert not torch.allclose(plain, uncond)
    guided = model.vectors(e, guidance=3.0)
    assert not torch.allclose(guided, plain) and torch.isfinite(guided).all()
