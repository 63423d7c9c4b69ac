"""What a researcher runs around the loop: sampling a prompt file into one PNG per image (and GenEval's
layout). CPU only, tiny preset."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import data
import model
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
