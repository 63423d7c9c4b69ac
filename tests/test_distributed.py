"""Training at scale, on CPU: torchrun with 2 processes (gloo) and FSDP2 against 1 process, kill-and-resume
across ranks, a rank that dies mid-checkpoint, aspect-ratio buckets, the latent/text cache, the FLOP count,
activation checkpointing, and bad input. Multi-process runs go through the real `torchrun` command line.
(bf16, compile, the memory plan and the benchmark: test_scale.py.)"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import data
import encoders
import losses
import model
import selfe
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 steps; tau anneals over the first, the auxiliary term runs from step 3: every part of
# the objective is exercised
ARGS = ["--steps", "4", "--batch", "8", "--log-every", "1", "--ckpt-every", "2", "--sample-every", "0",
        "--tau-frac", "0.25", "--aux-start-frac", "0.5"]


def run(out, *extra, procs=1, script="train.py", env=None, printed=None):
    """train.py in a fresh process (torchrun --nproc_per_node procs when procs > 1);
    returns its log records (and appends what it printed to the list `printed`)."""
    launcher = [sys.executable, script] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--standalone", script]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **(env or {})}
    p = subprocess.run([*launcher, *ARGS, "--out", str(out), *extra], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    if printed is not None:
        printed.append(p.stdout)
    log = os.path.join(out, "log.jsonl")
    return [json.loads(line) for line in open(log)] if os.path.exists(log) else []


def weights(out, step, part="ema"):
    path = os.path.join(out, f"step-{step:07d}")
    if part == "ema":
        return load_file(os.path.join(path, "ema.safetensors"))
    system, _ = selfe.load_checkpoint(path, weights="model")
    return system.denoiser.state_dict()


def assert_same_run(a, b, tol=2e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("loss", "data", "self", "lam", "frac_s_lt_t", "fake", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=tol, abs=tol), (key, ra, rb)


def assert_same_weights(wa, wb, tol=2e-5):
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < tol, worst


# ------------------------------------------------------------------------------------------------------------
# 2 processes = 1 process

@pytest.fixture(scope="module")
def one_proc(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return out, run(out)


def test_two_processes_with_accumulation_match_one(one_proc, tmp_path):
    """Global batch 8 as 8 x 1 rank x 1 micro-step and as 2 x 2 ranks x 2 micro-steps: the same loss
    trajectory, every term, and the same parameters and EMA after 4 steps
    (tolerance 2e-5: only summation order differs)."""
    out1, log1 = one_proc
    log2 = run(tmp_path, "--accum", "2", procs=2)
    assert_same_run(log1, log2)
    # self-eval and L_fake ran
    assert max(r["fake"] for r in log1) > 0 and max(r["frac_s_lt_t"] for r in log1) > 0
    assert_same_weights(weights(out1, 4), weights(tmp_path, 4))
    assert_same_weights(weights(out1, 4, "model"), weights(tmp_path, 4, "model"))
    # it did train
    assert not torch.equal(weights(out1, 4)["img_in.weight"], weights(out1, 2)["img_in.weight"])


def test_hsdp_over_four_processes_matches_one(one_proc, tmp_path):
    """--shard 2 over 4 processes: FSDP2 on a 2-D device mesh, each state sharded over 2 ranks and
    replicated over the 2 pairs (HSDP, as over 2 nodes of 2 GPUs): the same run as one process, every
    term, and the same parameters and EMA."""
    printed = []
    log4 = run(tmp_path, "--shard", "2", procs=4, printed=printed)
    assert "sharded over 2 of 4 ranks" in printed[0]
    out1, log1 = one_proc
    assert_same_run(log1, log4)
    assert_same_weights(weights(out1, 4), weights(tmp_path, 4))
    assert_same_weights(weights(out1, 4, "model"), weights(tmp_path, 4, "model"))


def test_a_shard_size_that_does_not_divide_the_world_is_refused_before_any_weight(tmp_path, monkeypatch):
    def built(*a, **k):
        raise AssertionError("a weight was built")
    monkeypatch.setattr(selfe, "SelfE", built)
    with pytest.raises(SystemExit, match=r"--shard 2 does not divide the world size 1"):
        train.main([*ARGS, "--shard", "2", "--out", str(tmp_path)])


def test_two_nodes_match_one_process(one_proc, tmp_path):
    """Multi-node as torchrun runs it: two agents ("nodes", one process each, LOCAL_RANK 0 on both) meet
    through c10d rendezvous on localhost, the path of `torchrun --nnodes 2 --rdzv-endpoint HOST:PORT`.
    Same run as one process."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "two-nodes",
           "train.py", *ARGS, "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(o[-3000:] for o in outputs)
    out1, log1 = one_proc
    assert_same_run(log1, [json.loads(line) for line in open(tmp_path / "log.jsonl")])
    assert_same_weights(weights(out1, 4), weights(tmp_path, 4))


def test_kill_and_resume_under_two_processes_equals_uninterrupted(one_proc, tmp_path):
    """Stop after step 2 (keep only its checkpoint), resume under 2 processes: steps 3-4 and the final
    weights equal the uninterrupted run. The checkpoint was written by 1 process, so this also
    reshards the optimizer state."""
    out1, log1 = one_proc
    resumed = tmp_path / "resumed"
    os.makedirs(resumed)
    os.symlink(os.path.join(out1, "step-0000002"), resumed / "step-0000002")
    (resumed / "latest").write_text("step-0000002\n")
    log2 = run(resumed, "--resume", procs=2)
    assert [r["step"] for r in log2] == [3, 4]
    assert_same_run(log1[2:], log2)
    assert_same_weights(weights(out1, 4), weights(resumed, 4))


CRASH = '''
import os, sys
import train
real = train.save_checkpoint

def dying(out, system, step, *a, **k):
    if step == 4:  # step 2's checkpoint, written on a thread, is finished first (on every rank)
        train.finish_checkpoint(wait=True)
    # first attempt: rank 1 dies while step 4's checkpoint is half written (a partial shard, nothing renamed)
    if step == 4 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
        os.makedirs(os.path.join(out, "step-0000004.tmp", "dcp"), exist_ok=True)
        open(os.path.join(out, "step-0000004.tmp", "dcp", "__1_0.distcp"), "wb").write(b"partial")
        os._exit(3)
    return real(out, system, step, *a, **k)

train.save_checkpoint = dying
train.main()
'''


def test_a_rank_that_dies_resumes_from_the_last_complete_checkpoint(one_proc, tmp_path):
    """torchrun --max-restarts: rank 1 dies during step 4's checkpoint; the restarted job resumes from
    step 2 (not the partial step 4) and ends where the uninterrupted run ends.
    (More than one restart is allowed, with a short --dist-timeout: after a restart gloo's connection between
    the new workers is sometimes refused or never made on a loaded 2-core machine; such an attempt fails, logs
    nothing, and the next one resumes the same way.)"""
    out1, log1 = one_proc
    (tmp_path / "crash.py").write_text(CRASH)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", "--max-restarts", "3", str(tmp_path / "crash.py"), *ARGS, "--steps",
                        "6", "--dist-timeout", "60", "--out", str(tmp_path / "run")], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    assert "resumed from" in p.stdout and "step-0000002 at step 2" in p.stdout
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 3, 4, 5, 6]  # step 4 logged, its checkpoint lost, redone
    straight = run(tmp_path / "straight", "--steps", "6")
    assert_same_run(straight[-4:], log[-4:])
    assert_same_weights(weights(tmp_path / "straight", 6), weights(tmp_path / "run", 6))


def test_sampling_a_prompt_file_under_two_processes_writes_what_one_process_writes(tmp_path):
    """sample.py --from-file --outdir under torchrun: 2 ranks (gloo) share a GenEval file's 3 x 3 images out,
    and the folder holds what one process writes: the same files, metadata byte for byte, pixels within one
    level (the batches differ)."""
    import numpy as np
    from PIL import Image
    import sample
    torch.manual_seed(0)
    system = selfe.SelfE(model.CONFIGS["tiny"])
    with torch.no_grad():  # past the zero init, so images depend on prompt and noise
        for p in system.denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    system.make_ema()
    train.save_checkpoint(str(tmp_path / "run"), system, 1, {"world": "small", "objective": "selfe"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({"tag": "colors", "prompt": p}) + "\n" for p in (
        "a photo of a red circle", "a photo of a blue square", "a photo of a green triangle")))
    argv = ["--ckpt", str(tmp_path / "run"), "--from-file", str(tmp_path / "m.jsonl"), "--n-samples", "3",
            "--steps", "2", "--batch", "2"]
    sample.main([*argv, "--outdir", str(tmp_path / "one")])
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--standalone", "sample.py", *argv, "--outdir", str(tmp_path / "two")], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    files = lambda root: sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file())
    assert files(tmp_path / "one") == files(tmp_path / "two") and len(files(tmp_path / "one")) == 3 + 9 + 1
    for name in files(tmp_path / "one"):
        a, b = tmp_path / "one" / name, tmp_path / "two" / name
        if name.endswith(".png"):
            pa, pb = (np.asarray(Image.open(x), dtype=np.int16) for x in (a, b))
            assert np.abs(pa - pb).max() <= 1 and pa.std() > 0, name
        else:
            assert a.read_bytes() == b.read_bytes(), name


# ------------------------------------------------------------------------------------------------------------
# buckets and manifests

def make_manifest(folder, sizes, n_each):
    """Images of the given (W, H) sizes, each a different flat colour, and their manifest."""
    from PIL import Image
    lines = []
    for i in range(n_each * len(sizes)):
        w, h = sizes[i % len(sizes)]
        colour = (37 * i % 256, 91 * i % 256, 53 * i % 256)
        Image.new("RGB", (w, h), colour).save(folder / f"{i}.png")
        lines.append(f"{i}.png\ta photo of a thing number {i}")
    (folder / "m.tsv").write_text("\n".join(lines) + "\n")
    return str(folder / "m.tsv")


def test_buckets_one_resolution_per_batch_disjoint_and_resumable(tmp_path):
    manifest = make_manifest(tmp_path, [(48, 32), (32, 48), (40, 40)], 10)
    src = data.ManifestData(manifest, [32], 8, batch=4, seed=1)
    assert {b for _, b in src.items} == {(24, 40), (40, 24), (32, 32)}
    seen = []
    for step in range(src.order.per_epoch):
        idx = src.indices(step)
        images, captions = src.batch(idx)
        assert len({src.items[i][1] for i in idx}) == 1 and images.shape[0] == 4  # one bucket per batch
        assert tuple(images.shape[2:]) == src.items[idx[0]][1]
        seen += idx
    assert len(seen) == len(set(seen)) == 3 * (10 // 4) * 4  # an epoch never repeats an item
    world, b = 2, 2  # train.py's split of a global batch: rank r takes slice r
    parts = [set(src.indices(5)[r * b:(r + 1) * b]) for r in range(world)]
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(src.indices(5))
    fresh = data.ManifestData(manifest, [32], 8, batch=4, seed=1)  # a restarted run: same batch at every step
    assert all(fresh.indices(s) == src.indices(s) for s in (0, 7, 8, 40))
    assert src.indices(src.order.per_epoch) != src.indices(0)  # a new epoch reshuffles
    # the 1:1 two-area mix: every image at both
    mixed = data.ManifestData(manifest, [16, 32], 8, batch=4, seed=1)
    assert len(mixed) == 2 * len(src) and {b for _, b in mixed.items} >= {(16, 16), (32, 32)}


def test_training_on_buckets_feeds_the_token_count_to_the_time_warp(tmp_path, monkeypatch):
    manifest = make_manifest(tmp_path, [(64, 32), (40, 40)], 8)
    lengths = []
    real = losses.sample_t
    monkeypatch.setattr(losses, "sample_t", lambda n, L, *a, **k: lengths.append(L) or real(n, L, *a, **k))
    train.main([*ARGS, "--data", manifest, "--out", str(tmp_path / "run"), "--steps", "6"])
    assert set(lengths) == {6 * 10, 8 * 8}  # 24 x 40 px -> 6 x 10 patches; 32 x 32 -> 8 x 8


def test_image_smaller_than_its_bucket_is_named(tmp_path):
    manifest = make_manifest(tmp_path, [(40, 40), (30, 30)], 2)
    with pytest.raises(data.ManifestError,
                       match=r"m\.tsv:2: image .*1\.png is 30x30, smaller than its 32x32 bucket"):
        data.ManifestData(manifest, [32], 8, batch=2)
    assert len(data.ManifestData(manifest, [32], 8, batch=2, skip_bad=True)) == 2


# ------------------------------------------------------------------------------------------------------------
# caches

def test_training_from_the_cache_equals_training_online(tmp_path):
    manifest = make_manifest(tmp_path, [(48, 32), (40, 40)], 8)
    cache = str(tmp_path / "cache")
    run(tmp_path / "build", "--data", manifest, "--build-cache", cache, procs=2)  # ranks split the encoding
    files = set(os.listdir(cache))
    assert {"index.json", "null.safetensors"} <= files and {f[:11] for f in files if f[0] == "s"} == {
        "shard-00000", "shard-00001"}  # both ranks wrote shards
    online = run(tmp_path / "online", "--data", manifest, "--steps", "6", "--p-drop", "0.3")
    cached = run(tmp_path / "cached", "--data", cache, "--steps", "6", "--p-drop", "0.3")
    assert_same_run(online, cached, tol=1e-5)
    assert max(r["fake"] for r in online) > 0  # c_fake came from the cache too
    assert_same_weights(weights(tmp_path / "online", 6), weights(tmp_path / "cached", 6), tol=1e-5)


def test_cache_of_other_settings_or_missing_shard_is_refused(tmp_path):
    manifest = make_manifest(tmp_path, [(40, 40)], 4)
    cache = tmp_path / "cache"
    train.main(["--data", manifest, "--build-cache", str(cache), "--batch", "2"])
    with pytest.raises(data.ManifestError,
                       match=r"index\.json: the cache was built with resolution = \[32\]"):
        train.main([*ARGS, "--data", str(cache), "--resolution", "24", "--out", str(tmp_path / "r")])
    with pytest.raises(data.ManifestError, match="fake_prefix"):
        train.main([*ARGS, "--data", str(cache), "--fake-prefix", "bad, ", "--out", str(tmp_path / "r")])
    with pytest.raises(data.ManifestError, match="stand_in_seed"):
        train.main([*ARGS, "--data", str(cache), "--seed", "3", "--out", str(tmp_path / "r")])
    os.remove(sorted(cache.glob("shard-*"))[0])
    with pytest.raises(data.ManifestError, match=r"4 of 4 items are in no shard.*a shard file is missing"):
        train.main([*ARGS, "--data", str(cache), "--batch", "2", "--out", str(tmp_path / "r")])


# ------------------------------------------------------------------------------------------------------------
# throughput accounting

def test_flop_count_matches_torch_flop_counter():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cfg = model.CONFIGS["tiny"]
    net = model.MMDiT(cfg)
    B, h, w, Lt = 3, 6, 10, 20
    x, txt = torch.randn(B, h * w, cfg.in_channels), torch.randn(B, Lt, cfg.context_in_dim)
    t = torch.rand(B)
    # attention as countable matmuls
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        net(x, selfe.image_ids(h, w), txt, torch.zeros(1, Lt, 3), t, t, torch.randn(B, cfg.vec_in_dim))
    assert net.flops(h * w, Lt) * B == counter.get_total_flops()


# ------------------------------------------------------------------------------------------------------------
# bad input

def test_world_size_must_divide_the_batch(tmp_path):
    with pytest.raises(SystemExit, match="--batch 8 is not divisible by world size 1 x --accum 3"):
        train.main([*ARGS, "--accum", "3", "--out", str(tmp_path)])


def test_missing_or_foreign_checkpoint_shard_is_named(one_proc, tmp_path):
    out1, _ = one_proc
    broken = tmp_path / "run"
    shutil.copytree(os.path.join(out1, "step-0000002"), broken / "step-0000002")
    (broken / "latest").write_text("step-0000002\n")
    shard = next((broken / "step-0000002" / "dcp").glob("*.distcp"))
    os.remove(shard)
    with pytest.raises(encoders.CheckpointError, match=r"step-0000002/dcp: cannot load the checkpoint"):
        train.main([*ARGS, "--resume", "--out", str(broken)])
    shutil.rmtree(broken / "step-0000002" / "dcp")
    with pytest.raises(encoders.CheckpointError, match=r"dcp: no distributed checkpoint here"):
        train.main([*ARGS, "--resume", "--out", str(broken)])


def test_partial_checkpoint_is_never_resumed(one_proc, tmp_path):
    """A step folder still named .tmp (a crash before the rename) is ignored: `latest`
    names the complete one."""
    out1, _ = one_proc
    shutil.copytree(out1, tmp_path / "run", symlinks=True)
    os.makedirs(tmp_path / "run" / "step-0000006.tmp" / "dcp")
    assert selfe.resolve_checkpoint(str(tmp_path / "run")).endswith("step-0000004")


def test_activation_checkpointing_changes_nothing_but_memory():
    """Same gradients with and without; and the checkpoint sits inside each block's call: a block's hooks
    (where FSDP gathers its weights) run once per forward, not again when backward recomputes it."""
    torch.manual_seed(0)
    cfg = model.CONFIGS["tiny"]
    nets = [model.MMDiT(cfg) for _ in range(2)]
    for p in nets[0].parameters():  # past the zero init, so every block contributes
        p.data.normal_(0, 0.05)
    nets[1].load_state_dict(nets[0].state_dict())
    blocks = [*nets[1].double_blocks, *nets[1].single_blocks]
    calls = []
    for block in blocks:
        selfe.checkpoint_activations(block)
        block.register_forward_pre_hook(lambda m, a: calls.append(m))
    x, txt = torch.randn(2, 64, cfg.in_channels), torch.randn(2, 9, cfg.context_in_dim)
    args = (selfe.image_ids(8, 8), txt, torch.zeros(1, 9, 3), torch.rand(2), torch.rand(2) * 0.1,
            torch.randn(2, cfg.vec_in_dim))
    grads = []
    for net in nets:
        net(x, *args).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6) and grads[0].abs().sum() > 0
    assert len(calls) == len(blocks)  # recomputed in backward without entering the blocks' hooks again
