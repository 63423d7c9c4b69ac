"""What a researcher runs around the loop: sampling a prompt file into one PNG per image (and GenEval's
layout), log.jsonl and its plots, the any-step plot of evaluate.py's report, preview prompts (also stored in a
cache), starting a run from another run's weights. CPU only, tiny preset."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import data
import model
import plots
import sample as sampler
import selfe
import train

FLAGS = {"world": "small", "anchor": 512, "objective": "selfe", "seed": 0, "data": "shapes"}
GENEVAL = [{"tag": "single_object", "include": [{"class": "circle", "count": 1}],
            "prompt": "a photo of a circle"},
           {"tag": "colors", "include": [{"class": "square", "count": 1, "color": "red"}],
            "prompt": "a photo of a red square"},
           {"tag": "counting", "include": [{"class": "triangle", "count": 2}],
            "exclude": [{"class": "triangle", "count": 3}], "prompt": "a photo of two triangles"}]


def _train(out, *extra):
    return train.main(["--steps", "4", "--batch", "4", "--log-every", "1", "--ckpt-every", "2",
                       "--sample-every", "0", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint whose denoiser is past its zero init (so every image depends on its prompt and
    noise), built without training."""
    torch.manual_seed(0)
    system = selfe.SelfE(model.CONFIGS["tiny"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in system.denoiser.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    system.make_ema()
    root = tmp_path_factory.mktemp("sampling")
    train.save_checkpoint(str(root / "run"), system, 1, FLAGS)
    return root / "run"


def pixels(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")))


# ------------------------------------------------------------------------------------------------------------
# sample.py --from-file --outdir

def test_prompt_file_becomes_one_png_and_one_metadata_line_per_image(ckpt, tmp_path):
    """Plain text: <prompt>-<image>.png; samples.jsonl names each file with its prompt, seed, steps, guidance
    and checkpoint; image j of prompt i is sample.sample's image from seed (seed, 1000 i + j), whatever
    --batch."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na photo of two squares\n")
    argv = ["--ckpt", str(ckpt), "--from-file", str(prompts), "--n", "3", "--steps", "2", "--seed", "5"]
    sampler.main([*argv, "--outdir", str(tmp_path / "a"), "--batch", "4"])
    lines = [json.loads(x) for x in (tmp_path / "a" / "samples.jsonl").read_text().splitlines()]
    names = [f"{i:05d}-{j:04d}.png" for i in range(2) for j in range(3)]
    assert sorted(os.listdir(tmp_path / "a")) == sorted(["samples.jsonl", *names])
    assert [(r["file"], r["prompt"], r["image"]) for r in lines] == [
        (f"{i:05d}-{j:04d}.png", p, j) for i, p in enumerate(["a red circle", "a photo of two squares"])
        for j in range(3)]
    assert {(r["steps"], r["cfg"], r["eta"], r["s_schedule"]) for r in lines} == {(2, 5.0, 1.0, "next")}
    assert all(str(ckpt) in r["checkpoint"] and "step 1" in r["checkpoint"] for r in lines)
    assert [r["seed"] for r in lines] == [data.stream_seed(5, 1000 * i + j)
                                          for i in range(2) for j in range(3)]
    system, _ = selfe.load_checkpoint(str(ckpt))
    want = data.to_uint8(sampler.sample(system, ["a photo of two squares"], 2, seeds=[lines[4]["seed"]]))[0]
    assert torch.equal(pixels(tmp_path / "a" / "00001-0001.png"), want)
    # another batch size: the same images
    sampler.main([*argv, "--outdir", str(tmp_path / "b"), "--batch", "5"])
    for r in lines:
        assert (pixels(tmp_path / "a" / r["file"]) - pixels(tmp_path / "b" / r["file"])).abs().max() <= 1


def test_geneval_metadata_file_writes_genevals_folder_layout(ckpt, tmp_path):
    """A .jsonl of GenEval's metadata lines: <00000>/metadata.jsonl holds that prompt's line as written (one
    JSON object, as GenEval's evaluate_images.py reads it), <00000>/samples/<0000>.png its images, 4 per
    prompt by default."""
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL))
    out = tmp_path / "geneval"
    sampler.main(["--ckpt", str(ckpt), "--from-file", str(meta), "--outdir", str(out), "--steps", "1"])
    assert sorted(os.listdir(out)) == ["00000", "00001", "00002", "samples.jsonl"]
    for i, m in enumerate(GENEVAL):
        folder = out / f"{i:05d}"
        assert sorted(os.listdir(folder)) == ["metadata.jsonl", "samples"]
        with open(folder / "metadata.jsonl") as f:
            assert json.load(f) == m
        assert sorted(os.listdir(folder / "samples")) == [f"{j:04d}.png" for j in range(4)]
        assert Image.open(folder / "samples" / "0000.png").size == (32, 32)
    lines = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and lines[5]["file"] == os.path.join("00001", "samples", "0001.png")
    assert {(r["cfg"], r["s_schedule"]) for r in lines} == {(1.0, "0.5")}  # one step: unguided at s = 0.5


# ------------------------------------------------------------------------------------------------------------
# log.jsonl and plots

def test_log_holds_window_means_loss_by_t_throughput_and_the_run(tmp_path):
    """A record per window of 2 steps: the means of the steps' terms, the loss in four t-bins, throughput;
    the first record of each process carries the commit, preset and flags (a resume writes its own)."""
    hist = _train(tmp_path / "run", "--log-every", "2")
    recs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4] and all(r["window"] == 2 for r in recs)
    for rec, steps in zip(recs, (hist[:2], hist[2:])):
        for key in ("loss", "data", "self", "grad_norm", "fake"):
            assert rec[key] == pytest.approx(sum(s[key] for s in steps) / 2), key
        assert rec["lr"] == steps[-1]["lr"]
        assert len(rec["loss_by_t"]) == 4 and any(v is not None for v in rec["loss_by_t"])
        assert rec["samples_per_s"] > 0 and rec["tokens_per_s"] > 0 and rec["tflops_per_device"] > 0
    run = recs[0]["run"]
    assert "run" not in recs[1] and run["start"] == 0 and run["world"] == 1
    assert model.Config.from_dict(run["config"]) == model.CONFIGS["tiny"] and run["flags"]["batch"] == 4
    assert run["commit"] is None or len(run["commit"].split("-")[0]) == 40
    _train(tmp_path / "run", "--resume", "--steps", "6", "--log-every", "2")
    recs = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6] and recs[2]["run"]["start"] == 4


def test_loss_plot_draws_each_run_and_keeps_the_last_record_of_a_step(tmp_path):
    """Two runs, one line each, in every panel their logs fill; a falling loss falls in the picture; a step
    logged twice (a restart) is drawn with its last record."""
    for name, scale in (("a", 1.0), ("b", 0.5)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for step in range(10, 110, 10):
                loss = scale / step
                f.write(json.dumps({"step": step, "loss": loss, "data": 2 * loss, "grad_norm": 1.0,
                                    "lr": 1e-3, "loss_by_t": [loss, None, loss, loss]}) + "\n")
    with open(tmp_path / "a.jsonl", "a") as f:  # the restart's step 100
        f.write(json.dumps({"step": 100, "loss": 10.0, "data": 1.0, "grad_norm": 1.0, "lr": 1e-3}) + "\n")
    assert plots.read_log(str(tmp_path / "a.jsonl"))["loss"][-1] == (100, 10.0)
    image, boxes = plots.log_figure([str(tmp_path / "b.jsonl")])
    assert set(boxes) == {"loss (Eq. 21)", "data term (Eq. 7)", "gradient norm", "learning rate",
                          "loss, t < 0.25", "loss, 0.25 <= t < 0.5", "loss, 0.5 <= t < 0.75",
                          "loss, t >= 0.75"}
    x0, y0, x1, y1 = boxes["loss (Eq. 21)"]
    blue = [(x, y) for x in range(x0 + 1, x1) for y in range(y0 + 1, y1)
            if image.getpixel((x, y)) == plots.COLOURS[0]]
    left = [y for x, y in blue if x < (x0 + x1) / 2]
    right = [y for x, y in blue if x > (x0 + x1) / 2]
    assert left and right and min(left) < min(right)  # image y grows downwards: the loss falls
    out = plots.main([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), "--out", str(tmp_path / "l.png")])
    colours = {c for _, c in Image.open(out).convert("RGB").getcolors(1 << 20)}
    assert plots.COLOURS[0] in colours and plots.COLOURS[1] in colours


def report(values):
    """An eval.json as evaluate.py writes it: models A, B with Overall `values[tag][steps]`."""
    models = []
    for tag, curve in values.items():
        seen = lambda v: {"overall": v, "tasks": {"single": v, "colors": 1 - v}, "colours_match": v}
        results = {str(n): {"seen": seen(v), "heldout": None, "contrast": 0.1 * v} for n, v in curve.items()}
        models.append({"tag": tag, "ckpt": f"runs/{tag}", "step": 10, "objective": "selfe",
                       "results": results})
    return {"config": {}, "models": models}


def test_any_step_plot_draws_overall_and_diagnostics_one_line_per_model(tmp_path):
    rep = report({"A": {1: 0.0, 2: 0.2, 4: 0.5, 50: 1.0}, "B": {1: 1.0, 2: 0.9, 4: 0.5, 50: 0.0}})
    assert plots.eval_curves(rep)["A: runs/A (selfe, step 10)"]["Overall (seen)"] == [
        (1, 0.0), (2, 0.2), (4, 0.5), (50, 1.0)]
    image, boxes = plots.eval_figure(rep)
    assert list(boxes) == ["Overall (seen)", "colours* (seen)", "contrast", "single (seen)", "colors (seen)"]
    x0, y0, x1, y1 = boxes["Overall (seen)"]
    for colour, rising in ((plots.COLOURS[0], True), (plots.COLOURS[1], False)):
        column = lambda x: [y for y in range(y0 + 1, y1) if image.getpixel((x, y)) == colour]
        first, last = column(x0 + 4), column(x1 - 4)  # at 1 step and at 50
        assert first and last and (min(first) > max(last)) == rising
    (tmp_path / "eval.json").write_text(json.dumps(rep))
    assert plots.main([str(tmp_path / "eval.json")]) == str(tmp_path / "steps.png")
    assert Image.open(tmp_path / "steps.png").size == image.size


def test_evaluate_draws_the_any_step_curve_beside_its_report(ckpt, tmp_path, monkeypatch):
    import evaluate
    gray = lambda system, prompts, *a, **k: torch.zeros(len(prompts), 3, 32, 32)
    monkeypatch.setattr(sampler, "sample", gray)
    evaluate.main(["--ckpt", str(ckpt), "--steps", "1,2", "--prompts", "1", "--seeds", "1", "--out",
                   str(tmp_path), "--denoise", "0"])
    with open(tmp_path / "eval.json") as f:
        image, boxes = plots.eval_figure(json.load(f))
    assert "Overall (seen)" in boxes and Image.open(tmp_path / "steps.png").size == image.size


# ------------------------------------------------------------------------------------------------------------
# previews

def test_preview_prompts_from_a_file(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\na blue square\na green triangle\n")
    _train(tmp_path / "run", "--steps", "2", "--sample-every", "2", "--preview-prompts",
           str(tmp_path / "p.txt"))
    grid = Image.open(tmp_path / "run" / "preview-0000002.png")
    tile = 32 * 4 + 2  # 32 px upscaled to 128, 2 px padding
    assert grid.size == (64 + 3 * tile + 2, 3 * tile + 2)  # labels, 3 prompts; rows 1, 2, 4 steps


def test_cache_stores_the_preview_prompts_encodings(tmp_path):
    from test_distributed import make_manifest
    manifest = make_manifest(tmp_path, [(40, 40)], 2)
    (tmp_path / "p.txt").write_text("a red circle\na photo of two squares\n")
    train.main(["--data", manifest, "--build-cache", str(tmp_path / "cache"), "--preview-prompts",
                str(tmp_path / "p.txt")])
    prompts, (txt, vec) = data.read_previews(str(tmp_path / "cache"))
    assert prompts == ["a red circle", "a photo of two squares"]
    system = selfe.SelfE(model.CONFIGS["tiny"], denoiser=False)
    want = system.encode_text(prompts)
    torch.testing.assert_close(txt, want[0])
    torch.testing.assert_close(vec, want[1])
    assert data.read_previews(str(tmp_path)) is None


# ------------------------------------------------------------------------------------------------------------
# --init-from

def test_init_from_starts_a_run_from_another_runs_weights_with_a_fresh_optimizer(tmp_path):
    """--init-from A with --lr 0 and EMA decay 1: after its one step B holds A's model and EMA exactly, at
    step 1 (a fresh schedule), with an Adam state of one step, not A's four."""
    _train(tmp_path / "a")
    _train(tmp_path / "b", "--init-from", str(tmp_path / "a"), "--steps", "1", "--lr", "0", "--lr-min", "0",
           "--ema", "1", "--seed", "3")
    assert (tmp_path / "b" / "latest").read_text().strip() == "step-0000001"
    a, _ = selfe.load_checkpoint(str(tmp_path / "a"), weights="model")
    b, _ = selfe.load_checkpoint(str(tmp_path / "b"), weights="model")
    for k, v in a.denoiser.state_dict().items():
        assert torch.equal(v, b.denoiser.state_dict()[k]), k
    ema_a = load_file(tmp_path / "a" / "step-0000004" / "ema.safetensors")
    ema_b = load_file(tmp_path / "b" / "step-0000001" / "ema.safetensors")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    # the stand-in encoders are A's (seed 0), not those of B's --seed 3
    frozen = [load_file(tmp_path / r / s / "frozen.safetensors") for r, s in (("a", "step-0000004"),
                                                                             ("b", "step-0000001"))]
    assert all(torch.equal(frozen[0][k], frozen[1][k]) for k in frozen[0])
    system, _, _, opt, _ = train.setup(train.get_args(["--out", str(tmp_path / "x")]))
    selfe.load_training_state(str(tmp_path / "b" / "step-0000001"), system, opt)
    assert {s["step"].item() for s in opt.state.values()} == {1}


def test_init_from_a_checkpoint_with_only_ema_weights_or_another_network(tmp_path):
    _train(tmp_path / "a", "--steps", "2")
    src = tmp_path / "released"
    shutil.copytree(tmp_path / "a" / "step-0000002", src)
    shutil.rmtree(src / "dcp")
    _train(tmp_path / "b", "--init-from", str(src), "--steps", "1", "--lr", "0", "--lr-min", "0")
    ema = load_file(src / "ema.safetensors")
    b, _ = selfe.load_checkpoint(str(tmp_path / "b"), weights="model")
    assert all(torch.equal(ema[k], v) for k, v in b.denoiser.state_dict().items())
    # a checkpoint of another network (a narrower denoiser) is refused before anything is built
    _train(tmp_path / "other", "--steps", "1", "--set", "hidden_size=48", "--set", "axes_dim=4,6,6")
    with pytest.raises(train.CheckpointError, match=r"other/step-0000001: --init-from needs a checkpoint of "
                                                    r"the --size tiny network"):
        _train(tmp_path / "c", "--init-from", str(tmp_path / "other"))
    assert not (tmp_path / "c").exists()
