"""The method, held against the paper: losses (Eqs. 14-21, S.1 Results 1-2), the denoiser, the sampler
(docs/method.md §7), training and checkpoints, the shapes world, and bad input. CPU only, tiny shapes."""
import argparse
import json
import math
import os
import shutil

import pytest
import torch

import cli
import data
import encoders
import losses
import model
import sample as sampler
import selfe
import train


# ------------------------------------------------------------------------------------------------------------
# helpers

def toy_heads(seed=0):
    """A differentiable stand-in for G with parameters (a, b), and an EMA copy with other values: lets a test
    compute the exact gradient the paper predicts and compare it with autograd through losses.py."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(3, generator=g).requires_grad_(), torch.randn(3, generator=g).requires_grad_()
    a_e, b_e = torch.randn(3, generator=g), torch.randn(3, generator=g)

    def head(a, b):
        return lambda x, t, s, cond: x * a + cond[0] * b + (t - s).view(-1, 1, 1) * 0.3 + s.view(-1, 1, 1)
    return head(a, b), head(a_e, b_e), (a, b)


def batch(B=4, L=6, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, L, C, generator=g)
    cond = (torch.randn(B, L, C, generator=g),)
    null = (torch.randn(1, L, C, generator=g),)
    fake = (torch.randn(B, L, C, generator=g),)
    return x0, cond, null, fake


def tiny_system(seed=0, nonzero=True):
    torch.manual_seed(seed)
    system = selfe.SelfE(model.CONFIGS["tiny"], frozen_seed=seed)
    # adaLN-Zero makes a fresh model output 0 everywhere: perturb so the tests see a real function
    if nonzero:
        with torch.no_grad():
            for p in system.denoiser.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return system


# ------------------------------------------------------------------------------------------------------------
# losses

def test_lambda_and_weight():
    t = torch.tensor([0.5, 0.8, 0.9, 0.99, 0.3])
    s = torch.tensor([0.0, 0.4, 0.0, 0.0, 0.3])
    # docs/method.md §5.2 table
    torch.testing.assert_close(losses.lam(t, s), torch.tensor([1.0, 10 / 3, 9.0, 99.0, 0.0]))
    torch.testing.assert_close(losses.fm_weight(torch.tensor([0.5, 0.0])), torch.tensor([4.0, 1e6]))


def test_normalized_target_has_energy_of_x0_and_is_x0_when_s_equals_t():
    x0, cond, _, _ = batch()
    x_self = torch.randn_like(x0) * 3
    lam_st = torch.tensor([0.0, 0.5, 2.0, 50.0])
    tgt = losses.renorm_target(x0, x_self, lam_st)
    torch.testing.assert_close(tgt.flatten(1).norm(dim=1), x0.flatten(1).norm(dim=1))
    torch.testing.assert_close(tgt[0], x0[0])
    # direction is that of x0 + lam x_self (Eq. 19)
    y = x0 + lam_st.view(-1, 1, 1) * x_self
    cos = torch.nn.functional.cosine_similarity(tgt.flatten(1), y.flatten(1))
    torch.testing.assert_close(cos, torch.ones(4))


def _expected_grads(G, G_ema, params, x0, t, s, cond, null, fake, k, target_norm):
    """Replays selfe_loss's random draws and builds the loss whose gradient the paper predicts, by hand."""
    torch.manual_seed(123)
    eps = torch.randn_like(x0)
    x_t = (1 - t.view(-1, 1, 1)) * x0 + t.view(-1, 1, 1) * eps
    x0_hat = G(x_t, t, s, cond)
    idx = (s < t).nonzero().squeeze(1)
    gen = x0_hat[idx].detach()
    eps2 = torch.randn_like(gen)
    s_i = s[idx]
    x_s = (1 - s_i.view(-1, 1, 1)) * gen + s_i.view(-1, 1, 1) * eps2
    g_c = G_ema(x_s, s_i, s_i, tuple(c[idx] for c in cond)).detach()
    g_u = G(x_s, s_i, s_i, tuple(c.expand(len(idx), -1, -1) for c in null)).detach()
    delta = g_u - g_c
    l_fake = 0
    if fake is not None:
        g_f = G(x_s, s_i, s_i, tuple(c[idx] for c in fake))
        delta = k * delta + (1 - k) * (g_f.detach() - g_c)
        l_fake = (g_f - gen).pow(2).flatten(1).mean(1).mean()
    lam = losses.lam(t, s)
    w = 1 / t.pow(2)
    N = x0[0].numel()
    # d/dx0_hat of w [ ||x0_hat - x0||^2 + lam ||x0_hat - x_self||^2 ] / N; the self part
    # is 2 lam Delta (S.1 Result 1-2)
    d_self = torch.zeros_like(x0_hat)
    d_self[idx] = lam[idx].view(-1, 1, 1) * 2 * delta
    grad_x0_hat = (w.view(-1, 1, 1) / N) * (2 * (x0_hat.detach() - x0) + d_self) / len(t)
    surrogate = (grad_x0_hat * x0_hat).sum() + l_fake
    return torch.autograd.grad(surrogate, params), grad_x0_hat


@pytest.mark.parametrize("aux", [False, True])
def test_self_evaluation_gradient_is_classifier_score(aux):
    """Eq. 16 form: the gradient w.r.t. x0_hat of lam ||x0_hat - x_self||^2 is 2 lam
    (G(x_s,s,s,phi) - G_ema(x_s,s,s,c)) (S.1 Result 1), or 2 lam times the k-mixture of s.6 with the auxiliary
    term (Result 2); nothing else reaches the parameters through the evaluation passes, and L_fake trains only
    the fake-prompt pass (s.8)."""
    G, G_ema, params = toy_heads()
    x0, cond, null, fake = batch()
    t = torch.tensor([0.9, 0.7, 0.5, 0.3])
    s = torch.tensor([0.5, 0.7, 0.2, 0.3])  # samples 0 and 2 self-evaluate
    torch.manual_seed(123)
    idx = (s < t).nonzero().squeeze(1)
    fake_i = tuple(c[idx] for c in fake) if aux else None
    out = losses.selfe_loss(G, G_ema, x0, t, s, cond, null, fake=fake_i, k=0.9, target_norm=False)
    got = torch.autograd.grad(out["loss"], params)
    want, _ = _expected_grads(G, G_ema, params, x0, t, s, cond, null, fake if aux else None, 0.9, False)
    for g_, w_ in zip(got, want):
        torch.testing.assert_close(g_, w_, rtol=1e-5, atol=1e-6)
    assert (out["self"] > 0).tolist() == [True, False, True, False]          # the samples with s < t


def test_self_eval_target_uses_ema_for_conditional_and_current_for_unconditional():
    G, G_ema, _ = toy_heads()
    x0, cond, null, _ = batch(B=2)
    s = torch.tensor([0.4, 0.6])
    eps = torch.randn_like(x0)
    x_self, g_f = losses.self_eval_target(G, G_ema, x0, s, cond, null, eps=eps)
    x_s = (1 - s.view(-1, 1, 1)) * x0 + s.view(-1, 1, 1) * eps
    assert g_f is None
    g_u = G(x_s, s, s, (null[0].expand(2, -1, -1),))
    g_c = G_ema(x_s, s, s, cond)
    torch.testing.assert_close(x_self, (x0 - (g_u - g_c)).detach())
    assert not x_self.requires_grad


def test_s_equals_t_is_exactly_flow_matching():
    """With s = t, lambda = 0 and w = 1/t^2 turns ||G - x0||^2 into the velocity loss
    ||V - (eps - x0)||^2 (Eq. 3, 7)."""
    system = tiny_system()
    h, w = system.grid
    x0 = system.encode_images(data.shapes_batch(data.WORLDS["small"], range(4))[0])
    cond = system.encode_text(["a red circle", "", "a photo of two squares", "a blue square"])
    t = torch.tensor([0.2, 0.5, 0.7, 0.95])
    G = lambda x, t_, s_, c: system.predict(system.denoiser, x, t_, s_, c, h, w)
    torch.manual_seed(5)
    out = losses.selfe_loss(G, G, x0, t, t.clone(), cond, system.null_cond())
    torch.manual_seed(5)
    eps = torch.randn_like(x0)
    x_t = losses.forward_process(x0, t, eps)
    v = system.velocity(system.denoiser, x_t, t, t, cond, h, w)
    want = (v - (eps - x0)).pow(2).flatten(1).mean(1).mean()
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    torch.manual_seed(5)
    torch.testing.assert_close(losses.fm_loss(G, x0, t, cond)["loss"], want, rtol=1e-5, atol=1e-6)


def test_evaluation_passes_run_only_on_samples_that_need_them():
    calls = []
    G0, G_ema0, _ = toy_heads()

    def G(x, t, s, c):
        calls.append(("G", len(x), torch.is_grad_enabled()))
        return G0(x, t, s, c)

    def G_ema(x, t, s, c):
        calls.append(("ema", len(x), torch.is_grad_enabled()))
        return G_ema0(x, t, s, c)
    x0, cond, null, _ = batch(B=4)
    t = torch.tensor([0.9, 0.7, 0.5, 0.3])
    losses.selfe_loss(G, G_ema, x0, t, torch.tensor([0.5, 0.7, 0.5, 0.3]), cond, null)
    assert calls == [("G", 4, True), ("ema", 1, False), ("G", 1, False)]
    calls.clear()
    losses.selfe_loss(G, G_ema, x0, t, t.clone(), cond, null)  # all s = t: no evaluation pass at all
    assert calls == [("G", 4, True)]


def test_time_sampling():
    torch.manual_seed(0)
    assert abs(losses.mu_of_length(512) - 0.5) < 1e-9 and abs(losses.mu_of_length(4096) - 1.15) < 1e-9
    assert abs(losses.mu_of_length(1024) - 0.5929) < 1e-3                     # docs/method.md §6
    assert abs(losses.mu_of_length(256, anchor=256) - 0.5) < 1e-9
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    mu = 0.7
    torch.testing.assert_close(losses.warp(t, mu)[1:3], math.exp(mu) / (math.exp(mu) + 1 / t[1:3] - 1))
    assert losses.warp(t, mu)[0] == 0 and losses.warp(t, mu)[-1] == 1
    t = losses.sample_t(20000, 1024)
    assert 0 < t.min() and t.max() < 1 and t.median() > 0.5  # mu > 0 pushes toward noise
    s = losses.sample_s(t, tau=0.5, p_equal=0.5)
    assert (s <= t).all() and (s >= 0.5 * t - 1e-6).all()
    assert abs((s == t).float().mean().item() - 0.5) < 0.02
    forced = torch.zeros(len(t), dtype=torch.bool)
    forced[:100] = True
    assert (losses.sample_s(t, 1.0, 0.5, forced)[:100] == t[:100]).all()   # dropped captions keep s = t
    assert (losses.sample_s(t, 0.0) == t).all()                        # tau = 0: s = t (self-eval fades in)
    assert losses.tau_at(150, 300) == 0.5 and losses.tau_at(900, 300) == 1.0
    # --t-uniform: the paper's draws unchanged at 0; a share p from U(0, 1) puts about p/100 of t above 0.99
    g = lambda: torch.Generator().manual_seed(3)
    paper = losses.sample_t(1000, 64, generator=g())
    torch.testing.assert_close(losses.sample_t(1000, 64, generator=g(), uniform=0.0), paper)
    t = losses.sample_t(200_000, 64, generator=g(), uniform=0.2)
    assert (losses.sample_t(200_000, 64, generator=g()) > 0.99).float().mean() < 1e-4
    assert abs((t > 0.99).float().mean().item() - 0.002) < 5e-4 and 0 <= t.min() and t.max() < 1


# ------------------------------------------------------------------------------------------------------------
# the denoiser

@pytest.mark.parametrize("size,target", [("2b", 2.2e9), ("0.5b", 0.55e9)])
def test_preset_parameter_counts(size, target):
    with torch.device("meta"):
        m = model.MMDiT(model.CONFIGS[size])
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - target) / target < 0.10, n


def test_s_enters_only_through_the_gap():
    system = tiny_system()
    m = system.denoiser
    B, h, w = 3, *system.grid
    x = torch.randn(B, h * w, m.cfg.in_channels)
    cond = system.encode_text(["a", "b", "c"])
    t = torch.tensor([0.9, 0.6, 0.3])
    seen = []
    hook = m.s_in.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    system.velocity(m, x, t, t * 0.5, cond, h, w)
    hook.remove()
    torch.testing.assert_close(seen[0], model.timestep_embedding(t - t * 0.5))
    a = system.velocity(m, x, t, t * 0.5, cond, h, w)
    b = system.velocity(m, x, t, t * 0.2, cond, h, w)
    assert (a - b).abs().max() > 1e-4  # s matters...
    with torch.no_grad():
        m.s_in.out_layer.weight.zero_()
        m.s_in.out_layer.bias.zero_()
    a = system.velocity(m, x, t, t * 0.5, cond, h, w)
    b = system.velocity(m, x, t, t * 0.2, cond, h, w)
    torch.testing.assert_close(a, b)  # ...and only through MLP_s


def test_rope_scores_depend_only_on_relative_position():
    emb = model.EmbedND(10_000, (4, 6, 6))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    ids = torch.randint(0, 20, (1, 5, 3), generator=g).float()
    scores = lambda ids: model.apply_rope(q, emb(ids)) @ model.apply_rope(k, emb(ids)).transpose(-1, -2)
    torch.testing.assert_close(scores(ids), scores(ids + torch.tensor([3.0, -7.0, 11.0])),
                               rtol=1e-4, atol=1e-4)
    assert (scores(ids) - scores(ids * 2)).abs().max() > 1e-2


def test_fresh_model_is_identity_blocks_and_zero_velocity():
    system = tiny_system(nonzero=False)
    h, w = system.grid
    v = system.velocity(system.denoiser, torch.randn(2, h * w, 48), torch.rand(2), torch.rand(2) * 0.1,
                        system.encode_text(["x", "y"]), h, w)
    assert v.abs().max() == 0


# ------------------------------------------------------------------------------------------------------------
# the sampler

def test_time_grid_runs_from_one_to_zero():
    for n in (1, 2, 4, 8, 50):
        ts = sampler.time_grid(n, 1024)
        assert len(ts) == n + 1 and ts[0] == 1 and ts[-1] == 0 and (ts[1:] < ts[:-1]).all()
    # docs/method.md §7.1 table
    torch.testing.assert_close(sampler.time_grid(4, 1024),
                               torch.tensor([1, 0.844, 0.644, 0.376, 0]), atol=1e-3, rtol=0)
    ts = sampler.time_grid(4, 64)
    torch.testing.assert_close(sampler.second_times(ts, "next"), ts[1:])
    torch.testing.assert_close(sampler.second_times(ts, "current"), ts[:-1])
    torch.testing.assert_close(sampler.second_times(sampler.time_grid(1, 64), "0.5"), torch.tensor([0.5]))
    with pytest.raises(ValueError):
        sampler.second_times(ts, "1.5")


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_n_steps_make_n_calls_per_branch(guidance):
    system = tiny_system()
    calls = []
    hook = system.denoiser.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    sampler.sample(system, ["a red circle", "a blue square"], steps=3, guidance=guidance, net=system.denoiser)
    hook.remove()
    assert calls == [2 if guidance == 1 else 4] * 3  # both guidance branches in one batched call per step


def test_eta_zero_with_current_s_is_euler():
    system = tiny_system()
    h, w = system.grid
    prompts = ["a photo of a red circle"]
    got = sampler.sample(system, prompts, steps=3, guidance=1.0, eta=0.0, s_schedule="current", seeds=[7],
                         net=system.denoiser)
    x = torch.randn(h * w, 48, generator=torch.Generator().manual_seed(7))[None]
    ts = sampler.time_grid(3, h * w)
    cond = system.encode_text(prompts)
    with torch.no_grad():
        for k in range(3):
            t = ts[k].view(1)
            v = system.velocity(system.denoiser, x, t, t, cond, h, w)
            x = x + (ts[k + 1] - ts[k]) * v  # Eq. 22
    torch.testing.assert_close(got, system.decode_tokens(x, h, w), rtol=1e-4, atol=1e-5)


def test_ep_cfg_keeps_conditional_energy():
    vc, vu = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    v = sampler.ep_cfg(vc, vu, 5.0)
    torch.testing.assert_close(v.flatten(1).norm(dim=1), vc.flatten(1).norm(dim=1))
    torch.testing.assert_close(sampler.ep_cfg(vc, vu, 1.0), vc)


def test_fixed_seed_reproduces_the_image_whatever_the_batch():
    system = tiny_system()
    a = sampler.sample(system, ["a red circle", "a blue square"], steps=2, seeds=[3, 4],
                       net=system.denoiser)
    b = sampler.sample(system, ["a blue square"], steps=2, seeds=[4], net=system.denoiser)
    c = sampler.sample(system, ["a red circle", "a blue square"], steps=2, seeds=[3, 5],
                       net=system.denoiser)
    torch.testing.assert_close(a[1:], b)
    assert (a[1] - c[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------------
# training and checkpoints

def test_loss_falls_on_a_fixed_batch():
    system = tiny_system(nonzero=False)
    system.make_ema()
    h, w = system.grid
    images, captions = data.shapes_batch(data.WORLDS["small"], range(8))
    x0, cond = system.encode_images(images), system.encode_text(captions)
    opt = torch.optim.Adam(system.denoiser.parameters(), lr=2e-3)
    G = lambda x, t, s, c: system.predict(system.denoiser, x, t, s, c, h, w)
    G_ema = lambda x, t, s, c: system.predict(system.ema, x, t, s, c, h, w)
    hist = []
    for i in range(40):
        torch.manual_seed(0)  # the same t, s and noise every step: only the weights change
        t = losses.sample_t(8, h * w)
        s = losses.sample_s(t, 1.0)
        loss = losses.selfe_loss(G, G_ema, x0, t, s, cond, system.null_cond())["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        system.update_ema(0.9, i)
        hist.append(loss.item())
    assert hist[-1] < 0.5 * hist[0], hist


def _train(out, *extra):
    return train.main(["--steps", "4", "--batch", "4", "--log-every", "1", "--ckpt-every", "2",
                       "--sample-every", "0", "--out", str(out), *extra])


def test_resume_continues_exactly(tmp_path):
    """Kill after step 2 (simulated by pointing `latest` at the step-2 checkpoint), resume: steps 3-4 match,
    with the tau anneal and the auxiliary term (from step 3 of 4) active."""
    full = _train(tmp_path / "a", "--batch", "8")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "latest").write_text("step-0000002\n")
    resumed = _train(tmp_path / "b", "--resume", "--batch", "8")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7), (a, b)
    assert max(r["fake"] for r in full[2:]) > 0  # the auxiliary term was on
    meta = json.loads((tmp_path / "a" / "step-0000004" / "config.json").read_text())
    assert meta["step"] == 4 and meta["flags"]["batch"] == 8
    assert sorted(os.listdir(tmp_path / "a")) == ["latest", "log.jsonl", "step-0000002", "step-0000004"]
    assert sorted(os.listdir(tmp_path / "a" / "step-0000004")) == ["config.json", "dcp", "ema.safetensors",
                                                                   "frozen.safetensors"]


def test_checkpoint_roundtrip_through_sample_cli(tmp_path, capsys):
    _train(tmp_path / "run", "--objective", "fm")
    system, meta = selfe.load_checkpoint(str(tmp_path / "run"))
    assert meta["flags"]["objective"] == "fm"
    out = tmp_path / "grid.png"
    sampler.main(["--ckpt", str(tmp_path / "run"), "--sweep", "1,2", "--out", str(out),
                  "a red circle", "a square"])
    from PIL import Image
    assert Image.open(out).size[0] > 2 * 32


def test_preset_fields_set_by_flag_are_saved_and_sampled_from(tmp_path):
    """--set changes fields of the preset: the network trained has them, config.json keeps them, and
    sample.py rebuilds that network from the checkpoint; a change that cannot make a network is refused as a
    flag error before any work."""
    _train(tmp_path / "run", "--set", "theta=100", "--set", "mlp_ratio=2")
    system, meta = selfe.load_checkpoint(str(tmp_path / "run"))
    assert system.cfg.theta == 100 and system.cfg.mlp_ratio == 2
    assert system.denoiser.single_blocks[0].mlp_hidden == 2 * system.cfg.hidden_size
    sampler.main(["--ckpt", str(tmp_path / "run"), "--steps", "1", "--out", str(tmp_path / "s.png"),
                  "a circle"])
    for bad in ("num_heads=5", "patch=2", "colour=red", "theta=ten"):
        with pytest.raises(SystemExit) as e:
            train.get_args(["--set", bad])
        assert e.value.code == 2


def test_nonfinite_loss_stops_and_saves(tmp_path, monkeypatch):
    real = losses.selfe_loss

    def broken(*a, **k):
        out = real(*a, **k)
        out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(losses, "selfe_loss", broken)
    with pytest.raises(SystemExit, match="nonfinite-step-0"):
        _train(tmp_path / "run")
    assert (tmp_path / "run" / "nonfinite-step-0" / "latest").exists()
    assert any((tmp_path / "run" / "nonfinite-step-0").rglob("batch.pt"))


# ------------------------------------------------------------------------------------------------------------
# bad input

def test_unknown_preset_lists_choices(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--size", "huge"])
    assert "tiny" in capsys.readouterr().err


def test_missing_checkpoint_says_where_and_how(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(sampler.main, ["--ckpt", str(tmp_path / "nope"), "a red circle"])
    err = capsys.readouterr().err
    assert e.value.code == 1 and str(tmp_path / "nope") in err and "python train.py" in err, err


def test_bad_sweep():
    with pytest.raises(argparse.ArgumentTypeError, match="step counts like"):
        cli.step_counts("1,x")
    with pytest.raises(argparse.ArgumentTypeError, match=r"integers in \[1, 1000\]"):
        cli.step_counts("0,2")


def test_long_prompt_truncates_with_warning(capsys):
    ids = encoders.WordTokenizer(data.WORDS, 16)(["a red circle " * 10])
    assert ids.shape == (1, 16) and ids[0, -1] == encoders.WordTokenizer.eos_id
    assert "truncated" in capsys.readouterr().err


def test_checkpoint_of_the_byte_level_tiny_preset_is_named(tmp_path):
    _train(tmp_path / "run", "--objective", "fm")
    step = tmp_path / "run" / "step-0000004"
    meta = json.loads((step / "config.json").read_text())
    meta["config"]["tokenizer"] = "bytes"
    (step / "config.json").write_text(json.dumps(meta))
    with pytest.raises(encoders.CheckpointError, match="stand-in encoders read bytes.*python train.py"):
        selfe.load_checkpoint(str(tmp_path / "run"))


def test_word_tokenizer_round_trips_captions_and_encodes_any_prompt():
    """The tiny preset's stand-in tokenizer: one id per word of every world's captions
    (round trip exact, all inside the word vocabulary, within the preset's text length); anything else still
    encodes, through hashed buckets."""
    cfg = model.CONFIGS["tiny"]
    tok = encoders.WordTokenizer(data.WORDS, cfg.t5_max_len)
    n_words = 3 + len(data.WORDS)
    assert tok.vocab_size == cfg.t5.vocab_size == cfg.clip.vocab_size
    for world in data.WORLDS.values():
        for i in range(500):
            prompt = data.sample_spec(world, data.sample_rng(0, i))["prompt"]
            ids = tok.encode(prompt)
            assert tok.decode(ids) == prompt and max(ids) < n_words, prompt
            if world.name == cfg.world:  # the preset's own captions fit both framings untruncated
                assert len(ids) <= min(cfg.t5_max_len - 1, cfg.clip.max_position_embeddings - 2), prompt
    assert tok.encode("A RED Circle!") == tok.encode("a red circle") + tok.encode("!")
    crimson, scarlet = tok.encode("a crimson circle"), tok.encode("a scarlet circle")
    assert (n_words <= crimson[1] < tok.vocab_size and crimson == tok.encode("a crimson circle")
            and crimson != scarlet)
    odd = ["", "   ", "\U0001f600 emoji", "a\tred\ncircle", "über straße",
           "<pad> </s> <|endoftext|>", "1234", "_"]
    for framing in ("pad-end", "start-end"):
        ids = encoders.WordTokenizer(data.WORDS, 16, framing)(odd)
        assert ids.shape == (len(odd), 16) and 0 <= ids.min() and ids.max() < tok.vocab_size
        # every row has its end token (CLIP pools there)
        assert (ids == encoders.WordTokenizer.eos_id).any(1).all()
    txt, vec = tiny_system().encode_text(odd)
    assert torch.isfinite(txt).all() and torch.isfinite(vec).all()


class LetterCounts(torch.nn.Module):
    """Another text conditioner, with no T5 and no CLIP: each prompt's letter counts, projected."""

    def __init__(self, cfg):
        super().__init__()
        self.tokens = torch.nn.Linear(26, cfg.context_in_dim, bias=False)
        self.pooled = torch.nn.Linear(26, cfg.vec_in_dim, bias=False)
        self.Lt, self.seen = cfg.t5_max_len, []

    def forward(self, prompts):
        self.seen += prompts
        counts = torch.tensor([[p.lower().count(chr(97 + i)) for i in range(26)] for p in prompts],
                              dtype=torch.float)
        return self.tokens(counts)[:, None].expand(-1, self.Lt, -1), self.pooled(counts)


def test_the_text_encoders_are_one_seam():
    """Swapping the text encoder is one assignment: a system whose `text` is another conditioner encodes,
    guides (phi through it, not the stand-ins' cached phi) and samples through it alone, and its encodings
    reach the denoiser."""
    system = tiny_system()
    images = sampler.sample(system, ["a red circle", "two blue squares"], steps=2, guidance=2.0)
    system.text = LetterCounts(system.cfg)
    with torch.no_grad():
        other = sampler.sample(system, ["a red circle", "two blue squares"], steps=2, guidance=2.0)
    assert system.text.seen == ["a red circle", "two blue squares", selfe.NULL_PROMPT]
    assert torch.isfinite(other).all() and other.shape == images.shape
    assert not torch.equal(other, images)                # the new encodings, not the stand-ins', conditioned
    txt, vec = system.encode_text(["ab"])
    assert txt.shape == (1, system.cfg.t5_max_len, system.cfg.context_in_dim)
    assert vec.shape == (1, system.cfg.vec_in_dim)


def test_typed_captions_keep_the_facts_in_the_worlds_words():
    """A typed caption names the same objects, colours, counts and relation (or its converse, subject and
    reference swapped) as the template caption, in words the stand-in tokenizer knows; the scenes of a
    training batch do not depend on how their captions are worded."""
    world = data.WORLDS["small"]
    tok = encoders.WordTokenizer(data.WORDS, 64)
    seen = {"casing": 0, "punctuation": 0, "one": 0, "opening": 0, "converse": 0, "order": 0}
    for i in range(400):
        rng = data.sample_rng(5, i)
        spec = data.sample_spec(world, rng)
        text = data.typed_caption(spec, rng, model.CONFIGS["tiny"].prompt_words)
        words = encoders.WordTokenizer.words(text)
        assert len(words) <= model.CONFIGS["tiny"].prompt_words, text          # nothing cut off
        assert max(tok.encode(text)) < 3 + len(data.WORDS), text              # no unknown word
        named = lambda ws: sorted(w for w in ws if w in data.PALETTE or w in data.PLURAL
                                  or w in data.PLURAL.values() or w in data.NUMBERS.values())
        assert named(words) == named(encoders.WordTokenizer.words(spec["prompt"])), (spec["prompt"], text)
        for clause in spec["include"]:
            if "position" in clause:
                rel = clause["position"][0].split()[0]
                assert rel in words or data.CONVERSE[clause["position"][0]].split()[0] in words, text
        seen["casing"] += text != text.lower()
        seen["punctuation"] += text[-1] in ".!?"
        seen["one"] += "one" in words
        seen["opening"] += text.lower().startswith(("an image of", "a picture of"))
        objects = [w for w in words if w in data.PLURAL]
        template = [w for w in encoders.WordTokenizer.words(spec["prompt"]) if w in data.PLURAL]
        seen["order" if len(set(template)) > 1 and "position" not in str(spec) else "converse"] += (
            len(template) > 1 and objects != template)
    assert all(n >= 10 for n in seen.values()), seen
    plain, typed = data.shapes_batch(world, range(32), 0), data.shapes_batch(world, range(32), 0, typed=0.5)
    assert torch.equal(plain[0], typed[0]) and plain[1] != typed[1]
    assert sum(a == b for a, b in zip(plain[1], typed[1])) >= 8                # about half kept as templates


def test_typed_captions_leave_room_for_the_fake_prefix(tmp_path, capsys):
    """The auxiliary term encodes c_fake = prefix + caption: training's typed captions are short enough that
    the prefixed caption is not truncated either (every caption typed, the auxiliary term from step 1)."""
    train.main(["--steps", "3", "--batch", "16", "--typed", "1", "--aux-start-frac", "0", "--tau-frac", "0",
                "--log-every", "1", "--ckpt-every", "3", "--sample-every", "0", "--world", "small",
                "--out", str(tmp_path / "run")])
    printed = capsys.readouterr()
    assert "truncated" not in printed.out + printed.err


def test_cpu_threads_leave_busy_cores_alone(monkeypatch):
    """One thread per core not already busy: two on two idle cores, one when another job keeps a core busy,
    and at least one; a --threads flag wins; torchrun's processes on one machine share the idle cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    threads = torch.get_num_threads()
    try:
        for load, want in ((0.1, 2), (0.9, 1), (1.2, 1), (5.0, 1)):
            monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
            assert cli.cpu_threads() == want == torch.get_num_threads(), load
        assert cli.cpu_threads(3) == 3
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert cli.cpu_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_manifest_errors_name_file_and_line(tmp_path):
    from PIL import Image
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    m = tmp_path / "m.tsv"
    m.write_text("ok.png\ta red image\nno tab here\nmissing.png\tgone\nbad.png\tbroken\n")
    with pytest.raises(data.ManifestError, match=r"m\.tsv:2: expected"):
        data.read_manifest(str(m))
    entries = data.read_manifest(str(m), skip_bad=True)
    assert [e[2] for e in entries] == [1, 4]
    m.write_text("ok.png\ta red image\nbad.png\tbroken\n")
    with pytest.raises(data.ManifestError, match=r"m\.tsv:2: cannot read image"):
        data.ManifestData(str(m), [32], 8, 1)
    src = data.ManifestData(str(m), [32], 8, 1, skip_bad=True)
    assert len(src) == 1
    images, captions = src.batch(src.indices(0))
    assert images.shape == (1, 3, 24, 40) and captions == ["a red image"]  # 40 x 30 -> the 40 x 24 bucket
    assert images[0, 0].mean() > 0.5 and images[0, 1].mean() < -0.5  # red, in [-1, 1]


# ------------------------------------------------------------------------------------------------------------
# the shapes world

def test_samples_depend_only_on_seed_and_index():
    world = data.WORLDS["small"]
    a, ca = data.shapes_batch(world, [5, 6, 7], seed=1)
    b, cb = data.shapes_batch(world, [7], seed=1)
    torch.testing.assert_close(a[2:], b)
    assert ca[2:] == cb
    c, _ = data.shapes_batch(world, [7], seed=2)
    assert (b - c).abs().max() > 0


@pytest.mark.parametrize("name", ["small", "full"])
def test_training_stream_covers_tasks_and_never_shows_heldout_pairs(name):
    world = data.WORLDS[name]
    tasks = set()
    for i in range(1500):
        rng = data.sample_rng(0, i)
        spec = data.sample_spec(world, rng)
        tasks.add(spec["tag"])
        objects = data.layout(spec, world, rng)
        for shape, color, box in objects:
            assert (color, shape) not in world.heldout, spec
            assert 0 <= box[0] and box[2] <= world.resolution
        for clause in spec["include"]:
            assert (clause.get("color"), clause["class"]) not in world.heldout
            if "position" in clause:
                i_a = spec["include"].index(clause)
                assert data.relations(objects[i_a][2],
                                      objects[clause["position"][1]][2]) == {clause["position"][0]}
        n = sum(c["count"] for c in spec["include"])
        assert len(objects) == n
    assert tasks == set(data.TASKS) | {"free"}


def test_heldout_prompts_name_a_heldout_pair():
    world = data.WORLDS["full"]
    for i in range(200):
        spec = data.sample_spec(world, data.sample_rng(9, i), task="color_attr", seen=False)
        assert any((c.get("color"), c["class"]) in world.heldout for c in spec["include"])
