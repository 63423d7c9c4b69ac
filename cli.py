"""What the command lines (train.py, sample.py, evaluate.py) share: flag types that check their range when the
flags are parsed, and the one place where the project's errors become a one-line message and an exit status.

Bad input is named, never a traceback: a flag out of range is argparse's usage error (exit status 2)
naming the flag; a bad file (a manifest line, an image, a damaged or missing checkpoint, a path that
cannot be written) is one line naming the file and what to do (exit status 1). Anything else is a bug
and keeps its traceback.
"""
import argparse
import math
import os
import sys

import torch

import data
import encoders

# The errors a user fixes by changing their input. OSError covers files that are missing,
# unreadable or unwritable.
INPUT_ERRORS = (data.ManifestError, encoders.CheckpointError, OSError)

# Seeds key random generators (data.stream_seed), at most as seed * 2^40 + (step << 20) + position (train.py):
# below 2^23 every key fits the 64 bits a torch.Generator takes.
MAX_SEED = 2 ** 23 - 1
# Step counts: far past where more steps change a sample, so a larger count is a typo.
MAX_STEPS = 1000
# --dist-timeout: a week; Python's timedelta overflows near 10^14 seconds, long before anyone means it.
MAX_TIMEOUT = 7 * 24 * 3600


def run(main, argv=None):
    """Call a command line's main(argv); an input error becomes one line on stderr and exit status 1."""
    try:
        return main(argv)
    except INPUT_ERRORS as e:
        message = " ".join(str(e).splitlines()) or type(e).__name__
        print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr, flush=True)
        raise SystemExit(1)


def number(kind=int, lo=None, hi=None):
    """An argparse `type`: an int or a finite float (`kind`) within [lo, hi] (either end open when None)."""
    span = (f"in [{lo}, {hi}]" if lo is not None and hi is not None else f">= {lo}" if lo is not None
            else f"<= {hi}" if hi is not None else "finite")

    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(x) or (lo is not None and x < lo) or (hi is not None and x > hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not {span}")
        return x
    return parse


def cpu_threads(requested=None):
    """Torch's intra-op threads on the CPU: `requested` (a --threads flag), else one per core that is not
    already busy (the cores this process may use less the 1-minute load average, shared among torchrun's
    processes on the machine, at least one). Two threads
    on two cores of which one runs another job stall each other at every parallel op (the tiny preset ran
    about 6x slower so: docs/results.md), while an idle second core adds little (about 1.2x) to its small
    matrices. Returns the count it set."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))         # torchrun's processes on this machine
    n = requested or max(1, (cores - round(os.getloadavg()[0])) // processes)
    torch.set_num_threads(n)
    return n


seed = number(int, 0, MAX_SEED)
# mu(L) runs from 0.5 at the anchor length to 1.15 at 4096 tokens (losses.mu_of_length):
# the anchor lies below 4096
anchor = number(int, 1, 4095)


def s_schedule(text):
    """--s-schedule of sample.py and evaluate.py: 'next', 'current' or a number a in [0, 1]
    (sample.second_times)."""
    if text in ("next", "current"):
        return text
    try:
        a = float(text)
    except ValueError:
        a = math.nan
    if not 0 <= a <= 1:
        raise argparse.ArgumentTypeError(f"{text!r}: use next (s_k = t_(k+1)), current (s_k = t_k) or "
                                         "a number in [0, 1]")
    return text


def step_counts(text):
    """--sweep of sample.py, --steps of evaluate.py: distinct comma-separated step counts,
    each in [1, MAX_STEPS]."""
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected step counts like 1,2,4,8,50") from None
    if not steps or min(steps) < 1 or max(steps) > MAX_STEPS or len(set(steps)) != len(steps):
        raise argparse.ArgumentTypeError(f"{text!r}: step counts must be distinct integers in "
                                         f"[1, {MAX_STEPS}]")
    return steps


def device(text):
    """An argparse `type` for --device: a device torch knows and this machine has (cpu; cuda or cuda:N with
    that many GPUs; another accelerator this torch was built with), checked before anything is built."""
    import torch
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device: use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return text
    backend = getattr(torch, dev.type, None)
    if dev.type == "meta" or not hasattr(backend, "is_available"):
        raise argparse.ArgumentTypeError(f"{text!r}: not a device that holds data; use cpu or cuda")
    if not backend.is_available():
        built = getattr(getattr(torch.backends, dev.type, None), "is_built", lambda: True)()
        why = (f"this torch ({torch.__version__}) is built without {dev.type}" if not built
               else f"this machine has no {dev.type} device this torch can use")
        raise argparse.ArgumentTypeError(f"{text!r}: {why}; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if dev.index is not None and dev.index >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} {dev.type} device(s), "
                                         f"numbered from 0")
    return text


def writable_folder(text):
    """An argparse `type` for an output folder: it is a folder or can be made as one
    (its nearest existing ancestor is a folder we may write in), so that a long run does not fail only
    when it first writes."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    _check_writable(text)
    return text


def image_file(text):
    """An argparse `type` for an output image: a file name with an extension PIL writes (.png, .jpg, ...), in
    a folder that exists or can be made, checked before any sampling."""
    from PIL import Image
    ext = os.path.splitext(text)[1].lower()
    if Image.registered_extensions().get(ext) not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text!r} does not end in an image extension PIL writes: use .png "
                                         f"(or .jpg, .webp, ...)")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name such as {text}/sample.png")
    _check_writable(os.path.dirname(os.path.abspath(text)))
    return text


def _check_writable(folder):
    """The nearest existing ancestor of `folder` (or itself) is a folder we may write in."""
    path = os.path.abspath(folder)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise argparse.ArgumentTypeError(f"cannot make {folder!r}: {path} is a file")
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in {path}")
