"""The network Self-E trains, hand-written: the dual-time MMDiT denoiser, its presets and its FLOP count.

The denoiser is FLUX's MM-DiT (double-stream blocks, then single-stream blocks, multi-axis RoPE,
QK-RMSNorm, adaLN modulation) with the dual-time embedding of Self-E (docs/method.md §8.2-8.3, s.9-s.10):
the conditioning vector is
    vec = MLP_t(sinusoid(t)) + MLP_s(sinusoid(t - s)) + MLP(CLIP pooled),
with MLP_s (`s_in`) in the slot where FLUX adds its guidance embedding. Module and parameter names are
FLUX's, so a BFL checkpoint loads by name (`load_flux_transformer`). The network outputs V; the sample
head G = x_t - t V (Eq. 6) lives in selfe.py. The frozen parts (T5, CLIP, autoencoder) and their
loaders are in encoders.py.
"""
import math
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

import encoders


# ------------------------------------------------------------------------------------------------------------
# Presets

@dataclass
class Config:
    """One preset: the denoiser's shapes (docs/method.md §8), the frozen parts, the image space and the
    training defaults that depend on scale. `--size` picks one from CONFIGS."""
    # denoiser
    hidden_size: int = 2048
    num_heads: int = 16
    depth: int = 8                 # double-stream blocks
    depth_single_blocks: int = 16
    axes_dim: tuple = (16, 56, 56)  # RoPE dims per position axis (t, y, x); sums to the head dim
    theta: int = 10_000
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    in_channels: int = 64          # d_img = latent channels * patch^2
    context_in_dim: int = 4096     # d_txt (T5)
    vec_in_dim: int = 768          # d_vec (pooled CLIP)
    dual_time: bool = True         # Self-E's MLP_s(t - s) embedding (s.9); off for the FLUX transformers
    guidance_embed: bool = False   # FLUX.1-dev's distilled-guidance embedding; never used by Self-E
    # image space
    resolution: int = 256
    latent: str = "flux-vae"       # "flux-vae" (16 channels, /8) or "pixels" (3 channels, /1)
    patch: int = 2
    # text
    t5: encoders.T5Config = field(default_factory=encoders.T5Config)
    clip: encoders.CLIPConfig = field(default_factory=encoders.CLIPConfig)
    t5_max_len: int = 512          # A 17: minFM 256, FLUX-dev 512
    tokenizer: str = "pretrained"  # "pretrained" (sentencepiece + CLIP BPE) or "words" (tiny stand-ins)
    # training defaults that depend on scale (each a train.py flag)
    batch: int = 1024
    steps: int = 710_000
    lr: float = 3e-4
    ema_decay: float = 0.9999
    world: str = "full"            # shapes world used when --data shapes

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def prompt_words(self):
        """Words (tokens) of a prompt the stand-in encoders keep: T5 adds an end token, CLIP a start and an
        end."""
        return min(self.t5_max_len - 1, self.clip.max_position_embeddings - 2)

    @property
    def latent_channels(self):
        return 3 if self.latent == "pixels" else 16

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(d):
        d = dict(d)
        d["t5"], d["clip"] = encoders.T5Config(**d["t5"]), encoders.CLIPConfig(**d["clip"])
        d["axes_dim"] = tuple(d["axes_dim"])
        return Config(**d)


CONFIGS = {
    # CPU demo: pixel space 32 px, patch 4 (64 image tokens), small random frozen T5 and CLIP over the shapes
    # world's words (16 text tokens).
    "tiny": Config(hidden_size=96, num_heads=3, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14),
                   mlp_ratio=2.0, in_channels=3 * 4 * 4, context_in_dim=64, vec_in_dim=64, resolution=32,
                   latent="pixels", patch=4,
                   t5=encoders.T5Config(vocab_size=76, d_model=64, d_kv=16, num_heads=4, d_ff=128,
                                        num_layers=2),
                   clip=encoders.CLIPConfig(vocab_size=76, hidden_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=128,
                                            max_position_embeddings=16, eos_token_id=1),
                   t5_max_len=16, tokenizer="words", batch=16, steps=10000, lr=2e-3, ema_decay=0.995,
                   world="small"),
    # The paper's ablation model (Table 2): d 1024, 16 x 64 heads, 8 + 16 blocks, 256^2.
    "0.5b": Config(hidden_size=1024, num_heads=16, axes_dim=(8, 28, 28), resolution=256),
    # The paper's main model (S.2): d 2048, 16 x 128 heads, 8 + 16 blocks; phase 1 at 256^2.
    "2b": Config(hidden_size=2048, num_heads=16, axes_dim=(16, 56, 56), resolution=256),
    # The public FLUX.1 transformers (12B; docs/formats.md §4.5), to load
    # flux1-{schnell,dev}.safetensors into our MMDiT.
    "flux-schnell": Config(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38,
                           axes_dim=(16, 56, 56), dual_time=False, guidance_embed=False, resolution=1024,
                           t5_max_len=256),
    "flux-dev": Config(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38,
                       axes_dim=(16, 56, 56), dual_time=False, guidance_embed=True, resolution=1024,
                       t5_max_len=512),
}


# ------------------------------------------------------------------------------------------------------------
# Attention and RoPE (FLUX's math.py)

def rope(pos, dim, theta):
    """Rotation angles for one position axis: (B, L) -> (B, L, dim/2, 2, 2) rotation matrices."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / theta ** scale
    out = pos.double()[..., None] * omega  # (B, L, dim/2)
    out = torch.stack([out.cos(), -out.sin(), out.sin(), out.cos()], dim=-1)
    return out.view(*out.shape[:-1], 2, 2).float()


def apply_rope(x, pe):
    """Rotate adjacent pairs of channels of x (B, H, L, D) by pe (B, 1, L, D/2, 2, 2)."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]
    return out.reshape(*x.shape).type_as(x)


def attention(q, k, v, pe):
    """Joint attention with RoPE: (B, H, L, D) x3 -> (B, L, H*D)."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


class EmbedND(nn.Module):
    """Multi-axis RoPE: each position axis (t, y, x) rotates its own slice of the head dim."""

    def __init__(self, theta, axes_dim):
        super().__init__()
        self.theta, self.axes_dim = theta, axes_dim

    def forward(self, ids):  # ids (B, L, n_axes) -> (B, 1, L, D/2, 2, 2)
        emb = torch.cat([rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)], dim=-3)
        return emb.unsqueeze(1)


def timestep_embedding(t, dim=256, max_period=10_000, time_factor=1000.0):
    """Sinusoid(1000 t), cos then sin halves, as FLUX and minFM (docs/method.md §8.3, A 10)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ------------------------------------------------------------------------------------------------------------
# FLUX layers

class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x):
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v.dtype), self.key_norm(k).to(v.dtype)


class SelfAttention(nn.Module):
    """Holds the weights of one stream's attention (the computation is joint, in the blocks)."""

    def __init__(self, dim, num_heads, qkv_bias):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):  # (B, L, dim) -> 3 x (B, H, L, D), q and k normalised
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        return q, k, v


class Modulation(nn.Module):
    """adaLN: vec -> (shift, scale, gate) once (single-stream) or twice (double-stream: attention and MLP)."""

    def __init__(self, dim, double):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec):
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return out[:3], (out[3:] if self.multiplier == 6 else None)


def modulate(x, shift, scale):
    return (1 + scale) * x + shift


class DoubleStreamBlock(nn.Module):
    """Text and image tokens keep separate weights and modulation, and attend jointly over [text; image]."""

    def __init__(self, dim, num_heads, mlp_ratio, qkv_bias):
        super().__init__()
        mlp_hidden = int(dim * mlp_ratio)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(dim, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(dim, num_heads, qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp",
                    nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"),
                                  nn.Linear(mlp_hidden, dim)))

    def forward(self, img, txt, vec, pe):
        (i_shift1, i_scale1, i_gate1), (i_shift2, i_scale2, i_gate2) = self.img_mod(vec)
        (t_shift1, t_scale1, t_gate1), (t_shift2, t_scale2, t_gate2) = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv_heads(modulate(self.img_norm1(img), i_shift1, i_scale1))
        tq, tk, tv = self.txt_attn.qkv_heads(modulate(self.txt_norm1(txt), t_shift1, t_scale1))
        attn = attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2), pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + i_gate1 * self.img_attn.proj(img_attn)
        img = img + i_gate2 * self.img_mlp(modulate(self.img_norm2(img), i_shift2, i_scale2))
        txt = txt + t_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + t_gate2 * self.txt_mlp(modulate(self.txt_norm2(txt), t_shift2, t_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text; image]: attention and MLP in parallel from one fused input projection."""

    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.dim, self.num_heads = dim, num_heads
        self.mlp_hidden = int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, dim * 3 + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // num_heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, double=False)

    def forward(self, x, vec, pe):
        (shift, scale, gate), _ = self.modulation(vec)
        x_mod = modulate(self.pre_norm(x), shift, scale)
        qkv, mlp = self.linear1(x_mod).split([3 * self.dim, self.mlp_hidden], -1)
        B, L, _ = x.shape
        q, k, v = qkv.view(B, L, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = self.norm(q, k, v)
        out = self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), 2))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, dim, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift[:, None], scale[:, None]))


# ------------------------------------------------------------------------------------------------------------
# The dual-time MMDiT

class MMDiT(nn.Module):
    """V_theta(x_t, t, s, c) of Eq. 6: FLUX's transformer with Self-E's dual-time conditioning (s.9-s.10)."""

    def __init__(self, cfg: Config):
        super().__init__()
        assert sum(cfg.axes_dim) == cfg.head_dim, (f"RoPE axes {cfg.axes_dim} must sum to the head dim "
                                                   f"{cfg.head_dim}")
        self.cfg = cfg
        d = cfg.hidden_size
        self.pe_embedder = EmbedND(cfg.theta, cfg.axes_dim)
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.time_in = MLPEmbedder(256, d)                                       # MLP_t (s.9)
        self.s_in = MLPEmbedder(256, d) if cfg.dual_time else None               # MLP_s (s.9), on t - s
        self.guidance_in = MLPEmbedder(256, d) if cfg.guidance_embed else None  # FLUX.1-dev only
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d)
        self.txt_in = nn.Linear(cfg.context_in_dim, d)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(d, cfg.in_channels)

    def flops(self, n_img, n_txt):
        """Forward FLOPs of one sample (a multiply-add counts 2; backward costs twice the forward): each
        Linear times the rows it sees (image tokens, text tokens, both in single-stream blocks, or one
        conditioning vector), plus attention's two (L x L) products per block. Norms, RoPE and activations are
        not counted (as in MFU)."""
        L = n_img + n_txt
        total = 0
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            embedder = name.split(".")[0] in ("time_in", "s_in", "guidance_in", "vector_in")
            if "_mod." in name or "modulation" in name or embedder:
                rows = 1
            elif ".img_" in name or name in ("img_in", "final_layer.linear"):
                rows = n_img
            elif ".txt_" in name or name == "txt_in":
                rows = n_txt
            else:
                assert name.startswith("single_blocks."), name
                rows = L
            total += 2 * rows * m.in_features * m.out_features
        return total + 4 * L * L * self.cfg.hidden_size * (len(self.double_blocks) + len(self.single_blocks))

    @torch.no_grad()
    def init_weights(self):
        """DiT-style: xavier linears with zero bias, N(0, 0.02) embedders, and zero modulation and output
        (adaLN-Zero), so every block starts as the identity and V starts at 0. A 18: MLP_s as MLP_t."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.scale)
        for emb in (self.time_in, self.s_in, self.guidance_in, self.vector_in):
            if emb is not None:
                nn.init.normal_(emb.in_layer.weight, std=0.02)
                nn.init.normal_(emb.out_layer.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight)
                nn.init.zeros_(m.lin.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, img, img_ids, txt, txt_ids, t, s=None, y=None, guidance=None):
        """img (B, L, in_channels) noisy tokens; img_ids (B or 1, L, 3); txt (B, Lt, d_txt); txt_ids
        (as img_ids, Lt, 3); t, s (B,) times; y (B, d_vec) pooled CLIP. Returns V (B, L, in_channels), in the
        weights' dtype. Position ids shared by the batch may come with batch 1 (both): the rotations are then
        computed once and broadcast.

        The network computes in its weights' dtype
        (bf16 under FSDP's mixed precision, or for a bf16 checkpoint). Only activations are cast to it: t,
        s and the positions stay fp32 up to the sinusoids and the RoPE rotations
        (bf16 would put t = 0.33944 at 0.33984, and shift the phase of 1000 t by radians)."""
        dtype = self.img_in.weight.dtype
        embed = lambda mlp, x: mlp(timestep_embedding(x).to(dtype))         # fp32 sinusoid, MLP's dtype
        vec = embed(self.time_in, t)                                        # e_t (s.9)
        if self.s_in is not None:
            vec = vec + embed(self.s_in, t - s)                             # + e_s, of t - s (s.9-s.10)
        if self.guidance_in is not None:
            vec = vec + embed(self.guidance_in, guidance)
        vec = vec + self.vector_in(y.to(dtype))
        # clone: a 3-D Linear returns a view, and torch.compile would give the first block
        # (view inputs) its own graph
        img, txt = self.img_in(img.to(dtype)).clone(), self.txt_in(txt.to(dtype)).clone()
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))         # (B or 1, 1, L, D/2, 2, 2) fp32
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# ------------------------------------------------------------------------------------------------------------
# The public FLUX.1 transformers load into the same class (read by encoders.py's strict safetensors reader)

def load_flux_transformer(path, cfg=None, dtype=torch.bfloat16, device="cpu"):
    """FLUX.1 transformer (BFL layout: flux1-schnell.safetensors / flux1-dev.safetensors) into our MMDiT,
    whose parameter names are BFL's. Without cfg the preset is told by the keys: guidance_in.* means flux-dev.
    Returned in eval mode with gradients on (the caller freezes it or fine-tunes it)."""
    entries = encoders.read_header(path)
    if cfg is None:
        cfg = CONFIGS["flux-dev" if any(k.startswith("guidance_in.") for k in entries) else "flux-schnell"]
    with torch.device("meta"):
        model = MMDiT(cfg)
    return encoders.materialize(model, entries, path, dtype, device)
