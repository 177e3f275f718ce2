"""`condlora synth zoo`: one LoRA per subject folder on a frozen condlora run, many at a time;
equal to fine-tuning each subject alone, resumable, read by `synth collect`. `condlora synth
eval`: every method's LoRA for held-out subject folders, scored (the identity benchmark)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from condlora.cli import main
from condlora.image.build import image_channels, num_classes
from condlora.image.config import load_config
from condlora.image.task import load_run, train
from condlora.lora.formats import read_lora
from condlora.synthesis.config import ZooConfig
from condlora.synthesis.encoders import ENCODERS
from condlora.synthesis.zoo import Subject, fine_tune_subjects, read_subjects

from .conftest import CONFIGS, TINY

SETTINGS = ["steps=6", "images_per_subject=2", "rank=2", "alpha=4", "targets=[qkv, proj]"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, one_thread):
    """A tiny class-conditional digits baseline (8 steps): the frozen base of the zoo."""
    run = tmp_path_factory.mktemp("zoo") / "base"
    train(load_config(CONFIGS / "digits-baseline.yaml", TINY), run, max_steps=8, progress=False)
    return run


def write_subjects(folder, count=3, classes=(0, 3), per_class=2):
    """Subject folders s0, s1, ... with class subfolders of seeded random 16x16 images."""
    rng = np.random.default_rng(0)
    for s in range(count):
        for c in classes:
            sub = folder / f"s{s}" / str(c)
            sub.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8) // (s + 1)
                Image.fromarray(pixels, "L").save(sub / f"{i}.png")
    return folder


def zoo(base_run, subjects, out, *extra):
    args = ["synth", "zoo", "--base", str(base_run), "--subjects", str(subjects)]
    return main([*args, "--out", str(out), "--quiet", *SETTINGS, *extra])


def test_zoo_equals_fine_tuning_each_subject_alone(base_run, tmp_path, capsys):
    subjects = write_subjects(tmp_path / "subjects")
    assert zoo(base_run, subjects, tmp_path / "loras", "subjects_per_batch=3") == 0
    assert "3 subjects" in capsys.readouterr().out
    cfg, base, _ = load_run(base_run)
    found = read_subjects(subjects, 16, image_channels(cfg), num_classes(cfg))
    assert [s.name for s in found] == ["s0", "s1", "s2"]
    assert sorted(found[0].labels.tolist()) == [0, 0, 3, 3]  # class folders -> the base's classes
    zoo_cfg = ZooConfig(steps=6, images_per_subject=2, rank=2, alpha=4, targets=("qkv", "proj"))
    for subject in found:  # one at a time, as a user would fine-tune each alone
        (alone,) = fine_tune_subjects(base, [subject], zoo_cfg)
        written = read_lora(tmp_path / "loras" / subject.name)
        assert set(written.modules) == set(alone.modules) and len(alone.modules) >= 2
        for name, module in alone.modules.items():
            torch.testing.assert_close(
                written.modules[name].delta(), module.delta(), atol=1e-5, rtol=1e-5
            )
            assert written.modules[name].rank == 2 and written.modules[name].scale == 2.0
        assert alone.modules[name].delta().abs().max() > 1e-4  # it trained: B moved from 0
    deltas = [read_lora(tmp_path / "loras" / s).modules[name].delta() for s in ("s0", "s1")]
    assert not torch.allclose(*deltas)  # subjects differ by their images


def test_subjects_draw_their_own_noise(base_run):
    """Two subjects with the same images still get different LoRAs: each draws its own
    images, noise levels and noise (no common random numbers), alone or batched alike."""
    cfg, base, _ = load_run(base_run)
    x = torch.rand(4, image_channels(cfg), 16, 16) * 2 - 1
    labels = torch.tensor([0, 3, 0, 3])
    twins = [Subject(name, x, labels, []) for name in ("a", "b")]
    zoo_cfg = ZooConfig(steps=4, images_per_subject=2, rank=2, alpha=4, targets=("qkv", "proj"))
    a, b = fine_tune_subjects(base, twins, zoo_cfg)
    (again,) = fine_tune_subjects(base, twins[:1], zoo_cfg)
    name = next(iter(a.modules))
    torch.testing.assert_close(again.modules[name].delta(), a.modules[name].delta())
    gap = (a.modules[name].delta() - b.modules[name].delta()).abs().max()
    assert gap > 1e-3 * a.modules[name].delta().abs().max()


def test_stopped_zoo_resumes_without_retraining_and_collect_reads_it(base_run, tmp_path, capsys):
    subjects = write_subjects(tmp_path / "subjects")
    out = tmp_path / "loras"
    assert zoo(base_run, subjects, out, "subjects_per_batch=2") == 0
    first = {s: (out / s / "adapter_model.safetensors").stat().st_mtime_ns for s in ("s0", "s1")}
    original = (out / "s2" / "adapter_model.safetensors").read_bytes()
    # a stop after the first batch: s2's folder was never written
    for f in (out / "s2").iterdir():
        f.unlink()
    (out / "s2").rmdir()
    record = json.loads((out / "zoo.json").read_text())
    assert sorted(record["seconds"]) == ["s0", "s1", "s2"]
    assert zoo(base_run, subjects, out, "subjects_per_batch=2") == 0
    after = {s: (out / s / "adapter_model.safetensors").stat().st_mtime_ns for s in ("s0", "s1")}
    assert after == first  # finished subjects are not trained again
    assert (out / "s2" / "adapter_model.safetensors").read_bytes() == original
    capsys.readouterr()
    assert main(["synth", "collect", "--loras", str(out), "--out", str(tmp_path / "ds")]) == 0
    assert "took 3 LoRAs, skipped 0" in capsys.readouterr().out


def test_a_zoo_on_3x3_convs_writes_conv_loras_that_collect_keeps(base_run, tmp_path, capsys):
    """LoRAs on the residual blocks' 3x3 convs (LoCon) through the zoo and `synth collect`:
    peft's conv shapes on disk, and every collected row is its subject's dW."""
    from condlora.synthesis.collection import LoRADataset

    subjects = write_subjects(tmp_path / "subjects", count=2)
    out = tmp_path / "loras"
    assert zoo(base_run, subjects, out, "targets=[qkv, conv1]") == 0
    capsys.readouterr()
    assert main(["synth", "collect", "--loras", str(out), "--out", str(tmp_path / "ds")]) == 0
    assert "took 2 LoRAs, skipped 0" in capsys.readouterr().out
    dataset = LoRADataset(tmp_path / "ds")
    for i, name in enumerate(dataset.names):
        written = read_lora(out / name)
        convs = [m for n, m in written.modules.items() if n.endswith("conv1")]
        assert convs and all(m.A.shape[2:] == (3, 3) and m.B.shape[2:] == (1, 1) for m in convs)
        row = dataset.lora(i)
        assert set(row.modules) == set(written.modules)
        for module, m in written.modules.items():
            torch.testing.assert_close(row.modules[module].delta(), m.delta(), atol=1e-5, rtol=1e-4)
        assert max(m.delta().abs().max() for m in convs) > 1e-4  # the conv LoRAs trained


def test_zoo_with_other_settings_in_the_same_folder_is_refused(base_run, tmp_path, capsys):
    subjects = write_subjects(tmp_path / "subjects", count=1)
    assert zoo(base_run, subjects, tmp_path / "loras") == 0
    before = (tmp_path / "loras" / "zoo.json").read_text()
    capsys.readouterr()
    assert zoo(base_run, subjects, tmp_path / "loras", "lr=1e-2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another config" in err[0] and err[0].startswith("condlora: error:")
    assert (tmp_path / "loras" / "zoo.json").read_text() == before
    # the same settings, another batch size: a rerun, not a refusal (its results are the same)
    assert zoo(base_run, subjects, tmp_path / "loras", "subjects_per_batch=5") == 0
    # the default targets (a tuple in the config) read back from zoo.json as the same
    args = ["synth", "zoo", "--base", str(base_run), "--subjects", str(subjects)]
    args += ["--out", str(tmp_path / "plain"), "--quiet", "steps=2"]
    assert main(args) == 0 and main(args) == 0


def test_zoo_writes_embeddings_that_collect_takes(base_run, tmp_path, capsys, monkeypatch):
    class MeanPixels:  # a stand-in encoder: (mean, std) of each image's pixels
        dim = 2

        def __call__(self, paths):
            rows = [np.asarray(Image.open(p), dtype=np.float32) for p in paths]
            return torch.tensor([[r.mean() + 1.0, r.std() + 1.0] for r in rows])

    monkeypatch.setitem(ENCODERS, "mean-pixels", lambda cfg: MeanPixels())
    subjects = write_subjects(tmp_path / "subjects")
    out = tmp_path / "loras"
    assert zoo(base_run, subjects, out, "--encoder", "mean-pixels") == 0
    from safetensors.torch import load_file

    vectors = load_file(out / "embeddings.safetensors")
    assert sorted(vectors) == ["s0", "s1", "s2"]
    files = sorted((subjects / "s1").rglob("*.png"))
    rows = torch.nn.functional.normalize(MeanPixels()(files), dim=1).mean(0)
    torch.testing.assert_close(vectors["s1"], rows / rows.norm())
    capsys.readouterr()
    args = ["synth", "collect", "--loras", str(out), "--out", str(tmp_path / "ds")]
    assert main([*args, "--embeddings", str(out / "embeddings.safetensors")]) == 0


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("flat", "class-conditional"),
        ("named", "must be named 0..9"),
        ("empty", "holds no subject folders"),
    ],
)
def test_bad_subject_folders_are_one_line(base_run, tmp_path, capsys, layout, expected):
    subjects = tmp_path / "subjects"
    subjects.mkdir()
    if layout == "flat":
        (subjects / "s0").mkdir()
        Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(subjects / "s0" / "a.png")
    elif layout == "named":
        (subjects / "s0" / "cat").mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16), np.uint8), "L").save(subjects / "s0" / "cat" / "a.png")
    assert zoo(base_run, subjects, tmp_path / "loras") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0]
    assert not (tmp_path / "loras").exists()


def write_styled_subjects(folder, demo_cfg, names, per_class=2):
    """Held-out subjects of the demo as folders of their styled real digits, by class."""
    from condlora.apps.synthesis_demo.styles import apply_style
    from condlora.apps.synthesis_demo.zoo import make_subjects
    from condlora.core.images import to_uint8
    from condlora.data.images import load_digits_images

    subs = make_subjects(demo_cfg)
    images, labels = load_digits_images(16)
    for name in names:
        style = subs.styles[subs.names.index(name)]
        for c in range(10):
            pick = images[labels == c][-per_class:]  # the last digits of each class
            for j, pixels in enumerate(to_uint8(apply_style(pick, style))):
                (folder / name / str(c)).mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels[..., 0], "L").save(folder / name / str(c) / f"{j}.png")
    return folder


@pytest.mark.slow
def test_synth_eval_on_the_tiny_demo_writes_its_table(tiny_demo, tmp_path, one_thread):
    from condlora.apps.serve.uploads import DigitsEncoder
    from condlora.synthesis.encoders import set_embedding
    from condlora.synthesis.subject_eval import sample_with

    folder, demo_cfg, _ = tiny_demo
    encoder = DigitsEncoder(folder)
    heldout = sorted(p.name for p in (folder / "loras" / "scored").iterdir())
    subjects = write_styled_subjects(tmp_path / "subjects", demo_cfg, heldout)
    out = tmp_path / "eval"
    args = ["synth", "eval", "--model", str(folder / "methods" / "vae-prior-adalora-seed0")]
    args += ["--base", str(folder / "base"), "--subjects", str(subjects), "--out", str(out)]
    args += ["--finetuned", str(folder / "loras" / "scored"), "--encoder", "digits"]
    args += ["--encoder-path", str(folder)]
    args += ["--judge", str(folder / "judge.safetensors"), "--num", "10", "--quiet"]
    assert main(args) == 0
    report = (out / "report.md").read_text()
    rows = {
        line.split(" | ")[0].strip("| "): line
        for line in report.splitlines()
        if line.startswith("| ")
    }
    assert {"generator", "nearest", "pca-ridge", "fine-tuned", "no LoRA"} <= set(rows)
    assert "| 1.00 |" in rows["fine-tuned"] and "| 0.00 |" in rows["no LoRA"]  # normalised ends
    results = json.loads((out / "results.json").read_text())
    assert sorted(results) == heldout
    for name in heldout:
        assert (out / "grids" / f"{name}.png").is_file()
        for method, scored in results[name].items():
            # the score is the cosine of the saved samples' set embedding with the subject's
            files = sorted((out / "samples" / name / method.replace(" ", "-")).glob("*.png"))
            assert len(files) == 10 and 0.0 <= scored["accuracy"] <= 1.0
            target = set_embedding(encoder, sorted((subjects / name).rglob("*.png")))
            want = float(set_embedding(encoder, files) @ target)
            assert scored["score"] == pytest.approx(want, abs=1e-5)
    # every method starts from the same noise: a bank of zero LoRAs draws the base's samples
    cfg, base, _ = load_run(folder / "base")
    zero = read_lora(folder / "loras" / "scored" / heldout[0])
    for module in zero.modules.values():
        module.B.zero_()
    torch.testing.assert_close(
        sample_with(base, [zero, zero], cfg, 4, seed=3),
        sample_with(base, None, cfg, 4, seed=3).expand(2, -1, -1, -1, -1),
    )


def test_zoo_on_a_diffusers_unet_folder_names_the_unets_own_modules(tmp_path, capsys):
    diffusers = pytest.importorskip("diffusers")
    from .test_diffusers_arch import tiny_pipeline

    root = tiny_pipeline(tmp_path / "pipe")  # unconditional UNet2DModel, 1 x 16 x 16
    subjects = tmp_path / "subjects"
    rng = np.random.default_rng(0)
    for s in range(2):
        (subjects / f"s{s}").mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8) // (s + 1)
            Image.fromarray(pixels, "L").save(subjects / f"s{s}" / f"{i}.png")
    args = ["synth", "zoo", "--base", str(root), "--subjects", str(subjects)]
    args += ["--out", str(tmp_path / "loras"), "--quiet", "steps=3", "targets=[to_q, to_v]"]
    assert main(args) == 0
    unet = dict(diffusers.UNet2DModel.from_pretrained(root / "unet").named_modules())
    for s in ("s0", "s1"):
        lora = read_lora(tmp_path / "loras" / s)
        assert lora.modules and all(name in unet for name in lora.modules)
        assert {name.rsplit(".", 1)[1] for name in lora.modules} == {"to_q", "to_v"}


def test_a_bank_layer_on_tokens_adds_each_samples_own_lora():
    from condlora.synthesis.bank import SubjectIds, SubjectLoRA

    torch.manual_seed(0)
    base, current = torch.nn.Linear(6, 5), SubjectIds()
    layer = SubjectLoRA(base, num_subjects=3, rank=2, scale=0.5, current=current)
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    x, ids = torch.randn(4, 7, 6), torch.tensor([2, 0, 1, 2])
    current.ids = ids
    want = torch.stack(
        [base(x[i]) + 0.5 * x[i] @ layer.lora_A[k].T @ layer.lora_B[k].T for i, k in enumerate(ids)]
    )
    torch.testing.assert_close(layer(x), want)


def test_zoo_on_a_text_pipeline_trains_each_subject_on_its_prompt(tmp_path, capsys):
    """A tiny latent UNet2DConditionModel pipeline (CLIP text encoder, VAE), 3 subjects with
    a prompt each: the zoo's LoRAs are each subject fine-tuned alone, and collect reads them."""
    pytest.importorskip("diffusers")
    from condlora.image.task import load_base
    from condlora.synthesis.zoo import model_subjects

    from .test_diffusers_text import text_pipeline

    root = text_pipeline(tmp_path / "pipe", latent=True)  # images 3 x 8 x 8, latents 4 x 4 x 4
    subjects = tmp_path / "subjects"
    rng = np.random.default_rng(0)
    for s, prompt in enumerate(["a red cat", "a blue dog", "a green bird"]):
        (subjects / f"s{s}").mkdir(parents=True)
        (subjects / f"s{s}" / "prompt.txt").write_text(prompt)
        for i in range(2):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) // (s + 1)
            Image.fromarray(pixels, "RGB").save(subjects / f"s{s}" / f"{i}.png")
    settings = ["steps=3", "images_per_subject=2", "rank=1", "targets=[to_q, to_v]"]
    args = ["synth", "zoo", "--base", str(root), "--subjects", str(subjects)]
    assert main([*args, "--out", str(tmp_path / "loras"), "--quiet", *settings]) == 0
    assert "3 subjects" in capsys.readouterr().out
    cfg, base = load_base(root, subjects)
    found = model_subjects(base, read_subjects(subjects, 8, 3, 0, text=True))
    assert found[1].captions == ["a blue dog"] * 2 and found[1].images.shape == (2, 4, 4, 4)
    zoo_cfg = ZooConfig(steps=3, images_per_subject=2, rank=1, targets=("to_q", "to_v"))
    for subject in found:  # one at a time, as a user would fine-tune each alone
        (alone,) = fine_tune_subjects(base, [subject], zoo_cfg)
        written = read_lora(tmp_path / "loras" / subject.name)
        assert set(written.modules) == set(alone.modules) and len(alone.modules) >= 2
        assert all(name.startswith(("down_", "mid_", "up_")) for name in alone.modules)
        for name, module in alone.modules.items():
            torch.testing.assert_close(
                written.modules[name].delta(), module.delta(), atol=1e-5, rtol=1e-5
            )
        assert module.delta().abs().max() > 1e-6  # it trained: B moved from 0
    # the prompt reaches the U-Net: another prompt, another LoRA from the same images
    swapped = dataclasses.replace(found[0], labels=found[1].labels)
    (other,) = fine_tune_subjects(base, [swapped], zoo_cfg)
    (alone,) = fine_tune_subjects(base, [found[0]], zoo_cfg)
    assert not torch.allclose(other.modules[name].delta(), alone.modules[name].delta())
    args = ["synth", "collect", "--loras", str(tmp_path / "loras"), "--out", str(tmp_path / "ds")]
    assert main(args) == 0 and "took 3 LoRAs, skipped 0" in capsys.readouterr().out
