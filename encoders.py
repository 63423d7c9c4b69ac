"""The frozen parts of Self-E, hand-written: the T5 v1.1 encoder, the CLIP text encoder, the
FLUX.1 autoencoder, their tokenizers, the strict readers of their public safetensors, and finding
a FLUX.1 snapshot folder; last, `TextEncoders`, the one interface through which the rest of selfe
encodes text.

Self-E trains only the denoiser (model.py). These parts turn prompts into T5 token states and a pooled CLIP
vector, and images into latents and back (docs/method.md §8.1). Parameter names are Hugging Face's
(T5, CLIP) and BFL's (autoencoder), so the public checkpoints load by name (docs/formats.md §4). The tiny
preset builds small random T5 and CLIP encoders of the same classes as frozen stand-ins, reading words
through `WordTokenizer`.
"""
import functools
import json
import math
import os
import re
import sys
import unicodedata
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open


# ------------------------------------------------------------------------------------------------------------
# Configs (the defaults are the real parts' sizes)

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
class AutoEncoderConfig:
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159


# ------------------------------------------------------------------------------------------------------------
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
    """Bidirectional buckets: half per direction, exact below num_buckets/4,
    logarithmic up to max_distance."""
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
        q, k, v = (f(x).view(B, L, self.c.num_heads, self.c.d_kv).transpose(1, 2)
                   for f in (self.q, self.k, self.v))
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
    """T5 v1.1 encoder: ids (B, L) -> hidden states (B, L, d_model). Like FLUX, no
    attention mask by default: pads attend."""

    def __init__(self, c: T5Config):
        super().__init__()
        self.c = c
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = T5Stack(c)

    def forward(self, ids, mask=None):
        """`mask` (B, L) bool, if given: no position attends to one where it is False (the padding), so the
        states of the others are those of the sequence without it (selfe.SelfE's t5_mask)."""
        x = self.shared(ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(ids.shape[1], ids.device)
        if mask is not None:                                                   # (B, 1, 1, L) on the keys
            bias = bias + torch.zeros(mask.shape, device=ids.device).masked_fill(~mask, -1e9)[:, None, None]
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


# ------------------------------------------------------------------------------------------------------------
# CLIP text transformer (Hugging Face CLIPTextModel parameter names)

class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        d = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        B, L, d = x.shape
        q, k, v = (f(x).view(B, L, self.heads, -1).transpose(1, 2)
                   for f in (self.q_proj, self.k_proj, self.v_proj))
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
    """CLIP text transformer: ids (B, L) -> (hidden states (B, L, d), pooled (B, d) at
    the first end token)."""

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
    """Seeded random init of a stand-in text encoder (tiny preset): N(0, 1) embeddings, N(0, 1/fan_in)
    linears, unit norms, so activations neither vanish nor explode through the random layers."""
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


# ------------------------------------------------------------------------------------------------------------
# FLUX.1 autoencoder (BFL's flux/modules/autoencoder.py parameter names, so ae.safetensors loads by name)

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
        # q, k, v: (B, 1, HW, C), one head over all positions
        q, k, v = (f(h).flatten(2).transpose(1, 2)[:, None] for f in (self.q, self.k, self.v))
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
            block_out = c.ch * c.ch_mult[i]
            level.block = nn.ModuleList(ResnetBlock(block_in if j == 0 else block_out, block_out)
                                        for j in range(c.num_res_blocks + 1))
            block_in = block_out
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
        """z = scale (z_raw - shift), z_raw the Gaussian's mean
        (sample=True draws from it, as some trainers do)."""
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return self.c.scale_factor * (z - self.c.shift_factor)

    def decode(self, z):
        return self.decoder(z / self.c.scale_factor + self.c.shift_factor)


# ------------------------------------------------------------------------------------------------------------
# Tokenizers: text -> ids (B, max_len) in the framing each encoder was trained with

def frame(prompts, encode, max_len, start, end, pad, unit):
    """Each prompt's ids as start + encode(prompt) + end, padded with `pad` to max_len: (B, max_len). A prompt
    too long for its encoder is truncated, with a warning naming `unit` (what its ids count)."""
    ids = torch.full((len(prompts), max_len), pad)
    room = max_len - len(start) - len(end)
    for i, p in enumerate(prompts):
        body = encode(p)
        if len(body) > room:
            print(f"warning: prompt of {len(body)} {unit} truncated to {room}: "
                  f"{p[:60]!r}...", file=sys.stderr)
            body = body[:room]
        seq = start + body + end
        ids[i, :len(seq)] = torch.tensor(seq)
    return ids


# The real tokenizers (FLUX's framing): T5 through sentencepiece, CLIP's byte-level BPE by hand

class T5Tokenizer:
    """sentencepiece ids of `spiece.model`, then the end token 1, padded with 0 to max_len
    (256 schnell, 512 dev). As transformers' T5Tokenizer (the reference FLUX pipelines use), the special
    tokens '</s>', '<pad>', '<unk>' and the sentinels '<extra_id_0>' ... '<extra_id_{extra_ids - 1}>' typed in
    a prompt are those tokens, not text: the prompt is split at them and each piece goes through sentencepiece
    alone. T5's vocabulary has 100 sentinels, numbered down from the last id
    (<extra_id_0> is the sentencepiece size + 99)."""
    pad_id, eos_id = 0, 1

    def __init__(self, spiece_path, max_len, extra_ids=100):
        import sentencepiece  # a runtime dependency, needed only with the real encoders
        if not os.path.isfile(spiece_path):
            raise FileNotFoundError(f"{spiece_path}: T5 sentencepiece model not found")
        self.sp = sentencepiece.SentencePieceProcessor(model_file=spiece_path)
        self.max_len = max_len
        n = self.sp.get_piece_size()
        self.special = {"</s>": self.eos_id, "<pad>": self.pad_id, "<unk>": self.sp.unk_id(),
                        **{f"<extra_id_{k}>": n + extra_ids - 1 - k for k in range(extra_ids)}}
        longest_first = sorted(self.special, key=len, reverse=True)
        self.split = re.compile("(" + "|".join(re.escape(t) for t in longest_first) + ")")

    def encode(self, text):
        """text -> ids without the end token."""
        ids = []
        for piece in self.split.split(text):  # text, special, text, ...
            ids += [self.special[piece]] if piece in self.special else self.sp.encode(piece)
        return ids

    def __call__(self, prompts):
        return frame(prompts, self.encode, self.max_len, [], [self.eos_id], self.pad_id, "T5 tokens")


def bytes_to_unicode():
    """GPT-2/CLIP's reversible map from the 256 bytes to printable characters: printable Latin-1 bytes map to
    themselves, the others to 256, 257, ... in order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + n) for n, b in enumerate(extra)}


def _category_class(major):
    """A `re` character class body of every code point whose Unicode general category starts with
    `major` ('L' is regex's \\p{L}, 'N' is \\p{N}); Python's `re` has no such classes. Exact at
    Python's Unicode version."""
    ranges, start = [], None
    for cp in range(sys.maxunicode + 2):
        hit = cp <= sys.maxunicode and unicodedata.category(chr(cp))[0] == major
        if hit and start is None:
            start = cp
        elif not hit and start is not None:
            ranges.append(re.escape(chr(start)) + ("-" + re.escape(chr(cp - 1)) if cp - 1 > start else ""))
            start = None
    return "".join(ranges)


# Unicode White_Space
CLIP_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@functools.cache
def clip_pattern():
    """CLIP's pre-split: contractions, runs of letters, single digits, runs of other non-space characters
    (OpenAI's `'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`), built once. The special
    tokens are split off before (CLIPTokenizer.encode)."""
    L, N, S = _category_class("L"), _category_class("N"), CLIP_WHITESPACE
    return re.compile(rf"'s|'t|'re|'ve|'m|'ll|'d|[{L}]+|[{N}]|[^{S}{L}{N}]+")


class CLIPTokenizer:
    """CLIP's byte-level BPE from `vocab.json` + `merges.txt` (HF layout), framed as FLUX does: start 49406,
    at most 75 tokens, end 49407, padded with 49407 to 77. Text is NFC-normalised, whitespace-collapsed and
    lower-cased, as OpenAI's tokenizer with ftfy reduced to NFC, and as transformers' CLIPTokenizer, the
    reference FLUX pipelines use. Where the two differ we follow transformers: HTML entities are not
    unescaped; '<|startoftext|>' and '<|endoftext|>' typed in a prompt are those tokens only as written
    (matched before lower-casing, so '<|ENDOFTEXT|>' is text); a capital sigma becomes σ, never the
    word-final ς of Python's str.lower()."""

    def __init__(self, vocab_path, merges_path, max_len=77):
        for p in (vocab_path, merges_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: CLIP tokenizer file not found")
        with open(vocab_path, encoding="utf-8") as f:
            self.vocab = json.load(f)
        with open(merges_path, encoding="utf-8") as f:
            merges = [tuple(line.split()) for line in f.read().split("\n")
                      if line.strip() and not line.startswith("#version")]
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bos_id, self.eos_id = self.vocab["<|startoftext|>"], self.vocab["<|endoftext|>"]
        self.byte_char = bytes_to_unicode()
        self.max_len = max_len
        self.cache = {}

    def bpe(self, word):
        """One pre-split word (already byte-mapped) -> its BPE symbols; the last symbol carries '</w>'."""
        if word in self.cache:
            return self.cache[word]
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = {(a, b) for a, b in zip(symbols, symbols[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence, left to right
                if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        self.cache[word] = symbols
        return symbols

    def encode(self, text):
        """text -> BPE ids without the start and end tokens."""
        ids = []
        # special tokens first, case and all
        for piece in re.split(r"(<\|startoftext\|>|<\|endoftext\|>)", text):
            if piece in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.vocab[piece])
                continue
            piece = re.sub(f"[{CLIP_WHITESPACE}]+", " ", unicodedata.normalize("NFC", piece))
            # lower-cased one character at a time, as transformers does (str.lower() makes a final Σ ς)
            piece = piece.replace("Σ", "σ").lower()
            for word in clip_pattern().findall(piece):
                mapped = "".join(self.byte_char[b] for b in word.encode("utf-8"))
                ids += [self.vocab[s] for s in self.bpe(mapped)]
        return ids

    def __call__(self, prompts):
        return frame(prompts, self.encode, self.max_len, [self.bos_id], [self.eos_id],
                     self.eos_id, "CLIP tokens")


# ------------------------------------------------------------------------------------------------------------
# The tiny preset's stand-in tokenizer: words, in the real tokenizers' framings

class WordTokenizer:
    """Words as tokens (the tiny preset reads the shapes world's, `data.WORDS`), in the framings the real
    encoders use: 'pad-end' (T5: words, end, pad...) and 'start-end'
    (CLIP: start, words, end, end...; pooled at the first end). ids: 0 pad, 1 end, 2 start, then one per word
    of `vocabulary`, then `unknown` buckets. Text is lower-cased and split into runs of letters or digits and
    single punctuation marks; a word outside the vocabulary goes to a bucket chosen by a stable hash of it
    (crc32), so any prompt encodes, and different unknown words mostly stay different inputs
    (training never shows them)."""
    pad_id, eos_id, bos_id = 0, 1, 2
    unknown = 32

    def __init__(self, vocabulary, max_len, framing="pad-end"):
        if framing not in ("pad-end", "start-end"):
            raise ValueError(f"framing {framing!r}: use 'pad-end' or 'start-end'")
        self.vocabulary, self.max_len, self.framing = tuple(vocabulary), max_len, framing
        self.ids = {w: 3 + i for i, w in enumerate(self.vocabulary)}
        self.vocab_size = 3 + len(self.vocabulary) + self.unknown

    @staticmethod
    def words(text):
        return re.findall(r"[^\W_]+|[^\w\s]|_", unicodedata.normalize("NFKC", text).lower())

    def encode(self, text):
        """text -> ids without the framing tokens."""
        first_unknown = 3 + len(self.vocabulary)
        return [self.ids.get(w, first_unknown + zlib.crc32(w.encode("utf-8")) % self.unknown)
                for w in self.words(text)]

    def decode(self, ids):
        """ids (with or without framing) -> text; unknown words come back as <unk:k>."""
        words = {i: w for w, i in self.ids.items()}
        out = [words.get(i, f"<unk:{i - 3 - len(self.vocabulary)}>") for i in ids if i > self.bos_id]
        return " ".join(out).replace(" ,", ",")

    def __call__(self, prompts):
        if self.framing == "pad-end":
            return frame(prompts, self.encode, self.max_len, [], [self.eos_id], self.pad_id, "words")
        return frame(prompts, self.encode, self.max_len, [self.bos_id], [self.eos_id], self.eos_id, "words")


# ------------------------------------------------------------------------------------------------------------
# Reading safetensors, strictly, with the safetensors library. read_header takes a file's header alone (the
# library checks the format on opening: the JSON, the offsets, every tensor's bytes inside the file); every
# key, shape and dtype of every file is checked against the module before any weight is read; then the tensors
# are read one at a time, each copied into its parameter, so a 9.5 GB T5 costs 9.5 GB of memory plus its
# largest tensor, not twice that.

class CheckpointError(ValueError):
    pass


FILE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


@dataclass
class Entry:
    """One tensor, from its file's header: file, dtype name, shape (as loaded), its name in the file."""
    path: str
    dtype: str
    shape: tuple
    key: str

    @property
    def nbytes(self):  # as the library checked on opening; F32, F8_E4M3, ...: the bits; BOOL: a byte
        bits = re.match(r"\D+(\d+)", self.dtype)
        return math.prod(self.shape) * (int(bits[1]) if bits else 8) // 8


def _open(path):
    """safe_open(path), its errors made one line that names the file and says what is wrong."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    try:
        return safe_open(path, framework="pt")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open ({e})") from e
    except SafetensorError as e:  # "Error while deserializing header: header too large", ...
        said = str(e).removeprefix("Error while deserializing header: ")
        what = ("truncated, or with bytes past its last tensor" if "incomplete metadata" in said else
                "truncated in its header, or not a safetensors file" if "invalid header length" in said else
                "not a safetensors file")
        why = "bad JSON header" if said.startswith(("invalid JSON", "invalid UTF-8")) else "safetensors"
        raise CheckpointError(f"{path}: {what} ({why}: {said})") from e


def read_header(path):
    """{key: Entry} of one .safetensors file, from its header alone. A missing, truncated or
    foreign file -> error."""
    with _open(path) as f:
        slices = {k: f.get_slice(k) for k in f.keys()}
        return {k: Entry(path, s.get_dtype(), tuple(s.get_shape()), k) for k, s in slices.items()}


def check_entries(module, entries, where):
    """One error naming `where` and the first offending keys: missing, unexpected, wrong
    shape, not a float dtype."""
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
            f"{where}: cannot load: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}, wrong "
            f"shapes {wrong[:5]}, unsupported dtypes or sizes {dtypes[:5]} ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} wrong shapes, {len(dtypes)} bad dtypes in all; "
            f"floats F32/F16/BF16 expected)")


def load_strict(module, sd, where):
    """load_state_dict from an in-memory dict that names `where` and the first offending keys, checking every
    key, shape and dtype before copying anything (the in-memory twin of check_entries)."""
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own
             if k in sd and sd[k].shape != own[k].shape]
    dtypes = [f"{k}: {sd[k].dtype}" for k in own if k in sd
              and own[k].is_floating_point() != sd[k].is_floating_point()]
    if missing or unexpected or wrong or dtypes:
        raise CheckpointError(f"{where}: cannot load: missing keys {missing[:5]}, unexpected keys "
                              f"{unexpected[:5]}, wrong shapes {wrong[:5]}, wrong dtypes {dtypes[:5]} "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong "
                              f"shapes, {len(dtypes)} wrong dtypes)")
    module.load_state_dict(sd)


def _read_into(f, entry, out):
    """One tensor from the open file `f` into `out`, converting its dtype and moving it to out's device."""
    out.copy_(f.get_tensor(entry.key).view(entry.shape))


def materialize(module, entries, where, dtype, device):
    """Check `entries` against `module` (built on the meta device), then allocate it on `device` in
    `dtype` and copy every tensor into place, one at a time, file by file. Nothing is read before the check
    passes; no second copy of the weights is held."""
    check_entries(module, entries, where)
    module = module.to(dtype).to_empty(device=device)
    own = module.state_dict()
    by_file = {}
    for k, e in entries.items():
        by_file.setdefault(e.path, []).append((k, e))
    with torch.no_grad():
        for path, items in by_file.items():
            with _open(path) as f:
                for k, e in items:
                    _read_into(f, e, own[k])
    return module.eval()


def read_json(path):
    """A JSON object file -> dict; one that is empty, not UTF-8, not JSON or not an object
    is an error naming it."""
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


# ------------------------------------------------------------------------------------------------------------
# Loaders, one per part. Each takes a file or the part's folder of a FLUX snapshot, a dtype and a device.

def t5_config_from_hf(d):
    """Hugging Face T5Config fields -> our T5Config. Only v1.1's gated-GELU feed-forward is implemented."""
    if d.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
        raise CheckpointError(f"T5 config feed_forward_proj={d['feed_forward_proj']!r}: only T5 "
                              "v1.1's 'gated-gelu'")
    return T5Config(**{k: d[k] for k in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
                                         "relative_attention_num_buckets", "relative_attention_max_distance",
                                         "layer_norm_epsilon") if k in d})


def t5_entries(path):
    """{key: Entry} of a T5 checkpoint: one .safetensors file, or a folder with model.safetensors or the
    sharded model.safetensors.index.json (HF's layout: {"weight_map": {key: shard file}})."""
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
    """T5 v1.1 encoder from HF safetensors (e.g. FLUX's text_encoder_2/: 2 bf16 shards + index), config from
    the folder's config.json when present. `encoder.embed_tokens.weight` is tied to `shared.weight`: used only
    if `shared.weight` is absent."""
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
    """Hugging Face CLIPTextConfig fields -> our CLIPConfig. The public config says
    eos_token_id 2 (legacy): transformers then pools at argmax(ids), i.e. the first
    49407 = vocab_size - 1, our first-end-token rule."""
    if d.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"CLIP config hidden_act={d['hidden_act']!r}: only 'quick_gelu' is implemented")
    c = CLIPConfig(**{k: d[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                        "num_attention_heads", "intermediate_size", "max_position_embeddings",
                                        "layer_norm_eps") if k in d})
    c.eos_token_id = d["eos_token_id"] if d.get("eos_token_id", 2) != 2 else c.vocab_size - 1
    return c


def load_clip(path, dtype=torch.bfloat16, device="cpu", config=None):
    """CLIP text model from HF safetensors (FLUX's text_encoder/), keys with or without the
    `text_model.` prefix (transformers 4.x writes it, 5.x does not); the `position_ids` buffer some
    files carry is ignored."""
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    hf = read_config(os.path.dirname(file))
    config = config or (clip_config_from_hf(hf) if hf else CLIPConfig())
    entries = {(k if k.startswith("text_model.") else "text_model." + k): e
               for k, e in read_header(file).items() if not k.endswith("embeddings.position_ids")}
    with torch.device("meta"):
        model = CLIPTextEncoder(config)
    return materialize(model, entries, file, dtype, device).requires_grad_(False)


def ae_key_from_diffusers(key, n_levels):
    """One diffusers AutoencoderKL key -> its BFL name (docs/formats.md §4.2). diffusers numbers
    up_blocks the other way round."""
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",  # diffusers
            "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}  # and its deprecated names
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\."
                     r"(resnets|downsamplers|upsamplers)\.(\d+)\.(.+)", key)
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
        raise CheckpointError(f"autoencoder config norm_num_groups={d['norm_num_groups']}: only "
                              "32 is implemented")
    shift = d.get("shift_factor", 0.1159) or 0.0  # diffusers writes null for none
    return AutoEncoderConfig(in_channels=d.get("in_channels", 3), out_ch=d.get("out_channels", 3), ch=ch,
                             ch_mult=tuple(c // ch for c in d["block_out_channels"]),
                             num_res_blocks=d.get("layers_per_block", 2),
                             z_channels=d.get("latent_channels", 16),
                             scale_factor=d.get("scaling_factor", 0.3611), shift_factor=shift)


def load_autoencoder(path, dtype=torch.float32, device="cpu", config=None):
    """FLUX.1 autoencoder from `ae.safetensors` (BFL layout) or from diffusers' `vae/` folder or
    its `diffusion_pytorch_model.safetensors`
    (layout told by the keys; config from vae/config.json when present)."""
    file = os.path.join(path, "diffusion_pytorch_model.safetensors") if os.path.isdir(path) else path
    entries = read_header(file)
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in entries):
        hf = read_config(os.path.dirname(file))
        config = config or (ae_config_from_diffusers(hf) if hf else AutoEncoderConfig())
        renamed = {}
        for k, e in entries.items():
            k = ae_key_from_diffusers(k, len(config.ch_mult))
            if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", k) and len(e.shape) == 2:
                # Linear -> 1x1 conv, same bytes
                e = Entry(e.path, e.dtype, e.shape + (1, 1), e.key)
            renamed[k] = e
        entries = renamed
    with torch.device("meta"):
        model = AutoEncoder(config or AutoEncoderConfig())
    return materialize(model, entries, file, dtype, device).requires_grad_(False)


# A FLUX.1 snapshot folder (huggingface-cli download black-forest-labs/FLUX.1-schnell --local-dir DIR)

def find_pretrained(folder, transformer=False):
    """DIR -> paths of its parts: {'t5', 'clip', 'ae', 't5_tokenizer', 'clip_vocab', 'clip_merges'}
    (+ 'transformer' when asked). One clear error listing every expected file that is missing, if
    DIR is not such a snapshot."""
    j = lambda *p: os.path.join(folder, *p)
    first = lambda *cands: next((c for c in cands if os.path.isfile(c)), None)
    parts = {
        "t5": (first(j("text_encoder_2", "model.safetensors.index.json"),
                     j("text_encoder_2", "model.safetensors")),
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
        raise FileNotFoundError(f"{os.path.abspath(folder)} is not a FLUX.1 snapshot folder: missing "
                                f"{missing}. Get one with `huggingface-cli download "
                                "black-forest-labs/FLUX.1-schnell --local-dir DIR`.")
    parts = {k: got for k, (got, _) in parts.items()}
    # T5 and CLIP as folders: their config.json sits beside the weights
    parts["t5"], parts["clip"] = os.path.dirname(parts["t5"]), os.path.dirname(parts["clip"])
    return parts


# ------------------------------------------------------------------------------------------------------------
# The text conditioner: the one seam between prompts and the denoiser

class TextEncoders(nn.Module):
    """Prompts -> the denoiser's text conditioning, as FLUX has it: (txt (B, Lt, d_txt) T5 token states,
    vec (B, d_vec) pooled CLIP). The rest of selfe meets the text encoders only here: selfe.SelfE encodes
    through it, the cache builder stores what it returns and `lengths`, a tiny checkpoint carries its
    state_dict (frozen.safetensors: t5.*, clip.*), and the memory plan counts its parameters and the peak of
    `encode(*example_ids(b))` on the meta device. Another text encoder is another class with these members
    (and the widths it returns in the preset's context_in_dim / vec_in_dim); model.Config's t5 and clip
    fields size this one.

    `mask` (train.py --t5-mask, A 26): T5 does not attend to a caption's padding and its states there are
    zero, so each caption's encoding is that of its own tokens (a cache stores them without the padding).
    Without it padding attends, as in FLUX."""

    def __init__(self, t5, clip, max_len, t5_tokenizer=None, clip_tokenizer=None, mask=False):
        super().__init__()
        self.t5, self.clip = t5, clip
        self.max_len = max_len                                        # (T5 positions, CLIP positions)
        self.t5_tokenizer, self.clip_tokenizer, self.mask = t5_tokenizer, clip_tokenizer, mask

    @staticmethod
    def positions(cfg):
        """(T5 positions, CLIP positions) of the preset: the tokenizers' lengths."""
        return cfg.t5_max_len, cfg.clip.max_position_embeddings

    @classmethod
    def shaped(cls, cfg, dtype=torch.float32):
        """Modules of the preset's sizes (cfg.t5, cfg.clip), uninitialised and without tokenizers, on the
        current device: what checkpoint checks and the memory plan build on the meta device."""
        return cls(T5Encoder(cfg.t5).to(dtype), CLIPTextEncoder(cfg.clip).to(dtype), cls.positions(cfg))

    @classmethod
    def stand_ins(cls, cfg, vocabulary, seed, device="cpu", mask=False):
        """The tiny preset's frozen stand-ins: the real classes at cfg's small sizes, random (T5 seeded by
        `seed`, CLIP by seed + 1, init_text_encoder), reading the words of `vocabulary` (WordTokenizer)."""
        t5 = init_text_encoder(T5Encoder(cfg.t5), seed)
        clip = init_text_encoder(CLIPTextEncoder(cfg.clip), seed + 1)
        Lt, Lc = cls.positions(cfg)
        text = cls(t5, clip, (Lt, Lc), WordTokenizer(vocabulary, Lt, "pad-end"),
                   WordTokenizer(vocabulary, Lc, "start-end"), mask)
        return text.to(device).requires_grad_(False)

    @classmethod
    def pretrained(cls, paths, cfg, dtype, device, mask=False):
        """T5 v1.1 XXL and CLIP ViT-L/14's text model from `paths` (find_pretrained's keys: 't5' and 'clip'
        folders, 't5_tokenizer', 'clip_vocab', 'clip_merges' files), in `dtype` on `device`."""
        Lt, Lc = cls.positions(cfg)
        return cls(load_t5(paths["t5"], dtype, device), load_clip(paths["clip"], dtype, device), (Lt, Lc),
                   T5Tokenizer(paths["t5_tokenizer"], Lt),
                   CLIPTokenizer(paths["clip_vocab"], paths["clip_merges"], Lc), mask)

    def forward(self, prompts):
        """prompts -> (txt, vec) in the encoders' dtype."""
        return self.encode(*self.tokenize(prompts))

    def tokenize(self, prompts):
        """prompts -> (T5 ids (B, Lt), CLIP ids (B, Lc)) on the encoders' device."""
        device = self.t5.shared.weight.device
        return self.t5_tokenizer(prompts).to(device), self.clip_tokenizer(prompts).to(device)

    @torch.no_grad()
    def encode(self, ids, clip_ids):
        if self.mask:
            keep = torch.arange(ids.shape[1], device=ids.device) < self.filled(ids)[:, None]  # (B, Lt)
            txt = self.t5(ids, keep) * keep[..., None]
        else:
            txt = self.t5(ids)
        _, vec = self.clip(clip_ids)
        return txt, vec

    def lengths(self, prompts):
        """prompts -> (B,) how many of txt's positions the encoding fills (see `filled`)."""
        return self.filled(self.t5_tokenizer(prompts))

    def filled(self, ids):
        """T5 ids (B, Lt) -> (B,): with `mask`, each caption's tokens and its end token (up to the last one
        that is not padding); without it all Lt, since padding attends."""
        if not self.mask:
            return torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
        filled = (ids != self.t5_tokenizer.pad_id).long().cumsum(1)         # (B, Lt), flat after the last
        return filled.argmax(1) + 1

    def example_ids(self, batch):
        """Token ids of a micro-batch's shapes (zeros), on the current device: the memory plan's input."""
        return tuple(torch.zeros(batch, n, dtype=torch.long) for n in self.max_len)
