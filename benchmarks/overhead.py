"""What conditional LoRA costs: training step time and peak memory, sampling-call time.

For every digits config and for the paper's CIFAR-10 networks (EDM DDPM++ with UC-LoRA,
IDDPM with TimeLoRA + ClassLoRA), each LoRA config is built next to its network's
scale-and-shift baseline and all are measured side by side in one process: rounds
interleave the configurations, times are medians over the repeats after warm-up, and
every ratio is to the baseline of the same network in the same run.

- train step: forward, backward, gradient clipping, fused AdamW, EMA update (as
  `condlora train` runs it), with per-sample noise levels and classes. The model is put in
  training or sampling mode only when it is not in it (a walk over every module, which
  the loop and `generate` do once, not per step or call).
- peak memory of a train step: parameters, optimizer state and EMA copy, plus the peak of
  what the step allocates (CPU: the profiler's allocation record; GPU: the allocator's peak).
- sampling call: one denoiser call in sampling mode (eval, no gradients) at one noise
  level, with per-sample classes (0, 1, 2, ...) and class-grouped (one class for the
  whole batch, as `generate` batches them: the LoRA layers merge); three times as many
  rounds as the train step.

    python benchmarks/overhead.py [--nets digits,edm,iddpm] [--device cpu|cuda] [--smoke]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from timing import interleaved, machine, peak_step_bytes, print_json, print_table, tensor_bytes

from condlora.image.build import build_denoiser, image_channels, num_classes
from condlora.image.config import load_config
from condlora.train.checkpoint import EMA
from condlora.train.loop import adamw

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# network -> {method: config}; the first entry of each is its baseline
NETS = {
    "digits": {
        "baseline": "digits-baseline",
        "time": "digits-timelora",
        "time+class": "digits-classlora",
        "uc": "digits-uclora",
        "uc, only LoRA": "digits-onlylora",
    },
    "edm": {
        "baseline": "cifar10-edm-cond-baseline",
        "uc": "cifar10-edm-cond-lora",
        "uc, only LoRA": "cifar10-edm-cond-onlylora",
    },
    "iddpm": {
        "baseline": "cifar10-iddpm-cond-baseline",
        "time+class": "cifar10-iddpm-cond-lora",
        "time+class, only LoRA": "cifar10-iddpm-cond-onlylora",
    },
}
SAMPLE_ROUNDS = 3  # sampling calls cost about a third of a train step: 3x the rounds
NET_TITLES = {"digits": "digits U-Net", "edm": "EDM DDPM++", "iddpm": "IDDPM (ADM)"}
# --smoke: every network shrunk to seconds (the test suite runs this)
SMOKE = {
    "digits": ["net.model_channels=8", "net.channel_mult=[1, 2]", "net.num_blocks=1"],
    "edm": ["net.model_channels=16", "net.num_blocks=1", "net.channel_mult=[1, 2]"]
    + ["lora.mlp_widths=[16, 8]", "lora.mlp_groups=4"],
    "iddpm": ["net.model_channels=32", "net.num_blocks=1", "net.channel_mult=[1, 2]"],
}


@dataclass
class Case:
    """One built configuration and the calls that are timed."""

    parameters: int
    static_bytes: int  # parameters, optimizer state, EMA copy
    train: object  # () -> None
    sample_per_sample: object
    sample_grouped: object


def build_case(config: str, overrides: list[str], batch: int, device: str) -> Case:
    """A config's denoiser with its optimizer, EMA and inputs, as timed calls."""
    cfg = load_config(CONFIGS / f"{config}.yaml", overrides)
    torch.manual_seed(0)
    model = build_denoiser(cfg).to(device).to(memory_format=torch.channels_last)
    params = list(model.parameters())
    opt, ema = adamw(params, lr=1e-4, weight_decay=0.0), EMA(model, 0.999)
    res, classes = cfg.data.resolution, num_classes(cfg)
    x = torch.rand(batch, image_channels(cfg), res, res, device=device) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last)
    labels = {"per_sample": None, "grouped": None}
    if classes:
        labels["per_sample"] = torch.arange(batch, device=device) % classes
        labels["grouped"] = torch.full((batch,), 3 % classes, device=device)
    extra = {}
    if cfg.net.augment_dim:
        extra["augment_labels"] = torch.zeros(batch, cfg.net.augment_dim, device=device)
    step = [0]

    def train() -> None:
        if not model.training:  # once per series, as the loop and `generate` switch modes
            model.train()
        model.loss(x, class_labels=labels["per_sample"], **extra).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step[0] += 1
        ema.update(model, step[0])

    def sampler(kind: str):  # noqa: ANN202
        @torch.no_grad()
        def call() -> None:
            if model.training:
                model.eval()
            model(x, 1.0, class_labels=labels[kind])

        return call

    train()  # creates the optimizer state, so the static memory is complete
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    static = tensor_bytes(params + state + list(ema.model.parameters()))
    return Case(
        sum(p.numel() for p in params),
        static,
        train,
        sampler("per_sample"),
        sampler("grouped"),
    )


def measure_net(net: str, args: argparse.Namespace) -> dict:
    """All configs of one network, measured side by side; ratios to its baseline."""
    smoke = args.smoke
    paper = net != "digits"
    batch = 2 if smoke else (args.paper_batch if paper else args.batch)
    overrides = SMOKE[net] if smoke else []
    cases = {m: build_case(c, overrides, batch, args.device) for m, c in NETS[net].items()}
    warmup = 0 if smoke else args.warmup
    repeats = 1 if smoke else (args.paper_repeats if paper else args.repeats)
    clock = args.clock if args.device == "cpu" else "wall"
    timed = {}
    for kind in ("train", "sample_grouped", "sample_per_sample"):
        fns = {m: getattr(case, kind) for m, case in cases.items()}
        rounds = repeats if kind == "train" or smoke else SAMPLE_ROUNDS * repeats
        timed[kind] = interleaved(fns, warmup, rounds, args.device, clock)
    rows = {}
    for method, case in cases.items():
        memory = case.static_bytes + peak_step_bytes(case.train, args.device)
        rows[method] = {
            "parameters": case.parameters,
            "train_ms": 1000 * timed["train"][method],
            "train_memory_mib": memory / 2**20,
            "sampling_ms": 1000 * timed["sample_grouped"][method],
            "sampling_per_sample_ms": 1000 * timed["sample_per_sample"][method],
        }
    base = rows["baseline"]
    for row in rows.values():
        row["param_ratio"] = row["parameters"] / base["parameters"]  # memory's yardstick
        row["train_time_ratio"] = row["train_ms"] / base["train_ms"]
        row["train_memory_ratio"] = row["train_memory_mib"] / base["train_memory_mib"]
        row["sampling_time_ratio"] = row["sampling_ms"] / base["sampling_ms"]
        row["sampling_per_sample_time_ratio"] = (
            row["sampling_per_sample_ms"] / base["sampling_per_sample_ms"]
        )
    return {"batch": batch, "configs": NETS[net], "methods": rows}


def print_net(net: str, result: dict) -> None:
    """One network's table."""
    print(f"\n{NET_TITLES[net]}, batch {result['batch']}")
    header = ["method", "parameters", "param_ratio", "train step (ms)", "x base"]
    header += [
        "train memory (MiB)",
        "x base",
        "sampling, class-grouped (ms)",
        "x base",
        "per-sample classes (ms)",
    ]
    header += ["x base"]
    rows = []
    for method, r in result["methods"].items():
        rows.append(
            [
                method,
                f"{r['parameters']:,}",
                f"{r['param_ratio']:.3f}",
                f"{r['train_ms']:.1f}",
                f"{r['train_time_ratio']:.3f}",
                f"{r['train_memory_mib']:.1f}",
                f"{r['train_memory_ratio']:.3f}",
                f"{r['sampling_ms']:.1f}",
                f"{r['sampling_time_ratio']:.3f}",
                f"{r['sampling_per_sample_ms']:.1f}",
                f"{r['sampling_per_sample_time_ratio']:.3f}",
            ]
        )
    print_table(header, rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="digits,edm,iddpm", help="digits, edm, iddpm")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--batch", type=int, default=64, help="digits batch")
    parser.add_argument("--paper-batch", type=int, default=2, help="EDM / IDDPM batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds")
    parser.add_argument("--repeats", type=int, default=15, help="timed train rounds (digits)")
    parser.add_argument("--paper-repeats", type=int, default=3, help="timed train rounds (paper)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--smoke", action="store_true", help="tiny networks, one round")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Measure the chosen networks, print a table each and one JSON line."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = sorted(set(nets) - set(NETS))
    if unknown:
        raise SystemExit(f"unknown --nets {unknown}; valid: {', '.join(NETS)}")
    info = machine(args.device) | {"clock": args.clock, "smoke": args.smoke}
    print(" ".join(f"{k}={v}" for k, v in info.items()))
    results = {}
    for net in nets:
        results[net] = measure_net(net, args)
        print_net(net, results[net])
    print_json("overhead", info, results)


if __name__ == "__main__":
    main()
