"""The one way to put a model on the mesh, and to export it.

    settings = ModelSettings(init_path="out/sft_tiny/export")          # or hf_config={...} for random init
    policy = load_policy(settings, mesh, rules, vocab_size=len(tok), special=special_ids(tok), rng=rng)
    policy.module.apply({"params": policy.params}, ids, attention_mask=mask).logits
    scorer = load_score_model("out/reward_tiny/export", mesh, rules, settings)   # score-model dir
    fresh = load_backbone_with_head(settings, head, mesh, rules, ...)            # backbone + fresh head
    export_policy(out_dir, policy.cfg, params, tokenizer)                     # atomic, with a manifest
    check_export(out_dir)                                                      # "" when complete

Every parameter is created in its final sharding: a random init runs under jit with
out_shardings; an HF checkpoint is streamed tensor by tensor (`hf.lm_params_plan` +
`place_streamed`): each tensor is read with pread, converted, cast and put on the devices already
sharded (`mesh.put_sharded`), and a stacked [L, ...] scan parameter is assembled on the devices
layer by layer, so neither the host nor a device ever holds a full copy of the model beyond its
own shards (peak host memory: experiments/benchmark_load.py, README). Shardings come from
the modules' logical axis names through `jax.eval_shape` (no FLOPs, nothing allocated).

A new vocabulary (a tokenizer that adds <pad>) resizes the embeddings on the host; new rows are
the mean of the old ones (upstream `resize_tokenizer_embedding`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import files, models
from jaxalign.models import decoder, hf, lora, score
from jaxalign.parallel import mesh as mesh_lib

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Where a model comes from and how it runs (config.model)."""

    init_path: str = ""  # HF dir (config.json + safetensors); "" = random init from hf_config
    hf_config: Mapping[str, Any] | None = None  # config.json fields for a random init
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"  # auto | xla | pallas | cudnn (models/attention_kernels.py)

    def runtime(self) -> dict:
        """The runtime config fields (not in config.json) as overrides."""
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, scan_layers=self.scan_layers,
                    remat_policy=self.remat_policy, attention_impl=self.attention_impl)


@dataclasses.dataclass
class Placed:
    """A model on the mesh: its config, flax module, global parameter arrays and their shardings.

    Score models also carry their head (score type, dim, normalizer) and normalizer statistics.
    """

    cfg: Any
    module: nn.Module
    params: Any
    shardings: Any
    head: score.ScoreHead | None = None
    stats: dict | None = None


def special_ids(tokenizer) -> dict:
    """bos/eos/pad ids of a tokenizer, as config overrides."""
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def model_config(settings: ModelSettings, *, vocab_size: int | None = None, special: Mapping | None = None):
    """The model config of settings.init_path's config.json (or settings.hf_config) with the
    runtime fields, the tokenizer's special ids and vocab_size (when given)."""
    overrides = dict(special or {})
    if vocab_size is not None:
        overrides["vocab_size"] = int(vocab_size)
    if settings.init_path:
        cfg = hf.load_config(settings.init_path, **settings.runtime())
        return dataclasses.replace(cfg, **overrides)
    if not settings.hf_config:
        raise ValueError("config.model: init_path is empty and hf_config is empty; set one of them")
    return models.config_from_hf(dict(settings.hf_config, **overrides), **settings.runtime())


def init_fn(module: nn.Module) -> Callable[[jax.Array], Any]:
    """rng -> params boxed with their logical axes (for abstract states and sharded init)."""
    return lambda rng: module.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def param_shardings(module: nn.Module, mesh: jax.sharding.Mesh, rules) -> Any:
    """NamedShardings of `module`'s params from its logical axis annotations (nothing allocated)."""
    with mesh_lib.sharding_context(mesh, rules):
        boxed = jax.eval_shape(init_fn(module), mesh_lib.abstract_key())
        return mesh_lib.logical_shardings(boxed, mesh, rules)


def abstract_params(module: nn.Module, mesh: jax.sharding.Mesh, rules) -> Any:
    """ShapeDtypeStructs of `module`'s params, each carrying its sharding (restore / AOT targets)."""
    with mesh_lib.sharding_context(mesh, rules):
        shapes = jax.eval_shape(lambda r: nn.meta.unbox(init_fn(module)(r)), mesh_lib.abstract_key())
    return mesh_lib.with_shardings(shapes, param_shardings(module, mesh, rules))


def place(host_tree: Any, shardings: Any, dtype=None) -> Any:
    """Host (numpy) pytree -> global arrays in `shardings`, each device receiving only its slice."""
    cast = (lambda x: np.asarray(x)) if dtype is None else (lambda x: np.asarray(x, dtype))
    return jax.tree.map(lambda x, s: mesh_lib.put_sharded(cast(x), s), host_tree, shardings)


def _layer_update(sharding):
    """jit (stacked [L, ...], layer [...], l) -> stacked with layer l replaced, in place (donated)."""
    return jax.jit(lambda stacked, layer, index: jax.lax.dynamic_update_index_in_dim(stacked, layer, index, 0),
                   out_shardings=sharding, donate_argnums=0)


def place_streamed(plan: Any, shardings: Any, dtype=None) -> Any:
    """A plan of hf.Streamed leaves -> global arrays in `shardings`, one checkpoint tensor at a time.

    A plain leaf is read, cast and put (each device receives only its slice); a stacked [L, ...]
    leaf starts as zeros on the devices and each layer is read, put in the layer's sharding and
    written into it in place, so the host never holds more than one tensor of the checkpoint
    (plus its converted copy) and never a whole stacked parameter.
    """
    def put(leaf: hf.Streamed, sharding):
        target = np.dtype(leaf.dtype if dtype is None else dtype)
        if not leaf.stacked:
            return mesh_lib.put_sharded(np.asarray(leaf.parts[0](), target), sharding)
        spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
        layer_sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
        stacked = jax.jit(lambda: jnp.zeros(leaf.shape, target), out_shardings=sharding)()
        update = _layer_update(sharding)
        for index, part in enumerate(leaf.parts):
            layer = mesh_lib.put_sharded(np.asarray(part(), target), layer_sharding)
            stacked = update(stacked, layer, np.int32(index))
            del layer
        return stacked

    return jax.tree.map(put, plan, shardings, is_leaf=hf.is_streamed)


def _resized_plan(cfg, plan: dict, vocab_size: int) -> dict:
    """Streams the embeddings (and untied LM head) through _resized_host when the vocabulary grows
    or shrinks; every other leaf is untouched."""
    if vocab_size == cfg.vocab_size:
        return plan

    def resized(leaf: hf.Streamed, key: str) -> hf.Streamed:
        def read():
            table = leaf.parts[0]()
            if key == "embedding":
                return _resized_host(cfg, {"model": {"embed_tokens": {"embedding": table}}}, vocab_size)["model"][
                    "embed_tokens"]["embedding"]
            dummy = {"model": {"embed_tokens": {"embedding": np.zeros((cfg.vocab_size, 1), table.dtype)}},
                     "lm_head": {"kernel": table}}
            return _resized_host(cfg, dummy, vocab_size)["lm_head"]["kernel"]

        shape = (vocab_size,) + leaf.shape[1:] if key == "embedding" else leaf.shape[:1] + (vocab_size,)
        return leaf._replace(shape=shape, parts=(read,))

    plan = dict(plan, model=dict(plan["model"]))
    plan["model"]["embed_tokens"] = {"embedding": resized(plan["model"]["embed_tokens"]["embedding"], "embedding")}
    if "lm_head" in plan:
        plan["lm_head"] = {"kernel": resized(plan["lm_head"]["kernel"], "kernel")}
    return plan


def _resized_host(cfg, params: dict, vocab_size: int) -> dict:
    """Resizes the token embeddings (and LM head) on the host CPU; new rows = mean of the old."""
    if vocab_size == cfg.vocab_size:
        return params
    log.info("resizing the vocabulary %d -> %d (new rows = mean of the old)", cfg.vocab_size, vocab_size)
    with jax.default_device(jax.devices("cpu")[0]):
        _, params = decoder.resize_token_embeddings(cfg, params, vocab_size)
    return jax.tree.map(np.asarray, params)


def load_policy(settings: ModelSettings, mesh, rules, *, vocab_size: int, special: Mapping | None = None,
                rng: jax.Array) -> Placed:
    """A causal LM on the mesh: settings.init_path's weights (vocabulary resized to vocab_size)
    or a random init from settings.hf_config (with `rng`)."""
    cfg = model_config(settings, vocab_size=vocab_size, special=special)
    module = models.causal_lm(cfg)
    shardings = param_shardings(module, mesh, rules)
    if settings.init_path:
        stored = hf.load_config(settings.init_path, **settings.runtime())
        plan = hf.lm_params_plan(stored, hf.read_safetensors_dir(settings.init_path))
        plan = _resized_plan(stored, plan, vocab_size)
        params = place_streamed(plan, shardings, np.dtype(jnp.dtype(cfg.param_dtype)))
    else:
        params, _ = mesh_lib.init_sharded(init_fn(module), rng, mesh, rules)
    return Placed(cfg=cfg, module=module, params=params, shardings=shardings)


def _backbone_with_fresh_heads(settings: ModelSettings, cfg, shardings: dict, vocab_size: int,
                               fresh_heads: Callable[[], dict]) -> dict:
    """Params of settings.init_path's backbone (streamed, vocabulary resized) + fresh_heads()
    ({name: host params} for every top-level entry besides "model"), each in `shardings`."""
    stored = hf.load_config(settings.init_path, **settings.runtime())
    backbone = hf.backbone_plan(stored, hf.read_safetensors_dir(settings.init_path))
    backbone = _resized_plan(stored, {"model": backbone}, vocab_size)["model"]
    with jax.default_device(jax.devices("cpu")[0]):
        heads = jax.tree.map(np.asarray, fresh_heads())
    dtype = np.dtype(jnp.dtype(cfg.param_dtype))
    params = {"model": place_streamed(backbone, shardings["model"], dtype)}
    params.update({name: place(tree, shardings[name], dtype) for name, tree in heads.items()})
    return params


def load_backbone_with_head(settings: ModelSettings, head: score.ScoreHead, mesh, rules, *, vocab_size: int,
                            special: Mapping | None = None, rng: jax.Array) -> Placed:
    """A score model on the mesh: the backbone of the causal LM in settings.init_path (vocabulary
    resized) with a fresh score head initialised from `rng`, or a random init (all of it from `rng`)
    from settings.hf_config."""
    cfg = model_config(settings, vocab_size=vocab_size, special=special)
    module = head.model(cfg)
    shardings = param_shardings(module, mesh, rules)
    if settings.init_path:
        fresh = lambda: {"score_head": score.init_params_from_backbone(  # noqa: E731
            None, cfg, rng, head.score_dim, head.score_bias)["score_head"]}
        params = _backbone_with_fresh_heads(settings, cfg, shardings, vocab_size, fresh)
        log.info("score model: backbone of %s + a fresh %s head", settings.init_path, head.score_type)
    else:
        params, _ = mesh_lib.init_sharded(init_fn(module), rng, mesh, rules)
    return Placed(cfg=cfg, module=module, params=params, shardings=shardings, head=head,
                  stats=jax.device_get(score.init_normalizer(head.score_dim)))


def load_score_model(path: str | pathlib.Path, mesh, rules, settings: ModelSettings = ModelSettings(), *,
                     score_type: str | None = None, min_vocab_size: int | None = None) -> Placed:
    """A saved score model (a reward/cost stage export) on the mesh, with its head and statistics.

    score_type overrides the stored one ("critic" for a critic initialised from a reward model);
    min_vocab_size: the vocabulary it must cover (RL: the actor's tokenizer, as safe-rlhf's rl_trainer.py).
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise score.ScoreModelError(f"score model directory {path} does not exist")
    config, where = hf.read_config(path), str(path / hf.CONFIG_NAME)
    head = score.read_score_head(config, where, **({} if score_type is None else {"score_type": score_type}))
    stats = score.read_normalizer_stats(config, head.score_dim, where)
    cfg = hf.load_config(path, **settings.runtime())
    if min_vocab_size is not None and cfg.vocab_size < min_vocab_size:
        raise ValueError(f"score model {path} has a vocabulary of {cfg.vocab_size} < the tokenizer's "
                         f"{min_vocab_size}; train it with the same tokenizer (RL: or keep its own tokenizer files in "
                         f"the dir, then sequences are re-tokenised)")
    module = head.model(cfg)
    shardings = param_shardings(module, mesh, rules)
    params = place_streamed(_score_plan(cfg, hf.read_safetensors_dir(path), head), shardings)
    return Placed(cfg=cfg, module=module, params=params, shardings=shardings, head=head,
                  stats=jax.device_get(stats))


def _score_plan(cfg, tensors, head: score.ScoreHead) -> dict:
    """The streaming twin of score.score_params_from_hf_tensors (same checks, hf.Streamed leaves)."""
    hf.check_tensors(tensors, score.score_head_hf_shapes(cfg, head), where="score model checkpoint")
    dtype = np.dtype(cfg.weight_dtype)
    kernel = lambda: np.asarray(tensors["score_head.weight"]).T.astype(dtype)  # noqa: E731
    plan = {"model": hf.backbone_plan(cfg, tensors, dtype=dtype),
            "score_head": {"kernel": hf.Streamed((cfg.hidden_size, head.score_dim), dtype, (kernel,))}}
    if head.score_bias:
        bias = lambda: np.asarray(tensors["score_head.bias"]).astype(dtype)  # noqa: E731
        plan["score_head"]["bias"] = hf.Streamed((head.score_dim,), dtype, (bias,))
    return plan


def _gather_to_host(tree: Any) -> Any:
    """Every process gets the full arrays (multi-host exports); a no-op on one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return tree


def _write_export(out_dir: str | pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Process 0 runs write(tmp) into a temporary sibling of out_dir, writes its manifest
    (files.MANIFEST_NAME, last) and renames it onto out_dir: a crash at any point leaves the
    previous export whole (jaxalign/files.py)."""
    out = pathlib.Path(out_dir)
    if jax.process_index() == 0:
        with files.atomic_dir(out, overwrite=True, manifest=True) as tmp:
            write(tmp)
    return out


def check_export(path: str | pathlib.Path) -> str:
    """"" when `path` is a complete export, else what is wrong with it (one line): its manifest
    (written last) lists every file with its size and sha256 and they all match, config.json
    parses, every safetensors file's header and offsets are valid, and its tokenizer loads."""
    path = pathlib.Path(path)
    files.recover(path)
    if not path.is_dir():
        return f"{path} does not exist"
    intact, problem = files.verify_manifest(path)
    if not intact:
        return problem if intact is False else f"{path} has {problem} (an export cut off, or written before manifests)"
    try:
        if (path / ADAPTER_CONFIG_NAME).is_file():
            from safetensors import safe_open

            json.loads((path / ADAPTER_CONFIG_NAME).read_text())
            with safe_open(str(path / ADAPTER_WEIGHTS_NAME), framework="numpy") as handle:
                list(handle.keys())
        else:
            hf.read_config(path)
            hf.read_safetensors_dir(path)
        from jaxalign.models.tokenizer import load_tokenizer

        load_tokenizer(path)
    except Exception as error:  # noqa: BLE001 - any failure to load means: export again
        return f"{path}: {type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
    return ""


def export_policy(out_dir: str | pathlib.Path, cfg, params: Any, tokenizer) -> pathlib.Path:
    """out_dir: HF config.json + safetensors + tokenizer files (written by process 0, atomically)."""
    params = _gather_to_host(params)

    def write(tmp):
        hf.save_pretrained(tmp, cfg, params, max_shard_size="5GB")
        tokenizer.save_pretrained(str(tmp))

    return _write_export(out_dir, write)


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"


def export_lora_policy(out_dir: str | pathlib.Path, cfg, base: Any, adapters: Any, settings: lora.LoraSettings,
                       tokenizer, kind: str = "merged", base_model: str = "") -> pathlib.Path:
    """A LoRA policy: kind "merged" = an HF dir of W + alpha/r * A @ B (export_policy; every loader reads
    it); "adapters" = an HF PEFT dir (adapter_config.json + adapter_model.safetensors, fp32) + tokenizer
    files, to be applied on `base_model` (load_lora_adapters)."""
    if kind == "merged":
        return export_policy(out_dir, cfg, lora.merge(base, adapters, settings), tokenizer)
    if kind != "adapters":
        raise ValueError(f"LoRA export kind must be 'merged' or 'adapters', got {kind!r}")
    from safetensors.numpy import save_file

    adapters = _gather_to_host(adapters)

    def write(tmp):
        save_file(lora.to_peft(adapters), str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(lora.peft_config(settings, base_model), indent=2))
        tokenizer.save_pretrained(str(tmp))

    return _write_export(out_dir, write)


def load_lora_adapters(path: str | pathlib.Path, cfg) -> tuple[lora.LoraSettings, dict]:
    """An adapters export (HF PEFT dir) for causal_lm(cfg) -> (settings, host adapter tree, fp32)."""
    path = pathlib.Path(path)
    config_file = path / ADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} does not exist: not a LoRA adapters export")
    settings = lora.settings_from_peft(json.loads(config_file.read_text()), str(config_file))
    from safetensors.numpy import load_file

    try:
        return settings, lora.from_peft(load_file(str(path / ADAPTER_WEIGHTS_NAME)), cfg, settings)
    except KeyError as e:
        raise ValueError(f"{path / ADAPTER_WEIGHTS_NAME}: missing tensor {e}") from None


def export_score_model(out_dir: str | pathlib.Path, cfg, params: Any, head: score.ScoreHead, stats: dict,
                       tokenizer) -> pathlib.Path:
    """out_dir: a score-model dir (normalizer statistics in config.json) + tokenizer files."""
    params, stats = _gather_to_host((params, stats))

    def write(tmp):
        score.save_score_model(tmp, cfg, params, head, stats, max_shard_size="5GB")
        tokenizer.save_pretrained(str(tmp))

    return _write_export(out_dir, write)


def load_moderation_model(settings: ModelSettings, mesh, rules, *, head=None, vocab_size: int | None = None,
                          special: Mapping | None = None, rng: jax.Array | None = None,
                          min_vocab_size: int | None = None) -> Placed:
    """A moderation model (models/moderation.py) on the mesh, by what settings.init_path holds:

      * a moderation export (its config.json has the head fields): its weights and stored head;
      * a causal LM / score model dir (e.g. the SFT export): its backbone (vocabulary resized to
        vocab_size) + fresh heads of `head` from `rng`;
      * "" : a random init of settings.hf_config (all of it from `rng`).
    Placed.head is the ModerationHead. min_vocab_size: the vocabulary a saved model must cover.
    """
    from jaxalign.models import moderation

    if settings.init_path and moderation.is_moderation_config(hf.read_config(settings.init_path)):
        runtime = settings.runtime()
        cfg, stored_head, host = moderation.load_moderation_model(settings.init_path, dtype=runtime.pop("dtype"),
                                                                  on_host=True, **runtime)
        if min_vocab_size is not None and cfg.vocab_size < min_vocab_size:
            raise ValueError(f"moderation model {settings.init_path} has a vocabulary of {cfg.vocab_size} < the "
                             f"tokenizer's {min_vocab_size}; train it with the same tokenizer")
        module = stored_head.model(cfg)
        shardings = param_shardings(module, mesh, rules)
        return Placed(cfg=cfg, module=module, params=place(host, shardings), shardings=shardings, head=stored_head)
    if head is None or rng is None or vocab_size is None:
        raise ValueError(f"{settings.init_path or 'config.model.hf_config'} is not a moderation model; fresh heads "
                         "need head, vocab_size and rng")
    cfg = model_config(settings, vocab_size=vocab_size, special=special)
    module = head.model(cfg)
    shardings = param_shardings(module, mesh, rules)
    if settings.init_path:
        params = _backbone_with_fresh_heads(settings, cfg, shardings, vocab_size,
                                            lambda: moderation.init_heads(cfg, rng, head))
        log.info("moderation model: backbone of %s + fresh heads", settings.init_path)
    else:
        params, _ = mesh_lib.init_sharded(init_fn(module), rng, mesh, rules)
    return Placed(cfg=cfg, module=module, params=params, shardings=shardings, head=head)


def export_moderation_model(out_dir: str | pathlib.Path, cfg, params: Any, head, tokenizer) -> pathlib.Path:
    """out_dir: a moderation-model dir (head fields and threshold in config.json) + tokenizer files."""
    from jaxalign.models import moderation

    params = _gather_to_host(params)

    def write(tmp):
        moderation.save_moderation_model(tmp, cfg, params, head, max_shard_size="5GB")
        tokenizer.save_pretrained(str(tmp))

    return _write_export(out_dir, write)
