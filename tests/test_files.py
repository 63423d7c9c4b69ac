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
