"""Peak host memory of loading a sharded HF checkpoint: streaming (loading.load_policy) vs eager.

    python experiments/benchmark_load.py [--layers 8 --hidden 2048 --devices 8 --dir /tmp/jaxalign_load_bench]

Writes a random Llama checkpoint (fp32, sharded into ~500 MB safetensors files, one shard in memory
at a time) to --dir, then loads it in fresh subprocesses on `--devices` simulated CPU devices
(FSDP over all of them) two ways and reads each one's RSS high-water mark (resource.getrusage):

    streaming  loading.load_policy: one tensor read (pread), converted and put at a time; stacked
               scan params assembled on the devices layer by layer
    eager      every tensor read into host numpy first (hf.params_from_hf_tensors, which also
               stacks the layers), then the whole tree placed (loading.place): the old path

On CPU the devices' buffers are host memory, so the loaded params themselves count in the RSS:
`overhead` = peak - RSS before loading - the params' bytes is what the load needed beyond its
result (on a GPU/TPU host the params leave the host and the peak is baseline + overhead).
The checkpoint is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import benchmark_common  # noqa: E402

GIB = 1024**3


def hf_config(args) -> dict:
    return dict(model_type="llama", vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                num_key_value_heads=args.hidden // 128, max_position_embeddings=2048, tie_word_embeddings=False)


def write_checkpoint(args) -> int:
    """Random fp32 checkpoint in --dir, shard by shard (never the whole model in memory). -> bytes."""
    import numpy as np
    from safetensors.numpy import save_file

    from jaxalign import models
    from jaxalign.models import hf

    out = pathlib.Path(args.dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = models.config_from_hf(hf_config(args))
    shapes = hf.lm_hf_shapes(cfg)
    rng = np.random.default_rng(0)
    limit, shard, size, shards = 500 * 10**6, {}, 0, []

    def flush():
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        shards.append((name, list(shard)))

    for name, shape in shapes.items():
        tensor = rng.standard_normal(shape, dtype=np.float32) * 0.02
        if shard and size + tensor.nbytes > limit:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
    flush()
    del shard
    total = sum(int(np.prod(s)) * 4 for s in shapes.values())
    weight_map = {}
    for index, (name, names) in enumerate(shards):
        final = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    (out / hf.SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total},
                                                              "weight_map": weight_map}))
    hf.write_config(out, cfg.to_hf_config())
    return total


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """Loads --dir with --part (streaming | eager) and prints a RESULT line."""
    import resource

    import jax
    import ml_collections
    import numpy as np

    from jaxalign import models
    from jaxalign.models import hf, loading
    from jaxalign.parallel import mesh as mesh_lib

    config = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, axis_rules=mesh_lib.DEFAULT_AXIS_RULES))
    mesh, rules = mesh_lib.make_mesh(config), mesh_lib.axis_rules(config)
    settings = loading.ModelSettings(init_path=args.dir, scan_layers=True)
    cfg = loading.model_config(settings)
    shardings = loading.param_shardings(models.causal_lm(cfg), mesh, rules)
    jax.block_until_ready(jax.jit(lambda: jax.numpy.zeros((8,)), out_shardings=mesh_lib.replicated(mesh))())
    baseline = rss_now()
    start = time.perf_counter()
    if args.part == "streaming":
        params = loading.load_policy(settings, mesh, rules, vocab_size=cfg.vocab_size, rng=jax.random.PRNGKey(0)).params
    else:
        host = hf.params_from_hf_tensors(cfg, hf.read_safetensors_dir(args.dir))
        params = loading.place(host, shardings, np.float32)
        del host
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    result = dict(part=args.part, seconds=seconds, baseline=baseline, peak=peak, params=param_bytes,
                  overhead=peak - baseline - param_bytes, largest_tensor=max(
                      int(np.prod(s)) * 4 for s in hf.lm_hf_shapes(cfg).values()))
    print("RESULT " + json.dumps(result), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/jaxalign_load_bench")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--parts", default="streaming,eager")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint in --dir")
    parser.add_argument("--part", choices=["streaming", "eager"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        child(args)
        return 0
    size = write_checkpoint(args)
    files = len(list(pathlib.Path(args.dir).glob("*.safetensors")))
    print(f"checkpoint: {size / GIB:.2f} GiB fp32 in {files} safetensors files ({args.dir})")
    try:
        rows = []
        for part in args.parts.split(","):
            extra = ["--dir", args.dir]
            rows += benchmark_common.run_child(__file__, part, args.devices, extra)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)
    print(f"\n{'load':10s} {'seconds':>8s} {'baseline GiB':>13s} {'peak GiB':>9s} {'params GiB':>11s} "
          f"{'overhead GiB':>13s} {'overhead / ckpt':>16s}")
    for r in rows:
        print(f"{r['part']:10s} {r['seconds']:8.1f} {r['baseline'] / GIB:13.2f} {r['peak'] / GIB:9.2f} "
              f"{r['params'] / GIB:11.2f} {r['overhead'] / GIB:13.2f} {r['overhead'] / size:16.2f}")
    print(f"(largest single tensor: {rows[0]['largest_tensor'] / GIB:.2f} GiB; {args.devices} CPU devices, FSDP)")
    print("RESULTS " + json.dumps(dict(checkpoint_bytes=size, rows=rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
