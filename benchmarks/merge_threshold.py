"""When is the merged weight W + dW cheaper than the low-rank path? The rule's measurement.

One wrapped Linear (TimeLoRA, no gradients, one condition for the batch) is called on a
grid of widths, bases x rank (m*r) and positions per call, once on each path (the layer's
`merge_pays` forced true, then false); rounds interleave the two, times are medians. The
table shows both times, the faster path and the path the rule picks; the summary gives,
for each overhead c of `positions * (d_in + d_out) + c >= d_in * d_out`, the cells where
it picks the faster path (condlora uses MERGE_OVERHEAD, the low-rank path's small ops in
multiply-adds).

    python benchmarks/merge_threshold.py [--threads 1] [--repeats 200] [--smoke]
"""

from __future__ import annotations

import argparse

import torch
from timing import interleaved, machine, print_json, print_table
from torch import nn

import condlora.lora.layer as layer_module
from condlora.lora import LoRAConfig, conditioning, inject

# (width, m, r) -> positions per call; m*r = 32 and 72 as the digits and CIFAR-10 configs
GRID = {
    (64, 8, 4): (4, 16, 64, 256, 1024),
    (128, 8, 4): (4, 16, 64, 256),
    (256, 18, 4): (4, 16, 32, 64, 1024),
    (512, 18, 4): (4, 32, 64, 128, 256),
}
SMOKE_GRID = {(16, 2, 2): (1, 64)}
OVERHEADS = (0, 12_500, 25_000, 50_000, 100_000)


def measure(width: int, m: int, r: int, positions: int, args: argparse.Namespace) -> dict:
    """Median microseconds of one call on the merged and on the low-rank path."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width))
    inject(model, LoRAConfig(method="time", rank=r, num_bases=m, targets=["0"]))
    x = torch.randn(1, positions, width)
    real = layer_module.merge_pays

    def path(merged: bool):  # noqa: ANN202
        def call() -> None:
            layer_module.merge_pays = lambda *a: merged
            try:
                with torch.no_grad(), conditioning(model, t=0.5):
                    model(x)
            finally:
                layer_module.merge_pays = real

        return call

    times = interleaved({"merged": path(True), "lowrank": path(False)}, 5, args.repeats)
    return {k: v * 1e6 for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    """Measure the grid; print the table, the agreement of each fraction, and JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="one tiny cell (a check)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid = SMOKE_GRID if args.smoke else GRID
    args.repeats = 3 if args.smoke else args.repeats
    cells = []
    for (width, m, r), positions_list in grid.items():
        for positions in positions_list:
            t = measure(width, m, r, positions, args)
            faster = "merged" if t["merged"] <= t["lowrank"] else "low-rank"
            cells.append({"width": width, "mr": m * r, "positions": positions, **t})
            cells[-1]["faster"] = faster
    rule = layer_module.MERGE_OVERHEAD
    agree = {}
    for k in OVERHEADS:
        picks = [c["positions"] * 2 * c["width"] + k >= c["width"] ** 2 for c in cells]
        agree[k] = sum(p == (c["faster"] == "merged") for p, c in zip(picks, cells, strict=True))
    rows = []
    for c in cells:
        picked = (
            "merged"
            if layer_module.merge_pays(c["positions"], c["width"], c["width"])
            else ("low-rank")
        )
        rows.append(
            [f"{c['width']}, {c['mr']}", str(c["positions"]), f"{c['merged']:.0f}"]
            + [f"{c['lowrank']:.0f}", c["faster"], picked]
        )
    print(f"{args.threads} thread(s), medians of {args.repeats} interleaved calls")
    print(", ".join(f"c={k}: {n}/{len(cells)} cells" for k, n in agree.items()))
    print(f"condlora's rule: c = {rule}, the faster path in {agree.get(rule, 0)}/{len(cells)}")
    print_table(["width, m*r", "positions", "merged (us)", "low-rank (us)", "faster", "rule"], rows)
    info = machine("cpu") | {"smoke": args.smoke, "rule_overhead": rule}
    print_json("merge_threshold", info, {"cells": cells, "agreement": agree})


if __name__ == "__main__":
    main()
