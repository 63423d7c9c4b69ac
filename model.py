"""Every network of Self-E, hand-written: the dual-time MMDiT denoiser and the frozen text encoders.

The denoiser is FLUX's MM-DiT (double-stream blocks, then single-stream blocks, multi-axis RoPE, QK-RMSNorm, adaLN
modulation) with the dual-time embedding of Self-E (METHOD.md section 8, Eqs. s.9-s.10): the conditioning vector is
    vec = MLP_t(sinusoid(t)) + MLP_s(sinusoid(t - s)) + MLP(CLIP pooled),
with MLP_s (`s_in`) in the slot where FLUX adds its guidance embedding. Module and parameter names are FLUX's, so a
BFL checkpoint loads by name. The network outputs V; the sample head G = x_t - t V (Eq. 6) lives in selfe.py.

The text encoders (T5 v1.1 encoder, CLIP text transformer) use the Hugging Face parameter names, so the public
safetensors load by name too. The tiny preset builds small random ones of the same classes as frozen stand-ins.
"""
import math
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
    patch: int = 2
    # text
    t5: T5Config = field(default_factory=T5Config)
    clip: CLIPConfig = field(default_factory=CLIPConfig)
    t5_max_len: int = 512          # [ASSUMPTION] METHOD.md 8(c): minFM 256, FLUX-dev 512
    tokenizer: str = "pretrained"  # "pretrained" (sentencepiece + CLIP BPE) or "bytes" (tiny stand-ins)
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

    @property
    def latent_size(self):
        return self.resolution if self.latent == "pixels" else self.resolution // 8

    def to_dict(self):
        return asdict(self)

    @staticmethod
    def from_dict(d):
        d = dict(d)
        d["t5"], d["clip"] = T5Config(**d["t5"]), CLIPConfig(**d["clip"])
        d["axes_dim"] = tuple(d["axes_dim"])
        return Config(**d)


CONFIGS = {
    # CPU demo: pixel space 32 px, patch 4 (64 image tokens), small random frozen T5 and CLIP over bytes.
    "tiny": Config(hidden_size=128, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14),
                   in_channels=3 * 4 * 4, context_in_dim=64, vec_in_dim=64, resolution=32, latent="pixels", patch=4,
                   t5=T5Config(vocab_size=259, d_model=64, d_kv=16, num_heads=4, d_ff=128, num_layers=2),
                   clip=CLIPConfig(vocab_size=259, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, max_position_embeddings=72, eos_token_id=1),
                   t5_max_len=72, tokenizer="bytes", batch=32, steps=2000, lr=1e-3, ema_decay=0.995, world="small"),
    # The paper's ablation model (Table 2): d 1024, 16 x 64 heads, 8 + 16 blocks, 256^2.
    "0.5b": Config(hidden_size=1024, num_heads=16, axes_dim=(8, 28, 28), resolution=256),
    # The paper's main model (S.2): d 2048, 16 x 128 heads, 8 + 16 blocks; phase 1 at 256^2.
    "2b": Config(hidden_size=2048, num_heads=16, axes_dim=(16, 56, 56), resolution=256),
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
        t, s (B,) times; y (B, d_vec) pooled CLIP. Returns V (B, L, in_channels). Position ids shared by the batch
        may come with batch 1 (both): the rotations are then computed once and broadcast."""
        vec = self.time_in(timestep_embedding(t))                       # e_t (s.9)
        if self.s_in is not None:
            vec = vec + self.s_in(timestep_embedding(t - s))            # + e_s: the gap t - s, not s (s.9-s.10)
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1]:], vec)

    def flops_per_token(self, n_img, n_txt):
        """Forward FLOPs per sample (matmuls of the token streams and attention), for throughput and MFU."""
        d, c = self.cfg.hidden_size, self.cfg
        mlp = int(d * c.mlp_ratio)
        L = n_img + n_txt
        double = 2 * L * (3 * d * d + d * d + 2 * d * mlp) + 4 * L * L * d
        single = 2 * L * (d * (3 * d + mlp) + (d + mlp) * d) + 4 * L * L * d
        io = 2 * n_img * c.in_channels * d * 2 + 2 * n_txt * c.context_in_dim * d
        return c.depth * double + c.depth_single_blocks * single + io


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
