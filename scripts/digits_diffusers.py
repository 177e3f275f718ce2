"""The digits on a diffusers UNet2DModel, end to end (issue 20's example), offline on a CPU.

    python scripts/digits_diffusers.py [--out runs/digits-diffusers] [--baseline-steps 3000]
        [--lora-steps 1000] [--num 2000]

1. a random UNet2DModel of about the quickstart net's size (1.11M parameters) and a
   DDPMScheduler, saved by diffusers (`init/`);
2. `condlora train --config configs/diffusers/digits-baseline.yaml` (all its weights),
   `condlora eval` and the baseline written back as a diffusers folder (`baseline-pipe/`);
3. `condlora train --config configs/diffusers/digits-uclora.yaml` (UC-LoRA, frozen U-Net),
   `condlora eval`, `condlora sample --label 3`;
4. `condlora lora bake --t 0.0:0.4 --format diffusers`, loaded back into the baseline's
   U-Net by the two calls of diffusers' `load_lora_weights` (`lora_state_dict`, then
   `load_lora_adapter`; a UNet2DModel pipeline has no `load_lora_weights` of its own), and
   the loaded U-Net's output compared with the run's at t = 0.2.

Each command is printed before it runs; one whose output exists is skipped (a second call
reuses the runs). `results.json` collects the scores and times: `condlora eval`'s (FD against
all real digits) and the quickstart's (FD against the 297 held-out digits over the same FD
of 1,500 real training digits, 1,500 class-cycled samples).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.loaders.peft import PeftAdapterMixin

from condlora.cli import main
from condlora.evaluation.evaluate import digits_classifier
from condlora.image.build import build_data
from condlora.image.generate import generate, labels_for
from condlora.image.task import load_run
from condlora.metrics import digits_metrics

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "diffusers"
QUICKSTART_SAMPLES = 1500  # the quickstart's evaluation: samples per model, against held-out


def make_unet() -> UNet2DModel:
    """A random class-conditional UNet2DModel for 16x16 digits (32, 64, 64 channels)."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
        num_class_embeds=10,
    )


def command(*args: str) -> float:
    """Run one condlora command (printed first); its seconds."""
    print("$ condlora " + " ".join(args), flush=True)
    start = time.time()
    if main(list(args)) != 0:
        raise SystemExit(f"condlora {args[0]} failed")
    return time.time() - start


def quickstart_scores(run: Path, cache: Path) -> dict:
    """The quickstart's measure: 1,500 class-cycled samples against the 297 held-out digits,
    FD divided by the same FD of 1,500 real training digits (apps/quickstart.py)."""
    cfg, denoiser, _ = load_run(run)
    classifier = digits_classifier(cfg, cache)
    (train_x, _), (hold_x, _) = build_data(cfg)
    labels = labels_for(cfg, QUICKSTART_SAMPLES)
    samples = generate(denoiser, cfg, QUICKSTART_SAMPLES, labels, seed=0)
    scores = digits_metrics(classifier, samples, labels, hold_x)
    floor = digits_metrics(classifier, train_x[:QUICKSTART_SAMPLES], None, hold_x)
    ratio = scores["frechet_distance"] / floor["frechet_distance"]
    return {f"quickstart_{k}": v for k, v in scores.items()} | {"quickstart_fd_ratio": ratio}


def train_and_eval(name: str, out: Path, steps: int, num: int, pipe: Path) -> dict:
    """condlora train and eval of one config (each skipped where its output exists), and
    the quickstart's measure; scores and times."""
    config = str(CONFIGS / f"digits-{name}.yaml")
    run, cache = out / name, out / "eval-cache"  # the judge and real statistics, made once
    row: dict = {"steps": steps}
    if not (run / "ema.safetensors").exists():
        row["train_s"] = command("train", "--config", config, "--out", str(run), "--max-steps",
                                 str(steps), "--quiet", f"net.pretrained={pipe}")  # fmt: skip
    if not (run / "metrics.json").exists():
        row["eval_s"] = command("eval", "--run", str(run), "--num", str(num), "--cache", str(cache))
    metrics = json.loads((run / "metrics.json").read_text())
    keys = ("class_accuracy", "fd", "fd_floor_at_eval_sizes", "fd_ratio")
    return row | {k: metrics[k] for k in keys} | quickstart_scores(run, cache)


def write_back(run: Path, folder: Path) -> None:
    """A run's U-Net (EMA weights) and the scheduler as a diffusers pipeline folder."""
    _, denoiser, _ = load_run(run)
    scheduler = DDPMScheduler.from_pretrained(run.parent / "init" / "scheduler")
    DDPMPipeline(unet=denoiser.net.net.unet, scheduler=scheduler).save_pretrained(folder)


def load_back(baked: Path, pipe: Path, run: Path) -> dict:
    """The baked file through diffusers' loaders into the baseline's U-Net; how many modules
    loaded, and the U-Net's output against the UC-LoRA run's at t = 0.2."""
    unet = UNet2DModel.from_pretrained(pipe / "unet")
    unet.__class__ = type("LoRAUNet2DModel", (PeftAdapterMixin, UNet2DModel), {})
    state, alphas, meta = StableDiffusionLoraLoaderMixin.lora_state_dict(
        baked, return_lora_metadata=True
    )
    unet.load_lora_adapter(state, prefix="unet", network_alphas=alphas, metadata=meta)
    loaded = sum(1 for n, _ in unet.named_modules() if n.endswith(".lora_A"))
    _, denoiser, _ = load_run(run)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 16, 16, generator=g), torch.arange(8)
    t = torch.full((8,), 0.2 * 999)
    with torch.no_grad():
        got = unet(x, t, class_labels=y).sample
        want = denoiser.net(x, t, y)
    error = float((got - want).norm() / want.norm())
    return {"factors_in_file": len(state), "lora_modules_loaded": loaded, "rel_error_t0.2": error}


def run_example(out: Path, baseline_steps: int, lora_steps: int, num: int) -> dict:
    """Every step of the example; the results."""
    out.mkdir(parents=True, exist_ok=True)
    init = out / "init"
    if not init.exists():
        DDPMPipeline(unet=make_unet(), scheduler=DDPMScheduler()).save_pretrained(init)
    results = {"baseline": train_and_eval("baseline", out, baseline_steps, num, init)}
    if not (out / "baseline-pipe").exists():
        write_back(out / "baseline", out / "baseline-pipe")
    results["uclora"] = train_and_eval("uclora", out, lora_steps, num, out / "baseline-pipe")
    command("sample", "--run", str(out / "uclora"), "--num", "20", "--label", "3",
            "--out", str(out / "uclora-3.png"))  # fmt: skip
    command("lora", "bake", str(out / "uclora"), "--t", "0.0:0.4", "--format", "diffusers",
            "--out", str(out / "baked"))  # fmt: skip
    results["bake"] = load_back(out / "baked", out / "baseline-pipe", out / "uclora")
    old = out / "results.json"  # times of the steps that an earlier call ran
    if old.exists():
        results = {k: json.loads(old.read_text()).get(k, {}) | v for k, v in results.items()}
    old.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/digits-diffusers", type=Path)
    parser.add_argument("--baseline-steps", type=int, default=3000)
    parser.add_argument("--lora-steps", type=int, default=1000)
    parser.add_argument("--num", type=int, default=2000, help="samples per evaluation")
    args = parser.parse_args()
    print(
        json.dumps(run_example(args.out, args.baseline_steps, args.lora_steps, args.num), indent=1)
    )
