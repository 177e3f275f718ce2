"""Training steps at the paper's size: the VAE and the latent prior of a synthesis config
(default configs/synthesis/w2w-sd15.yaml: 99,648 numbers per LoRA, latent 512, 512-d
embeddings), on synthetic data, plus the time to generate one LoRA from an embedding.

Each step is the loop's own work: loss forward, backward, gradient clipping, fused AdamW.
Prints a table and one JSON line.

    python benchmarks/synthesis_scale.py [--device cuda] [--batch 8] [--steps 3] [--smoke]

--smoke shrinks the config to a few hundred numbers per LoRA (the test suite's check).

    python benchmarks/synthesis_scale.py --collection [--rows 65000] [--dim 99648] [--file F]

--collection: larger than memory. Writes a synthetic rows x dim float16 collection to disk
(13 GB at the paper's size; a temporary file, deleted afterwards unless --keep), runs
`synth collect`'s streaming statistics over it, then trains the VAE and the prior for
--train-steps steps each from random rows of the file (a DataLoader worker, prefetching)
alternating with the same training from --memory-rows rows held in memory; prints peak
RSS / PSS per phase, steps/s, read MB/s and the file / memory throughput ratio.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from timing import machine, print_json, print_table

from condlora.diffusion import EmbeddingGuidedDenoiser, sample
from condlora.synthesis.bigfile import StreamWriter, read_header
from condlora.synthesis.collection import RunningStats
from condlora.synthesis.config import load_synth_config, resolve
from condlora.synthesis.model import LoRAVAE, build_prior
from condlora.synthesis.training import PriorLoss, VAELoss
from condlora.train.loop import adamw

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "synthesis" / "w2w-sd15.yaml"
SMOKE = ["dim=96", "cond_dim=8", "vae.latent=8", "vae.hidden=16", "prior.net.width=16"]
SMOKE += ["prior.net.depth=1", "prior.net.cond_width=8", "prior.steps=2"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, steps: int, device: str) -> float:
    """Median seconds of fn() over `steps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def stepper(loss_fn, device: str, bf16: bool):
    """step(batch): one optimizer step of a loss module, the loop's own work (loss forward,
    backward, gradient clipping, fused AdamW)."""
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    opt = adamw(params, 1e-4, 0.0)

    def step(batch: dict) -> None:
        with torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16):
            loss = loss_fn(**batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_step_time(loss_fn, batch: dict, steps: int, device: str, bf16: bool) -> float:
    """Seconds per optimizer step of a loss module on a fixed batch."""
    step = stepper(loss_fn, device, bf16)
    return timed(lambda: step(batch), steps, device)


def peak_memory_gib(device: str) -> float:
    """Peak accelerator memory, or the process's peak resident memory on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure(args: argparse.Namespace) -> list[dict]:
    """Seconds per VAE and prior training step and per generated LoRA."""
    cfg = resolve(load_synth_config(args.config, SMOKE if args.smoke else []))
    d, e, device = cfg.dim, cfg.cond_dim, args.device
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, d, generator=g).to(device)
    emb = torch.nn.functional.normalize(torch.randn(args.batch, e, generator=g), dim=1).to(device)
    drop = (torch.rand(args.batch, generator=g) < cfg.prior.cond_dropout).to(device)
    rows = []
    torch.manual_seed(0)
    vae = LoRAVAE(cfg.vae).to(device)
    seconds = train_step_time(VAELoss(vae), {"x": x}, args.steps, device, args.bf16)
    rows.append(
        {
            "part": "VAE train step",
            "parameters": sum(p.numel() for p in vae.parameters()),
            "seconds": seconds,
            "samples_per_s": args.batch / seconds,
        }
    )
    prior = build_prior(cfg.prior).to(device)
    z = torch.randn(args.batch, cfg.prior.net.dim, generator=g).to(device)
    batch = {"x0": z, "embedding": emb, "drop": drop}
    seconds = train_step_time(PriorLoss(prior), batch, args.steps, device, args.bf16)
    rows.append(
        {
            "part": "prior train step",
            "parameters": sum(p.numel() for p in prior.parameters()),
            "seconds": seconds,
            "samples_per_s": args.batch / seconds,
        }
    )
    vae.eval()
    prior.eval()
    guided = EmbeddingGuidedDenoiser(prior, cfg.prior.guidance)

    @torch.no_grad()
    def generate_one() -> None:
        shape = (1, cfg.prior.net.dim)
        latent = sample(
            guided, shape, cfg.prior.sampler, cfg.prior.steps, device=device, embedding=emb[:1]
        )
        vae.decode(latent)

    seconds = timed(generate_one, args.steps, device)
    rows.append(
        {
            "part": f"generate 1 LoRA ({cfg.prior.steps} {cfg.prior.sampler} steps, CFG)",
            "parameters": 0,
            "seconds": seconds,
            "samples_per_s": 1 / seconds,
        }
    )
    return rows


# ---------------------------------------------------------------- --collection: larger than memory

COLLECTION_FORMAT = "condlora.benchmark_collection"  # one float16 tensor "vectors" [N, D]
PIECE_BYTES = 64 << 20  # written and read in pieces of this size


class MemoryMonitor:
    """Peak memory per phase, sampled in a thread: the main process's RSS, and the PSS of it
    and its children (the loader's workers), which counts pages shared after fork once."""

    def __init__(self, every: float = 0.2) -> None:
        self.phase, self.every, self.peaks = "setup", every, {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(self.every):
            self.sample()

    def sample(self) -> None:
        """Fold the current RSS and tree PSS (GiB) into the current phase's peaks."""
        me = os.getpid()
        rss = proc_kib(me, "status", "VmRSS:")
        pss = sum(proc_kib(pid, "smaps_rollup", "Pss:") for pid in [me, *children(me)])
        old = self.peaks.get(self.phase, (0.0, 0.0))
        self.peaks[self.phase] = (max(old[0], rss / 2**20), max(old[1], pss / 2**20))

    def enter(self, phase: str) -> None:
        """Start a phase (the previous one gets a last sample)."""
        self.sample()
        self.phase = phase

    def stop(self) -> dict:
        """{phase: {"rss_gib", "pss_gib"}} after a last sample."""
        self.sample()
        self.done.set()
        return {k: {"rss_gib": v[0], "pss_gib": v[1]} for k, v in self.peaks.items()}


def proc_kib(pid: int, name: str, key: str) -> int:
    """A kB figure of /proc/PID/NAME (0 when the process has gone)."""
    try:
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def children(pid: int) -> list[int]:
    """The process's child ids (/proc/PID/task/*/children)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in task.read_text().split()]
        except OSError:
            continue
    return out


def evict(path: Path) -> None:
    """Flush a file and drop it from the page cache, so that its next reads come from disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_collection(path: Path, rows: int, dim: int, seed: int) -> None:
    """A synthetic N x D float16 collection: row = mean + scale * standard normal (mean and
    scale per coordinate, drawn once), written in pieces by the library's StreamWriter."""
    g = torch.Generator().manual_seed(seed)
    mean, scale = 0.1 * torch.randn(dim, generator=g), 0.5 + torch.rand(dim, generator=g)
    piece = max(1, PIECE_BYTES // (2 * dim))
    meta = {"format": COLLECTION_FORMAT}
    with StreamWriter(path, [("vectors", (rows, dim))], meta, np.float16) as writer:
        for first in range(0, rows, piece):
            x = torch.randn(min(piece, rows - first), dim, generator=g)
            writer.write(x.mul_(scale).add_(mean).half().numpy())


def open_collection(path: Path) -> tuple[int, int, int]:
    """(byte offset of row 0, rows, dim) of write_collection's file."""
    metadata, entries, start = read_header(path)
    entry = entries.get("vectors")
    if metadata.get("format") != COLLECTION_FORMAT or not entry or entry["dtype"] != "F16":
        raise SystemExit(f"{path} is not a collection of this benchmark")
    rows, dim = entry["shape"]
    return start + entry["data_offsets"][0], rows, dim


def collection_stats(path: Path, start: int, rows: int, dim: int) -> RunningStats:
    """`synth collect`'s streaming statistics (RunningStats) over the file, read in pieces
    with plain reads into one buffer: the process holds one piece, not the file."""
    piece = max(1, PIECE_BYTES // (2 * dim))
    buffer = np.empty((piece, dim), dtype=np.float16)
    stats = RunningStats(dim)
    with open(path, "rb") as f:
        f.seek(start)
        for first in range(0, rows, piece):
            part = buffer[: min(piece, rows - first)]
            if f.readinto(memoryview(part).cast("B")) != part.nbytes:
                raise SystemExit(f"{path}: the file ends before row {rows}")
            stats.update(part)
    return stats


class RowBatches(torch.utils.data.Dataset):
    """Item k: `batch` random rows (drawn with seed (seed, k)) among the first `rows` rows of
    the collection, as float32 (B, D), and the seconds that reading them took. From the file
    by positioned reads (os.pread: the page cache keeps what the disk gave, the process only
    the batch), or from `memory`, the rows held in memory as float16."""

    def __init__(self, path, start, rows, dim, batch, count, seed, memory=None) -> None:
        self.path, self.start, self.rows, self.dim = path, start, rows, dim
        self.batch, self.count, self.seed, self.memory = batch, count, seed, memory
        self.fd = None  # opened in the process that reads (a loader worker)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, k: int):
        idx = np.random.default_rng([self.seed, k]).choice(self.rows, self.batch, replace=False)
        begin = time.perf_counter()
        if self.memory is not None:
            x = self.memory[np.sort(idx)]
        else:
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDONLY)
            size = 2 * self.dim
            reads = [os.pread(self.fd, size, self.start + i * size) for i in np.sort(idx)]
            x = np.stack([np.frombuffer(r, dtype=np.float16) for r in reads])
        return torch.from_numpy(x.astype(np.float32)), time.perf_counter() - begin


def batches(dataset: RowBatches, workers: int):
    """An iterator over the dataset's batches: a DataLoader with `workers` processes, each
    prefetching 4 batches (workers 0: read in the main process, when asked)."""
    if workers == 0:
        return (dataset[k] for k in range(len(dataset)))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers, prefetch_factor=4
    )
    return iter(loader)


def compare(step, prepare, sources: dict, steps: int) -> dict:
    """Train from each source in turn, one step each per round (a slow phase of a shared
    machine hits both alike); the first round warms up. Per source: steps/s counting the
    wait for the batch, and the seconds its reads took."""
    spent, read = dict.fromkeys(sources, 0.0), dict.fromkeys(sources, 0.0)
    for round_ in range(steps + 1):
        for name, source in sources.items():
            begin = time.perf_counter()
            x, seconds = next(source)
            step(prepare(x))
            if round_:
                spent[name] += time.perf_counter() - begin
                read[name] += seconds
    return {n: {"steps_per_s": steps / spent[n], "read_seconds": read[n]} for n in sources}


def measure_collection(args: argparse.Namespace, path: Path) -> dict:
    """Write the collection, its statistics, then VAE and prior training from the file and
    from memory; seconds, rates and the peak memory of each phase."""
    monitor, out = MemoryMonitor(), {}
    monitor.enter("write")
    begin = time.perf_counter()
    write_collection(path, args.rows, args.dim, seed=0)
    evict(path)
    out["write_seconds"] = time.perf_counter() - begin
    start, rows, dim = open_collection(path)
    size = rows * dim * 2
    out["file_bytes"] = path.stat().st_size
    monitor.enter("collect")
    begin = time.perf_counter()
    stats = collection_stats(path, start, rows, dim)
    out["collect_seconds"] = time.perf_counter() - begin
    out["collect_read_mb_s"] = size / out["collect_seconds"] / 1e6
    mean, std = torch.from_numpy(stats.mean).float(), torch.from_numpy(stats.std()).float()
    out["stats"] = {"mean": stats.mean, "std": stats.std()}
    evict(path)
    monitor.enter("train")
    # the loaders' workers fork now, while this process is small: forked later, every page
    # of the model that a step writes would be copied while they live
    common = (path, start, rows, dim, args.batch, args.train_steps + 1)
    file_vae = batches(RowBatches(*common, seed=1), args.workers)
    file_prior = batches(RowBatches(*common, seed=2), args.workers)
    held = min(args.memory_rows, rows)
    memory = np.empty((held, dim), dtype=np.float16)  # the first rows, read once
    with open(path, "rb") as f:
        f.seek(start)
        f.readinto(memoryview(memory).cast("B"))
    in_memory = (path, start, held, dim, args.batch, args.train_steps + 1)
    cfg = resolve(load_synth_config(args.config, [*(SMOKE if args.smoke else []), f"dim={dim}"]))
    torch.manual_seed(0)
    vae = LoRAVAE(cfg.vae)
    step = stepper(VAELoss(vae), "cpu", False)
    sources = {"file": file_vae, "memory": batches(RowBatches(*in_memory, 3, memory), 0)}
    out["vae"] = compare(step, lambda x: {"x": (x - mean) / std}, sources, args.train_steps)
    del step  # the VAE's optimizer state and gradients go; its weights encode for the prior
    vae.zero_grad(set_to_none=True)
    vae.eval()
    prior = build_prior(cfg.prior)
    g = torch.Generator().manual_seed(4)

    def prior_batch(x: torch.Tensor) -> dict:
        with torch.no_grad():
            z = vae.encode((x - mean) / std)[0]
        e = torch.nn.functional.normalize(torch.randn(len(x), cfg.cond_dim, generator=g), dim=1)
        drop = torch.rand(len(x), generator=g) < cfg.prior.cond_dropout
        return {"x0": z, "embedding": e, "drop": drop}

    step = stepper(PriorLoss(prior), "cpu", False)
    sources = {"file": file_prior, "memory": batches(RowBatches(*in_memory, 5, memory), 0)}
    out["prior"] = compare(step, prior_batch, sources, args.train_steps)
    out["memory"] = monitor.stop()
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    out["rows"], out["dim"], out["memory_rows"] = rows, dim, held
    return out


def report_collection(args: argparse.Namespace, r: dict) -> None:
    """The collection run as a table, peak memory lines and one JSON line."""
    gb = r["file_bytes"] / 1e9
    print(f"collection {r['rows']:,} x {r['dim']:,} float16 ({gb:.2f} GB), batch {args.batch}")
    print("load average (1, 5, 15 min): " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
    table = [
        ["write", f"{r['write_seconds']:.1f}", f"{gb * 1e3 / r['write_seconds']:.0f} written"],
        ["collect stats", f"{r['collect_seconds']:.1f}", f"{r['collect_read_mb_s']:.0f} read"],
    ]
    batch_bytes = args.batch * 2 * r["dim"]
    for part in ("vae", "prior"):
        f, m = r[part]["file"], r[part]["memory"]
        mb_s = args.train_steps * batch_bytes / max(f["read_seconds"], 1e-9) / 1e6
        table.append(
            [f"{part}: from the file", f"{f['steps_per_s']:.3f} steps/s", f"{mb_s:.0f} read"]
        )
        ratio = f"{f['steps_per_s'] / m['steps_per_s']:.2f}x"
        table.append([f"{part}: in memory", f"{m['steps_per_s']:.3f} steps/s", f"file: {ratio}"])
    for phase, peak in r["memory"].items():
        rss, pss = peak["rss_gib"], peak["pss_gib"]
        print(f"peak memory, {phase}: RSS {rss:.2f} GiB, PSS with the workers {pss:.2f} GiB")
    print(f"peak RSS of the main process, whole run (kernel): {r['peak_rss_gib']:.2f} GiB")
    print_table(["phase", "s (or steps/s)", "MB/s (or file / memory)"], table)
    info = machine("cpu") | {"rows": r["rows"], "dim": r["dim"], "batch": args.batch}
    info |= {"workers": args.workers, "train_steps": args.train_steps, "smoke": args.smoke}
    info |= {"memory_rows": r["memory_rows"], "loadavg": os.getloadavg()}
    print_json("synthesis_scale_collection", info, {k: v for k, v in r.items() if k != "stats"})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="synthesis config")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--batch", type=int, default=8, help="training batch")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median), after one warm-up")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (as mixed_precision bf16)")
    p.add_argument("--smoke", action="store_true", help="a tiny config (a check that it runs)")
    c = p.add_argument_group("--collection: a collection larger than memory, on disk")
    c.add_argument("--collection", action="store_true", help="write, collect, train from it")
    c.add_argument("--rows", type=int, default=65_000, help="LoRAs in the collection")
    c.add_argument("--dim", type=int, default=99_648, help="numbers per LoRA")
    c.add_argument("--file", type=Path, help="the collection file (default: a temporary one)")
    c.add_argument("--keep", action="store_true", help="keep the file (default: deleted)")
    c.add_argument("--train-steps", type=int, default=10, help="timed steps per source")
    c.add_argument("--memory-rows", type=int, default=512, help="rows of the in-memory run")
    c.add_argument("--workers", type=int, default=1, help="loader worker processes")
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch = 1, 2
    return args


def main(argv: list[str] | None = None) -> None:
    """Measure, then print a Markdown table and one JSON line."""
    args = parse_args(argv)
    if args.collection:
        run_collection(args)
        return
    rows = measure(args)
    peak = peak_memory_gib(args.device)
    print(f"config {args.config.name}, batch {args.batch}, bf16 {args.bf16}")
    table = [
        [r["part"], f"{r['parameters']:,}" if r["parameters"] else "-"]
        + [f"{r['seconds']:.3f}", f"{r['samples_per_s']:.1f}"]
        for r in rows
    ]
    print_table(["part", "parameters", "s / step", "samples/s"], table)
    info = machine(args.device) | {"config": str(args.config), "batch": args.batch}
    info |= {"bf16": args.bf16, "smoke": args.smoke, "peak_memory_gib": round(peak, 2)}
    print_json("synthesis_scale", info, {r["part"]: r for r in rows})


def run_collection(args: argparse.Namespace) -> dict:
    """--collection: measure with the file under --file (or a temporary folder), then delete
    it unless --keep; returns the measurements (the tests read them)."""
    with tempfile.TemporaryDirectory(prefix="condlora-scale-") as tmp:
        path = args.file or Path(tmp) / "collection.safetensors"
        try:
            result = measure_collection(args, path)
        finally:
            if not args.keep:
                path.unlink(missing_ok=True)
    report_collection(args, result)
    return result


if __name__ == "__main__":
    main()
