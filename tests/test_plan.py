"""`jaxalign plan`: stages compiled for TPU slices by the TPU compiler (libtpu's compile-only devices).

The TPU compiles here are CPU-bound: the suite builds every tiny config's steps for v5e-4 and lowers
their updates, compiles SFT tiny (train + eval), one medium train step for the FLOPs check, one
search and one 8B step; experiments/plan_tables.py compiles every step of every tiny and 8B config.
"""

import json
import math
import pathlib
import re

import numpy as np
import pytest

from jaxalign import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
GIB = 1024**3
TINY_CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*_tiny.py"))

pytestmark = pytest.mark.skipif(
    __import__("importlib").util.find_spec("libtpu") is None, reason="libtpu (the jaxalign[tpu] extra) is not installed")


@pytest.fixture(scope="module", autouse=True)
def quiet_libtpu():
    """libtpu asks the machine which TPU it runs on; tell it, so it does not print warnings."""
    import os

    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def _topology_mesh(name: str, config):
    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.plan import chips

    topology = chips.topology(name)
    mesh = mesh_lib.make_mesh(config.mesh, devices=chips.compile_only_devices(topology))
    return topology, mesh, mesh_lib.axis_rules(config.mesh)


# ------------------------------------------------------------------------------------ names and errors


def test_slice_names_map_to_libtpu_topologies_and_a_bad_name_lists_the_valid_ones():
    from jaxalign.plan import chips

    expected = {"v5e-16": ("v5e:4x4", 16), "v5p-8": ("v5:2x2x1", 4), "v4-8": ("v4:2x2x1", 4),
                "v6e-8": ("v6e:2x4", 8), "v5p-128": ("v5:4x4x4", 64), "v5e-256": ("v5e:16x16", 256)}
    for name, (libtpu_name, count) in expected.items():
        topology = chips.topology(name)
        assert (topology.libtpu_name, topology.chips) == (libtpu_name, count), name
    devices = chips.compile_only_devices(chips.topology("v4-8"))  # megacore: one device per chip
    assert len(devices) == 4 and devices[0].device_kind == "TPU v4" and devices[0].platform == "tpu"
    for bad in ("v5e-3", "v7-8", "v5e", "tpu"):
        with pytest.raises(ValueError, match=r"unknown slice; valid: v4-8, .*v5e-16, .*v6e-256, h100-1, h100-2, h100-4, h100-8$"):
            chips.topology(bad)


def test_cli_errors_are_one_line(capsys, monkeypatch):
    from jaxalign.plan import chips

    assert cli.main(["plan", "--config", str(REPO / "configs/sft_tiny.py"), "--topology", "v5e-3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxalign plan: error: --topology 'v5e-3': unknown slice; valid: v4-8") and "\n" not in err
    monkeypatch.setattr(chips, "has_libtpu", lambda: False)
    assert cli.main(["plan", "--config", str(REPO / "configs/sft_tiny.py"), "--topology", "v5e-4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "jaxalign plan: error: compiling for a TPU needs libtpu, which is not installed: pip install 'jaxalign[tpu]'"


# ------------------------------------------------------------------------------------ HLO reading


def test_loops_are_counted_and_collectives_read_from_the_tpu_program():
    """XLA's cost analysis counts a scan's body once; the plan counts every iteration: a scanned
    program costs what XLA's own analysis says of the same program unrolled. An all-gather is read
    with the bytes each chip receives."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxalign.plan import chips, hlo

    devices = chips.compile_only_devices(chips.topology("v5e-4"))
    mesh = jax.sharding.Mesh(np.array(devices), ("x",))
    n, d, layers = 512, 1024, 6

    def scanned(x, w):
        return jax.lax.scan(lambda c, wl: (jnp.tanh(c @ wl), None), x, w)[0]

    def unrolled(x, w):
        for layer in range(layers):
            x = jnp.tanh(x @ w[layer])
        return x

    x = jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
    w = jax.ShapeDtypeStruct((layers, d, d), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x", None)))
    loop, flat = (jax.jit(f).lower(x, w).compile() for f in (scanned, unrolled))
    cost = hlo.program_cost(loop.as_text(), loop.cost_analysis(), 4)
    assert layers in cost.loop_trip_counts
    assert loop.cost_analysis()["flops"] < 0.5 * flat.cost_analysis()["flops"]  # XLA: the body once
    assert cost.flops == pytest.approx(flat.cost_analysis()["flops"], rel=0.03)
    assert cost.flops * 4 == pytest.approx(layers * 2 * n * d * d, rel=0.03)  # the chips split the products

    def summed(x, w):  # each layer sums its partial products over the chips: one reduction per iteration
        def body(c, wl):
            full = jnp.tanh(jax.lax.psum(c @ wl, "x"))
            return jax.lax.dynamic_slice_in_dim(full, jax.lax.axis_index("x") * (d // 4), d // 4, axis=1), None

        return jax.lax.scan(body, x, w)[0]

    program = jax.jit(jax.shard_map(summed, mesh=mesh, in_specs=(P(None, "x"), P(None, "x", None)),
                                    out_specs=P(None, "x")))
    compiled = program.lower(jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, "x"))),
                             w).compile()
    (reduction,) = hlo.program_cost(compiled.as_text(), compiled.cost_analysis(), 4).collectives
    full = n * d * 2  # the bf16 [n, d] partial sums
    per_layer = {"all-reduce": 2 * full * 3 / 4, "reduce-scatter": full / 4 * 3}[reduction.kind]
    assert reduction.count == layers and reduction.bytes == pytest.approx(layers * per_layer)

    # HBM traffic of an elementwise update of a 16 MiB-per-chip array: read it once, write it once
    big = jax.ShapeDtypeStruct((4096, 4096), jnp.float32, sharding=NamedSharding(mesh, P("x")))
    compiled = jax.jit(lambda a: a * 2.0 + 1.0).lower(big).compile()
    assert hlo.program_cost(compiled.as_text(), compiled.cost_analysis(), 4).hbm_bytes == pytest.approx(
        2 * 4096 * 4096 * 4 / 4, rel=0.05)

    gather = jax.jit(jax.shard_map(lambda a: jax.lax.all_gather(a, "x", tiled=True), mesh=mesh, in_specs=P("x"),
                                   out_specs=P(), check_vma=False))
    compiled = gather.lower(jax.ShapeDtypeStruct((1024, 256), jnp.float32, sharding=NamedSharding(mesh, P("x")))).compile()
    (collective,) = hlo.program_cost(compiled.as_text(), compiled.cost_analysis(), 4).collectives
    assert collective.kind == "all-gather" and collective.bytes == pytest.approx(1024 * 256 * 4 * 3 / 4)


def test_a_step_the_compiler_refuses_for_lack_of_hbm_is_reported_with_what_it_needs():
    """libtpu refuses a program whose temporaries exceed the chip's HBM; the plan reports the step as not
    fitting, with the temporaries the compiler said it needs and the arguments it would hold."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxalign.plan import chips, steps as steps_lib

    topology = chips.topology("v5e-1")
    mesh = jax.sharding.Mesh(np.array(chips.compile_only_devices(topology)), ("x",))
    n = 56000  # a bf16 [n, n] is 5.84 GiB; two products of it need ~23 GiB of temporaries
    a = jax.ShapeDtypeStruct((n, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    step = steps_lib.Step("products", jax.jit(lambda x: ((jnp.sin(x) @ x) @ jnp.cos(x)).astype(jnp.float32)), (a,),
                          tokens=n)
    (plan,) = steps_lib.compile_steps([step], topology, mesh, (), progress=False)
    assert plan.oom and not plan.fits
    assert plan.temp_bytes > 16 * GIB and plan.argument_bytes == pytest.approx(n * n * 2, rel=0.01)
    assert plan.peak_bytes > plan.temp_bytes and plan.flops == pytest.approx(4 * n**3, rel=0.05)


def test_gpu_programs_are_read_the_same_way():
    """An H100 program (jax's CUDA plugin, compiled without a GPU for 2 x H100: a 5-step scan of a
    [256, 512] x [512, 512] bf16 matmul with the weight sharded; tests/data/h100_scan.hlo): its
    gemm fusions inside the loop are counted 5 times, and its reduce-scatter read."""
    from jaxalign.plan import hlo

    cost = hlo.program_cost((REPO / "tests/data/h100_scan.hlo").read_text(), None, 2)
    assert cost.loop_trip_counts == (5,)
    assert cost.flops == pytest.approx(5 * 2 * 256 * 256 * 512, rel=0.02)  # each GPU: half the contraction
    (scatter,) = cost.collectives
    assert scatter.kind == "reduce-scatter" and scatter.count == 5
    assert scatter.bytes == pytest.approx(5 * 256 * 256 * 2 * 1, rel=0.01)  # bf16 [256, 256] out, n = 2


def test_h100_needs_the_cuda_plugin(capsys):
    from jaxalign.plan import chips

    assert chips.topology("h100-8").chips == 8 and chips.topology("h100-8").chip.platform == "cuda"
    if chips.has_cuda_plugin():
        pytest.skip("jax's CUDA plugin is installed (docs/tpu.md: H100 plans work then)")
    assert cli.main(["plan", "--config", str(REPO / "configs/sft_tiny.py"), "--topology", "h100-8"]) == 1
    assert capsys.readouterr().err.strip() == ("jaxalign plan: error: compiling for an NVIDIA GPU needs jax's CUDA "
                                               "plugin, which is not installed: pip install 'jax[cuda12]==0.10.2'")


# ------------------------------------------------------------------------------------ every tiny config


def test_the_tiny_configs_cover_every_stage():
    """Every stage (each RL algorithm, each pairwise method) has a tiny config, so the next test plans it."""
    from jaxalign import config as config_lib
    from jaxalign.stages import STAGES

    stages = {config_lib.load_config(REPO / "configs" / name).stage for name in TINY_CONFIGS}
    assert set(STAGES) <= stages, sorted(set(STAGES) - stages)


@pytest.mark.parametrize("name", TINY_CONFIGS)
def test_every_tiny_config_builds_its_steps_for_a_tpu_slice(name):
    """Each stage's steps from abstract inputs on v5e-4's compile-only devices, the update lowered for
    the TPU (compiling every step of every tiny config: experiments/plan_tables.py --parts tiny,
    ~10-60 CPU s per config here)."""
    from jaxalign import config as config_lib
    from jaxalign.parallel import mesh as mesh_lib
    from jaxalign.stages import planning

    config = config_lib.load_config(REPO / "configs" / name)
    _, mesh, rules = _topology_mesh("v5e-4", config)
    steps = planning.stage_steps(config, mesh, rules)
    expected = {"rl": ["rollout", "scoring", "update"], "eval": ["train", "eval"], "train": ["train"]}
    kind = "rl" if config.stage not in planning.SUPERVISED else ("eval" if config.data.eval_split else "train")
    assert [s.name for s in steps] == expected[kind]
    assert all(step.tokens > 0 and step.passes for step in steps)
    update = steps[2] if kind == "rl" else steps[0]
    with mesh_lib.sharding_context(mesh, rules):
        assert update.fn.lower(*update.args).as_text()


def test_sft_tiny_plan_reports_memory_cost_chips_and_the_launch(tmp_path, capsys):
    import jax

    from jaxalign import config as config_lib
    from jaxalign import models
    from jaxalign.stages import planning

    out = tmp_path / "sft_tiny.json"
    assert cli.main(["plan", "--config", str(REPO / "configs/sft_tiny.py"), "--topology", "v5e-4",
                     "--json", str(out)]) == 0
    text, plan = capsys.readouterr().out, json.loads(out.read_text())
    assert plan["topology"] == "v5e-4" and plan["chips"] == 4 and plan["chip"]["name"] == "v5e"
    steps = {s["name"]: s for s in plan["steps"]}
    assert set(steps) == {"train", "eval"}
    # peak >= the params + AdamW moments each chip holds (the train state, sharded by fsdp)
    config = config_lib.load_config(REPO / "configs/sft_tiny.py")
    module = models.causal_lm(planning.model_config(config))
    params = jax.eval_shape(module.init, jax.random.PRNGKey(0), jax.numpy.zeros((1, 1), jax.numpy.int32))
    state_bytes = 3 * sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))  # + 2 moments
    train = steps["train"]
    assert train["peak_bytes"] >= state_bytes / 4 and train["argument_bytes"] >= state_bytes / 4
    assert train["fits"] and train["hbm_bytes"] == 16 * GIB
    assert train["flops"] > steps["eval"]["flops"] / 2 > 0  # eval: 32 rows forward; train: 16 rows fwd+bwd
    assert train["roofline_s"] == pytest.approx(max(train["compute_s"], train["memory_s"]) + train["ici_s"])
    assert train["compute_s"] == pytest.approx(train["flops"] / 197e12)
    assert 0 < train["mfu"] < 1 and train["tokens"] == 16 * 64
    assert train["tokens_per_s_per_chip"] == pytest.approx(train["tokens"] / train["roofline_s"] / 4)
    assert {c["kind"] for c in train["collectives"]} >= {"all-gather"}
    # the text: one row per step, the chips with their sources, the multi-host launch
    assert re.search(r"^train\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d\s+\d+\.\d\d\s+yes", text, re.M)
    assert re.search(r"^eval\s+\d+\.\d\d", text, re.M)
    for url in ("https://cloud.google.com/tpu/docs/v5e", "https://cloud.google.com/tpu/docs/v5p",
                "https://cloud.google.com/tpu/docs/v6e", "https://cloud.google.com/tpu/docs/v4"):
        assert url in text
    assert "gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all" in text
    assert "--accelerator-type=v5litepod-4" in text and "--config.mesh.distributed=True" in text


def test_train_step_flops_match_6N_tokens_plus_attention():
    """The plan's flops of an SFT update (no remat) within 25% of 6·N·tokens + the attention
    products, computed here from the model's sizes (PaLM, arXiv:2204.02311, Appendix B)."""
    from jaxalign import config as config_lib
    from jaxalign.plan import steps as steps_lib
    from jaxalign.stages import planning

    d, f, layers, vocab, heads, length, batch = 512, 1536, 4, 8192, 8, 256, 16
    config = config_lib.load_config(REPO / "configs/sft_tiny.py", [
        f"--config.model.hf_config.hidden_size={d}", f"--config.model.hf_config.intermediate_size={f}",
        f"--config.model.hf_config.num_hidden_layers={layers}", f"--config.model.hf_config.vocab_size={vocab}",
        f"--config.model.hf_config.num_attention_heads={heads}", f"--config.model.hf_config.num_key_value_heads={heads}",
        f"--config.data.max_length={length}", f"--config.data.batch_size={batch}", "--config.data.eval_split=",
        "--config.model.remat_policy=none", "--config.tokenizer=", "--config.model.init_path="])
    topology, mesh, rules = _topology_mesh("v5e-4", config)
    (step,) = planning.stage_steps(config, mesh, rules)
    (plan,) = steps_lib.compile_steps([step], topology, mesh, rules, progress=False)
    n = layers * (4 * d * d + 3 * d * f) + d * vocab  # q, k, v, o, gate, up, down; the LM head
    tokens = batch * length
    expected = 6 * n * tokens + 12 * layers * d * length * tokens  # + QK^T and AV, forward and backward
    assert plan.flops * 4 == pytest.approx(expected, rel=0.25)


def test_search_names_the_smallest_slice_that_fits(capsys):
    from jaxalign.plan import chips, search, steps as steps_lib

    # the search's order on a synthetic stage: a peak of 40 GiB / chips per step; RL updates halve with k
    def fake(topology, layout, k, only):
        peak = (40 * GIB / topology.chips) * (1 if k is None or only != ("update",) else 1 / k)
        plans = [steps_lib.StepPlan(
            name=name, note="", topology=topology.name, chips=topology.chips, argument_bytes=int(peak), output_bytes=0,
            alias_bytes=0, temp_bytes=0, code_bytes=0, hbm_bytes=topology.chip.hbm_bytes, peak_flops=1.0, flops=0,
            hbm_traffic=0, bytes_accessed=0, collectives=(), compute_s=0, memory_s=0, ici_s=0, tokens=0,
            model_flops=0, compile_s=0) for name in (only or ("train",))]
        return plans

    found = search.smallest_fit(chips.CHIPS["v5e"], fake, min_bytes=1, batch_rows=64, progress=False)
    assert found.best.topology == "v5e-4" and (found.best.fsdp, found.best.tensor) == (4, 1)
    assert [t.topology for t in found.tries] == ["v5e-1", "v5e-4"]
    # a real search: SFT tiny fits one v5e chip
    assert cli.main(["plan", "--config", str(REPO / "configs/sft_tiny.py"), "--topology", "v5e-4",
                     "--config.data.eval_split=", "--search"]) == 0
    out = capsys.readouterr().out
    assert "smallest v5e slice that fits: v5e-1 with --config.mesh.data=1 --config.mesh.fsdp=1 --config.mesh.tensor=1" in out


def test_an_8b_config_matches_its_planned_peak():
    """configs/reward_qwen3_8b.py names the slice it was planned on and the peak of each step; a
    fresh plan of its eval step (Qwen3-8B, 256 x 512 tokens, on v5p-16) gives the same peak
    (experiments/plan_tables.py --parts configs checks every step of every 8B config)."""
    from jaxalign import config as config_lib
    from jaxalign.plan import chips, steps as steps_lib
    from jaxalign.stages import planning

    text = (REPO / "configs/reward_qwen3_8b.py").read_text()
    topology_name, peaks = re.search(r"^# planned: (\S+), peak GiB per chip: (.+)$", text, re.M).groups()
    planned = {step: float(value) for step, value in (item.split() for item in peaks.split(","))}
    config = config_lib.load_config(REPO / "configs/reward_qwen3_8b.py")
    topology = chips.topology(topology_name)
    _, _, plans = planning.plan_config(config, topology, only=("eval",), progress=False)
    (plan,) = plans
    assert plan.peak_bytes / GIB == pytest.approx(planned["eval"], abs=0.01)
    params = 7.5e9  # Qwen3-8B without its LM head (a score model), fp32, fully sharded over the chips
    assert plan.argument_bytes >= 4 * params / topology.chips
