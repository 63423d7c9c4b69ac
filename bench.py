"""Benchmarks: what a training step costs on the path training takes, and what it needs
before any device is rented.

    python bench.py --size 2b                          # one GPU: the table below, eager and compiled
    torchrun --nproc_per_node 8 bench.py --size 2b     # each of 8 GPUs, sharded as train.py shards them
    python bench.py --plan --size 2b --micro-batch 16 --world 8    # memory plan per device, no GPU or weights
    python bench.py --plan --size 2b --micro-batch 8 --online --no-aux   # frozen encoders held, before aux
    python bench.py --t5-load                          # frozen-part load memory (T5-XXL, host RSS)
    python bench.py --t5-load --layers 6 --keep        # smaller, for a disk that cannot take 9.5 GB
    python bench.py --cache-cost --size 2b             # cache bytes per image and read time, T5 mask or not
    python bench.py --save-cost --size 2b --world 8    # what a checkpoint writes per rank; the loop's wait

The table: at each resolution (2b: 256^2 = 256 image + 512 text tokens, and 512^2), per-device micro-batch
--micro-batch: the denoiser's forward+backward, an FM step, a Self-E step and a Self-E step with the auxiliary
term (half the batch at s < t), each as ms, model TFLOP/s per device, MFU, peak memory and its ratio to the FM
step; eager, then with the blocks compiled. A step is train.py's: train.setup's network
(FSDP2 bf16 mixed precision, also in one process), train.objective, backward, train.update (clip, Adam, EMA),
with trained-like weights (trained_like: init_weights' zeros would make every block's gradient zero).
Each row prints as it is measured; a row that runs out of memory prints OOM and the next one runs
(on N ranks an OOM on one rank only can leave the others waiting).

The memory plan: per device, the fp32 parameters, gradients, Adam moments and EMA
(sharded over --shard ranks of --world), the weights FSDP gathers at a time, the full-size gradient of
--accum micro-steps on N ranks, the frozen encoders and their encoding peak when training --online, and the
activations a training step keeps for backward (the auxiliary pass's unless --no-aux), with and without
activation checkpointing (docs/scaling.md §3). The activations are counted by running that step on
the meta device (shapes and dtypes, no memory): every tensor the step makes and that is still alive when
backward starts. train.py checks the same plan against the GPU's memory before it builds a weight.

The load memory (--t5-load): a synthetic checkpoint with T5 v1.1 XXL's real key names and shapes, laid out as
FLUX.1's text_encoder_2/ (bf16, two shards of at most 5 GB, index and config; about 9.5 GB), is loaded by
encoders.load_t5 in a fresh process, whose peak RSS is held against the file size (target: at most 1.3 x).
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import safetensors
import torch
import torch.distributed as dist

import encoders
import memory
import selfe
import train
from model import CONFIGS, MMDiT


# ------------------------------------------------------------------------------------------------------------
# The memory plan (memory.py), as a table

def print_plan(args, world):
    cfg = CONFIGS[args.size]
    area = max(args.resolution)
    aux = args.objective == "selfe" and not args.no_aux
    plans = [memory.memory_plan(cfg, args.micro_batch, area, world, ckpt, args.precision, args.objective,
                                shard=args.shard, accum=args.accum, aux=aux, frozen=args.online)
             for ckpt in (False, True)]
    h, w = memory.tokens(cfg, area)
    step = ("FM step" if args.objective == "fm" else
            f"Self-E step{' + aux' if aux else ' before the auxiliary term'}, every sample evaluated")
    print(f"memory plan: --size {args.size}, micro-batch {args.micro_batch} per device at {area} px "
          f"({h * w} image + {cfg.t5_max_len} text tokens) x {args.accum} micro-steps, {world} device(s) "
          f"sharding over {args.shard or world}, {args.precision}, {step}, "
          f"{'frozen parts online' if args.online else 'from a cache (no frozen parts)'}")
    print("| GiB per device | without act-ckpt | with --act-ckpt |\n|---|---|---|")
    for part in plans[0]:
        print(f"| {part} | {plans[0][part] / 2 ** 30:.3g} | {plans[1][part] / 2 ** 30:.3g} |")
    return plans


# ------------------------------------------------------------------------------------------------------------
# The benchmark

def measure(fn, iters, device):
    """Warm up (and compile) twice, then time `iters` calls -> (ms per call, peak GiB or nan on CPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return (time.perf_counter() - t0) / iters * 1e3, mem


def trained_like(net, ema, std=0.02):
    """Weights as a trained network has them rather than as init_weights leaves them: adaLN-Zero's zero
    modulation and output layers make every block's gradient zero, and zeros run faster through bf16
    matmuls, so a benchmark on them measures less work than training does. N(0, std) is added to every
    parameter (under FSDP each rank to its own shard); the EMA copies them."""
    local = lambda m: [p.to_local() if hasattr(p, "to_local") else p for p in m.parameters()]
    with torch.no_grad():
        for p, e in zip(local(net), local(ema)):
            p.add_(torch.randn_like(p) * std)
            e.copy_(p)


def setup(targs):
    """train.setup's system, network, EMA and Adam (no frozen parts), with trained-like weights."""
    system, net, ema, opt, peak = train.setup(targs, frozen_parts=False)
    trained_like(net, ema)
    return system, net, ema, opt, peak


def bench_rows(args, targs, world, system, net, ema, opt, area, say):
    """The four measurements at one resolution; each row goes to `say` as soon as it is measured."""
    cfg, dev, b = system.cfg, system.device, args.micro_batch
    Lt = cfg.t5_max_len
    grid = memory.tokens(cfg, area)
    L = grid[0] * grid[1]
    torch.manual_seed(0)
    x0 = torch.randn(b, L, cfg.in_channels, device=dev)
    cond = (torch.randn(b, Lt, cfg.context_in_dim, device=dev), torch.randn(b, cfg.vec_in_dim, device=dev))
    null = tuple(torch.zeros_like(c[:1]) for c in cond)
    eps, eps_self = torch.randn_like(x0), torch.randn_like(x0)
    t = torch.rand(b, device=dev) * 0.9 + 0.05
    s = torch.where(torch.arange(b, device=dev) < b // 2, t * 0.5, t)   # half the batch at s < t
    n_eval = b // 2
    idx, weight = (x.to(dev) for x in train.evaluated((s < t).cpu(), b, world, targs.compile))
    G = functools.partial(system.predict, net, h=grid[0], w=grid[1])
    G_ema = functools.partial(system.predict, ema, h=grid[0], w=grid[1])
    fake = tuple(c[idx] for c in cond)
    streak = torch.zeros((), dtype=torch.long, device=dev)                # no step is skipped (none fails)

    def fwd_bwd():  # with the resharding of train.update: the weights are cast once per step, as there
        system.velocity(net, x0, t, s, cond, *grid).float().square().mean().backward()
        selfe.reshard(net)
        opt.zero_grad(set_to_none=True)

    def step(objective, aux):  # train.py's iteration: objective, backward, clip, Adam, EMA
        a = argparse.Namespace(**{**vars(targs), "objective": objective})
        loss, _ = train.objective(a, G, G_ema, x0, t, s, cond, null, eps=eps, eps_self=eps_self,
                                  evaluated=idx, weight=weight, fake=fake if aux else None,
                                  fake_norm=max(n_eval, 1))
        loss.backward()
        train.update(net, opt, system, targs, 10 ** 6, streak)

    F_ = system.denoiser.flops(L, Lt)
    rows = (("denoiser fwd+bwd", fwd_bwd, train.step_flops(F_, b, 0, False)),
            ("FM step", lambda: step("fm", False), train.step_flops(F_, b, 0, False)),
            ("Self-E step", lambda: step("selfe", False), train.step_flops(F_, b, n_eval, False)),
            ("Self-E step + aux", lambda: step("selfe", True), train.step_flops(F_, b, n_eval, True)))
    fm_ms = None
    for name, fn, flops in rows:
        try:
            ms, mem = measure(fn, args.iters, dev)
        except torch.OutOfMemoryError:
            opt.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            say(area, L, targs.compile, name, None)
            continue
        fm_ms = ms if name == "FM step" else fm_ms
        tf = flops / ms / 1e9
        say(area, L, targs.compile, name, (ms, tf, mem, ms / fm_ms if fm_ms else float("nan")))


def benchmark(args, rank, world):
    cfg = CONFIGS[args.size]
    areas = args.resolution
    peak = None
    rows = []

    def say(area, L, compiled, name, r):
        rows.append((area, L, compiled, name, r))
        if rank != 0:
            return
        if r is None:
            print(f"| {area}^2 | {L} | {'yes' if compiled else 'no'} | {name} | OOM | | | | |", flush=True)
            return
        ms, tf, mem, ratio = r
        mfu = f"{100 * tf / peak:.1f}" if peak else "-"
        mem = "-" if mem != mem else f"{mem:.1f}"                        # nan: no allocator statistics on CPU
        ratio = "-" if ratio != ratio else f"{ratio:.2f}x"
        print(f"| {area}^2 | {L} | {'yes' if compiled else 'no'} | {name} | {ms:.1f} | {tf:.3g} | {mfu} | "
              f"{mem} | {ratio} |", flush=True)

    for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
        targs = train.get_args(["--size", args.size, "--device", args.device, "--precision", args.precision,
                                "--seed", "0", *(["--compile"] if compiled else []),
                                *(["--act-ckpt"] if args.act_ckpt else [])])
        system, net, ema, opt, peak = setup(targs)
        peak = args.peak_tflops or peak
        if rank == 0 and not rows:
            print(f"{args.size} on {world} x {train.device_name(system.device)}, "
                  f"micro-batch {args.micro_batch} per device, {cfg.t5_max_len} text tokens, {args.precision}"
                  f"{', act-ckpt' if args.act_ckpt else ''}; peak {peak or 'unknown'} TFLOP/s")
            print("| pixels | image tokens | compiled | measurement | ms | TFLOP/s | MFU % | peak mem GiB | "
                  "vs FM |\n|---|---|---|---|---|---|---|---|---|", flush=True)
        with train.compile_config(targs), train.compile_errors(targs):
            for area in areas:
                bench_rows(args, targs, world, system, net, ema, opt, area, say)
        del system, net, ema, opt
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------------------
# Frozen-part load memory: a T5-XXL-shaped checkpoint through encoders.load_t5, in a fresh process

def write_bf16_safetensors(path, shapes, tile):
    """A bf16 safetensors file streamed tensor by tensor (header, then bytes cut from `tile`), never
    holding a shard in memory."""
    header, offset = {}, 0
    for k, s in shapes.items():
        n = 2 * torch.Size(s).numel()
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for s in shapes.values():
            n = 2 * torch.Size(s).numel()
            while n:
                chunk = tile[:n]
                f.write(chunk)
                n -= len(chunk)


def write_t5_checkpoint(folder, layers, max_shard=5 * 10**9):
    """A synthetic T5 v1.1 XXL checkpoint laid out as FLUX's text_encoder_2/: HF T5EncoderModel's keys and
    shapes (those of encoders.T5Encoder; the tied encoder.embed_tokens.weight is not stored), bf16, shards of
    at most 5 GB, model.safetensors.index.json and config.json; about 9.5 GB at 24
    layers. -> (bytes, shard count)."""
    config = encoders.T5Config(num_layers=layers)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in encoders.T5Encoder(config).state_dict().items()}
    os.makedirs(folder, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k, s in shapes.items():  # HF's rule: start a new shard when the next tensor would pass max_shard
        n = 2 * torch.Size(s).numel()
        if cur and size + n > max_shard:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = s, size + n
    shards.append(cur)
    tile = (torch.randn(32 << 20, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    tile = tile.view(torch.uint8).numpy().tobytes()  # 64 MB of plausible bf16 values, tiled
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_bf16_safetensors(os.path.join(folder, name), shard, tile)
        total += sum(2 * torch.Size(s).numel() for s in shard.values())
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    hf_config = {**dataclasses.asdict(config), "feed_forward_proj": "gated-gelu", "is_gated_act": True,
                 "dense_act_fn": "gelu_new", "model_type": "t5"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    with safetensors.safe_open(os.path.join(folder, next(iter(weight_map.values()))), "pt") as f:
        # the files read back with the reference reader too
        assert f.get_tensor("shared.weight").shape == (config.vocab_size, config.d_model)
    return total, len(shards)


def load_t5_and_measure(folder):
    """Runs in a fresh process: peak RSS of exactly this load."""
    rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    t5 = encoders.load_t5(folder, dtype=torch.bfloat16, device="cpu")
    seconds = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in t5.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "rss_before": rss0, "peak_rss": peak, "param_bytes": params}))


def touch_and_measure(nbytes):
    """Runs in a fresh process: the time to allocate and first-touch as many bytes, the floor for any loader
    (on some VMs the first touch of fresh memory, not the reading, dominates)."""
    t0 = time.perf_counter()
    torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def t5_load(args):
    """Write the synthetic checkpoint, load it in a fresh process and report that process's peak RSS
    (getrusage), its RSS before loading and the wall time, against the target peak RSS <= 1.3 x the
    checkpoint: the loader reads each tensor straight into its parameter. Timings are with the checkpoint in
    the page cache (it was just written)."""
    with torch.device("meta"):
        t5 = encoders.T5Encoder(encoders.T5Config(num_layers=args.layers))
    need = 2 * sum(p.numel() for p in t5.parameters())
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir))).free
    if need > 0.9 * free:
        sys.exit(f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free: use --layers N to write less")
    t0 = time.perf_counter()
    size, n_shards = write_t5_checkpoint(args.dir, args.layers)
    print(f"wrote {size / 1e9:.2f} GB in {n_shards} shards ({args.layers} layers) to {args.dir} "
          f"in {time.perf_counter() - t0:.0f} s")
    run = lambda *flags: json.loads(subprocess.run(
        [sys.executable, __file__, "--t5-load", "--dir", args.dir, *flags], check=True, capture_output=True,
        text=True, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip().splitlines()[-1])
    try:
        r = run("--load-only")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    floor = run("--touch-only", str(size))["seconds"]
    print(f"load_t5: {r['seconds']:.1f} s, {size / 1e9 / r['seconds']:.2f} GB/s (checkpoint in the page "
          f"cache); allocating and first-touching {size / 1e9:.2f} GB alone takes {floor:.1f} s here")
    print(f"peak RSS {r['peak_rss'] / 1e9:.2f} GB = {r['peak_rss'] / size:.3f} x the checkpoint "
          f"({size / 1e9:.2f} GB); RSS before loading {r['rss_before'] / 1e9:.2f} GB; loaded parameters "
          f"{r['param_bytes'] / 1e9:.2f} GB; target <= 1.3 x: "
          f"{'met' if r['peak_rss'] <= 1.3 * size else 'NOT met'}")


# ------------------------------------------------------------------------------------------------------------
# What files cost: the text cache with and without the T5 mask, and a checkpoint save

def cache_cost(args):
    """--cache-cost: bytes per image of a cache (data.write_cache) of --size's shapes at 256^2, and the time
    data.CachedData takes to read one batch of --micro-batch items from disk (the shards evicted from the page
    cache first), with all t5_max_len T5 states per caption (no mask: padding attends, so all are stored)
    and with --caption-tokens of them (--t5-mask). Random values of the real sizes and dtypes (bf16 text, as
    the encoders give on a GPU); no encoder runs."""
    import data
    cfg, n, side = CONFIGS[args.size], 2 * args.micro_batch, 256 // 8
    print(f"cache of --size {args.size} at 256^2 ({n} items, latents 16x{side}x{side} fp32, T5 states "
          f"{cfg.context_in_dim} wide in bf16, t5_max_len {cfg.t5_max_len}), read {args.micro_batch} items:")
    print("| T5 states per caption | bytes per image | of which text | read a batch (ms) |")
    print("|---|---|---|---|")
    for mask, kept in ((False, cfg.t5_max_len), (True, args.caption_tokens)):
        folder = os.path.join(args.dir, f"cache-{'mask' if mask else 'full'}")
        shutil.rmtree(folder, ignore_errors=True)

        class Source:  # n items of one bucket, as data.ManifestData gives them
            items = [(i, (256, 256)) for i in range(n)]

            def __len__(self):
                return n

            def batch(self, idx):
                return torch.zeros(len(idx), 3, 256, 256), ["a caption"] * len(idx)

        def encode_text(captions):  # c_fake's prefix adds 3 T5 tokens ("fake image, ")
            m = min(cfg.t5_max_len, kept + 3 * captions[0].startswith("fake"))
            return (torch.randn(len(captions), cfg.t5_max_len, cfg.context_in_dim, dtype=torch.bfloat16),
                    torch.randn(len(captions), cfg.vec_in_dim, dtype=torch.bfloat16),
                    torch.full((len(captions),), m if mask else cfg.t5_max_len))
        meta = data.cache_meta(cfg, 0, [256], 1.0, "fake image, ", mask)
        with contextlib.redirect_stdout(io.StringIO()):
            data.write_cache(folder, Source(), lambda x: torch.randn(len(x), 16, side, side),
                             encode_text, fake_prefix="fake image, ", meta=meta, batch=args.micro_batch)
        shards = [os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("shard-")]
        size = sum(os.path.getsize(f) for f in shards) / n
        with safetensors.safe_open(shards[0], "pt") as f:
            text = sum(f.get_slice(k).get_shape()[0] for k in ("txt", "fake_txt")) * cfg.context_in_dim * 2
        cached = data.CachedData(folder, meta, args.micro_batch)
        times = []
        for _ in range(3):
            for f in shards:  # from the disk, not the page cache
                fd = os.open(f, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            t0 = time.perf_counter()
            cached.batch(cached.indices(0))
            times.append(1e3 * (time.perf_counter() - t0))
        print(f"| {kept}{' (--t5-mask)' if mask else ' (all)'} | {size / 2 ** 20:.2f} MiB | "
              f"{text / n / 2 ** 20:.2f} MiB | {sorted(times)[1]:.0f} |")
        if not args.keep:
            shutil.rmtree(folder)


def save_cost(args):
    """--save-cost: per rank, what a checkpoint of --size at --world ranks writes and holds, from the preset's
    parameter count on the meta device (the training state: model, EMA, two Adam moments, fp32, sharded; the
    EMA file: before, gathered into rank 0's host memory and written by it alone, now each rank's rows in
    place); then, on this machine, how long train.py's loop waits for one save of the tiny preset, written in
    the loop (--ckpt-sync) or on a thread (the default: the loop only waits for the host copy)."""
    world = args.world or 1
    with torch.device("meta"):
        n = sum(p.numel() for p in MMDiT(CONFIGS[args.size]).parameters())
    gib = lambda x: f"{x / 2 ** 30:.2f} GiB"
    state, ema = 4 * 4 * n / world, 4 * n
    print(f"--size {args.size}: {n / 1e9:.2f} B parameters at {world} ranks, per rank: training state "
          f"{gib(state)}; EMA file: was {gib(ema)} on rank 0 (gathered in its host memory), now "
          f"{gib(ema / world)} on each; host copy for a save on the thread: {gib(state)}")
    torch.manual_seed(0)
    system = selfe.SelfE(CONFIGS["tiny"])
    system.make_ema()
    opt = torch.optim.Adam(system.denoiser.parameters(), fused=True)
    folder = os.path.join(args.dir, "save-cost")
    for background in (False, True):
        waits = []
        for step in range(1, 6):
            t0 = time.perf_counter()
            train.save_checkpoint(folder, system, step, {}, opt, background=background)
            waits.append(1e3 * (time.perf_counter() - t0))
            train.finish_checkpoint(wait=True)  # (not timed: the loop goes on meanwhile)
        print(f"tiny on this machine, {'on a thread' if background else 'in the loop'}: the loop waits "
              f"{sorted(waits)[2]:.0f} ms per save (median of 5)")
    shutil.rmtree(folder)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="2b", choices=list(CONFIGS))
    p.add_argument("--micro-batch", type=int, default=8,
                   help="samples per device in one forward and backward "
                   "(train.py's --batch is the global batch)")
    p.add_argument("--batch", type=int, default=None, dest="global_batch", help=argparse.SUPPRESS)
    p.add_argument("--resolution", default=None,
                   help="square sides in pixels, e.g. 256,512 (default: 256,512; the preset's "
                   "for tiny and --plan)")
    p.add_argument("--iters", type=int, default=10, help="timed calls per measurement")
    p.add_argument("--compile", default="both", choices=("off", "on", "both"),
                   help="blocks eager, compiled, or both")
    p.add_argument("--act-ckpt", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=("bf16", "fp32"), help="default: bf16 on GPU and for "
                   "--plan, fp32 on CPU")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device peak for MFU (default: H100 and H200 789)")
    p.add_argument("--plan", action="store_true", help="print the memory plan and exit (meta device only)")
    p.add_argument("--world", type=int, default=None, help="devices the states are sharded over, for --plan "
                   "(default: torchrun's WORLD_SIZE, or 1)")
    p.add_argument("--objective", default="selfe", choices=("selfe", "fm"), help="the step --plan counts")
    p.add_argument("--no-aux", action="store_true",
                   help="--plan: the part of a Self-E run before the auxiliary term starts")
    p.add_argument("--shard", type=int, default=None,
                   help="--plan: ranks the states are sharded over (train.py --shard; default: --world)")
    p.add_argument("--accum", type=int, default=1, help="--plan: micro-steps per step")
    p.add_argument("--online", action="store_true",
                   help="--plan: the frozen encoders run in training (data not from a cache)")
    t = p.add_argument_group("frozen-part load memory (--t5-load)")
    t.add_argument("--t5-load", action="store_true",
                   help="peak host memory of loading a T5-XXL-shaped checkpoint")
    t.add_argument("--dir", default="/tmp/t5xxl-synthetic", help="where the synthetic checkpoint is written")
    t.add_argument("--layers", type=int, default=24,
                   help="24 is the real T5-XXL (9.5 GB); fewer for a small disk")
    t.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    t.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    t.add_argument("--touch-only", type=int, help=argparse.SUPPRESS)
    f = p.add_argument_group("what files cost (--cache-cost, --save-cost; --dir, --keep, --micro-batch, "
                             "--world)")
    f.add_argument("--cache-cost", action="store_true", help="bytes per image and read time of a cache, "
                   "with and without the T5 mask")
    f.add_argument("--caption-tokens", type=int, default=77,
                   help="T5 tokens of a caption with its end token, for --cache-cost")
    f.add_argument("--save-cost", action="store_true", help="what a checkpoint writes per rank; how long the "
                   "loop waits for one")
    args = p.parse_args(argv)
    if args.cache_cost or args.save_cost:
        return cache_cost(args) if args.cache_cost else save_cost(args)
    if args.t5_load:
        if args.load_only:
            return load_t5_and_measure(args.dir)
        if args.touch_only:
            return touch_and_measure(args.touch_only)
        return t5_load(args)
    cfg = CONFIGS[args.size]
    default_res = str(cfg.resolution) if args.size == "tiny" or args.plan else "256,512"
    args.resolution = [int(r) for r in (args.resolution or default_res).split(",")]
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") or args.plan else "fp32")
    if args.global_batch is not None:
        p.error(f"argument --batch: bench.py measures one device's micro-batch: pass --micro-batch "
                f"{args.global_batch} (train.py's --batch is the global batch, split over devices and "
                "--accum)")
    if args.micro_batch < 1 or args.iters < 1:
        p.error("--micro-batch and --iters must be >= 1")
    if args.plan:
        return print_plan(args, args.world or int(os.environ.get("WORLD_SIZE", "1")))
    targs = train.get_args(["--device", args.device, "--precision", args.precision])
    rank, world = train.init_distributed(targs)
    args.device = targs.device                                            # cuda:LOCAL_RANK under torchrun
    try:
        return benchmark(args, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
