"""The files selfe reads and writes, against damage, planted code and full disks: every damaged or stale cache
file and every edited config.json named before anything is built; a planted training state that does not run;
device flags checked when parsed; a checkpoint save that fails leaving the previous checkpoint and `latest` as
they were; the T5 mask that lets a cache leave out the padding, exactly."""
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp

import cli
import data
import encoders
import model
import sample as sampler
import selfe
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = {"world": "small", "anchor": 512, "objective": "selfe", "seed": 0, "data": "shapes"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def _train(out, *extra):
    return train.main(["--steps", "4", "--batch", "4", "--log-every", "1", "--ckpt-every", "2",
                       "--sample-every", "0", "--out", str(out), *extra])


def one_line_error(main, argv, capsys):
    """cli.run(main, argv) -> the one line it printed; it must exit with status 1 and no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def files(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------------------
# caches

def make_manifest(folder, n=4, size=(40, 40)):
    from PIL import Image
    for i in range(n):
        Image.new("RGB", size, (60 * i % 256, 90, 200 - 40 * i)).save(folder / f"{i}.png")
    (folder / "m.tsv").write_text("".join(f"{i}.png\ta photo of {i} red circles\n" for i in range(n)))
    return str(folder / "m.tsv")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    train.main(["--data", make_manifest(folder), "--build-cache", str(folder / "cache"), "--batch", "2"])
    return folder / "cache"


def shard(path):
    return sorted(path.glob("shard-*.safetensors"))[0]


def rewrite(file, change):
    """Load a safetensors file, let change(tensors, metadata) edit it, write it back."""
    with safetensors.safe_open(str(file), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors, meta)
    safetensors.torch.save_file(tensors, str(file), metadata=meta)


def edit_index(path, change):
    index = json.loads((path / "index.json").read_text())
    change(index)
    (path / "index.json").write_text(json.dumps(index))


DAMAGE = {
    "empty shard": (lambda c: shard(c).write_bytes(b""),
                    r"shard-00000-00000\.safetensors: not a safetensors"),
    "truncated shard": (lambda c: shard(c).write_bytes(shard(c).read_bytes()[:-100]),
                        r"shard-00000-00000\.safetensors: truncated"),
    "flipped header": (lambda c: shard(c).write_bytes(shard(c).read_bytes()[:8] + b"\xff\xfe"
                                                      + shard(c).read_bytes()[10:]),
                       r"shard-00000-00000\.safetensors: not a safetensors file \(bad JSON header"),
    "empty index": (lambda c: (c / "index.json").write_text(""), r"index\.json: damaged, not a JSON file"),
    "index not UTF-8": (lambda c: (c / "index.json").write_bytes(b'{"items": "\xe9"}'),
                        r"index\.json: damaged, not a JSON file .*0xe9"),
    "index a list": (lambda c: (c / "index.json").write_text("[1, 2]"),
                     r"index\.json: damaged, a JSON list where an object belongs"),
    "items a string": (lambda c: edit_index(c, lambda i: i.update(items="4")), r"index\.json: .*items = '4'"),
    "no items": (lambda c: edit_index(c, lambda i: i.pop("items")), r"index\.json: .*items = None"),
    "no encoders": (lambda c: edit_index(c, lambda i: i.pop("encoders")),
                    r"index\.json: damaged: no 'encoders' key"),
    "format 1": (lambda c: edit_index(c, lambda i: i.pop("format")),
                 r"index\.json: a cache of format 1 .*this selfe reads format 2"),
    "index of another build": (lambda c: edit_index(c, lambda i: i.update(items=2)),
                               r"shard-00000-00000\.safetensors: holds item [23], but index\.json counts "
                               r"items 0 to 1: a shard of another build"),
    "old shard": (lambda c: rewrite(shard(c), lambda t, m: t.pop("txt_len")),
                  r"shard-00000-00000\.safetensors: no 'txt_len' tensor"),
    "no bucket": (lambda c: rewrite(shard(c), lambda t, m: m.pop("bucket")),
                  r"shard-00000-00000\.safetensors: damaged: metadata 'bucket' is None"),
    "wrong width": (lambda c: rewrite(shard(c), lambda t, m: t.update(vec=t["vec"][:, :5].contiguous())),
                    r"shard-00000-00000\.safetensors: tensor 'vec' is F32 \(4, 5\)"),
    "bad lengths": (lambda c: rewrite(shard(c), lambda t, m: t.update(txt_len=t["txt_len"] * 0)),
                    r"shard-00000-00000\.safetensors: damaged: txt_len holds lengths 0\.\.0"),
    "shard twice": (lambda c: shutil.copy(shard(c), c / "shard-00009-00000.safetensors"),
                    r"shard-00009-00000\.safetensors: item [0-3] is also in .*shard-00000-00000"),
    "no null": (lambda c: os.remove(c / "null.safetensors"), r"null\.safetensors: file not found"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_or_stale_cache_is_named_before_training(cache, tmp_path, case, capsys):
    """Each damaged or stale cache file stops the run before any weight is built, in one line naming the
    file and what is wrong, and nothing of the cache or the run folder is touched."""
    damage, message = DAMAGE[case]
    path = tmp_path / "cache"
    shutil.copytree(cache, path)
    damage(path)
    before = files(path)
    built = []
    real = train.setup
    train.setup = lambda *a, **k: built.append(1) or real(*a, **k)
    try:
        err = one_line_error(train.main, ["--data", str(path), "--steps", "2", "--batch", "2",
                                          "--sample-every", "0", "--out", str(tmp_path / "run")], capsys)
    finally:
        train.setup = real
    assert re.search(message, err), err
    assert not built and files(path) == before and not (tmp_path / "run").exists()


def test_cache_build_into_a_folder_that_holds_one_is_refused(cache, tmp_path):
    path = tmp_path / "cache"
    shutil.copytree(cache, path)
    before = files(path)
    with pytest.raises(data.ManifestError, match=r"cache already holds cache files \(index\.json, "):
        train.main(["--data", make_manifest(tmp_path), "--build-cache", str(path), "--batch", "2"])
    assert files(path) == before


def test_cache_shard_that_cannot_be_written_is_named_and_left_out(tmp_path, monkeypatch):
    """A full disk while a shard is written (here the safetensors writer's own error after half the file):
    one error naming the shard and the space it needs; no partial shard and no index.json are left."""
    def full(tensors, path, metadata=None):
        open(path, "wb").write(b"\0" * 100)
        raise safetensors.SafetensorError("No space left on device (os error 28)")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError, match=r"shard-00000-00000\.safetensors: cannot write \(No space left on "
                                      r"device \(os error 28\)\); it needs [\d.]+ MiB, [\d.]+ MiB are free "
                                      r"there"):
        train.main(["--data", make_manifest(tmp_path), "--build-cache", str(tmp_path / "c"), "--batch", "2"])
    assert os.listdir(tmp_path / "c") == []


# ------------------------------------------------------------------------------------------------------------
# the T5 mask: a cache without the padding, exactly

def test_masked_t5_encodes_a_caption_as_if_it_had_no_padding():
    torch.manual_seed(0)
    t5 = encoders.init_text_encoder(encoders.T5Encoder(model.CONFIGS["tiny"].t5), 0)
    ids = torch.randint(3, 60, (3, 16))
    lengths = [5, 16, 1]
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
    keep = torch.arange(16) < torch.tensor(lengths)[:, None]
    masked = t5(ids, keep)
    for i, n in enumerate(lengths):
        torch.testing.assert_close(masked[i, :n], t5(ids[i:i + 1, :n])[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(t5(ids)[0, :5], masked[0, :5], atol=1e-3)  # unmasked, padding changes them


def test_cache_with_t5_mask_stores_only_the_captions_tokens_and_reads_back_exactly(tmp_path):
    manifest = make_manifest(tmp_path)
    train.main(["--data", manifest, "--build-cache", str(tmp_path / "c"), "--batch", "2", "--t5-mask"])
    cfg = model.CONFIGS["tiny"]
    with safetensors.safe_open(str(shard(tmp_path / "c")), "pt") as f:
        n, rows = f.get_slice("item").get_shape()[0], f.get_slice("txt").get_shape()[0]
    assert rows < n * cfg.t5_max_len / 2  # "a photo of N red circles" is 7 of 16 positions with its end
    meta = data.cache_meta(cfg, 0, [32], 2.0, "fake image, ", t5_mask=True)
    cached = data.CachedData(str(tmp_path / "c"), meta, batch=2)
    with pytest.raises(data.ManifestError, match=r"encoders = .*'t5_mask': True"):
        data.CachedData(str(tmp_path / "c"), data.cache_meta(cfg, 0, [32], 2.0, "fake image, "), batch=2)
    system = selfe.SelfE(cfg, t5_mask=True)
    got = cached.batch([0, 1, 2, 3])
    captions = [f"a photo of {i} red circles" for i in range(4)]
    txt, vec = system.encode_text(captions)
    fake_txt, fake_vec = system.encode_text(["fake image, " + c for c in captions])
    for name, want in (("txt", txt), ("vec", vec), ("fake_txt", fake_txt), ("fake_vec", fake_vec)):
        torch.testing.assert_close(got[name], want, atol=0, rtol=0)
    assert (txt[:, 8:] == 0).all() and (txt[:, :7].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------------------------------------------------
# config.json and latest

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, untrained_tiny):
    root = tmp_path_factory.mktemp("ckpt")
    train.save_checkpoint(str(root / "run"), untrained_tiny, 1, FLAGS)
    return root / "run"


def edit_config(path, change):
    file = path / "step-0000001" / "config.json"
    meta = json.loads(file.read_text())
    change(meta)
    file.write_text(json.dumps(meta))


CONFIG_DAMAGE = {
    "hidden size the weights do not have": (
        lambda m: m["config"].update(hidden_size=192, num_heads=6),
        r"ema\.safetensors \(against .*config\.json\): cannot load: .*wrong shapes "
        r"\['double_blocks\.0\.img_attn\.proj\.bias: file \(96,\) vs model \(192,\)"),
    "blocks the weights do not have": (lambda m: m["config"].update(depth=3),
                                       r"ema\.safetensors \(against .*config\.json\): cannot load: missing "
                                       r"keys \['double_blocks\.2\."),
    "RoPE axes": (lambda m: m["config"].update(hidden_size=192),
                  r"config\.json: damaged: config\.axes_dim = \(4, 14, 14\), expected three even RoPE sizes "
                  r"summing to the head dim 64"),
    "absurd size": (lambda m: m["config"].update(hidden_size=2 ** 20, num_heads=2 ** 15),
                    r"ema\.safetensors \(against .*config\.json\): cannot load"),
    "a string for a number": (lambda m: m["config"].update(hidden_size="96"),
                              r"config\.json: damaged: config\.hidden_size = '96', expected an integer"),
    "true for a number": (lambda m: m["config"]["t5"].update(num_layers=True),
                          r"config\.json: damaged: config\.t5\.num_layers = True, expected an integer"),
    "resolution 0": (lambda m: m["config"].update(resolution=0),
                     r"config\.json: damaged: config\.resolution = 0, expected an integer in \[1, "),
    "resolution off the grid": (lambda m: m["config"].update(resolution=30),
                                r"config\.json: damaged: config\.resolution = 30, expected a multiple of 4 "
                                r"px"),
    "unknown key": (lambda m: m["config"].update(heads=3),
                    r"config\.json: damaged: unknown key 'config\.heads'"),
    "config a list": (lambda m: m.update(config=[1]), r"config\.json: damaged: config is a JSON list"),
    "flags a string": (lambda m: m.update(flags="x"), r"config\.json: damaged: 'flags' is a JSON str"),
    "anchor a string": (lambda m: m["flags"].update(anchor="512"),
                        r"config\.json: damaged: flags\.anchor = '512', expected an integer in \[1, 4095\]"),
    "negative step": (lambda m: m.update(step=-1), r"config\.json: damaged: step = -1"),
}


@pytest.mark.parametrize("case", CONFIG_DAMAGE)
def test_edited_or_damaged_config_is_named_before_any_weight_is_built(ckpt, tmp_path, case, capsys,
                                                                      monkeypatch):
    """sample.py on a checkpoint whose config.json was edited: one line naming the file and the key (or the
    weights it does not match), exit status 1, and the network never built."""
    change, message = CONFIG_DAMAGE[case]
    shutil.copytree(ckpt, tmp_path / "run")
    edit_config(tmp_path / "run", change)
    monkeypatch.setattr(selfe.SelfE, "__init__", lambda *a, **k: pytest.fail("the network was built"))
    err = one_line_error(sampler.main, ["--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "x.png"),
                                        "a red circle"], capsys)
    assert re.search(message, err), err


@pytest.mark.parametrize("content, message", [
    (b"\x89PNG\r\n\x1a\n\0\0", r"latest: damaged: holds b'\\x89PNG"),
    (b"../../elsewhere/step-0000001\n", r"latest: damaged: holds b'\.\./\.\./elsewhere"),
    (b"", r"latest: damaged: holds b''")])
def test_damaged_latest_is_named(ckpt, tmp_path, content, message, capsys):
    shutil.copytree(ckpt, tmp_path / "run")
    (tmp_path / "run" / "latest").write_bytes(content)
    run = str(tmp_path / "run")
    for main, argv in ((sampler.main, ["--ckpt", run, "--out", str(tmp_path / "x.png"), "a"]),
                       (train.main, ["--resume", "--out", run, "--steps", "2"])):
        err = one_line_error(main, argv, capsys)
        assert re.search(message, err) and "write the name of one of" in err, err


def test_raw_weights_are_checked_against_the_config_too(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "run")
    edit_config(tmp_path / "run", lambda m: m["config"].update(depth=3))
    with pytest.raises(encoders.CheckpointError, match=r"dcp: model\.double_blocks\.2\..* is missing in the "
                                                       r"checkpoint, .* by .*config\.json"):
        selfe.load_checkpoint(str(tmp_path / "run"), weights="model")


# ------------------------------------------------------------------------------------------------------------
# a planted training state does not run

class Payload:
    """Unpickling this runs code: it writes the file `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted") / "run"
    _train(out, "--steps", "2")
    return out


def test_resume_never_runs_a_planted_metadata_pickle(run2, tmp_path, capsys):
    """dcp/.metadata is a pickle: a planted one (here with a payload that writes a file) is refused, unrun, by
    --resume and by sample.py --weights model."""
    run, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(run2, run)
    (run / "step-0000002" / "dcp" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    err = one_line_error(train.main, ["--resume", "--out", str(run), "--steps", "4"], capsys)
    assert "step-0000002/dcp/.metadata: refused" in err and "builtins.exec" in err, err
    err = one_line_error(sampler.main, ["--ckpt", str(run), "--weights", "model", "--out",
                                        str(tmp_path / "x.png"), "a"], capsys)
    assert ".metadata: refused" in err and not marker.exists()


def test_resume_never_runs_a_planted_entry_of_the_training_state(run2, tmp_path, capsys, untrained_tiny):
    """The training state's non-tensor entries (the optimizer's hyperparameters) are pickles inside the shard
    files: a planted one is refused, unrun, naming the entry."""
    run, marker = tmp_path / "run", tmp_path / "ran"
    shutil.copytree(run2, run)
    opt = torch.optim.Adam(untrained_tiny.denoiser.parameters())
    state = selfe.training_state(untrained_tiny, opt)
    state["optimizer"]["param_groups"][0]["lr"] = Payload(marker)
    shutil.rmtree(run / "step-0000002" / "dcp")
    dcp.save(state, checkpoint_id=str(run / "step-0000002" / "dcp"), no_dist=True)
    err = one_line_error(train.main, ["--resume", "--out", str(run), "--steps", "4"], capsys)
    assert "dcp: refused entry optimizer.param_groups.0.lr" in err, err
    assert not marker.exists()


def test_metadata_that_points_outside_its_folder_is_refused(run2, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    file = run / "step-0000002" / "dcp" / ".metadata"
    meta = pickle.loads(file.read_bytes())  # our own file: safe to read without the check
    next(iter(meta.storage_data.values())).relative_path = "../../../secret"
    file.write_bytes(pickle.dumps(meta))
    with pytest.raises(encoders.CheckpointError, match=r"names the shard file '\.\./\.\./\.\./secret'"):
        selfe.load_training_state(str(run / "step-0000002"), selfe.SelfE(model.CONFIGS["tiny"]))


# ------------------------------------------------------------------------------------------------------------
# device and backend flags, checked when parsed

@pytest.mark.parametrize("argv, message", [
    (["--device", "banana"], "'banana' is not a device"),
    (["--device", "cuda:x"], "'cuda:x' is not a device"),
    (["--device", "meta"], "not a device that holds data"),
    (["--dist-timeout", "100000000000000"], "argument --dist-timeout"),
])
def test_device_flags_are_checked_when_parsed(argv, message, capsys):
    for main in (train.get_args, lambda a: sampler.main([*a, "a red circle"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, err
        if argv[0] == "--dist-timeout":
            break  # a train.py flag


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build with a GPU has cuda")
def test_a_device_this_torch_lacks_is_named(capsys):
    for device in ("cuda", "cuda:1"):
        with pytest.raises(SystemExit) as e:
            train.get_args(["--device", device])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "argument --device" in err and "use --device cpu" in err, err


def test_a_process_group_backend_this_torch_lacks_is_named(monkeypatch, capsys):
    monkeypatch.setattr(train.dist, "is_gloo_available", lambda: False)
    with pytest.raises(SystemExit) as e:
        train.get_args(["--precision", "bf16"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "needs torch.distributed's gloo backend" in err, err
    train.get_args(["--precision", "fp32"])  # no process group: no backend needed


# ------------------------------------------------------------------------------------------------------------
# saving: a full disk stops the run, and the previous checkpoint and `latest` survive

def test_too_little_space_stops_the_run_before_writing_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = train.shutil.disk_usage
    calls = []

    def usage(path):  # the disk fills up after the first checkpoint
        calls.append(path)
        u = real(path)
        return u._replace(free=u.free if len(calls) == 1 else 2 ** 20)
    monkeypatch.setattr(train.shutil, "disk_usage", usage)
    with pytest.raises(OSError, match=r"step-0000004\.tmp: checkpoint not written \(not enough free space\); "
                                      r"it needs [\d.]+ MiB, 1\.0 MiB were free there; .*latest still names "
                                      r"'step-0000002', untouched"):
        _train(out)
    assert sorted(os.listdir(out)) == ["latest", "log.jsonl", "step-0000002"]
    assert (out / "latest").read_text() == "step-0000002\n"
    monkeypatch.setattr(train.shutil, "disk_usage", real)
    assert [r["step"] for r in _train(out, "--resume")] == [3, 4]  # space freed: it resumes


def test_a_write_that_fails_midway_leaves_no_step_folder(tmp_path, monkeypatch):
    """--ckpt-sync, a write error while the EMA rows go out: the .tmp folder is removed, `latest` and the
    previous checkpoint stay as they were."""
    out = tmp_path / "run"
    _train(out, "--steps", "2", "--ckpt-sync")
    before = files(out / "step-0000002")

    def full(file, ema, offsets):
        open(file, "r+b").write(b"\1" * 1000)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(train, "write_ema_rows", full)
    with pytest.raises(OSError, match=r"step-0000004\.tmp: checkpoint not written \(OSError: \[Errno 28\] No "
                                      r"space left on device\)"):
        _train(out, "--resume", "--ckpt-sync")
    assert sorted(os.listdir(out)) == ["latest", "log.jsonl", "step-0000002"]
    assert files(out / "step-0000002") == before and (out / "latest").read_text() == "step-0000002\n"


FULL_DISK = '''
import hashlib, json, os, pathlib, resource, signal, sys
import train
real, hashes = train.save_checkpoint, sys.argv.pop(1)

def filling(out, system, step, *a, **k):
    # from step 4 on no file may grow past 8 MiB: the training state's shard (17 MiB) cannot be written
    if step == 4:
        train.finish_checkpoint(wait=True)  # step 2's, still being written on its thread
        run = pathlib.Path(out)
        json.dump({str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                   for p in run.rglob("*") if p.is_file() and "step-" in str(p)}, open(hashes, "w"))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 2 ** 20, resource.RLIM_INFINITY))
    return real(out, system, step, *a, **k)

train.save_checkpoint = filling
import cli
cli.run(train.main)
'''


def test_a_disk_that_fills_while_writing_in_the_background_stops_the_run_in_one_line(tmp_path):
    """The real writers (dcp's, on the writing thread) meet a file-size limit halfway through step 4's
    checkpoint: one line naming it and what it needs, exit status 1, no traceback; `latest` and step 2's
    checkpoint as they were, no step-4 folder left."""
    (tmp_path / "filling.py").write_text(FULL_DISK)
    out, hashes = tmp_path / "run", tmp_path / "hashes.json"
    p = subprocess.run([sys.executable, str(tmp_path / "filling.py"), str(hashes), "--steps", "4",
                        "--batch", "4", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0",
                        "--out", str(out)], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert lines[-1].startswith("filling.py: error: "), lines[-1]
    assert "step-0000004.tmp: checkpoint not written" in lines[-1], lines[-1]
    assert re.search(r"it needs [\d.]+ MiB, [\d.]+ [MG]iB were free there when it began, [\d.]+ [MG]iB now; "
                     r".*latest still names 'step-0000002', untouched", lines[-1]), lines[-1]
    assert sorted(os.listdir(out)) == ["latest", "log.jsonl", "step-0000002"]
    assert (out / "latest").read_text() == "step-0000002\n"
    assert {k: v for k, v in files(out).items() if k.startswith("step-")} == json.loads(hashes.read_text())


def test_a_checkpoint_written_in_the_background_holds_the_state_of_its_step(tmp_path):
    """Training goes on while step 2's checkpoint is written from its host copy: the files are those the
    in-loop writer makes."""
    _train(tmp_path / "thread")
    _train(tmp_path / "loop", "--ckpt-sync")
    for step in ("step-0000002", "step-0000004"):
        for name in ("ema.safetensors", "frozen.safetensors"):
            thread, loop = (tmp_path / run / step / name for run in ("thread", "loop"))
            assert thread.read_bytes() == loop.read_bytes(), (step, name)
        a, _ = selfe.load_checkpoint(str(tmp_path / "thread" / step), weights="model")
        b, _ = selfe.load_checkpoint(str(tmp_path / "loop" / step), weights="model")
        for (k, v), w in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values()):
            assert torch.equal(v, w), k
    ema = safetensors.torch.load_file(str(tmp_path / "thread" / "step-0000002" / "ema.safetensors"))
    assert ema.keys() == model.MMDiT(model.CONFIGS["tiny"]).state_dict().keys()


def test_ema_file_written_by_three_processes_holds_the_sharded_ema(tmp_path):
    """Three processes shard some tensors unevenly (32 rows: 11, 11, 10); each writes its own rows of
    ema.safetensors in place. The file equals the EMA in the same checkpoint's sharded training state."""
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "3",
                        "--standalone", "train.py", "--steps", "2", "--batch", "3", "--log-every", "1",
                        "--ckpt-every", "2", "--sample-every", "0", "--out", str(out)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    step = out / "step-0000002"
    system = selfe.SelfE(model.CONFIGS["tiny"])
    system.make_ema()
    selfe.load_training_state(str(step), system)
    ema = safetensors.torch.load_file(str(step / "ema.safetensors"))
    assert ema.keys() == system.ema.state_dict().keys()
    assert any(v.shape[0] % 3 for v in ema.values())
    for k, v in system.ema.state_dict().items():
        assert torch.equal(ema[k], v), k
