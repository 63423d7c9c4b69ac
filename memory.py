"""The memory plan: what training a preset needs per device, before any device is rented or weight built.

    python bench.py --plan --size 2b --micro-batch 16 --world 8    # the plan as a table (bench.py prints it)

Per device: the fp32 parameters, gradients, Adam moments and EMA (sharded over --shard ranks of --world),
the weights FSDP gathers at a time, the full-size gradient of --accum micro-steps on N ranks, the frozen
encoders and their encoding peak when training online, and the activations a training step keeps for backward
(the auxiliary pass's unless aux=False), with or without activation checkpointing (docs/scaling.md §3). The
activations are counted by running that step on the meta device (shapes and dtypes, no memory): every tensor
the step makes and that is still alive when backward starts. train.py checks the plan against the GPU's
memory before it builds a weight (train.choose_accum); bench.py prints it.
"""
import weakref

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import encoders
import losses
import selfe
from model import MMDiT



class Alive(TorchDispatchMode):
    """Remembers (weakly) every tensor made inside it; `bytes()` sums the storages of those still alive."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.made += [weakref.ref(x) for x in tree_leaves(out) if isinstance(x, torch.Tensor)]
        return out

    def bytes(self):
        storages = {}  # by the storage's address (_cdata), so views of one storage count once
        for ref in self.made:
            x = ref()
            if x is not None:
                storages[x.untyped_storage()._cdata] = x.untyped_storage().nbytes()
        return sum(storages.values())


class Peak(Alive):
    """Alive that also keeps the most bytes alive at once (after any operation inside it): what a forward
    without gradient (the frozen encoders) needs while it runs."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.peak = max(self.peak, self.bytes())
        return out


class FusedAttention(TorchFunctionMode):
    """Meta tensors take SDPA's math path, which keeps the (L, L) attention matrix; count what a fused kernel
    keeps (the output and the log-sum-exp) instead, as flash attention on a GPU does."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args, **(kwargs or {}))[0]
        return func(*args, **(kwargs or {}))


def tokens(cfg, area):
    """Image tokens of a square of `area` pixels: FLUX latents (/8) or pixels, then patches."""
    side = area // (8 if cfg.latent == "flux-vae" else 1) // cfg.patch
    return side, side


def training_forward(cfg, batch, area, dtype, act_ckpt, objective, device, aux=True):
    """The forward of a training step at micro-batch `batch` on random inputs, weights in `dtype`: -> a
    function that runs it and returns the loss. Self-E with every sample evaluated (its worst case: every
    pass that keeps activations runs on the whole batch) and, with `aux`, the auxiliary term, or FM."""
    with torch.device(device):
        net = MMDiT(cfg).to(dtype)
        h, w = tokens(cfg, area)
        x0 = torch.randn(batch, h * w, cfg.in_channels)
        cond = (torch.randn(batch, cfg.t5_max_len, cfg.context_in_dim), torch.randn(batch, cfg.vec_in_dim))
        t = torch.rand(batch)
        ids, txt_ids = selfe.image_ids(h, w, device), torch.zeros(1, cfg.t5_max_len, 3)
    if act_ckpt:
        for block in [*net.double_blocks, *net.single_blocks]:
            selfe.checkpoint_activations(block)
    G = lambda x, t_, s_, c: selfe.g_head(x, t_, net(x, ids, c[0], txt_ids, t_, s_, c[1]).float())
    if objective == "fm":
        return lambda: losses.fm_loss(G, x0, t, cond)["loss"]
    null, every = tuple(c[:1] for c in cond), torch.arange(batch, device=device)
    fake = (lambda: tuple(c[every] for c in cond)) if aux else (lambda: None)   # c_fake: encoded anew
    return lambda: losses.selfe_loss(G, G, x0, t, t * 0.5, cond, null, evaluated=every, fake=fake())["loss"]


def step_activations(cfg, batch, area, dtype, act_ckpt, objective, aux=True):
    """Bytes a training step keeps for backward, counted on the meta device: what its forward
    made and still holds."""
    forward = training_forward(cfg, batch, area, dtype, act_ckpt, objective, "meta", aux)
    with FusedAttention(), Alive() as alive:
        loss = forward()
        kept = alive.bytes()
    del loss
    return kept


def block_recompute(cfg, batch, area, dtype):
    """Bytes one block's recomputation holds in backward under activation checkpointing: the larger of the
    double- and single-stream block's activations at micro-batch `batch`, counted on the meta device."""
    h, w = tokens(cfg, area)
    with torch.device("meta"):
        net = MMDiT(cfg).to(dtype)
        img = torch.randn(batch, h * w, cfg.hidden_size, dtype=dtype)
        txt = torch.randn(batch, cfg.t5_max_len, cfg.hidden_size, dtype=dtype)
        vec = torch.randn(batch, cfg.hidden_size, dtype=dtype)
        pe = net.pe_embedder(torch.cat((torch.zeros(1, cfg.t5_max_len, 3), selfe.image_ids(h, w, "meta")), 1))
    most = 0
    for block, inputs in ((net.double_blocks[0], (img, txt)),
                          (net.single_blocks[0], (torch.cat((txt, img), 1),))):
        with FusedAttention(), Alive() as alive:
            out = block(*inputs, vec, pe)
            most = max(most, alive.bytes())
        del out
    return most


def frozen_parts(cfg, precision):
    """The frozen parts training online holds, on the meta device, in the dtypes they load in (selfe.SelfE):
    the text conditioner (the real T5 and CLIP in bf16 on GPU; the tiny preset's fp32 stand-ins) and the
    autoencoder in fp32."""
    pretrained = cfg.tokenizer != "words"
    dtype = torch.bfloat16 if precision == "bf16" and pretrained else torch.float32
    with torch.device("meta"):
        parts = [encoders.TextEncoders.shaped(cfg, dtype)]
        if cfg.latent == "flux-vae":
            parts.append(encoders.AutoEncoder())
    return parts


def encoding_peak(cfg, batch, area, precision):
    """Bytes the frozen parts need while they encode a micro-batch (the text conditioner on its captions, the
    autoencoder on its images), counted on the meta device: the larger of the two, since they run one after
    the other and their temporaries are freed before the denoiser's forward."""
    text, *ae = frozen_parts(cfg, precision)
    most = 0
    with torch.device("meta"), torch.no_grad():
        ids = text.example_ids(batch)
        calls = [lambda: text.encode(*ids)]
        if ae:
            images = torch.zeros(batch, 3, *[int(area ** 0.5)] * 2)
            calls.append(lambda: ae[0].encode(images))
        for call in calls:
            with FusedAttention(), Peak() as peak:
                out = call()
            most = max(most, peak.peak)
            del out
    return most


def memory_plan(cfg, batch, area, world=1, act_ckpt=False, precision="bf16", objective="selfe", *,
                shard=None, accum=1, aux=True, frozen=False):
    """Bytes per device for training `cfg` at per-device micro-batch `batch` on squares of `area` pixels over
    `world` ranks -> dict of the parts and their 'total'. Parameters, gradients, Adam's two moments and the
    EMA are fp32 and sharded over `shard` ranks (default: all; train.py --shard). Under FSDP (N ranks, or
    bf16) a shard group of several ranks gathers two blocks' weights at a time in the compute dtype, one of
    one device keeps the whole model gathered through a step (train.parallelize), with one block's fp32
    gradient before its reduce-scatter; on N ranks `accum` > 1 micro-steps keep a full-size fp32 gradient, in
    place of the sharded one, until the last one reduces it (train.micro_steps). Activations: what the step's
    forward keeps for backward (with the auxiliary pass only with `aux`), plus one block's recomputation under
    act_ckpt. `frozen`: training online also holds the frozen parts, and their temporaries while they encode
    (before the denoiser's forward: the larger of the two counts). Other temporaries are not counted (train.py
    leaves them 15%)."""
    with torch.device("meta"):
        net = MMDiT(cfg)
    n = sum(p.numel() for p in net.parameters())
    shard = shard or world
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    fsdp = world > 1 or precision == "bf16"
    block = max(sum(p.numel() for p in b.parameters()) for b in (net.double_blocks[0], net.single_blocks[0]))
    gathered = (n if shard == 1 else 2 * block) * dtype.itemsize + 4 * block
    frozen_bytes = sum(p.numel() * p.element_size() for m in frozen_parts(cfg, precision)
                       for p in m.parameters()) if frozen else 0
    plan = {"parameters": 4 * n / shard, "gradients": 4 * n / shard, "Adam moments": 8 * n / shard,
            "EMA": 4 * n / shard,
            "gradient kept over micro-steps": 4 * n - 4 * n / shard if world > 1 and accum > 1 else 0,
            "gathered weights": gathered if fsdp else 0,
            "frozen parts": frozen_bytes,
            "activations": step_activations(cfg, batch, area, dtype, act_ckpt, objective, aux),
            "block recomputed in backward": block_recompute(cfg, batch, area, dtype) if act_ckpt else 0,
            "frozen parts encoding": encoding_peak(cfg, batch, area, precision) if frozen else 0}
    step = plan["activations"] + plan["block recomputed in backward"]
    plan["total"] = sum(plan.values()) - step - plan["frozen parts encoding"] + max(
        step, plan["frozen parts encoding"])
    return plan
