"""The Self-E objective as plain functions, equation by equation (docs/method.md §3-5).

Each function returns per-sample values so train.py can log them by t-bin. Targets and losses are
computed in fp32. `G(x, t, s, cond)` and `G_ema(...)` are callables giving the sample head of Eq. 6 with
current and EMA weights; `cond` is a tuple of batch-first tensors (T5 states, CLIP pooled) and `null`
the same for phi (batch 1); `fake(idx)` encodes c_fake for the samples idx only, so the auxiliary term
costs no text encoding for the rest.
"""
import torch

import selfe


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


def take(cond, idx):
    return tuple(c[idx] for c in cond)


def self_eval_target(G, G_ema, x0_hat, s, cond, null, *, fake=None, k=0.9, eps=None):
    """Eq. 14 (and s.6 with the auxiliary term): the pseudo-target x_self of the samples in the batch.

    x0_hat (n, L, C) the generator's samples G(x_t, t, s, c), detached; s (n,) the same s that was fed to the
    generator. The sample is re-noised to level s with fresh noise (A 3), then evaluated twice without
    gradient: g_c = G_ema(x_s, s, s, c) (S.2: the conditional branch uses the EMA model) and
    g_u = G(x_s, s, s, phi) (current). With `fake` (the c_fake encoding) a third pass
    g_f = G(x_s, s, s, c_fake) runs on the current weights WITH gradient, since it is also L_fake's forward
    (s.8); Delta = k (g_u - g_c) + (1 - k)(sg[g_f] - g_c) (s.6), else g_u - g_c. Returns
    (x_self, g_f or None).
    """
    x0_hat = x0_hat.detach()
    eps = torch.randn_like(x0_hat) if eps is None else eps
    x_s = selfe.forward_process(x0_hat, s, eps)                         # x_s = alpha_s x0_hat + sigma_s eps'
    with torch.no_grad():
        g_c = G_ema(x_s, s, s, cond)
        g_u = G(x_s, s, s, selfe.expand(null, len(s)))
    delta = g_u - g_c                                                    # classifier score direction (s.5)
    g_f = None
    if fake is not None:
        g_f = G(x_s, s, s, fake)
        delta = k * delta + (1 - k) * (g_f.detach() - g_c)              # (s.6)
    return (x0_hat.float() - delta).detach(), g_f


def pair_loss(x0_hat, x0, x_self, lam_st, *, target_norm=True):
    """Per-sample L_{s,t}: Eq. 20 ||x0_hat - x_renorm||^2 with the energy-preserving target (default), or the
    hybrid Eq. 16 ||x0_hat - x0||^2 + lam ||x0_hat - x_self||^2
    (the 'w/o target norm.' ablation of Table 2)."""
    if target_norm:
        return per_sample_mse(x0_hat, renorm_target(x0, x_self, lam_st))
    return per_sample_mse(x0_hat, x0) + lam_st * per_sample_mse(x0_hat, x_self)


def eval_indices(evaluate, eval_size=None):
    """Which samples the evaluation passes run on: those `evaluate` (B,) bool marks, in batch order, then
    (with `eval_size`) unmarked ones as zero-weight padding up to eval_size samples. The same on the host as
    on the device, so a caller can know them without reading the device."""
    if eval_size is None:
        return evaluate.nonzero().squeeze(1)
    return torch.argsort((~evaluate).to(torch.uint8), stable=True)[:eval_size]


def selfe_loss(G, G_ema, x0, t, s, cond, null, *, evaluate=None, eval_size=None, fake=None,
               fake_norm=None, k=0.9, target_norm=True, t_min=1e-3, fake_weight=1.0, fresh_noise=True,
               eps=None, eps_self=None):
    """The full objective (Eq. 21): mean over the batch of w_{s,t} L_{s,t}, plus L_fake
    (s.8) when `fake` is given.

    x0 (B, L, C) clean latent tokens; t, s (B,) with s <= t. Self-evaluation runs only on the samples
    `evaluate` (B,) bool marks, by default those with s < t (the others with s = t have lambda = 0 and target
    x0), so no forward pass is spent on the rest. A sample with s < t that is not evaluated gets Delta = 0:
    x_self = sg[x0_hat], so its target is Eq. 19's renormalised blend of x0 and its own sample
    (caption-dropped samples, whose classifier score is 0 since c = phi, and the Delta = 0 control of train.py
    --delta-zero). `eval_size` fixes how many samples the evaluation passes see: the marked ones first, then
    unmarked ones with weight 0 (nothing of theirs reaches the loss), so the caller, who knows the count,
    fixes the passes' batch size and nothing here waits on the device to learn it
    (train.eval_size chooses it). `eps` and `eps_self` (B, L, C) are the noises of Eq. 1 and of the re-noising
    (drawn here if None). L_fake is a sum over the evaluated samples divided by `fake_norm`, by default their
    number (a caller that splits a batch into parts passes the whole batch's normaliser). Returns a dict of
    the scalar `loss` and per-sample terms by name.
    """
    eps = torch.randn_like(x0) if eps is None else eps
    x_t = selfe.forward_process(x0, t, eps)                             # Eq. 1
    x0_hat = G(x_t, t, s, cond)                                         # Eq. 6, with gradient
    x_self = x0_hat.detach().float()                                    # Delta = 0 (s = t: target x0)
    lam_st = lam(t, s)
    self_term = torch.zeros(len(t), device=x0.device)
    loss_fake = x0.new_zeros(())
    evaluate = (s < t) if evaluate is None else evaluate
    idx = eval_indices(evaluate, eval_size)
    real = evaluate[idx].float()                                        # 0 for padding
    renoise = eps_self if fresh_noise else eps                          # A 3: fresh noise by default
    if len(idx):
        gen = x0_hat[idx].detach()
        x_self_i, g_f = self_eval_target(G, G_ema, gen, s[idx], take(cond, idx), null,
                                         fake=fake(idx) if fake is not None else None, k=k,
                                         eps=None if renoise is None else renoise[idx])
        if g_f is not None:  # (s.8): G(sg[x_s], s, s, c_fake) regressed onto sg[x0_hat], weight 1 (A 8)
            norm = real.sum().clamp_min(1) if fake_norm is None else fake_norm
            loss_fake = fake_weight * (real * per_sample_mse(g_f, gen)).sum() / norm
        self_term[idx] = real * per_sample_mse(gen, x_self_i)
        x_self = x_self.index_copy(0, idx, torch.where(real.bool().view(-1, 1, 1), x_self_i, x_self[idx]))
    per_pair = pair_loss(x0_hat, x0, x_self, lam_st, target_norm=target_norm)
    w = fm_weight(t, t_min)
    loss = (w * per_pair).mean() + loss_fake
    return {"loss": loss, "per_sample": (w * per_pair).detach(),
            "data": (w * per_sample_mse(x0_hat, x0)).detach(), "self": self_term, "lam": lam_st,
            "selfeval": (s < t), "fake": loss_fake.detach()}


def fm_loss(G, x0, t, cond, *, t_min=1e-3, eps=None):
    """Plain flow matching (Eq. 3) with the same network: s = t, so lambda = 0 and
    w ||G - x0||^2 = ||V - v||^2."""
    eps = torch.randn_like(x0) if eps is None else eps
    x_t = selfe.forward_process(x0, t, eps)                             # Eq. 1
    per = fm_weight(t, t_min) * per_sample_mse(G(x_t, t, t, cond), x0)
    return {"loss": per.mean(), "per_sample": per.detach(), "data": per.detach()}

