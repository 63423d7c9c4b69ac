"""The Self-E objective, equation by equation, with the randomness it is defined by (docs/method.md §3-6).

Read top to bottom: the forward process (Eq. 1) and the times a training sample is drawn at (t: s.11-s.12;
s: s.13; caption dropout: A 1), then the objective: the self-evaluation pseudo-target (Eq. 14, s.6), lambda
(Eq. 17), the energy-preserving target (Eq. 19), the pair loss (Eq. 20 or 16), its weight (Eq. 21), the
auxiliary term L_fake (s.8), and plain flow matching (Eq. 3) for the baseline.

`G(x, t, s, cond)` and `G_ema(...)` are callables giving the sample head of Eq. 6 with the current and the EMA
weights; `cond` is a tuple of batch-first tensors (T5 states, CLIP pooled) and `null` the same for phi
(batch 1). Every loss returns per-sample values, computed in fp32, so that train.py can log them by t-bin.
Which samples are self-evaluated, and how the batch is split over devices, is the caller's (train.py).
"""
import math

import torch


# ------------------------------------------------------------------------------------------------------------
# The forward process and the times of a training sample

def forward_process(x0, t, eps):
    """Eq. 1 with (alpha_t, sigma_t) = (1 - t, t): x_t = (1 - t) x_0 + t eps. x0, eps (B, L, C); t (B,)."""
    t = t.view(-1, 1, 1)
    return (1 - t) * x0 + t * eps


def mu_of_length(L, anchor=512, mu_anchor=0.5, mu_4096=1.15):
    """Length-dependent shift (docs/method.md §6): linear in the patch count L, 0.5 at `anchor`
    (paper 512, A 6; minFM/FLUX 256), 1.15 at 4096, extrapolated linearly outside. The sampler's time
    grid is shifted by the same mu (sample.time_grid)."""
    if not 0 < anchor < 4096:
        raise ValueError(f"anchor {anchor}: mu(L) is 0.5 there and 1.15 at 4096 tokens, so it "
                         "must lie in (0, 4096)")
    return mu_anchor + (mu_4096 - mu_anchor) * (L - anchor) / (4096 - anchor)


def warp(t, mu):
    """s.12: t -> e^mu / (e^mu + 1/t - 1), written to be exact at t = 0 and t = 1;
    mu > 0 pushes t toward noise."""
    return math.exp(mu) * t / (math.exp(mu) * t + 1 - t)


def sample_t(n, L, anchor=512, device="cpu", generator=None, uniform=0.0):
    """s.11-s.12: t_raw = sigmoid(z), z ~ N(0, 1), then warped by mu(L). `uniform` > 0 (not in the paper,
    A 25) draws that share of the t from U(0, 1) instead, so that t near 1, where one-step sampling starts,
    is trained at all on a short run: the warped logit-normal puts about 2e-5 of its draws above 0.99 at
    L = 64."""
    t = warp(torch.sigmoid(torch.randn(n, device=device, generator=generator)), mu_of_length(L, anchor))
    if uniform > 0:
        u = torch.rand(2, n, device=device, generator=generator)
        t = torch.where(u[0] < uniform, u[1], t)
    return t


def tau_at(step, tau_steps):
    """s.13: tau anneals linearly from 0 to 1 over the first `tau_steps` iterations (paper: 300k of 710k)."""
    return 1.0 if tau_steps <= 0 else min(1.0, step / tau_steps)


def sample_s(t, tau, p_equal=0.5, force_equal=None, generator=None):
    """s.13: s = t with probability p_equal, else s ~ U((1 - tau) t, t). `force_equal` (B,) bool marks samples
    that must keep s = t (caption-dropped samples under train.py --dropped equal, A 2)."""
    u = torch.rand(2, *t.shape, device=t.device, generator=generator)
    equal = u[0] < p_equal
    if force_equal is not None:
        equal |= force_equal
    s = t - tau * t * u[1]
    return torch.where(equal, t, s)


def caption_dropout(n, p, generator=None):
    """Classifier-free-guidance dropout (A 1: p = 0.1): which of n captions become phi, the empty prompt."""
    return torch.rand(n, generator=generator) < p


# ------------------------------------------------------------------------------------------------------------
# The objective

def per_sample_mse(a, b):
    """Mean squared error over all latent elements of each sample: (B, ...) -> (B,) (A 16)."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def lam(t, s):
    """Eq. 17: lambda_{s,t} = sigma_t/alpha_t - sigma_s/alpha_s = t/(1-t) - s/(1-s); lambda_{t,t} = 0."""
    return t / (1 - t) - s / (1 - s)


def renorm_target(x0, x_self, lam_st, eps=1e-8):
    """Eq. 19: x_renorm = (x0 + lam x_self) / ||x0 + lam x_self|| * ||x0||, norms per sample over the whole
    latent (A 5). Equals x0 when lam = 0."""
    x0, x_self = x0.float(), x_self.float()
    y = x0 + lam_st.view(-1, 1, 1) * x_self
    scale = x0.flatten(1).norm(dim=1) / y.flatten(1).norm(dim=1).clamp_min(eps)
    return y * scale.view(-1, 1, 1)


def fm_weight(t, t_min=1e-3):
    """Eq. 21: w_{s,t} = 1/t^2, t clamped at t_min (A 11). Turns ||G - x0||^2 into the CFM loss (Eq. 3)."""
    return 1.0 / t.clamp_min(t_min).pow(2)


def self_eval_target(G, G_ema, x0_hat, s, cond, null, *, fake=None, k=0.9, eps=None, weight=None):
    """Eq. 14 (and s.6 with the auxiliary term): the pseudo-target x_self of the samples in the batch.

    x0_hat (n, L, C) the generator's samples G(x_t, t, s, c), detached; s (n,) the same s that was fed to the
    generator. The sample is re-noised to level s with fresh noise `eps` (A 3), then evaluated twice without
    gradient: g_c = G_ema(x_s, s, s, c) (S.2: the conditional branch uses the EMA model) and
    g_u = G(x_s, s, s, phi) (current). With `fake` (the c_fake encoding) a third pass
    g_f = G(x_s, s, s, c_fake) runs on the current weights WITH gradient, since it is also L_fake's forward
    (s.8); Delta = k (g_u - g_c) + (1 - k)(sg[g_f] - g_c) (s.6), else g_u - g_c. x_self = x0_hat - Delta, with
    Delta scaled by `weight` (n,) where given (0: x_self = x0_hat, Delta = 0). Returns (x_self, g_f or None).
    """
    x0_hat = x0_hat.detach()
    eps = torch.randn_like(x0_hat) if eps is None else eps
    x_s = forward_process(x0_hat, s, eps)                               # x_s = alpha_s x0_hat + sigma_s eps'
    with torch.no_grad():
        g_c = G_ema(x_s, s, s, cond)
        g_u = G(x_s, s, s, tuple(c.expand(len(s), *c.shape[1:]) for c in null))
    delta = g_u - g_c                                                    # classifier score direction (s.5)
    g_f = None
    if fake is not None:
        g_f = G(x_s, s, s, fake)
        delta = k * delta + (1 - k) * (g_f.detach() - g_c)              # (s.6)
    if weight is not None:
        delta = weight.view(-1, 1, 1) * delta
    return (x0_hat.float() - delta).detach(), g_f


def pair_loss(x0_hat, x0, x_self, lam_st, *, target_norm=True):
    """Per-sample L_{s,t}: Eq. 20 ||x0_hat - x_renorm||^2 with the energy-preserving target (default), or the
    hybrid Eq. 16 ||x0_hat - x0||^2 + lam ||x0_hat - x_self||^2
    (the 'w/o target norm.' ablation of Table 2)."""
    if target_norm:
        return per_sample_mse(x0_hat, renorm_target(x0, x_self, lam_st))
    return per_sample_mse(x0_hat, x0) + lam_st * per_sample_mse(x0_hat, x_self)


def selfe_loss(G, G_ema, x0, t, s, cond, null, *, evaluated=None, weight=None, fake=None, fake_norm=None,
               k=0.9, target_norm=True, t_min=1e-3, fake_weight=1.0, eps=None, eps_self=None):
    """The full objective (Eq. 21): mean over the batch of w_{s,t} L_{s,t}, plus L_fake (s.8) when `fake` is
    given. Returns the scalar `loss` and the per-sample terms by name: `total` (w L, what the loss averages),
    `data` (w ||x0_hat - x0||^2), `self` (||x0_hat - x_self||^2), and the scalar `fake`.

    x0 (B, L, C) clean latent tokens; t, s (B,) with s <= t; `eps`, `eps_self` (B, L, C) the noises of Eq. 1
    and of the re-noising (drawn here if None). Self-evaluation runs on the samples `evaluated` (n,) indexes,
    by default those with s < t (the others with s = t have lambda = 0 and target x0). Every other sample
    has Delta = 0: x_self = sg[x0_hat], so that a sample with s < t that is not evaluated gets Eq. 19's
    renormalised blend of x0 and its own sample (caption-dropped samples, whose classifier score is 0 since
    c = phi, and the Delta = 0 control of train.py --delta-zero). `weight` (n,) is 1 for an evaluated sample;
    a 0 (a sample the caller adds only to fix the passes' batch size) gives it Delta = 0 and no L_fake, as if
    it were not evaluated. `fake` is c_fake's encoding of the evaluated samples; L_fake is the weighted sum
    of their ||g_f - x0_hat||^2 over `fake_norm` (default: the weights' sum).
    """
    eps = torch.randn_like(x0) if eps is None else eps
    x_t = forward_process(x0, t, eps)                                   # Eq. 1
    x0_hat = G(x_t, t, s, cond)                                         # Eq. 6, with gradient
    x_self = x0_hat.detach().float()                                    # Delta = 0 unless evaluated below
    self_term = torch.zeros(len(t), device=x0.device)
    loss_fake = x0.new_zeros(())
    idx = (s < t).nonzero().squeeze(1) if evaluated is None else evaluated
    if len(idx):
        gen = x0_hat[idx].detach()
        x_self_i, g_f = self_eval_target(G, G_ema, gen, s[idx], tuple(c[idx] for c in cond), null, fake=fake,
                                         k=k, eps=None if eps_self is None else eps_self[idx], weight=weight)
        x_self = x_self.index_copy(0, idx, x_self_i)
        self_term = self_term.index_copy(0, idx, per_sample_mse(gen, x_self_i))
        if g_f is not None:  # (s.8): G(sg[x_s], s, s, c_fake) regressed onto sg[x0_hat], weight 1 (A 8)
            w_i = torch.ones(len(idx), device=x0.device) if weight is None else weight
            norm = w_i.sum().clamp_min(1) if fake_norm is None else fake_norm
            loss_fake = fake_weight * (w_i * per_sample_mse(g_f, gen)).sum() / norm
    w = fm_weight(t, t_min)
    total = w * pair_loss(x0_hat, x0, x_self, lam(t, s), target_norm=target_norm)
    return {"loss": total.mean() + loss_fake, "total": total.detach(),
            "data": (w * per_sample_mse(x0_hat, x0)).detach(), "self": self_term, "fake": loss_fake.detach()}


def fm_loss(G, x0, t, cond, *, t_min=1e-3, eps=None):
    """Plain flow matching (Eq. 3) with the same network: s = t, so lambda = 0 and
    w ||G - x0||^2 = ||V - v||^2. Returns the scalar `loss` and the per-sample `total` and `data` (equal)."""
    eps = torch.randn_like(x0) if eps is None else eps
    x_t = forward_process(x0, t, eps)                                   # Eq. 1
    per = fm_weight(t, t_min) * per_sample_mse(G(x_t, t, t, cond), x0)
    return {"loss": per.mean(), "total": per.detach(), "data": per.detach()}
