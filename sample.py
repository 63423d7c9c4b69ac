"""The any-step sampler (docs/method.md §7) and its command line.

    python sample.py --steps 4 "a red circle to the left of a blue square"
    python sample.py --sweep 1,2,4,8,50 "a photo of a red circle" "a photo of two squares"

N steps over a linear grid 1 = t_0 > ... > t_N = 0 warped by mu(L) (s.12); at step k the network sees
(t_k, s_k) with s_k = t_{k+1} by default (Sec. 3.4); guidance is energy-preserving CFG (w = 5); the
update is DDIM-style with eta = 1 (S.2; eta = 0 is Eq. 22). One step without guidance uses s = 0.5
(S.3.1). EMA weights by default.
"""
import argparse
import dataclasses
import math
import os
import sys

import torch

import cli
import data
import encoders
import selfe
from cli import number


def time_grid(steps, L, anchor=512, shift=True):
    """t_0 = 1 > t_1 > ... > t_N = 0: linspace(1, 0, N + 1) warped with mu(L) (s.12). (N + 1,)"""
    mu = selfe.mu_of_length(L, anchor) if shift else 0.0
    return selfe.warp(torch.linspace(1, 0, steps + 1, dtype=torch.float64), mu).float()


def second_times(ts, schedule="next"):
    """s_k for each step: 'next' s_k = t_{k+1} (default), 'current' s_k = t_k (plain FM), or a number a
    in [0, 1]: s_k = t_{k+1} + a (t_k - t_{k+1}) (for one step, a = 0.5 gives the paper's s = 0.5)."""
    if schedule == "next":
        return ts[1:].clone()
    if schedule == "current":
        return ts[:-1].clone()
    a = float(schedule)
    if not 0 <= a <= 1:
        raise ValueError(f"--s-schedule {schedule!r}: use next, current or a number in [0, 1]")
    return ts[1:] + a * (ts[:-1] - ts[1:])


def ep_cfg(v_c, v_u, w):
    """Energy-preserving CFG [EP-CFG]: v = v_c + (w - 1)(v_c - v_u), rescaled per
    sample to the norm of v_c."""
    v = v_c + (w - 1) * (v_c - v_u)
    return v * (v_c.flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1).clamp_min(1e-8)).view(-1, 1, 1)


def ddim_step(x, v, t, t_next, eta, noise):
    """DDIM-style update from t to t_next < t (docs/method.md §7.4, minFM's heuristic form, A 7). eta = 0 is
    Euler (Eq. 22); eta = 1 re-injects fresh noise; t_next = 0 returns the x0 estimate."""
    x0_hat = x - t * v
    if t_next <= 0:
        return x0_hat
    e_hat = x + (1 - t) * v
    b = max(t_next - eta * (t - t_next) * (t_next / t), 0.0)  # = t_next at eta 0, t_next^2 / t at eta 1
    x = (1 - t_next) * x0_hat + b * e_hat
    return x if eta == 0 else x + math.sqrt(max(t_next ** 2 - b ** 2, 0.0)) * noise


def resolve_defaults(steps, cfg, s_schedule, objective="selfe"):
    """The paper's settings where none are given: w = 5 and s_k = t_{k+1}; one step without guidance at
    s = 0.5 (S.3.1, Fig. S.4). A model trained by plain flow matching only ever saw s = t, so it samples with
    s_k = t_k at every step count (S.3.1: s_k = t_k *is* flow matching)."""
    if s_schedule is None:
        s_schedule = "current" if objective == "fm" else "0.5" if steps == 1 else "next"
    if cfg is None:
        cfg = 1.0 if steps == 1 else 5.0
    return cfg, s_schedule


@torch.no_grad()
def sample(system, prompts, steps=4, cfg=None, eta=1.0, s_schedule=None, seeds=None, model=None, anchor=512,
           shift=True, progress=False, objective="selfe"):
    """prompts (B) -> images (B, 3, H, W) in [-1, 1]. Each image's noise comes from its own seed
    (default 0..B-1), so an image does not depend on what else is in the batch. `model` defaults
    to the EMA weights if present; `objective` ('selfe' or 'fm': what the model was trained with)
    picks the default s_k."""
    model = model or system.ema or system.denoiser
    cfg, s_schedule = resolve_defaults(steps, cfg, s_schedule, objective)
    dev = system.device
    B = len(prompts)
    h, w = system.grid
    L, C = h * w, system.cfg.in_channels
    seeds = list(range(B)) if seeds is None else list(seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    randn = lambda: torch.stack([torch.randn(L, C, generator=g) for g in gens]).to(dev)  # (B, L, C)
    cond = system.encode_text(prompts)
    if cfg != 1:  # both guidance branches in one batched call per step
        cond = tuple(torch.cat(pair) for pair in zip(cond, system.null_cond(B)))
    ts = time_grid(steps, L, anchor, shift)
    ss = second_times(ts, s_schedule)
    x = randn()
    for k in range(steps):
        t, t_next, s = ts[k].item(), ts[k + 1].item(), ss[k].item()
        xin = torch.cat((x, x)) if cfg != 1 else x
        tt = torch.full((len(xin),), t, device=dev)
        v = system.velocity(model, xin, tt, torch.full_like(tt, s), cond, h, w).float()
        if cfg != 1:
            v = ep_cfg(v[:B], v[B:], cfg)
        x = ddim_step(x, v, t, t_next, eta, randn() if (eta > 0 and t_next > 0) else None)
        # a live counter on a terminal, one line in a log
        if progress and (sys.stderr.isatty() or k + 1 == steps):
            print(f"\r  step {k + 1}/{steps}", end="" if k + 1 < steps else "\n", file=sys.stderr, flush=True)
    return system.decode_tokens(x, h, w)


# ------------------------------------------------------------------------------------------------------------
# Images and grids

def save_grid(rows, path, upscale=1, labels=None, pad=2):
    """rows: list of (n, 3, H, W) image batches, one grid row each; optional text label per
    row, drawn on the left."""
    from PIL import Image, ImageDraw
    rows = [data.to_uint8(r) for r in rows]
    H, W = rows[0].shape[1] * upscale, rows[0].shape[2] * upscale
    ncol = max(len(r) for r in rows)
    left = 64 if labels else 0
    canvas = Image.new("RGB", (left + ncol * (W + pad) + pad, len(rows) * (H + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            tile = Image.fromarray(im.numpy()).resize((W, H), Image.NEAREST)
            canvas.paste(tile, (left + pad + j * (W + pad), pad + i * (H + pad)))
        if labels:
            draw.text((4, pad + i * (H + pad) + H // 2 - 6), labels[i], fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path)
    return path


# The public FLUX.1 transformers sample as BFL does: Euler (eta 0), no CFG; schnell without the time shift,
# dev with mu anchored at 256 tokens and its distilled guidance input.
FLUX_SAMPLING = {"flux-schnell": dict(cfg=1.0, eta=0.0, shift=False, anchor=256),
                 "flux-dev": dict(cfg=1.0, eta=0.0, shift=True, anchor=256)}


def load_system(args):
    """--ckpt DIR (a Self-E run) or --size flux-schnell|flux-dev --pretrained DIR
    (the public FLUX.1 transformer)."""
    if args.size:
        if args.size not in FLUX_SAMPLING:
            raise SystemExit(f"--size {args.size!r}: sample.py --size takes {', '.join(FLUX_SAMPLING)} "
                             f"(Self-E presets sample from their checkpoint: --ckpt DIR)")
        if not args.pretrained:
            raise SystemExit(f"--size {args.size} needs --pretrained FLUX_DIR (a FLUX.1 snapshot folder)")
        cfg = selfe.preset(args.size)
        if args.resolution:
            cfg = dataclasses.replace(cfg, resolution=args.resolution)
        weights = encoders.find_pretrained(args.pretrained, transformer=True)["transformer"]
        system = selfe.SelfE(cfg, args.device, pretrained=args.pretrained, t5=args.t5, clip=args.clip,
                             vae=args.vae, transformer=weights)
        system.guidance = args.guidance
        return system, {"step": 0, "flags": FLUX_SAMPLING[args.size], "source": weights}
    system, meta = selfe.load_checkpoint(args.ckpt, args.device, args.weights, args.pretrained, args.t5,
                                         args.clip, args.vae, args.resolution)
    meta["source"] = f"{selfe.resolve_checkpoint(args.ckpt)} (step {meta['step']}, {args.weights} weights)"
    return system, meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--ckpt", default="runs/tiny", help="run folder (uses its `latest`) or a step folder")
    p.add_argument("--steps", type=number(int, 1, cli.MAX_STEPS), default=4, help="sampling steps (A 15)")
    p.add_argument("--cfg", type=number(float), default=None,
                   help="EP-CFG scale (default 5; 1 = no guidance; 1 step: 1; A 21, A 24)")
    p.add_argument("--eta", type=number(float, 0, 1), default=None,
                   help="DDIM eta (1 = the paper's setting, 0 = Euler, Eq. 22; A 7)")
    p.add_argument("--s-schedule", type=cli.s_schedule, default=None,
                   help="next (s_k = t_{k+1}), current (s_k = t_k) or a in [0, 1] (A 20, A 21)")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--n", type=number(int, 1), default=1, help="images per prompt")
    p.add_argument("--out", type=cli.image_file, default=None,
                   help="image path (default sample.png, or sweep.png with --sweep)")
    p.add_argument("--sweep", type=cli.step_counts, default=None,
                   help="comma-separated step counts: one grid row per step count")
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--anchor", type=cli.anchor, default=None,
                   help="mu(L) anchor length (default: the run's; A 6)")
    p.add_argument("--upscale", type=number(int, 1, 64), default=None,
                   help="nearest-neighbour zoom of the PNG (default: to >= 256 px)")
    p.add_argument("--resolution", type=number(int, 1), default=None,
                   help="image side in pixels (default: the preset's)")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    f = p.add_argument_group("real frozen parts and the public FLUX.1 transformers")
    f.add_argument("--size", default=None,
                   help="flux-schnell or flux-dev: sample the public FLUX.1 transformer")
    f.add_argument("--pretrained", default=None,
                   help="FLUX.1 snapshot folder (T5, CLIP, autoencoder, transformer)")
    f.add_argument("--t5", default=None, help="T5 v1.1 XXL folder (weights, config.json, spiece.model)")
    f.add_argument("--clip", default=None,
                   help="CLIP ViT-L/14 text folder (weights, config.json, vocab, merges)")
    f.add_argument("--vae", default=None, help="FLUX autoencoder file (ae.safetensors or diffusers layout)")
    f.add_argument("--guidance", type=number(float), default=3.5, help="flux-dev's distilled guidance input")
    args = p.parse_args(argv)
    system, meta = load_system(args)
    side = system.cfg.patch * system.downsample  # pixels per token
    if args.resolution and args.resolution % side:
        below = args.resolution // side * side
        p.error(f"argument --resolution: this model makes images in multiples of {side} px: use "
                + (f"{below} or " if below else "") + f"{below + side}")
    flags = meta["flags"]
    anchor = args.anchor or flags.get("anchor", 512)
    shift = flags.get("shift", True)
    cfg = args.cfg if args.cfg is not None else flags.get("cfg")
    eta = args.eta if args.eta is not None else flags.get("eta", 1.0)
    upscale = args.upscale or max(1, 256 // system.cfg.resolution)
    prompts = [pr for pr in args.prompts for _ in range(args.n)]
    seeds = [data.stream_seed(args.seed, i, stride=1000) for i in range(len(prompts))]
    print(f"sampling {meta['source']}", file=sys.stderr)
    run = lambda n: sample(system, prompts, n, cfg, eta, args.s_schedule, seeds, anchor=anchor, shift=shift,
                           progress=True, objective=flags.get("objective", "selfe"))
    if args.sweep:
        rows, labels = [], []
        for n in args.sweep:
            print(f"{n} step(s):", file=sys.stderr)
            rows.append(run(n))
            labels.append(f"{n} step" + ("s" if n > 1 else ""))
        out = save_grid(rows, args.out or "sweep.png", upscale, labels)
    else:
        out = save_grid(list(run(args.steps).split(args.n)), args.out or "sample.png", upscale)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
