"""Other kinds of module update: LyCORIS LoHa / LoKr / full / Tucker files written by lycoris
itself, peft's DoRA; their exact dW, conversion to plain LoRA by SVD, resize and merge."""

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from condlora.cli import main
from condlora.core.errors import LoRAError
from condlora.lora.formats import read_lora, write_lora
from condlora.lora.formats.svd import merge, resize

from .conftest import tiny_unet2d_condition

lycoris = pytest.importorskip("lycoris")
peft = pytest.importorskip("peft")

# algo name -> create_lycoris arguments (dims 2, alpha 1: scale 1/2 where there is an r)
ALGOS = {
    "loha": dict(algo="loha"),
    "loha_tucker": dict(algo="loha", use_tucker=True),
    "lokr_factored": dict(algo="lokr", factor=2, linear_dim=1, conv_dim=1),
    "lokr_full": dict(algo="lokr", factor=4),
    "lokr_tucker": dict(algo="lokr", factor=2, linear_dim=1, conv_dim=1, use_tucker=True),
    "full": dict(algo="full"),
    "locon_tucker": dict(algo="locon", use_tucker=True),
}
KINDS = {
    "loha": {"loha"},
    "loha_tucker": {"loha"},
    "lokr_factored": {"lokr"},
    "lokr_full": {"lokr"},
    "lokr_tucker": {"lokr"},
    "full": {"full"},
    "locon_tucker": {"tucker"},
}


@pytest.fixture(scope="module")
def unet():
    return tiny_unet2d_condition()


def run(model, inputs):
    with torch.no_grad():
        return model(*inputs).sample


def lycoris_file(unet, name, path, **extra):
    """(lycoris-made file, the U-Net's output with the network applied by lycoris)."""
    from lycoris import create_lycoris

    model = copy.deepcopy(unet)
    algo = ALGOS.get(name, {"algo": name})
    args = dict(linear_dim=2, linear_alpha=1.0, conv_dim=2, conv_alpha=1.0) | algo | extra
    network = create_lycoris(model, 1.0, **args)
    network.apply_to()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
    network.save_weights(str(path), torch.float32, None)
    return path, run(model, inputs_of(unet))


def inputs_of(unet):
    g = torch.Generator().manual_seed(1)
    sample, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    return sample, torch.tensor([10, 500]), text


def base_shapes(unet):
    return {n: tuple(m.weight.shape) for n, m in unet.named_modules() if hasattr(m, "weight")}


def applied(unet, lora):
    """The reference: W + dW (and b + db for full diffs) by hand, for every module."""
    model = copy.deepcopy(unet)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, m in {**lora.modules, **lora.others}.items():
            modules[name].weight += m.delta().reshape(modules[name].weight.shape)
            if "diff_b" in getattr(m, "parts", {}):
                modules[name].bias += m.parts["diff_b"]
    return model


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(ALGOS))
def test_lycoris_files_read_with_their_exact_dw(unet, name, tmp_path, capsys):
    path, reference = lycoris_file(unet, name, tmp_path / f"{name}.safetensors")
    lora = read_lora(path, base_shapes(unet), other_kinds=True)
    assert lora.unmapped == {} and lora.resolved
    assert {m.kind for m in lora.others.values()} == KINDS[name]
    torch.testing.assert_close(run(applied(unet, lora), inputs_of(unet)), reference)
    with pytest.raises(LoRAError, match="not a low-rank pair"):
        read_lora(path, base_shapes(unet))
    base = tmp_path / "base.json"
    base.write_text("[" + ", ".join(f'"{n}"' for n in base_shapes(unet)) + "]")
    assert main(["lora", "info", "--strict", str(path), "--base-modules", str(base)]) == 0
    out = capsys.readouterr().out
    assert "unmapped keys: 0" in out and "no low-rank form" in out
    # kohya layout holds these kinds: written back tensor for tensor
    write_lora(lora, tmp_path / "k.safetensors", "kohya")
    source, written = load_file(path), load_file(tmp_path / "k.safetensors")
    assert len(written) == len(source)
    renamed = {k.replace("lycoris_", "lora_unet_", 1): v for k, v in source.items()}
    assert all(torch.equal(written[k], v) for k, v in renamed.items())
    again = read_lora(tmp_path / "k.safetensors", base_shapes(unet), other_kinds=True)
    write_lora(again, tmp_path / "k2.safetensors", "kohya")  # kohya -> kohya: the same
    twice = load_file(tmp_path / "k2.safetensors")
    assert sorted(twice) == sorted(written)
    assert all(torch.equal(twice[k], v) for k, v in written.items())
    with safe_open(str(tmp_path / "k.safetensors"), framework="pt") as f:
        header = f.metadata()  # what LoRA managers read: network module and algorithm
    assert header["ss_network_module"] == "lycoris.kohya"
    assert json.loads(header["ss_network_args"])["algo"] == ALGOS[name]["algo"]


@pytest.mark.filterwarnings("ignore")
def test_lycoris_plain_lora_written_by_condlora_loads_in_diffusers(unet, tmp_path, capsys):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as Pipeline

    from .test_lora_interop import assert_loaded

    path, reference = lycoris_file(unet, "lora", tmp_path / "lora.safetensors")  # LoCon
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(unet.config)))
    assert main(["lora", "info", "--strict", str(path), "--base-modules", str(config)]) == 0
    lora = read_lora(path, base_shapes(unet))
    assert lora.others == {} and lora.unmapped == {} and lora.modules
    for to, out in (("diffusers", "d"), ("kohya", "k.safetensors"), ("peft", "p")):
        args = ["lora", "convert", str(path), "--to", to, "--out", str(tmp_path / out)]
        assert main([*args, "--base-modules", str(config)]) == 0, to
        loaded = copy.deepcopy(unet)
        if to == "peft":
            loaded = peft.PeftModel.from_pretrained(loaded, tmp_path / out)
        else:
            state, alphas, meta = Pipeline.lora_state_dict(
                tmp_path / out, return_lora_metadata=True
            )
            Pipeline.load_lora_into_unet(state, alphas, loaded, metadata=meta)
        assert_loaded(loaded, lora)
        out = run(loaded.eval(), inputs_of(unet))
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore")
def test_loha_to_plain_lora_by_svd_prints_each_error(unet, tmp_path, capsys):
    path, reference = lycoris_file(unet, "loha", tmp_path / "loha.safetensors")
    exact = read_lora(path, base_shapes(unet), other_kinds=True)
    names = tmp_path / "base.txt"
    names.write_text("\n".join(base_shapes(unet)))
    out = tmp_path / "peft"
    args = ["lora", "convert", str(path), "--to", "peft", "--out", str(out)]
    assert main([*args, "--base-modules", str(names)]) == 2  # conv kernels: shapes needed
    assert "stored flattened: pass --base-modules with shapes" in capsys.readouterr().err
    base = tmp_path / "config.json"
    base.write_text(json.dumps(dict(unet.config)))
    assert main([*args, "--base-modules", str(base)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("SVD of the exact dW: ") == len(exact.others)
    plain = read_lora(out, base_shapes(unet))  # shapes checked against the U-Net's
    for name, m in exact.others.items():  # numerical rank: exact up to float32
        want = m.delta()
        got = plain.modules[name].delta()
        assert float((got - want).norm() / want.norm()) < 1e-6, name
    # the peft folder loads through peft, every module used, with the LoHa network's output
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    loaded = PeftModel.from_pretrained(copy.deepcopy(unet), out).eval()
    assert sum(isinstance(m, LoraLayer) for m in loaded.modules()) == len(exact.others)
    torch.testing.assert_close(run(loaded, inputs_of(unet)), reference, atol=1e-5, rtol=1e-4)
    assert main([*args[:-1], str(tmp_path / "r1"), "--rank", "1", "--base-modules", str(base)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "attn1.to_q:" in x)
    name = line.split(": ")[1]
    delta = exact.others[name].delta()
    s = torch.linalg.svdvals(delta.double().reshape(delta.shape[0], -1))
    expected = float((s[1:] ** 2).sum().sqrt() / s.norm())  # Eckart-Young, by hand
    assert line.endswith(f"rank 1, relative error {expected:.3e}")


def test_peft_dora_round_trips_in_peft_and_diffusers_and_is_refused_in_kohya(
    unet, tmp_path, capsys
):
    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "proj_in"], use_dora=True)
    model = get_peft_model(copy.deepcopy(unet), config)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "dora")
    lora = read_lora(tmp_path / "dora", other_kinds=True)
    assert {m.kind for m in lora.others.values()} == {"dora"} and lora.modules == {}
    assert {m.scale for m in lora.others.values()} == {2.0}
    assert main(["lora", "info", "--strict", str(tmp_path / "dora")]) == 0
    assert "dora modules: " in capsys.readouterr().out
    args = ["lora", "convert", str(tmp_path / "dora"), "--to", "peft", "--out"]
    assert main([*args, str(tmp_path / "again")]) == 0
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "again").eval()
    model.eval()
    torch.testing.assert_close(run(loaded, inputs_of(unet)), run(model, inputs_of(unet)))
    args = ["lora", "convert", str(tmp_path / "again"), "--to", "diffusers", "--out"]
    assert main([*args, str(tmp_path / "d")]) == 0  # diffusers holds peft's DoRA too
    loaded = copy.deepcopy(unet)
    loaded.load_lora_adapter(
        tmp_path / "d", weight_name="pytorch_lora_weights.safetensors", prefix="unet"
    )
    torch.testing.assert_close(run(loaded, inputs_of(unet)), run(model, inputs_of(unet)))
    back = read_lora(tmp_path / "d", other_kinds=True)
    assert {m.kind for m in back.others.values()} == {"dora"} and back.unmapped == {}
    args = ["lora", "convert", str(tmp_path / "d"), "--to", "peft", "--out"]
    assert main([*args, str(tmp_path / "p2")]) == 0  # diffusers -> peft keeps it too
    loaded = PeftModel.from_pretrained(copy.deepcopy(unet), tmp_path / "p2").eval()
    torch.testing.assert_close(run(loaded, inputs_of(unet)), run(model, inputs_of(unet)))
    for to, out in (("kohya", "k.safetensors"),):
        args = ["lora", "convert", str(tmp_path / "dora"), "--to", to, "--out", str(tmp_path / out)]
        assert main(args) == 2, to
        err = capsys.readouterr().err
        assert err.startswith("condlora: error: ") and err.count("\n") == 1 and "DoRA" in err
        assert not (tmp_path / out).exists()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["lora", "loha", "locon_tucker"])
def test_lycoris_dora_kept_in_kohya_and_refused_as_plain_lora(unet, name, tmp_path, capsys):
    path, _ = lycoris_file(unet, name, tmp_path / "wd.safetensors", dora_wd=True)
    lora = read_lora(path, base_shapes(unet), other_kinds=True)
    assert lora.unmapped == {} and all(not m.exact for m in lora.others.values())
    assert main(["lora", "info", "--strict", str(path)]) == 0
    assert "DoRA" in (out := capsys.readouterr().out) and ": dW needs the base weight" in out
    write_lora(lora, tmp_path / "k.safetensors", "kohya")
    written = load_file(tmp_path / "k.safetensors")
    source = {k.replace("lycoris_", "lora_unet_", 1): v for k, v in load_file(path).items()}
    assert sorted(written) == sorted(source)
    assert all(torch.equal(written[k], v) for k, v in source.items())
    out = tmp_path / "d.safetensors"
    assert main(["lora", "convert", str(path), "--to", "diffusers", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "depends on the base weight" in err and not out.exists()


def two_loras(unet):
    from .test_lora_interop import random_lora

    return random_lora(unet, seed=0), random_lora(unet, seed=1)


def test_merge_is_the_weighted_sum_and_resize_the_best_low_rank(unet, tmp_path, capsys):
    a, b = two_loras(unet)
    merged, errors = merge([a, b], [0.7, 0.3], rank=64)
    assert max(errors.values()) < 1e-6
    for name in a.modules:
        want = 0.7 * a.modules[name].delta() + 0.3 * b.modules[name].delta()
        got = merged.modules[name].delta().reshape(want.shape)
        assert float((got - want).norm() / want.norm()) < 1e-6, name
    low, errors = merge([a, b], [0.7, 0.3], rank=1)
    for name, m in low.modules.items():
        want = (0.7 * a.modules[name].delta() + 0.3 * b.modules[name].delta()).double()
        u, s, vh = torch.linalg.svd(want.reshape(want.shape[0], -1))
        best = s[0] * torch.outer(u[:, 0], vh[0])  # best rank 1 by hand
        assert torch.allclose(m.delta().double().reshape(best.shape), best, atol=1e-5)
        assert errors[name] == pytest.approx(float(s[1:].norm() / s.norm()), rel=1e-5)
    kept, _ = resize(a, energy=0.999)
    for name, m in kept.modules.items():
        s = torch.linalg.svdvals(a.modules[name].delta().double().reshape(m.B.shape[0], -1))
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        assert m.rank == int((energy < 0.999).sum()) + 1
    write_lora(a, tmp_path / "a", "peft")
    write_lora(b, tmp_path / "b.safetensors", "kohya")
    base = tmp_path / "base.txt"
    base.write_text("\n".join(n for n, _ in unet.named_modules() if n))
    args = ["lora", "merge", str(tmp_path / "a"), str(tmp_path / "b.safetensors")]
    args += ["--weights", "0.7", "0.3", "--rank", "2", "--base-modules", str(base)]
    assert main([*args, "--out", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out.count("merged: ") == len(a.modules)
    on_disk = read_lora(tmp_path / "m")
    assert set(on_disk.ranks().values()) <= {1, 2}
    resize_args = ["lora", "resize", str(tmp_path / "a"), "--rank", "1"]
    assert main([*resize_args, "--out", str(tmp_path / "r.safetensors"), "--to", "kohya"]) == 0
    assert "resized: " in capsys.readouterr().out
    energy_args = ["lora", "resize", str(tmp_path / "a"), "--energy", "0.99"]
    assert main([*energy_args, "--out", str(tmp_path / "e")]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("resized: ")]
    assert len(lines) == len(a.modules)  # one line per module: its rank and error
    for line in lines:
        _, name, rest = line.split(": ", 2)
        delta = a.modules[name].delta().double()
        s = torch.linalg.svdvals(delta.reshape(delta.shape[0], -1))
        r = int((torch.cumsum(s**2, 0) / (s**2).sum() < 0.99).sum()) + 1  # by hand
        rank, error = rest.removeprefix("rank ").split(", relative error ")
        assert int(rank) == r, line
        assert float(error) == pytest.approx(float(s[r:].norm() / s.norm()), rel=1e-3, abs=1e-9)
    assert main(["lora", "resize", str(tmp_path / "a"), "--energy", "1.5", "--out", "x"]) == 2
    assert "--energy must be in (0, 1]" in capsys.readouterr().err


DAMAGE = {  # name -> (edit of a LoHa file's tensors, words of the one-line error)
    "part missing": (lambda t, s: t.pop(f"{s}.hada_w2_b"), "has no hada_w2_b"),
    "shapes do not fit": (
        lambda t, s: t.update({f"{s}.hada_w2_b": torch.ones(3, 5)}),
        "parts do not fit",
    ),
    "alpha of two numbers": (
        lambda t, s: t.update({f"{s}.alpha": torch.ones(2)}),
        "alpha has shape (2,)",
    ),
    "nan": (
        lambda t, s: t.update({f"{s}.hada_w1_a": torch.full_like(t[f"{s}.hada_w1_a"], math.nan)}),
        "NaN or inf",
    ),
    "kinds mixed": (
        lambda t, s: t.update({f"{s}.lora_up.weight": torch.ones(8, 2)}),
        "of different kinds",
    ),
    "0-d factor": (lambda t, s: t.update({f"{s}.hada_w1_b": torch.tensor(1.0)}), "shape ()"),
}


@pytest.mark.filterwarnings("ignore")
def test_damaged_lycoris_files_give_one_line(unet, tmp_path, capsys):
    path, _ = lycoris_file(unet, "loha", tmp_path / "loha.safetensors")
    stem = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for label, (edit, words) in DAMAGE.items():
        tensors = load_file(path)
        edit(tensors, stem)
        bad = tmp_path / "bad.safetensors"
        save_file(tensors, bad)
        out = tmp_path / "out.safetensors"
        assert main(["lora", "convert", str(bad), "--to", "kohya", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("condlora: error: ") and err.count("\n") == 1, (label, err)
        assert words in err, (label, err)
        assert not out.exists()


def test_resize_and_merge_mistakes_give_one_line_and_write_nothing(unet, tmp_path, capsys):
    a, _ = two_loras(unet)
    write_lora(a, tmp_path / "a", "peft")
    other = a.replace_modules(
        {
            n: type(m)(m.A[:, :3] if m.A.dim() == 2 else m.A, m.B, m.scale)
            for n, m in a.modules.items()
        }
    )
    write_lora(other, tmp_path / "b", "peft")
    out = tmp_path / "out.safetensors"
    cases = {
        "weights count": (
            ["merge", "a", "a", "--weights", "1", "--rank", "2"],
            "2 LoRAs but 1 weights",
        ),
        "shapes differ": (["merge", "a", "b", "--rank", "2"], "dW shapes differ"),
        "rank 0": (["resize", "a", "--rank", "0"], "--rank must be at least 1"),
        "energy 0": (["resize", "a", "--energy", "0"], "--energy must be in (0, 1]"),
        "missing": (["resize", "nothing", "--rank", "1"], "LoRA not found"),
    }
    for label, (args, words) in cases.items():
        args = [str(tmp_path / x) if x in ("a", "b", "nothing") else x for x in args]
        assert main(["lora", *args, "--out", str(out), "--to", "kohya"]) == 2, label
        err = capsys.readouterr().err
        assert err.startswith("condlora: error: ") and err.count("\n") == 1, (label, err)
        assert words in err, (label, err)
        assert not out.exists()


@pytest.mark.filterwarnings("ignore")
def test_bias_updates_of_full_diffs_are_never_dropped_silently(unet, tmp_path, capsys):
    path, _ = lycoris_file(unet, "full", tmp_path / "full.safetensors")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(unet.config)))
    out = tmp_path / "r.safetensors"
    args = ["lora", "resize", str(path), "--rank", "2", "--out", str(out)]
    args += ["--base-modules", str(config)]
    assert main(args) == 2 and not out.exists()
    err = capsys.readouterr().err
    assert "diff_b' maps to no module: bias update" in err and "--drop-unmapped" in err
    assert main([*args, "--drop-unmapped"]) == 0
    printed = capsys.readouterr().out
    n_bias = sum(k.endswith(".diff_b") for k in load_file(path))
    assert printed.count(".diff_b: bias update") == n_bias > 0
    resized = read_lora(out, base_shapes(unet))
    assert set(resized.ranks().values()) <= {1, 2}
