"""The Self-E system that train.py and sample.py share.

- `SelfE`: the dual-time denoiser and its frozen parts, built from a preset: text -> (T5 tokens, CLIP pooled),
  image <-> latent tokens (patchify), V and the sample head G = x_t - t V (Eq. 6).
- The EMA, and the checkpoint format (reading, checking, loading). The objective and the randomness it is
  defined by (Eq. 1, s.11-s.13, caption dropout) are losses.py's.
Equation numbers are the paper's; docs/method.md keys every citation (Eq. N, s.N, S.N, A N).
"""
import dataclasses
import math
import os
import pickle
import re
import warnings

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import cli
import data
import encoders
import model

NULL_PROMPT = ""  # phi: the empty prompt, through both encoders (docs/method.md §3, A 1)


# ------------------------------------------------------------------------------------------------------------
# The sample head (the forward process and the times of a training sample are the objective's: losses.py)

def g_head(x_t, t, v):
    """Eq. 6: G = x_t - t V, the x_0 prediction."""
    return x_t - t.view(-1, 1, 1) * v


def expand(cond, n):
    """An encoding of batch 1 (phi's) as batch n: each (1, ...) -> (n, ...), a view."""
    return tuple(c.expand(n, *c.shape[1:]) for c in cond)


# ------------------------------------------------------------------------------------------------------------
# Tokens <-> images

def patchify(x, p):
    """(B, C, H, W) -> (B, (H/p)(W/p), C p p) in FLUX's order, row-major over patches."""
    B, C, H, W = x.shape
    x = x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)  # (B, H/p, W/p, C, p, p)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


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


# ------------------------------------------------------------------------------------------------------------
# The system

class SelfE:
    """Denoiser + frozen text encoders (+ autoencoder) of one preset. `denoiser` is trained;
    `ema` is its EMA copy."""

    def __init__(self, cfg: model.Config, device="cpu", frozen_seed=0, pretrained=None, t5=None, clip=None,
                 vae=None, transformer=None, frozen_parts=True, denoiser=True, ae_dtype=torch.float32,
                 t5_mask=False):
        """Build the denoiser (random init, directly on `device`) and the frozen parts. The tiny preset makes
        its stand-ins from `frozen_seed`; the others load the public weights from a FLUX.1 snapshot folder
        `pretrained`, or part by part from `t5` / `clip` folders
        (weights, config and tokenizer files side by side) and a `vae` file. `transformer` loads a public
        FLUX.1 transformer (BFL layout) as the denoiser. `frozen_parts=False` skips the real frozen parts
        (training from a cache, benchmarks); the tiny preset's stand-ins are always built, since its
        checkpoints carry them. `denoiser=False` builds the frozen parts alone (the cache builder). The text
        encoders run in bf16 on GPU, the autoencoder in `ae_dtype`. `t5_mask`: encoders.TextEncoders' mask."""
        self.cfg, self.device = cfg, torch.device(device)
        self.guidance = 3.5  # FLUX.1-dev's distilled guidance input; unused by Self-E presets
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32  # of the pretrained parts
        self.denoiser = None
        if transformer is not None:
            self.denoiser = model.load_flux_transformer(transformer, cfg, dtype, self.device)
        elif denoiser:
            with torch.device(self.device):
                self.denoiser = model.MMDiT(cfg)
            self.denoiser.init_weights()
        # the text encodings' dtype: the denoiser's parameters' (it casts its inputs itself)
        self.dtype = next(self.denoiser.parameters()).dtype if self.denoiser is not None else torch.float32
        self.ema, self.ae, self._null = None, None, None
        # the text conditioner (encoders.TextEncoders): the tiny preset's seeded random stand-ins, always
        # built (its checkpoints carry them), or the real T5 and CLIP
        if cfg.tokenizer == "words":
            self.text = encoders.TextEncoders.stand_ins(cfg, data.WORDS, frozen_seed, self.device, t5_mask)
        elif not frozen_parts:
            self.text = None
        else:
            p = frozen_paths(pretrained, t5, clip, vae)
            self.text = encoders.TextEncoders.pretrained(p, cfg, dtype, self.device, t5_mask)
        if cfg.latent == "flux-vae" and frozen_parts:
            if cfg.tokenizer == "words":
                raise ValueError("a flux-vae preset needs the pretrained frozen parts")
            self.ae = encoders.load_autoencoder(p["ae"], ae_dtype, self.device).requires_grad_(False)

    # -- text
    def encode_text(self, prompts):
        """prompts -> (txt (B, Lt, d_txt) T5 states, vec (B, d_vec) pooled CLIP) through the text conditioner
        (encoders.TextEncoders, which says what --t5-mask changes), in the denoiser's dtype."""
        txt, vec = self.text(prompts)
        return txt.to(self.dtype), vec.to(self.dtype)

    def null_cond(self, n=1):
        """The empty prompt's encoding (txt, vec), computed once per text conditioner, as batch n."""
        if self._null is None or self._null[0] is not self.text:
            self._null = (self.text, self.encode_text([NULL_PROMPT]))
        return expand(self._null[1], n)

    # -- images
    @property
    def downsample(self):
        """Pixels per latent cell: the autoencoder's
        (FLUX: 8; 8 too when a flux-vae preset runs without it), else 1."""
        if self.ae is not None:
            return 2 ** (len(self.ae.c.ch_mult) - 1)
        return 8 if self.cfg.latent == "flux-vae" else 1

    @property
    def grid(self):
        """Token grid (h, w) of the preset's resolution: pixels (tiny) or latents, / patch."""
        n = self.cfg.resolution // self.downsample // self.cfg.patch
        return n, n

    @torch.no_grad()
    def encode_latents(self, images):
        """(B, 3, H, W) in [-1, 1] -> FLUX autoencoder latents (B, 16, H/8, W/8) in fp32, or the pixels
        themselves (tiny)."""
        x = images.to(self.device, non_blocking=True)
        if self.ae is None:
            return x
        return self.ae.encode(x.to(next(self.ae.parameters()).dtype)).float()

    def encode_images(self, images):
        """(B, 3, H, W) in [-1, 1] -> tokens (B, L, C p p): the latents cut into p x p patches."""
        return patchify(self.encode_latents(images), self.cfg.patch)

    @torch.no_grad()
    def decode_tokens(self, x, h, w):
        """tokens (B, h w, C p p) -> images (B, 3, H, W) in [-1, 1]."""
        x = unpatchify(x.float(), h, w, self.cfg.patch)
        if self.ae is None:
            return x.clamp(-1, 1)
        x = self.ae.decode(x.to(next(self.ae.parameters()).dtype)).float()
        return x.clamp(-1, 1)

    # -- the network
    def velocity(self, net, x, t, s, cond, h, w):
        """V_theta(x, t, s, c) of `net` (the denoiser or its EMA): x (B, h w, C); t, s (B,) fp32; cond
        (txt, vec). Shared positions ride with batch 1."""
        txt, vec = cond
        img_ids = image_ids(h, w, x.device)
        txt_ids = torch.zeros(1, txt.shape[1], 3, device=x.device)
        guidance = torch.full_like(t, self.guidance) if self.cfg.guidance_embed else None
        v = net(x, img_ids, txt, txt_ids, t, s, vec, guidance)
        if net is self.ema:
            forget_forward(net)
        return v

    def predict(self, net, x, t, s, cond, h, w):
        """Eq. 6: the sample prediction x0_hat = G_theta(x_t, t, s, c) = x_t - t V_theta(x_t, t, s, c) of
        `net`, in fp32 (losses.py takes it as the callable G, with the network and the grid bound)."""
        return g_head(x.float(), t, self.velocity(net, x, t, s, cond, h, w).float())

    # -- EMA
    def make_ema(self):
        """The EMA copy. It only ever runs without gradient, yet its parameters keep requires_grad as the
        model's do: torch.compile guards on that flag, so the two then share their compiled no-grad graphs."""
        with torch.device(self.device):
            self.ema = model.MMDiT(self.cfg)
        self.ema.load_state_dict(self.denoiser.state_dict())
        return self.ema

    @torch.no_grad()
    def update_ema(self, decay, step, warmup=False, skip=None):
        """EMA of the weights with a constant decay (S.2: 0.9999; neither the paper nor minFM warms it up).
        `warmup` uses min(decay, (1 + step) / (10 + step)) instead: an EMA that follows the weights closely
        early on, so the conditional self-evaluation pass runs on a fast-moving average for the first
        ~1/(1 - decay) steps. `skip`, a 0-dim bool tensor on the device, leaves the EMA unchanged where true
        without the host reading it (train.py: a step whose update Adam skipped)."""
        d = min(decay, (1 + step) / (10 + step)) if warmup else decay
        reshard(self.ema)
        # the local shards of FSDP2's parameters (the tensors themselves without FSDP)
        local = lambda m: [p.to_local() if hasattr(p, "to_local") else p for p in m.parameters()]
        ema, new = local(self.ema), [p.detach() for p in local(self.denoiser)]
        if skip is None:
            torch._foreach_lerp_(ema, new, 1 - d)
        else:
            torch._foreach_lerp_(ema, new, [(1 - d) * (~skip).float()] * len(ema))

    def load_frozen_state(self, sd, where):
        """The tiny preset's stand-ins from a checkpoint's frozen.safetensors (keys t5.*, clip.*)."""
        encoders.load_strict(self.text, sd, where)


def frozen_paths(pretrained=None, t5=None, clip=None, vae=None):
    """Where the real frozen parts come from: a FLUX.1 snapshot folder (encoders.find_pretrained), each part
    overridable; or, without a folder, all three parts given: T5 and CLIP folders with their tokenizer files
    beside the weights (as the google/t5-v1_1-xxl and openai/clip-vit-large-patch14 repositories have them)
    and the autoencoder file."""
    if pretrained:
        p = encoders.find_pretrained(pretrained)
    elif t5 and clip and vae:
        p = {}
    else:
        raise SystemExit("this preset uses the real frozen parts (T5-XXL, CLIP-L, FLUX autoencoder): "
                         "pass --pretrained FLUX_DIR (a FLUX.1-schnell or -dev snapshot folder) or all "
                         "of --t5, --clip, --vae")
    if t5:
        p.update(t5=t5, t5_tokenizer=os.path.join(t5, "spiece.model"))
    if clip:
        p.update(clip=clip, clip_vocab=os.path.join(clip, "vocab.json"),
                 clip_merges=os.path.join(clip, "merges.txt"))
    if vae:
        p["ae"] = vae
    for key in ("t5_tokenizer", "clip_vocab", "clip_merges", "ae"):
        if not os.path.exists(p[key]):
            raise FileNotFoundError(f"{p[key]} not found (needed for {key})")
    return p


# ------------------------------------------------------------------------------------------------------------
# Checkpoints (written by train.py; docs/formats.md §1): <out>/step-NNNNNNN/ holds
#   dcp/               model, EMA and optimizer, sharded as trained (torch.distributed.checkpoint): resume
#   ema.safetensors    the EMA weights consolidated into one file: sample.py, evaluate.py
#   frozen.safetensors the tiny preset's random frozen stand-ins
#   config.json        preset, flags, step
# and <out>/latest names the newest complete one. Loading one is here; saving one is in train.py, next to
# training. Every file is checked before it is trusted: config.json field by field, then against the
# weights' headers, before any tensor is allocated; the pickled parts of dcp/ go through a reader that only
# admits what torch.distributed.checkpoint writes (docs/formats.md §1, "What a checkpoint may run").

STEP_NAME = re.compile(r"step-\d+")


def checkpoint_activations(block):
    """Activation checkpointing of one block: it keeps its inputs and recomputes the rest in backward. The
    checkpoint sits inside the block's call, so the recomputation does not run the block's hooks
    (FSDP's gather) again, and around its compiled forward, not inside it: inductor's partitioner fails on
    the checkpointed single-stream block's attention backward with symbolic sizes (docs/scaling.md §4)."""
    forward = block.forward
    block.forward = lambda *args: checkpoint(forward, *args, use_reentrant=False)


def reshard(module):
    """Under FSDP2 the root's parameters stay gathered after a forward that no backward follows (the EMA's),
    and a one-device shard group keeps every block's through a step (train.parallelize): shard them all
    again, so parameters, EMA and state dicts are all sharded alike."""
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def forget_forward(module):
    """FSDP2 records every forward of its modules, for the prefetching of the backward that follows, and
    forgets the record when that backward ends. The EMA runs forward only, so it would keep a record of every
    forward of the run (about 1 GB per rank over the paper's). Forget it, and reshard as a backward would.
    torch 2.13 names this reset_iter_state; torch 2.11-2.12 keep the same two records under these names."""
    if not isinstance(module, FSDPModule):
        return
    if hasattr(module, "reset_iter_state"):
        module.reset_iter_state()
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            for group in getattr(state, "_fsdp_param_groups", None) or [state._fsdp_param_group]:
                if group is not None:
                    group._post_forward_indices.clear()
                    group.comm_ctx.post_forward_order.clear()
            m.reshard()


def training_state(system, optimizer=None):
    """The sharded state dicts (DTensors under FSDP2, plain tensors otherwise) that dcp
    saves and loads in place."""
    reshard(system.denoiser)
    state = {"model": get_model_state_dict(system.denoiser)}
    if system.ema is not None:
        reshard(system.ema)
        state["ema"] = get_model_state_dict(system.ema)
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(system.denoiser, optimizer)
    return state


# What the pickle of a dcp/.metadata may name: torch.distributed.checkpoint's own records and the few torch
# and standard-library types inside them. Anything else (os.system, builtins.eval, ...) is refused unread.
DCP_METADATA_GLOBALS = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    *((module, name) for module in ("pathlib", "pathlib._local")
      for name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
    *(("torch", name) for name, v in vars(torch).items() if isinstance(v, torch.dtype)),
}
# the shard files dcp names in its metadata: plain names inside dcp/, never a path out of it
DCP_SHARD_NAME = re.compile(r"__\d+_\d+\.distcp")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in DCP_METADATA_GLOBALS:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a torch.distributed.checkpoint "
                                         "metadata file never holds")
        return super().find_class(module, name)


def read_dcp_metadata(where):
    """dcp/.metadata through the restricted unpickler -> torch's Metadata, its shard names checked. A planted
    payload is refused before anything it names is imported or called."""
    file = os.path.join(where, ".metadata")
    if not os.path.isfile(file):
        raise encoders.CheckpointError(f"{where}: no distributed checkpoint here (missing .metadata)")
    try:
        with open(file, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError,
            ImportError) as e:
        raise encoders.CheckpointError(f"{file}: refused, not a torch.distributed.checkpoint metadata file "
                                       f"({e}); resume only from run folders you trust") from e
    if not isinstance(meta, Metadata) or not isinstance(meta.storage_data, dict):
        raise encoders.CheckpointError(f"{file}: refused, holds a {type(meta).__name__}, not dcp's Metadata")
    for info in meta.storage_data.values():
        if not DCP_SHARD_NAME.fullmatch(str(getattr(info, "relative_path", ""))):
            raise encoders.CheckpointError(f"{file}: refused, names the shard file "
                                           f"{getattr(info, 'relative_path', None)!r}, not one inside dcp/")
    return meta


class _CheckedReader(dcp.FileSystemReader):
    """dcp's file reader with the metadata read (and checked) once, by read_dcp_metadata."""

    def __init__(self, where, meta):
        super().__init__(where)
        self.checked = meta

    def read_metadata(self, *args, **kwargs):
        self.checked.storage_meta = self.checked.storage_meta or StorageMeta()
        self.checked.storage_meta.load_id = self.load_id
        return self.checked


class _CheckedPlanner(DefaultLoadPlanner):
    """dcp's planner, but a non-tensor entry (the optimizer's hyperparameters) is unpickled by torch's
    weights_only reader, which admits only plain containers, numbers and tensors."""
    refused = None

    def load_bytes(self, read_item, value):
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            self.refused = self.refused or f"entry {read_item.dest_index.fqn}: {str(e).splitlines()[0]}"
            raise
        if not self.flatten_state_dict:
            self.state_dict[read_item.dest_index.fqn] = obj
            return
        *parents, last = self.mappings[read_item.dest_index.fqn]  # its place in the nested state dict
        node = self.original_state_dict
        for key in parents:
            node = node[key]
        node[last] = obj


def load_training_state(path, system, optimizer=None):
    """Load model, EMA (if the system has one) and optimizer from `path`/dcp into the live objects, sharded or
    not, whatever the world size that wrote them. Nothing in the folder is run: see read_dcp_metadata and
    _CheckedPlanner."""
    where = os.path.join(path, "dcp")
    reader, planner = _CheckedReader(where, read_dcp_metadata(where)), _CheckedPlanner()
    state = training_state(system, optimizer)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=not dist.is_initialized())
    # a missing or foreign shard file, a shape that does not fit, a refused entry
    except (Exception, CheckpointException) as e:
        if planner.refused:
            raise encoders.CheckpointError(f"{where}: refused {planner.refused}; resume only from run "
                                           "folders you trust") from e
        cause = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise encoders.CheckpointError(f"{where}: cannot load the checkpoint: {cause[-1].strip()}") from e
    set_model_state_dict(system.denoiser, state["model"])
    if system.ema is not None:
        set_model_state_dict(system.ema, state["ema"])
    if optimizer is not None:
        set_optimizer_state_dict(system.denoiser, optimizer, state["optimizer"])


def resolve_checkpoint(path):
    """A run folder (with `latest`) or a step folder -> the step folder; a clear error if there is none.
    `latest` must name a step-* folder beside it: a damaged one, or one that points elsewhere, is refused."""
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest, "rb") as f:
            raw = f.read(256)
        try:
            name = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            name = None
        if name is None or not STEP_NAME.fullmatch(name):
            raise encoders.CheckpointError(f"{latest}: damaged: holds {raw[:40]!r}, not the name of a "
                                           "step-* folder; write the name of one of the run's step-* folders "
                                           "into it")
        if not os.path.isfile(os.path.join(path, name, "config.json")):
            raise encoders.CheckpointError(f"{latest} names {name!r}, which is not a complete checkpoint: "
                                           "write the name of one of the step-* folders there into it")
        return os.path.join(path, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no checkpoint at {os.path.abspath(path)} (looked for {path}/latest and "
                                f"{path}/config.json). Train one with `python train.py` (writes runs/tiny).")
    return path


# The upper end of the sizes a config.json may give: far above any preset, low enough that building the
# network on the meta device (to compare it with the weights' headers) stays instant.
MAX_WIDTH, MAX_DEPTH = 2 ** 20, 1024
DEPTHS = ("depth", "depth_single_blocks", "num_layers", "num_hidden_layers")


def _fields_of(cls, d, where, prefix=""):
    """A JSON object -> keyword arguments of dataclass `cls`, each of the type of its default (an int is no
    bool; a float may be written as an int; a tuple as a list of ints), ints in [1, MAX_WIDTH] (depths in
    [0, MAX_DEPTH]), floats finite and positive. Keys it lacks keep their defaults (files from before a field
    existed); a key it does not know is an error."""
    if not isinstance(d, dict):
        raise encoders.CheckpointError(f"{where}: damaged: {prefix.rstrip('.') or 'the file'} is a JSON "
                                       f"{type(d).__name__}, not an object")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise encoders.CheckpointError(f"{where}: damaged: unknown key '{prefix}{unknown[0]}'")
    out = {}
    for name, value in d.items():
        f, key = fields[name], f"{prefix}{name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        bad = lambda want: encoders.CheckpointError(f"{where}: damaged: {key} = {value!r}, expected {want}")
        if dataclasses.is_dataclass(default):
            out[name] = default.__class__(**_fields_of(default.__class__, value, where, key + "."))
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise bad("true or false")
            out[name] = value
        elif isinstance(default, int):
            lo, hi = (0, MAX_DEPTH) if name in DEPTHS else (1, MAX_WIDTH if name != "steps" else 2 ** 40)
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise bad(f"an integer in [{lo}, {hi}]")
            out[name] = value
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise bad("a positive number")
            out[name] = float(value)
        elif isinstance(default, tuple):
            if (not isinstance(value, list) or not value
                    or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_WIDTH
                               for v in value)):
                raise bad("a list of positive integers")
            out[name] = tuple(value)
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise bad("a string")
            out[name] = value
    return out


def check_config(d, where):
    """config.json's "config" -> model.Config, every field type- and range-checked and the sizes consistent
    with one another, or an error naming the key."""
    cfg = model.Config(**_fields_of(model.Config, d, where, "config."))
    flux_vae = cfg.latent == "flux-vae"
    side = cfg.patch * (8 if flux_vae else 1)                             # pixels per token
    problems = [
        (cfg.latent in ("flux-vae", "pixels"), "latent", "'flux-vae' or 'pixels'"),
        (cfg.tokenizer in ("pretrained", "words", "bytes"), "tokenizer", "'pretrained' or 'words'"),
        (cfg.ema_decay <= 1, "ema_decay", "at most 1"),
        (cfg.hidden_size % cfg.num_heads == 0, "num_heads", f"a divisor of hidden_size {cfg.hidden_size}"),
        (len(cfg.axes_dim) == 3 and all(a % 2 == 0 for a in cfg.axes_dim)
         and sum(cfg.axes_dim) == cfg.hidden_size // cfg.num_heads, "axes_dim",
         f"three even RoPE sizes summing to the head dim {cfg.hidden_size // cfg.num_heads}"),
        (cfg.in_channels == cfg.latent_channels * cfg.patch ** 2, "in_channels",
         f"{cfg.latent_channels * cfg.patch ** 2} ({cfg.latent_channels} latent channels x patch^2)"),
        (cfg.resolution % side == 0, "resolution", f"a multiple of {side} px (patch x autoencoder)"),
        (cfg.depth + cfg.depth_single_blocks > 0, "depth", "at least one block"),
    ]
    if cfg.tokenizer == "words":  # the stand-ins: built from t5 and clip, read data.WORDS, feed the denoiser
        need = encoders.WordTokenizer(data.WORDS, 1).vocab_size
        problems += [
            (cfg.t5.vocab_size >= need, "t5.vocab_size", f"at least {need}"),
            (cfg.clip.vocab_size >= need, "clip.vocab_size", f"at least {need}"),
            (cfg.context_in_dim == cfg.t5.d_model, "context_in_dim", f"t5.d_model {cfg.t5.d_model}"),
            (cfg.vec_in_dim == cfg.clip.hidden_size, "vec_in_dim",
             f"clip.hidden_size {cfg.clip.hidden_size}"),
            (cfg.clip.hidden_size % cfg.clip.num_attention_heads == 0, "clip.num_attention_heads",
             f"a divisor of clip.hidden_size {cfg.clip.hidden_size}"),
            (cfg.clip.eos_token_id < cfg.clip.vocab_size, "clip.eos_token_id", "below clip.vocab_size")]
    for ok, key, want in problems:
        if not ok:
            value = getattr(cfg.clip, key[5:]) if key.startswith("clip.") else getattr(cfg, key)
            raise encoders.CheckpointError(f"{where}: damaged: config.{key} = {value!r}, expected {want}")
    return cfg


def _check_flags(flags, where):
    """The flags a checkpoint's readers take from config.json (sample.py, evaluate.py, load_checkpoint,
    train.py --resume), where present: of the type and range train.py's parser gives them."""
    if not isinstance(flags, dict):
        raise encoders.CheckpointError(f"{where}: damaged: 'flags' is a JSON {type(flags).__name__}, "
                                       "not an object")
    integer = lambda lo, hi=None: lambda v: (isinstance(v, int) and not isinstance(v, bool) and lo <= v
                                             and (hi is None or v <= hi))
    real = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    path = lambda v: v is None or isinstance(v, str)
    checks = {
        "seed": (integer(0, cli.MAX_SEED), f"an integer in [0, {cli.MAX_SEED}]"),
        "anchor": (integer(1, 4095), "an integer in [1, 4095]"),
        "objective": (lambda v: v in ("selfe", "fm"), "'selfe' or 'fm'"),
        "steps": (integer(1), "an integer >= 1"), "schedule_steps": (integer(1), "an integer >= 1"),
        "warmup": (integer(0), "an integer >= 0"), "batch": (integer(1), "an integer >= 1"),
        "tau_frac": (lambda v: real(v) and v >= 0, "a number >= 0"),
        "aux_start_frac": (lambda v: real(v) and v >= 0, "a number >= 0"),
        "world": (lambda v: v is None or isinstance(v, str), "a string"),
        "data": (lambda v: isinstance(v, str), "a string"),
        "shift": (lambda v: isinstance(v, bool), "true or false"),
        "t5_mask": (lambda v: isinstance(v, bool), "true or false"),
        "cfg": (lambda v: v is None or real(v), "a number"),
        "eta": (lambda v: real(v) and 0 <= v <= 1, "a number in [0, 1]"),
        **{k: (path, "a path or null") for k in ("pretrained", "t5", "clip", "vae")},
    }
    for key, (ok, want) in checks.items():
        if key in flags and not ok(flags[key]):
            raise encoders.CheckpointError(f"{where}: damaged: flags.{key} = {flags[key]!r}, expected {want}")


def read_meta(path):
    """A step folder's config.json -> (Config, {"config", "flags", "step"}); a damaged one is an error naming
    the file and the key."""
    file = os.path.join(path, "config.json")
    meta = encoders.read_json(file)
    missing = [k for k in ("config", "flags", "step") if k not in meta]
    if missing:
        raise encoders.CheckpointError(f"{file}: damaged (KeyError: no {missing[0]!r} key); use another "
                                       "step-* folder of the run")
    cfg = check_config(meta["config"], file)
    _check_flags(meta["flags"], file)
    step = meta["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise encoders.CheckpointError(f"{file}: damaged: step = {step!r}, expected an integer >= 0")
    if cfg.tokenizer == "bytes":
        raise encoders.CheckpointError(f"{file}: trained with an earlier tiny preset whose stand-in encoders "
                                       "read bytes; the tiny preset now reads words "
                                       "(encoders.WordTokenizer), so this checkpoint cannot be rebuilt: "
                                       "train it again with `python train.py`")
    return cfg, meta


def check_weights(cfg, path, weights="ema"):
    """The checkpoint's weight files against the network `cfg` describes, built on the meta device (no
    memory): every key and shape from the safetensors headers (or, for the raw weights in dcp/, from its
    checked metadata), before anything is allocated. A config.json edited to other sizes fails here, naming
    both files."""
    with torch.device("meta"):
        net = model.MMDiT(cfg)
    config = os.path.join(path, "config.json")
    file = os.path.join(path, f"{weights}.safetensors")
    if os.path.isfile(file) or weights == "ema":
        encoders.check_entries(net, encoders.read_header(file), f"{file} (against {config})")
    else:  # the raw weights: dcp's metadata lists every tensor's global size
        where = os.path.join(path, "dcp")
        listed = read_dcp_metadata(where).state_dict_metadata
        size = lambda k: tuple(getattr(listed.get(f"model.{k}"), "size", ()))
        own = net.state_dict()
        wrong = [k for k, v in own.items() if size(k) != v.shape]
        if wrong:
            k = wrong[0]
            raise encoders.CheckpointError(f"{where}: model.{k} is {size(k) or 'missing'} in the checkpoint, "
                                           f"{tuple(own[k].shape)} by {config} ({len(wrong)} tensors differ)")
    if cfg.tokenizer == "words":
        with torch.device("meta"):
            stand_ins = encoders.TextEncoders.shaped(cfg)
        frozen = os.path.join(path, "frozen.safetensors")
        encoders.check_entries(stand_ins, encoders.read_header(frozen), f"{frozen} (against {config})")


def read_weights(file, device="cpu"):
    """A checkpoint's .safetensors -> state dict. The header is checked first (encoders.read_header), so a
    truncated or damaged file is an error naming it, as is anything the reader itself refuses."""
    encoders.read_header(file)
    try:
        return safetensors.torch.load_file(file, device=str(device))
    except Exception as e:  # the safetensors reader's own error for a body the header check cannot see
        raise encoders.CheckpointError(f"{file}: cannot read: {e}") from e


def inference_dtype(device):
    """The dtype a loaded denoiser samples in: bf16 on an accelerator (as it trained: FSDP2's bf16 weights
    over the fp32 ones; half the memory and the bf16 matmul rate), fp32 on the CPU."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_checkpoint(path, device="cpu", weights="ema", pretrained=None, t5=None, clip=None, vae=None,
                    resolution=None, dtype=None):
    """Rebuild the system from the config saved in a checkpoint and load its weights ('ema' or 'model'), cast
    to `dtype` (default: inference_dtype(device)). The real frozen parts come from the given paths, else from
    those the run was trained with; `resolution` overrides the image size (the denoiser is
    resolution-free). config.json is checked against the weights' headers before the network is built."""
    path = resolve_checkpoint(path)
    cfg, meta = read_meta(path)
    flags = meta["flags"]
    check_weights(cfg, path, weights)
    if resolution:
        cfg = dataclasses.replace(cfg, resolution=resolution)
    system = SelfE(cfg, device, flags.get("seed", 0), pretrained or flags.get("pretrained"),
                   t5 or flags.get("t5"), clip or flags.get("clip"), vae or flags.get("vae"),
                   t5_mask=flags.get("t5_mask", False))
    file = os.path.join(path, f"{weights}.safetensors")
    if weights == "model" and not os.path.isfile(file):  # the raw weights live in the sharded training state
        load_training_state(path, system)
    else:
        encoders.load_strict(system.denoiser, read_weights(file, system.device), file)
    frozen = os.path.join(path, "frozen.safetensors")
    if cfg.tokenizer == "words":
        system.load_frozen_state(read_weights(frozen, system.device), frozen)
    # the network casts its inputs to its weights' dtype and keeps t, s and RoPE in fp32 (model.MMDiT)
    system.denoiser.to(dtype or inference_dtype(system.device)).eval()
    system.dtype = next(system.denoiser.parameters()).dtype
    return system, meta


def preset(name):
    if name not in model.CONFIGS:
        raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(model.CONFIGS)}")
    return model.CONFIGS[name]
