"""A run's conditional LoRA for other tools: static LoRAs (`condlora lora bake`) and the
learned per-step strengths of its bases (`condlora lora schedule`).

Every wrapped layer of a run computes dW(c) = s B diag(w(c) ⊗ 1_r) A, linear in its basis
weights w(c). The static LoRA of a range of noise levels [t0, t1] is the average of dW(t)
over the range,

    dW_bar = s B diag(mean_t w(t) ⊗ 1_r) A,

so only w needs averaging; dW_bar is then factorised back to rank R by SVD (Eckart-Young,
formats/svd.py), with its relative error. The levels averaged over are the run's discrete
timesteps k / (T-1) inside the range (DDPM-type objectives), else 1,001 evenly spaced t.
Class-conditional runs: at one class (`label`), or averaged over all classes (w of every
class at every level, then the mean: the LoRA that acts the same for every class). A
per-basis bias (lora.bias) adds w(c) E to the layer's bias, which a LoRA file cannot hold:
it is left out and reported.

w(c) of every layer is read from the run's own forward pass at the condition: the backbone
runs on a zero image until the first wrapped layer asks for its weights (so UC-LoRA's MLP
reads the host's real embedding), and stops there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from condlora.core.errors import CondloraError
from condlora.core.files import check_output_folder, undone_on_error, write_text_atomic
from condlora.core.safetensors_io import write_weights
from condlora.diffusion import Denoiser
from condlora.diffusion.precond import DiscretePrecond, EDMPrecond, Preconditioner
from condlora.image.build import is_text_config, num_classes
from condlora.image.config import Config
from condlora.image.diffusers_net import backbone_modules, model_shape, text_encoder
from condlora.image.generate import prompt_labels
from condlora.image.strength import sampler_times
from condlora.image.task import load_run
from condlora.lora.formats import LoRAWeights, write_lora, write_loras
from condlora.lora.formats.svd import lowrank
from condlora.lora.inject import lora_state_dict
from condlora.lora.io import CONFIG_KEY
from condlora.lora.runtime import ConditionState, lora_layers
from condlora.lora.schedule import block_of, steps_callback, steps_csv, steps_keyframes

CONTINUOUS_LEVELS = 1001  # noise levels averaged over a range of a continuous-time objective
CHUNK = 256  # conditions per early-stopped forward pass


class _Stop(Exception):
    """Raised by the first wrapped layer of a pass once the basis weights are read."""


def label_of_time(precond: Preconditioner, t: Tensor) -> Tensor:
    """The net's noise label at normalised noise level t (the inverse of time_of_label)."""
    if isinstance(precond, DiscretePrecond):
        return t * (precond.num_timesteps - 1)
    if isinstance(precond, EDMPrecond):
        lo, hi = math.log(precond.sigma_min), math.log(precond.sigma_max)
        return (lo + t * (hi - lo)) / 4  # c_noise = ln(sigma) / 4
    raise CondloraError(f"noise levels of a {type(precond).__name__} objective are not known")


def levels_in(precond: Preconditioner, t0: float, t1: float) -> Tensor:
    """The noise levels t averaged over in [t0, t1]: discrete timesteps, or an even grid."""
    if isinstance(precond, DiscretePrecond):
        steps = precond.num_timesteps - 1
        k = torch.arange(math.ceil(t0 * steps - 1e-9), math.floor(t1 * steps + 1e-9) + 1)
        if len(k):
            return k.double() / steps
        return torch.tensor([(t0 + t1) / 2], dtype=torch.float64)  # narrower than a step
    return torch.linspace(t0, t1, CONTINUOUS_LEVELS if t1 > t0 else 1, dtype=torch.float64)


@torch.no_grad()
def basis_weights(
    denoiser: Denoiser, cfg: Config, t: Tensor, labels: Tensor | None
) -> dict[str, Tensor]:
    """w(t_i, y_i) of every wrapped layer, (N, m) each, by module name in the backbone."""
    layers = lora_layers(denoiser.net.net)
    if not layers:
        raise CondloraError("the run has no conditional LoRA (lora.method none): nothing to read")
    state = next(iter(layers.values())).state
    chunks = []
    for start in range(0, len(t), CHUNK):
        part = slice(start, start + CHUNK)
        y = None if labels is None else labels[part]
        chunks.append(_weights_of_pass(denoiser, cfg, state, t[part].float(), y))
    w = torch.cat(chunks, dim=1)  # (L, N, m), row `layer.index` for each layer
    return {name: w[layer.index] for name, layer in layers.items()}


def _weights_of_pass(
    denoiser: Denoiser, cfg: Config, state: ConditionState, t: Tensor, y: Tensor | None
) -> Tensor:
    """(L, n, m): one forward pass of the backbone at (t, y), stopped at its first LoRA layer."""
    seen: list[Tensor] = []

    def read(module: nn.Module, args: tuple) -> None:
        inputs = state.inputs()
        seen.append(type(state.composers[0]).batched(state.composers, **inputs))
        raise _Stop

    hooks = [m.register_forward_pre_hook(read) for m in lora_layers(denoiser.net.net).values()]
    x = torch.zeros(len(t), *model_shape(denoiser, cfg))
    try:
        denoiser.net(x, label_of_time(denoiser.precond, t), y)
    except _Stop:
        pass
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        raise CondloraError("the run's LoRA layers did not run in a forward pass")
    return seen[0].expand(-1, len(t), -1) if seen[0].shape[1] == 1 else seen[0]


def conditions(
    cfg: Config, t: Tensor, label: int | None = None
) -> tuple[Tensor, Tensor | None, int]:
    """(levels, labels, classes averaged over): every level at `label`, at every class of a
    class-conditional run (class-major), at a text run's prompt (row 0 of its table, set by
    `run_at_prompt`), or alone for an unconditional run."""
    if is_text_config(cfg):
        return t, torch.zeros(len(t), dtype=torch.long), 1
    classes = num_classes(cfg)
    if label is not None and classes == 0:
        raise CondloraError("this run is unconditional: --label does not apply")
    if label is not None and not 0 <= label < classes:
        raise CondloraError(f"--label must be in 0..{classes - 1}, got {label}")
    if classes == 0:
        return t, None, 1
    ys = torch.arange(classes) if label is None else torch.tensor([label])
    return t.repeat(len(ys)), ys.repeat_interleave(len(t)), len(ys)


def mean_weights(
    denoiser: Denoiser, cfg: Config, t0: float, t1: float, label: int | None = None
) -> dict[str, Tensor]:
    """Every layer's w averaged over the noise levels of [t0, t1] (and the classes: all of
    them unless `label`), shape (m,)."""
    t, labels, _ = conditions(cfg, levels_in(denoiser.precond, t0, t1), label)
    return {name: w.mean(0) for name, w in basis_weights(denoiser, cfg, t, labels).items()}


def step_weights(
    denoiser: Denoiser, cfg: Config, ts: list[float], label: int | None = None
) -> dict[str, Tensor]:
    """Every layer's w at each noise level of `ts` (averaged over the classes unless
    `label`), shape (steps, m)."""
    t, labels, groups = conditions(cfg, torch.tensor(ts, dtype=torch.float64), label)
    w = basis_weights(denoiser, cfg, t, labels)
    return {name: v.reshape(groups, len(ts), -1).mean(0) for name, v in w.items()}


@dataclass
class Baked:
    """A static LoRA and what baking lost: each module's SVD error, the bias updates left out
    (module -> |db|, where a per-basis bias is trained)."""

    weights: LoRAWeights
    errors: dict[str, float]
    biases: dict[str, float]


def bake(
    denoiser: Denoiser,
    cfg: Config,
    t0: float,
    t1: float,
    rank: int | None = None,
    label: int | None = None,
) -> Baked:
    """The static LoRA of noise levels [t0, t1]: mean dW by module, at rank `rank` (None:
    the numerical rank, exact)."""
    _, prefix = backbone_modules(denoiser)
    w = mean_weights(denoiser, cfg, t0, t1, label)
    modules, errors, biases = {}, {}, {}
    with torch.no_grad():
        for name, layer in lora_layers(denoiser.net.net).items():
            key = name.removeprefix(prefix)
            modules[key], errors[key] = lowrank(layer.get_delta_weight(w[name]).float(), rank)
            db = layer.get_delta_bias(w[name])
            if db is not None:
                biases[key] = float(db.norm())
    return Baked(LoRAWeights(modules, layout="condlora bake"), errors, biases)


def parse_range(text: str) -> tuple[float, float]:
    """'0.0:0.4' -> (0.0, 0.4): 0 <= t0 <= t1 <= 1; CondloraError otherwise."""
    parts = text.split(":")
    try:
        t0, t1 = (float(p) for p in parts)
    except ValueError:
        raise CondloraError(f"--t must be T0:T1 (two numbers in [0, 1]), got {text!r}") from None
    if not 0 <= t0 <= t1 <= 1:
        raise CondloraError(f"--t must satisfy 0 <= T0 <= T1 <= 1, got {text!r}")
    return t0, t1


def segments(t0: float, t1: float, k: int) -> list[tuple[float, float]]:
    """[t0, t1] cut into k equal ranges."""
    if k < 1:
        raise CondloraError(f"--segments must be >= 1, got {k}")
    edges = [t0 + (t1 - t0) * i / k for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def segment_rows(
    ranges: list[tuple[float, float]], ts: list[float], names: list[str]
) -> list[dict[str, float]]:
    """Per sampling step, weight 1 for the segment holding its noise level, 0 for the others
    (all 0 outside the baked range; a level on an edge goes to the lower segment)."""
    rows = []
    for t in ts:
        hit = next((i for i, (lo, hi) in enumerate(ranges) if lo <= t <= hi), None)
        rows.append({n: float(i == hit) for i, n in enumerate(names)})
    return rows


def segment_path(out: Path, k: int, layout: str) -> Path:
    """Where segment k goes in the --out folder: a file, or a folder for peft."""
    return out / (f"segment-{k}" if layout == "peft" else f"segment-{k}.safetensors")


def print_baked(baked: Baked, what: str) -> None:
    """One line per module (rank, relative error of its SVD), and the biases left out."""
    for name, err in baked.errors.items():
        print(f"{what}{name}: rank {baked.weights.modules[name].rank}, relative error {err:.3e}")
    if baked.biases:
        worst = max(baked.biases.values())
        print(
            f"{what}note: {len(baked.biases)} modules' per-basis bias updates (|db| up to "
            f"{worst:.3g}) are left out: a LoRA file holds no bias"
        )


def bake_run(  # noqa: PLR0913 - the command's options, one argument each
    run: Path,
    t_range: tuple[float, float],
    out: Path,
    layout: str,
    rank: int | None = None,
    label: int | None = None,
    num_segments: int = 1,
    prompt: str | None = None,
) -> list[Path]:
    """`condlora lora bake`: one static LoRA of the range, or `num_segments` of its equal
    parts in the folder `out` with a schedule that switches between them at each step of
    the run's sampler (schedule.csv, keyframes.json, diffusers_callback.py)."""
    if rank is not None and rank < 1:
        raise CondloraError(f"--rank must be >= 1, got {rank}")
    ranges = segments(*t_range, num_segments)
    cfg, denoiser = run_at_prompt(run, prompt, label)
    baked = [bake(denoiser, cfg, lo, hi, rank, label) for lo, hi in ranges]
    if num_segments == 1:
        paths = write_lora(baked[0].weights, out, layout)
        print_baked(baked[0], "")
        return paths
    check_output_folder(out, "--out")
    names = [f"segment-{k}" for k in range(num_segments)]
    ts = sampler_times(denoiser, cfg.diffusion.sample_steps)
    rows = segment_rows(ranges, ts, names)
    with undone_on_error(out):
        paths = write_loras(
            [(b.weights, segment_path(out, k, layout)) for k, b in enumerate(baked)], layout
        )
        write_text_atomic(out / "schedule.csv", steps_csv(names, ts, rows))
        write_text_atomic(out / "keyframes.json", steps_keyframes(names, ts, rows))
        write_text_atomic(out / "diffusers_callback.py", steps_callback(names, ts, rows, names))
    for k, ((lo, hi), b) in enumerate(zip(ranges, baked, strict=True)):
        print_baked(b, f"segment {k} (t {lo:.4g}:{hi:.4g}): ")
    return paths


def run_at_prompt(run: Path, prompt: str | None, label: int | None) -> tuple[Config, Denoiser]:
    """(config, denoiser) of a run, a text run's prompt (default "") set as row 0 of its
    table for `conditions`; CondloraError for --prompt on a class run, --label on a text run."""
    cfg, denoiser, _ = load_run(run)
    text = text_encoder(denoiser) is not None
    prompt_labels(denoiser, 1, (prompt or "") if text else prompt, label)
    return cfg, denoiser


LORA_FILE = "condlora_lora.safetensors"  # the run's LoRA for condlora.lora.diffusers_callback


def portable_lora(denoiser: Denoiser) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """(tensors, metadata) of the run's conditional LoRA named as in its backbone's own
    modules (a diffusers U-Net's, without condlora's wrapper), for `load_lora`; None where
    UC-LoRA reads a condition outside them (a text model's pooled prompt embedding)."""
    root, prefix = backbone_modules(denoiser)
    layers = lora_layers(root)
    config = next(iter(layers.values())).state.config
    if config.emb_module is not None and not config.emb_module.startswith(prefix):
        return None
    if config.emb_module is not None:
        config = dataclasses.replace(config, emb_module=config.emb_module.removeprefix(prefix))
    tensors = {k: v.detach() for k, v in lora_state_dict(root).items()}
    return tensors, {CONFIG_KEY: config.to_json(), "format": "pt"}


def schedule_run(  # noqa: PLR0913 - the command's options, one argument each
    run: Path,
    out: Path,
    steps: int | None = None,
    label: int | None = None,
    blocks: bool = False,
    prompt: str | None = None,
) -> list[str]:
    """`condlora lora schedule`: the learned strength of every basis at each sampling step
    (strengths.csv, keyframes.json; per module, or per block averaged over its modules) and
    the LoRA for `condlora.lora.diffusers_callback` (not for a text model's UC-LoRA, whose
    condition holds the pooled prompt embedding that a pipeline's U-Net never sees; its
    strengths are those at `prompt`, default ""). Returns the columns."""
    cfg, denoiser = run_at_prompt(run, prompt, label)
    if cfg.lora.method not in ("time", "uc", "time+class"):
        why = {"none": "no conditional LoRA", "class": "a LoRA that does not change with t "}
        why["class"] += "(`lora bake --label N` writes it as a file)"
        raise CondloraError(
            f"lora schedule reads a TimeLoRA or UC-LoRA run; {run} has lora.method "
            f"{cfg.lora.method}: {why[cfg.lora.method]}"
        )
    if steps is not None and steps < 1:
        raise CondloraError(f"--steps must be >= 1, got {steps}")
    check_output_folder(out, "--out")
    ts = sampler_times(denoiser, steps or cfg.diffusion.sample_steps)
    w = step_weights(denoiser, cfg, ts, label)
    _, prefix = backbone_modules(denoiser)
    groups: dict[str, list[Tensor]] = {}
    for name, values in w.items():
        name = name.removeprefix(prefix)
        groups.setdefault(block_of(name, True) if blocks else name, []).append(values)
    columns = {
        f"{group}:{i}": col
        for group, values in groups.items()
        for i, col in enumerate(torch.stack(values).mean(0).T.tolist())
    }
    rows = [{c: v[k] for c, v in columns.items()} for k in range(len(ts))]
    portable = portable_lora(denoiser)
    with undone_on_error(out):
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "strengths.csv", steps_csv(list(columns), ts, rows))
        write_text_atomic(out / "keyframes.json", steps_keyframes(list(columns), ts, rows))
        if portable is not None:
            write_weights(out / LORA_FILE, *portable)
    return list(columns)
