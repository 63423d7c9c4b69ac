"""The real-frozen-parts path end to end, offline: a FLUX-layout snapshot folder built from small random
reference models (transformers T5 and CLIP, diffusers autoencoder, a trained sentencepiece, the real CLIP
vocabulary) drives `train.py --pretrained`, `sample.py --ckpt`
(which finds the parts through the checkpoint) and `sample.py --size flux-schnell
--pretrained` (a public-layout FLUX transformer through our MMDiT and sampler)."""
import dataclasses
import os
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import model
import sample as sampler
import selfe
import train
from test_parity import clip_files, perturb_, spiece  # noqa: F401  (spiece is a fixture)

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

TINY_PT = model.Config(hidden_size=64, num_heads=4, depth=1, depth_single_blocks=1, axes_dim=(4, 6, 6),
                       in_channels=16 * 4, context_in_dim=32, vec_in_dim=32, resolution=32,
                       latent="flux-vae", patch=2, t5_max_len=16, tokenizer="pretrained", batch=2, steps=2,
                       lr=1e-3, ema_decay=0.9)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory, spiece):  # noqa: F811
    root = tmp_path_factory.mktemp("flux")
    torch.manual_seed(0)
    t5_config = transformers.T5Config(vocab_size=128, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                      feed_forward_proj="gated-gelu")
    t5 = transformers.T5EncoderModel(t5_config)
    perturb_(t5, 0.05).save_pretrained(root / "text_encoder_2", safe_serialization=True,
                                       max_shard_size="20KB")
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(  # the real vocabulary and 77 positions
        vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=77, hidden_act="quick_gelu", eos_token_id=2))
    perturb_(clip, 0.05).save_pretrained(root / "text_encoder", safe_serialization=True)
    ae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                                 up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(32, 64, 64),
                                 layers_per_block=1, latent_channels=16, norm_num_groups=32,
                                 use_quant_conv=False, use_post_quant_conv=False)
    perturb_(ae, 0.02).save_pretrained(root / "vae", safe_serialization=True)
    (root / "tokenizer_2").mkdir()
    shutil.copy(spiece, root / "tokenizer_2" / "spiece.model")
    (root / "tokenizer").mkdir()
    clip_files(root / "tokenizer")
    return root


@pytest.fixture
def presets(monkeypatch):
    monkeypatch.setitem(model.CONFIGS, "test-pt", TINY_PT)
    monkeypatch.setitem(model.CONFIGS, "flux-schnell", dataclasses.replace(
        TINY_PT, dual_time=False, guidance_embed=False, t5_max_len=16))


def test_train_and_sample_with_pretrained_parts(snapshot, presets, tmp_path):
    for i, color in enumerate([(220, 20, 20), (20, 20, 220)]):
        Image.new("RGB", (48, 40), color).save(tmp_path / f"{i}.png")
    (tmp_path / "m.tsv").write_text("0.png\ta red image\n1.png\ta blue image\n")
    out = tmp_path / "run"
    hist = train.main(["--size", "test-pt", "--data", str(tmp_path / "m.tsv"), "--pretrained", str(snapshot),
                       "--steps", "2", "--batch", "2", "--out", str(out), "--sample-every", "0",
                       "--log-every", "1"])
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in hist)
    system, meta = selfe.load_checkpoint(str(out))
    assert system.ae is not None and system.grid == (4, 4)           # 32 px / 4 (this small AE) / patch 2
    x = system.encode_images(torch.zeros(1, 3, 32, 32))
    assert x.shape == (1, 16, 64) and system.decode_tokens(x, 4, 4).shape == (1, 3, 32, 32)
    assert system.encode_text(["a red circle"])[0].shape == (1, 16, 32)
    png = tmp_path / "s.png"
    # parts from the checkpoint
    sampler.main(["--ckpt", str(out), "--steps", "2", "--out", str(png), "a red image"])
    assert Image.open(png).size[0] >= 32


def test_public_flux_transformer_through_our_stack(snapshot, presets, tmp_path):
    folder = tmp_path / "schnell"
    shutil.copytree(snapshot, folder)
    with torch.device("meta"):
        m = model.MMDiT(model.CONFIGS["flux-schnell"])
    m = m.to_empty(device="cpu")
    m.init_weights()
    perturb_(m, 0.05)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()},
              folder / "flux1-schnell.safetensors")
    png = tmp_path / "flux.png"
    sampler.main(["--size", "flux-schnell", "--pretrained", str(folder), "--steps", "2",
                  "--out", str(png), "a cat"])
    assert Image.open(png).size[0] >= 32


def test_missing_parts_are_named(presets, tmp_path):
    with pytest.raises(SystemExit, match="--pretrained"):
        selfe.SelfE(TINY_PT)
    with pytest.raises(FileNotFoundError, match="not a FLUX.1 snapshot"):
        selfe.SelfE(TINY_PT, pretrained=str(tmp_path))
    with pytest.raises(SystemExit, match="needs --pretrained"):
        sampler.main(["--size", "flux-schnell", "a cat"])


def test_previews_when_training_from_a_cache(snapshot, presets, tmp_path, monkeypatch, capsys):
    """The README's 2B path in small: --build-cache stores the preview prompts' encodings, and a run from the
    cache, which loads no text encoder, draws the preview grid the online run draws (it loads the autoencoder
    alone to decode); without one to load it says why it draws none."""
    import encoders
    import numpy as np
    for i, color in enumerate([(220, 20, 20), (20, 20, 220)]):
        Image.new("RGB", (40, 40), color).save(tmp_path / f"{i}.png")
    (tmp_path / "m.tsv").write_text("0.png\ta red image\n1.png\ta blue image\n")
    (tmp_path / "p.txt").write_text("a red image\na blue image\na green image\n")
    common = ["--size", "test-pt", "--steps", "1", "--batch", "2", "--log-every", "1", "--sample-every", "1",
              "--preview-prompts", str(tmp_path / "p.txt")]
    train.main([*common, "--data", str(tmp_path / "m.tsv"), "--pretrained", str(snapshot), "--out",
                str(tmp_path / "online")])
    train.main([*common, "--data", str(tmp_path / "m.tsv"), "--pretrained", str(snapshot), "--build-cache",
                str(tmp_path / "cache")])
    monkeypatch.setattr(encoders, "load_t5", lambda *a, **k: pytest.fail("T5 was loaded"))
    train.main([*common, "--data", str(tmp_path / "cache"), "--pretrained", str(snapshot), "--out",
                str(tmp_path / "cached")])
    online, cached = (np.asarray(Image.open(tmp_path / r / "preview-0000001.png"), dtype=np.int16)
                      for r in ("online", "cached"))
    assert online.shape == cached.shape and np.abs(online - cached).max() <= 1
    capsys.readouterr()
    train.main([*common[:-2], "--data", str(tmp_path / "cache"), "--out", str(tmp_path / "no-ae")])
    assert "previews off: decoding latents needs the autoencoder" in capsys.readouterr().out
    assert not any(n.startswith("preview") for n in os.listdir(tmp_path / "no-ae"))
    with pytest.raises(SystemExit, match=r"holds the encodings of other preview prompts"):
        train.main([*common[:-1], str(tmp_path / "m.tsv"), "--data", str(tmp_path / "cache"), "--out",
                    str(tmp_path / "other")])
