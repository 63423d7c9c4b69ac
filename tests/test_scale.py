"""The paper-scale path, proven on CPU: bf16 under FSDP2 (2 processes on gloo against 1), t, s and RoPE kept
in fp32, a compile that stays compiled, a step that runs on another device type, the memory plan against
measured memory, the benchmark, the cache builder, and bad
input (a batch that cannot fit, a compile that fails, a non-finite step)."""
import functools
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import bench
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
    want = sampler.sample(system, prompts, 2, seeds=[0, 1], model=system.denoiser)
    system.denoiser.to(torch.bfloat16)
    got = sampler.sample(system, prompts, 2, seeds=[0, 1], model=system.denoiser)
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
    real = selfe.sample_t
    monkeypatch.setattr(selfe, "sample_t", lambda n, L, *a, **k: lengths.append(L) or real(n, L, *a, **k))
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
        evaluate = torch.tensor([True, False, True, False])
    ids, txt_ids = selfe.image_ids(8, 8, "meta"), torch.zeros(1, 16, 3, device="meta")
    G = lambda x, t_, s_, c: selfe.g_head(x, t_, net(x, ids, c[0], txt_ids, t_, s_, c[1]).float())
    args = train.get_args(["--objective", objective])
    loss, terms = train.objective(args, G, G, x0, t, t * 0.5, cond, tuple(c[:1] for c in cond),
                                  fake=lambda idx: tuple(c[idx] for c in cond), eps=eps, eps_self=eps_self,
                                  evaluate=evaluate, fake_norm=2, eval_size=2)
    loss.backward()
    assert loss.device.type == terms.device.type == "meta" and terms.shape == (5, 4)


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
import bench, model
torch.set_num_threads(1)
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
cfg, ckpt, out = model.CONFIGS["tiny"], sys.argv[1] == "1", {}
for b in (4, 16, 4, 16):  # the first pair warms kernels and buffers up
    forward = bench.training_forward(cfg, b, cfg.resolution, torch.float32, ckpt, "selfe", "cpu")
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
    plan = [bench.step_activations(cfg, b, cfg.resolution, torch.float32, act_ckpt, "selfe") for b in (4, 16)]
    assert plan[1] - plan[0] == pytest.approx(measured, rel=0.05)


def test_memory_plan_prints_its_table(capsys):
    plans = bench.main(["--plan", "--size", "tiny", "--batch", "8", "--precision", "fp32"])
    out = capsys.readouterr().out
    assert "| activations |" in out and "| total |" in out
    no_ckpt, ckpt = plans
    assert ckpt["activations"] < no_ckpt["activations"] / 4 and ckpt["block recomputed in backward"] > 0
    n = sum(p.numel() for p in model.MMDiT(model.CONFIGS["tiny"]).parameters())
    assert no_ckpt["parameters"] == no_ckpt["EMA"] == 4 * n and no_ckpt["Adam moments"] == 8 * n
    sharded = bench.memory_plan(model.CONFIGS["tiny"], 8, 32, world=4, precision="bf16")
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
    need = lambda b: bench.memory_plan(cfg, b, 32, 1, False, "fp32")["total"] / 2 ** 30
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
    rows = bench.main(["--size", "tiny", "--batch", "4", "--iters", "1", "--compile", "off"])
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
