"""Every network of Self-E, hand-written: the dual-time MMDiT denoiser and the frozen text encoders.

The denoiser is FLUX's MM-DiT (double-stream blocks, then single-stream blocks, multi-axis RoPE, QK-RMSNorm, adaLN
modulation) with the dual-time embedding of Self-E (METHOD.md section 8, Eqs. s.9-s.10): the conditioning vector is
    vec = MLP_t(sinusoid(t)) + MLP_s(sinusoid(t - s)) + MLP(CLIP pooled),
with MLP_s (`s_in`) in the slot where FLUX adds its guidance embedding. Module and parameter names are FLUX's, so a
BFL checkpoint loads by name. The network outputs V; the sample head G = x_t - t V (Eq. 6) lives in selfe.py.

The text encoders (T5 v1.1 encoder, CLIP text transformer) use the Hugging Face parameter names, so the public
safetensors load by name too. The tiny preset builds small random ones of the same classes as frozen stand-ins.

The second half of this file holds the real frozen parts: the FLUX.1 autoencoder, the loaders of the public
safetensors (T5, CLIP, autoencoder, FLUX transformer; strict, checked before any weight is read) and `find_pretrained`.
"""
import json
import math
import os
import re
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------------------------------
# Presets

@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


@dataclass
class CLIPConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # pooled output is read at the first end-of-text token


@dataclass
class Config:
    """One preset: the denoiser's shapes (METHOD.md section 8), the frozen parts, the image space and the training
    defaults that depend on scale. `--size` picks one from CONFIGS."""
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
    dual_time: bool = True         # Self-E's MLP_s(t - s) embedding (s.9); off for the public FLUX transformers
    guidance_embed: bool = False   # FLUX.1-dev's distilled-guidance embedding; never used by Self-E
    # image space
    resolution: int = 256
    latent: str = "flux-vae"       # "flux-vae" (16 channels, /8) or "pixels" (3 channels, /1)
    pixel_scale: float = 1.0       # "pixels": latents are the images in [-1, 1] times this (about unit variance)
    patch: int = 2
    # text
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    t5_max_len: int = 512          # [ASSUMPTION] METHOD.md 8(c): minFM 256, FLUX-dev 512
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
    def latent_channels(self):
        return 3 if self.latent == "pixels" else 16

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(d):
        d = dict(d)
        d["t5"], d["clip"] = T5Config(**d["t5"]), CLIPConfig(**d["clip"])
        d["axes_dim"] = tuple(d["axes_dim"])
        return Config(**d)


CONFIGS = {
    # CPU demo: pixel space 32 px, patch 4 (64 image tokens), small random frozen T5 and CLIP over the shapes world's
    # words (16 text tokens).
    "tiny": Config(hidden_size=96, num_heads=3, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14),
                   in_channels=3 * 4 * 4, context_in_dim=64, vec_in_dim=64, resolution=32, latent="pixels", patch=4,
                   t5=T5Config(vocab_size=70, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2),
                   clip=CLIPConfig(vocab_size=70, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=16, eos_token_id=1),
                   t5_max_len=16, tokenizer="words", batch=16, steps=10000, lr=2e-3, ema_decay=0.995, world="small"),
    # The paper's ablation model (Table 2): d 1024, 16 x 64 heads, 8 + 16 blocks, 256^2.
    "0.5b": Config(hidden_size=1024, num_heads=16, axes_dim=(8, 28, 28), resolution=256),
    # The paper's main model (S.2): d 2048, 16 x 128 heads, 8 + 16 blocks; phase 1 at 256^2.
    "2b": Config(hidden_size=2048, num_heads=16, axes_dim=(16, 56, 56), resolution=256),
    # The public FLUX.1 transformers (12B; FORMATS.md), to load flux1-{schnell,dev}.safetensors into our MMDiT.
    "flux-schnell": Config(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56),
                           dual_time=False, guidance_embed=False, resolution=1024, t5_max_len=256),
    "flux-dev": Config(hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=(16, 56, 56),
                       dual_time=False, guidance_embed=True, resolution=1024, t5_max_len=512),
}


# ----------------------------------------------------------------------------------------------------------------------
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
    """Sinusoid(1000 t), cos then sin halves, as FLUX and minFM (METHOD.md 8, [ASSUMPTION] 10)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------------------------------------------------
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
            setattr(self, f"{stream}_mlp", nn.Sequential(nn.Linear(dim, mlp_hidden), nn.GELU(approximate="tanh"),
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
        qkv, mlp = self.linear1(modulate(self.pre_norm(x), shift, scale)).split([3 * self.dim, self.mlp_hidden], -1)
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


# ----------------------------------------------------------------------------------------------------------------------
# The dual-time MMDiT

class MMDiT(nn.Module):
    """V_theta(x_t, t, s, c) of Eq. (6): FLUX's transformer with Self-E's dual-time conditioning (s.9-s.10)."""

    def __init__(self, cfg: Config):
        super().__init__()
        assert sum(cfg.axes_dim) == cfg.head_dim, f"RoPE axes {cfg.axes_dim} must sum to the head dim {cfg.head_dim}"
        self.cfg = cfg
        d = cfg.hidden_size
        self.pe_embedder = EmbedND(cfg.theta, cfg.axes_dim)
        self.img_in = nn.Linear(cfg.in_channels, d)
        self.time_in = MLPEmbedder(256, d)                                       # MLP_t (s.9)
        self.s_in = MLPEmbedder(256, d) if cfg.dual_time else None               # MLP_s (s.9), on the gap t - s
        self.guidance_in = MLPEmbedder(256, d) if cfg.guidance_embed else None  # FLUX.1-dev only
        self.vector_in = MLPEmbedder(cfg.vec_in_dim, d)
        self.txt_in = nn.Linear(cfg.context_in_dim, d)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(d, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth_single_blocks))
        self.final_layer = LastLayer(d, cfg.in_channels)

    def flops(self, n_img, n_txt):
        """Forward FLOPs of one sample (a multiply-add counts 2; backward costs twice the forward): each Linear times
        the rows it sees (image tokens, text tokens, both in single-stream blocks, or one conditioning vector), plus
        attention's two (L x L) products per block. Norms, RoPE and activations are not counted (as in MFU)."""
        L = n_img + n_txt
        total = 0
        for name, m in self.named_modules():
            if not isinstance(m, nn.Linear):
                continue
            if "_mod." in name or "modulation" in name or name.split(".")[0] in ("time_in", "s_in", "guidance_in",
                                                                                  "vector_in"):
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
        """DiT-style: xavier linears with zero bias, N(0, 0.02) embedders, and zero modulation and output (adaLN-Zero),
        so every block starts as the identity and V starts at 0. [ASSUMPTION] METHOD.md 8: MLP_s as MLP_t."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias) if m.bias is not None else None
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.scale)
        for emb in (self.time_in, self.s_in, self.guidance_in, self.vector_in):
            if emb is not None:
                nn.init.normal_(emb.in_layer.weight, std=0.02)
                nn.init.normal_(emb.out_layer.weight, std=0.02)
        for m in self.modules():
            if isinstance(m, Modulation):
                nn.init.zeros_(m.lin.weight), nn.init.zeros_(m.lin.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, img, img_ids, txt, txt_ids, t, s=None, y=None, guidance=None):
        """img (B, L, in_channels) noisy tokens; img_ids (B or 1, L, 3); txt (B, Lt, d_txt); txt_ids (as img_ids, Lt, 3);
        t, s (B,) times; y (B, d_vec) pooled CLIP. Returns V (B, L, in_channels), in the weights' dtype. Position ids
        shared by the batch may come with batch 1 (both): the rotations are then computed once and broadcast.

        The network computes in its weights' dtype (bf16 under FSDP's mixed precision, or for a bf16 checkpoint).
        Only activations are cast to it: t, s and the positions stay fp32 up to the sinusoids and the RoPE rotations
        (bf16 would put t = 0.33944 at 0.33984, and shift the phase of 1000 t by radians)."""
        dtype = self.img_in.weight.dtype
        embed = lambda mlp, x: mlp(timestep_embedding(x).to(dtype))         # fp32 sinusoid, then the MLP's dtype
        vec = embed(self.time_in, t)                                        # e_t (s.9)
        if self.s_in is not None:
            vec = vec + embed(self.s_in, t - s)                             # + e_s: the gap t - s, not s (s.9-s.10)
        if self.guidance_in is not None:
            vec = vec + embed(self.guidance_in, guidance)
        vec = vec + self.vector_in(y.to(dtype))
        # clone: a 3-D Linear returns a view, and torch.compile would give the first block (view inputs) its own graph
        img, txt = self.img_in(img.to(dtype)).clone(), self.txt_in(txt.to(dtype)).clone()
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))         # fp32 rotations (B or 1, 1, L, D/2, 2, 2)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)


# ----------------------------------------------------------------------------------------------------------------------
# T5 v1.1 encoder (Hugging Face T5EncoderModel parameter names)

class T5LayerNorm(nn.Module):
    """RMS norm without mean subtraction or bias, computed in fp32."""

    def __init__(self, dim, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(self.weight.dtype)


def t5_relative_bucket(rel, num_buckets, max_distance):
    """Bidirectional buckets: half per direction, exact below num_buckets/4, logarithmic up to max_distance."""
    num_buckets //= 2
    out = (rel > 0).long() * num_buckets
    n = rel.abs()
    max_exact = num_buckets // 2
    large = max_exact + (torch.log(n.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    return out + torch.where(n < max_exact, n, large.clamp(max=num_buckets - 1))


class T5Attention(nn.Module):
    def __init__(self, c: T5Config, has_relative_bias):
        super().__init__()
        self.c = c
        inner = c.num_heads * c.d_kv
        self.q, self.k, self.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        self.o = nn.Linear(inner, c.d_model, bias=False)
        if has_relative_bias:
            self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)

    def position_bias(self, L, device):  # (1, H, L, L), from layer 0's table, shared by all layers
        pos = torch.arange(L, device=device)
        buckets = t5_relative_bucket(pos[None, :] - pos[:, None], self.c.relative_attention_num_buckets,
                                     self.c.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x, bias):
        B, L, _ = x.shape
        q, k, v = (f(x).view(B, L, self.c.num_heads, self.c.d_kv).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2)).float() + bias  # T5 does not scale by 1/sqrt(d)
        out = torch.matmul(scores.softmax(-1).type_as(v), v)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, c, has_relative_bias):
        super().__init__()
        self.SelfAttention = T5Attention(c, has_relative_bias)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x, bias):
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        return self.wo(h.to(self.wo.weight.dtype))


class T5LayerFF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)

    def forward(self, x):
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, c, has_relative_bias):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, has_relative_bias), T5LayerFF(c)])

    def forward(self, x, bias):
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block = nn.ModuleList(T5Block(c, has_relative_bias=(i == 0)) for i in range(c.num_layers))
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5 v1.1 encoder: ids (B, L) -> hidden states (B, L, d_model). Like FLUX, no attention mask: pads attend."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.c = c
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = T5Stack(c)

    def forward(self, ids):
        x = self.shared(ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1], ids.device)
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ----------------------------------------------------------------------------------------------------------------------
# CLIP text transformer (Hugging Face CLIPTextModel parameter names)

class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        d = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = (f(x).view(B, L, self.heads, -1).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, d))


class CLIPMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn, self.mlp = CLIPAttention(c), CLIPMLP(c)
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)


class CLIPEncoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings, self.encoder = CLIPEmbeddings(c), CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer: ids (B, L) -> (hidden states (B, L, d), pooled (B, d) at the first end token)."""

    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.c = c
        self.text_model = CLIPTextTransformer(c)

    def forward(self, ids):
        tm = self.text_model
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding.weight[:ids.shape[1]]
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        eos = (ids == self.c.eos_token_id).int().argmax(dim=-1)  # first end token
        return x, x[torch.arange(len(ids), device=ids.device), eos]


@torch.no_grad()
def init_text_encoder(module, seed):
    """Seeded random init of a stand-in text encoder (tiny preset): N(0, 1) embeddings, N(0, 1/fan_in) linears,
    unit norms, so activations neither vanish nor explode through the random layers."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2:
            std = 1.0 if "embedding" in name or name == "shared.weight" else p.shape[1] ** -0.5
            p.copy_(torch.randn(p.shape, generator=g) * std)
        elif "bias" in name:
            p.zero_()
        else:
            p.fill_(1.0)
    return module


# ======================================================================================================================
# Second half: the real frozen parts and the loaders of the public safetensors (layouts: ../shared/FORMATS.md)
# ======================================================================================================================
# FLUX.1 autoencoder (BFL's flux/modules/autoencoder.py parameter names, so ae.safetensors loads by name)

@dataclass
class AutoEncoderConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.norm1, self.conv1 = group_norm(in_channels), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2, self.conv2 = group_norm(out_channels), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """One head over all H*W positions; q, k, v, out are 1x1 convs."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (f(h).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: pad right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block_1, self.attn_1, self.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), \
            ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, c: AutoEncoderConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = c.ch
        for i, mult in enumerate(c.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else c.ch * mult, c.ch * mult)
                                        for j in range(c.num_res_blocks))
            block_in = c.ch * mult
            if i < len(c.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = MidBlock(block_in)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * c.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):  # (B, 3, H, W) -> (B, 2 z, H/8, W/8)
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: AutoEncoderConfig):
        super().__init__()
        block_in = c.ch * c.ch_mult[-1]
        self.conv_in = nn.Conv2d(c.z_channels, block_in, 3, padding=1)
        self.mid = MidBlock(block_in)
        up = []
        for i in reversed(range(len(c.ch_mult))):  # built top-down, stored by level index as BFL does
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else c.ch * c.ch_mult[i], c.ch * c.ch_mult[i])
                                        for j in range(c.num_res_blocks + 1))
            block_in = c.ch * c.ch_mult[i]
            if i > 0:
                level.upsample = Upsample(block_in)
            up.insert(0, level)
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, 3, padding=1)

    def forward(self, z):  # (B, z, h, w) -> (B, 3, 8h, 8w)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):  # from the highest level index down to 0
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    """FLUX.1 autoencoder: images (B, 3, H, W) in [-1, 1] <-> normalised latents (B, 16, H/8, W/8)."""

    def __init__(self, c: AutoEncoderConfig = AutoEncoderConfig()):
        super().__init__()
        self.c = c
        self.encoder, self.decoder = Encoder(c), Decoder(c)

    def encode(self, x, sample=False):
        """z = scale (z_raw - shift), z_raw the Gaussian's mean (sample=True draws from it, as some trainers do)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return self.c.scale_factor * (z - self.c.shift_factor)

    def decode(self, z):
        return self.decoder(z / self.c.scale_factor + self.c.shift_factor)


# ----------------------------------------------------------------------------------------------------------------------
# Reading safetensors by hand: the header first (every key, shape and dtype checked before any weight is read), then
# each tensor read straight into its parameter, so a 9.5 GB T5 costs 9.5 GB of memory, not twice that.
# The format: 8 bytes little-endian header length N, N bytes of JSON {key: {dtype, shape, data_offsets}}, the data.

class CheckpointError(ValueError):
    pass


FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class Entry:
    """Where one tensor lives: file, dtype name, shape, absolute byte offset, byte length."""
    path: str
    dtype: str
    shape: tuple
    offset: int
    nbytes: int


def read_header(path):
    """{key: Entry} of one .safetensors file, from its header alone. A missing, truncated or foreign file -> error."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size < 8 or n > size - 8:
            raise CheckpointError(f"{path}: not a safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: not a safetensors file (bad JSON header: {e})") from e
    entries = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        try:
            (a, b), dtype, shape = v["data_offsets"], v["dtype"], tuple(v["shape"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a safetensors file (bad header entry {k!r}: {v!r})") from e
        entries[k] = Entry(path, dtype, shape, 8 + n + a, b - a)
        if 8 + n + b > size:
            raise CheckpointError(f"{path}: truncated: tensor {k!r} ends at byte {8 + n + b}, the file has {size}")
    return entries


def check_entries(module, entries, where):
    """One error naming `where` and the first offending keys: missing, unexpected, wrong shape, not a float dtype."""
    own = module.state_dict()
    missing = [k for k in own if k not in entries]
    unexpected = [k for k in entries if k not in own]
    wrong = [f"{k}: file {e.shape} vs model {tuple(own[k].shape)} ({os.path.basename(e.path)})"
             for k, e in entries.items() if k in own and e.shape != tuple(own[k].shape)]
    dtypes = [f"{k}: {e.dtype} ({os.path.basename(e.path)})" for k, e in entries.items()
              if k in own and (e.dtype not in FILE_DTYPES or e.nbytes != math.prod(e.shape) *
                               FILE_DTYPES[e.dtype].itemsize)]
    if missing or unexpected or wrong or dtypes:
        raise CheckpointError(
            f"{where}: cannot load: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, wrong shapes "
            f"{wrong[:5]}, unsupported dtypes or sizes {dtypes[:5]} ({len(missing)} missing, {len(unexpected)} "
            f"unexpected, {len(wrong)} wrong shapes, {len(dtypes)} bad dtypes in all; floats F32/F16/BF16 expected)")


def load_strict(module, sd, where):
    """load_state_dict from an in-memory dict that names `where` and the first offending keys, checking every key,
    shape and dtype before copying anything (the in-memory twin of check_entries)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    dtypes = [f"{k}: {sd[k].dtype}" for k in own if k in sd and own[k].is_floating_point() != sd[k].is_floating_point()]
    if missing or unexpected or wrong or dtypes:
        raise CheckpointError(f"{where}: cannot load: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, "
                              f"wrong shapes {wrong[:5]}, wrong dtypes {dtypes[:5]} ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} wrong shapes, {len(dtypes)} wrong dtypes)")
    module.load_state_dict(sd)


def _read_into(f, entry, out):
    """Read one tensor's bytes into the contiguous CPU tensor `out` (its dtype is the file's)."""
    f.seek(entry.offset)
    buf = memoryview(out.view(-1).view(torch.uint8).numpy())
    got = 0
    while got < entry.nbytes:
        n = f.readinto(buf[got:])
        if not n:
            raise CheckpointError(f"{entry.path}: truncated while reading")
        got += n


def materialize(module, entries, where, dtype, device):
    """Check `entries` against `module` (built on the meta device), then allocate it on `device` in `dtype` and read
    every tensor into place, file by file. Nothing is read before the check passes; no second copy is held."""
    check_entries(module, entries, where)
    module = module.to(dtype).to_empty(device=device)
    own = module.state_dict()
    by_file = {}
    for k, e in entries.items():
        by_file.setdefault(e.path, []).append((e.offset, k, e))
    with torch.no_grad():
        for path, items in by_file.items():
            with open(path, "rb") as f:
                for _, k, e in sorted(items):
                    dst, src_dtype = own[k], FILE_DTYPES[e.dtype]
                    if dst.device.type == "cpu" and dst.dtype == src_dtype and dst.is_contiguous():
                        _read_into(f, e, dst)  # straight into the parameter
                    else:
                        tmp = torch.empty(e.shape, dtype=src_dtype)
                        _read_into(f, e, tmp)
                        dst.copy_(tmp)  # converts dtype, moves device; one tensor at a time
    return module.eval()


def read_json(path):
    """A JSON object file -> dict; one that is empty, not UTF-8, not JSON or not an object is an error naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: damaged, not a JSON file ({e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: damaged, a JSON {type(d).__name__} where an object belongs")
    return d


def read_config(folder):
    """The folder's config.json as a dict, or None when there is none."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    return read_json(path)


# ----------------------------------------------------------------------------------------------------------------------
# Loaders, one per part. Each takes a file or the part's folder of a FLUX snapshot, a dtype and a device.

def t5_config_from_hf(d):
    """Hugging Face T5Config fields -> our T5Config. Only v1.1's gated-GELU feed-forward is implemented."""
    if d.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointError(f"T5 config feed_forward_proj={d['feed_forward_proj']!r}: only T5 v1.1's 'gated-gelu'")
    return T5Config(**{k: d[k] for k in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
                                         "relative_attention_num_buckets", "relative_attention_max_distance",
                                         "layer_norm_epsilon") if k in d})


def t5_entries(path):
    """{key: Entry} of a T5 checkpoint: one .safetensors file, or a folder with model.safetensors or the sharded
    model.safetensors.index.json (HF's layout: {"weight_map": {key: shard file}})."""
    if os.path.isfile(path):
        return read_header(path), path
    index = os.path.join(path, "model.safetensors.index.json")
    if not os.path.isfile(index):
        return read_header(os.path.join(path, "model.safetensors")), os.path.join(path, "model.safetensors")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: damaged, no 'weight_map' object")
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
    if absent:
        raise CheckpointError(f"{index}: shard files missing: {absent}")
    entries = {}
    for s in shards:
        entries.update(read_header(os.path.join(path, s)))
    lost = [k for k, s in weight_map.items() if k not in entries]
    if lost:
        raise CheckpointError(f"{index}: keys listed in the index but absent from their shards: {lost[:5]}")
    return entries, index


def load_t5(path, dtype=torch.bfloat16, device="cpu", config=None):
    """T5 v1.1 encoder from HF safetensors (e.g. FLUX's text_encoder_2/: 2 bf16 shards + index), config from the
    folder's config.json when present. `encoder.embed_tokens.weight` is tied to `shared.weight`: used only if
    `shared.weight` is absent."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    hf = read_config(folder)
    config = config or (t5_config_from_hf(hf) if hf else T5Config())
    entries, where = t5_entries(path)
    tied = entries.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in entries and tied is not None:
        entries["shared.weight"] = tied
    with torch.device("meta"):
        model = T5Encoder(config)
    return materialize(model, entries, where, dtype, device).requires_grad_(False)


def clip_config_from_hf(d):
    """Hugging Face CLIPTextConfig fields -> our CLIPConfig. The public config says eos_token_id 2 (legacy):
    transformers then pools at argmax(ids), i.e. the first 49407 = vocab_size - 1, our first-end-token rule."""
    if d.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"CLIP config hidden_act={d['hidden_act']!r}: only 'quick_gelu' is implemented")
    c = CLIPConfig(**{k: d[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "intermediate_size", "max_position_embeddings", "layer_norm_eps") if k in d})
    c.eos_token_id = d["eos_token_id"] if d.get("eos_token_id", 2) != 2 else c.vocab_size - 1
    return c


def load_clip(path, dtype=torch.bfloat16, device="cpu", config=None):
    """CLIP text model from HF safetensors (FLUX's text_encoder/), keys with or without the `text_model.` prefix
    (transformers 4.x writes it, 5.x does not); the `position_ids` buffer some files carry is ignored."""
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    hf = read_config(os.path.dirname(file))
    config = config or (clip_config_from_hf(hf) if hf else CLIPConfig())
    entries = {(k if k.startswith("text_model.") else "text_model." + k): e for k, e in read_header(file).items()
               if not k.endswith("embeddings.position_ids")}
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    return materialize(model, entries, file, dtype, device).requires_grad_(False)


def ae_key_from_diffusers(key, n_levels):
    """One diffusers AutoencoderKL key -> its BFL name (FORMATS.md). diffusers numbers up_blocks the other way round."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # new and deprecated diffusers names
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        part, kind, i, sub, j, rest = m.groups()
        i = int(i) if kind == "down" else n_levels - 1 - int(i)
        if sub == "resnets":
            return f"{part}.{kind}.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{kind}.{i}.{kind}sample.{rest}"  # downsamplers.0.conv -> downsample.conv
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)\.(weight|bias)", key)
    if m:
        part, sub, j, name, wb = m.groups()
        if sub == "resnets":
            return f"{part}.mid.block_{int(j) + 1}.{name.replace('conv_shortcut', 'nin_shortcut')}.{wb}"
        return f"{part}.mid.attn_1.{attn.get(name, name)}.{wb}"
    return key.replace("conv_norm_out", "norm_out")  # conv_in, conv_out keep their names


def ae_config_from_diffusers(d):
    ch = d["block_out_channels"][0]
    if d.get("norm_num_groups", 32) != 32:
        raise CheckpointError(f"autoencoder config norm_num_groups={d['norm_num_groups']}: only 32 is implemented")
    return AutoEncoderConfig(in_channels=d.get("in_channels", 3), out_ch=d.get("out_channels", 3), ch=ch,
                             ch_mult=tuple(c // ch for c in d["block_out_channels"]),
                             num_res_blocks=d.get("layers_per_block", 2), z_channels=d.get("latent_channels", 16),
                             scale_factor=d.get("scaling_factor", 0.3611),
                             shift_factor=d.get("shift_factor", 0.1159) or 0.0)  # diffusers writes null for none


def load_autoencoder(path, dtype=torch.float32, device="cpu", config=None):
    """FLUX.1 autoencoder from `ae.safetensors` (BFL layout) or from diffusers' `vae/` folder or its
    `diffusion_pytorch_model.safetensors` (layout told by the keys; config from vae/config.json when present)."""
    file = os.path.join(path, "diffusion_pytorch_model.safetensors") if os.path.isdir(path) else path
    entries = read_header(file)
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in entries):
        hf = read_config(os.path.dirname(file))
        config = config or (ae_config_from_diffusers(hf) if hf else AutoEncoderConfig())
        renamed = {}
        for k, e in entries.items():
            k = ae_key_from_diffusers(k, len(config.ch_mult))
            if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", k) and len(e.shape) == 2:
                e = Entry(e.path, e.dtype, e.shape + (1, 1), e.offset, e.nbytes)  # Linear -> 1x1 conv, same bytes
            renamed[k] = e
        entries = renamed
    with torch.device("meta"):
        model = AutoEncoder(config or AutoEncoderConfig())
    return materialize(model, entries, file, dtype, device).requires_grad_(False)


def load_flux_transformer(path, cfg=None, dtype=torch.bfloat16, device="cpu"):
    """FLUX.1 transformer (BFL layout: flux1-schnell.safetensors / flux1-dev.safetensors) into our MMDiT, whose
    parameter names are BFL's. Without cfg the preset is told by the keys: guidance_in.* means flux-dev.
    Returned in eval mode with gradients on (the caller freezes it or fine-tunes it)."""
    entries = read_header(path)
    if cfg is None:
        cfg = CONFIGS["flux-dev" if any(k.startswith("guidance_in.") for k in entries) else "flux-schnell"]
    with torch.device("meta"):
        model = MMDiT(cfg)
    return materialize(model, entries, path, dtype, device)


# ----------------------------------------------------------------------------------------------------------------------
# A FLUX.1 snapshot folder (huggingface-cli download black-forest-labs/FLUX.1-schnell --local-dir DIR)

def find_pretrained(folder, transformer=False):
    """DIR -> paths of its parts: {'t5', 'clip', 'ae', 't5_tokenizer', 'clip_vocab', 'clip_merges'} (+ 'transformer'
    when asked). One clear error listing every expected file that is missing, if DIR is not such a snapshot."""
    j = lambda *p: os.path.join(folder, *p)
    first = lambda *cands: next((c for c in cands if os.path.isfile(c)), None)
    parts = {
        "t5": (first(j("text_encoder_2", "model.safetensors.index.json"), j("text_encoder_2", "model.safetensors")),
               "text_encoder_2/model.safetensors.index.json (+ shards) or text_encoder_2/model.safetensors"),
        "clip": (first(j("text_encoder", "model.safetensors")), "text_encoder/model.safetensors"),
        "ae": (first(j("ae.safetensors"), j("vae", "diffusion_pytorch_model.safetensors")),
               "ae.safetensors or vae/diffusion_pytorch_model.safetensors"),
        "t5_tokenizer": (first(j("tokenizer_2", "spiece.model")), "tokenizer_2/spiece.model"),
        "clip_vocab": (first(j("tokenizer", "vocab.json")), "tokenizer/vocab.json"),
        "clip_merges": (first(j("tokenizer", "merges.txt")), "tokenizer/merges.txt"),
    }
    if transformer:
        parts["transformer"] = (first(j("flux1-schnell.safetensors"), j("flux1-dev.safetensors")),
                                "flux1-schnell.safetensors or flux1-dev.safetensors")
    missing = [want for got, want in parts.values() if got is None]
    if missing:
        raise FileNotFoundError(f"{os.path.abspath(folder)} is not a FLUX.1 snapshot folder: missing {missing}. "
                                f"Get one with `huggingface-cli download black-forest-labs/FLUX.1-schnell "
                                f"--local-dir DIR`.")
    parts = {k: got for k, (got, _) in parts.items()}
    parts["t5"], parts["clip"] = os.path.dirname(parts["t5"]), os.path.dirname(parts["clip"])  # folders: configs too
    return parts
