"""Train Self-E, or the plain flow-matching baseline with the identical network and budget.

    python train.py                                   # tiny preset on the built-in shapes world, CPU, minutes
    python train.py --objective fm                    # the flow-matching baseline (Table 2)
    python train.py --resume                          # continue the run in --out from its latest checkpoint
    torchrun --nproc_per_node 8 train.py --size 2b --data manifest.tsv --pretrained FLUX_DIR
    torchrun --nproc_per_node 2 train.py              # also on CPU (gloo), for testing
    python train.py --size 2b --data manifest.tsv --pretrained FLUX_DIR --build-cache CACHE  # encoders once
    python train.py --size 2b --data CACHE            # then train from the cache, no frozen encoders loaded
    python train.py --size 2b --bench                 # one GPU: TFLOP/s, MFU, Self-E vs FM step time, memory

Read top to bottom: flags, distributed set-up (torchrun's environment; FSDP2 per block), data, the loop (batch ->
encode -> t, s -> losses.py -> backward, step, EMA), logging, checkpoints; then the cache builder and the benchmark.
The recipe is METHOD.md section 9: Adam (0.9, 0.95), warmup then linear decay to 1e-5, EMA; the tau anneal and the
auxiliary-term start are fractions of the run (paper: 300k and 550k of 710k iterations).

One code path serves 1 or N processes. The global batch is split as batch = per-rank batch x world size x --accum.
A step's caption dropout, t and s are drawn for the whole global batch from a generator seeded by (seed, step), the
same on every rank, and each sample's noises from one seeded by (seed, step, its position); the data order is a
function of the step too. So N processes follow the 1-process trajectory, and a resumed run continues exactly.
"""
import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import re
import shutil
import time
import warnings

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import cli
import data
import losses
import sample as sampler
import selfe
from cli import number
from model import CONFIGS, CheckpointError

PREVIEW_PROMPTS = ["a red circle to the left of a blue square", "a photo of a green circle", "a photo of three squares",
                   "a photo of a triangle above a circle", "a photo of a white square and a purple triangle"]
warnings.filterwarnings("ignore", message=".*returned a view tensor")  # FSDP2 on nn.Linear's 3-D output; we never
                                                                      # modify the denoiser's output in place
H100_PEAK = 789.0  # TFLOP/s: dense bf16 matmul measured on one H100 of our GPU image (the datasheet says 989)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(CONFIGS), help="model preset")
    p.add_argument("--data", default="shapes", help="'shapes' (built-in world), a TSV manifest (image path<TAB>prompt) "
                   "or a cache folder made by --build-cache")
    p.add_argument("--base-dir", default=None, help="base for relative manifest paths (default: the manifest's folder)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed manifest lines and unusable images")
    p.add_argument("--resolution", type=areas, default=None, help="bucket areas in pixels, e.g. 256 or 256,512 (the "
                   "1:1 mix of METHOD.md 9); default: the preset's")
    p.add_argument("--max-ratio", type=number(float, 1), default=2.0, help="widest bucket aspect ratio (1: square "
                   "crops)")
    p.add_argument("--world", default=None, choices=list(data.WORLDS), help="shapes world (default: the preset's)")
    p.add_argument("--pretrained", default=None, help="FLUX.1 snapshot folder: T5-XXL, CLIP-L, autoencoder")
    p.add_argument("--t5", default=None, help="T5 v1.1 XXL folder (overrides --pretrained's)")
    p.add_argument("--clip", default=None, help="CLIP ViT-L/14 text folder (overrides --pretrained's)")
    p.add_argument("--vae", default=None, help="FLUX autoencoder file (overrides --pretrained's)")
    p.add_argument("--objective", default="selfe", choices=("selfe", "fm"))
    p.add_argument("--steps", type=number(int, 1), default=None, help="iterations (default: the preset's)")
    p.add_argument("--batch", type=number(int, 1), default=None, help="global batch (default: the preset's)")
    p.add_argument("--accum", type=number(int, 1), default=1, help="gradient accumulation micro-steps per iteration")
    p.add_argument("--lr", type=number(float, 0), default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--lr-min", type=number(float, 0), default=1e-5, help="learning rate at the last step (linear "
                   "decay)")
    p.add_argument("--warmup", type=number(int, 0), default=None, help="warmup iterations (default: min(1000, steps "
                   "/ 20))")
    p.add_argument("--grad-clip", type=number(float, 0), default=1.0, help="[ASSUMPTION] 9: minFM's default")
    p.add_argument("--ema", type=number(float, 0, 1), default=None, help="EMA decay (paper 0.9999; default: the "
                   "preset's)")
    p.add_argument("--out", type=cli.writable_folder, default=None, help="run folder (default: runs/<size>[-fm])")
    p.add_argument("--resume", action="store_true", help="continue from <out>/latest (implied on a torchrun restart)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an --out that holds a run: its "
                   "checkpoints, log and previews are deleted first (without it such an --out is refused)")
    p.add_argument("--reschedule", action="store_true", help="with --resume: fit warm-up, learning-rate decay, tau "
                   "anneal and auxiliary-term start to this --steps (default: keep the resumed run's)")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=("bf16", "fp32"),
                   help="compute dtype (default: bf16 on GPU, fp32 on CPU); parameters, EMA, optimizer stay fp32")
    p.add_argument("--dist-timeout", type=number(int, 1), default=1800, help="seconds a rank waits on the others "
                   "(also when connecting), before the job fails and torchrun may restart it")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    p.add_argument("--act-ckpt", action="store_true", help="activation checkpointing per transformer block")
    p.add_argument("--peak-tflops", type=number(float, 0), default=None, help="per-device peak for MFU (default: "
                   "H100 789)")
    p.add_argument("--log-every", type=number(int, 1), default=50)
    p.add_argument("--ckpt-every", type=number(int, 1), default=500)
    p.add_argument("--sample-every", type=number(int, 0), default=1000, help="preview grid every N steps (0: never)")
    p.add_argument("--build-cache", default=None, metavar="DIR", help="encode --data (a manifest) into DIR and exit")
    p.add_argument("--bench", action="store_true", help="time the denoiser and a Self-E and FM step, then exit")
    p.add_argument("--bench-batch", type=number(int, 1), default=8, help="per-device batch of --bench")
    p.add_argument("--bench-iters", type=number(int, 1), default=10, help="timed iterations per measurement of "
                   "--bench")
    # The method's options; each [ASSUMPTION] of METHOD.md is one flag with its stated default.
    m = p.add_argument_group("method (METHOD.md; [A] n = its section 11 item n)")
    m.add_argument("--p-drop", type=number(float, 0, 1), default=0.1, help="caption dropout for guidance [A] 1")
    m.add_argument("--p-equal", type=number(float, 0, 1), default=0.5, help="probability of s = t (s.13)")
    m.add_argument("--tau-frac", type=number(float, 0), default=300 / 710, help="tau anneals 0 -> 1 over this "
                   "fraction (s.13)")
    m.add_argument("--aux-start-frac", type=number(float, 0), default=550 / 710, help="auxiliary term from this "
                   "fraction (S.2)")
    m.add_argument("--k", type=number(float, 0, 1), default=0.9, help="classifier-score share of Delta (s.6)")
    m.add_argument("--fake-prefix", default="fake image, ", help="c_fake = prefix + prompt [A] 8")
    m.add_argument("--fake-weight", type=number(float, 0), default=1.0, help="weight of L_fake (s.8) [A] 8")
    m.add_argument("--anchor", type=cli.anchor, default=512, help="patch count where mu = 0.5 (paper 512, minFM "
                   "256; below 4096, where mu = 1.15) [A] 6")
    m.add_argument("--t-min", type=number(float, 1e-6, 1), default=1e-3, help="clamp of t in the 1/t^2 weight [A] 11")
    m.add_argument("--no-target-norm", action="store_true", help="Eq. 16 instead of the normalized target (Eq. 20)")
    m.add_argument("--reuse-noise", action="store_true", help="re-noise x0_hat with eps, not fresh noise [A] 3")
    m.add_argument("--dropped", default="jump", choices=("jump", "equal"), help="caption-dropped samples: 'jump' keeps "
                   "their s < t draw with Delta = 0 (c = phi: no classifier score), 'equal' forces s = t [A] 2")
    m.add_argument("--delta-zero", action="store_true", help="the control: Self-E's s, lambda and target (Eq. 17-21) "
                   "with Delta = 0 everywhere, no evaluation passes: what self-evaluation itself adds")
    m.add_argument("--ema-warmup", action="store_true", help="warm the EMA decay up as min(d, (1 + n)/(10 + n)) (not "
                   "in the paper, which keeps it constant)")
    args = p.parse_args(argv)
    cfg = CONFIGS[args.size]
    for name, default in (("steps", cfg.steps), ("batch", cfg.batch), ("lr", cfg.lr), ("ema", cfg.ema_decay),
                          ("world", cfg.world), ("resolution", [cfg.resolution])):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.warmup is None:
        args.warmup = min(1000, args.steps // 20)
    args.schedule_steps = args.steps  # the length warm-up, decay and the method's fractions span (see --reschedule)
    if args.precision is None:
        args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
    if args.delta_zero and args.objective != "selfe":
        p.error("--delta-zero is a control of the selfe objective")
    if args.overwrite and args.resume:
        p.error("--overwrite starts afresh and --resume continues: pass one of them")
    if args.reschedule and not args.resume:
        p.error("--reschedule changes the schedule of a resumed run: pass it with --resume")
    args.out = args.out or os.path.join("runs", args.size + ("-fm" if args.objective == "fm" else "")
                                        + ("-delta0" if args.delta_zero else ""))
    return args


def areas(text):
    """--resolution: comma-separated bucket areas in pixels, each >= 1."""
    return [number(int, 1)(r) for r in text.split(",")]


def lr_at(step, args):
    """Linear warmup, then linear decay from --lr to --lr-min at the last step of the schedule (METHOD.md 9)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.schedule_steps - args.warmup)
    return args.lr + (args.lr_min - args.lr) * min(1.0, frac)


# ----------------------------------------------------------------------------------------------------------------------
# Distributed set-up: torchrun's environment decides; FSDP2 shards every transformer block and the root.

def init_distributed(args):
    """-> (rank, world size). Under torchrun: one process group (NCCL on GPUs, gloo on CPU), one GPU per process."""
    if "RANK" not in os.environ:
        return 0, 1
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    # torchrun's store outlives a restart: keys under this attempt's prefix, so no worker reads a dead one's address
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=timeout, rank=rank,
                            world_size=world, store=dist.PrefixStore(f"attempt-{attempt}", store))
    return dist.get_rank(), dist.get_world_size()


def parallelize(model, args, world):
    """Activation checkpointing and torch.compile per block, then FSDP2: each block is its own shard group, so one
    block's parameters are gathered at a time. bf16 parameters for compute, fp32 gradient reduction ([ASSUMPTION] 9);
    the sharded fp32 parameters are what the optimizer and the EMA see."""
    model.checkpointing = args.act_ckpt
    blocks = [*model.double_blocks, *model.single_blocks]
    if args.compile:
        for block in blocks:
            block.compile()
    if world > 1:
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if args.precision == "bf16" else None,
                                  reduce_dtype=torch.float32)
        for block in blocks:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
    return model


def setup(args, world, encoders=True):
    """The system (denoiser, frozen parts unless `encoders` is False), the denoiser and its EMA sharded alike, Adam
    (its state sharded with them), the compute context and the per-device peak for MFU; train and bench share it."""
    if args.device.startswith("cuda"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # its backward fails on our GPU image (torch 2.11 + CUDA 13)
    torch.manual_seed(args.seed)                                           # the same initial weights on every rank
    system = selfe.SelfE(CONFIGS[args.size], args.device, args.seed, args.pretrained, args.t5, args.clip, args.vae,
                         encoders=encoders)
    ema = system.make_ema()
    model = parallelize(system.denoiser, args, world)
    parallelize(ema, args, world)                                          # the fp32 EMA, sharded like the model
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    autocast = (torch.autocast("cuda", torch.bfloat16) if world == 1 and args.precision == "bf16"
                else contextlib.nullcontext())                             # one process: fp32 weights, bf16 compute
    peak = args.peak_tflops or (H100_PEAK if "H100" in device_name(system.device) else None)
    return system, model, ema, opt, autocast, peak


def log0(*a, rank=0):
    if rank == 0:
        print(*a, flush=True)


def main(argv=None):
    args = get_args(argv)
    rank, world = init_distributed(args)
    try:
        if args.bench:
            return bench(args, rank, world)
        if args.build_cache:
            return build_cache(args, rank, world)
        return train(args, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, world):
    cfg = CONFIGS[args.size]
    B, A = args.batch, args.accum
    if B % (world * A):
        raise SystemExit(f"--batch {B} is not divisible by world size {world} x --accum {A}")
    b = B // (world * A)                                                   # per-rank micro-batch
    resume_from, start = prepare_out(args, rank)                           # before anything is built or written
    cached = data.is_cache(args.data)
    system, model, ema, opt, autocast, peak = setup(args, world, encoders=not cached)

    if cached:
        source = data.CachedData(args.data, cache_meta(args, cfg), B, args.seed)
        null = tuple(source.null[k].to(system.device).float() for k in ("txt", "vec"))
    elif args.data == "shapes":
        shapes = data.WORLDS[args.world]
        if shapes.resolution != cfg.resolution or args.resolution != [cfg.resolution]:
            raise SystemExit(f"world {shapes.name!r} is {shapes.resolution} px; preset {args.size!r} is "
                             f"{cfg.resolution} px and --resolution {args.resolution}")
        source = data.ShapesData(shapes, B, seed=args.seed)
    else:
        source = data.ManifestData(args.data, args.resolution, bucket_step(system), B, args.seed, args.base_dir,
                                   args.skip_bad, args.max_ratio)
    if not cached:
        null = system.null_cond()                                          # phi, batch 1
    tau_steps = round(args.tau_frac * args.schedule_steps)
    aux_start = round(args.aux_start_frac * args.schedule_steps)
    flags = vars(args)
    if resume_from:
        selfe.load_training_state(resume_from, system, opt)
        if cfg.tokenizer == "words":
            frozen = os.path.join(resume_from, "frozen.safetensors")
            system.load_frozen_state(selfe.read_weights(frozen), frozen)
        log0(f"resumed from {resume_from} at step {start}", rank=rank)
    os.makedirs(args.out, exist_ok=True)
    # `grid` (h, w) is the token grid of the batch in hand (buckets vary it), bound in the loop below
    G = lambda x, t, s, c: system.G(model, x, t, s, c, *grid)             # current weights (with grad when enabled)
    G_ema = lambda x, t, s, c: system.G(ema, x, t, s, c, *grid)            # EMA weights: the conditional pass (S.2)
    n_params = sum(p.numel() for p in model.parameters())
    flops = functools.lru_cache(system.denoiser.flops)                    # forward FLOPs of one sample (L, Lt)
    log0(f"{args.size}: {n_params / 1e6:.2f}M denoiser parameters, objective {args.objective}, {args.steps} steps x "
         f"batch {B} (= {b} x {world} ranks x {A} accum) on {args.device} in {args.precision}; data {args.data} "
         f"({len(source) if hasattr(source, '__len__') else 'unlimited'} items); tau over {tau_steps} steps, aux from "
         f"{aux_start}", rank=rank)

    history, window = [], []
    t0 = t_window = time.time()
    for step in range(start, args.steps):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        items = source.indices(step)                                       # the global batch, same on every rank
        mine = items[rank * b * A:(rank + 1) * b * A]
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # the step's randomness, same on every rank
        dropped = selfe.caption_dropout(B, args.p_drop, gen)                # (B,) bool
        stats = []
        for micro in range(A):
            off = (rank * A + micro) * b                                    # this slice's place in the global batch
            sl = slice(off, off + b)
            x0, cond, fake, grid = load_batch(source, system, mine[micro * b:(micro + 1) * b], dropped[sl],
                                              args.fake_prefix, cached)
            L = x0.shape[1]
            if micro == 0:
                t_all, s_all = draw(gen, args, step, B, L, tau_steps, dropped)
                evaluate_all = (s_all < t_all) & ~dropped & (not args.delta_zero)  # Delta = 0 for the rest
                n_self = int(evaluate_all.sum())
            t, s = t_all[sl].to(system.device), s_all[sl].to(system.device)
            eps, eps_self = noise(args.seed, step, range(off, off + b), L, x0.shape[2], system.device)
            if world > 1:
                model.set_requires_gradient_sync(micro == A - 1)           # reduce-scatter once per iteration
            with autocast:
                if args.objective == "fm":
                    out = losses.fm_loss(G, x0, t, cond, args.t_min, eps=eps)
                else:  # the auxiliary term of s.6-s.8 only late in training
                    aux = step >= aux_start and not args.delta_zero
                    out = losses.selfe_loss(G, G_ema, x0, t, s, cond, null, fake if aux else None,
                                            args.k, not args.no_target_norm, args.t_min, args.fake_weight,
                                            not args.reuse_noise, eps=eps, eps_self=eps_self,
                                            fake_count=n_self * b / B, always_evaluate=world > 1,
                                            evaluate=evaluate_all[sl].to(system.device))
            (out["loss"] / A).backward()
            stats.append(torch.stack([out["per_sample"].float(), out["data"].float(),
                                      out.get("self", torch.zeros_like(t)).float(),
                                      out.get("fake", torch.zeros(())).float().expand(b),
                                      out["loss"].detach().float().expand(b)]))
        # every rank's per-sample terms, in global-batch order, for logging and the non-finite check
        stats = gather(torch.cat(stats, 1), world)                          # (5, B)
        fake_mean = stats[3].view(world * A, b)[:, 0].mean()               # slices' means average to the batch's
        loss = stats[4].view(world * A, b)[:, 0].mean().item()
        if not math.isfinite(loss):
            debug = os.path.join(args.out, f"nonfinite-step-{step}")
            selfe.save_checkpoint(debug, system, step, flags, opt)
            if rank == 0:
                torch.save({"items": items, "t": t_all, "s": s_all, "dropped": dropped},
                           os.path.join(debug, "batch.pt"))
            raise SystemExit(f"step {step}: loss is {loss}; weights before this step and the batch are in {debug}")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        system.update_ema(args.ema, step, args.ema_warmup)

        sel = s_all < t_all
        rec = {"step": step + 1, "loss": loss, "data": stats[1].mean().item(), "grad_norm": grad_norm, "lr": lr}
        if args.objective == "selfe":
            lam = losses.lam(t_all, s_all)
            rec.update(self=stats[2][evaluate_all].mean().item() if evaluate_all.any() else 0.0,
                       lam=lam[sel].mean().item() if sel.any() else 0.0,
                       frac_s_lt_t=sel.float().mean().item(), fake=fake_mean.item())
        history.append(rec)
        # model FLOPs: the trained pass fwd+bwd (3 F), the two no-grad evaluation passes and L_fake's fwd+bwd on s < t
        F = flops(L, cond[0].shape[1])
        n_flops = 3 * F * B + 2 * F * n_self + (3 * F * n_self if step >= aux_start else 0)
        window.append((t_all, stats[0].cpu(), n_flops, B * (L + cond[0].shape[1])))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            if rank == 0:
                log(rec, window, args, step, t_window, world, peak, system.device)
            window, t_window = [], time.time()
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            selfe.save_checkpoint(args.out, system, step + 1, flags, opt)
        if args.sample_every and ((step + 1) % args.sample_every == 0 or step + 1 == args.steps):
            if system.t5 is not None:
                preview(system, args, step + 1, rank)
    log0(f"done: {max(0, args.steps - start)} steps in {time.time() - t0:.0f} s; checkpoint in {args.out}", rank=rank)
    return history


# What a run writes in its folder; a fresh run refuses a folder that holds any of these unless --overwrite.
RUN_FILE = re.compile(r"latest(\.tmp)?|log\.jsonl|preview-\d+\.png|(nonfinite-)?step-\d+(\.tmp)?")
SCHEDULE = ("schedule_steps", "warmup", "tau_frac", "aux_start_frac")


def prepare_out(args, rank):
    """What this run does with --out, decided before anything is built: -> (the step folder to resume from, its step)
    or (None, 0) for a fresh start. A fresh run never deletes or mixes with another run's checkpoints unless told to:
    an --out that holds a run is refused, or with --overwrite emptied of that run's files first."""
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    latest = os.path.join(args.out, "latest")
    if args.resume or (restarted and os.path.isfile(latest)):
        if not os.path.isfile(latest):
            raise CheckpointError(f"--resume: {args.out} holds no checkpoint (no {latest}); leave out --resume to "
                                  f"start a run there")
        path = selfe.resolve_checkpoint(args.out)
        cfg, meta = selfe.read_meta(path)
        if cfg != CONFIGS[args.size]:
            raise CheckpointError(f"{path} was trained with another preset than --size {args.size}")
        keep_schedule(args, meta["flags"], rank)
        return path, meta["step"]
    found = sorted(n for n in os.listdir(args.out) if RUN_FILE.fullmatch(n)) if os.path.isdir(args.out) else []
    if found and not (args.overwrite or restarted):  # a restart with no checkpoint yet replaces its own first attempt
        raise CheckpointError(f"{args.out} already holds a run ({', '.join(found[:3])}{', ...' * (len(found) > 3)}): "
                              f"pass --resume to continue it, --overwrite to delete it and start afresh, or choose "
                              f"another --out")
    if rank == 0:
        for name in found:
            path = os.path.join(args.out, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    return None, 0


def keep_schedule(args, saved, rank):
    """On resume, the resumed run's schedule stays (warm-up, the length of the learning-rate decay, the tau anneal and
    the auxiliary-term start, all fixed by the --steps it was started with): a different --steps only moves where
    training stops. --reschedule fits the schedule to this run's flags instead. Either way a difference is said."""
    was = {k: saved.get(k, getattr(args, k)) for k in SCHEDULE}
    was["schedule_steps"] = saved.get("schedule_steps", saved["steps"])  # runs saved before it had its own key
    now = {k: getattr(args, k) for k in SCHEDULE}
    if was == now:
        return
    describe = lambda d: (f"warm-up {d['warmup']}, learning rate decaying to step {d['schedule_steps']}, tau over "
                          f"{round(d['tau_frac'] * d['schedule_steps'])} steps, auxiliary term from step "
                          f"{round(d['aux_start_frac'] * d['schedule_steps'])}")
    if args.reschedule:
        log0(f"--reschedule: the resumed run's schedule ({describe(was)}) becomes: {describe(now)}", rank=rank)
        return
    for k, v in was.items():
        setattr(args, k, v)
    log0(f"resume keeps the run's schedule ({describe(was)}); --steps {args.steps} only says where to stop. Pass "
         f"--reschedule for the schedule of these flags ({describe(now)})", rank=rank)


def bucket_step(system):
    """Bucket sides are multiples of two patches of latent (32 px for FLUX's 8x autoencoder and patch 2)."""
    return 2 * system.cfg.patch * system.downsample


def draw(gen, args, step, B, L, tau_steps, dropped):
    """The step's per-sample times for the whole global batch (B floats, on every rank): t (s.11-s.12), s (s.13)."""
    t = selfe.sample_t(B, L, args.anchor, generator=gen)
    s = selfe.sample_s(t, selfe.tau_at(step, tau_steps), args.p_equal,
                       dropped if args.dropped == "equal" else None, generator=gen)
    return t, (t if args.objective == "fm" else s)


def noise(seed, step, positions, L, C, device):
    """eps (Eq. 1) and eps' (the re-noising of s.6), (n, L, C) each, for the samples at these global-batch positions:
    each from its own generator seeded by (seed, step, position), so no rank draws noise it does not use, and a
    sample's noise does not depend on how the batch is split."""
    out = torch.empty(len(positions), 2, L, C, device=device)
    for k, i in enumerate(positions):
        g = torch.Generator(device).manual_seed((seed << 40) + (step << 20) + i)
        out[k] = torch.randn(2, L, C, device=device, generator=g)
    return out[:, 0], out[:, 1]


def load_batch(source, system, items, dropped, fake_prefix, cached):
    """This slice's items -> (x0 tokens (b, L, C), cond (txt, vec), fake, token grid (h, w)); fake(idx) gives c_fake's
    encoding (s.8) for the samples idx. Online: images through the autoencoder (or pixels), captions with dropout
    applied through T5 and CLIP. Cached: read, with phi's encodings where the caption was dropped."""
    p = system.cfg.patch
    if cached:
        rows = source.batch(items)
        keep = (~dropped).to(system.device)

        def select(keys):  # the cached encodings, or phi's (and c_fake of phi) where dropped
            return tuple(torch.where(keep.view(-1, *[1] * (rows[k].dim() - 1)), rows[k].to(system.device),
                                     source.null[k].to(system.device)).float() for k in keys)
        lat = rows["latent"].to(system.device)
        cond, fake_cond = select(("txt", "vec")), select(("fake_txt", "fake_vec"))
        fake = lambda idx: tuple(c[idx] for c in fake_cond)
    else:
        images, captions = source.batch(items)
        captions = [selfe.NULL_PROMPT if d else c for c, d in zip(captions, dropped.tolist())]
        lat = system.encode_latents(images)                                # (b, C, H/8, W/8) or pixels
        cond = system.encode_text(captions)                                # (b, Lt, d_txt), (b, d_vec)
        fake = lambda idx: system.encode_text([fake_prefix + captions[i] for i in idx.tolist()])
    grid = (lat.shape[2] // p, lat.shape[3] // p)
    return selfe.patchify(lat.float(), p), cond, fake, grid


def gather(x, world):
    """(k, b) on each rank -> (k, world b), rank-major (the global-batch order)."""
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, 1)


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def log(rec, window, args, step, t_window, world, peak, device):
    """One line: every loss term, lambda, the share of s < t, grad norm, throughput (samples/s, tokens/s, TFLOP/s per
    device, MFU), peak memory, ETA, and the loss by t-bin."""
    n = len(window)
    t = torch.cat([w[0] for w in window])
    per = torch.cat([w[1] for w in window])
    bins = torch.bucketize(t, torch.tensor([0.25, 0.5, 0.75]))
    by_bin = " ".join(f"{per[bins == b].mean().item():.3f}" if (bins == b).any() else "-" for b in range(4))
    dt = time.time() - t_window
    rate = n * args.batch / dt
    tflops = sum(w[2] for w in window) / dt / world / 1e12
    tokens = sum(w[3] for w in window) / dt
    eta = (args.steps - step - 1) * args.batch / rate
    extra = ""
    if "self" in rec:
        extra = (f" self {rec['self']:.4f} lam {rec['lam']:.2f} s<t {rec['frac_s_lt_t']:.2f}"
                 + (f" fake {rec['fake']:.4f}" if rec["fake"] else ""))
    speed = f"{rate:.1f} samples/s {tokens:.0f} tok/s {tflops:.3g} TFLOP/s/dev"
    if peak:
        speed += f" MFU {100 * tflops / peak:.1f}%"
    if device.type == "cuda":
        speed += f" mem {torch.cuda.max_memory_allocated(device) / 2 ** 30:.1f} GiB"
    rec.update(samples_per_s=rate, tokens_per_s=tokens, tflops_per_device=tflops)
    print(f"step {rec['step']:>6} loss {rec['loss']:.4f} data {rec['data']:.4f}{extra} | gnorm {rec['grad_norm']:.2f} "
          f"lr {rec['lr']:.2e} | {speed} ETA {eta / 60:.1f} min | loss by t-bin {by_bin}", flush=True)
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def preview(system, args, step, rank):
    """A grid of the EMA model: rows 1, 2, 4 steps; columns the preview prompts. Every rank samples (the sharded EMA
    needs all of them); rank 0 writes the file."""
    rows = [sampler.sample(system, PREVIEW_PROMPTS, n, anchor=args.anchor, objective=args.objective)
            for n in (1, 2, 4)]
    if rank == 0:
        path = sampler.save_grid(rows, os.path.join(args.out, f"preview-{step:07d}.png"),
                                 upscale=max(1, 128 // system.cfg.resolution), labels=["1 step", "2 steps", "4 steps"])
        print(f"preview: {path}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Caches: the frozen encoders run once; ranks split the manifest.

def cache_meta(args, cfg):
    """What a cache depends on; CachedData refuses a cache whose values differ from this run's."""
    c = cfg.to_dict()
    return {"encoders": {k: c[k] for k in ("t5", "clip", "t5_max_len", "tokenizer", "latent")},
            "stand_in_seed": args.seed if cfg.tokenizer == "words" else None,
            "resolution": args.resolution, "max_ratio": args.max_ratio, "fake_prefix": args.fake_prefix}


def build_cache(args, rank, world):
    cfg = CONFIGS[args.size]
    if args.data == "shapes" or data.is_cache(args.data):
        raise SystemExit("--build-cache needs --data MANIFEST.tsv")
    system = selfe.SelfE(cfg, args.device, args.seed, args.pretrained, args.t5, args.clip, args.vae)
    source = data.ManifestData(args.data, args.resolution, bucket_step(system), 1, args.seed, args.base_dir,
                               args.skip_bad, args.max_ratio)
    per_rank = max(1, args.batch // world)
    store = torch.bfloat16 if system.device.type == "cuda" else torch.float32  # the encoders' own precision
    encode_text = lambda prompts: tuple(x.to(store) for x in system.encode_text(prompts))
    data.write_cache_shards(args.build_cache, source, system.encode_latents, encode_text, args.fake_prefix,
                            per_rank, rank, world)
    if world > 1:
        dist.barrier()
    if rank == 0:
        data.finish_cache(args.build_cache, encode_text, args.fake_prefix, cache_meta(args, cfg), len(source))
        print(f"cache: {len(source)} items in {args.build_cache}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Benchmark: synthetic latents and text of the real shapes, no frozen parts, one device (or each of N).

def bench(args, rank, world):
    cfg = CONFIGS[args.size]
    system, model, ema, opt, autocast, peak = setup(args, world, encoders=False)
    dev, b, Lt = system.device, args.bench_batch, cfg.t5_max_len
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    rows = []
    areas = sorted({cfg.resolution, 2 * cfg.resolution}) if args.size != "tiny" else [cfg.resolution]
    for area in areas:
        n = area // system.downsample // cfg.patch
        grid = (n, n)
        L = n * n
        x0 = torch.randn(b, L, cfg.in_channels, device=dev)
        cond = (torch.randn(b, Lt, cfg.context_in_dim, device=dev), torch.randn(b, cfg.vec_in_dim, device=dev))
        null = (cond[0][:1] * 0, cond[1][:1] * 0)
        G = lambda x, t, s, c: system.G(model, x, t, s, c, *grid)
        G_ema = lambda x, t, s, c: system.G(ema, x, t, s, c, *grid)
        t = torch.rand(b, device=dev).clamp(0.05, 0.95)
        s = torch.where(torch.arange(b, device=dev) < b // 2, t * 0.5, t)  # half the batch has s < t

        def fwd_bwd():
            with autocast:
                v = system.velocity(model, x0, t, s, cond, *grid)
            v.float().square().mean().backward()

        def train_step(loss_fn):  # what the training loop does per iteration: loss, backward, clip, step, EMA
            with autocast:
                out = loss_fn()
            out["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(), opt.zero_grad(set_to_none=True), system.update_ema(0.9999, 10 ** 6)

        fake = lambda idx: (cond[0][idx], cond[1][idx])
        fm_step = lambda: train_step(lambda: losses.fm_loss(G, x0, t, cond))
        selfe_step = lambda aux: train_step(lambda: losses.selfe_loss(G, G_ema, x0, t, s, cond, null,
                                                                      fake if aux else None))

        F = system.denoiser.flops(L, Lt)
        half = b // 2
        for name, fn, flops in (("denoiser fwd+bwd", fwd_bwd, 3 * F * b),
                                ("FM step", fm_step, 3 * F * b),
                                ("Self-E step", lambda: selfe_step(False), 3 * F * b + 2 * F * half),
                                ("Self-E step + aux", lambda: selfe_step(True), 3 * F * b + 5 * F * half)):
            for _ in range(2):  # warm-up (and compilation)
                fn()
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            sync()
            t0 = time.perf_counter()
            for _ in range(args.bench_iters):
                fn()
            sync()
            ms = (time.perf_counter() - t0) / args.bench_iters * 1e3
            tf = flops / ms / 1e9
            mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else float("nan")
            rows.append((area, L, name, ms, tf, 100 * tf / peak if peak else float("nan"), mem))
            model.zero_grad(set_to_none=True)
    if rank == 0:
        print(f"\n{args.size} on {world} x {device_name(dev)}, per-device batch {b}, {Lt} text tokens, "
              f"{args.precision}{', compiled' if args.compile else ''}{', act-ckpt' if args.act_ckpt else ''}; "
              f"peak {peak or 'unknown'} TFLOP/s")
        print("| pixels | image tokens | measurement | ms | TFLOP/s | MFU % | peak mem GiB | vs FM step |")
        print("|---|---|---|---|---|---|---|---|")
        fm = {r[0]: r[3] for r in rows if r[2] == "FM step"}
        for area, L, name, ms, tf, mfu, mem in rows:
            print(f"| {area}^2 | {L} | {name} | {ms:.1f} | {tf:.1f} | {mfu:.1f} | {mem:.1f} | {ms / fm[area]:.2f}x |")
    return rows


if __name__ == "__main__":
    cli.run(main)
