"""Train Self-E, or the plain flow-matching baseline with the identical network and budget.

    python train.py                                   # tiny preset on the built-in shapes world, CPU, minutes
    python train.py --objective fm                    # the flow-matching baseline (Table 2)
    python train.py --resume                          # continue the run in --out from its latest checkpoint
    python train.py --init-from runs/tiny --out runs/tiny-ft   # another run's weights, a fresh optimizer
    torchrun --nproc_per_node 8 train.py --size 2b --data manifest.tsv --pretrained FLUX_DIR
    torchrun --nnodes 4 --nproc_per_node 8 ... train.py --size 2b --data CACHE   # HSDP: sharded within a node
    torchrun --nproc_per_node 2 train.py              # also on CPU (gloo), for testing
    python train.py --size 2b --data manifest.tsv --pretrained FLUX_DIR --build-cache CACHE  # encoders once
    python train.py --size 2b --data CACHE            # then train from the cache, no frozen encoders loaded
    python bench.py --plan --size 2b --micro-batch 16 --world 8   # memory per GPU, before renting any

Read top to bottom: flags (get_args; settle_flags adds a resumed run's own and the micro-steps the memory
plan fits, then they stay as saved), distributed set-up (torchrun's environment; FSDP2 per block), the memory
check, the loop (`train`: draw dropout, t, s -> encode -> losses.py -> backward -> update, EMA -> log), then
its parts in the order it calls them: the run folder, one step, logging, checkpoints.
(--build-cache hands the frozen parts to data.write_cache.) The recipe is docs/method.md §9: Adam (0.9, 0.95),
warmup then linear decay to 1e-5, EMA; the tau anneal and the auxiliary-term start are fractions of the run
(paper: 300k and 550k of 710k iterations); §9 also gives the paper's runs as commands. log.jsonl holds one
record per logged window (means over its steps, the loss by t-bin, throughput; the first record of a process
also the commit, preset and flags: docs/formats.md §7), which `python plots.py` draws.

One code path serves 1 or N processes. The global batch is split as batch = per-rank batch x world
size x --accum. A step's caption dropout, t and s are drawn for the whole global batch from a generator seeded
by (seed, step), the same on every rank, and each sample's noises from one seeded by
(seed, step, its position) (data.stream_seed); the data order is a function of the step too. So N processes
follow the 1-process trajectory, and a resumed run continues exactly.

Precision: fp32 throughout by default on CPU. bf16 (the default on GPU) is FSDP2's mixed precision, in one
process too (a one-rank process group), so that 1 and N processes compute alike: bf16 weights and activations
in the network; fp32 sharded parameters, gradient reduction, Adam and EMA; t, s and the RoPE positions are
never cast (model.MMDiT.forward). Where a shard group is one device, its bf16 weights are cast once per step
and kept through every pass of it (docs/scaling.md §2). Over nodes the states are sharded within a node and
replicated across nodes (HSDP, --shard). Nothing in a step waits on the device: the per-sample terms stay
there until a log step, and a step with a non-finite gradient is skipped on the device (Adam and the EMA leave
it out); --max-skips of them in a row stop the run at the next read, with the weights from before them
(docs/scaling.md §5).
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import json
import math
import os
import re
import shutil
import subprocess
import time
import warnings

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.staging import BlockingAsyncStager
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import cli
import data
import encoders
import losses
import memory
import model
import sample as sampler
import selfe
from cli import number
from encoders import CheckpointError
from model import CONFIGS

# the preview grids' prompts unless --preview-prompts
PREVIEW_PROMPTS = ["a red circle to the left of a blue square", "a photo of a green circle",
                   "a photo of three squares", "a photo of a triangle above a circle",
                   "a photo of a white square and a purple triangle"]
# FSDP2 warns on nn.Linear's 3-D output; we never modify the denoiser's output in place
warnings.filterwarnings("ignore", message=".*returned a view tensor")
# dcp warns that one process saves alone; that is intended
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
# TFLOP/s: dense bf16 matmul measured on one H100 (the datasheet says 989); the H200 is the same chip
H100_PEAK = 789.0
# share of a device's memory the memory plan may fill: temporaries and the allocator's slack need the rest
FIT = 0.85


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(CONFIGS), help="model preset")
    p.add_argument("--set", type=preset_field, action="append", default=[], metavar="FIELD=VALUE",
                   help="change one field of the preset (model.Config), e.g. --set theta=100 "
                   "--set mlp_ratio=2; saved with the checkpoint, which sample.py and evaluate.py "
                   "rebuild from")
    p.add_argument("--data", default="shapes",
                   help="'shapes' (built-in world), a TSV manifest (image path<TAB>prompt) or a cache folder "
                   "made by --build-cache")
    p.add_argument("--base-dir", default=None,
                   help="base for relative manifest paths (default: the manifest's folder)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip malformed manifest lines and unusable images")
    p.add_argument("--workers", type=number(int, 1), default=4,
                   help="threads decoding a manifest's images, a step ahead")
    p.add_argument("--resolution", type=areas, default=None,
                   help="bucket areas in pixels, e.g. 256 or 256,512 (the 1:1 mix of docs/method.md §9, "
                   "A 13); default: the preset's")
    p.add_argument("--max-ratio", type=number(float, 1), default=2.0,
                   help="widest bucket aspect ratio (1: square crops; A 13)")
    p.add_argument("--world", default=None, choices=list(data.WORLDS),
                   help="shapes world (default: the preset's)")
    p.add_argument("--typed", type=number(float, 0, 1), default=0.3,
                   help="shapes world: share of captions worded as a person might type them "
                   "(data.typed_caption) rather than in the evaluation templates")
    p.add_argument("--pretrained", default=None, help="FLUX.1 snapshot folder: T5-XXL, CLIP-L, autoencoder")
    p.add_argument("--t5", default=None, help="T5 v1.1 XXL folder (overrides --pretrained's)")
    p.add_argument("--clip", default=None, help="CLIP ViT-L/14 text folder (overrides --pretrained's)")
    p.add_argument("--vae", default=None, help="FLUX autoencoder file (overrides --pretrained's)")
    p.add_argument("--objective", default="selfe", choices=("selfe", "fm"))
    p.add_argument("--steps", type=number(int, 1), default=None, help="iterations (default: the preset's)")
    p.add_argument("--batch", type=number(int, 1), default=None, help="global batch (default: the preset's)")
    p.add_argument("--accum", type=number(int, 1), default=None, help="gradient accumulation micro-steps per "
                   "iteration (default: the fewest with which the memory plan fits the GPU; 1 on CPU)")
    p.add_argument("--lr", type=number(float, 0), default=None,
                   help="peak learning rate (default: the preset's)")
    p.add_argument("--lr-min", type=number(float, 0), default=1e-5,
                   help="learning rate at the last step (linear decay; A 9)")
    p.add_argument("--warmup", type=number(int, 0), default=None,
                   help="warmup iterations (default: min(1000, steps / 20); A 22)")
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="A 9: minFM's default")
    p.add_argument("--ema", type=number(float, 0, 1), default=None,
                   help="EMA decay (paper 0.9999; default: the preset's; A 19)")
    p.add_argument("--out", type=cli.writable_folder, default=None,
                   help="run folder (default: runs/<size>[-fm])")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/latest (implied on a torchrun restart)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run: its "
                   "checkpoints, log and previews are deleted first (without it such an --out is refused)")
    p.add_argument("--reschedule", action="store_true",
                   help="with --resume: fit warm-up, learning-rate decay, tau anneal and auxiliary-term "
                   "start to this --steps (default: keep the resumed run's)")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start from the model and EMA weights of another run's checkpoint (run or step "
                   "folder), with a fresh optimizer and schedule")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=number(int, 1), default=None,
                   help="CPU threads (default: one per idle core, cli.cpu_threads)")
    p.add_argument("--precision", default=None, choices=("bf16", "fp32"),
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU); parameters, EMA, "
                   "optimizer stay fp32")
    p.add_argument("--memory-gib", type=number(float, 0), default=None,
                   help="per-device memory the memory plan must fit (default: the GPU's; not checked on CPU)")
    p.add_argument("--dist-timeout", type=number(int, 1, cli.MAX_TIMEOUT), default=1800,
                   help="seconds a rank waits on the others (also when connecting), before the job fails and "
                   "torchrun may restart it (at most a week)")
    p.add_argument("--shard", type=number(int, 1), default=None,
                   help="ranks that shard one copy of the weights, gradients and optimizer state: HSDP, "
                   "sharded within --shard ranks and replicated across world / --shard copies (default: "
                   "the ranks of one node, torchrun's LOCAL_WORLD_SIZE; the world size shards over all)")
    p.add_argument("--max-skips", type=number(int, 1), default=3,
                   help="steps in a row with a non-finite gradient (each skipped) that stop the run")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--compile-fallback", action="store_true",
                   help="with --compile: run a block that fails to compile uncompiled (with dynamo's "
                   "warning) instead of stopping")
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing per transformer block")
    p.add_argument("--peak-tflops", type=number(float, 0), default=None,
                   help="per-device peak for MFU (default: H100 and H200 789)")
    p.add_argument("--log-every", type=number(int, 1), default=50)
    p.add_argument("--ckpt-every", type=number(int, 1), default=500)
    p.add_argument("--ckpt-sync", action="store_true", help="write checkpoints in the loop, which waits for "
                   "them, instead of on a thread from a copy of the state in host memory (for a host short "
                   "of memory: the copy is as large as the process's share of the training state)")
    p.add_argument("--sample-every", type=number(int, 0), default=1000,
                   help="preview grid every N steps (0: never)")
    p.add_argument("--preview-prompts", default=None, metavar="FILE",
                   help="the preview grids' prompts, one per line or GenEval .jsonl (default: five of the "
                   "shapes world); --build-cache stores their encodings in the cache")
    p.add_argument("--build-cache", default=None, metavar="DIR",
                   help="encode --data (a manifest) into DIR and exit")
    p.add_argument("--cache-batch", type=number(int, 1), default=16,
                   help="images per encoder call of --build-cache")
    # The method's options; each assumption of docs/method.md (A n, its section 11) is one flag
    # with its stated default.
    m = p.add_argument_group("method (docs/method.md; A n = its assumption n, section 11)")
    m.add_argument("--p-drop", type=number(float, 0, 1), default=0.1,
                   help="caption dropout for guidance (A 1)")
    m.add_argument("--p-equal", type=number(float, 0, 1), default=0.5,
                   help="probability of s = t (s.13, A 4)")
    m.add_argument("--tau-frac", type=number(float, 0), default=300 / 710,
                   help="tau anneals 0 -> 1 over this fraction (s.13, A 22)")
    m.add_argument("--aux-start-frac", type=number(float, 0), default=550 / 710,
                   help="auxiliary term from this fraction (S.2, A 22)")
    m.add_argument("--k", type=number(float, 0, 1), default=0.9, help="classifier-score share of Delta (s.6)")
    m.add_argument("--fake-prefix", default="fake image, ", help="c_fake = prefix + prompt (A 8)")
    m.add_argument("--fake-weight", type=number(float, 0), default=1.0, help="weight of L_fake (s.8, A 8)")
    m.add_argument("--anchor", type=cli.anchor, default=512,
                   help="patch count where mu = 0.5 (paper 512, minFM 256; below 4096, where mu = 1.15; A 6)")
    m.add_argument("--t-min", type=number(float, 1e-6, 1), default=1e-3,
                   help="clamp of t in the 1/t^2 weight (A 11)")
    m.add_argument("--no-target-norm", action="store_true",
                   help="Eq. 16 instead of the normalized target (Eq. 20)")
    m.add_argument("--reuse-noise", action="store_true",
                   help="re-noise x0_hat with eps, not fresh noise (A 3)")
    m.add_argument("--dropped", default="jump", choices=("jump", "equal"),
                   help="caption-dropped samples: 'jump' keeps their s < t draw with Delta = 0 (c = phi: no "
                   "classifier score), 'equal' forces s = t (A 2)")
    m.add_argument("--delta-zero", action="store_true",
                   help="the control: Self-E's s, lambda and target (Eq. 17-21) with Delta = 0 everywhere, "
                   "no evaluation passes: what self-evaluation itself adds")
    m.add_argument("--t-uniform", type=number(float, 0, 1), default=0.0,
                   help="share of t drawn from U(0, 1) instead of the warped logit-normal (s.11-s.12), so "
                   "that t near 1 (one-step sampling) is trained on short runs (not in the paper: 0; A 25)")
    m.add_argument("--t5-mask", action="store_true",
                   help="T5 does not attend to the caption's padding and its states there are zero, so a "
                   "cache stores only the caption's own tokens (not in the paper, which follows FLUX: off; "
                   "A 26)")
    m.add_argument("--ema-warmup", action="store_true",
                   help="warm the EMA decay up as min(d, (1 + n)/(10 + n)) (not in the paper, which keeps "
                   "it constant; A 19)")
    args = p.parse_args(argv)
    # the flags given on the command line (the rest are defaults): a resumed run takes its own for those
    # (--set appends to its list, so its mark is an empty list of its own)
    unset, no_set = object(), []
    given = vars(p.parse_args(argv, argparse.Namespace(**{k: no_set if k == "set" else unset
                                                          for k in vars(args)})))
    args.passed = sorted(k for k, v in given.items() if v is not unset and not (k == "set" and v is no_set))
    cfg = preset_config(args)
    if args.set:  # a preset changed by hand must still make a network
        side = cfg.latent_channels * cfg.patch ** 2
        if cfg.in_channels != side:
            p.error(f"argument --set: in_channels must be {cfg.latent_channels} x patch^2 = {side} "
                    f"(got {cfg.in_channels}; set both)")
        try:
            with torch.device("meta"):
                model.MMDiT(cfg)
        except (AssertionError, ValueError, RuntimeError) as e:
            p.error(f"argument --set: {e}")
    # What the run uses where the command line left a flag out, each named in `derived` with where it comes
    # from; config.json saves every flag, `passed` (what was asked for) and `derived`.
    derived = {}

    def derive(name, value, why):
        setattr(args, name, value)
        derived[name] = why
    for name, default in (("steps", cfg.steps), ("batch", cfg.batch), ("lr", cfg.lr), ("ema", cfg.ema_decay),
                          ("world", cfg.world), ("resolution", [cfg.resolution])):
        if getattr(args, name) is None:
            derive(name, default, f"preset {args.size}")
    if args.warmup is None:
        derive("warmup", min(1000, args.steps // 20), "min(1000, steps / 20)")
    # the length warm-up, decay and the method's fractions span (see --reschedule)
    derive("schedule_steps", args.steps, "steps")
    if args.precision is None:
        derive("precision", "bf16" if args.device.startswith("cuda") else "fp32", "device")
    if args.device.startswith("cuda") and "LOCAL_RANK" in os.environ:   # under torchrun: the process's GPU
        derive("device", f"cuda:{int(os.environ['LOCAL_RANK'])}", "LOCAL_RANK")
    if args.delta_zero and args.objective != "selfe":
        p.error("--delta-zero is a control of the selfe objective")
    if args.overwrite and args.resume:
        p.error("--overwrite starts afresh and --resume continues: pass one of them")
    if args.reschedule and not args.resume:
        p.error("--reschedule changes the schedule of a resumed run: pass it with --resume")
    if args.init_from and args.resume:
        p.error("--init-from starts a new run from a checkpoint's weights and --resume continues the run in "
                "--out: pass one of them")
    if args.compile_fallback and not args.compile:
        p.error("--compile-fallback goes with --compile")
    check_backend(p, args)
    if args.out is None:
        derive("out", os.path.join("runs", args.size + ("-fm" if args.objective == "fm" else "")
                                   + ("-delta0" if args.delta_zero else "")), "size, objective")
    args.derived = derived
    return args


def preset_field(text):
    """--set FIELD=VALUE: one field of model.Config, its value read as the field's type."""
    name, eq, value = text.partition("=")
    fields = {f.name: f for f in dataclasses.fields(model.Config)}
    kinds = {int: int, float: float, str: str, bool: lambda v: {"true": True, "false": False}[v.lower()],
             tuple: lambda v: tuple(int(x) for x in v.split(","))}  # (axes_dim: 4,14,14)
    if not eq or name not in fields or fields[name].type not in kinds:
        settable = ", ".join(n for n, f in fields.items() if f.type in kinds)
        raise argparse.ArgumentTypeError(f"{text!r}: use FIELD=VALUE with FIELD one of {settable}")
    try:
        return name, kinds[fields[name].type](value)
    except (ValueError, KeyError):
        kind = fields[name].type.__name__
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a {kind}") from None


def preset_config(args):
    """The preset --size names, with the fields --set changes."""
    return dataclasses.replace(CONFIGS[args.size], **dict(args.set))


def check_backend(p, args):
    """What --device needs beyond existing (cli.device): train.py runs on the CPU or CUDA GPUs, and where it
    makes a process group (under torchrun, or for bf16 in one process) torch must have that group's backend
    built in, NCCL for GPUs and gloo for the CPU; under torchrun each process needs its own GPU."""
    kind = torch.device(args.device).type
    if kind not in ("cpu", "cuda"):
        p.error(f"argument --device: {args.device!r}: train.py trains on cpu or cuda")
    torchrun = "RANK" in os.environ
    if not (torchrun or args.precision == "bf16"):
        return
    backend = "nccl" if kind == "cuda" else "gloo"
    why = "torchrun" if torchrun else "--precision bf16 (FSDP2's mixed precision, in a one-process group)"
    if not (dist.is_available() and getattr(dist, f"is_{backend}_available")()):
        p.error(f"argument --device: {args.device!r} under {why} needs torch.distributed's {backend} "
                f"backend, which this torch ({torch.__version__}) is built without")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if kind == "cuda" and torchrun and local >= torch.cuda.device_count():
        p.error(f"argument --device: process LOCAL_RANK {local} needs a GPU of its own, this machine has "
                f"{torch.cuda.device_count()}: start at most that many processes per node")


def areas(text):
    """--resolution: comma-separated bucket areas in pixels, each >= 1."""
    return [number(int, 1)(r) for r in text.split(",")]


def lr_at(step, args):
    """Linear warmup, then linear decay from --lr to --lr-min at the last step of the schedule
    (docs/method.md §9, A 9)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.schedule_steps - args.warmup)
    return args.lr + (args.lr_min - args.lr) * min(1.0, frac)


# ------------------------------------------------------------------------------------------------------------
# Distributed set-up: torchrun's environment decides; FSDP2 shards every transformer block and the root.

def init_distributed(args):
    """-> (rank, world size). Under torchrun: one process group (NCCL on GPUs, gloo on CPU), one GPU
    per process. bf16 in one process: a one-rank group, so that FSDP2's mixed precision computes
    there as it does on N."""
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    if "RANK" not in os.environ:
        if args.precision == "bf16":
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return 0, 1
    if args.device.startswith("cuda"):
        torch.cuda.set_device(args.device)                                  # cuda:LOCAL_RANK (get_args)
    # torchrun's store outlives a restart: keys under this attempt's prefix, so no worker
    # reads a dead one's address
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, timeout=timeout, rank=rank, world_size=world,
                            store=dist.PrefixStore(f"attempt-{attempt}", store))
    return dist.get_rank(), dist.get_world_size()


def shard_size(args, world):
    """Ranks per shard group (--shard, default one node's: torchrun's LOCAL_WORLD_SIZE); one that does not
    divide the world size stops here, before any weight is built."""
    shard = args.shard or min(world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if world % shard:
        raise SystemExit(f"--shard {shard} does not divide the world size {world}: pass a divisor of it "
                         f"(--shard {world} shards over all ranks)")
    return shard


def device_mesh(args, world):
    """The ranks as a (replicate, shard) grid (torch's DeviceMesh): FSDP2 shards each state over a row and
    all-reduces gradients down the columns (HSDP: within a node, then across nodes), or a 1-D mesh when one
    row holds every rank. None without a process group."""
    if not dist.is_initialized():
        return None
    shard = shard_size(args, world)
    device_type = torch.device(args.device).type
    if shard == world:
        return init_device_mesh(device_type, (world,), mesh_dim_names=("shard",))
    return init_device_mesh(device_type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def one_device_shards(mesh):
    """Whether a shard group is one device (one GPU, or pure replication): its bf16 copy of the weights then
    costs no communication to make, and is made once per step and kept (docs/scaling.md §2)."""
    return mesh is None or mesh.shape[-1] == 1


def parallelize(model, args, mesh=None, ema=False):
    """Per block: torch.compile of its forward, then activation checkpointing around it; then FSDP2 under a
    process group on `mesh` (default: every rank), each block its own shard group, so one block's
    parameters are gathered at a time. bf16 parameters for compute, fp32 gradient reduction (A 9); the
    sharded fp32 parameters are what the optimizer and the EMA see. FSDP casts no input
    (cast_forward_inputs=False): the network casts its activations itself and keeps t, s and RoPE in fp32.
    Where a shard group is one device the trained model keeps its gathered weights after forward (the passes
    of a step share one cast); the EMA (`ema`), which only runs forward and changes every step, reshards."""
    blocks = [*model.double_blocks, *model.single_blocks]
    for block in blocks:
        # sizes symbolic from the start: one graph serves every evaluation sub-batch and bucket
        if args.compile:
            block.forward = torch.compile(block.forward, dynamic=True)
        if args.act_ckpt:
            selfe.checkpoint_activations(block)
    if dist.is_initialized():
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.precision == "bf16" else None,
                                  reduce_dtype=torch.float32, cast_forward_inputs=False)
        mesh = mesh or init_device_mesh(torch.device(args.device).type, (dist.get_world_size(),))
        keep = one_device_shards(mesh) and not ema
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=not keep)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        if keep:  # through every backward of the step too (a block used twice re-gathers otherwise); update
            model.set_reshard_after_backward(False)  # reshards before the optimizer reads the shards
    return model


def setup(args, frozen_parts=True):
    """The system (denoiser, real frozen parts unless `frozen_parts` is False), the denoiser and its EMA
    sharded alike on the device mesh, Adam (its state sharded with them) and the per-device peak for MFU;
    train and bench.py share it. Adam is the fused one: it can skip a step on the device (found_inf), so no
    step waits on the host to read the gradient norm."""
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward failed with torch 2.11 + CUDA 13
    torch.manual_seed(args.seed)                                      # the same initial weights on every rank
    system = selfe.SelfE(preset_config(args), args.device, args.seed, args.pretrained, args.t5, args.clip,
                         args.vae, frozen_parts=frozen_parts, t5_mask=args.t5_mask)
    ema = system.make_ema()
    mesh = device_mesh(args, dist.get_world_size() if dist.is_initialized() else 1)
    net = parallelize(system.denoiser, args, mesh)
    parallelize(ema, args, mesh, ema=True)                             # the fp32 EMA, sharded like the net
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    name = device_name(system.device)
    peak = args.peak_tflops or (H100_PEAK if "H100" in name or "H200" in name else None)
    return system, net, ema, opt, peak


def compile_config(args):
    """torch.compile stays compiled or says so: hitting dynamo's recompile limit is an error, unless
    --compile-fallback asks for dynamo's own fallback (an uncompiled block, with a warning)."""
    if not args.compile:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(suppress_errors=args.compile_fallback,
                                      fail_on_recompile_limit_hit=not args.compile_fallback)


@contextlib.contextmanager
def compile_errors(args):
    """A failure inside torch.compile stops the run with one line that names the flags."""
    try:
        yield
    except (torch._dynamo.exc.TorchDynamoException, torch._dynamo.exc.FailOnRecompileLimitHit) as e:
        if not args.compile:
            raise
        inner = getattr(e, "inner_exception", None) or e             # a backend's own error, if it raised one
        cause = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
        raise SystemExit(f"--compile: torch.compile failed ({type(inner).__name__}: {cause[:300]}); run "
                         "without --compile, or add --compile-fallback to run what fails to compile "
                         "uncompiled") from e


def cpu_threads_note():
    n = torch.get_num_threads()
    return f" ({n} thread{'s' if n > 1 else ''})"


def log0(*a, rank=0):
    if rank == 0:
        print(*a, flush=True)


def main(argv=None):
    args = get_args(argv)
    if args.device == "cpu":
        cli.cpu_threads(args.threads)
    rank, world = init_distributed(args)
    finished = False
    try:
        if args.build_cache:
            result = build_cache(args, rank, world)
        else:
            run = settle_flags(args, rank, world)              # a resumed run's flags; the micro-steps
            with compile_config(args):
                result = train(args, rank, world, *run)
        finished = True
        return result
    finally:
        close_distributed(finished)


def close_distributed(finished):
    """The end of a process: the checkpoint thread joined and our gloo groups let go first, then, after a
    clean finish, every rank meets at a barrier before the process group is destroyed, so that no rank tears
    down its connections while another still uses them (an exit without it was seen to abort a rank under
    torchrun). After a failure there is no barrier: the other ranks may never reach it."""
    global _writer, _stager, _groups
    if _writer is not None:
        _writer.shutdown(wait=True)
    _writer = _stager = _groups = None
    if dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def build_cache(args, rank, world):
    """--build-cache: the frozen parts alone (no denoiser) encode the manifest once into a cache
    (data.write_cache), in bf16 on GPU (the autoencoder too), --cache-batch images at a time; the text is
    stored in the encoders' precision, as training would see it online."""
    cfg = preset_config(args)
    if args.data == "shapes" or data.is_cache(args.data):
        raise SystemExit("--build-cache needs --data MANIFEST.tsv")
    low = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    system = selfe.SelfE(cfg, args.device, args.seed, args.pretrained, args.t5, args.clip, args.vae,
                         denoiser=False, ae_dtype=low, t5_mask=args.t5_mask)
    source = data.ManifestData(args.data, args.resolution, bucket_step(system), 1, args.seed, args.base_dir,
                               args.skip_bad, args.max_ratio, workers=args.workers)
    prompts = preview_prompts(args)                                     # a bad prompt file stops here

    def encode_text(prompts):  # -> (txt, vec, how many of txt's states to keep)
        txt, vec = system.encode_text(prompts)
        return txt.to(low), vec.to(low), system.text.lengths(prompts)
    meta = {**data.cache_meta(cfg, args.seed, args.resolution, args.max_ratio, args.fake_prefix,
                              args.t5_mask),
            "downsample": system.downsample}
    data.write_cache(args.build_cache, source, system.encode_latents, encode_text,
                     fake_prefix=args.fake_prefix, meta=meta, batch=args.cache_batch, rank=rank, world=world)
    if rank == 0:  # for the preview grids of a run that trains from the cache without the text encoders
        data.write_previews(args.build_cache, prompts, lambda p: encode_text(p)[:2])


# ------------------------------------------------------------------------------------------------------------
# The memory check: before any weight is built, the memory plan (bench.py) against the device's memory.

def device_memory(args):
    """Bytes a device may hold: --memory-gib, or the GPU's; None on CPU (not checked)."""
    if args.memory_gib:
        return args.memory_gib * 2 ** 30
    if args.device.startswith("cuda"):
        return torch.cuda.get_device_properties(torch.device(args.device)).total_memory
    return None


def choose_accum(args, world, aux=True):
    """--accum, or the fewest micro-steps with which the memory plan fits the device (1 when its memory is
    unknown), for the part of the run with the auxiliary term (`aux`) or the part before it: train.py
    chooses each. The plan counts the frozen encoders when they run online. A batch that does not split, or
    a micro-batch that does not fit, stops here, naming the flags that would fit."""
    B, A = args.batch, args.accum
    if B % (world * (A or 1)):
        raise SystemExit(f"--batch {B} is not divisible by world size {world} x --accum {A or 1}")
    per_rank = B // world
    capacity = device_memory(args)
    if capacity is None:
        return A or 1
    gib = lambda x: f"{x / 2 ** 30:.1f} GiB"
    frozen = not data.is_cache(args.data)
    need = functools.cache(lambda a, ckpt: memory.memory_plan(
        preset_config(args), per_rank // a, max(args.resolution), world, ckpt, args.precision, args.objective,
        shard=shard_size(args, world), accum=a, aux=aux, frozen=frozen)["total"])
    options = [a for a in range(1, per_rank + 1) if per_rank % a == 0]
    first_fit = lambda ckpt: next((a for a in options if need(a, ckpt) <= FIT * capacity), None)
    if A and need(A, args.act_ckpt) <= FIT * capacity:
        return A
    if not A and first_fit(args.act_ckpt):
        return first_fit(args.act_ckpt)
    # what would fit: more micro-steps, or activation checkpointing (and as many micro-steps as it needs)
    hints = []
    for ckpt in sorted({args.act_ckpt, True}):
        a = first_fit(ckpt)
        if a is not None:
            flags = ("--act-ckpt " if ckpt and not args.act_ckpt else "") + (f"--accum {a}" if a > 1 else "")
            hints.append(f"{flags.strip()} ({gib(need(a, ckpt))})")
    a = A or options[-1]
    part = ("a Self-E step with the auxiliary term" if aux and args.objective == "selfe" else "a step")
    raise SystemExit(f"--size {args.size} --batch {B} on {world} device(s), --accum {a}"
                     f"{' --act-ckpt' if args.act_ckpt else ''}: a micro-batch of {per_rank // a} at "
                     f"{max(args.resolution)} px needs {gib(need(a, args.act_ckpt))} by the memory plan "
                     f"(python bench.py --plan; {part}), over {FIT:.0%} of the device's {gib(capacity)}; "
                     + (f"fits with {' or '.join(hints)}" if hints else "nothing fits: use more devices"))


# ------------------------------------------------------------------------------------------------------------
# Training

def settle_flags(args, rank, world):
    """The rest of parsing, once the run folder and the devices are known, before anything is built: a
    resumed run's own flags (prepare_out, keep_run_flags) and the micro-steps the memory plan fits, before
    the auxiliary term and with it (choose_accum; its pass keeps activations too: docs/scaling.md §3), each
    value not passed named in args.derived. From here on `args` is what the run uses and its checkpoints
    save. -> (the step folder to resume from or None, the first step, [micro-steps, with the aux term])"""
    shard_size(args, world)                                                # before anything is written
    resume_from, start = prepare_out(args, rank)
    if resume_from:
        start = skip_past_failure(args.out, start, rank)
    reaches_aux = has_aux(args) and round(args.aux_start_frac * args.schedule_steps) < args.steps
    accums = [choose_accum(args, world, aux=False),
              choose_accum(args, world, aux=True) if reaches_aux else None]
    if args.accum is None:                                     # (as the checkpoint's flags record it)
        args.accum, args.derived["accum"] = accums[0], "memory plan"
    return resume_from, start, accums


def has_aux(args):
    """Whether the objective has the auxiliary fake-prompt term at all (s.6-s.8; not under Delta = 0)."""
    return args.objective == "selfe" and not args.delta_zero


def train(args, rank, world, resume_from, start, accums):
    cfg = preset_config(args)
    B = args.batch
    init_from = init_source(args) if args.init_from and not resume_from else None
    cached = data.is_cache(args.data)
    if cached:                                         # every file of the cache is checked before building
        meta = data.cache_meta(cfg, args.seed, args.resolution, args.max_ratio, args.fake_prefix,
                               args.t5_mask)
        source = data.CachedData(args.data, meta, B, args.seed)
    previews = preview_source(args, cached, rank)                          # a bad prompt file stops here
    system, net, ema, opt, peak = setup(args, frozen_parts=not cached)

    if cached:
        null = tuple(source.null[k].to(system.device).float() for k in ("txt", "vec"))
    elif args.data == "shapes":
        shapes = data.WORLDS[args.world]
        if shapes.resolution != cfg.resolution or args.resolution != [cfg.resolution]:
            raise SystemExit(f"world {shapes.name!r} is {shapes.resolution} px; preset {args.size!r} is "
                             f"{cfg.resolution} px and --resolution {args.resolution}")
        room = cfg.prompt_words - len(encoders.WordTokenizer.words(args.fake_prefix))   # c_fake fits too
        source = data.ShapesData(shapes, B, seed=args.seed, typed=args.typed, max_words=room)
    else:
        source = data.ManifestData(args.data, args.resolution, bucket_step(system), B, args.seed,
                                   args.base_dir, args.skip_bad, args.max_ratio, workers=args.workers)
    if not cached:
        null = system.null_cond()                                          # phi, batch 1
    tau_steps = round(args.tau_frac * args.schedule_steps)
    aux_start = round(args.aux_start_frac * args.schedule_steps)
    aux_at = lambda step: has_aux(args) and step >= aux_start            # L_fake late (s.6-s.8)
    accum_at = lambda step: accums[1] if aux_at(step) else accums[0]
    flags = vars(args)
    if resume_from:
        selfe.load_training_state(resume_from, system, opt)
        if cfg.tokenizer == "words":
            frozen = os.path.join(resume_from, "frozen.safetensors")
            system.load_frozen_state(selfe.read_weights(frozen), frozen)
        log0(f"resumed from {resume_from} at step {start}", rank=rank)
    elif init_from:
        init_weights(init_from, system)
        log0(f"initialised from {init_from}: its model and EMA weights; optimizer and schedule start afresh",
             rank=rank)
    previews = preview_decoder(previews, args, system, null, rank)
    os.makedirs(args.out, exist_ok=True)
    n_params = sum(p.numel() for p in net.parameters())
    sample_flops = functools.lru_cache(system.denoiser.flops)            # forward FLOPs of one sample (L, Lt)
    phases = [accum_at(start), accum_at(args.steps - 1)]                 # the first step's, the last's
    split = " then ".join(f"{B // (world * a)} x {world} ranks x {a} accum" for a in dict.fromkeys(phases))
    log0(f"{args.size}: {n_params / 1e6:.2f}M denoiser parameters, objective {args.objective}, {args.steps} "
         f"steps x batch {B} (= {split}) on {args.device}"
         f"{cpu_threads_note() if system.device.type == 'cpu' else ''} in {args.precision}"
         + (f", sharded over {shard_size(args, world)} of {world} ranks" if world > 1 else "") + "; data "
         f"{args.data} ({len(source) if hasattr(source, '__len__') else 'unlimited'} items); tau over "
         f"{tau_steps} steps, aux from {aux_start}", rank=rank)
    # the first log record of this process says what runs: the commit, the preset and every flag
    run = {"commit": git_commit(), "start": start, "world": world, "config": cfg.to_dict(),
           "flags": dict(flags)} if rank == 0 else None

    # The next step's batch is read (rendered, decoded, pinned) on a thread while this step computes.
    prefetch = concurrent.futures.ThreadPoolExecutor(1)
    slices = lambda step: (B // (world * accum_at(step)), accum_at(step))  # (per-rank batch, micro-steps)
    ahead = prefetch.submit(fetch, source, start, rank, *slices(start), system.device)
    # steps skipped in a row so far, on the device (no sync); the first of them, once read back
    streak, first_skipped = torch.zeros((), dtype=torch.long, device=system.device), None
    history, pending, window = [], [], []                           # steps not yet read back; not yet logged
    t0 = t_window = time.time()
    for step in range(start, args.steps):
        items, parts = ahead.result()
        if step + 1 < args.steps:
            ahead = prefetch.submit(fetch, source, step + 1, rank, *slices(step + 1), system.device)
        b, A = slices(step)
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        # draw: the step's caption dropout, t and s for the whole global batch (the same on every rank)
        h, w = token_grid(parts[0], system, cached)                         # (buckets vary h, w)
        dropped, t, s = draw(args, step, B, h * w, tau_steps)
        evaluate = (s < t) & ~dropped & (not args.delta_zero)               # Delta = 0 for the rest
        n_self = int(evaluate.sum())                                        # on the host: no device sync
        aux = aux_at(step)
        G = functools.partial(system.predict, net, h=h, w=w)                # current weights, with grad
        G_ema = functools.partial(system.predict, ema, h=h, w=w)            # EMA: the conditional pass (S.2)
        terms = []
        for micro in range(A):
            first = (rank * A + micro) * b                                  # this slice's place in the batch
            sl = slice(first, first + b)
            # encode: images to latent tokens, captions (dropped ones as phi) through the text encoders
            x0, cond, fake = load_batch(parts[micro], source, system, dropped[sl], args.fake_prefix, cached)
            eps, eps_self = noise(args.seed, step, range(first, first + b), *x0.shape[1:], system.device)
            idx, weight = evaluated(evaluate[sl], b, world, args.compile)   # on the host
            if dist.is_initialized():
                micro_steps(net, micro, A, world)
            dev = lambda x: x.to(system.device, non_blocking=True)
            with compile_errors(args):
                # the loss (Eq. 21, or Eq. 3), then backward
                loss, micro_terms = objective(args, G, G_ema, x0, dev(t[sl]), dev(s[sl]), cond, null, eps=eps,
                                              eps_self=eps_self, evaluated=dev(idx), weight=dev(weight),
                                              fake=fake(idx) if aux and len(idx) else None,
                                              fake_norm=max(n_self, 1) * b / B)
                (loss / A).backward()
            terms.append(micro_terms)
        # update: clip, Adam, EMA (a non-finite step is skipped on the device)
        streak, grad_norm = update(net, opt, system, args, step, streak)

        L = h * w
        n_flops = step_flops(sample_flops(L, cond[0].shape[1]), B, n_self, aux)
        pending.append(dict(step=step, lr=lr, items=items, t=t, s=s, dropped=dropped, accum=A,
                            evaluate=evaluate, terms={k: torch.cat([m[k] for m in terms]) for k in TERMS},
                            grad_norm=grad_norm, streak=streak, flops=n_flops,
                            tokens=B * (L + cond[0].shape[1])))
        last = step + 1 == args.steps
        checkpointing = (step + 1) % args.ckpt_every == 0 or last
        finish_checkpoint(wait=False)                       # one written on a thread, once every rank is done
        # the pending steps to the host: one sync per window
        if (step + 1) % args.log_every == 0 or checkpointing:
            history += read_back(pending, world, args)
            first_skipped = nonfinite_stop(history[-len(pending):], pending, first_skipped, system, flags,
                                           opt, args, rank)
            window, pending = window + pending, []
            if (step + 1) % args.log_every == 0 or last:
                if rank == 0:
                    log(history[-len(window):], window, args, step, t_window, world, peak, system.device, run)
                window, t_window, run = [], time.time(), None
        if checkpointing:
            save_checkpoint(args.out, system, step + 1, flags, opt, background=not args.ckpt_sync)
        if previews and ((step + 1) % args.sample_every == 0 or last):
            preview(system, args, step + 1, rank, previews)
    prefetch.shutdown()  # (a run stopped early leaves the idle thread to the interpreter's exit)
    finish_checkpoint(wait=True)
    log0(f"done: {max(0, args.steps - start)} steps in {time.time() - t0:.0f} s; checkpoint in {args.out}",
         rank=rank)
    return history


# ------------------------------------------------------------------------------------------------------------
# The run folder: resume a run, or start one afresh without mixing it with another's files

# What a run writes in its folder; a fresh run refuses a folder that holds any of these unless --overwrite.
RUN_FILE = re.compile(r"latest(\.tmp)?|log\.(jsonl|png)|preview-\d+\.png|(nonfinite-)?step-\d+(\.tmp)?"
                      r"|nonfinite\.json(\.tmp)?")
SCHEDULE = ("schedule_steps", "warmup", "tau_frac", "aux_start_frac")


def prepare_out(args, rank):
    """What this run does with --out, decided before anything is
    built: -> (the step folder to resume from, its step) or (None, 0) for a fresh start. A fresh run never
    deletes or mixes with another run's checkpoints unless told to: an --out that holds a run is refused, or
    with --overwrite emptied of that run's files first."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    latest = os.path.join(args.out, "latest")
    if args.resume or (restarted and os.path.isfile(latest)):
        if not os.path.isfile(latest):
            raise CheckpointError(f"--resume: {args.out} holds no checkpoint (no {latest}); leave out "
                                  "--resume to start a run there")
        path = selfe.resolve_checkpoint(args.out)
        cfg, meta = selfe.read_meta(path)
        keep_run_flags(args, meta["flags"], path, rank)                      # --size too, unless passed
        if cfg != preset_config(args):
            raise CheckpointError(f"{path} was trained with another preset than --size {args.size}")
        return path, meta["step"]
    found = []
    if os.path.isdir(args.out):
        found = sorted(n for n in os.listdir(args.out) if RUN_FILE.fullmatch(n))
    # a restart with no checkpoint yet replaces its own first attempt
    if found and not (args.overwrite or restarted):
        raise CheckpointError(f"{args.out} already holds a run "
                              f"({', '.join(found[:3])}{', ...' * (len(found) > 3)}): pass "
                              "--resume to continue it, --overwrite to delete it and start afresh, "
                              "or choose another --out")
    if rank == 0:
        for name in found:
            path = os.path.join(args.out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    return None, 0


# On resume, what a passed flag may change, and what belongs to this machine and this invocation. Every
# other flag (preset, data, objective, the method's flags, seed, batch, learning rate, EMA...) is the run's.
MAY_CHANGE = ("steps", "log_every", "ckpt_every", "sample_every", "preview_prompts", "pretrained", "t5",
              "clip", "vae", "init_from")
MACHINE = ("device", "threads", "precision", "accum", "memory_gib", "peak_tflops", "dist_timeout", "workers",
           "compile", "compile_fallback", "act_ckpt", "ckpt_sync", "out", "resume", "overwrite", "reschedule",
           "build_cache", "cache_batch", "passed", "derived")


def shown(key, value):
    """A flag as it is typed: --seed 3, --resolution 256,512, --delta-zero / no --delta-zero."""
    name = "--" + key.replace("_", "-")
    if isinstance(value, bool):
        return name if value else f"no {name}"
    return f"{name} {','.join(map(str, value)) if isinstance(value, list) else value}"


def keep_run_flags(args, saved, path, rank):
    """A resumed run continues as it was started (`saved`: the flags in its config.json). A flag not passed
    takes the run's value; a passed flag that changes the method, the data or the randomness is refused,
    naming it, before any weight loads. Passed and said: where training stops (--steps), logging, checkpoints,
    previews, where the frozen parts are read from (MAY_CHANGE); this machine's flags are never the run's
    (MACHINE). The schedule (warm-up, the length of the learning-rate decay, the tau anneal and the
    auxiliary-term start, all fixed by the --steps the run was started with) stays: a different --steps only
    moves where training stops. --reschedule fits it to this run's flags instead. Either way a difference is
    said."""
    passed, restored, changed, refused = set(args.passed), [], [], []
    for key, was in saved.items():
        if key in MACHINE or key == "schedule_steps" or not hasattr(args, key):
            continue
        now = getattr(args, key)
        if key not in passed:
            if now != was and not (key == "warmup" and args.reschedule):  # refit below
                restored.append(shown(key, was))
                setattr(args, key, was)
                args.derived[key] = "the resumed run"
        elif now == was or key == "steps" or (key in SCHEDULE and args.reschedule):
            continue
        elif key in MAY_CHANGE:
            changed.append(f"{shown(key, now)} (the run: {shown(key, was)})")
        else:
            refused.append(f"{shown(key, now)} (the run: {shown(key, was)})")
    if refused:
        hint = (" or pass --reschedule to fit the schedule to new flags" if
                any(s.startswith(("--warmup", "--tau-frac", "--aux-start-frac")) for s in refused) else "")
        raise SystemExit(f"--resume: {'; '.join(refused)} would change the resumed run's method, data or "
                         f"randomness ({path}/config.json): leave {'them' if len(refused) > 1 else 'it'} "
                         f"out to continue it{hint}, or start a new run (another --out; --init-from {path} "
                         "starts from its weights)")
    if restored:
        log0(f"resume: the run's own flags: {', '.join(restored)}", rank=rank)
    if changed:
        log0(f"resume: changed from the run: {', '.join(changed)}", rank=rank)
    was = {k: saved.get(k, getattr(args, k)) for k in SCHEDULE}
    # runs saved before it had its own key
    was["schedule_steps"] = saved.get("schedule_steps", saved["steps"])
    warmup = args.warmup if "warmup" in passed else min(1000, args.steps // 20)  # get_args' default
    now = {"schedule_steps": args.steps, "warmup": warmup, "tau_frac": args.tau_frac,
           "aux_start_frac": args.aux_start_frac}
    for k, v in (now if args.reschedule else was).items():
        setattr(args, k, v)
    if was == now:
        return
    describe = lambda d: (f"warm-up {d['warmup']}, learning rate decaying to step {d['schedule_steps']}, tau "
                          f"over {round(d['tau_frac'] * d['schedule_steps'])} steps, auxiliary term from "
                          f"step {round(d['aux_start_frac'] * d['schedule_steps'])}")
    if args.reschedule:
        log0(f"--reschedule: the resumed run's schedule ({describe(was)}) becomes: "
             f"{describe(now)}", rank=rank)
        return
    log0(f"resume keeps the run's schedule ({describe(was)}); --steps {args.steps} only says where to stop. "
         f"Pass --reschedule for the schedule of these flags ({describe(now)})", rank=rank)


# What a network architecture is: a preset less its training defaults
TRAINING_DEFAULTS = ("batch", "steps", "lr", "ema_decay", "world")


def init_source(args):
    """--init-from: the step folder whose weights start this run, checked before any weight is built: it must
    hold the network of --size (its training defaults may differ)."""
    path = selfe.resolve_checkpoint(args.init_from)
    cfg, meta = selfe.read_meta(path)
    network = lambda c: {k: v for k, v in c.to_dict().items() if k not in TRAINING_DEFAULTS}
    if network(cfg) != network(preset_config(args)):
        raise CheckpointError(f"{path}: --init-from needs a checkpoint of the --size {args.size} network; "
                              f"this one was trained as --size {meta['flags'].get('size', '?')}")
    return path


def init_weights(path, system):
    """Model and EMA from a checkpoint's training state (dcp, whatever world size wrote it), or both from its
    ema.safetensors where it has no training state; the tiny preset's stand-in encoders from its
    frozen.safetensors, since the weights learned their encodings. Optimizer and schedule stay fresh."""
    if os.path.isfile(os.path.join(path, "dcp", ".metadata")):
        selfe.load_training_state(path, system)
    else:
        file = os.path.join(path, "ema.safetensors")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: neither a training state (dcp/) nor ema.safetensors to start "
                                    "from")
        weights = selfe.read_weights(file)
        for net in (system.denoiser, system.ema):  # full tensors on every rank, sharded as they load
            set_model_state_dict(net, weights, options=StateDictOptions(full_state_dict=True))
    if system.cfg.tokenizer == "words":
        frozen = os.path.join(path, "frozen.safetensors")
        system.load_frozen_state(selfe.read_weights(frozen), frozen)


# ------------------------------------------------------------------------------------------------------------
# One step: the batch, its times and noises, the objective, the update

def bucket_step(system):
    """Bucket sides are multiples of two patches of latent (32 px for FLUX's 8x autoencoder and patch 2)."""
    return 2 * system.cfg.patch * system.downsample


def fetch(source, step, rank, b, A, device):
    """The host side of a step for this rank, a function of (seed, step) alone: the global batch's items and
    this rank's A slices (images and captions, or cached rows), pinned on CUDA so that the copy to the device
    is asynchronous. Runs on the prefetch thread."""
    items = source.indices(step)                                        # the global batch, same on every rank
    mine = items[rank * b * A:(rank + 1) * b * A]
    parts = [source.batch(mine[m * b:(m + 1) * b]) for m in range(A)]
    if device.type == "cuda":
        pin = lambda x: x.pin_memory() if torch.is_tensor(x) else x
        parts = [{k: pin(v) for k, v in p.items()} if isinstance(p, dict) else tuple(map(pin, p))
                 for p in parts]
    return items, parts


def load_batch(part, source, system, dropped, fake_prefix, cached):
    """A fetched slice -> (x0 tokens (b, L, C), cond (txt, vec), fake); fake(idx)
    gives c_fake's encoding (s.8) for the samples idx, host indices (c_fake's prompts are strings: indices
    read back from the device would make the step wait on it). Online: images through the
    autoencoder (or pixels), captions with dropout applied through T5 and CLIP. Cached: the rows, with phi's
    encodings where the caption was dropped."""
    p = system.cfg.patch
    dev = lambda x: x.to(system.device, non_blocking=True)
    if cached:
        keep = dev(~dropped)

        def select(keys):  # the cached encodings, or phi's (and c_fake of phi) where dropped
            return tuple(torch.where(keep.view(-1, *[1] * (part[k].dim() - 1)), dev(part[k]),
                                     dev(source.null[k])).float() for k in keys)
        lat = dev(part["latent"])
        cond, fake_cond = select(("txt", "vec")), select(("fake_txt", "fake_vec"))
        fake = lambda idx: tuple(c[dev(idx)] for c in fake_cond)
    else:
        images, captions = part
        captions = [selfe.NULL_PROMPT if d else c for c, d in zip(captions, dropped.tolist())]
        lat = system.encode_latents(images)                                # (b, C, H/8, W/8) or pixels
        cond = system.encode_text(captions)                                # (b, Lt, d_txt), (b, d_vec)
        fake = lambda idx: system.encode_text([fake_prefix + captions[i] for i in idx.tolist()])
    return selfe.patchify(lat.float(), p), cond, fake


def token_grid(part, system, cached):
    """The token grid (h, w) of a fetched slice, before anything is encoded: its bucket's latent size (the
    cached latents', or the images' over the autoencoder's downsampling) over the patch size."""
    p = system.cfg.patch
    if cached:
        H, W = part["latent"].shape[2:]
        return H // p, W // p
    H, W = part[0].shape[2:]
    return H // system.downsample // p, W // system.downsample // p


def draw(args, step, B, L, tau_steps):
    """The step's randomness for the whole global batch, from one generator seeded by (seed, step), the same
    on every rank: -> which captions are dropped (A 1), t (s.11-s.12) and s (s.13), (B,) each on the host
    (s = t for flow matching)."""
    gen = torch.Generator().manual_seed(data.stream_seed(args.seed, step))
    dropped = losses.caption_dropout(B, args.p_drop, gen)
    t = losses.sample_t(B, L, args.anchor, generator=gen, uniform=args.t_uniform)
    s = losses.sample_s(t, losses.tau_at(step, tau_steps), args.p_equal,
                        dropped if args.dropped == "equal" else None, generator=gen)
    return dropped, t, (t if args.objective == "fm" else s)


def noise(seed, step, positions, L, C, device):
    """eps (Eq. 1) and eps' (the re-noising of s.6), (n, L, C) each, for the samples at these global-batch
    positions: each from its own generator seeded by (seed, step, position), so no rank draws noise it does
    not use, and a sample's noise does not depend on how the batch is split."""
    out = torch.empty(len(positions), 2, L, C, device=device)
    for k, i in enumerate(positions):
        g = torch.Generator(device).manual_seed(data.stream_seed(seed, (step << 20) + i, stride=1 << 40))
        out[k] = torch.randn(2, L, C, device=device, generator=g)
    return out[:, 0], out[:, 1]


def evaluated(marked, b, world, compiled):
    """Which samples of a slice of b the evaluation passes run on, `marked` (b,) bool on the host: -> (their
    indices, their weights in the loss), both on the host. The marked samples, weight 1; on N ranks every rank
    must make the same forward calls (FSDP gathers each block's weights in them), so a slice with none
    evaluates one unmarked sample with weight 0 (Delta = 0 for it, as if it were not evaluated: losses.py);
    a compiled block never sees a batch of 1, for which dynamo specialises a graph, so a lone sample gets a
    weight-0 companion."""
    count = int(marked.sum())
    n = 0 if count == 0 and world == 1 else min(b, max(count, 2 if compiled else 1))
    idx = torch.argsort((~marked).to(torch.uint8), stable=True)[:n]       # the marked ones first, in order
    return idx, marked[idx].float()


def micro_steps(net, micro, A, world):
    """FSDP2 over a step's A micro-steps. On N ranks gradients are reduced once, after the last one (no
    communication before; FSDP then keeps a full-size fp32 gradient, which the memory plan counts); one
    process reduces every micro-step, which costs nothing and keeps no such copy."""
    net.set_requires_gradient_sync(world == 1 or micro == A - 1)


# A step's per-sample terms, by name: the weighted total (what the loss averages), the data term, the
# self-evaluation term, and L_fake and the loss, which are scalars of a micro-batch repeated over its samples.
TERMS = ("total", "data", "self", "fake", "loss")


def objective(args, G, G_ema, x0, t, s, cond, null, *, eps, eps_self, evaluated=None, weight=None, fake=None,
              fake_norm=None):
    """One micro-batch: the loss (Eq. 21, or Eq. 3 for --objective fm) and its TERMS, each (b,) on the loss's
    device, so that logging reads them back later without a sync here."""
    if args.objective == "fm":
        out = losses.fm_loss(G, x0, t, cond, t_min=args.t_min, eps=eps)
    else:
        out = losses.selfe_loss(G, G_ema, x0, t, s, cond, null, evaluated=evaluated, weight=weight, fake=fake,
                                fake_norm=fake_norm, k=args.k, target_norm=not args.no_target_norm,
                                t_min=args.t_min, fake_weight=args.fake_weight, eps=eps,
                                eps_self=eps if args.reuse_noise else eps_self)
    zero = torch.zeros_like(out["total"])
    return out["loss"], {"total": out["total"].float(), "data": out["data"].float(),
                         "self": out.get("self", zero).float(), "fake": zero + out.get("fake", 0),
                         "loss": zero + out["loss"].detach()}


def update(net, opt, system, args, step, streak):
    """Clip, Adam, EMA. A step whose gradient norm is not finite (the same on every rank) is skipped on the
    device, without the host reading it: fused Adam leaves weights and state as they were (its found_inf, the
    protocol of torch.amp.GradScaler), and so does the EMA. `streak` (0-dim, on the device) counts the steps
    skipped in a row; from --max-skips on, every update is skipped until the next read stops the run
    (nonfinite_stop), so the weights saved then are those from before the streak. -> (streak, grad norm).
    First every shard group gives back the weights it gathered (a one-device group keeps them through the
    step: parallelize), so that the clip, Adam and the next step's cast all see the sharded fp32 ones."""
    selfe.reshard(net)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    skip = ~torch.isfinite(grad_norm) | (streak >= args.max_skips)
    streak = torch.where(skip, streak + 1, 0)
    opt.found_inf = skip.float()
    opt.step()
    opt.zero_grad(set_to_none=True)
    system.update_ema(args.ema, step, args.ema_warmup, skip=skip)
    return streak, grad_norm.detach()


def step_flops(flops, batch, n_self, aux):
    """Model FLOPs of one training step, from the forward FLOPs of one sample (MMDiT.flops): the trained pass
    forward and backward (3 F per sample), the two evaluation passes without gradient on the n_self samples
    with s < t, and, with the auxiliary term, L_fake's forward and backward on them. Training logs it;
    bench.py measures with it."""
    return 3 * flops * batch + 2 * flops * n_self + (3 * flops * n_self if aux else 0)


# ------------------------------------------------------------------------------------------------------------
# Logging: the pending steps come to the host in one copy per window; one line and one record per step

def gather(x, world):
    """(..., k) on each rank -> (..., world k), rank-major (the global-batch order)."""
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, -1)


def read_back(pending, world, args):
    """The steps since the last read: every rank's per-sample terms, the grad norms and the skip counts to
    the host in one copy, then one record per step
    (the loss and each term over the global batch, lambda, the share of s < t, whether it was skipped)."""
    # (n, len(TERMS), B): each pending step's terms, in global-batch order
    stacked = gather(torch.stack([torch.stack([p["terms"][k] for k in TERMS]) for p in pending]), world).cpu()
    scalars = torch.stack([torch.stack((p["grad_norm"].float(), p["streak"].float())) for p in pending]).cpu()
    records = []
    for p, rows, (gn, streak) in zip(pending, stacked, scalars):
        terms = dict(zip(TERMS, rows))                                     # each (B,)
        # a micro-batch's scalar, once per slice
        per_slice = lambda name: terms[name].view(world * p["accum"], -1)[:, 0]
        rec = {"step": p["step"] + 1, "loss": per_slice("loss").mean().item(),
               "data": terms["data"].mean().item(), "grad_norm": gn.item(), "lr": p["lr"]}
        if args.objective == "selfe":
            sel, ev = p["s"] < p["t"], p["evaluate"]
            lam = losses.lam(p["t"], p["s"])                                # Eq. 17
            rec.update(self=terms["self"][ev].mean().item() if ev.any() else 0.0,
                       lam=lam[sel].mean().item() if sel.any() else 0.0,
                       frac_s_lt_t=sel.float().mean().item(),
                       fake=per_slice("fake").mean().item())               # the slices' mean is the batch's
        p["streak"] = int(streak)
        if p["streak"]:
            rec["skipped"] = True
        p["per_sample"] = terms["total"]
        records.append(rec)
    return records


# Where a run that stopped on non-finite steps resumes: <out>/nonfinite.json (docs/formats.md §1)
NONFINITE = "nonfinite.json"


def nonfinite_stop(records, pending, first, system, flags, opt, args, rank):
    """Skipped steps (a non-finite loss or gradient) are counted; --max-skips of them in a row stop the run.
    Their updates and every later one were skipped, so the weights saved now (nonfinite-step-N/, N the
    streak's first step) are those from before the streak, with that step's batch beside them; the steps run
    are written to nonfinite.json, so that a resume (or torchrun's restart) goes on past them instead of
    replaying into the same failure (skip_past_failure). `first`: (record, pending step) of the streak's
    first step if one is running. -> the same after these steps."""
    for rec, p in zip(records, pending):
        first = None if p["streak"] == 0 else first if p["streak"] > 1 else (rec, p)
        if p["streak"] < args.max_skips:
            continue
        (rec0, p0), step = first, first[1]["step"]
        debug = os.path.join(args.out, f"nonfinite-step-{step}")
        save_checkpoint(debug, system, step, flags, opt)
        ran = pending[-1]["step"]                                           # skipped since the streak began
        if rank == 0:
            torch.save({"items": p0["items"], "t": p0["t"], "s": p0["s"], "dropped": p0["dropped"]},
                       os.path.join(debug, "batch.pt"))
            path = os.path.join(args.out, NONFINITE)
            done = encoders.read_json(path)["steps"] if os.path.isfile(path) else []
            with open(path + ".tmp", "w") as f:
                json.dump({"steps": done + [[step, ran]]}, f)
            os.replace(path + ".tmp", path)
        after = f" and the {args.max_skips - 1} after it" if args.max_skips > 1 else ""
        raise SystemExit(f"step {step}: loss {rec0['loss']}, gradient norm {rec0['grad_norm']}{after}: "
                         f"{args.max_skips} steps in a row not finite (--max-skips {args.max_skips}), "
                         f"skipped; weights before step {step} and its batch are in {debug}; --resume "
                         f"goes on at step {ran + 1}, past the batches that led here")
    return first


def skip_past_failure(out, start, rank):
    """A run resumed from a checkpoint before a stop of nonfinite_stop goes on after the steps that stop
    ran, not from the checkpoint: replaying them would lead to the same weights and the same failure. It
    skips their batches, as large runs restarted past a loss spike do; its weights are the checkpoint's."""
    path = os.path.join(out, NONFINITE)
    if not os.path.isfile(path):
        return start
    for first, ran in encoders.read_json(path)["steps"]:
        if start <= ran:
            log0(f"resuming at step {ran + 1}, not {start}: the steps from {start} on led to non-finite "
                 f"steps from step {first} on ({path})", rank=rank)
            start = ran + 1
    return start


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def git_commit():
    """The commit of the code that runs, with '-dirty' when tracked files differ from it; None outside a git
    checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True, timeout=30)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty else "")


T_BINS = (0.25, 0.5, 0.75)  # edges of the t-bins the loss is logged by


def log(records, window, args, step, t_window, world, peak, device, run=None):
    """One line and one log.jsonl record for the window: the loss, every term, lambda, the share of s < t and
    the gradient norm as means over its steps, the learning rate at its last, the loss by t-bin over its
    samples, throughput over the window (samples/s, tokens/s, TFLOP/s per device, MFU), peak memory; the line
    adds the ETA. `run` (the commit, the preset, the flags) rides in the first record of a process."""
    rec = {"step": records[-1]["step"], "window": len(records)}
    rec.update({k: sum(r[k] for r in records) / len(records) for k in records[-1] if k not in ("step", "lr")})
    rec["lr"] = records[-1]["lr"]
    t = torch.cat([p["t"] for p in window])
    per = torch.cat([p["per_sample"] for p in window])
    bins = torch.bucketize(t, torch.tensor(T_BINS))
    rec["loss_by_t"] = [per[bins == b].mean().item() if (bins == b).any() else None
                        for b in range(len(T_BINS) + 1)]
    dt = time.time() - t_window
    rate = len(window) * args.batch / dt
    tflops = sum(p["flops"] for p in window) / dt / world / 1e12
    tokens = sum(p["tokens"] for p in window) / dt
    eta = (args.steps - step - 1) * args.batch / rate
    rec.update(samples_per_s=rate, tokens_per_s=tokens, tflops_per_device=tflops)
    extra = ""
    if "self" in rec:
        extra = (f" self {rec['self']:.4f} lam {rec['lam']:.2f} s<t {rec['frac_s_lt_t']:.2f}"
                 + (f" fake {rec['fake']:.4f}" if rec["fake"] else ""))
    speed = f"{rate:.1f} samples/s {tokens:.0f} tok/s {tflops:.3g} TFLOP/s/dev"
    if peak:
        rec["mfu"] = tflops / peak
        speed += f" MFU {100 * rec['mfu']:.1f}%"
    if device.type == "cuda":
        rec["mem_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        speed += f" mem {rec['mem_gib']:.1f} GiB"
    by_bin = " ".join("-" if v is None else f"{v:.3f}" for v in rec["loss_by_t"])
    skipped = sum(1 for p in window if p["streak"])
    print(f"step {rec['step']:>6} loss {rec['loss']:.4f} data {rec['data']:.4f}{extra} | gnorm "
          f"{rec['grad_norm']:.2f} lr {rec['lr']:.2e} | {speed} ETA {eta / 60:.1f} min | loss by t-bin "
          f"{by_bin}" + (f" | {skipped} step(s) skipped: not finite" if skipped else ""), flush=True)
    if run:
        rec["run"] = run
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def preview_prompts(args):
    """--preview-prompts' prompts (a file as sample.py --from-file reads it), or the default five."""
    if not args.preview_prompts:
        return PREVIEW_PROMPTS
    return [prompt for prompt, _ in sampler.read_prompts(args.preview_prompts)]


def preview_source(args, cached, rank):
    """Before anything is built: the preview prompts and, where the run loads no text encoder (a cache of the
    real encoders' states), their encodings from the cache's previews.safetensors (written by --build-cache).
    -> (prompts, encodings or None), or None: no previews (--sample-every 0; a cache without them, said)."""
    if not args.sample_every:
        return None
    if not cached or preset_config(args).tokenizer == "words":     # the tiny preset's stand-ins always load
        return preview_prompts(args), None
    stored = data.read_previews(args.data)
    if stored is None:
        log0(f"previews off: {args.data} holds no previews.safetensors (a cache built before previews were "
             "stored); build it again to have them", rank=rank)
        return None
    if args.preview_prompts and preview_prompts(args) != stored[0]:
        raise SystemExit(f"--preview-prompts {args.preview_prompts}: the cache {args.data} holds the "
                         "encodings of other preview prompts and this run loads no text encoder; build the "
                         "cache with --build-cache ... --preview-prompts FILE, or leave the flag out")
    return stored


def preview_decoder(previews, args, system, null, rank):
    """-> (prompts, cond, phi) for `preview`, the encodings on the device; for latents without the autoencoder
    (training from a cache) the autoencoder alone is loaded to decode them, or previews are off, said."""
    if previews is None:
        return None
    prompts, cond = previews
    if system.cfg.latent == "flux-vae" and system.ae is None:
        if not (args.vae or args.pretrained):
            log0("previews off: decoding latents needs the autoencoder; pass --pretrained FLUX_DIR or --vae "
                 "FILE to have them", rank=rank)
            return None
        file = args.vae or encoders.find_pretrained(args.pretrained)["ae"]
        system.ae = encoders.load_autoencoder(file, torch.float32, system.device).requires_grad_(False)
    if cond is not None:
        cond = tuple(c.to(system.device, system.dtype) for c in cond)
        return prompts, cond, tuple(c.to(system.dtype) for c in null)
    return prompts, None, None


def preview(system, args, step, rank, previews):
    """A grid of the EMA model: rows 1, 2, 4 steps; columns the preview prompts. Every rank samples
    (the sharded EMA needs all of them); rank 0 writes the file."""
    prompts, cond, null = previews
    rows = [sampler.sample(system, prompts, n, anchor=args.anchor, objective=args.objective, cond=cond,
                           null=null) for n in (1, 2, 4)]
    if rank == 0:
        path = sampler.save_grid(rows, os.path.join(args.out, f"preview-{step:07d}.png"),
                                 upscale=max(1, 128 // system.cfg.resolution),
                                 labels=["1 step", "2 steps", "4 steps"])
        print(f"preview: {path}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# Checkpoints (the layout: selfe.py, docs/formats.md §1). Every rank writes into step-N.tmp/: its shards of
# the training state (dcp) and its own rows of the EMA, in place in the one file ema.safetensors, so no rank
# gathers the EMA and none writes it alone. Only when every rank has finished does rank 0 write config.json,
# rename the folder and then replace `latest` atomically: a crash, a rank dying under torchrun or a full disk
# never leaves a partial checkpoint behind `latest`, and a save that fails removes its .tmp folder and stops
# the run with one line. By default the writing runs on a thread from a copy of the state in host memory while
# training goes on (--ckpt-sync: in the loop, no copy), and the folder is finished at the first step after
# every rank is done. Randomness is keyed by (seed, step) and the data position is the step, so model, EMA,
# optimizer and step are the whole training state.

STEP_FOLDER = re.compile(r"step-(\d+)")
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclasses.dataclass
class Saving:
    """A checkpoint being written: where, its size, what rank 0 writes last, and the writing itself."""
    out: str
    name: str
    keep: int
    need: int                         # bytes all ranks write together
    free: int                         # bytes free where it goes when it began (the least any rank saw)
    config: dict                      # config.json
    frozen: dict                      # the tiny preset's stand-ins (on rank 0), else None
    writing: concurrent.futures.Future = None


_saving = None  # the checkpoint in flight: at most one
# Two gloo groups of every rank: dcp's collectives on the writing thread, and ours on the loop's, so that the
# two never interleave (and ours, in host memory, never wait on the device).
_groups = None
_writer = None  # the writing thread
_stager = None  # the host copy of the state it writes from (pinned and kept across saves on a GPU)


def _rank0():
    return not dist.is_initialized() or dist.get_rank() == 0


def _all(flag):
    """Whether `flag` holds on every rank (collective)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_groups[1])
    return bool(t.item())


def _writes_here(t):
    """Whether this rank writes (its part of) tensor `t`: a DTensor's shard unless it is another rank's
    replica (HSDP's replicate dimension); a plain tensor, the same on every rank, only on rank 0 (dcp dedups
    them)."""
    if hasattr(t, "placements"):
        where = t.device_mesh.get_coordinate()
        return all(not p.is_replicate() or c == 0 for p, c in zip(t.placements, where))
    return _rank0()


def _bytes_here(state):
    """Bytes of the tensors of a nested state dict that this rank writes."""
    if isinstance(state, dict):
        return sum(_bytes_here(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_bytes_here(v) for v in state)
    if torch.is_tensor(state) and _writes_here(state):
        local = state.to_local() if hasattr(state, "to_local") else state
        return local.numel() * local.element_size()
    return 0


def _size(n):
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.1f} MiB"


def ema_layout(ema):
    """ema.safetensors of the (sharded) EMA state dict: the file's first bytes (length, JSON header, spaces
    to 8-byte alignment), each tensor's byte offset in the file, the file size. From the global shapes, so the
    same on every rank."""
    header, at = {}, 0
    for k in sorted(ema):
        n = ema[k].numel() * ema[k].element_size()
        header[k] = {"dtype": SAFETENSORS_DTYPES[ema[k].dtype], "shape": list(ema[k].shape),
                     "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    offsets = {k: start + h["data_offsets"][0] for k, h in header.items()}
    return len(raw).to_bytes(8, "little") + raw, offsets, start + at


def write_ema_rows(file, ema, offsets):
    """This rank's part of every EMA tensor into `file` (made by rank 0 at its full size) at its place. FSDP2
    shards dim 0, so a rank's part is one contiguous range of the tensor's bytes."""
    fd = os.open(file, os.O_WRONLY)
    try:
        for k, t in ema.items():
            if not _writes_here(t):
                continue
            local, first = (t.to_local() if hasattr(t, "to_local") else t), 0
            if local.numel() == 0:                                     # (FSDP2 leaves some ranks no rows)
                continue
            if hasattr(t, "to_local") and t.dim():
                chunk = t.__create_chunk_list__()[0]                   # where this shard sits in the tensor
                if any(chunk.offsets[1:]) or tuple(chunk.sizes[1:]) != tuple(t.shape[1:]):
                    raise NotImplementedError(f"{k}: sharded along a dimension other than 0")
                first = chunk.offsets[0]
            row = math.prod(t.shape[1:]) * t.element_size()     # (from the shape: indexing a DTensor gathers)
            buf = memoryview(local.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
            at = offsets[k] + first * row
            while buf:
                n = os.pwrite(fd, buf, at)
                buf, at = buf[n:], at + n
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(state, tmp, offsets):
    """The bulk of a checkpoint, on every rank: dcp's shards, then this rank's EMA rows."""
    dcp.save(state, checkpoint_id=os.path.join(tmp, "dcp"), process_group=_groups[0] if _groups else None,
             no_dist=not dist.is_initialized())
    write_ema_rows(os.path.join(tmp, "ema.safetensors"), state["ema"], offsets)


def _write_durably(path, text):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out, system, step, flags, optimizer=None, keep=2, background=False):
    """Write step-N (collective under torchrun: every rank calls it), after finishing any checkpoint still in
    flight. Returns the final folder; with `background` the writing goes on on a thread, from a host copy of
    the state, and the folder appears when finish_checkpoint next finds every rank done. Too little free
    space for it stops here, before anything is written."""
    global _saving, _groups, _writer, _stager
    finish_checkpoint(wait=True)
    if dist.is_initialized() and _groups is None:
        _groups = (dist.new_group(backend="gloo"), dist.new_group(backend="gloo"))
    name = f"step-{step:07d}"
    tmp = os.path.join(out, name + ".tmp")
    state = selfe.training_state(system, optimizer)
    head, offsets, ema_size = ema_layout(state["ema"])
    frozen = None
    if system.cfg.tokenizer == "words" and _rank0():  # random stand-ins travel with the checkpoint
        frozen = {k: v.detach().cpu().contiguous() for k, v in system.text.state_dict().items()}
    need = _bytes_here(state) + _bytes_here(state["ema"]) + (len(head) + _bytes_here(frozen or {}) + 2 ** 16
                                                              if _rank0() else 0)
    os.makedirs(out, exist_ok=True)
    total = torch.tensor([need, -shutil.disk_usage(out).free], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(total[:1], group=_groups[1])
        dist.all_reduce(total[1:], op=dist.ReduceOp.MAX, group=_groups[1])
    saving = Saving(out, name, keep, int(total[0]), int(-total[1]),
                    {"config": system.cfg.to_dict(), "flags": flags, "step": step}, frozen)
    if saving.free < saving.need:
        raise _save_error(saving, "not enough free space")
    error = None
    if _rank0():
        try:
            shutil.rmtree(tmp, ignore_errors=True)                           # a crashed save's leftovers
            os.makedirs(tmp)
            with open(os.path.join(tmp, "ema.safetensors"), "wb") as f:
                f.write(head)
                f.truncate(ema_size)                                         # every rank writes its rows
        except OSError as e:
            error = e
    if not _all(error is None):
        if _rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(saving, error)
    saving.writing = concurrent.futures.Future()
    if background:
        _writer = _writer or concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        _stager = _stager or BlockingAsyncStager(cache_staged_state_dict=system.device.type == "cuda")
        saving.writing = _writer.submit(_write, _stager.stage(state), tmp, offsets)
    else:
        try:
            _write(state, tmp, offsets)
            saving.writing.set_result(None)
        except (Exception, CheckpointException) as e:  # dcp's CheckpointException is a BaseException
            saving.writing.set_exception(e)
    _saving = saving
    if not background:
        finish_checkpoint(wait=True)
    return os.path.join(out, name)


def finish_checkpoint(wait=True):
    """Finish the checkpoint in flight (collective): at once if `wait`, else only if every rank is done
    writing. Rank 0 writes the stand-ins and config.json, renames step-N.tmp to step-N, replaces `latest`,
    then removes all but the `keep` newest. A failure on any rank removes the .tmp folder, leaves `latest` and
    the checkpoints before it as they were, and stops the run with one line (OSError: cli.run)."""
    global _saving
    s = _saving
    if s is None or not (wait or _all(s.writing.done())):
        return
    _saving = None
    error = s.writing.exception()                                           # waits for this rank's part
    if _all(error is None) and _rank0():
        try:
            _publish(s)
        except Exception as e:  # an OSError, or the safetensors writer's own error for the same causes
            error = e
    if _all(error is None):
        return
    if _rank0():
        shutil.rmtree(os.path.join(s.out, s.name + ".tmp"), ignore_errors=True)
        if os.path.exists(os.path.join(s.out, "latest.tmp")):
            os.remove(os.path.join(s.out, "latest.tmp"))
    raise _save_error(s, error or "another process failed to write its part (see its message)")


def _publish(s):
    """Rank 0's part, once every rank has written and synced its own: the small files, the rename, `latest`,
    the clean-up. Keeps this one and the keep - 1 before it; never touches a later-numbered folder (a run
    resumed from an earlier step), so clean-up can never delete the checkpoint `latest` names."""
    tmp, final = os.path.join(s.out, s.name + ".tmp"), os.path.join(s.out, s.name)
    if s.frozen is not None:
        safetensors.torch.save_file(s.frozen, os.path.join(tmp, "frozen.safetensors"))
    _write_durably(os.path.join(tmp, "config.json"), json.dumps(s.config, indent=1))
    _sync_folder(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_durably(os.path.join(s.out, "latest.tmp"), s.name + "\n")
    os.replace(os.path.join(s.out, "latest.tmp"), os.path.join(s.out, "latest"))
    _sync_folder(s.out)
    step = int(STEP_FOLDER.fullmatch(s.name)[1])
    numbered = [(int(m[1]), m[0]) for m in map(STEP_FOLDER.fullmatch, os.listdir(s.out)) if m]
    older = sorted(pair for pair in numbered if pair[0] < step)
    for _, d in older[:max(0, len(older) - (s.keep - 1))]:
        shutil.rmtree(os.path.join(s.out, d), ignore_errors=True)


def _save_error(s, e):
    """One line: which checkpoint, why, what it needs against what was free, and what is left as it was."""
    if isinstance(e, CheckpointException):                                 # dcp's: the first rank's own error
        e = next(iter(e.failures.values()))[0]
    cause = e if isinstance(e, str) else f"{type(e).__name__}: {' '.join(str(e).split())}"
    latest = os.path.join(s.out, "latest")
    kept = "no earlier checkpoint"
    if os.path.isfile(latest):
        with open(latest, "rb") as f:
            kept = f"{latest} still names {f.read(64).decode('utf-8', 'replace').strip()!r}"
    free = f"{_size(s.free)} were free there" + (f" when it began, {_size(shutil.disk_usage(s.out).free)} now"
                                                  if s.writing is not None else "")
    return OSError(f"{os.path.join(s.out, s.name)}.tmp: checkpoint not written ({cause}); it needs "
                   f"{_size(s.need)}, {free}; {kept}, untouched: free some space and resume with --resume")


if __name__ == "__main__":
    cli.run(main)
