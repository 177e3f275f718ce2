"""The experiment report: mean +- std per variant, sample grids, plots and LoRA diagnostics.

`write_report` takes the runs' results (from `condlora.apps.experiment.runner`), makes the
figures in the output folder (sample grids with `save_grid`, matplotlib PNGs drawn without
pyplot) and writes `report.md` beside them.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from condlora.apps.experiment.spec import Experiment
from condlora.core.files import read_jsonl, write_text_atomic
from condlora.core.images import save_grid
from condlora.core.reporting import fmt, mean_std, provenance_line
from condlora.evaluation.diagnostics import (
    MIX,
    SCALES,
    class_mix_grid,
    class_scale_grid,
    has_class_lora,
    time_similarity,
)
from condlora.image.build import num_classes
from condlora.image.generate import save_sample_grid
from condlora.image.task import load_run


def _mean_by_step(series: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps present in every series, with the mean and std of `key` over the series."""
    common = set.intersection(*(set(r["step"] for r in s) for s in series)) if series else set()
    steps = sorted(common)
    values = [[next(r[key] for r in s if r["step"] == k) for s in series] for k in steps]
    stats = [mean_std(v) for v in values]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def plot_series(
    summary: list[dict], file: str, key: str, ylabel: str, path: Path, floor: float | None = None
) -> Path | None:
    """One line per variant: mean over seeds of `key` in each run's JSON-lines `file` (log y).

    floor: a dashed horizontal line (the real-to-real floor at the same set sizes).
    """
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    drawn = False
    for entry in summary:
        series = [read_jsonl(Path(r["run"]) / file) for r in entry["runs"]]
        steps, mean, std = _mean_by_step([s for s in series if s], key)
        if not steps:
            continue
        drawn = True
        label = entry["variant"]["name"]
        if len(steps) == 1:
            ax.errorbar(steps, mean, yerr=std, fmt="o", capsize=3, label=label)
        else:
            ax.plot(steps, mean, label=label)
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(steps, lo, hi, alpha=0.15)
    if not drawn:
        return None
    if floor is not None:
        ax.axhline(floor, color="black", linestyle="--", linewidth=1, label="real-to-real floor")
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def variant_figures(entry: dict, out: Path, seed: int) -> dict:
    """Sample grid, TimeLoRA similarity per run, ClassLoRA sweeps (first seed's run)."""
    name = entry["variant"]["name"]
    grids = out / "grids"
    figures: dict = {"time_similarity": []}
    for i, run in enumerate(entry["runs"]):
        cfg, denoiser, _ = load_run(run["run"])
        figures["time_similarity"].append(time_similarity(denoiser))
        if i:
            continue
        path = save_sample_grid(denoiser, cfg, grids / f"{name}.png", seed=seed)
        figures["grid"] = path.relative_to(out)
        if has_class_lora(denoiser):
            k = num_classes(cfg)
            for kind, make in (("class-scale", class_scale_grid), ("class-mix", class_mix_grid)):
                images, cols = make(denoiser, cfg, k, seed=seed)
                path = save_grid(images, grids / f"{name}-{kind}.png", nrow=cols)
                figures[kind] = path.relative_to(out)
    return figures


def write_report(exp: Experiment, summary: list[dict], out: Path) -> Path:
    """Make the figures and write `out/report.md`; returns its path."""
    with torch.no_grad():
        figures = {e["variant"]["name"]: variant_figures(e, out, exp.eval.seed) for e in summary}
    points = read_jsonl(Path(summary[0]["runs"][0]["run"]) / "curve.jsonl")
    floor = points[0]["fd_floor_at_eval_sizes"] if points else None
    ylabel = f"FD ({exp.eval.curve_num} samples)"
    plots = {
        "loss": plot_series(summary, "metrics.jsonl", "loss", "training loss", out / "loss.png"),
        "curve": plot_series(summary, "curve.jsonl", "fd", ylabel, out / "fd.png", floor),
    }
    path = out / "report.md"
    write_text_atomic(path, render_experiment_report(exp, summary, figures, plots))
    return path


def _setup(exp: Experiment, summary: list[dict]) -> list[str]:
    m = summary[0]["runs"][0]["metrics"]
    h1, h2 = m["fd_floor_sizes"]
    e = exp.eval
    pins = "; every variant with " + " ".join(f"`{o}`" for o in exp.overrides)
    pins = pins if exp.overrides else ""
    return [
        f"# Experiment `{exp.name}`",
        "",
        *([exp.description.strip(), ""] if exp.description else []),
        f"{len(summary)} variants x {len(exp.seeds)} seeds ({', '.join(map(str, exp.seeds))}), "
        f"{exp.steps} training steps each (`{exp.file}`{pins}). Each run is scored on "
        f"{m['num_samples']} samples ({m['sampler']} sampler, {m['steps']} steps, sampling seed "
        f"{m['seed']}, EMA weights) against {m['num_real']} real images, on {e.feature} "
        f"features: {m['metric']}.",
        "",
        f"Real-to-real floor: FD {m['fd_floor']:.3f} ± {m['fd_floor_std']:.3f} between random "
        f"disjoint halves ({h1} vs {h2}, {m['fd_floor_splits']} splits); FD's bias shrinks "
        f"about like 1/N, so at {m['num_samples']} vs {m['num_real']} the floor is "
        f"~{m['fd_floor_at_eval_sizes']:.3f} (an estimate; samples less diverse than the real "
        f"data can score below it). KID between the halves: {m['kid_floor_mean'] * 1e3:.3f} "
        f"x 1e-3 (KID is unbiased: its floor is 0 up to noise).",
        "",
    ]


def _table(summary: list[dict]) -> list[str]:
    lines = [
        "Mean ± std over seeds (sample std). FD / floor divides by the estimated floor at the "
        "evaluation sizes. Train time: seconds of training per run, as measured when it trained.",
        "",
        "| variant | config + overrides | parameters | LoRA parameters | FD | FD / floor "
        "| KID x 1e3 | class accuracy % | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary:
        v, p, runs = e["variant"], e["parameters"], e["runs"]
        ms = [r["metrics"] for r in runs]
        setting = f"`{Path(v['config']).name}` {' '.join(v['overrides'])}".strip()
        lines.append(
            f"| {v['name']} | {setting} | {p['parameters']:,} | {p['lora parameters']:,} "
            f"| {fmt(m['fd'] for m in ms)} | {fmt((m['fd_ratio'] for m in ms), 2)} "
            f"| {fmt((m['kid_mean'] for m in ms), 3, 1e3)} "
            f"| {fmt((m['class_accuracy'] for m in ms), 1, 100)} "
            f"| {fmt((r.get('train_seconds') for r in runs), 0)} |"
        )
    return [*lines, ""]


def _diagnostics(summary: list[dict], figures: dict) -> list[str]:
    lines = []
    timed = [(e, figures[e["variant"]["name"]]["time_similarity"]) for e in summary]
    timed = [(e, sims) for e, sims in timed if any(s is not None for s in sims)]
    if timed:
        lines += [
            "## TimeLoRA: cosine similarity of neighbouring timesteps",
            "",
            "Cosine similarity between the composition weights w(t_k) and w(t_k+1) of the "
            "learned table, mean over rows averaged over adapted layers, and the minimum over "
            "every row of every layer; mean ± std over seeds. The hat-function initialisation "
            'gives the "at init" columns; change is |table - initial table| / |initial table|.',
            "",
            "| variant | layers | mean | min | mean at init | min at init | change |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e, sims in timed:
            sims = [s for s in sims if s is not None]
            lines.append(
                f"| {e['variant']['name']} | {sims[0]['layers']} "
                f"| {fmt((s['mean'] for s in sims), 4)} | {fmt((s['min'] for s in sims), 4)} "
                f"| {sims[0]['init_mean']:.4f} | {sims[0]['init_min']:.4f} "
                f"| {fmt((s['change'] for s in sims), 3)} |"
            )
        lines.append("")
    for e in summary:
        f = figures[e["variant"]["name"]]
        if "class-scale" not in f:
            continue
        name = e["variant"]["name"]
        lines += [
            f"## ClassLoRA: {name} (seed {e['runs'][0]['seed']})",
            "",
            f"Class weights y = s * onehot(k), row k = class k, s = {SCALES[0]:g} to "
            f"{SCALES[-1]:g} in steps of {SCALES[1]:g} (s = 1 is what training saw; s > 1 "
            "extrapolates). Same starting noise along a row.",
            "",
            f"![{name} class scale]({f['class-scale'].as_posix()})",
            "",
            f"y = (1 - a) onehot(k) + a onehot(k + 1), a = {MIX[0]:g} to {MIX[-1]:g} in steps of "
            f"{MIX[1]:g}.",
            "",
            f"![{name} class mix]({f['class-mix'].as_posix()})",
            "",
        ]
    return lines


def render_experiment_report(
    exp: Experiment, summary: list[dict], figures: dict, plots: dict
) -> str:
    """The Markdown text of the report."""
    head, *setup = _setup(exp, summary)
    lines = [head, "", provenance_line(), *setup, *_table(summary)]
    lines += ["## Training loss", ""]
    lines += [f"![loss]({plots['loss'].name})" if plots["loss"] else "No loss log found.", ""]
    lines += ["## FD vs training step", ""]
    if plots["curve"]:
        lines += [
            f"FD of {exp.eval.curve_num} samples from the EMA weights at every "
            f"{exp.eval.every} steps (mean ± std over seeds; its floor is higher than the "
            "table's, which uses more samples).",
            "",
            f"![FD vs step]({plots['curve'].name})",
            "",
        ]
    else:
        lines += ["Not measured: set eval.every > 0 for intermediate points.", ""]
    lines += _diagnostics(summary, figures)
    lines += [
        "## Samples",
        "",
        "First seed's run, EMA weights; one row per class (class-conditional variants).",
        "",
    ]
    for e in summary:
        name = e["variant"]["name"]
        lines += [f"### {name}", "", f"![{name}]({figures[name]['grid'].as_posix()})", ""]
    return "\n".join(lines)
