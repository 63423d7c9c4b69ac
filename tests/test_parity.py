"""Parity of our hand-written frozen parts and their loaders against the reference implementations
(docs/formats.md §4-5): small random references built with
transformers / diffusers / sentencepiece / open_clip, saved in their own key layout, loaded with our code,
compared in float32. Then bad input: every malformed checkpoint stops with one error.

Test-only packages: transformers, diffusers, protobuf, sentencepiece, `pip install --no-deps open_clip_torch`.
"""
import gzip
import importlib.util
import json
import os
import random
import sys
import types
import unicodedata

import pytest
import torch
from safetensors.torch import load_file, save_file

import encoders
import model

TOL = 1e-5


def maxerr(a, b):
    return (a.float() - b.float()).abs().max().item()


def perturb_(module, std=0.1, seed=0):
    """Random values everywhere (norm weights and biases too, which references initialise to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


# ------------------------------------------------------------------------------------------------------------
# T5 v1.1 encoder against transformers.T5EncoderModel, through the sharded HF layout

@pytest.fixture(scope="module")
def t5_ref(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=120, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=3,
                                relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(0)
    ref = perturb_(transformers.T5EncoderModel(cfg), std=0.05).eval()
    folder = tmp_path_factory.mktemp("snapshot") / "text_encoder_2"
    ref.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    return ref, folder


def test_t5_sharded_layout_parity(t5_ref):
    ref, folder = t5_ref
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the reference must be sharded to exercise the index"
    ours = encoders.load_t5(str(folder), dtype=torch.float32)
    assert ours.c.num_layers == 3 and ours.c.relative_attention_max_distance == 20  # config.json was read
    # 40 > max distance: log buckets
    ids = torch.randint(0, 120, (2, 40), generator=torch.Generator().manual_seed(1))
    ids[:, 25:] = 0  # pads attend, as FLUX runs T5 without a mask
    with torch.no_grad():
        want = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    err = maxerr(got, want)
    print(f"T5 max abs err {err:.2e}")
    assert err <= TOL
    bf16 = encoders.load_t5(str(folder), dtype=torch.bfloat16)
    assert next(bf16.parameters()).dtype == torch.bfloat16 and not next(bf16.parameters()).requires_grad


def test_t5_single_file_with_tied_embedding(t5_ref, tmp_path):
    ref, folder = t5_ref
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"].clone()  # the tied copy some files carry
    save_file(sd, str(tmp_path / "model.safetensors"))
    config = encoders.t5_config_from_hf(ref.config.to_dict())
    ours = encoders.load_t5(str(tmp_path / "model.safetensors"), dtype=torch.float32, config=config)
    ids = torch.randint(0, 120, (1, 12))
    with torch.no_grad():
        assert maxerr(ours(ids), ref(input_ids=ids).last_hidden_state) <= TOL
    del sd["shared.weight"]  # only the tied name: used as shared.weight
    save_file(sd, str(tmp_path / "model.safetensors"))
    ours = encoders.load_t5(str(tmp_path / "model.safetensors"), dtype=torch.float32, config=ours.c)
    with torch.no_grad():
        assert maxerr(ours(ids), ref(input_ids=ids).last_hidden_state) <= TOL


# ------------------------------------------------------------------------------------------------------------
# CLIP text model against transformers.CLIPTextModel, keys with and without `text_model.`

@pytest.fixture(scope="module")
def clip_ref(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    # eos_token_id 2 as in the public config: transformers pools at argmax(ids), we at the first vocab-1
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=64, max_position_embeddings=20,
                                      hidden_act="quick_gelu", eos_token_id=2, bos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    ref = perturb_(transformers.CLIPTextModel(cfg), std=0.05).eval()
    folder = tmp_path_factory.mktemp("snapshot") / "text_encoder"
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def clip_ids():
    """Start 98, body below 98, end 99 = vocab - 1 at different places, padded with 99 (FLUX's framing): the
    ids where argmax(ids) (transformers, legacy eos 2) and the first end token (ours) agree."""
    g = torch.Generator().manual_seed(2)
    ids = torch.full((3, 20), 99)
    for i, n in enumerate((3, 11, 18)):
        ids[i, 0] = 98
        ids[i, 1:n] = torch.randint(0, 98, (n - 1,), generator=g)
    return ids


def check_clip(ours, ref):
    ids = clip_ids()
    with torch.no_grad():
        want = ref(input_ids=ids)
        hidden, pooled = ours(ids)
    e1, e2 = maxerr(hidden, want.last_hidden_state), maxerr(pooled, want.pooler_output)
    print(f"CLIP max abs err hidden {e1:.2e} pooled {e2:.2e}")
    assert e1 <= TOL and e2 <= TOL


def test_clip_parity_both_prefixes(clip_ref, tmp_path):
    ref, folder = clip_ref
    ours = encoders.load_clip(str(folder), dtype=torch.float32)
    assert ours.c.eos_token_id == 99  # legacy eos 2 in config.json -> vocab_size - 1
    check_clip(ours, ref)
    # the other prefix convention, plus the position_ids buffer old files carry
    sd = load_file(str(folder / "model.safetensors"))
    flip = {(k[len("text_model."):] if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items()}
    flip["text_model.embeddings.position_ids"] = torch.arange(20)[None]
    save_file(flip, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    check_clip(encoders.load_clip(str(tmp_path), dtype=torch.float32), ref)


# ------------------------------------------------------------------------------------------------------------
# FLUX autoencoder against diffusers.AutoencoderKL: the diffusers layout, and the BFL layout through
# diffusers' own converter (an independent check of our key names)

@pytest.fixture(scope="module")
def ae_ref(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                                  layers_per_block=2, latent_channels=16, norm_num_groups=32,
                                  use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                                  shift_factor=0.1159)
    ref = perturb_(ref, std=0.02).eval()
    folder = tmp_path_factory.mktemp("snapshot") / "vae"
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


def check_ae(ours, ref):
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        want_z = (ref.encode(x).latent_dist.mean - 0.1159) * 0.3611
        z = ours.encode(x)
        want_x = ref.decode(z / 0.3611 + 0.1159).sample
        x_rec = ours.decode(z)
    e1, e2 = maxerr(z, want_z), maxerr(x_rec, want_x)
    print(f"autoencoder max abs err encode {e1:.2e} decode {e2:.2e}")
    assert z.shape == (2, 16, 8, 8) and e1 <= TOL and e2 <= TOL


def test_autoencoder_diffusers_layout_parity(ae_ref):
    ref, folder = ae_ref
    ours = encoders.load_autoencoder(str(folder), dtype=torch.float32)
    assert ours.c.ch_mult == (1, 2, 2) and ours.c.num_res_blocks == 2
    check_ae(ours, ref)


def test_autoencoder_bfl_layout_parity(ae_ref, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    ref, folder = ae_ref
    cfg = encoders.AutoEncoderConfig(ch=32, ch_mult=(1, 2, 2))
    ae = encoders.load_autoencoder(str(folder), dtype=torch.float32)
    sd = {k: v.contiguous() for k, v in ae.state_dict().items()}
    save_file(sd, str(tmp_path / "ae.safetensors"))
    # diffusers' converter reads the BFL names: it must find every one of ours and give
    # back the reference weights
    conv = convert_ldm_vae_checkpoint(dict(sd), dict(ref.config))
    want = ref.state_dict()
    assert set(conv) == set(want)
    assert all(torch.equal(conv[k].reshape(want[k].shape), want[k]) for k in want)
    check_ae(encoders.load_autoencoder(str(tmp_path / "ae.safetensors"),
                                       dtype=torch.float32, config=cfg), ref)


# ------------------------------------------------------------------------------------------------------------
# FLUX transformer: our MMDiT (dual_time off) against diffusers.FluxTransformer2DModel,
# weights through the BFL layout

def bfl_to_diffusers(sd, n_double, n_single, hidden):
    """BFL FLUX keys -> diffusers FluxTransformer2DModel keys
    (the facts of diffusers' single-file converter, written out here because that converter hard-codes hidden
    3072). Pops every key it maps: leftovers are unknown names."""
    sd, out = dict(sd), {}

    def move(src, dst):
        for wb in ("weight", "bias"):
            out[f"{dst}.{wb}"] = sd.pop(f"{src}.{wb}")

    move("img_in", "x_embedder")
    move("txt_in", "context_embedder")
    for src, dst in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        if f"{src}.in_layer.weight" in sd:
            move(f"{src}.in_layer", f"time_text_embed.{dst}_embedder.linear_1")
            move(f"{src}.out_layer", f"time_text_embed.{dst}_embedder.linear_2")
    for i in range(n_double):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        move(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        move(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        for stream, names in (("img", ("to_q", "to_k", "to_v")),
                              ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for wb in ("weight", "bias"):
                for name, part in zip(names, sd.pop(f"{b}.{stream}_attn.qkv.{wb}").chunk(3)):
                    out[f"{d}.attn.{name}.{wb}"] = part
        out[f"{d}.attn.norm_q.weight"] = sd.pop(f"{b}.img_attn.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = sd.pop(f"{b}.img_attn.norm.key_norm.scale")
        out[f"{d}.attn.norm_added_q.weight"] = sd.pop(f"{b}.txt_attn.norm.query_norm.scale")
        out[f"{d}.attn.norm_added_k.weight"] = sd.pop(f"{b}.txt_attn.norm.key_norm.scale")
        move(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        move(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        move(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        move(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        move(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        move(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(n_single):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        for wb in ("weight", "bias"):
            q, k, v, mlp = sd.pop(f"{b}.linear1.{wb}").split([hidden, hidden, hidden, 4 * hidden])
            out[f"{d}.attn.to_q.{wb}"], out[f"{d}.attn.to_k.{wb}"], out[f"{d}.attn.to_v.{wb}"] = q, k, v
            out[f"{d}.proj_mlp.{wb}"] = mlp
        out[f"{d}.attn.norm_q.weight"] = sd.pop(f"{b}.norm.query_norm.scale")
        out[f"{d}.attn.norm_k.weight"] = sd.pop(f"{b}.norm.key_norm.scale")
        move(f"{b}.modulation.lin", f"{d}.norm.linear")
        move(f"{b}.linear2", f"{d}.proj_out")
    for wb in ("weight", "bias"):  # BFL's final adaLN is (shift, scale), diffusers' (scale, shift)
        shift, scale = sd.pop(f"final_layer.adaLN_modulation.1.{wb}").chunk(2)
        out[f"norm_out.linear.{wb}"] = torch.cat([scale, shift])
    move("final_layer.linear", "proj_out")
    assert not sd, f"BFL keys diffusers does not know: {sorted(sd)[:5]}"
    return out


@pytest.mark.parametrize("guidance", [False, True])
def test_flux_transformer_parity(guidance, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cfg = model.Config(hidden_size=32, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 6, 6),
                       in_channels=16, context_in_dim=24, vec_in_dim=20, dual_time=False,
                       guidance_embed=guidance)
    torch.manual_seed(0)
    src = perturb_(model.MMDiT(cfg), std=0.1)
    save_file({k: v.contiguous() for k, v in src.state_dict().items()},
              str(tmp_path / "flux1-test.safetensors"))
    ours = model.load_flux_transformer(str(tmp_path / "flux1-test.safetensors"), cfg, dtype=torch.float32)
    ref = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                           attention_head_dim=16, num_attention_heads=2,
                                           joint_attention_dim=24, pooled_projection_dim=20,
                                           guidance_embeds=guidance, axes_dims_rope=(4, 6, 6))
    mapped = bfl_to_diffusers(load_file(str(tmp_path / "flux1-test.safetensors")), 2, 2, 32)
    ref.load_state_dict(mapped, strict=True)
    ref.eval()
    g = torch.Generator().manual_seed(4)
    B, h, w, Lt = 2, 3, 4, 5
    img, txt = torch.randn(B, h * w, 16, generator=g), torch.randn(B, Lt, 24, generator=g)
    y = torch.randn(B, 20, generator=g)
    t = torch.tensor([0.3, 0.9])
    gd = torch.tensor([3.5, 1.0]) if guidance else None
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1], img_ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    img_ids, txt_ids = img_ids.view(1, h * w, 3), torch.zeros(1, Lt, 3)
    with torch.no_grad():
        want = ref(hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
                   img_ids=img_ids[0], txt_ids=txt_ids[0], guidance=gd, return_dict=False)[0]
        got = ours(img, img_ids, txt, txt_ids, t, None, y, gd)
    err = maxerr(got, want)
    print(f"FLUX transformer (guidance={guidance}) max abs err {err:.2e}")
    assert err <= TOL


def test_flux_presets():
    for name, guidance, max_len in (("flux-schnell", False, 256), ("flux-dev", True, 512)):
        c = model.CONFIGS[name]
        assert ((c.hidden_size, c.num_heads, c.head_dim, c.depth, c.depth_single_blocks)
                == (3072, 24, 128, 19, 38))
        assert (c.in_channels, c.context_in_dim, c.vec_in_dim, c.axes_dim) == (64, 4096, 768, (16, 56, 56))
        assert (c.dual_time, c.guidance_embed, c.t5_max_len, c.latent, c.tokenizer) == \
            (False, guidance, max_len, "flux-vae", "pretrained")
        with torch.device("meta"):
            n = sum(p.numel() for p in model.MMDiT(c).parameters())
        assert 11.8e9 < n < 12.0e9  # FLUX.1 is "12B": schnell 11.89B, dev 11.90B parameters


# ------------------------------------------------------------------------------------------------------------
# Tokenizers

CORPUS = ["a photo of a red circle to the left of a blue square", "two cats sitting on a sofa, oil painting",
          "The quick brown fox jumps over the lazy dog.",
          "An astronaut riding a horse on Mars, 4k, highly detailed", "café déjà vu: naïve façade",
          "Straße über Größe", "一只猫坐在桌子上", "кошка сидит на столе", "numbers 12345 and 3.14159, 1/2",
          "it's what we'll do; they're here!", "emoji 😀 and symbols #@%*"]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    path = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = " ".join(CORPUS).split()
    lines = CORPUS + [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(path / "spiece"),
                                   vocab_size=128, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, minloglevel=2)
    return str(path / "spiece.model")


def varied_prompts(n, seed):
    """Hundreds of strings: case, punctuation, digits, contractions, accents, CJK, Cyrillic, Arabic, emoji,
    combining marks (NFC and NFD), odd whitespace, long runs."""
    rng = random.Random(seed)
    pieces = ["a", "photo", "of", "cat", "DOG", "Astronaut", "riding", "horse", "café", "naïve", "Straße",
              "ÆØÅ", "İstanbul", "東京", "一只猫", "кошка", "العربية", "ελληνικά", "हिन्दी", "😀", "🐱‍👤", "❤️",
              "2024", "3.14", "½", "²", "Ⅻ", "١٢٣", "it's", "WE'LL", "they're", "I'm", "you've", "he'd",
              "don't", "'S", "!!!", "?", "...", ",", "(x)", "[y]", "{z}", "#tag", "@user", "e-mail", "x_y",
              "a/b", "--", "—", "“quoted”", "'", '"', "~", "$5", "100%", "e\u0301", "n\u0303", "ﬁ", "ＡＢＣ",
              "<tag>", "a&b", "\\", "|", "^", "*"]
    spaces = [" ", " ", " ", "  ", "\t", "\n", "\u3000", "\xa0", "\u2009", " \r\n ", ""]
    out = []
    for _ in range(n):
        k = rng.choice([1, 3, 8, 20, 60])
        out.append("".join(rng.choice(pieces) + rng.choice(spaces) for _ in range(k)))
    return out


def test_t5_tokenizer_against_transformers(spiece):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    # offline: a local folder
    ref = transformers.T5Tokenizer.from_pretrained(os.path.dirname(spiece), extra_ids=0)
    ours = encoders.T5Tokenizer(spiece, max_len=32)
    prompts = CORPUS + varied_prompts(300, seed=1) + [""]
    got = ours(prompts)
    want = torch.tensor(ref(prompts, padding="max_length", max_length=32, truncation=True).input_ids)
    bad = [(p, got[i].tolist(), want[i].tolist()) for i, p in enumerate(prompts)
           if not torch.equal(got[i], want[i])]
    assert not bad, f"{len(bad)} of {len(prompts)} differ, first: {bad[:2]}"
    assert got[0, -1] == 0 and (got == 1).sum(1).eq(1).all()  # padded with 0, one end token 1 each
    # truncation exercised
    assert len(CORPUS) < len(prompts) and any(len(ours.sp.encode(p)) > 31 for p in prompts)


# Special tokens typed in a prompt: transformers' tokenizers (the reference FLUX pipelines use) read them as
# those tokens, matched as written, before any normalisation; a sentinel beyond the tokenizer's count is text.
T5_TYPED = ["a </s> b", "a</s>b", "</s>", "  </s>  ", "<pad>a red circle", "a <unk> b",
            "x <extra_id_0> y <extra_id_99>", "a </S> <PAD>", "café </s>déjà", "<s> a", "a</s></s>b",
            "<extra_id_100> <extra_id_01>"]
# capital sigma, final or not: σ
CLIP_TYPED = ["a <|ENDOFTEXT|> b", "<|EndOfText|>", "a <|endoftext|> b", "a<|endoftext|>b",
              "x <|startoftext|> y", "ΟΔΟΣ ΣΟΦΟΣ.", "οδος", "ΣΣ σ ς Σa aΣ", "İstanbul ΑΣ"]


@pytest.mark.parametrize("extra_ids", [0, 100])
def test_t5_tokenizer_reads_typed_special_tokens_as_transformers_does(spiece, extra_ids):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    ref = transformers.T5Tokenizer.from_pretrained(os.path.dirname(spiece), extra_ids=extra_ids)
    ours = encoders.T5Tokenizer(spiece, max_len=32, extra_ids=extra_ids)
    got = ours(T5_TYPED).tolist()
    want = ref(T5_TYPED, padding="max_length", max_length=32, truncation=True).input_ids
    bad = [(p, g, w) for p, g, w in zip(T5_TYPED, got, want) if g != w]
    assert not bad, f"{len(bad)} of {len(T5_TYPED)} differ, first: {bad[:2]}"
    assert got[0].count(1) == 2 and got[4][0] == 0  # '</s>' and '<pad>' typed are the end and pad tokens
    # <extra_id_0> is the last id when there are sentinels
    assert (max(got[6]) == 128 + 99) == (extra_ids == 100)


def clip_files(folder):
    """vocab.json + merges.txt (HF layout) from the real CLIP vocabulary shipped in open_clip's wheel."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch not installed (pip install --no-deps open_clip_torch)")
    gz = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(encoders.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return str(folder / "vocab.json"), str(folder / "merges.txt"), spec.submodule_search_locations[0]


def open_clip_tokenizer(pkg_dir, monkeypatch):
    """open_clip's SimpleTokenizer (OpenAI's), imported by file path so open_clip/__init__ (and torchvision)
    never loads; ftfy is reduced to its NFC normalisation, the text cleaning we follow."""
    pytest.importorskip("regex")
    monkeypatch.setitem(sys.modules, "ftfy",
                        types.SimpleNamespace(fix_text=lambda s: unicodedata.normalize("NFC", s)))
    spec = importlib.util.spec_from_file_location("open_clip_tokenizer",
                                                  os.path.join(pkg_dir, "tokenizer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


def test_clip_tokenizer_against_openai(tmp_path, monkeypatch):
    vocab, merges, pkg = clip_files(tmp_path)
    ours = encoders.CLIPTokenizer(vocab, merges)
    assert ours(["a photo of a cat"])[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    ref = open_clip_tokenizer(pkg, monkeypatch)
    prompts = CORPUS + varied_prompts(400, seed=2) + ["", "   ", "a" * 300, "word " * 200]
    # OpenAI unescapes HTML entities; transformers and we do not
    prompts = [p for p in prompts if "&" not in p]
    bad = [(p, ours.encode(p), ref.encode(p)) for p in prompts if ours.encode(p) != ref.encode(p)]
    assert not bad, f"{len(bad)} of {len(prompts)} differ, first: {bad[:2]}"
    ids = ours(["word " * 200, ""])
    assert ids.shape == (2, 77) and ids[0, 0] == 49406 and ids[0, 76] == 49407 and ids[0, 75] != 49407
    assert ids[1, :2].tolist() == [49406, 49407] and (ids[1, 2:] == 49407).all()  # padded with the end token


def test_clip_tokenizer_against_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab, merges, _ = clip_files(tmp_path)
    ours = encoders.CLIPTokenizer(vocab, merges)
    ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))  # offline: vocab.json + merges.txt
    prompts = CORPUS + varied_prompts(300, seed=3) + CLIP_TYPED
    want = ref(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(prompts).tolist()
    bad = [(p, g, w) for p, g, w in zip(prompts, got, want) if g != w]
    assert not bad, f"{len(bad)} of {len(prompts)} differ, first: {bad[:2]}"
    assert (ours.eos_id not in ours.encode("a <|ENDOFTEXT|> b")
            and ours.encode("a <|endoftext|> b")[1] == ours.eos_id)
    assert ours.encode("ΣΟΦΟΣ") == ours.encode("σοφοσ") != ours.encode("σοφος")


# ------------------------------------------------------------------------------------------------------------
# A snapshot folder, and bad input: one clear error naming the file and the first offending keys

def test_find_pretrained(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        encoders.find_pretrained(str(tmp_path))
    for want in ("text_encoder_2/model.safetensors.index.json", "text_encoder/model.safetensors",
                 "ae.safetensors", "tokenizer_2/spiece.model", "tokenizer/vocab.json",
                 "tokenizer/merges.txt"):
        assert want in str(e.value)
    for f in ("ae.safetensors", "text_encoder/model.safetensors",
              "text_encoder_2/model.safetensors.index.json", "tokenizer/vocab.json", "tokenizer/merges.txt",
              "tokenizer_2/spiece.model"):
        (tmp_path / f).parent.mkdir(exist_ok=True)
        (tmp_path / f).write_text("")
    parts = encoders.find_pretrained(str(tmp_path))
    assert parts["t5"] == str(tmp_path / "text_encoder_2") and parts["ae"] == str(tmp_path / "ae.safetensors")
    with pytest.raises(FileNotFoundError, match="flux1-schnell.safetensors"):
        encoders.find_pretrained(str(tmp_path), transformer=True)
    (tmp_path / "ae.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        encoders.find_pretrained(str(tmp_path))
    assert "ae.safetensors" in str(e.value) and "spiece" not in str(e.value)


def test_snapshot_folder_end_to_end(t5_ref, clip_ref, ae_ref, spiece, tmp_path):
    """A FLUX-layout folder assembled from the references: find_pretrained's paths feed every
    loader and tokenizer."""
    import shutil
    for (_, src), name in ((t5_ref, "text_encoder_2"), (clip_ref, "text_encoder"), (ae_ref, "vae")):
        shutil.copytree(src, tmp_path / name)
    (tmp_path / "tokenizer_2").mkdir()
    shutil.copy(spiece, tmp_path / "tokenizer_2" / "spiece.model")
    (tmp_path / "tokenizer").mkdir()
    vocab, merges, _ = clip_files(tmp_path / "tokenizer")
    parts = encoders.find_pretrained(str(tmp_path))
    assert parts["ae"].endswith(os.path.join("vae", "diffusion_pytorch_model.safetensors"))
    t5, clip = encoders.load_t5(parts["t5"], torch.float32), encoders.load_clip(parts["clip"], torch.float32)
    ae = encoders.load_autoencoder(parts["ae"], torch.float32)
    # (1, 16), ids < the tiny vocab
    t5_ids = encoders.T5Tokenizer(parts["t5_tokenizer"], 16)(["a red circle"])
    clip_ids = encoders.CLIPTokenizer(parts["clip_vocab"], parts["clip_merges"], max_len=20)(["a red circle"])
    assert t5(t5_ids).shape == (1, 16, 32) and clip_ids.shape == (1, 20)
    assert clip(clip_ids.clamp(max=99))[1].shape == (1, 32)  # the tiny CLIP: 100 ids, 20 positions
    assert ae.decode(ae.encode(torch.zeros(1, 3, 16, 16))).shape == (1, 3, 16, 16)


@pytest.fixture
def ae_file(tmp_path):
    with torch.device("meta"):
        m = encoders.AutoEncoder(encoders.AutoEncoderConfig(ch=32, ch_mult=(1, 2)))
    sd = {k: torch.randn(v.shape) for k, v in m.state_dict().items()}
    return tmp_path / "ae.safetensors", sd, encoders.AutoEncoderConfig(ch=32, ch_mult=(1, 2))


def test_bad_autoencoder_files(ae_file, monkeypatch):
    path, sd, cfg = ae_file
    load = lambda: encoders.load_autoencoder(str(path), config=cfg)
    with pytest.raises(encoders.CheckpointError, match="file not found"):
        load()
    save_file(sd, str(path))
    load()  # the good one loads
    read = []  # nothing may be read before the whole header is checked
    monkeypatch.setattr(encoders, "_read_into", lambda *a: read.append(a))
    renamed = dict(sd)
    renamed["encoder.conv_in.weight_renamed"] = renamed.pop("encoder.conv_in.weight")
    save_file(renamed, str(path))
    with pytest.raises(encoders.CheckpointError) as e:
        load()
    assert "ae.safetensors" in str(e.value) and "encoder.conv_in.weight" in str(e.value) and \
        "encoder.conv_in.weight_renamed" in str(e.value)
    save_file({k: v for k, v in sd.items() if not k.startswith("decoder.")}, str(path))
    with pytest.raises(encoders.CheckpointError, match="missing keys \\['decoder.conv_in.weight'"):
        load()
    save_file({**sd, "decoder.conv_out.weight": torch.randn(3, 32, 1, 1)}, str(path))
    with pytest.raises(encoders.CheckpointError,
                       match="decoder.conv_out.weight: file \\(3, 32, 1, 1\\) vs model"):
        load()
    save_file({**sd, "encoder.conv_in.bias": torch.arange(32)}, str(path))
    with pytest.raises(encoders.CheckpointError, match="encoder.conv_in.bias: I64"):
        load()
    assert not read
    monkeypatch.undo()
    save_file(sd, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(encoders.CheckpointError, match="truncated"):
        load()
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(encoders.CheckpointError, match="not a safetensors file"):
        load()


def test_bad_sharded_t5(t5_ref, tmp_path):
    _, folder = t5_ref
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(encoders.CheckpointError, match=f"shard files missing: \\['{shard.name}'\\]"):
        encoders.load_t5(str(tmp_path))
    with pytest.raises(encoders.CheckpointError, match="T5 config feed_forward_proj='relu'"):
        encoders.t5_config_from_hf({"feed_forward_proj": "relu"})
    cfg = encoders.T5Config(vocab_size=120, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=3,
                         relative_attention_num_buckets=8, relative_attention_max_distance=20)
    with pytest.raises(encoders.CheckpointError,
                       match="wrong shapes \\['encoder.block.0.layer.1.DenseReluDense"):
        encoders.load_t5(str(folder), config=cfg)


def test_load_strict_in_memory():
    m = torch.nn.Linear(3, 2)
    with pytest.raises(encoders.CheckpointError, match="here: cannot load: missing keys \\['bias'\\]"):
        encoders.load_strict(m, {"weight": torch.zeros(2, 3)}, "here")
    with pytest.raises(encoders.CheckpointError, match="wrong dtypes \\['bias: torch.int64'\\]"):
        encoders.load_strict(m, {"weight": torch.zeros(2, 3), "bias": torch.zeros(2, dtype=torch.long)},
                             "here")
    encoders.load_strict(m, {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, "here")
    assert m.weight.sum() == 6
