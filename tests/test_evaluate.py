"""The GenEval-style checker (evaluate.py) held against docs/evaluation.md §6's validation targets:
ground-truth renders score ~1, one-fact hard negatives 0, blank and noise images 0, shuffled prompts at the
chance level an oracle computes, 64 px robustness under noise and blur; edge cases; the CLI's errors,
determinism and common random numbers. CPU only. Run: python -m pytest -q tests/test_evaluate.py"""
import dataclasses
import functools
import json
import math
import os
import random

import numpy as np
import pytest
import torch

import data
import evaluate as ev
import selfe

torch.set_num_threads(1)  # the checker's tensors are tiny; on a shared 2-core machine threads only contend

N = 8  # prompts per task


@functools.cache
def truth(world_name):
    """Ground-truth renders of the prompt set (seen and held-out), their oracle
    objects, and hard negatives."""
    world = data.WORLDS[world_name]
    specs = [dict(s, index=i) for i, s in enumerate(ev.prompt_set(world, N, seed=3))]
    images, objects, negs, neg_specs, neg_kinds = [], [], [], [], []
    for i, spec in enumerate(specs):
        rng = data.sample_rng(11, i)
        img, objs = ev.render_spec(spec, world, rng)
        images.append(img)
        objects.append(objs)
        for kind, bad in ev.hard_negatives(spec, world, rng):
            try:
                negs.append(ev.render_spec(bad, world, rng)[0])
            except RuntimeError:  # a count + 1 that does not fit the image
                continue
            neg_specs.append(spec)
            neg_kinds.append(kind)
    return world, specs, torch.stack(images), objects, torch.stack(negs), neg_specs, neg_kinds


def accuracy(images, specs, world):
    return float(np.mean([r["correct"] for r in ev.score(images, specs, world)]))


# ------------------------------------------------------------------------------------------------------------
# Validation targets (docs/evaluation.md §6)

@pytest.mark.parametrize("world_name", ["small", "full"])
def test_ground_truth_scores_high_and_sees_exactly_the_scene(world_name):
    world, specs, images, objects, *_ = truth(world_name)
    res = ev.score(images, specs, world)
    acc = np.mean([r["correct"] for r in res])
    assert acc >= 0.98, [(s["prompt"], r["reason"]) for s, r in zip(specs, res) if not r["correct"]]
    summary = ev.summarize(specs, [r["correct"] for r in res], res)
    # every object found and kept, each fitting its template closely
    assert summary["kept"] >= 0.98 and summary["iou"] >= 0.9
    assert set(summary["tasks"]) == set(data.TASKS) and min(summary["tasks"].values()) >= 0.9
    # stronger than the verdict (extra objects are not penalised by GenEval): the checker finds every object,
    # with its class and colour, and invents none (plain nearest-colour labels invented 'brown' rims)
    exact = 0
    for img, objs in zip(data.to_uint8(images).numpy(), objects):
        found = sorted((o["class"], o["color"]) for o in ev.detect(img, world) if o["conf"] >= ev.KEEP_CONF)
        exact += found == sorted((o["class"], o["color"]) for o in objs)
    assert exact / len(objects) >= 0.98


@pytest.mark.parametrize("world_name", ["small", "full"])
def test_hard_negatives_score_zero(world_name):
    world, *_, negs, neg_specs, neg_kinds = truth(world_name)
    assert {"shape", "color", "count-1", "count+1", "relation", "swap", "missing"} <= set(neg_kinds)
    res = ev.score(negs, neg_specs, world)
    wrong = [(s["prompt"], k, r["reason"]) for s, k, r in zip(neg_specs, neg_kinds, res) if r["correct"]]
    assert not wrong


@pytest.mark.parametrize("world_name", ["small", "full"])
@pytest.mark.parametrize("within_task", [True, False])
def test_shuffled_prompts_score_at_chance(world_name, within_task):
    """Each image judged against another prompt (of its task, or of any task): the checker must agree with an
    oracle that judges the same pairs on the true scene; chance is what the oracle says,
    not 0 ('a circle' holds for an image of two circles). Measured: checker = oracle within tasks
    (0.02 / 0.00); across tasks 0.11 vs 0.13 (small: GenEval looks only at the most confident circle, which
    may be the wrong colour) and 0.03 vs 0.03 (full)."""
    world, specs, images, objects, *_ = truth(world_name)
    perm = list(range(len(specs)))
    groups = [[i for i in perm if specs[i]["tag"] == t] for t in data.TASKS] if within_task else [perm[:]]
    for idx in groups:
        random.Random(0).shuffle(idx)
        for a, b in zip(idx, idx[1:] + idx[:1]):  # a derangement within the group
            perm[a] = b
    shuffled = [specs[j] for j in perm]
    checker = [r["correct"] for r in ev.score(images, shuffled, world)]
    oracle = [ev.judge(s, objs)[0] for s, objs in zip(shuffled, objects)]
    assert np.mean(oracle) < 0.5  # the shuffle really changed the question
    assert np.mean(np.array(checker) == np.array(oracle)) >= 0.95
    assert abs(np.mean(checker) - np.mean(oracle)) <= 0.05


@pytest.mark.parametrize("world_name", ["small", "full"])
def test_blank_and_noise_images_score_zero(world_name):
    world, specs, *_ = truth(world_name)
    R, g = world.resolution, torch.Generator().manual_seed(0)
    gray = torch.full((3, R, R), 120 / 127.5 - 1)
    ramp = gray + torch.linspace(-6, 6, R)[None, :, None] / 127.5
    fakes = [gray, ramp, gray + 20 / 127.5 * torch.randn(3, R, R, generator=g),
             gray + 60 / 127.5 * torch.randn(3, R, R, generator=g), torch.rand(3, R, R, generator=g) * 2 - 1,
             torch.full((3, R, R), 1.0), torch.full((3, R, R), -1.0)]
    for fake in fakes:
        assert accuracy(fake.clamp(-1, 1).expand(len(specs), 3, R, R), specs, world) == 0


@pytest.mark.parametrize("kind", ["noise10", "noise20", "blur1", "jitter", "downup"])
def test_robust_at_64px(kind):
    """docs/evaluation.md §6: at 64 px under noise sigma 10 or 20, blur sigma 1, colour jitter, 2x
    down/up: >= 0.98, hard negatives 0.00 (measured: 1.00 and 0.00 for every kind)."""
    world, specs, images, _, negs, neg_specs, _ = truth("full")
    g = torch.Generator().manual_seed(1)
    assert accuracy(ev.perturb(images, kind, g), specs, world) >= 0.98
    assert accuracy(ev.perturb(negs, kind, g), neg_specs, world) == 0


def test_perturbations_do_something():
    """The robustness test is only worth something if the perturbations damage the image."""
    _, _, images, *_ = truth("full")
    g = torch.Generator().manual_seed(1)
    for kind in ["noise10", "blur1", "jitter", "downup"]:
        assert (ev.perturb(images, kind, g) - images).abs().mean() > 0.01, kind


# ------------------------------------------------------------------------------------------------------------
# Edge cases

def render(objs, R, level=122.0):
    img = torch.full((3, R, R), level)
    for shape, color, box in objs:
        a = data.shape_alpha(shape, box, R)
        img = img * (1 - a) + torch.tensor(data.PALETTE[color], dtype=torch.float32)[:, None, None] * a
    return (img / 127.5 - 1)[None]


def found(img, world):
    return sorted((o["class"], o["color"]) for o in ev.detect(data.to_uint8(img)[0].numpy(), world)
                  if o["conf"] >= ev.KEEP_CONF)


@pytest.mark.parametrize("world_name", ["small", "full"])
def test_small_antialiased_shapes_at_subpixel_offsets(world_name):
    """Every shape in every colour at the smallest nominal size the world draws
    (counting's lower bound: 7.7 px at 32 px), at fractional positions, so that anti-aliased rims dominate.
    (Crowded layouts may shrink objects to 0.7 of that; at 32 px such 5 px squares read as ambiguous
    square/circle in 2 of 6 colours: the 'fragile under blur' of docs/evaluation.md §2.)"""
    world = data.WORLDS[world_name]
    R = world.resolution
    side = world.size_counting[0] * R
    rng = random.Random(0)
    misses = []
    for shape in world.shapes:
        for color in world.colors:
            x, y = rng.uniform(2, R - side - 2), rng.uniform(2, R - side - 2)
            got = found(render([(shape, color, (x, y, x + side, y + side))], R), world)
            if got != [(shape, color)]:
                misses.append((shape, color, got))
    assert len(misses) <= len(world.shapes) * len(world.colors) // 20, misses


@pytest.mark.parametrize("world_name", ["small", "full"])
def test_touching_shapes_of_two_colours_are_split(world_name):
    """The data never lets objects touch, but a model may: two colours in one component are two objects."""
    world = data.WORLDS[world_name]
    R = world.resolution
    s = 0.3 * R
    shapes = [("square", "circle"), ("circle", "triangle"), ("triangle", "square")]
    for (a, b), (ca, cb) in zip(shapes, [("red", "blue"), ("green", "white"), ("yellow", "purple")]):
        x, y = 0.15 * R, 0.3 * R
        objs = [(a, ca, (x, y, x + s, y + s)), (b, cb, (x + s, y, x + 2 * s, y + s))]  # boxes share an edge
        assert found(render(objs, R), world) == sorted([(a, ca), (b, cb)]), (a, b)


def test_colour_labels_are_mixture_aware():
    """Every palette colour blended over every background level at 25-100% coverage is labelled as itself
    (plain nearest-colour labelling reads a 50% red rim on gray as brown, a 50% white one as gray...)."""
    world = data.WORLDS["full"]
    pal = np.array([data.PALETTE[c] for c in world.colors], np.float32)
    alphas = np.linspace(0.25, 1, 13)
    for level in (108, 122, 136):
        bg = np.full((len(pal), 3), level, np.float32)
        img = bg[:, None] + alphas[None, :, None] * (pal[:, None] - bg[:, None])            # (K, A, 3)
        label, a = ev.color_labels(img.astype(np.float32), bg, pal)
        assert (label == np.arange(len(pal))[:, None]).all(), (level, label)
        assert np.allclose(a[np.arange(len(pal)), :, np.arange(len(pal))], alphas[None], atol=1e-3)


def test_rejects_what_is_not_a_shape_of_the_world():
    """docs/evaluation.md §4 step 5's confidence rules: stretched shapes (aspect > 1.6), shapes filling the
    frame (side > 0.85 R), blobs that fit no template; and a shape of another
    world (a star in the 3-shape world) is not read as one of its own."""
    full, small = data.WORLDS["full"], data.WORLDS["small"]
    assert found(render([("square", "red", (10, 25, 50, 40))], 64), full) == []           # a 40 x 15 bar
    assert found(render([("circle", "blue", (2, 2, 62, 62))], 64), full) == []            # fills the frame
    blob = render([("circle", "green", (10, 10, 30, 30)), ("circle", "green", (22, 14, 46, 38)),
                   ("square", "green", (14, 30, 28, 44))], 64)
    assert found(blob, full) == []                                                       # three merged shapes
    assert found(render([("star", "red", (10, 10, 30, 30))], 32), small) == []
    # the control
    assert found(render([("square", "red", (10, 25, 30, 45))], 64), full) == [("square", "red")]


def test_components_match_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((23, 31)) < rng.uniform(0.2, 0.6)
        lab, n = ev.components(mask)
        ref, m = -np.ones(mask.shape, int), 0
        for y, x in zip(*np.nonzero(mask)):
            if ref[y, x] >= 0:
                continue
            stack, ref[y, x] = [(y, x)], m
            while stack:
                cy, cx = stack.pop()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < 23 and 0 <= nx < 31 and mask[ny, nx] and ref[ny, nx] < 0:
                            ref[ny, nx] = m
                            stack.append((ny, nx))
            m += 1
        assert n == m
        pairs = set(zip(lab[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == n  # the two labelings are the same partition


# ------------------------------------------------------------------------------------------------------------
# GenEval logic, the prompt set and the report

def obj(cls, conf=0.9, iou=None, color="red", box=(0, 0, 10, 10)):
    return {"class": cls, "color": color, "conf": conf, "iou": conf if iou is None else iou, "box": list(box),
            "reject": ""}


def test_judge_counting_exclude_counts_sloppy_extras():
    spec = data.sample_spec(data.WORLDS["full"], random.Random(0), task="counting")
    spec["include"][0].update(count=2, **{"class": "circle"})
    spec["exclude"][0].update(count=3, **{"class": "circle"})
    two = [obj("circle"), obj("circle"), obj("square")]
    assert ev.judge(spec, two)[0]
    # a sloppy third circle breaks 'two'
    assert not ev.judge(spec, two + [obj("circle", conf=0.0, iou=0.65)])[0]
    assert ev.judge(spec, two + [obj("circle", conf=0.0, iou=0.55)])[0]       # a blob is not a circle
    assert not ev.judge(spec, [obj("circle"), obj("circle", conf=0.7)])[0]    # below the keep threshold


def test_judge_position_uses_genevals_rule():
    circle_left = {"class": "circle", "count": 1, "position": ["left of", 0]}
    spec = {"tag": "position", "include": [{"class": "square", "count": 1}, circle_left], "exclude": []}
    left = [obj("circle", box=(0, 20, 10, 30)), obj("square", box=(30, 20, 40, 30))]
    assert ev.judge(spec, left)[0]
    right = [obj("circle", box=(30, 20, 40, 30)), obj("square", box=(0, 20, 10, 30))]
    assert not ev.judge(spec, right)[0]
    # within 0.1 (dims): none
    overlapping = [obj("circle", box=(0, 0, 10, 10)), obj("square", box=(2, 0, 12, 10))]
    assert not ev.judge(spec, overlapping)[0]


def test_prompt_set_is_seeded_and_splits_held_out_pairs():
    world = data.WORLDS["full"]
    a, b = ev.prompt_set(world, 6, seed=0), ev.prompt_set(world, 6, seed=0)
    assert [s["prompt"] for s in a] == [s["prompt"] for s in b]
    assert [s["prompt"] for s in a] != [s["prompt"] for s in ev.prompt_set(world, 6, seed=1)]
    assert len(a) == 6 * 6 + 2 * 6
    held = set(world.heldout)
    for s in a:
        pairs = {(o.get("color"), o["class"]) for o in s["include"]}
        assert bool(pairs & held) == (not s["seen"]), s["prompt"]
    assert {s["tag"] for s in a if not s["seen"]} == {"colors", "color_attr"}
    with pytest.raises(ValueError):
        ev.prompt_set(world, 0)


def test_overall_is_the_plain_mean_of_the_six_tasks():
    world = data.WORLDS["small"]
    specs = [dict(s, index=i) for i, s in enumerate(ev.prompt_set(world, 2)) if s["seen"]]
    correct = [s["tag"] in ("single", "two") or (s["tag"] == "counting" and i % 2 == 0)
               for i, s in enumerate(specs)]
    summary = ev.summarize(specs, correct)
    assert summary["tasks"]["single"] == 1 and summary["tasks"]["position"] == 0
    assert summary["overall"] == pytest.approx(np.mean(list(summary["tasks"].values())), abs=1e-5)
    assert summary["overall"] == pytest.approx((1 + 1 + 0.5) / 6, abs=1e-5)


# ------------------------------------------------------------------------------------------------------------
# The CLI

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, untrained_tiny):
    """A tiny untrained checkpoint (no training on a shared CPU), and two that the checker must refuse."""
    import train
    root = tmp_path_factory.mktemp("ckpt")
    system = untrained_tiny
    flags = {"world": "small", "anchor": 512, "objective": "selfe", "seed": 0, "data": "shapes"}
    train.save_checkpoint(str(root / "ok"), system, 1, flags)
    train.save_checkpoint(str(root / "mars"), system, 1, dict(flags, world="mars"))
    # a 32 px model, 64 px world
    train.save_checkpoint(str(root / "big"), system, 1, dict(flags, world="full"))
    # the same network making 64 px images of the full world: a checkpoint of another world
    wide = selfe.SelfE(dataclasses.replace(system.cfg, resolution=64))
    wide.denoiser, wide.ema = system.denoiser, system.ema
    wide.text = system.text
    train.save_checkpoint(str(root / "wide"), wide, 1, dict(flags, world="full"))
    return root


def run_cli(ckpt, out, *extra):
    return ev.main(["--ckpt", str(ckpt / "ok"), "--steps", "1,2", "--prompts", "1", "--seeds", "2",
                    "--out", str(out), "--device", "cpu", "--denoise", "4", *extra])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "1,x"], "step counts"), (["--steps", "0,2"], "distinct integers"),
    (["--steps", ""], "step counts"), (["--steps", "2,2"], "distinct"), (["--prompts", "0"], None),
    (["--seeds", "0"], None), (["--denoise", "-1"], "--denoise >= 0"), (["--eta", "-1"], "argument --eta"),
    (["--s-schedule", "abc"], "argument --s-schedule"), (["--seed", "-1"], "argument --seed")])
def test_cli_rejects_bad_arguments(ckpt, tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        ev.main(["--ckpt", str(ckpt / "ok"), "--out", str(tmp_path), *argv])
    text = str(e.value.code) + capsys.readouterr().err
    assert e.value.code != 0 and (message is None or message in text), text


@pytest.mark.parametrize("name, message",
                         [("missing", "no checkpoint"), ("mars", "only knows the shapes worlds"),
                          ("big", "64 px but the model makes 32 px")])
def test_cli_rejects_checkpoints_it_cannot_judge(ckpt, tmp_path, name, message, capsys):
    import cli
    with pytest.raises(SystemExit) as e:
        cli.run(ev.main, ["--ckpt", str(ckpt / name), "--steps", "1", "--prompts", "1", "--out",
                          str(tmp_path)])
    assert message in str(e.value.code) + capsys.readouterr().err


def test_cli_scores_what_it_is_given(ckpt, tmp_path, monkeypatch):
    """End to end with the sampler replaced by a perfect model
    (ground-truth renders of the very prompts it is asked for): the sweep must pair images, prompts and scores
    correctly, seen and held-out."""
    import sample
    world = data.WORLDS["small"]
    by_prompt = {s["prompt"]: s for s in ev.prompt_set(world, 2)}

    def perfect(system, prompts, steps, cfg, eta, s_schedule, seeds, **_):
        return torch.stack([ev.render_spec(by_prompt[p], world, data.sample_rng(s, steps))[0]
                            for p, s in zip(prompts, seeds)])
    monkeypatch.setattr(sample, "sample", perfect)
    report = ev.main(["--ckpt", str(ckpt / "ok"), "--steps", "1,4", "--prompts", "2", "--seeds", "2",
                      "--out", str(tmp_path), "--batch", "5", "--denoise", "0"])
    for n in ("1", "4"):
        res = json.loads(json.dumps(report))["models"][0]["results"][n]
        assert res["seen"]["overall"] >= 0.98 and res["heldout"]["overall"] >= 0.98
        assert res["seen"]["images"] == 6 * 2 * 2 and res["heldout"]["images"] == 2 * 2 * 2


def test_cli_is_deterministic_and_shares_noise_across_models(ckpt, tmp_path):
    a = json.loads(json.dumps(run_cli(ckpt, tmp_path / "a")))  # as saved: step counts become string keys
    b = json.loads(json.dumps(run_cli(ckpt, tmp_path / "b", "--compare", str(ckpt / "ok"), str(ckpt / "ok"))))
    with open(tmp_path / "a" / "eval.json") as f:
        saved = json.load(f)
    strip = lambda m: {n: [(r["seed"], r["correct"], r["reason"]) for r in v["images"]]
                       for n, v in m["results"].items()}
    assert (strip(saved["models"][0]) == strip(b["models"][0]) == strip(b["models"][1])
            == strip(b["models"][2]))
    assert saved["models"][0]["results"]["1"]["seen"] == a["models"][0]["results"]["1"]["seen"]
    assert saved["models"][0]["denoising"] == b["models"][0]["denoising"] == b["models"][1]["denoising"]
    assert os.path.isfile(tmp_path / "a" / "grid.png") and os.path.isfile(tmp_path / "b" / "compare.png")
    seeds = [r["seed"] for r in saved["models"][0]["results"]["2"]["images"]]
    assert len(set(seeds)) == len(seeds) == (6 + 2) * 2


def test_colours_diagnostic_reads_colours_but_not_shapes():
    """colours_match accepts a render of the prompt, and a blob of the right colours but the wrong shape; it
    refuses a missing or an extra colour, and has no verdict on a prompt that names no colour."""
    world = data.WORLDS["full"]
    spec = {"include": [{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1,
                                                                          "color": "blue"}], "exclude": []}
    blob = lambda c, k: {"class": k, "color": c}
    assert ev.colours_match(spec, [blob("red", "star"), blob("blue", "cross")])
    assert not ev.colours_match(spec, [blob("red", "circle")])
    assert not ev.colours_match(spec, [blob("red", "circle"), blob("blue", "square"), blob("green", "star")])
    assert ev.colours_match({"include": [{"class": "circle", "count": 3}], "exclude": []}, []) is None
    rng = random.Random(0)
    s = data.sample_spec(world, rng, task="color_attr")
    img = data.to_uint8(data.render(data.layout(s, world, rng), world.resolution, rng)[None])[0].numpy()
    assert ev.colours_match(s, ev.detect(img, world))


def test_denoising_diagnostic_measures_the_velocity_error_and_the_prompts_share(ckpt, monkeypatch):
    """An oracle that returns the true velocity eps - x0 when given the prompt and 0 for phi: the conditional
    error must be 0, the unconditional one E||eps - x0||^2, and the gain 1, at every t (t = 1 included)."""
    system, _, world = ev.load(str(ckpt / "ok"), "cpu")
    n = 6
    images, _ = data.shapes_batch(world, range(n), 0 + 7919)
    x0 = system.encode_images(images)
    null = system.null_cond()[0]

    def oracle(model, x, t, s, cond, h, w):
        assert torch.equal(t, s) and x.shape == x0.shape
        v = (x - x0) / t.view(-1, 1, 1)                     # x_t = x0 + t (eps - x0)
        dropped = (cond[0] == null).flatten(1).all(1)
        return torch.where(dropped.view(-1, 1, 1), torch.zeros_like(v), v)
    monkeypatch.setattr(system, "velocity", oracle)
    res = ev.denoising(system, world, n, seed=0, batch=n)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    expected = (eps - x0).pow(2).mean().item()
    assert set(res) == set(ev.DENOISE_TIMES)
    for t, r in res.items():
        assert (r["cond"] < 1e-9 and abs(r["uncond"] - expected) < 1e-5 * expected
                and abs(r["gain"] - 1) < 1e-6), t


def test_contrast_is_zero_on_flat_gray_and_halves_with_a_half_faded_scene():
    """The faintness diagnostic: a flat image has none; fading a ground-truth scene halfway to its background
    (as a posterior-mean blur fades) halves it, since the background is the image's median colour."""
    world = data.WORLDS["small"]
    rng = random.Random(3)
    spec = data.sample_spec(world, rng, task="single")
    img = data.render(data.layout(spec, world, rng), world.resolution, rng)
    bg = img.flatten(1).median(1).values.view(3, 1, 1)
    c = ev.contrast(torch.stack([img, bg + 0.5 * (img - bg), bg.expand_as(img)])).tolist()
    assert c[0] > 0.1 and c[1] == pytest.approx(c[0] / 2, rel=1e-4) and c[2] == 0


# ------------------------------------------------------------------------------------------------------------
# Comparisons: paired differences and their bootstrap intervals

def synthetic_run(specs, correct, seed=0, images=4):
    """A run's results at one step count (1) from a rule correct(spec, image) -> bool: records as sweep makes
    them (no sampling), the other diagnostics fixed."""
    records = [{"prompt": s["index"], "image": j, "correct": bool(correct(s, j)),
                "colours_match": bool(correct(s, j)) if s["tag"] == "colors" else None,
                "contrast": 0.3, "iou": 0.8, "kept": 1, "objects": 1} for s in specs for j in range(images)]
    return {"seed": seed, "results": {1: {"images": records}}}


def sampled_specs(n):
    """n distinct prompts in each of two tasks, none `complete`: the prompts are a sample to redraw."""
    return [{"index": i, "tag": ("single", "colors")[i % 2], "seen": True, "complete": False,
             "prompt": f"prompt {i}"} for i in range(2 * n)]


def test_a_model_compared_with_itself_differs_by_exactly_zero():
    specs = sampled_specs(10)
    run = synthetic_run(specs, lambda s, j: (s["index"] + j) % 3 == 0)
    arms = [{"label": "a", "runs": [run]}, {"label": "b", "runs": [run]}]
    (entry,), note = ev.compare(arms, specs, [1], replicates=500)
    assert note is None
    for metric, d in entry["steps"][1]["seen"].items():
        assert d["diff"] == 0 and d["lo"] == 0 and d["hi"] == 0, metric


def test_the_interval_redraws_prompts_not_images():
    """Images of one prompt succeed or fail together (half the prompts always, half never): the interval of a
    task's score must be as wide as redrawing prompts gives (sd sqrt(p (1 - p) / prompts)), not as narrow as
    independent images would (sqrt(.../ images)); and a difference confined to one task stays there."""
    n = 40
    specs = sampled_specs(n)
    base = synthetic_run(specs, lambda s, j: False)
    good = synthetic_run(specs, lambda s, j: s["tag"] == "single" and (s["index"] // 2) % 2 == 0)
    (entry,), _ = ev.compare([{"label": "base", "runs": [base]}, {"label": "good", "runs": [good]}], specs,
                             [1], replicates=4000)
    single = entry["steps"][1]["seen"]["single"]
    assert single["diff"] == 0.5
    width = single["hi"] - single["lo"]
    by_prompts = 2 * 1.96 * math.sqrt(0.25 / n)                        # 0.31
    assert 0.8 * by_prompts < width < 1.2 * by_prompts, width          # by images it would be half as wide
    assert entry["steps"][1]["seen"]["colors"] == {"diff": 0, "lo": 0, "hi": 0}
    overall = entry["steps"][1]["seen"]["overall"]
    assert overall["diff"] == 0.25 and overall["lo"] > 0     # Overall is the mean of the two tasks here


def test_a_complete_task_redraws_the_images_of_each_prompt():
    """A task whose prompts are all the world has: the prompts stay, their images are redrawn; a prompt that
    always succeeds adds no uncertainty."""
    specs = [{"index": i, "tag": "single", "seen": True, "complete": True, "prompt": f"p{i}"}
             for i in range(3)]
    base = synthetic_run(specs, lambda s, j: False, images=40)
    rule = lambda s, j: s["index"] == 0 or (s["index"] == 1 and j % 2 == 0)   # 1, 0.5, 0
    (entry,), _ = ev.compare([{"label": "base", "runs": [base]},
                              {"label": "x", "runs": [synthetic_run(specs, rule, images=40)]}], specs, [1],
                             replicates=4000)
    d = entry["steps"][1]["seen"]["single"]
    assert d["diff"] == pytest.approx(0.5)
    # only prompt 1's 40 coin flips vary: sd of the mean over 3 prompts = sqrt(.25 / 40) / 3
    assert d["hi"] - d["lo"] == pytest.approx(2 * 1.96 * math.sqrt(0.25 / 40) / 3, rel=0.2)


def test_training_seeds_widen_the_interval_and_pair_by_seed():
    """Two runs per arm: an arm whose runs disagree has a wider interval than one whose runs agree, and arms
    trained with the same seeds are redrawn together (a seed's shared initial weights and data cancel)."""
    specs = sampled_specs(30)
    rule = lambda shift: (lambda s, j: (s["index"] + j + shift) % 4 == 0)
    base = {"label": "base", "runs": [synthetic_run(specs, rule(0), 0), synthetic_run(specs, rule(1), 1)]}
    steady = {"label": "steady", "runs": [synthetic_run(specs, rule(0), 0), synthetic_run(specs, rule(1), 1)]}
    shaky = {"label": "shaky", "runs": [synthetic_run(specs, lambda s, j: True, 0),
                                        synthetic_run(specs, lambda s, j: False, 1)]}
    entries, _ = ev.compare([base, steady, shaky], specs, [1], replicates=2000)
    by = {e["label"]: e for e in entries}
    assert by["steady"]["seeds_paired"] and by["shaky"]["seeds_paired"]
    assert by["steady"]["steps"][1]["seen"]["overall"] == {"diff": 0, "lo": 0, "hi": 0}
    o = by["shaky"]["steps"][1]["seen"]["overall"]
    assert o["lo"] < o["diff"] < o["hi"] and o["hi"] - o["lo"] > 0.5   # mostly the two seeds' disagreement


def test_too_few_prompts_say_there_is_no_interval():
    specs = sampled_specs(1)
    runs = [synthetic_run(specs, lambda s, j: j == 0), synthetic_run(specs, lambda s, j: True)]
    (entry,), note = ev.compare([{"label": "a", "runs": runs[:1]}, {"label": "b", "runs": runs[1:]}], specs,
                                [1], replicates=100)
    assert "fewer than 2 prompts" in note
    assert entry["steps"][1]["seen"]["overall"] == {"diff": 0.75, "lo": None, "hi": None}


def test_cli_compares_arms_of_several_runs_and_refuses_other_worlds(ckpt, tmp_path, capsys):
    """The command line: LABEL=DIR,DIR arms, a named baseline, the table printed and eval.json's comparisons;
    a checkpoint of another world is refused naming both checkpoints."""
    import cli
    ok = str(ckpt / "ok")
    report = run_cli(ckpt, tmp_path / "c", "--prompts", "2", "--ckpt", f"one={ok}", "--compare",
                     f"two={ok},{ok}", "--baseline", "two,one", "--bootstrap", "200")
    assert [m["tag"] for m in report["models"]] == ["one", "two#1", "two#2"]
    entry, back = report["comparisons"]                                   # one - two, then two - one
    pairs = (entry["label"], entry["baseline"], back["label"], back["baseline"])
    assert pairs == ("one", "two", "two", "one")
    assert entry["steps"][2]["seen"]["overall"] == {"diff": 0, "lo": 0, "hi": 0}   # the same model
    out = capsys.readouterr().out
    assert "one minus two: paired differences" in out and "overall" in out
    with open(tmp_path / "c" / "eval.json") as f:
        assert json.load(f)["comparisons"][0]["steps"]["1"]["seen"]["contrast"]["diff"] == 0
    with pytest.raises(SystemExit) as e:
        cli.run(ev.main, ["--ckpt", ok, "--compare", str(ckpt / "wide"), "--steps", "1", "--prompts", "2",
                          "--out", str(tmp_path / "d")])
    message = str(e.value.code)
    assert "cannot be compared" in message and ok in message and str(ckpt / "wide") in message
