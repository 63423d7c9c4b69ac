"""Benchmark: load a T5 v1.1 XXL checkpoint with encoders.load_t5; report peak host memory against the file size.

Writes a synthetic checkpoint with the real key names and shapes of FLUX.1's text_encoder_2/ (HF T5EncoderModel
layout, bf16, two shards of at most 5 GB + model.safetensors.index.json + config.json; about 9.5 GB), then loads it in
a fresh process and reports that process's peak RSS (getrusage), its RSS before loading, and the wall time.
The target is peak RSS <= 1.3 x the checkpoint size: the loader reads each tensor straight into its parameter.

    python bench_t5_load.py                       # 24 layers (the real size), in /tmp/t5xxl-synthetic, removed after
    python bench_t5_load.py --layers 6 --keep     # smaller, for a disk that cannot take 9.5 GB
Timings are with the checkpoint in the page cache (it was just written).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import torch

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, d_ff=10240, num_layers=24,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              feed_forward_proj="gated-gelu", is_gated_act=True, dense_act_fn="gelu_new", model_type="t5")


def t5_shapes(c):
    """The keys and shapes of HF's T5EncoderModel (encoder.embed_tokens.weight is tied to shared.weight: not stored)."""
    d, inner = c["d_model"], c["num_heads"] * c["d_kv"]
    shapes = {"shared.weight": (c["vocab_size"], d)}
    for i in range(c["num_layers"]):
        b = f"encoder.block.{i}.layer"
        for n in "qkv":
            shapes[f"{b}.0.SelfAttention.{n}.weight"] = (inner, d)
        shapes[f"{b}.0.SelfAttention.o.weight"] = (d, inner)
        if i == 0:
            shapes[f"{b}.0.SelfAttention.relative_attention_bias.weight"] = (c["relative_attention_num_buckets"],
                                                                             c["num_heads"])
        shapes[f"{b}.0.layer_norm.weight"] = (d,)
        shapes[f"{b}.1.DenseReluDense.wi_0.weight"] = (c["d_ff"], d)
        shapes[f"{b}.1.DenseReluDense.wi_1.weight"] = (c["d_ff"], d)
        shapes[f"{b}.1.DenseReluDense.wo.weight"] = (d, c["d_ff"])
        shapes[f"{b}.1.layer_norm.weight"] = (d,)
    shapes["encoder.final_layer_norm.weight"] = (d,)
    return shapes


def write_shard(path, shapes, pattern):
    """A bf16 safetensors file streamed tensor by tensor (header, then bytes), never holding a shard in memory."""
    header, offset = {}, 0
    for k, s in shapes.items():
        n = 2 * torch.Size(s).numel()
        header[k] = {"dtype": "BF16", "shape": list(s), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for k, s in shapes.items():
            n = 2 * torch.Size(s).numel()
            while n:
                chunk = pattern[:n]
                f.write(chunk)
                n -= len(chunk)


def write_checkpoint(folder, layers, max_shard=5 * 10**9):
    c = dict(T5_XXL, num_layers=layers)
    os.makedirs(folder, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k, s in t5_shapes(c).items():  # HF's rule: start a new shard when the next tensor would pass max_shard
        n = 2 * torch.Size(s).numel()
        if cur and size + n > max_shard:
            shards.append(cur)
            cur, size = {}, 0
        cur[k], size = s, size + n
    shards.append(cur)
    pattern = (torch.randn(32 << 20, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    pattern = pattern.view(torch.uint8).numpy().tobytes()  # 64 MB of plausible bf16 values, tiled
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_shard(os.path.join(folder, name), shard, pattern)
        total += sum(2 * torch.Size(s).numel() for s in shard.values())
        weight_map.update({k: name for k in shard})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(c, f, indent=1)
    from safetensors import safe_open  # the files must read back with the reference reader too
    with safe_open(os.path.join(folder, next(iter(weight_map.values()))), "pt") as f:
        assert f.get_tensor("shared.weight").shape == (c["vocab_size"], c["d_model"])
    return total, len(shards)


def load_and_measure(folder):
    """Runs in a fresh process: peak RSS of exactly this load."""
    import encoders
    rss0 = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    t0 = time.perf_counter()
    t5 = encoders.load_t5(folder, dtype=torch.bfloat16, device="cpu")
    seconds = time.perf_counter() - t0
    params = sum(p.numel() * p.element_size() for p in t5.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": seconds, "rss_before": rss0, "peak_rss": peak, "param_bytes": params}))


def touch_and_measure(nbytes):
    """Runs in a fresh process: the time to allocate and first-touch as many bytes, the floor for any loader (on
    some VMs the first touch of fresh memory, not the reading, dominates)."""
    t0 = time.perf_counter()
    torch.empty(nbytes, dtype=torch.uint8).fill_(1)
    print(json.dumps({"seconds": time.perf_counter() - t0}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/t5xxl-synthetic")
    ap.add_argument("--layers", type=int, default=24, help="24 is the real T5-XXL (9.5 GB); fewer for a small disk")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    ap.add_argument("--load-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--touch-only", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load_only:
        return load_and_measure(args.dir)
    if args.touch_only:
        return touch_and_measure(args.touch_only)
    need = 2 * sum(torch.Size(s).numel() for s in t5_shapes(dict(T5_XXL, num_layers=args.layers)).values())
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.dir))).free
    if need > 0.9 * free:
        sys.exit(f"{need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free: use --layers N to write less")
    t0 = time.perf_counter()
    size, n_shards = write_checkpoint(args.dir, args.layers)
    print(f"wrote {size / 1e9:.2f} GB in {n_shards} shards ({args.layers} layers) to {args.dir} "
          f"in {time.perf_counter() - t0:.0f} s")
    run = lambda *flags: json.loads(subprocess.run(
        [sys.executable, __file__, "--dir", args.dir, *flags], check=True, capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip().splitlines()[-1])
    try:
        r = run("--load-only")
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    floor = run("--touch-only", str(size))["seconds"]
    print(f"load_t5: {r['seconds']:.1f} s, {size / 1e9 / r['seconds']:.2f} GB/s (checkpoint in the page cache); "
          f"allocating and first-touching {size / 1e9:.2f} GB alone takes {floor:.1f} s on this machine")
    print(f"peak RSS {r['peak_rss'] / 1e9:.2f} GB = {r['peak_rss'] / size:.3f} x the checkpoint ({size / 1e9:.2f} GB); "
          f"RSS before loading {r['rss_before'] / 1e9:.2f} GB; loaded parameters {r['param_bytes'] / 1e9:.2f} GB; "
          f"target <= 1.3 x: {'met' if r['peak_rss'] <= 1.3 * size else 'NOT met'}")


if __name__ == "__main__":
    main()
