"""Tiny collections and configs shared by the synthesis tests."""

from pathlib import Path

import torch

from condlora.lora.formats import LoRAWeights, make_module
from condlora.synthesis.collection import write_dataset
from condlora.synthesis.config import load_synth_config
from condlora.synthesis.flatten import FlatSpec

# a "base model" of two projections: rank-1 LoRAs on them are 2 x (6 + 5) = 22 numbers
SPEC = FlatSpec.of(
    LoRAWeights(
        {
            name: make_module(name, torch.zeros(1, 6), torch.zeros(5, 1), 1.0, "test")
            for name in ("blocks.0.attn.to_q", "blocks.0.attn.to_v")
        }
    )
)

# shrinks any synthesis config to networks that train in a second
TINY = [
    "vae.latent=6",
    "vae.hidden=16",
    "vae.depth=1",
    "prior.net.width=16",
    "prior.net.depth=1",
    "prior.net.cond_width=8",
    "prior.net.time_channels=8",
    "prior.net.rank=2",
    "prior.num_timesteps=50",
    "prior.steps=4",
    "baseline.components=4",
]
for stage in ("vae_train", "prior_train"):
    TINY += [f"{stage}.{k}" for k in ("batch_size=8", "warmup_steps=2", "log_every=2")]
    TINY += [f"{stage}.{k}" for k in ("max_steps=6", "ckpt_every=0", "lr_schedule=constant")]


def linear_collection(path: Path, n: int = 32, e_dim: int = 4, seed: int = 0, noise: float = 0.05):
    """A dataset whose vectors are a linear function of random embeddings (plus a little
    noise); returns (path, vectors, embeddings, mixing, offset)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(n, e_dim, generator=g)
    mixing = torch.randn(SPEC.size, e_dim, generator=g)
    offset = torch.randn(SPEC.size, generator=g)
    vectors = emb @ mixing.T + offset + noise * torch.randn(n, SPEC.size, generator=g)
    write_dataset(path, [f"s{i:03d}" for i in range(n)], SPEC, vectors, emb)
    return path, vectors, emb, mixing, offset


def tiny_config(dataset: Path, *overrides: str):
    """A tiny SynthConfig on a dataset."""
    return load_synth_config(None, [*TINY, f"dataset={dataset}", *overrides])


def write_detector(folder: Path, seed: int = 0) -> Path:
    """MTCNN weight files (pnet.pt, rnet.pt, onet.pt) of the right shapes: random, but for the
    face-score heads, which say "face" everywhere (so that the cascade finds some)."""
    from condlora.synthesis.faces import ONet, PNet, RNet

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    heads = {"pnet.pt": (PNet(), "conv4_1"), "rnet.pt": (RNet(), "dense5_1")}
    heads["onet.pt"] = (ONet(), "dense6_1")
    for name, (net, head) in heads.items():
        state = net.state_dict()
        state[f"{head}.weight"].zero_()
        state[f"{head}.bias"].copy_(torch.tensor([-8.0, 8.0]))
        torch.save(state, folder / name)
    return folder
