"""The Self-E system that train.py and sample.py share.

- `SelfE`: the dual-time denoiser and its frozen parts, built from a preset: text -> (T5 tokens, CLIP pooled),
  image <-> latent tokens (patchify), V and the sample head G = x_t - t V (Eq. 6).
- The forward process x_t = (1 - t) x_0 + t eps (Eq. 1), logit-normal time with the length-dependent warp (s.11-s.12),
  the second time s with its tau anneal (s.13), caption dropout (METHOD.md 3), EMA, and the checkpoint format.
Equation numbers are the paper's, as collected in ../shared/METHOD.md.
"""
import json
import math
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

import data
from model import CONFIGS, CLIPTextEncoder, Config, MMDiT, T5Encoder, init_text_encoder

NULL_PROMPT = ""  # phi: the empty prompt, through both encoders (METHOD.md 3, [ASSUMPTION] 1)


# ----------------------------------------------------------------------------------------------------------------------
# Forward process, sample head, time sampling

def forward_process(x0, t, eps):
    """Eq. (1) with (alpha_t, sigma_t) = (1 - t, t): x_t = (1 - t) x_0 + t eps. x0, eps (B, L, C); t (B,)."""
    t = t.view(-1, 1, 1)
    return (1 - t) * x0 + t * eps


def g_head(x_t, t, v):
    """Eq. (6): G = x_t - t V, the x_0 prediction."""
    return x_t - t.view(-1, 1, 1) * v


def mu_of_length(L, anchor=512, mu_anchor=0.5, mu_4096=1.15):
    """Length-dependent shift (METHOD.md 6): linear in the patch count L, 0.5 at `anchor` (paper 512, [ASSUMPTION] 6;
    minFM/FLUX 256), 1.15 at 4096, extrapolated linearly outside."""
    return mu_anchor + (mu_4096 - mu_anchor) * (L - anchor) / (4096 - anchor)


def warp(t, mu):
    """(s.12): t -> e^mu / (e^mu + 1/t - 1), written to be exact at t = 0 and t = 1; mu > 0 pushes t toward noise."""
    return math.exp(mu) * t / (math.exp(mu) * t + 1 - t)


def sample_t(n, L, anchor=512, device="cpu"):
    """(s.11)-(s.12): t_raw = sigmoid(z), z ~ N(0, 1), then warped by mu(L)."""
    return warp(torch.sigmoid(torch.randn(n, device=device)), mu_of_length(L, anchor))


def tau_at(step, tau_steps):
    """(s.13): tau anneals linearly from 0 to 1 over the first `tau_steps` iterations (paper: 300k of 710k)."""
    return 1.0 if tau_steps <= 0 else min(1.0, step / tau_steps)


def sample_s(t, tau, p_equal=0.5, force_equal=None):
    """(s.13): s = t with probability p_equal, else s ~ U((1 - tau) t, t). `force_equal` (B,) bool marks samples that
    must keep s = t (captions dropped: [ASSUMPTION] 2, their self-evaluation would carry no signal)."""
    equal = torch.rand_like(t) < p_equal
    if force_equal is not None:
        equal |= force_equal
    s = t - tau * t * torch.rand_like(t)
    return torch.where(equal, t, s)


def drop_captions(captions, p):
    """Classifier-free-guidance dropout ([ASSUMPTION] 1: p = 0.1, caption -> ""). Returns captions and the dropped mask."""
    dropped = torch.rand(len(captions)) < p
    return [NULL_PROMPT if d else c for c, d in zip(captions, dropped.tolist())], dropped


# ----------------------------------------------------------------------------------------------------------------------
# Tokens <-> images

def patchify(x, p):
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p) in FLUX's order, row-major over patches."""
    B, C, H, W = x.shape
    return x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, h, w, p):
    """(B, h w, C p p) -> (B, C, h p, w p)."""
    B, L, D = x.shape
    C = D // (p * p)
    return x.view(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * p, w * p)


def image_ids(h, w, device="cpu"):
    """RoPE positions (t = 0, row, col) of the image tokens, batch 1: (1, h w, 3)."""
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.view(1, h * w, 3)


# ----------------------------------------------------------------------------------------------------------------------
# The system

class SelfE:
    """Denoiser + frozen text encoders (+ autoencoder) of one preset. `denoiser` is trained; `ema` is its EMA copy."""

    def __init__(self, cfg: Config, device="cpu", frozen_seed=0, pretrained=None, meta=False):
        self.cfg, self.device = cfg, torch.device(device)
        with torch.device("meta" if meta else self.device):
            self.denoiser = MMDiT(cfg)
        if not meta:
            self.denoiser.init_weights()
        self.ema = None
        self.frozen_seed = frozen_seed
        if cfg.tokenizer == "bytes":  # the tiny preset's stand-ins: same classes as the real encoders, random, seeded
            self.t5_tokenizer = data.ByteTokenizer(cfg.t5_max_len, "pad-end")
            self.clip_tokenizer = data.ByteTokenizer(cfg.clip.max_position_embeddings, "start-end")
            self.t5 = init_text_encoder(T5Encoder(cfg.t5), frozen_seed).to(self.device).requires_grad_(False)
            self.clip = init_text_encoder(CLIPTextEncoder(cfg.clip), frozen_seed + 1).to(self.device)
            self.clip.requires_grad_(False)
        else:
            raise NotImplementedError(
                f"the real frozen parts (T5-XXL, CLIP-L, FLUX autoencoder) are not wired in yet: preset latent "
                f"{cfg.latent!r}, tokenizer {cfg.tokenizer!r} (pretrained={pretrained!r}). Use --size tiny.")
        if cfg.latent != "pixels":
            raise NotImplementedError(f"latent space {cfg.latent!r} needs the FLUX autoencoder; use --size tiny")
        self._null = None

    # -- text
    @torch.no_grad()
    def encode_text(self, prompts):
        """prompts -> (txt (B, Lt, d_txt) T5 states, vec (B, d_vec) pooled CLIP)."""
        txt = self.t5(self.t5_tokenizer(prompts).to(self.device))
        _, vec = self.clip(self.clip_tokenizer(prompts).to(self.device))
        return txt, vec

    def null_cond(self):
        """The empty prompt's encoding, batch 1, computed once."""
        if self._null is None:
            self._null = self.encode_text([NULL_PROMPT])
        return self._null

    # -- images
    @property
    def grid(self):
        """Token grid (h, w) of the preset's resolution."""
        n = self.cfg.latent_size // self.cfg.patch
        return n, n

    def encode_images(self, images):
        """(B, 3, H, W) in [-1, 1] -> tokens (B, L, C p p). Pixel space in the tiny preset."""
        return patchify(images.to(self.device), self.cfg.patch)

    def decode_tokens(self, x, h, w):
        """tokens (B, h w, C p p) -> images (B, 3, H, W) in [-1, 1]."""
        return unpatchify(x, h, w, self.cfg.patch).clamp(-1, 1)

    # -- the network
    def velocity(self, model, x, t, s, cond, h, w):
        """V_theta(x, t, s, c): x (B, h w, C); t, s (B,); cond (txt, vec). Shared positions ride with batch 1."""
        txt, vec = cond
        img_ids = image_ids(h, w, x.device)
        txt_ids = torch.zeros(1, txt.shape[1], 3, device=x.device)
        return model(x, img_ids, txt, txt_ids, t, s, vec)

    def G(self, model, x, t, s, cond, h, w):
        """Eq. (6): G_theta(x_t, t, s, c) = x_t - t V_theta(x_t, t, s, c), in fp32."""
        return g_head(x.float(), t, self.velocity(model, x, t, s, cond, h, w).float())

    # -- EMA
    def make_ema(self):
        self.ema = MMDiT(self.cfg).to(self.device).requires_grad_(False)
        self.ema.load_state_dict(self.denoiser.state_dict())
        return self.ema

    @torch.no_grad()
    def update_ema(self, decay, step):
        """EMA of the weights (S.2: 0.9999). The decay warms up as min(decay, (1 + step) / (10 + step)) so that short
        runs get a useful EMA early: the conditional self-evaluation pass runs on it from step 0."""
        d = min(decay, (1 + step) / (10 + step))
        for e, p in zip(self.ema.parameters(), self.denoiser.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - d)

    def frozen_state(self):
        return {**{f"t5.{k}": v for k, v in self.t5.state_dict().items()},
                **{f"clip.{k}": v for k, v in self.clip.state_dict().items()}}

    def load_frozen_state(self, sd, where):
        for name, mod in (("t5", self.t5), ("clip", self.clip)):
            part = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            load_strict(mod, part, f"{where} ({name}.*)")


def load_strict(module, sd, where):
    """load_state_dict that names the file and the first offending keys, and checks shapes before copying anything."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{where}: cannot load: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
                         f"wrong shapes {wrong[:5]} ({len(missing)} missing, {len(unexpected)} unexpected, "
                         f"{len(wrong)} wrong in all)")
    module.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: <out>/step-NNNNNNN/{model,ema,frozen}.safetensors + config.json (+ train_state.pt); <out>/latest names
# the newest complete one. A checkpoint is written to a temporary folder and renamed, then `latest` is replaced
# atomically, so a crash never leaves a partial checkpoint behind `latest`.

def save_checkpoint(out, system, step, flags, train_state=None, keep=2):
    os.makedirs(out, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = os.path.join(out, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    cpu = lambda sd: {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    save_file(cpu(system.denoiser.state_dict()), os.path.join(tmp, "model.safetensors"))
    if system.ema is not None:
        save_file(cpu(system.ema.state_dict()), os.path.join(tmp, "ema.safetensors"))
    if system.cfg.tokenizer == "bytes":  # random stand-ins travel with the checkpoint
        save_file(cpu(system.frozen_state()), os.path.join(tmp, "frozen.safetensors"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"config": system.cfg.to_dict(), "flags": flags, "step": step}, f, indent=1)
    if train_state is not None:
        torch.save(train_state, os.path.join(tmp, "train_state.pt"))
    final = os.path.join(out, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out, "latest.tmp"), "w") as f:
        f.write(name + "\n")
    os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
    old = sorted(d for d in os.listdir(out) if d.startswith("step-") and not d.endswith(".tmp"))
    for d in old[:-keep]:
        shutil.rmtree(os.path.join(out, d), ignore_errors=True)
    return final


def resolve_checkpoint(path):
    """A run folder (with `latest`) or a step folder -> the step folder; a clear error if there is none."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no checkpoint at {os.path.abspath(path)} (looked for {path}/latest and "
                                f"{path}/config.json). Train one with `python train.py` (writes runs/tiny).")
    return path


def load_checkpoint(path, device="cpu", weights="ema"):
    """Rebuild the system from the config saved in a checkpoint and load its weights ('ema' or 'model')."""
    path = resolve_checkpoint(path)
    with open(os.path.join(path, "config.json")) as f:
        meta = json.load(f)
    cfg = Config.from_dict(meta["config"])
    system = SelfE(cfg, device=device, frozen_seed=meta["flags"].get("seed", 0))
    file = os.path.join(path, f"{weights}.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file} missing: the checkpoint at {path} is incomplete")
    load_strict(system.denoiser, load_file(file, device=str(system.device)), file)
    frozen = os.path.join(path, "frozen.safetensors")
    if cfg.tokenizer == "bytes":
        system.load_frozen_state(load_file(frozen, device=str(system.device)), frozen)
    system.denoiser.eval()
    return system, meta


def preset(name):
    if name not in CONFIGS:
        raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(CONFIGS)}")
    return CONFIGS[name]
