"""The any-step sampler (docs/method.md §7) and its command line.

    python sample.py --steps 4 "a red circle to the left of a blue square"
    python sample.py --sweep 1,2,4,8,50 "a photo of a red circle" "a photo of two squares"
    python sample.py --from-file prompts.txt --outdir samples           # one PNG per image, samples.jsonl
    torchrun --nproc_per_node 8 sample.py --ckpt RUN --from-file evaluation_metadata.jsonl --outdir geneval

N steps over a linear grid 1 = t_0 > ... > t_N = 0 warped by mu(L) (s.12); at step k the network sees
(t_k, s_k) with s_k = t_{k+1} by default (Sec. 3.4); guidance is energy-preserving CFG (w = 5); the
update is DDIM-style with eta = 1 (S.2; eta = 0 is Eq. 22). One step without guidance uses s = 0.5
(S.3.1). EMA weights by default.

With --outdir every image is its own PNG and its own line of samples.jsonl (prompt, seed, steps, guidance,
checkpoint); a GenEval metadata file (.jsonl) gets GenEval's folder layout (docs/evaluation.md §8). Image j
of prompt i starts from noise seeded by (seed, 1000 i + j) whatever batch or process it rides in, so under
torchrun the ranks share the images out and write what one process writes.
"""
import argparse
import codecs
import dataclasses
import json
import math
import os
import re
import shutil
import sys

import torch
import torch.distributed as dist

import cli
import data
import encoders
import losses
import selfe
from cli import number


def time_grid(steps, L, anchor=512, shift=True):
    """t_0 = 1 > t_1 > ... > t_N = 0: linspace(1, 0, N + 1) warped with mu(L) (s.12). (N + 1,)"""
    mu = losses.mu_of_length(L, anchor) if shift else 0.0
    return losses.warp(torch.linspace(1, 0, steps + 1, dtype=torch.float64), mu).float()


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


def resolve_defaults(steps, guidance, s_schedule, objective="selfe"):
    """The paper's settings where none are given: w = 5 and s_k = t_{k+1}; one step without guidance at
    s = 0.5 (S.3.1, Fig. S.4). A model trained by plain flow matching only ever saw s = t, so it samples with
    s_k = t_k at every step count (S.3.1: s_k = t_k *is* flow matching)."""
    if s_schedule is None:
        s_schedule = "current" if objective == "fm" else "0.5" if steps == 1 else "next"
    if guidance is None:
        guidance = 1.0 if steps == 1 else 5.0
    return guidance, s_schedule


@torch.no_grad()
def sample(system, prompts, steps=4, guidance=None, eta=1.0, s_schedule=None, seeds=None, net=None,
           anchor=512, shift=True, progress=False, objective="selfe", cond=None, null=None):
    """prompts (B) -> images (B, 3, H, W) in [-1, 1]. Each image's noise comes from its own seed
    (default 0..B-1), so an image does not depend on what else is in the batch. `guidance` is the EP-CFG
    scale w (1: none); the network `net` defaults to the EMA weights if present; `objective` ('selfe' or 'fm':
    what the model was trained with) picks the default s_k. `cond` and `null` are the prompts' and phi's
    encodings (txt, vec) where no text encoder is loaded (train.py's previews from a cache): batch B and 1."""
    net = net or system.ema or system.denoiser
    guidance, s_schedule = resolve_defaults(steps, guidance, s_schedule, objective)
    dev = system.device
    B = len(prompts)
    h, w = system.grid
    L, C = h * w, system.cfg.in_channels
    seeds = list(range(B)) if seeds is None else list(seeds)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    randn = lambda: torch.stack([torch.randn(L, C, generator=g) for g in gens]).to(dev)  # (B, L, C)
    cond = system.encode_text(prompts) if cond is None else cond
    if guidance != 1:  # both guidance branches in one batched call per step
        null = system.null_cond(B) if null is None else selfe.expand(null, B)
        cond = tuple(torch.cat(pair) for pair in zip(cond, null))
    ts = time_grid(steps, L, anchor, shift)
    ss = second_times(ts, s_schedule)
    x = randn()
    for k in range(steps):
        t, t_next, s = ts[k].item(), ts[k + 1].item(), ss[k].item()
        xin = torch.cat((x, x)) if guidance != 1 else x
        tt = torch.full((len(xin),), t, device=dev)
        v = system.velocity(net, xin, tt, torch.full_like(tt, s), cond, h, w).float()
        if guidance != 1:
            v = ep_cfg(v[:B], v[B:], guidance)
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
        system.guidance = args.flux_guidance
        return system, {"step": 0, "flags": FLUX_SAMPLING[args.size], "source": weights}
    system, meta = selfe.load_checkpoint(args.ckpt, args.device, args.weights, args.pretrained, args.t5,
                                         args.clip, args.vae, args.resolution)
    meta["source"] = f"{selfe.resolve_checkpoint(args.ckpt)} (step {meta['step']}, {args.weights} weights)"
    return system, meta


# ------------------------------------------------------------------------------------------------------------
# Prompt files, one PNG per image, and ranks

def read_prompts(path):
    """A prompt file -> [(prompt, metadata line or None)]: plain text with one prompt per line, or (`.jsonl`)
    GenEval's metadata lines, a JSON object with a "prompt" each, kept as written. UTF-8 (a byte-order mark
    is allowed); blank lines are skipped. A line that is not UTF-8 or not such an object, or a file without
    prompts, stops with file and line."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise data.ManifestError(f"{path}: cannot read the prompt file ({e.strerror})") from e
    if lines and lines[0].startswith(codecs.BOM_UTF8):
        lines[0] = lines[0][len(codecs.BOM_UTF8):]
    geneval = path.lower().endswith(".jsonl")
    prompts = []
    for n, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise data.ManifestError(f"{path}:{n}: not UTF-8 (byte {raw[e.start]:#04x} at column "
                                     f"{e.start + 1}); save the file as UTF-8") from None
        if not line:
            continue
        if not geneval:
            prompts.append((line, None))
            continue
        try:
            meta = json.loads(line)
        except json.JSONDecodeError as e:
            raise data.ManifestError(f"{path}:{n}: not JSON ({e.msg}, column {e.colno}); a .jsonl file holds "
                                     "one GenEval metadata object per line") from None
        if not (isinstance(meta, dict) and isinstance(meta.get("prompt"), str) and meta["prompt"].strip()):
            raise data.ManifestError(f'{path}:{n}: not a GenEval metadata line (a JSON object with a '
                                     '"prompt" string)')
        prompts.append((meta["prompt"].strip(), line))
    if not prompts:
        raise data.ManifestError(f"{path}: no prompts in it (one per line"
                                 + (", as GenEval metadata objects)" if geneval else ")"))
    return prompts


# What --outdir holds (docs/formats.md §6); an --outdir holding any of these is refused unless --overwrite.
SAMPLE_FILE = re.compile(r"samples\.jsonl(\.tmp)?|\d{5,}(-\d{4}\.png)?")


def image_path(i, j, geneval):
    """Image j of prompt i under --outdir: GenEval's <i>/samples/<j>.png (beside <i>/metadata.jsonl), or
    <i>-<j>.png."""
    return os.path.join(f"{i:05d}", "samples", f"{j:04d}.png") if geneval else f"{i:05d}-{j:04d}.png"


def image_seed(seed, i, j):
    """Image j (< 1000) of prompt i: the noise seed evaluate.py gives it too (data.stream_seed)."""
    return data.stream_seed(seed, 1000 * i + j)


def distributed(args):
    """Under torchrun: a process group for the barriers that order the ranks' files (gloo: no tensor travels)
    and the rank's own GPU. -> (rank, world size)."""
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("gloo")
    if args.device == "cuda":
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return dist.get_rank(), dist.get_world_size()


def barrier():
    if dist.is_initialized():
        dist.barrier()


def clear_outdir(outdir, overwrite, rank):
    """Before any sampling: an --outdir holding earlier samples is refused, or with --overwrite emptied of
    them (and of nothing else). Every rank checks before rank 0 deletes."""
    found = sorted(n for n in os.listdir(outdir) if SAMPLE_FILE.fullmatch(n)) if os.path.isdir(outdir) else []
    if found and not overwrite:
        raise FileExistsError(f"{outdir} already holds samples ({', '.join(found[:3])}"
                              f"{', ...' * (len(found) > 3)}): pass --overwrite to replace them, or choose "
                              "another --outdir")
    barrier()
    if rank == 0:
        for name in found:
            path = os.path.join(outdir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
        os.makedirs(outdir, exist_ok=True)
    barrier()


def write_images(draw, prompts, n, args, record, rank, world):
    """--outdir: rank r draws images r, r + world, ... of the (prompt, image) list, `args.batch` per call,
    one PNG each; when every rank is done, rank 0 writes GenEval's metadata.jsonl per prompt (a GenEval file)
    and samples.jsonl, one line per image, last: present means complete."""
    from PIL import Image
    geneval = prompts[0][1] is not None
    jobs = [(i, j) for i in range(len(prompts)) for j in range(n)]
    mine = jobs[rank::world]
    for b in range(0, len(mine), args.batch):
        chunk = mine[b:b + args.batch]
        images = data.to_uint8(draw([prompts[i][0] for i, _ in chunk],
                                    [image_seed(args.seed, i, j) for i, j in chunk]))
        for (i, j), im in zip(chunk, images):
            path = os.path.join(args.outdir, image_path(i, j, geneval))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tile = Image.fromarray(im.numpy())
            tile.resize((tile.width * args.upscale, tile.height * args.upscale), Image.NEAREST).save(path)
        if rank == 0:
            print(f"  {min(b + args.batch, len(mine))}/{len(mine)} images" + (f" on rank 0 of {world}"
                  if world > 1 else ""), file=sys.stderr, flush=True)
    barrier()
    if rank != 0:
        return
    if geneval:
        for i, (_, line) in enumerate(prompts):
            os.makedirs(os.path.join(args.outdir, f"{i:05d}", "samples"), exist_ok=True)
            with open(os.path.join(args.outdir, f"{i:05d}", "metadata.jsonl"), "w", encoding="utf-8") as f:
                f.write(line + "\n")
    index = os.path.join(args.outdir, "samples.jsonl")
    with open(index + ".tmp", "w", encoding="utf-8") as f:
        for i, j in jobs:
            f.write(json.dumps({"file": image_path(i, j, geneval), "prompt": prompts[i][0], "prompt_index": i,
                                "image": j, "seed": image_seed(args.seed, i, j), **record},
                               ensure_ascii=False) + "\n")
    os.replace(index + ".tmp", index)
    print(f"wrote {len(jobs)} images and {index}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*", metavar="PROMPT")
    p.add_argument("--from-file", default=None, metavar="FILE",
                   help="prompts from FILE: one per line, or GenEval metadata lines (.jsonl)")
    p.add_argument("--ckpt", default="runs/tiny", help="run folder (uses its `latest`) or a step folder")
    p.add_argument("--steps", type=number(int, 1, cli.MAX_STEPS), default=4, help="sampling steps (A 15)")
    p.add_argument("--guidance", "--cfg", dest="guidance", type=number(float), default=None,
                   help="EP-CFG guidance scale w (default 5; 1 = no guidance; 1 step: 1; A 21, A 24)")
    p.add_argument("--eta", type=number(float, 0, 1), default=None,
                   help="DDIM eta (1 = the paper's setting, 0 = Euler, Eq. 22; A 7)")
    p.add_argument("--s-schedule", type=cli.s_schedule, default=None,
                   help="next (s_k = t_{k+1}), current (s_k = t_k) or a in [0, 1] (A 20, A 21)")
    p.add_argument("--seed", type=cli.seed, default=0)
    p.add_argument("--n", "--n-samples", dest="n", type=number(int, 1, 1000), default=None,
                   help="images per prompt (default 1; 4 for a GenEval .jsonl, as GenEval scores); under "
                   "torchrun write --n-samples: torchrun reads --n as the start of its own --nnodes")
    p.add_argument("--batch", type=number(int, 1), default=16, help="images per sampling call")
    p.add_argument("--out", type=cli.image_file, default=None,
                   help="grid image path (default sample.png, or sweep.png with --sweep)")
    p.add_argument("--outdir", type=cli.writable_folder, default=None,
                   help="one PNG per image and samples.jsonl in this folder (GenEval's layout for a GenEval "
                   ".jsonl) instead of a grid; works under torchrun")
    p.add_argument("--overwrite", action="store_true",
                   help="with --outdir: delete the earlier samples there first (without it they are refused)")
    p.add_argument("--sweep", type=cli.step_counts, default=None,
                   help="comma-separated step counts: one grid row per step count")
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--anchor", type=cli.anchor, default=None,
                   help="mu(L) anchor length (default: the run's; A 6)")
    p.add_argument("--upscale", type=number(int, 1, 64), default=None,
                   help="nearest-neighbour zoom of the PNG (default: a grid to >= 256 px, --outdir images 1)")
    p.add_argument("--resolution", type=number(int, 1), default=None,
                   help="image side in pixels (default: the preset's)")
    p.add_argument("--device", type=cli.device, default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=number(int, 1), default=None,
                   help="CPU threads (default: one per idle core, cli.cpu_threads)")
    f = p.add_argument_group("real frozen parts and the public FLUX.1 transformers")
    f.add_argument("--size", default=None,
                   help="flux-schnell or flux-dev: sample the public FLUX.1 transformer")
    f.add_argument("--pretrained", default=None,
                   help="FLUX.1 snapshot folder (T5, CLIP, autoencoder, transformer)")
    f.add_argument("--t5", default=None, help="T5 v1.1 XXL folder (weights, config.json, spiece.model)")
    f.add_argument("--clip", default=None,
                   help="CLIP ViT-L/14 text folder (weights, config.json, vocab, merges)")
    f.add_argument("--vae", default=None, help="FLUX autoencoder file (ae.safetensors or diffusers layout)")
    f.add_argument("--flux-guidance", type=number(float), default=3.5,
                   help="flux-dev's distilled guidance input (not EP-CFG's --guidance)")
    args = p.parse_args(argv)
    if bool(args.prompts) == bool(args.from_file):
        p.error("give the prompts as arguments or --from-file FILE (one of the two)")
    if args.outdir and (args.out or args.sweep):
        p.error("--outdir writes one PNG per image; --out and --sweep write one grid")
    if args.overwrite and not args.outdir:
        p.error("--overwrite goes with --outdir")
    if "RANK" in os.environ and not args.outdir:
        p.error("under torchrun sample.py shares the images out: pass --outdir DIR")
    if args.device == "cpu":
        cli.cpu_threads(args.threads)
    rank, world = distributed(args)
    try:
        return sample_cli(p, args, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def sample_cli(p, args, rank, world):
    """After the flags: the prompts (a bad file stops here), the --outdir check, the model, then one grid or
    one PNG per image."""
    prompts = read_prompts(args.from_file) if args.from_file else [(pr, None) for pr in args.prompts]
    n = args.n or (4 if prompts[0][1] is not None else 1)
    if args.outdir:
        clear_outdir(args.outdir, args.overwrite, rank)                  # before the model loads
    system, meta = load_system(args)
    side = system.cfg.patch * system.downsample  # pixels per token
    if args.resolution and args.resolution % side:
        below = args.resolution // side * side
        p.error(f"argument --resolution: this model makes images in multiples of {side} px: use "
                + (f"{below} or " if below else "") + f"{below + side}")
    flags = meta["flags"]
    anchor = args.anchor or flags.get("anchor", 512)
    shift = flags.get("shift", True)
    guidance = args.guidance if args.guidance is not None else flags.get("cfg")
    eta = args.eta if args.eta is not None else flags.get("eta", 1.0)
    objective = flags.get("objective", "selfe")
    if rank == 0:
        print(f"sampling {meta['source']}", file=sys.stderr)

    def draw(texts, seeds, steps=args.steps, progress=False):  # -> (B, 3, H, W), --batch images per call
        return torch.cat([sample(system, texts[b:b + args.batch], steps, guidance, eta, args.s_schedule,
                                 seeds[b:b + args.batch], anchor=anchor, shift=shift, progress=progress,
                                 objective=objective).cpu() for b in range(0, len(texts), args.batch)])
    if args.outdir:
        used_w, used_s = resolve_defaults(args.steps, guidance, args.s_schedule, objective)
        h, w = system.grid
        record = {"steps": args.steps, "cfg": used_w, "eta": eta, "s_schedule": used_s,
                  "resolution": [h * side, w * side], "checkpoint": meta["source"]}
        args.upscale = args.upscale or 1
        return write_images(draw, prompts, n, args, record, rank, world)
    upscale = args.upscale or max(1, 256 // system.cfg.resolution)
    texts = [pr for pr, _ in prompts for _ in range(n)]
    seeds = [data.stream_seed(args.seed, i, stride=1000) for i in range(len(texts))]
    if args.sweep:
        rows, labels = [], []
        for steps in args.sweep:
            print(f"{steps} step(s):", file=sys.stderr)
            rows.append(draw(texts, seeds, steps, progress=True))
            labels.append(f"{steps} step" + ("s" if steps > 1 else ""))
        out = save_grid(rows, args.out or "sweep.png", upscale, labels)
    else:
        out = save_grid(list(draw(texts, seeds, progress=True).split(n)), args.out or "sample.png", upscale)
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)
