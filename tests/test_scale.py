"""The paper-scale path, proven on CPU: bf16 under FSDP2 (2 processes on gloo against 1), t, s and RoPE kept
in fp32, a compile that stays compiled, a step that runs on another device type, the memory plan against
measured memory, the benchmark, the cache builder, and bad
input (a batch that cannot fit, a compile that fails, a non-finite step)."""
import collections
import dataclasses
import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bench
import memory
import data
import losses
import model
import sample as sampler
import selfe
import train
from test_distributed import ARGS, ROOT, assert_same_run, assert_same_weights, make_manifest, run, weights


@pytest.fixture
def one_rank_group():
    """A one-rank gloo process group in this process (what train.py makes for bf16 without torchrun)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def perturbed(net, seed=0):
    """Past adaLN-Zero's zero init, so every block contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


# ------------------------------------------------------------------------------------------------------------
# bf16

def test_bf16_two_processes_match_one(tmp_path):
    """bf16 is FSDP2's mixed precision in 1 process too, so at the same
    micro-batch (8 = 4 x 1 rank x 2 micro-steps and 4 x 2 ranks) every bf16 product is the same and only the
    fp32 gradient reduction's order differs: the same run within 1e-5, every logged term and the EMA. Against
    fp32 the bf16 run stays within 1% (stated tolerance)."""
    one = run(tmp_path / "one", "--precision", "bf16", "--accum", "2")
    two = run(tmp_path / "two", "--precision", "bf16", procs=2)
    assert_same_run(one, two, tol=1e-5)
    assert_same_weights(weights(tmp_path / "one", 4), weights(tmp_path / "two", 4), tol=1e-5)
    assert max(r["fake"] for r in one) > 0 and max(r["frac_s_lt_t"] for r in one) > 0  # every term ran
    fp32 = run(tmp_path / "fp32")
    assert_same_run(fp32, one, tol=1e-2)


def test_two_bf16_runs_in_one_process_each_save_their_checkpoints(tmp_path):
    """A bf16 run makes its own process group (one rank) and the checkpoint's gloo groups on it; the end of
    the run lets both go, writer thread joined, so a second run in the same process saves through groups of
    its own process group, not the destroyed ones of the first."""
    args = ["--steps", "2", "--batch", "4", "--log-every", "1", "--ckpt-every", "1", "--sample-every", "0",
            "--precision", "bf16"]
    for name in ("a", "b"):
        train.main([*args, "--out", str(tmp_path / name)])
        assert not dist.is_initialized() and train._groups is None and train._writer is None
        assert open(tmp_path / name / "latest").read().strip() == "step-0000002"


@pytest.mark.filterwarnings("ignore:.*returned a view tensor")
def test_time_inputs_reach_the_embedding_and_rope_in_fp32_under_fsdp(one_rank_group):
    """Hooks after FSDP's own: the network under FSDP2 bf16 sees t and s in fp32, its time MLPs get the
    sinusoids of the fp32 times (then cast), and every block gets the fp32 rotations.
    (FSDP's cast would turn t = 0.33944 into 0.33984 and a gap t - s of 1e-3 into another one.)"""
    torch.manual_seed(0)
    cfg = model.CONFIGS["tiny"]
    net = perturbed(model.MMDiT(cfg))
    ids, txt_ids = selfe.image_ids(8, 8), torch.zeros(1, 16, 3)
    pe = net.pe_embedder(torch.cat((txt_ids, ids), 1))                   # fp32, before any sharding
    train.parallelize(net, train.get_args(["--precision", "bf16"]))
    seen = {"pe": []}
    net.register_forward_pre_hook(lambda m, a: seen.update(t=a[4], s=a[5]))
    net.time_in.register_forward_pre_hook(lambda m, a: seen.update(e_t=a[0]))
    net.s_in.register_forward_pre_hook(lambda m, a: seen.update(e_s=a[0]))
    for block in [*net.double_blocks, *net.single_blocks]:
        block.register_forward_pre_hook(lambda m, a: seen["pe"].append(a[-1]))
    t = torch.tensor([0.33944, 0.9])
    s = t - torch.tensor([1e-3, 0.5])
    v = net(torch.randn(2, 64, cfg.in_channels), ids, torch.randn(2, 16, cfg.context_in_dim), txt_ids, t, s,
            torch.randn(2, cfg.vec_in_dim))
    assert v.dtype == torch.bfloat16                                       # it does compute in bf16
    assert seen["t"].dtype == seen["s"].dtype == torch.float32 and torch.equal(seen["t"], t)
    assert torch.equal(seen["e_t"], model.timestep_embedding(t).bfloat16())
    assert torch.equal(seen["e_s"], model.timestep_embedding(t - s).bfloat16())
    assert len(seen["pe"]) == 4 and all(p.dtype == torch.float32 and torch.equal(p, pe) for p in seen["pe"])


def test_a_bf16_transformer_samples_in_one_process():
    """sample.py with a bf16 denoiser (a public FLUX.1 transformer on GPU): the network
    casts its own inputs."""
    torch.manual_seed(0)
    system = selfe.SelfE(model.CONFIGS["tiny"])
    perturbed(system.denoiser)
    prompts = ["a red circle", "a photo of two squares"]
    want = sampler.sample(system, prompts, 2, seeds=[0, 1], net=system.denoiser)
    system.denoiser.to(torch.bfloat16)
    got = sampler.sample(system, prompts, 2, seeds=[0, 1], net=system.denoiser)
    assert got.dtype == torch.float32 and (got - want).abs().mean() < 0.01, (got - want).abs().mean()


# ------------------------------------------------------------------------------------------------------------
# torch.compile

def test_compile_stays_compiled_over_self_e_steps_with_buckets(tmp_path, monkeypatch):
    """6 Self-E steps on two aspect-ratio buckets: evaluation sub-batches of every size (1 is padded to 2),
    the auxiliary pass from step 4, the EMA's pass beside the model's. Dynamo
    (its eager backend: the counters are the same, the test is fast) compiles each block kind once per grad
    mode and never again; hitting its recompile limit would stop the run."""
    from torch._dynamo.utils import counters
    manifest = make_manifest(tmp_path, [(64, 32), (40, 40)], 8)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    lengths = []
    real = losses.sample_t
    monkeypatch.setattr(losses, "sample_t", lambda n, L, *a, **k: lengths.append(L) or real(n, L, *a, **k))
    try:
        log = train.main([*ARGS, "--steps", "6", "--data", manifest, "--compile", "--out",
                          str(tmp_path / "run")])
        graphs = dict(counters["stats"])["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert len(set(lengths)) == 2 and max(r["fake"] for r in log) > 0  # both buckets, the auxiliary term
    # {double, single block} x {with grad, without}: no recompile for sizes, buckets or the EMA
    assert graphs == 4


def test_compile_failure_is_named_and_falls_back_only_when_asked(tmp_path, monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("no C++ compiler here")
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=broken))
    torch._dynamo.reset()
    try:
        with pytest.raises(SystemExit,
                           match=r"--compile: torch\.compile failed .*no C\+\+ compiler.*fallback"):
            train.main([*ARGS, "--steps", "1", "--compile", "--out", str(tmp_path / "a")])
        torch._dynamo.reset()
        log = train.main([*ARGS, "--steps", "2", "--compile", "--compile-fallback", "--out",
                          str(tmp_path / "b")])
    finally:
        torch._dynamo.reset()
    assert [r["step"] for r in log] == [1, 2]


# ------------------------------------------------------------------------------------------------------------
# a step on another device type, and the non-finite stop

@pytest.mark.parametrize("objective", ["fm", "selfe"])
def test_a_training_step_runs_on_another_device_type(objective):
    """train.objective on the meta device (no memory, the way a GPU is not the CPU): nothing in the step makes
    a tensor on the CPU behind the caller's back (the FM path once stacked a CPU zero with device tensors)."""
    cfg = model.CONFIGS["tiny"]
    with torch.device("meta"):
        net = model.MMDiT(cfg)
        x0 = torch.randn(4, 64, cfg.in_channels)
        eps, eps_self = torch.randn(4, 64, 48), torch.randn(4, 64, 48)
        cond = (torch.randn(4, 16, cfg.context_in_dim), torch.randn(4, cfg.vec_in_dim))
        t = torch.rand(4)
    ids, txt_ids = selfe.image_ids(8, 8, "meta"), torch.zeros(1, 16, 3, device="meta")
    G = lambda x, t_, s_, c: selfe.g_head(x, t_, net(x, ids, c[0], txt_ids, t_, s_, c[1]).float())
    args = train.get_args(["--objective", objective])
    idx, weight = train.evaluated(torch.tensor([True, False, True, False]), 4, 1, False)   # on the host
    loss, terms = train.objective(args, G, G, x0, t, t * 0.5, cond, tuple(c[:1] for c in cond),
                                  fake=tuple(c[idx.to("meta")] for c in cond), eps=eps, eps_self=eps_self,
                                  evaluated=idx.to("meta"), weight=weight.to("meta"), fake_norm=2)
    loss.backward()
    assert loss.device.type == "meta" and list(terms) == list(train.TERMS)
    assert all(v.device.type == "meta" and v.shape == (4,) for v in terms.values())


def test_nonfinite_step_is_skipped_and_saved_at_the_next_read(tmp_path, monkeypatch):
    """A NaN loss at step 0, read back only at step 2 (--log-every 3, checkpoint at 2): Adam
    skipped that update and the ones after it on the device, so the saved weights are the initial
    ones, with step 0's batch."""
    real = losses.selfe_loss

    def broken(*a, **k):
        out = real(*a, **k)
        out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(losses, "selfe_loss", broken)
    with pytest.raises(SystemExit, match="step 0: loss nan.*nonfinite-step-0"):
        train.main([*ARGS, "--log-every", "3", "--out", str(tmp_path / "run")])
    torch.manual_seed(0)
    initial = selfe.SelfE(model.CONFIGS["tiny"]).denoiser.state_dict()
    saved, _ = selfe.load_checkpoint(str(tmp_path / "run" / "nonfinite-step-0"), weights="model")
    assert_same_weights(initial, saved.denoiser.state_dict(), tol=1e-12)
    batch = torch.load(tmp_path / "run" / "nonfinite-step-0" / "batch.pt")
    assert batch["items"] == list(range(8)) and batch["t"].shape == (8,)


# ------------------------------------------------------------------------------------------------------------
# the memory plan and the fit check

MEASURE = '''
import os, sys, torch
import memory, model
torch.set_num_threads(1)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
cfg, ckpt, out = model.CONFIGS["tiny"], sys.argv[1] == "1", {}
for b in (4, 16, 4, 16):  # the first pair warms kernels and buffers up
    forward = memory.training_forward(cfg, b, cfg.resolution, torch.float32, ckpt, "selfe", "cpu")
    before = rss()
    loss = forward()
    out[b] = rss() - before
    loss.backward()
    del loss, forward
print(out[16] - out[4])
'''


@pytest.mark.parametrize("act_ckpt", [False, True])
def test_memory_plan_activations_match_measured_memory(act_ckpt):
    """The plan counts a step's activations on the meta device. Measured: the resident memory a real CPU
    forward adds, with glibc told to map every allocation of 16 KiB or more on its own
    (so a free returns it at once), at micro-batch 16 minus
    micro-batch 4 (what does not scale with the batch cancels). Within 5%."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-c", MEASURE, str(int(act_ckpt))], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    measured = int(p.stdout.split()[-1])
    cfg = model.CONFIGS["tiny"]
    plan = [memory.step_activations(cfg, b, cfg.resolution, torch.float32, act_ckpt, "selfe")
            for b in (4, 16)]
    assert plan[1] - plan[0] == pytest.approx(measured, rel=0.05)


def test_memory_plan_prints_its_table(capsys):
    plans = bench.main(["--plan", "--size", "tiny", "--micro-batch", "8", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "| activations |" in out and "| total |" in out
    no_ckpt, ckpt = plans
    assert ckpt["activations"] < no_ckpt["activations"] / 4 and ckpt["block recomputed in backward"] > 0
    n = sum(p.numel() for p in model.MMDiT(model.CONFIGS["tiny"]).parameters())
    assert no_ckpt["parameters"] == no_ckpt["EMA"] == 4 * n and no_ckpt["Adam moments"] == 8 * n
    sharded = memory.memory_plan(model.CONFIGS["tiny"], 8, 32, world=4, precision="bf16")
    assert sharded["parameters"] == n and sharded["gathered weights"] > 0


def test_a_batch_that_cannot_fit_stops_before_any_weight_is_built(monkeypatch):
    def built(*a, **k):
        raise AssertionError("a weight was built")
    monkeypatch.setattr(selfe, "SelfE", built)
    with pytest.raises(SystemExit,
                       match=r"--batch 64 on 1 device.*needs .* GiB by the memory plan.*fits with "
                       r"--accum \d+ .* or --act-ckpt"):
        train.main([*ARGS, "--batch", "64", "--accum", "1", "--memory-gib", "0.25"])
    with pytest.raises(SystemExit, match="nothing fits"):
        train.main([*ARGS, "--memory-gib", "0.01"])
    cfg = model.CONFIGS["tiny"]
    need = lambda b: memory.memory_plan(cfg, b, 32, 1, False, "fp32")["total"] / 2 ** 30
    args = train.get_args([*ARGS, "--batch", "64", "--memory-gib",
                           str((need(16) + need(32)) / 2 / train.FIT)])
    # the fewest micro-steps that fit: micro-batch 16 fits, 32 does not
    assert train.choose_accum(args, 1) == 4


# ------------------------------------------------------------------------------------------------------------
# the benchmark

def test_benchmark_prints_each_row_as_measured_and_survives_an_oom(capsys, monkeypatch):
    real = bench.measure
    said = []

    def measure(fn, iters, device):
        said.append(capsys.readouterr().out)  # what was printed before this row started
        if len(said) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(fn, iters, device)
    monkeypatch.setattr(bench, "measure", measure)
    rows = bench.main(["--size", "tiny", "--micro-batch", "4", "--iters", "1", "--compile", "off"])
    assert [r[3] for r in rows] == ["denoiser fwd+bwd", "FM step", "Self-E step", "Self-E step + aux"]
    assert "| 32^2 | 64 | no | FM step |" in said[2]                     # printed before the next row ran
    assert rows[2][4] is None and "| Self-E step | OOM |" in said[3]
    assert all(r[4][0] > 0 and r[4][1] > 0 for r in rows if r[4])


# ------------------------------------------------------------------------------------------------------------
# data and the cache builder

def test_cache_builder_builds_no_denoiser_and_encodes_in_its_own_batches(tmp_path, monkeypatch):
    manifest = make_manifest(tmp_path, [(40, 40)], 10)
    monkeypatch.setattr(model, "MMDiT", None)                            # building a denoiser would fail
    sizes = []
    real = selfe.SelfE.encode_latents
    monkeypatch.setattr(selfe.SelfE, "encode_latents", lambda self, x: sizes.append(len(x)) or real(self, x))
    train.main(["--data", manifest, "--build-cache", str(tmp_path / "cache"), "--cache-batch", "3"])
    assert sizes == [3, 3, 3, 1] and data.is_cache(str(tmp_path / "cache"))


def test_manifest_images_decode_in_threads_off_the_training_thread(tmp_path, monkeypatch):
    import threading
    manifest = make_manifest(tmp_path, [(48, 32), (40, 40)], 6)
    one, four = data.ManifestData(manifest, [32], 8, 4), data.ManifestData(manifest, [32], 8, 4, workers=4)
    a, b = one.batch(one.indices(1)), four.batch(four.indices(1))
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    threads = set()
    real = data.ShapesData.batch
    monkeypatch.setattr(data.ShapesData, "batch", lambda self, i: threads.add(threading.current_thread()) or
                        real(self, i))
    train.main([*ARGS, "--steps", "2", "--out", str(tmp_path / "run")])
    assert threading.main_thread() not in threads                  # read a step ahead, on the prefetch thread


# ------------------------------------------------------------------------------------------------------------
# the GPU path's second review (docs/scaling.md): compile with checkpointing, host syncs, one device's casts,
# the EMA's record of forwards, non-finite steps, bench weights, the plan's parts, bf16 sampling

@pytest.mark.filterwarnings("ignore:.*returned a view tensor")
def test_compile_with_activation_checkpointing_runs_under_fsdp_with_inductor(one_rank_group):
    """--compile --act-ckpt under FSDP2 bf16 with the real inductor backend, on the smallest network that has
    the block where it failed (one single-stream block), at two batch sizes (one graph with symbolic sizes):
    the gradients are those of the uncompiled network (within bf16's rounding)."""
    cfg = dataclasses.replace(model.CONFIGS["tiny"], depth=0, depth_single_blocks=1)
    torch.manual_seed(0)
    nets = [perturbed(model.MMDiT(cfg))]
    nets.append(model.MMDiT(cfg))
    nets[1].load_state_dict(nets[0].state_dict())
    for net, flags in zip(nets, (["--compile", "--act-ckpt"], ["--act-ckpt"])):
        train.parallelize(net, train.get_args(["--precision", "bf16", *flags]))
    args = train.get_args(["--precision", "bf16", "--compile", "--act-ckpt"])
    torch._dynamo.reset()
    grads = []
    try:
        with train.compile_config(args), train.compile_errors(args):
            for net in nets:
                for b in (3, 2):
                    g = torch.Generator().manual_seed(b)
                    x = torch.randn(b, 64, cfg.in_channels, generator=g)
                    txt = torch.randn(b, 16, cfg.context_in_dim, generator=g)
                    t = torch.rand(b, generator=g)
                    v = net(x, selfe.image_ids(8, 8), txt, torch.zeros(1, 16, 3), t, t * 0.5,
                            torch.randn(b, cfg.vec_in_dim, generator=g))
                    v.float().square().mean().backward()
                selfe.reshard(net)                                      # as train.update does
                grads.append(torch.cat([p.grad.full_tensor().flatten() for p in net.parameters()]))
    finally:
        torch._dynamo.reset()
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=0.05, atol=2e-3)


class HostSyncs(TorchDispatchMode):
    """Counts what makes the host wait on the device: reading a value (item, bool), copying to the CPU
    (tolist), an output whose size depends on values (nonzero). On the meta device, where nothing can be
    read, the reads get zeros and the step goes on."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        off_cpu = any(isinstance(a, torch.Tensor) and a.device.type != "cpu" for a in tree_leaves(args))
        aten = torch.ops.aten
        if off_cpu and func is aten._local_scalar_dense.default:
            self.syncs.append(func)
            return 0
        if off_cpu and func is aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            self.syncs.append(func)
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if off_cpu and func in (aten.nonzero.default, aten.masked_select.default):
            self.syncs.append(func)
        return func(*args, **kwargs)


def test_an_online_step_with_the_auxiliary_term_never_waits_on_the_device():
    """A training step's batch, objective (every pass, L_fake's c_fake encoded online from the captions) and
    backward on the meta device, the way a GPU is not the CPU: no operation makes the host wait on the
    device (c_fake's prompts are chosen on the host, by selfe_loss's own rule)."""
    torch.manual_seed(0)
    system = selfe.SelfE(model.CONFIGS["tiny"], "meta")
    source = data.ShapesData(data.WORLDS["small"], 8, seed=0)
    part = source.batch(source.indices(0)[:4])
    args = train.get_args(ARGS)
    dropped = torch.tensor([False, True, False, False])
    t, s = torch.rand(4), torch.rand(4) * 0.5
    evaluate = (s < t) & ~dropped
    idx, weight = train.evaluated(evaluate, 4, 1, False)
    with HostSyncs() as mode:
        h, w = train.token_grid(part, system, False)
        x0, cond, fake = train.load_batch(part, source, system, dropped, args.fake_prefix, False)
        G = functools.partial(system.predict, system.denoiser, h=h, w=w)
        eps = torch.randn(4, 2, *x0.shape[1:], device="meta")
        loss, terms = train.objective(args, G, G, x0, t.to("meta"), s.to("meta"), cond, system.null_cond(),
                                      fake=fake(idx), eps=eps[:, 0], eps_self=eps[:, 1],
                                      evaluated=idx.to("meta"), weight=weight.to("meta"), fake_norm=len(idx))
        loss.backward()
    assert all(v.shape == (4,) for v in terms.values()) and mode.syncs == []


def test_one_device_casts_the_weights_once_per_step(tmp_path, monkeypatch):
    """bf16 in one process (a one-rank FSDP2 group): over a Self-E step with the auxiliary term and 2
    micro-steps, the trained model's fp32 weights are cast to bf16 once (each pass of the step shares the
    cast), and the EMA's once per micro-step (its one pass there)."""
    masters, casts, per_step = [], collections.Counter(), []   # the storages of each net's sharded weights
    real_parallelize, real_update = train.parallelize, train.update

    def parallelize(*a, **k):
        net = real_parallelize(*a, **k)
        masters.append({p.to_local().untyped_storage().data_ptr() for p in net.parameters()})
        return net

    def update(*a, **k):
        per_step.append(dict(casts))
        casts.clear()
        return real_update(*a, **k)
    monkeypatch.setattr(train, "parallelize", parallelize)
    monkeypatch.setattr(train, "update", update)

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16:
                ptr = args[0].untyped_storage().data_ptr()
                for name, master in zip(("model", "ema"), masters):
                    casts[name] += ptr in master
            return func(*args, **kwargs)
    with Casts():
        train.main([*ARGS, "--steps", "2", "--aux-start-frac", "0", "--precision", "bf16", "--accum", "2",
                    "--out", str(tmp_path)])
    n = len(masters[0])
    assert per_step == [{"model": n, "ema": 2 * n}] * 2


@pytest.mark.filterwarnings("ignore:.*returned a view tensor")
@pytest.mark.parametrize("torch_2_11", [False, True])
def test_the_ema_keeps_no_record_of_its_forwards(one_rank_group, monkeypatch, torch_2_11):
    """The EMA under FSDP2 runs forward only; FSDP2 records each forward for a backward that never comes.
    After 100 warm-up passes, 200 more add less than 12 KB of Python memory (traced by tracemalloc; the
    record grew by about 47 KB over them at the tiny preset's 5 shard groups). Also by the path torch 2.11
    takes."""
    import tracemalloc
    from torch.distributed.fsdp import FSDPModule
    if torch_2_11:
        monkeypatch.delattr(FSDPModule, "reset_iter_state", raising=False)
    torch.manual_seed(0)
    system = selfe.SelfE(model.CONFIGS["tiny"])
    system.make_ema()
    train.parallelize(system.ema, train.get_args(["--precision", "bf16"]), ema=True)
    x, cond, t = torch.randn(2, 64, 48), system.null_cond(2), torch.rand(2)
    traced = []
    tracemalloc.start()
    try:
        with torch.no_grad():
            for i in range(300):
                system.predict(system.ema, x, t, t, cond, 8, 8)
                if i in (99, 299):
                    traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert traced[1] - traced[0] < 12_000, traced


def nan_at_steps(monkeypatch, steps):
    """The Self-E loss is NaN at these steps (counted from 0). -> the list of steps begun, in order."""
    real_draw, real_loss, step_of = train.draw, losses.selfe_loss, []

    def draw(args, step, *a):
        step_of.append(step)
        return real_draw(args, step, *a)

    def broken(*a, **k):
        out = real_loss(*a, **k)
        if step_of[-1] in steps:
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(train, "draw", draw)
    monkeypatch.setattr(losses, "selfe_loss", broken)
    return step_of


def test_a_nonfinite_step_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    """One step (index 1) with a NaN loss: its update is skipped on the device (Adam's state and the
    weights stay as they were after step 0), the log marks it, and the run finishes."""
    nan_at_steps(monkeypatch, {1})
    states = []
    real_update = train.update
    monkeypatch.setattr(train, "update", lambda model, *a: (lambda out: states.append(
        {k: v.full_tensor().clone() if hasattr(v, "full_tensor") else v.clone()
         for k, v in model.state_dict().items()}) or out)(real_update(model, *a)))
    log = train.main([*ARGS, "--out", str(tmp_path / "run")])
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r.get("skipped", False) for r in log] == [
        False, True, False, False]
    assert_same_weights(states[0], states[1], tol=1e-12)                  # step 1 changed nothing
    assert not torch.equal(states[1]["img_in.weight"], states[2]["img_in.weight"])


def test_consecutive_nonfinite_steps_stop_and_a_resume_goes_past_them(tmp_path, monkeypatch):
    """NaN at steps 1-3 with --max-skips 3: the run stops at the read after step 3 with the weights from
    before step 1; --resume (from the checkpoint after step 2, whose weights are those too) goes on at
    step 4 instead of replaying the batches that led to the failure."""
    step_of = nan_at_steps(monkeypatch, {1, 2, 3})
    run_dir = tmp_path / "run"
    flags = [*ARGS, "--steps", "6", "--ckpt-every", "3", "--out", str(run_dir)]
    with pytest.raises(SystemExit, match=r"step 1: loss nan.*3 steps in a row.*nonfinite-step-1.*--resume "
                                         r"goes on at step 4"):
        train.main(flags)
    assert selfe.resolve_checkpoint(str(run_dir)).endswith("step-0000003")
    before = weights(run_dir / "nonfinite-step-1", 1, "model")              # saved at the stop
    assert_same_weights(weights(run_dir, 3, "model"), before, tol=1e-12)
    step_of.clear()
    log = train.main([*flags, "--resume"])
    assert step_of[0] == 4 and [r["step"] for r in log] == [5, 6]


def test_bench_weights_are_not_zero():
    """bench.py's network and EMA are trained-like: after one forward+backward every parameter of every
    block has a non-zero gradient (adaLN-Zero's zero init would leave them all zero), and the EMA equals the
    weights."""
    targs = train.get_args(["--size", "tiny", "--device", "cpu", "--precision", "fp32", "--seed", "0"])
    system, net, ema, opt, _ = bench.setup(targs)
    cfg = system.cfg
    x, cond, t = torch.randn(2, 64, cfg.in_channels), system.null_cond(2), torch.rand(2)
    system.velocity(net, x, t, t * 0.5, cond, 8, 8).float().square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ema.state_dict().values()))


def test_the_plan_counts_the_auxiliary_pass_only_where_it_runs(tmp_path, monkeypatch):
    """--memory-gib between what a micro-batch of 8 needs before the auxiliary term and with it: the run
    takes 1 micro-step before it and 2 with it (its log line says so), and follows the same trajectory as the
    run with one micro-step throughout."""
    cfg = model.CONFIGS["tiny"]
    need = lambda aux: memory.memory_plan(cfg, 8, 32, 1, False, "fp32", aux=aux, frozen=True)["total"]
    assert need(False) < need(True)
    gib = (need(False) + need(True)) / 2 / train.FIT / 2 ** 30
    lines = []
    monkeypatch.setattr(train, "log0", lambda *a, rank=0: lines.append(" ".join(map(str, a))))
    log = train.main([*ARGS, "--memory-gib", str(gib), "--out", str(tmp_path / "fit")])
    assert "(= 8 x 1 ranks x 1 accum then 4 x 1 ranks x 2 accum)" in lines[0]
    assert_same_run(train.main([*ARGS, "--out", str(tmp_path / "one")]), log)


MEASURE_KEPT_GRADIENT = '''
import dataclasses, os, torch, torch.distributed as dist
import model, selfe, train
torch.set_num_threads(1)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
cfg = dataclasses.replace(model.CONFIGS["tiny"], hidden_size=256, num_heads=4, axes_dim=(8, 28, 28))
torch.manual_seed(0)
net = train.parallelize(model.MMDiT(cfg), train.get_args(["--precision", "bf16"]))
x, txt, t = torch.randn(2, 64, cfg.in_channels), torch.randn(2, 16, cfg.context_in_dim), torch.rand(2)
vec = torch.randn(2, cfg.vec_in_dim)
step = lambda: net(x, selfe.image_ids(8, 8), txt, torch.zeros(1, 16, 3), t, t, vec).float().sum()
for sync in (True, False):  # the first warms kernels and buffers up
    net.set_requires_gradient_sync(sync)
    before = rss()
    step().backward()
    selfe.reshard(net)
    kept = rss() - before
    for p in net.parameters():
        p.grad = None
print(kept)
'''


def test_the_plan_counts_the_full_gradient_fsdp_keeps_over_micro_steps():
    """A micro-step without gradient reduction (train.py's on N ranks before the last one): what FSDP2 then
    keeps, measured as the resident memory it adds (glibc mapping each allocation of 16 KiB or more on its
    own), is the plan's gradient on 2 ranks with 2 micro-steps: a full-size fp32 one, within 5%."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-c", MEASURE_KEPT_GRADIENT], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = dataclasses.replace(model.CONFIGS["tiny"], hidden_size=256, num_heads=4, axes_dim=(8, 28, 28))
    plan = memory.memory_plan(cfg, 2, 32, world=2, accum=2)
    kept = plan["gradients"] + plan["gradient kept over micro-steps"]
    assert int(p.stdout.split()[-1]) == pytest.approx(kept, rel=0.05)
    assert memory.memory_plan(cfg, 2, 32, world=2, accum=1)["gradient kept over micro-steps"] == 0


MEASURE_ENCODING = '''
import os, torch
import model, selfe
torch.set_num_threads(1)
field = lambda name: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(name))
system, out = selfe.SelfE(model.CONFIGS["tiny"]), {}
for b in (256, 1024, 256, 1024):  # the first pair warms up
    prompts = ["a photo of a red circle to the left of a blue square"] * b
    ids = system.text.tokenize(prompts)
    before = field("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the high-water mark from here
    y = system.text.encode(*ids)                   # T5, then CLIP while T5's states are held
    out[b] = field("VmHWM") - before
    del y
print(out[1024] - out[256])
'''


def test_the_plan_counts_the_frozen_parts_training_online_holds():
    """Online training holds the frozen encoders, and while they encode a micro-batch, their temporaries:
    the plan's weights are the built encoders' bytes, and its encoding peak (on the meta device) matches the
    peak resident memory the text conditioner's T5 and CLIP add on the CPU (VmHWM, at micro-batch 1024
    minus 256), within 10%."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "16384", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-c", MEASURE_ENCODING], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = model.CONFIGS["tiny"]
    peak = lambda b: memory.encoding_peak(cfg, b, 32, "fp32")
    assert peak(1024) - peak(256) == pytest.approx(int(p.stdout.split()[-1]), rel=0.1)
    system = selfe.SelfE(cfg)
    held = sum(p.numel() * p.element_size() for p in system.text.parameters())
    plan = memory.memory_plan(cfg, 8, 32, precision="fp32", frozen=True)
    assert plan["frozen parts"] == held
    assert memory.memory_plan(cfg, 8, 32, precision="fp32")["frozen parts"] == 0     # training from a cache
    assert plan["total"] >= sum(v for k, v in plan.items() if k not in ("total", "frozen parts encoding"))


def test_a_checkpoint_samples_in_bf16_off_the_cpu(tmp_path):
    """sample.py and evaluate.py load the EMA through selfe.load_checkpoint: cast to bf16 on an accelerator
    (selfe.inference_dtype), fp32 on the CPU; a bf16 load samples as the fp32 one does, within bf16's
    rounding."""
    assert selfe.inference_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert selfe.inference_dtype("cpu") == torch.float32
    torch.manual_seed(0)
    system = selfe.SelfE(model.CONFIGS["tiny"])
    perturbed(system.make_ema())
    train.save_checkpoint(str(tmp_path), system, 1, {"seed": 0, "objective": "selfe"})
    fp32, _ = selfe.load_checkpoint(str(tmp_path))
    bf16, _ = selfe.load_checkpoint(str(tmp_path), dtype=torch.bfloat16)
    assert next(fp32.denoiser.parameters()).dtype == torch.float32
    assert next(bf16.denoiser.parameters()).dtype == torch.bfloat16
    images = [sampler.sample(s, ["a red circle", "three squares"], 2, seeds=[0, 1]) for s in (fp32, bf16)]
    assert images[1].dtype == torch.float32 and (images[1] - images[0]).abs().mean() < 0.02


def test_requirements_keep_a_users_torch_and_pin_the_tests_one():
    """requirements.txt takes any torch from 2.11 on (a CUDA build a user installed stays); the tests pin
    one exactly (requirements-test.txt), so CI always runs on the same torch."""
    lines = lambda name: [line.split("#")[0].strip() for line in open(os.path.join(ROOT, name))]
    assert "torch>=2.11" in lines("requirements.txt")
    assert not [x for x in lines("requirements.txt") if x.startswith("torch") and x != "torch>=2.11"]
    assert "torch==2.13.0" in lines("requirements-test.txt")
