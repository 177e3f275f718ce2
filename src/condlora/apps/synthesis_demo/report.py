"""The demo's report: the table, the curve against the number of training subjects, the grids."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from condlora.core.images import save_grid
from condlora.core.reporting import plus_minus, provenance_line

Curve = dict[str, list[tuple[int, float, float]]]  # method -> [(training subjects, mean, std)]


def save_subject_grid(rows: list[Tensor], path: str | Path) -> Path:
    """One row of ten digits (0..9) per entry of `rows`, each (10, 1, R, R)."""
    return save_grid(torch.cat(rows), path, nrow=10, scale=4)


def plot_curve(curve: Curve, path: str | Path) -> Path:
    """Normalised subject score against the number of training subjects, one line per method."""
    fig = Figure(figsize=(5.5, 3.8), dpi=110)
    ax = fig.subplots()
    for name, points in curve.items():
        sizes, means, stds = zip(*points, strict=True)
        ax.errorbar(sizes, means, yerr=stds, marker="o", capsize=3, label=name)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1, label="fine-tuned (1)")
    ax.axhline(0.0, color="grey", linestyle=":", linewidth=1, label="no LoRA (0)")
    ax.set_xscale("log")
    sizes = sorted({n for points in curve.values() for n, _, _ in points})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_xlabel("training subjects in the collection")
    ax.set_ylabel("normalised subject score")
    ax.set_title("held-out subjects: LoRA written from the embedding")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _pm(pair: tuple[float, float], spec: str) -> str:
    return plus_minus(*pair, spec)


def table(rows: list[dict]) -> list[str]:
    """The Markdown table of the summary rows."""
    lines = [
        "| method | subject score | normalised subject score | class accuracy "
        "| LoRA MSE (standardised) | s per LoRA | fit (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {_pm(r['subject_score'], '.3f')} | {_pm(r['normalised'], '.2f')} "
            f"| {_pm(tuple(100 * v for v in r['class_accuracy']), '.1f')}% "
            f"| {_pm(r['mse'], '.3f')} | {r['seconds_per_lora'][0]:.2g} "
            f"| {r['fit_seconds'][0]:.1f} |"
        )
    return lines


def curve_table(curve: Curve) -> list[str]:
    """The curve's numbers as a Markdown table (one column per size)."""
    sizes = sorted({n for points in curve.values() for n, _, _ in points})
    lines = ["| method | " + " | ".join(str(n) for n in sizes) + " |"]
    lines.append("| --- |" + " --- |" * len(sizes))
    for name, points in curve.items():
        by_size = {n: f"{m:.2f}" for n, m, _ in points}
        lines.append(f"| {name} | " + " | ".join(by_size.get(n, "") for n in sizes) + " |")
    return lines


# the rows each of the paper's two claims compares (names from generative.py)
LATENT, RAW, ADANORM = "VAE + prior (ADALoRA)", "raw diffusion (ADALoRA)", "VAE + prior (AdaNorm)"


def verdict(better: tuple[float, float], worse: tuple[float, float]) -> str:
    """Does the (mean, std) claimed better beat the other by more than their seeds' spread?"""
    gap, spread = better[0] - worse[0], (better[1] ** 2 + worse[1] ** 2) ** 0.5
    if gap > spread:
        return "**holds here** (ahead by more than the seeds' spread)"
    if gap < -spread:
        return "**does not hold here** (behind by more than the seeds' spread)"
    return "**not separated here** (the difference is within the seeds' spread)"


def claims(rows: list[dict]) -> list[str]:
    """The paper's two claims, as this run's rows show them, each with its verdict from them
    (nothing when a row is missing)."""
    by = {r["method"]: r for r in rows}
    lines = []
    if LATENT in by and RAW in by:
        lat, raw = by[LATENT], by[RAW]
        lines.append(
            f"- *Diffusion on VAE latents beats diffusion on the raw standardised vectors.* "
            f"Subject score {lat['subject_score'][0]:.3f} on latents against "
            f"{raw['subject_score'][0]:.3f} on raw vectors; LoRA MSE to the fine-tuned LoRA "
            f"{lat['mse'][0]:.3f} against {raw['mse'][0]:.3f}. Verdict on the subject score: "
            f"{verdict(lat['subject_score'], raw['subject_score'])}."
        )
    if LATENT in by and ADANORM in by:
        ada, norm = by[LATENT]["subject_score"], by[ADANORM]["subject_score"]
        gain = 100 * (ada[0] / norm[0] - 1) if norm[0] > 0 else float("nan")
        lines.append(
            f"- *ADALoRA conditioning gives about 30% more identity similarity than AdaNorm.* "
            f"Subject score {ada[0]:.3f} with ADALoRA against {norm[0]:.3f} with AdaNorm "
            f"({gain:+.0f}%), the same VAE, prior size and training steps. Verdict: "
            f"{verdict(ada, norm)}."
        )
    return ["## The paper's two claims, in miniature", "", *lines, ""] if lines else []


def _not_representative(info: dict) -> list[str]:
    """A warning paragraph for a demo smaller than the full one (`--quick`, tests)."""
    if info.get("full", True):
        return []
    return [
        f"**Not representative:** a smaller demo than the full one (`--quick`: "
        f"{info['num_train']} training subjects instead of 200, shorter training); its "
        "scores and the order of the methods can differ from the full demo's "
        "(docs/RESULTS.md). Run `condlora synth demo` without `--quick` to compare methods.",
        "",
    ]


def _setting(info: dict) -> list[str]:
    """What the unseen-corner setting holds out (nothing for the box)."""
    if info.get("setting", "box") == "box":
        return []
    thick, slant = info["corner"]
    return [
        f"**Setting unseen-corner:** no training subject has thickness > {thick} together "
        f"with slant > {slant}; every scored subject has both (a combination of two factors "
        "that no training subject shows, though each factor alone is seen across its range).",
        "",
    ]


def _seeds_draw(info: dict) -> str:
    """What each seed of the table draws anew."""
    zoo = (
        " and fine-tunes its own zoo (its own LoRA init and draws of digits and noise)."
        if info.get("redraw_zoo")
        else "; the zoo is fine-tuned once."
    )
    own = f"its own subject encoder, generative models and samples{zoo}"
    if info.get("setting", "box") == "box":
        return (
            "Each seed draws its own split of the subjects into training and test (so its "
            "own collection, with its subjects' noise draws; the validation subjects are "
            f"fixed), {own}"
        )
    return f"The setting fixes the split (the same for every seed); each seed draws {own}"


def _split(info: dict) -> list[str]:
    """Which subjects these scores are of."""
    if info.get("split", "test") == "val":
        return [
            "**Validation split:** these scores are of the validation subjects, for choosing "
            "settings; the test subjects are scored by `--split test`.",
            "",
        ]
    return ["Scored: the test subjects (settings are chosen with `--split val`).", ""]


REFERENCE = "nearest"  # the strongest simple baseline: what a generated LoRA must beat


def paired_table(paired: list[dict], seeds: int) -> list[str]:
    """Each method against the nearest LoRA, subject by subject, with a plain verdict."""
    if not paired:
        return []
    k = paired[0]["subjects"]
    lines = [
        f"## Each method against {REFERENCE}, subject by subject",
        "",
        f"For every seed and every subject it scores (each seed its own split of the "
        f"subjects), the method's subject score minus {REFERENCE}'s on the same subject and "
        f"seed: the mean of these {k} paired differences ({seeds} seeds), its 95% interval "
        "(t), and on how many pairs the method is ahead.",
        "",
        f"| method | difference to {REFERENCE} | 95% interval | ahead on |",
        "| --- | --- | --- | --- |",
    ]
    for r in paired:
        lines.append(
            f"| {r['method']} | {r['mean']:+.3f} | [{r['low']:+.3f}, {r['high']:+.3f}] "
            f"| {r['ahead']} of {r['subjects']} |"
        )
    clear = [r["method"] for r in paired if r["low"] > 0]
    lines += [
        "",
        f"Clearly ahead of {REFERENCE} (95% interval above 0): {', '.join(clear)}."
        if clear
        else f"No method is clearly ahead of {REFERENCE} here: every 95% interval reaches 0 "
        "or lies below it.",
        "",
    ]
    return lines


def _curve_section(curve: Curve, seeds: tuple, file: str) -> list[str]:
    """The curve against the collection's size (nothing when it has one size only)."""
    if len({n for points in curve.values() for n, _, _ in points}) < 2:
        return []
    return [
        "## Normalised subject score against the size of the collection",
        "",
        f"One seed ({seeds[0]}) and one collection per size: unlike the table above "
        f"({len(seeds)} seeds), these points carry no spread, so differences between methods "
        "here may be noise.",
        "",
        f"![curve]({file})",
        "",
        *curve_table(curve),
        "",
    ]


def stage_table(stages: dict[str, str]) -> list[str]:
    """Stage -> time (or how it was reused)."""
    lines = ["| stage | time |", "| --- | --- |"]
    lines += [f"| {name} | {value} |" for name, value in stages.items()]
    return lines


def render_demo_report(
    info: dict,
    rows: list[dict],
    curve: Curve,
    stages: dict[str, str],
    grids: list[tuple[str, str]],
    row_names: list[str],
    paired: list[dict] = (),
) -> str:
    """The whole report.md (figures referenced by their file names in the same folder)."""
    seeds = info["seeds"]
    lines = [
        "# condlora synth demo: LoRAs for new handwriting styles, written from an embedding",
        "",
        provenance_line(),
        "",
        *_not_representative(info),
        f"A *subject* is a handwriting style (stroke width, slant, rotation, scale: "
        f"{info['ranges']}). Zoo: {info['num_train']} training, {info['num_val']} validation "
        f"and {info['num_heldout']} test subjects, one rank-{info['rank']} LoRA each "
        f"({info['lora_numbers']:,} numbers, on {info['targets']}) fine-tuned on the frozen "
        f"digits base model, {info['seconds_per_subject']:.2f} s per subject "
        f"({info['subjects_per_batch']} subjects per batch), each subject with its own "
        "draws of digits and noise. Embeddings: a subject encoder (CNN regressing the style "
        f"factors; cosine of same-style sets {info['encoder_same']:.3f}, of different styles "
        f"{info['encoder_different']:.3f} on average). Each method writes a LoRA from the "
        f"embedding of {info['reference_images']} reference digits of a scored subject; "
        f"{info['samples']} samples per subject are scored against its real held-out digits.",
        "",
        *_setting(info),
        *_split(info),
        f"Mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))}) of the subject-mean "
        f"scores. {_seeds_draw(info)} Real digits in "
        f"the subject's style score {info['real_score']:.3f} (the encoder's ceiling); the "
        "digits judge (trained on styled digits) reads real styled digits at "
        f"{100 * info['judge_real']:.1f}%.",
        "",
        *table(rows),
        "",
        "Subject score: cosine of the encoder's embedding of the samples with that of the "
        "subject's real held-out digits. Normalised: (method - no LoRA) / (fine-tuned - no LoRA). "
        "LoRA MSE: mean squared difference to the fine-tuned LoRA in the collection's "
        "standardised canonical coordinates. s per LoRA: fine-tuned is the zoo's fine-tuning "
        "time per subject; the others time writing the LoRA from the embedding (fit: one-off "
        "training on the collection).",
        "",
        *paired_table(list(paired), len(seeds)),
        *claims(rows),
        *_curve_section(curve, seeds, "curve.png"),
        "## Stage times",
        "",
        *stage_table(stages),
        "",
        "## Samples",
        "",
        f"Rows, top to bottom: {', '.join(row_names)}. Columns: digits 0 to 9 (seed {seeds[0]}).",
        "",
    ]
    for title, file in grids:
        lines += [f"### {title}", "", f"![{title}]({file})", ""]
    return "\n".join(lines)
