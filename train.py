"""Train Self-E, or the plain flow-matching baseline with the identical network and budget.

    python train.py                                  # tiny preset on the built-in shapes world, CPU, minutes
    python train.py --size 0.5b --data manifest.tsv  # real data (image path <TAB> prompt)
    python train.py --objective fm                   # the flow-matching baseline (Table 2)
    python train.py --resume                         # continue the run in --out from its latest checkpoint

Read top to bottom: flags, set-up, the loop (data -> encode -> t, s -> losses.py -> backward, step, EMA), logging,
checkpoints. The recipe is METHOD.md section 9: Adam (0.9, 0.95), warmup then linear decay to 1e-5, EMA; the tau
anneal and the auxiliary-term start are fractions of the run (paper: 300k and 550k of 710k iterations).
"""
import argparse
import json
import math
import os
import sys
import time

import torch
from safetensors.torch import load_file

import data
import losses
import sample as sampler
import selfe
from model import CONFIGS

PREVIEW_PROMPTS = ["a red circle to the left of a blue square", "a photo of a green circle", "a photo of three squares",
                   "a photo of a triangle above a circle", "a photo of a white square and a purple triangle"]


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny", choices=list(CONFIGS), help="model preset")
    p.add_argument("--data", default="shapes", help="'shapes' (built-in world) or a TSV manifest: image path<TAB>prompt")
    p.add_argument("--base-dir", default=None, help="base for relative manifest paths (default: the manifest's folder)")
    p.add_argument("--skip-bad", action="store_true", help="skip malformed manifest lines and unreadable images")
    p.add_argument("--world", default=None, choices=list(data.WORLDS), help="shapes world (default: the preset's)")
    p.add_argument("--pretrained", default=None, help="FLUX.1 snapshot folder: T5-XXL, CLIP-L, autoencoder")
    p.add_argument("--t5", default=None, help="T5 v1.1 XXL folder (overrides --pretrained's)")
    p.add_argument("--clip", default=None, help="CLIP ViT-L/14 text folder (overrides --pretrained's)")
    p.add_argument("--vae", default=None, help="FLUX autoencoder file (overrides --pretrained's)")
    p.add_argument("--objective", default="selfe", choices=("selfe", "fm"))
    p.add_argument("--steps", type=int, default=None, help="iterations (default: the preset's)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the preset's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the preset's)")
    p.add_argument("--lr-min", type=float, default=1e-5, help="learning rate at the last step (linear decay)")
    p.add_argument("--warmup", type=int, default=None, help="warmup iterations (default: min(1000, steps / 20))")
    p.add_argument("--grad-clip", type=float, default=1.0, help="[ASSUMPTION] 9: minFM's default")
    p.add_argument("--ema", type=float, default=None, help="EMA decay (paper 0.9999; default: the preset's)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<size>[-fm])")
    p.add_argument("--resume", action="store_true", help="continue from <out>/latest")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--sample-every", type=int, default=1000, help="preview grid every N steps (0: never)")
    # The method's options; each [ASSUMPTION] of METHOD.md is one flag with its stated default.
    m = p.add_argument_group("method (METHOD.md; [A] n = its section 11 item n)")
    m.add_argument("--p-drop", type=float, default=0.1, help="caption dropout for guidance [A] 1")
    m.add_argument("--p-equal", type=float, default=0.5, help="probability of s = t (s.13)")
    m.add_argument("--tau-frac", type=float, default=300 / 710, help="tau anneals 0 -> 1 over this fraction (s.13)")
    m.add_argument("--aux-start-frac", type=float, default=550 / 710, help="auxiliary term from this fraction (S.2)")
    m.add_argument("--k", type=float, default=0.9, help="classifier-score share of Delta (s.6)")
    m.add_argument("--fake-prefix", default="fake image, ", help="c_fake = prefix + prompt [A] 8")
    m.add_argument("--fake-weight", type=float, default=1.0, help="weight of L_fake (s.8) [A] 8")
    m.add_argument("--anchor", type=int, default=512, help="patch count where mu = 0.5 (paper 512, minFM 256) [A] 6")
    m.add_argument("--t-min", type=float, default=1e-3, help="clamp of t in the 1/t^2 weight [A] 11")
    m.add_argument("--no-target-norm", action="store_true", help="Eq. 16 instead of the normalized target (Eq. 20)")
    m.add_argument("--reuse-noise", action="store_true", help="re-noise x0_hat with eps, not fresh noise [A] 3")
    m.add_argument("--selfeval-dropped", action="store_true", help="also self-evaluate caption-dropped samples [A] 2")
    args = p.parse_args(argv)
    cfg = CONFIGS[args.size]
    for name, default in (("steps", cfg.steps), ("batch", cfg.batch), ("lr", cfg.lr), ("ema", cfg.ema_decay),
                          ("world", cfg.world)):
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.warmup is None:
        args.warmup = min(1000, args.steps // 20)
    args.out = args.out or os.path.join("runs", args.size + ("-fm" if args.objective == "fm" else ""))
    for name in ("steps", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def lr_at(step, args):
    """Linear warmup, then linear decay from --lr to --lr-min at the last step (METHOD.md 9)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr + (args.lr_min - args.lr) * min(1.0, frac)


def main(argv=None):
    args = get_args(argv)
    torch.manual_seed(args.seed)
    cfg = CONFIGS[args.size]
    system = selfe.SelfE(cfg, args.device, args.seed, args.pretrained, args.t5, args.clip, args.vae)
    ema = system.make_ema()
    model = system.denoiser
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if args.data == "shapes":
        world = data.WORLDS[args.world]
        if world.resolution != cfg.resolution:
            raise SystemExit(f"world {world.name!r} is {world.resolution} px but preset {args.size!r} is "
                             f"{cfg.resolution} px")
        source = data.ShapesData(world, seed=args.seed)
    else:
        source = data.ManifestData(args.data, cfg.resolution, args.base_dir, args.skip_bad)
    h, w = system.grid
    L = h * w
    tau_steps = round(args.tau_frac * args.steps)
    aux_start = round(args.aux_start_frac * args.steps)
    flags = vars(args)
    os.makedirs(args.out, exist_ok=True)

    start = 0
    if args.resume:
        path = selfe.resolve_checkpoint(args.out)
        with open(os.path.join(path, "config.json")) as f:
            meta = json.load(f)
        if selfe.Config.from_dict(meta["config"]) != cfg:
            raise SystemExit(f"{path} was trained with another preset than --size {args.size}")
        selfe.load_strict(model, load_file(os.path.join(path, "model.safetensors")), path)
        selfe.load_strict(ema, load_file(os.path.join(path, "ema.safetensors")), path)
        if cfg.tokenizer == "bytes":
            system.load_frozen_state(load_file(os.path.join(path, "frozen.safetensors")), path)
        state = torch.load(os.path.join(path, "train_state.pt"), weights_only=False)
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = meta["step"]
        print(f"resumed from {path} at step {start}")

    def train_state():
        return {"optimizer": opt.state_dict(), "rng": torch.get_rng_state()}

    G = lambda x, t, s, c: system.G(model, x, t, s, c, h, w)        # current weights (with grad when enabled)
    G_ema = lambda x, t, s, c: system.G(ema, x, t, s, c, h, w)      # EMA weights, for the conditional pass (S.2)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.size}: {n_params / 1e6:.2f}M denoiser parameters, {L} image tokens, objective {args.objective}, "
          f"{args.steps} steps x batch {args.batch} on {args.device}; tau over {tau_steps} steps, aux from {aux_start}")

    history, window, t0 = [], [], time.time()
    t_window = time.time()
    for step in range(start, args.steps):
        lr = lr_at(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        images, captions = source.batch(range(step * args.batch, (step + 1) * args.batch))
        x0 = system.encode_images(images)                                   # (B, L, C)
        captions, dropped = selfe.drop_captions(captions, args.p_drop)
        cond = system.encode_text(captions)                                 # (B, Lt, d_txt), (B, d_vec)
        t = selfe.sample_t(args.batch, L, args.anchor, system.device)       # (s.11)-(s.12)
        if args.objective == "fm":
            out = losses.fm_loss(G, x0, t, cond, args.t_min)
        else:
            s = selfe.sample_s(t, selfe.tau_at(step, tau_steps), args.p_equal,
                               None if args.selfeval_dropped else dropped.to(t.device))  # (s.13)
            fake = None
            if step >= aux_start:  # the auxiliary term of s.6-s.8, late in training
                fake = lambda idx: system.encode_text([args.fake_prefix + captions[i] for i in idx.tolist()])
            out = losses.selfe_loss(G, G_ema, x0, t, s, cond, system.null_cond(), fake, args.k,
                                    not args.no_target_norm, args.t_min, args.fake_weight, not args.reuse_noise)
        loss = out["loss"]
        if not torch.isfinite(loss):
            debug = os.path.join(args.out, f"nonfinite-step-{step}")
            selfe.save_checkpoint(debug, system, step, flags, train_state())
            torch.save({"captions": captions, "t": t, "x0": x0, "out": out}, os.path.join(debug, "batch.pt"))
            raise SystemExit(f"step {step}: loss is {loss.item()}; weights before this step and the batch are in "
                             f"{debug}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        opt.step()
        system.update_ema(args.ema, step)

        rec = {"step": step + 1, "loss": loss.item(), "data": out["data"].mean().item(), "grad_norm": grad_norm,
               "lr": lr}
        if args.objective == "selfe":
            sel = out["selfeval"]
            rec.update(self=out["self"][sel].mean().item() if sel.any() else 0.0,
                       lam=out["lam"][sel].mean().item() if sel.any() else 0.0,
                       frac_s_lt_t=sel.float().mean().item(), fake=out["fake"].item())
        history.append(rec)
        window.append((t.detach().cpu(), out["per_sample"].cpu()))
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            log(rec, window, args, step, start, t_window)
            window, t_window = [], time.time()
        if (step + 1) % args.ckpt_every == 0 or step + 1 == args.steps:
            selfe.save_checkpoint(args.out, system, step + 1, flags, train_state())
        if args.sample_every and ((step + 1) % args.sample_every == 0 or step + 1 == args.steps):
            preview(system, args, step + 1)
    print(f"done: {args.steps - start} steps in {time.time() - t0:.0f} s; checkpoint in {args.out}")
    return history


def log(rec, window, args, step, start, t_window):
    """One line: every loss term, lambda, the share of s < t, grad norm, throughput, ETA, and the loss by t-bin."""
    n = len(window)
    t = torch.cat([w[0] for w in window])
    per = torch.cat([w[1] for w in window])
    bins = torch.bucketize(t, torch.tensor([0.25, 0.5, 0.75]))
    by_bin = " ".join(f"{per[bins == b].mean().item():.3f}" if (bins == b).any() else "-" for b in range(4))
    rate = n * args.batch / (time.time() - t_window)
    eta = (args.steps - step - 1) * args.batch / rate
    extra = ""
    if "self" in rec:
        extra = (f" self {rec['self']:.4f} lam {rec['lam']:.2f} s<t {rec['frac_s_lt_t']:.2f}"
                 + (f" fake {rec['fake']:.4f}" if rec["fake"] else ""))
    print(f"step {rec['step']:>6} loss {rec['loss']:.4f} data {rec['data']:.4f}{extra} | gnorm {rec['grad_norm']:.2f} "
          f"lr {rec['lr']:.2e} | {rate:.1f} samples/s ETA {eta / 60:.1f} min | loss by t-bin {by_bin}", flush=True)
    with open(os.path.join(args.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")


def preview(system, args, step):
    """A grid of the EMA model: rows 1, 2, 4 steps; columns the preview prompts."""
    rows = [sampler.sample(system, PREVIEW_PROMPTS, n, anchor=args.anchor) for n in (1, 2, 4)]
    path = sampler.save_grid(rows, os.path.join(args.out, f"preview-{step:07d}.png"),
                             upscale=max(1, 128 // system.cfg.resolution), labels=["1 step", "2 steps", "4 steps"])
    print(f"preview: {path}")


if __name__ == "__main__":
    main()
