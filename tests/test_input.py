"""Bad input is named and loses nothing: run folders and their checkpoints, resumed schedules, manifests
and their images, damaged checkpoint files, sampler flags; and every command line turns the project's
errors into one line."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import cli
import data
import encoders
import evaluate
import losses
import sample as sampler
import selfe
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {"world": "small", "anchor": 512, "objective": "selfe", "seed": 0, "data": "shapes"}


def _train(out, *extra):
    return train.main(["--steps", "4", "--batch", "4", "--log-every", "1", "--ckpt-every", "2",
                       "--sample-every", "0", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, untrained_tiny):
    """A tiny untrained checkpoint (built and saved, not trained): <root>/run/latest -> step-0000001."""
    root = tmp_path_factory.mktemp("ckpt")
    train.save_checkpoint(str(root / "run"), untrained_tiny, 1, FLAGS)
    return root / "run"


# ------------------------------------------------------------------------------------------------------------
# run folders: a fresh run never destroys another run's checkpoints

def test_fresh_run_into_a_folder_holding_a_run_is_refused_and_loses_nothing(tmp_path):
    """The data-loss case: a finished run with later-numbered checkpoints, then a fresh shorter run
    into its folder. It is refused with what to do, and nothing is touched; with --overwrite the old
    run's files go first."""
    out = tmp_path / "run"
    _train(out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(encoders.CheckpointError, match=r"already holds a run .*--resume .*--overwrite"):
        _train(out, "--steps", "2", "--ckpt-every", "1")
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    hist = _train(out, "--steps", "2", "--ckpt-every", "1", "--overwrite")
    assert sorted(os.listdir(out)) == ["latest", "log.jsonl", "step-0000001", "step-0000002"]
    assert (out / "latest").read_text().strip() == "step-0000002" and len(hist) == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 2


def test_clean_up_never_deletes_the_checkpoint_latest_names(tmp_path, untrained_tiny):
    """Checkpoint clean-up keeps the newest ones up to the step just written, by number: folders
    numbered above it (another run's, or this run's before it was resumed from an earlier step)
    are never its to delete."""
    system = untrained_tiny
    for n in (20, 30):
        (tmp_path / f"step-{n:07d}").mkdir()
    for step in (5, 10, 15):
        train.save_checkpoint(str(tmp_path), system, step, FLAGS)
        assert selfe.resolve_checkpoint(str(tmp_path)) == str(tmp_path / f"step-{step:07d}")
    assert sorted(os.listdir(tmp_path)) == ["latest", "step-0000010", "step-0000015",
                                            "step-0000020", "step-0000030"]


def test_resume_without_a_checkpoint_is_named_and_makes_nothing(tmp_path):
    with pytest.raises(encoders.CheckpointError, match=r"--resume: .*none holds no checkpoint"):
        _train(tmp_path / "none", "--resume")
    assert not (tmp_path / "none").exists()
    (tmp_path / "dangling").mkdir()
    (tmp_path / "dangling" / "latest").write_text("step-0000005\n")
    with pytest.raises(encoders.CheckpointError,
                       match=r"latest names 'step-0000005', which is not a complete checkpoint"):
        _train(tmp_path / "dangling", "--resume")


def test_resume_keeps_the_schedule_of_the_run_unless_asked(tmp_path, capsys):
    """A 2-step run resumed with --steps 4: the learning rate has finished its decay at step 2 and stays at
    --lr-min (and tau and the auxiliary-term start stay where they were), and the log says so; --reschedule
    fits the schedule to 4 steps instead."""
    _train(tmp_path / "a", "--steps", "2")
    for name in ("kept", "refit"):
        shutil.copytree(tmp_path / "a", tmp_path / name)
    capsys.readouterr()
    kept = _train(tmp_path / "kept", "--resume")
    said = capsys.readouterr().out
    assert [r["step"] for r in kept] == [3, 4] and all(r["lr"] == pytest.approx(1e-5) for r in kept), kept
    assert "learning rate decaying to step 2" in said and "--reschedule" in said, said
    meta = json.loads((tmp_path / "kept" / "step-0000004" / "config.json").read_text())
    assert meta["flags"]["schedule_steps"] == 2  # a second resume keeps it too
    refit = _train(tmp_path / "refit", "--resume", "--reschedule")
    assert refit[0]["lr"] > 1e-4 and "learning rate decaying to step 4" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------------
# manifests and their images

def noise_image(path, size=(40, 40), seed=0):
    """A picture with real entropy, so its compressed data is long enough to cut."""
    from PIL import Image
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy()).save(path)


def cut(path):
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) * 2 // 3])  # the header stays whole, the data is cut off


def test_image_cut_short_is_caught_at_start_up(tmp_path):
    for name in ("ok.png", "ok.jpg", "cut.jpg", "cut.png"):
        noise_image(tmp_path / name)
    cut(tmp_path / "cut.jpg")
    cut(tmp_path / "cut.png")
    m = tmp_path / "m.tsv"
    m.write_text("ok.png\ta\nok.jpg\tb\ncut.jpg\tc\ncut.png\td\n")
    with pytest.raises(data.ManifestError, match=r"m\.tsv:3: cannot read image .*cut\.jpg"):
        data.ManifestData(str(m), [32], 8, 1)
    m.write_text("ok.png\ta\ncut.png\td\n")
    with pytest.raises(data.ManifestError, match=r"m\.tsv:2: cannot read image .*cut\.png"):
        data.ManifestData(str(m), [32], 8, 1)
    m.write_text("ok.png\ta\nok.jpg\tb\ncut.jpg\tc\ncut.png\td\n")
    src = data.ManifestData(str(m), [32], 8, 1, skip_bad=True)
    assert [src.entries[e][2] for e, _ in src.items] == [1, 2]


def test_image_damaged_during_the_run_is_named_or_replaced_with_skip_bad(tmp_path, capsys):
    """An image that breaks after start-up: without --skip-bad an error naming its line; with it, a warning
    and the next image of its bucket in its place, the same every time (so ranks and a resumed run agree)."""
    for i in range(4):
        noise_image(tmp_path / f"{i}.jpg", seed=i)
    m = tmp_path / "m.tsv"
    m.write_text("".join(f"{i}.jpg\tprompt {i}\n" for i in range(4)))
    strict = data.ManifestData(str(m), [32], 8, 2)
    lenient = data.ManifestData(str(m), [32], 8, 2, skip_bad=True)
    good, captions = lenient.batch([0, 1, 2, 3])
    cut(tmp_path / "2.jpg")
    with pytest.raises(data.ManifestError, match=r"m\.tsv:3: cannot read image .*2\.jpg.*--skip-bad"):
        strict.batch([2, 3])
    capsys.readouterr()
    for _ in range(2):
        images, got = lenient.batch([0, 1, 2, 3])
        assert got == ["prompt 0", "prompt 1", "prompt 3", "prompt 3"]
        torch.testing.assert_close(images[2], good[3])
    assert capsys.readouterr().err.count("m.tsv:3") == 1  # warned once, then remembered


def test_manifest_that_is_not_utf8_or_has_a_bom(tmp_path):
    noise_image(tmp_path / "ok.png")
    m = tmp_path / "m.tsv"
    m.write_bytes(b"ok.png\ta red image\nok.png\ta caf\xe9\nok.png\tthird\n")
    with pytest.raises(data.ManifestError, match=r"m\.tsv:2: not UTF-8 \(byte 0xe9 at column 13\)"):
        data.read_manifest(str(m))
    assert [e[2] for e in data.read_manifest(str(m), skip_bad=True)] == [1, 3]
    m.write_bytes("\ufeffok.png\ta red image\r\nok.png\tcafé\r\n".encode("utf-8"))
    entries = data.read_manifest(str(m))
    assert [(os.path.basename(e[0]), e[1]) for e in entries] == [("ok.png", "a red image"),
                                                                 ("ok.png", "café")]
    with pytest.raises(data.ManifestError, match=r"gone\.tsv: cannot read the manifest"):
        data.read_manifest(str(tmp_path / "gone.tsv"))


# ------------------------------------------------------------------------------------------------------------
# damaged checkpoints: named, with the file

@pytest.mark.parametrize("file, damage, message", [
    ("ema.safetensors", "truncate", r"ema\.safetensors: truncated"),
    ("ema.safetensors", "header", r"ema\.safetensors: not a safetensors file"),
    ("frozen.safetensors", "truncate", r"frozen\.safetensors: truncated"),
    ("config.json", "empty", r"config\.json: damaged, not a JSON file"),
    ("config.json", "garbage", r"config\.json: damaged, not a JSON file"),
    ("config.json", "fields", r"config\.json: damaged \(KeyError"),
])
def test_damaged_checkpoint_file_is_named(ckpt, tmp_path, file, damage, message):
    run = tmp_path / "run"
    shutil.copytree(ckpt, run)
    path = run / "step-0000001" / file
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[:len(raw) // 2], "header": raw[:8] + b"\x00\xff" * 20 + raw[48:],
                      "empty": b"", "garbage": b"\x89PNG not json", "fields": b'{"config": {}}'}[damage])
    with pytest.raises(encoders.CheckpointError, match=message):
        selfe.load_checkpoint(str(run))


def test_damaged_snapshot_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text("")
    with pytest.raises(encoders.CheckpointError, match=r"config\.json: damaged"):
        encoders.read_config(str(tmp_path))


# ------------------------------------------------------------------------------------------------------------
# flags: checked when parsed, the error naming the flag

@pytest.fixture
def a_file(tmp_path):
    (tmp_path / "file").write_text("")
    return tmp_path / "file"


@pytest.mark.parametrize("flag, value", [
    ("--eta", "-1"), ("--n", "0"), ("--seed", "18000000000000000000"), ("--seed", "-1"),
    ("--s-schedule", "abc"), ("--s-schedule", "1.5"), ("--anchor", "4096"), ("--upscale", "-1"),
    ("--steps", "0"), ("--guidance", "nan"), ("--sweep", "1,x"), ("--sweep", "0,2"), ("--resolution", "0"),
    ("--threads", "0"), ("--out", "noext"), ("--out", "FILE/x.png"), ("--out", "DIR/folder.png")])
def test_sampler_flags_are_checked_before_any_work(flag, value, a_file, tmp_path, capsys):
    (tmp_path / "folder.png").mkdir()
    value = value.replace("FILE", str(a_file)).replace("DIR", str(tmp_path))
    with pytest.raises(SystemExit) as e:
        sampler.main(["--ckpt", str(tmp_path / "no-checkpoint-here"), flag, value, "a red circle"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {flag}" in err, err


def test_resolution_that_is_not_a_whole_number_of_patches_is_refused(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sampler.main(["--ckpt", str(ckpt), "--resolution", "30", "--out",
                      str(tmp_path / "x.png"), "a red circle"])
    assert e.value.code == 2 and "multiples of 4 px: use 28 or 32" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    sampler.main(["--ckpt", str(ckpt), "--resolution", "28", "--steps", "1", "--upscale", "1",
                  "--out", str(tmp_path / "x.png"), "a red circle"])
    from PIL import Image
    assert Image.open(tmp_path / "x.png").size == (28 + 4, 28 + 4)  # one image and the grid's 2 px padding


def test_sampling_on_a_busy_cpu_takes_one_thread(ckpt, tmp_path, monkeypatch):
    """sample.py and evaluate.py, like train.py, leave a core that another job keeps busy alone: two threads
    on two cores of which one is busy stall each other at every parallel op (cli.cpu_threads)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    try:
        torch.set_num_threads(2)
        sampler.main(["--ckpt", str(ckpt), "--steps", "1", "--out", str(tmp_path / "x.png"), "a red circle"])
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)
        evaluate.main(["--ckpt", str(ckpt), "--steps", "1", "--prompts", "1", "--seeds", "1",
                       "--denoise", "0", "--out", str(tmp_path / "e")])
        assert torch.get_num_threads() == 1
        sampler.main(["--ckpt", str(ckpt), "--steps", "1", "--threads", "2", "--out", str(tmp_path / "y.png"),
                      "a red circle"])
        assert torch.get_num_threads() == 2                             # a --threads flag wins
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("argv", [["--anchor", "4096"], ["--ckpt-every", "0"], ["--seed", "-3"],
                                  ["--p-drop", "2"], ["--resolution", "32,x"], ["--resume", "--overwrite"],
                                  ["--reschedule"]])
def test_train_flags_are_checked_before_any_work(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(argv)
    assert e.value.code == 2 and "error: " in capsys.readouterr().err


def test_time_warp_anchor_must_lie_below_4096():
    assert losses.mu_of_length(4096, 4095) == pytest.approx(1.15)
    with pytest.raises(ValueError, match="anchor 4096"):
        losses.mu_of_length(4096, 4096)


# ------------------------------------------------------------------------------------------------------------
# one line for every command line

def test_cli_run_turns_input_errors_into_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(train.main, ["--data", str(tmp_path / "m.tsv"), "--steps", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "m.tsv: cannot read the manifest" in err, err
    with pytest.raises(ZeroDivisionError):  # anything else is a bug: its traceback stays
        cli.run(lambda argv: 1 / 0)


@pytest.mark.parametrize("script, argv, names", [
    ("train.py", ["--data", "BAD/m.tsv", "--steps", "1", "--out", "BAD/r"], "m.tsv"),
    ("sample.py", ["--ckpt", "BAD/run", "--out", "BAD/s.png", "a red circle"], "config.json"),
    ("evaluate.py", ["--ckpt", "BAD/run", "--steps", "1", "--prompts", "1", "--out", "BAD/e"],
     "config.json")])
def test_every_command_line_reports_bad_input_in_one_line(ckpt, tmp_path, script, argv, names):
    shutil.copytree(ckpt, tmp_path / "run")
    (tmp_path / "run" / "step-0000001" / "config.json").write_text("{")
    (tmp_path / "m.tsv").write_bytes(b"x.png\t\xff\n")
    p = subprocess.run([sys.executable, script, *[a.replace("BAD", str(tmp_path)) for a in argv]], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{script}: error: ") and names in lines[-1], p.stderr


# ------------------------------------------------------------------------------------------------------------
# resume: the run's own flags

@pytest.fixture(scope="module")
def resumable(tmp_path_factory):
    out = tmp_path_factory.mktemp("resumable") / "run"
    _train(out, "--steps", "2")
    return out


@pytest.mark.parametrize("argv, named", [
    (["--objective", "fm"], "--objective fm (the run: --objective selfe)"),
    (["--delta-zero"], "--delta-zero (the run: no --delta-zero)"),
    (["--seed", "1"], "--seed 1 (the run: --seed 0)"), (["--batch", "8"], "--batch 8 (the run: --batch 4)"),
    (["--lr", "1e-3"], "--lr 0.001 (the run: --lr 0.002)"), (["--data", "m.tsv"], "--data m.tsv (the run: "),
    (["--p-drop", "0.2"], "--p-drop 0.2"), (["--tau-frac", "0.5"], "--reschedule")])
def test_resume_with_a_flag_that_changes_the_run_is_refused_before_any_weight_loads(resumable, argv, named,
                                                                                    monkeypatch):
    """The measured case: a run resumed with another --objective (or seed, batch, learning rate, control,
    data, method flag) continued silently as another run. It is refused, naming the flag, before anything is
    built, and the run's files are untouched."""
    before = {p.relative_to(resumable): p.read_bytes() for p in resumable.rglob("*") if p.is_file()}
    monkeypatch.setattr(train, "setup", lambda *a, **k: pytest.fail("weights were built"))
    with pytest.raises(SystemExit, match=r"--resume: .*would change the resumed run's method, data or "
                                         r"randomness") as e:
        _train(resumable, "--resume", *argv)
    assert named in str(e.value)
    assert {p.relative_to(resumable): p.read_bytes() for p in resumable.rglob("*") if p.is_file()} == before


def test_a_resumed_t5_mask_run_encodes_with_the_mask(tmp_path):
    """--t5-mask reaches the text encoders through setup, and a resume that leaves the flag out takes the
    run's: settle_flags restores it before the system (and its text conditioner) is built."""
    _train(tmp_path / "run", "--t5-mask", "--steps", "2")
    args = train.get_args(["--resume", "--out", str(tmp_path / "run"), "--steps", "4"])
    train.settle_flags(args, 0, 1)
    assert args.t5_mask
    system = train.setup(args)[0]
    assert system.text.mask
    ids = system.text.tokenize(["a red circle"])[0]
    assert int(system.text.filled(ids)[0]) == 4                       # three words and the end token
    fresh = train.setup(train.get_args(["--out", str(tmp_path / "new")]))[0]
    assert not fresh.text.mask and int(fresh.text.filled(ids)[0]) == ids.shape[1]


def test_resume_restores_the_runs_flags_and_says_what_changed(tmp_path, capsys):
    """A flow-matching run of seed 3, batch 8 and 4 steps, resumed with none of those flags: it continues as
    that run, exactly (the uninterrupted run's losses), and says which flags came from the run and which
    passed flag changed (--ckpt-every)."""
    full = _train(tmp_path / "full", "--objective", "fm", "--seed", "3", "--batch", "8")
    shutil.copytree(tmp_path / "full", tmp_path / "cut")
    (tmp_path / "cut" / "latest").write_text("step-0000002\n")  # as if stopped after step 2
    capsys.readouterr()
    args = train.get_args(["--resume", "--out", str(tmp_path / "cut"), "--ckpt-every", "1"])
    train.prepare_out(args, 0)
    said = capsys.readouterr().out
    assert (args.objective, args.seed, args.batch, args.steps, args.log_every) == ("fm", 3, 8, 4, 1)
    assert "the run's own flags: " in said and all(f in said for f in ("--objective fm", "--seed 3",
                                                                          "--batch 8", "--steps 4"))
    assert "changed from the run: --ckpt-every 1 (the run: --ckpt-every 2)" in said, said
    # (--steps passed as well: a regression then stops after 4 steps, not the preset's 10 000)
    resumed = train.main(["--resume", "--out", str(tmp_path / "cut"), "--ckpt-every", "1", "--steps", "4"])
    assert [r["step"] for r in resumed] == [3, 4] and "self" not in resumed[0]  # flow matching, not Self-E
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
    meta = json.loads((tmp_path / "cut" / "step-0000004" / "config.json").read_text())
    assert (meta["flags"]["objective"], meta["flags"]["seed"], meta["flags"]["batch"]) == ("fm", 3, 8)


# ------------------------------------------------------------------------------------------------------------
# prompt files and sample folders

@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"", r"empty\.txt: no prompts in it"),
    ("blank.jsonl", b"\n  \n", r"blank\.jsonl: no prompts in it"),
    ("latin1.txt", b"a red circle\na caf\xe9\n", r"latin1\.txt:2: not UTF-8 \(byte 0xe9 at column 6\)"),
    ("bad.jsonl", b'{"prompt": "a circle", "tag": "single_object"}\n{"prompt": "a square",\n',
     r"bad\.jsonl:2: not JSON"),
    ("list.jsonl", b'{"prompt": "a circle"}\n["a square"]\n', r"list\.jsonl:2: not a GenEval metadata line"),
    ("noprompt.jsonl", b'{"tag": "colors"}\n', r"noprompt\.jsonl:1: not a GenEval metadata line")])
def test_bad_prompt_file_is_named_with_its_line_before_the_model_loads(ckpt, tmp_path, name, content, message,
                                                                       monkeypatch, capsys):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(data.ManifestError, match=message):
        sampler.read_prompts(str(tmp_path / name))
    monkeypatch.setattr(sampler, "load_system", lambda args: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as e:
        cli.run(sampler.main, ["--ckpt", str(ckpt), "--from-file", str(tmp_path / name), "--outdir",
                               str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and name in err, err
    assert not (tmp_path / "out").exists()
    # the same reader behind train.py --preview-prompts, before anything is built
    monkeypatch.setattr(train, "setup", lambda *a, **k: pytest.fail("weights were built"))
    with pytest.raises(data.ManifestError, match=message):
        _train(tmp_path / "run", "--preview-prompts", str(tmp_path / name), "--sample-every", "2")


def test_outdir_holding_earlier_samples_is_refused_unless_overwrite(ckpt, tmp_path, capsys):
    """Samples of another prompt list would mix with the new ones: refused, nothing touched; --overwrite
    deletes the earlier samples (and nothing else) first."""
    out = tmp_path / "samples"
    argv = ["--ckpt", str(ckpt), "--outdir", str(out), "--steps", "1"]
    sampler.main([*argv, "--n", "2", "a red circle", "a blue square"])
    (out / "notes.txt").write_text("mine")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        cli.run(sampler.main, [*argv, "a green circle"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "already holds samples" in err and "--overwrite" in err, err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    sampler.main([*argv, "--overwrite", "a green circle"])
    assert sorted(os.listdir(out)) == ["00000-0000.png", "notes.txt", "samples.jsonl"]
    assert json.loads((out / "samples.jsonl").read_text())["prompt"] == "a green circle"


@pytest.mark.parametrize("argv, message", [
    ([], "as arguments or --from-file"), (["--from-file", "F", "a circle"], "as arguments or --from-file"),
    (["--outdir", "D", "--sweep", "1,2", "a circle"], "--outdir writes one PNG per image"),
    (["--overwrite", "a circle"], "--overwrite goes with --outdir"), (["--n", "1001", "a circle"], "--n")])
def test_sampler_flag_combinations_are_checked(argv, message, tmp_path, capsys):
    argv = [a.replace("F", str(tmp_path / "p.txt")).replace("D", str(tmp_path / "d")) for a in argv]
    with pytest.raises(SystemExit) as e:
        sampler.main(["--ckpt", str(tmp_path / "none"), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
