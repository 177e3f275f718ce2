"""Released checkpoints of the original codebases: improved-diffusion `.pt` state dicts and EDM
`.pkl` network snapshots (written here in EDM's persistence format without EDM's code), read
without running anything in them and copied into condlora's nets by name."""

import collections
import copy
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from condlora.core.errors import CondloraError
from condlora.image.build import build_denoiser, build_net
from condlora.image.config import load_config
from condlora.image.edm_pickle import load_edm_pickle
from condlora.image.pretrained import (
    init_from,
    load_pretrained,
    read_edm_snapshot,
    read_iddpm_checkpoint,
)
from condlora.nets import DDPMppUNet
from condlora.nets.ddpmpp import UNetBlock
from tests.conftest import CONFIGS, TINY_ADM, TINY_EDM, assert_same_function

pytestmark = pytest.mark.usefixtures("one_thread")


def config(name, *extra):
    tiny = TINY_ADM if "iddpm" in name else TINY_EDM
    return load_config(CONFIGS / f"cifar10-{name}.yaml", [*tiny, *extra])


def randomize(net, seed=0):
    """Random values everywhere, so zero-initialised layers do not hide a missed copy."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return net.eval()


def outputs(net, seed=1, classes=0, augment=0):
    g = torch.Generator().manual_seed(seed)
    x, noise = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, generator=g)
    kw = {"class_labels": torch.tensor([1, 3])} if classes else {}
    if augment:
        kw["augment_labels"] = torch.randn(2, augment, generator=g)
    with torch.no_grad():
        return net.eval()(x, noise, **kw)


# --- improved-diffusion .pt ------------------------------------------------------------------


def test_iddpm_state_dict_loads_into_the_adm_net(tmp_path):
    cfg = config("iddpm-cond-baseline")
    source = randomize(build_net(cfg))
    torch.save(source.state_dict(), tmp_path / "model.pt")
    loaded = load_pretrained(tmp_path / "model.pt", cfg).net.net
    assert torch.equal(outputs(loaded, classes=10), outputs(source, classes=10))
    read = read_iddpm_checkpoint(tmp_path / "model.pt")
    assert read.keys() == source.state_dict().keys()


def test_iddpm_weights_under_a_fresh_lora_compute_the_baseline(tmp_path):
    base_cfg, lora_cfg = config("iddpm-uncond-baseline"), config("iddpm-uncond-lora")
    torch.save(randomize(build_net(base_cfg)).state_dict(), tmp_path / "model.pt")
    base = load_pretrained(tmp_path / "model.pt", base_cfg).eval()
    lora = load_pretrained(tmp_path / "model.pt", lora_cfg).eval()
    assert any("base_layer" in k for k in lora.state_dict())  # LoRA injected
    x, sigma = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 20.0])
    with torch.no_grad():
        assert_same_function(lora(x, sigma), base(x, sigma))


@pytest.mark.parametrize(
    "written, loaded, message",
    [
        (
            "iddpm-cond-baseline",
            "iddpm-uncond-baseline",
            "the checkpoint has 10 classes, the config 0",
        ),
        (
            "iddpm-uncond-baseline",
            "iddpm-uncond-baseline diffusion.objective=ddpm",
            "the checkpoint has 6 output channels, the config 3",
        ),
        ("iddpm-uncond-baseline", "iddpm-uncond-baseline net.model_channels=64", "shape mismatch"),
    ],
)
def test_iddpm_checkpoint_that_does_not_fit_is_refused(tmp_path, written, loaded, message):
    torch.save(build_net(config(written)).state_dict(), tmp_path / "model.pt")
    name, *extra = loaded.split()
    with pytest.raises(CondloraError, match=message) as err:
        load_pretrained(tmp_path / "model.pt", config(name, *extra))
    assert "\n" not in str(err.value) and "model.pt (config 'cifar10-" in str(err.value)


class Payload:
    """Pickles as a call of os.system that would create `marker`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_iddpm_pickle_with_code_is_refused_by_weights_only(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"weight": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CondloraError, match="not a weights-only PyTorch state dict"):
        read_iddpm_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"step": 3}, tmp_path / "opt.pt")
    with pytest.raises(CondloraError, match="not a state dict of tensors"):
        read_iddpm_checkpoint(tmp_path / "opt.pt")


# --- EDM .pkl in EDM's persistence format, written without EDM's code ----------------------


def _reconstruct_persistent_obj(meta):
    raise AssertionError("condlora must never call EDM's reconstructor")


# pickle names a function by module and name: register the stand-in where EDM's lives
_reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
_reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"


@pytest.fixture
def edm_persistence(monkeypatch):
    package, module = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    module._reconstruct_persistent_obj = _reconstruct_persistent_obj
    package.persistence = module
    monkeypatch.setitem(sys.modules, "torch_utils", package)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", module)


class Persistent:
    """Pickles as EDM's persistent objects do: a call of _reconstruct_persistent_obj(meta)."""

    def __init__(self, class_name, state, module_src="import torch\n"):
        self.meta = dict(
            type="class", version=6, module_src=module_src, class_name=class_name, state=state
        )

    def __reduce__(self):
        return (_reconstruct_persistent_obj, (self.meta,))


def torch_module(cls, state):
    """An instance of the torch class `cls` holding `state` as its __dict__: it pickles as
    torch.nn classes do (NEWOBJ of the class, then the state), children being EDM records."""
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


def module_state(module, children, buffers=None, **attrs):
    """A torch module's __dict__ as pickled (hooks empty, children already converted)."""
    hooks = ("_backward_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks")
    state = {
        "training": False,
        "_non_persistent_buffers_set": set(),
        "_is_full_backward_hook": None,
    }
    state.update({name: collections.OrderedDict() for name in hooks})
    state["_parameters"] = collections.OrderedDict(module._parameters)
    state["_buffers"] = collections.OrderedDict(module._buffers, **(buffers or {}))
    state["_modules"] = collections.OrderedDict(children)
    state.update(attrs)
    return state


EDM_CLASSES = {nn.Linear: "Linear", nn.Conv2d: "Conv2d", nn.GroupNorm: "GroupNorm"}
EDM_CLASSES.update({UNetBlock: "UNetBlock", DDPMppUNet: "SongUNet"})


def edm_tree(module, resample=False):
    """EDM's pickled form of a condlora DDPM++ module: persistent objects for EDM's classes,
    torch classes (ModuleDict, ...) as themselves, [1, 1] filters on resampling convs."""
    children = {}
    for name, child in module.named_children():
        up_down = isinstance(module, UNetBlock) and (module.up or module.down)
        children[name] = edm_tree(child, resample=up_down and name in ("conv0", "skip"))
    if isinstance(module, nn.Conv2d):  # EDM's Conv2d keeps a resample_filter buffer (or None)
        filt = torch.ones(1, 1, 2, 2) / 4 if resample else None
        state = module_state(module, children, {"resample_filter": filt}, in_channels=1)
    else:
        state = module_state(module, children, _init_kwargs={"skip_scale": np.float64(0.5**0.5)})
    name = EDM_CLASSES.get(type(module))
    return Persistent(name, state) if name else torch_module(type(module), state)


def edm_snapshot(net, label_dim, sigma_data=0.5, module_src="import torch\n"):
    """EDM's network-snapshot dict with an EDMPrecond around the SongUNet `net`."""
    song = edm_tree(net)
    song.meta["state"]["_modules"]["map_noise"] = Persistent("PositionalEmbedding", {})
    precond = Persistent(
        "EDMPrecond",
        module_state(
            nn.Module(),
            {"model": song},
            img_resolution=32,
            img_channels=3,
            label_dim=label_dim,
            use_fp16=False,
            sigma_min=0,
            sigma_max=float("inf"),
            sigma_data=sigma_data,
            model_type="SongUNet",
        ),
        module_src,
    )
    loss = Persistent("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5})
    augment = Persistent("AugmentPipe", {"p": 0.12, "xflip": 1e8, "scale": 1.0})
    dataset = {"class_name": "training.dataset.ImageFolderDataset", "path": "cifar10.zip"}
    return {"ema": precond, "loss_fn": loss, "augment_pipe": augment, "dataset_kwargs": dataset}


def write(path, obj, protocol=4):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return path


@pytest.mark.parametrize("name, classes", [("edm-cond-baseline", 10), ("edm-uncond-baseline", 0)])
@pytest.mark.parametrize("protocol", [2, 4])
def test_edm_snapshot_loads_into_ddpmpp(tmp_path, edm_persistence, name, classes, protocol):
    cfg = config(name)
    source = randomize(build_net(cfg))
    marker = tmp_path / "ran"
    src = f"open({str(marker)!r}, 'w').close()\n"  # EDM's reconstructor would exec this
    path = write(tmp_path / "snap.pkl", edm_snapshot(source, classes, module_src=src), protocol)
    loaded = load_pretrained(path, cfg).net.net
    assert torch.equal(outputs(loaded, 2, classes, 9), outputs(source, 2, classes, 9))
    assert not marker.exists()
    tensors, settings = read_edm_snapshot(path)
    assert tensors.keys() == source.state_dict().keys()  # filters checked and dropped
    assert settings == {
        "sigma_data": 0.5,
        "label_dim": classes,
        "img_resolution": 32,
        "img_channels": 3,
    }


def test_edm_weights_under_fresh_uclora_compute_the_baseline(tmp_path, edm_persistence):
    base_cfg, lora_cfg = config("edm-cond-baseline"), config("edm-cond-lora")
    path = write(tmp_path / "snap.pkl", edm_snapshot(randomize(build_net(base_cfg)), 10))
    base, lora = load_pretrained(path, base_cfg).eval(), load_pretrained(path, lora_cfg).eval()
    g = torch.Generator().manual_seed(3)
    x, sigma = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0.3, 5.0])
    labels = torch.tensor([2, 7])
    with torch.no_grad():
        assert_same_function(
            lora(x, sigma, class_labels=labels), base(x, sigma, class_labels=labels)
        )
    report = init_from(build_denoiser(lora_cfg), path, lora_cfg, verbose=False)
    assert not report["unused"] and report["fresh"]
    assert all(".lora_" in k or ".composer." in k for k in report["fresh"])  # only the LoRA


def test_only_lora_config_starts_from_a_baseline_without_its_scale_shift(tmp_path):
    base_cfg, only_cfg = config("iddpm-uncond-baseline"), config("iddpm-uncond-onlylora")
    torch.save(randomize(build_net(base_cfg)).state_dict(), tmp_path / "model.pt")
    report = init_from(build_denoiser(only_cfg), tmp_path / "model.pt", only_cfg, verbose=False)
    dropped = ("emb_layers", "time_embed")  # ADM's "only LoRA" has no embedding path at all
    assert report["unused"] and all(any(d in k for d in dropped) for k in report["unused"])
    with pytest.raises(CondloraError, match="checkpoint not found"):
        init_from(build_denoiser(only_cfg), tmp_path / "missing.pt", only_cfg)
    with pytest.raises(CondloraError, match="no such run folder or checkpoint"):
        init_from(build_denoiser(only_cfg), tmp_path / "no_run_here", only_cfg)


def test_edm_snapshot_that_does_not_fit_is_refused(tmp_path, edm_persistence):
    path = write(tmp_path / "snap.pkl", edm_snapshot(build_net(config("edm-cond-baseline")), 10))
    with pytest.raises(CondloraError, match="the checkpoint has 10 classes, the config 0"):
        load_pretrained(path, config("edm-uncond-baseline"))
    with pytest.raises(
        CondloraError, match="sigma_data 0.5, the config has diffusion.sigma_data 1"
    ):
        load_pretrained(path, config("edm-cond-baseline", "diffusion.sigma_data=1.0"))
    with pytest.raises(CondloraError, match="need net.arch adm"):
        load_pretrained(tmp_path / "model.pt", config("edm-cond-baseline"))
    with pytest.raises(CondloraError, match="unknown checkpoint kind '.ckpt'"):
        load_pretrained(tmp_path / "model.ckpt", config("edm-cond-baseline"))


class Call:
    """Pickles as a call of any function."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize(
    "payload, refused",
    [
        (lambda m: Call(os.system, f"touch {m}"), "asks for posix.system"),
        (lambda m: Call(eval, f"open({str(m)!r}, 'w')"), "asks for builtins.eval"),
        (lambda m: Call(getattr, Call(__import__, "os"), "system"), "asks for builtins.getattr"),
        # a tensor storage whose bytes hide a call: torch's weights-only loader refuses it
        (
            lambda m: Call(
                torch.storage._load_from_bytes,
                pickle.dumps(Call(os.system, f"touch {m}"), protocol=2),
            ),
            "weights-only loader refuses",
        ),
    ],
)
def test_edm_pickle_asking_for_other_globals_is_refused_unrun(
    tmp_path, edm_persistence, payload, refused
):
    marker = tmp_path / "ran"
    net = build_net(config("edm-uncond-baseline"))
    snapshot = edm_snapshot(net, 0)
    snapshot["ema"].meta["state"]["_modules"]["model"].meta["state"]["_buffers"]["x"] = payload(
        marker
    )
    path = write(tmp_path / "evil.pkl", snapshot)
    with pytest.raises(CondloraError, match=f"refused, nothing in it was run: .*{refused}") as err:
        load_edm_pickle(path)
    assert "\n" not in str(err.value)
    assert not marker.exists()


def test_broken_and_foreign_pickles_are_one_line_errors(tmp_path, edm_persistence):
    path = write(tmp_path / "snap.pkl", edm_snapshot(build_net(config("edm-uncond-baseline")), 0))
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CondloraError, match="is not a readable EDM pickle"):
        load_edm_pickle(cut)
    with pytest.raises(CondloraError, match=r"holds no EDM network under 'ema' \(found: \['a'\]\)"):
        read_edm_snapshot(write(tmp_path / "d.pkl", {"a": 1}))
    other = edm_snapshot(build_net(config("edm-uncond-baseline")), 0)
    other["ema"].meta["class_name"] = "VPPrecond"
    with pytest.raises(CondloraError, match="reads EDMPrecond networks .* not VPPrecond"):
        read_edm_snapshot(write(tmp_path / "vp.pkl", other))
    with pytest.raises(CondloraError, match="EDM pickle not found"):
        load_edm_pickle(tmp_path / "missing.pkl")


# --- condlora's own checkpoints ---------------------------------------------------------------


def test_condlora_checkpoint_backbone_loads_under_another_lora(tmp_path):
    from condlora.image.task import IMAGE_KIND
    from condlora.train.checkpoint import save_checkpoint

    base_cfg = config("edm-cond-baseline")
    trained = build_denoiser(base_cfg)
    randomize(trained.net.net)
    ema = copy.deepcopy(trained)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, base_cfg, IMAGE_KIND, 7, trained, ema, optimizer)
    lora = load_pretrained(tmp_path / "checkpoint.safetensors", config("edm-cond-lora")).eval()
    x, sigma, labels = torch.randn(2, 3, 32, 32), torch.tensor([0.3, 5.0]), torch.tensor([1, 2])
    with torch.no_grad():
        assert_same_function(
            lora(x, sigma, class_labels=labels), ema.eval()(x, sigma, class_labels=labels)
        )
