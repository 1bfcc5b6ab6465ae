"""HF checkpoint directories (config.json + safetensors) <-> (family config, params).

    cfg, params = hf.from_pretrained(path, dtype="float32")   # any family (families.py): by model_type
    hf.save_pretrained(out_dir, cfg, params, max_shard_size=None)

The family (families.py) is chosen by config.json's model_type when loading and by the config's
class when saving; its tensor map says where each decoder-layer tensor goes.

Tensors are read one at a time (safetensors, never pickle) and checked against the shapes the
config implies: a missing, unexpected or mis-shaped tensor raises `CheckpointError` naming it.
The backbone mapping is public (`backbone_to_hf_tensors` / `backbone_from_hf_tensors`) so
score models can save and load "backbone + head" directories with the same code.

Torch Linear weights are [out, in]; our kernels are [in, ...out] (q_proj [D, H, Dh],
o_proj [H, Dh, D]), so conversion is a reshape + transpose. RoPE uses the HF rotate-half layout
on both sides, so q/k need no permutation.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Callable, Iterator, Mapping, NamedTuple

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxalign.models import families
from jaxalign.models.config import DecoderConfig

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# Buffers some checkpoints carry that are not parameters (recomputed from the config).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint directory does not match what the config implies."""


# ----------------------------------------------------------------------------- safetensors I/O


class SafetensorsReader(Mapping):
    """Lazy read-only mapping name -> np.ndarray over a checkpoint dir's safetensors files
    (single `model.safetensors` or sharded with `model.safetensors.index.json`).
    `shape(name)` reads only the header. Errors (CheckpointError) name the file: a malformed or
    truncated safetensors file, a malformed index, a weight_map entry pointing outside the
    folder, a listed shard that is missing or lacks a tensor the index places in it."""

    def __init__(self, path: str | os.PathLike):
        path = pathlib.Path(path)
        index = path / SAFE_WEIGHTS_INDEX_NAME
        single = path / SAFE_WEIGHTS_NAME
        weight_map: dict[str, str] = {}
        if index.exists():
            weight_map = _read_weight_map(index)
            files = sorted(set(weight_map.values()))
        elif single.exists():
            files = [SAFE_WEIGHTS_NAME]
        else:
            raise CheckpointError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME} in {path}")
        self._path = path
        self._handles = {}
        self._where = {}
        self._layout: dict[str, tuple[str, tuple[int, ...], int, int]] = {}  # name -> (dtype, shape, begin, end)
        for file in files:
            if not (path / file).is_file():
                raise CheckpointError(f"shard {file} listed in {index} is missing")
            try:
                handle = safe_open(str(path / file), framework="numpy")  # validates header and offsets
                names = list(handle.keys())
                self._layout.update(_data_layout(path / file))
            except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
                raise CheckpointError(f"malformed safetensors file {path / file}: {e}") from e
            self._handles[file] = handle
            for name in names:
                if name in self._where:
                    raise CheckpointError(f"tensor {name} is in both {path / self._where[name]} and {path / file}")
                self._where[name] = file
        absent = sorted(n for n, f in weight_map.items() if self._where.get(n) != f)
        if absent:
            raise CheckpointError(
                f"{index}: {len(absent)} tensors are not in the shard their weight_map entry names, e.g. "
                f"{absent[0]} -> {weight_map[absent[0]]}"
            )

    def _read(self, name: str, what: Callable):
        file = self._where[name]
        try:
            return what(self._handles[file])
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name} from {self._path / file}: {e}") from e

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor, read with pread into a fresh buffer: no memory-mapped page of the file stays
        resident (mmap pages count in the process's RSS until the file is closed)."""
        dtype, shape, begin, end = self._layout.get(name, (None, None, 0, 0))
        if dtype not in _NUMPY_DTYPES:  # exotic dtypes: safetensors' own reader
            return self._read(name, lambda handle: handle.get_tensor(name))

        def read(_):
            buffer = np.empty(math.prod(shape), _NUMPY_DTYPES[dtype])
            view = memoryview(buffer.view(np.uint8).reshape(-1))
            with open(self._path / self._where[name], "rb", buffering=0) as f:
                done = 0
                while done < end - begin:
                    got = os.preadv(f.fileno(), [view[done:]], begin + done)
                    if got <= 0:
                        raise OSError(f"unexpected end of file at byte {begin + done}")
                    done += got
            return buffer.reshape(shape)

        return self._read(name, read)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._read(name, lambda handle: handle.get_slice(name).get_shape()))


_NUMPY_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                 "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _data_layout(file: pathlib.Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, first byte, end byte) of every tensor in a safetensors file, from its
    header (8-byte little-endian length + JSON); offsets are absolute in the file."""
    with open(file, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(length))
    layout = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        layout[name] = (info["dtype"], tuple(int(d) for d in info["shape"]), 8 + length + begin, 8 + length + end)
    return layout


def _read_weight_map(index: pathlib.Path) -> dict[str, str]:
    """The weight_map of a model.safetensors.index.json: tensor name -> shard file, every shard
    a relative path inside the index's folder (no absolute path, no "..")."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"malformed {index}: {e}") from e
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()
    ):
        raise CheckpointError(f"malformed {index}: weight_map must map tensor names to shard file names")
    for name, file in weight_map.items():
        parts = pathlib.PurePosixPath(file.replace("\\", "/")).parts
        if file.startswith(("/", "\\")) or pathlib.PureWindowsPath(file).drive or ".." in parts:
            raise CheckpointError(
                f"{index}: weight_map entry {name} -> {file!r} points outside {index.parent}; "
                "shards must be files inside the checkpoint folder"
            )
    return weight_map


def read_safetensors_dir(path: str | os.PathLike) -> SafetensorsReader:
    """Lazy mapping of every tensor in a checkpoint dir (single file or sharded)."""
    return SafetensorsReader(path)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    text = size.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


def write_safetensors(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    max_shard_size: int | str | None = None,
) -> list[str]:
    """Writes tensors as model.safetensors, or as shards of at most max_shard_size bytes
    (int or "10MB"/"2GiB") plus model.safetensors.index.json. Returns the written file names."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    limit = None if max_shard_size is None else _parse_size(max_shard_size)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if limit is not None and shards[-1] and size + array.nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    for stale in (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME):
        (out_dir / stale).unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        return [SAFE_WEIGHTS_NAME]
    names, weight_map = [], {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        names.append(file)
        weight_map.update({k: file for k in shard})
    index = {
        "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
        "weight_map": weight_map,
    }
    (out_dir / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))
    return names


# ----------------------------------------------------------------------------- config.json


def read_config(path: str | os.PathLike) -> dict:
    """The config.json dict of a checkpoint dir; a clear error when missing or malformed."""
    file = pathlib.Path(path) / CONFIG_NAME
    if not file.exists():
        raise CheckpointError(f"{file} does not exist")
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"malformed {file}: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"malformed {file}: expected a JSON object")
    return config


def write_config(out_dir: str | os.PathLike, config: dict) -> None:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ----------------------------------------------------------------------------- name mapping
#
# A family's hf_layer_map(cfg) gives, per decoder-layer tensor, its HF suffix, its path in our
# layer params, the two layout conversions and its torch shape (see tensor_map.py).


def _layer_spec(cfg: DecoderConfig):
    return families.of(cfg).hf_layer_map(cfg)


def _get(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _layer_params(cfg: DecoderConfig, backbone: Mapping, i: int) -> Mapping:
    if cfg.scan_layers:
        return jax.tree_util.tree_map(lambda x: x[i], backbone["layers"])
    return backbone[f"layers_{i}"]


def backbone_hf_shapes(cfg: DecoderConfig, prefix: str = "model.") -> dict[str, tuple[int, ...]]:
    """Expected HF tensor names -> torch shapes of the backbone."""
    shapes = {
        f"{prefix}embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size),
        f"{prefix}norm.weight": (cfg.hidden_size,),
    }
    for i in range(cfg.num_hidden_layers):
        for suffix, _, _, _, shape in _layer_spec(cfg):
            shapes[f"{prefix}layers.{i}.{suffix}"] = shape
    return shapes


def backbone_to_hf_tensors(
    cfg: DecoderConfig, backbone: Mapping, prefix: str = "model.", dtype=None
) -> dict[str, np.ndarray]:
    """Backbone params (params["model"], scanned or not) -> HF tensors {name: np [torch layout]}."""
    cast = lambda x: np.asarray(x if dtype is None else x.astype(dtype))  # noqa: E731
    out = {
        f"{prefix}embed_tokens.weight": cast(backbone["embed_tokens"]["embedding"]),
        f"{prefix}norm.weight": cast(backbone["norm"]["scale"]),
    }
    spec = _layer_spec(cfg)
    for i in range(cfg.num_hidden_layers):
        layer = _layer_params(cfg, backbone, i)
        for suffix, path, to_hf, _, _ in spec:
            out[f"{prefix}layers.{i}.{suffix}"] = cast(to_hf(np.asarray(_get(layer, path))))
    return out


def check_tensors(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    ignore: Callable[[str], bool] = lambda name: False,
    where: str = "checkpoint",
) -> None:
    """Raises CheckpointError naming every missing, unexpected or mis-shaped tensor."""
    shape_of = tensors.shape if hasattr(tensors, "shape") else (lambda n: tuple(tensors[n].shape))
    missing = sorted(n for n in expected if n not in tensors)
    unexpected = sorted(
        n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES) and not ignore(n)
    )
    wrong = [
        f"{n}: expected shape {tuple(expected[n])}, got {shape_of(n)}"
        for n in expected
        if n in tensors and tuple(shape_of(n)) != tuple(expected[n])
    ]
    problems = []
    if missing:
        problems.append(f"missing tensors: {missing}")
    if unexpected:
        problems.append(f"unexpected tensors: {unexpected}")
    if wrong:
        problems.append("mis-shaped tensors: " + "; ".join(wrong))
    if problems:
        raise CheckpointError(f"{where} does not match the config: " + " | ".join(problems))


def backbone_from_hf_tensors(
    cfg: DecoderConfig, tensors: Mapping[str, np.ndarray], prefix: str = "model.", dtype=None
) -> dict:
    """HF tensors -> backbone params in our layout (stacked when cfg.scan_layers), as numpy
    arrays of `dtype` (default cfg.param_dtype). Checks names and shapes of the backbone
    tensors; the caller checks for unexpected extra tensors (see check_tensors)."""
    dtype = cfg.weight_dtype if dtype is None else dtype
    expected = backbone_hf_shapes(cfg, prefix)
    missing = {n: s for n, s in expected.items() if n not in tensors}
    if missing:
        check_tensors({}, missing, where="checkpoint")
    load = lambda name: _checked(tensors, name, expected[name]).astype(dtype)  # noqa: E731
    backbone: dict = {
        "embed_tokens": {"embedding": load(f"{prefix}embed_tokens.weight")},
        "norm": {"scale": load(f"{prefix}norm.weight")},
    }
    spec = _layer_spec(cfg)
    layers = []
    for i in range(cfg.num_hidden_layers):
        layer: dict = {}
        for suffix, path, _, from_hf, _ in spec:
            _set(layer, path, from_hf(load(f"{prefix}layers.{i}.{suffix}")))
        layers.append(layer)
    if cfg.scan_layers:
        backbone["layers"] = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)
    else:
        for i, layer in enumerate(layers):
            backbone[f"layers_{i}"] = layer
    return backbone


def _checked(tensors: Mapping, name: str, shape: tuple[int, ...]) -> np.ndarray:
    array = tensors[name]
    if tuple(array.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name}: expected shape {tuple(shape)}, got {tuple(array.shape)}")
    return array


# ----------------------------------------------------------------------------- streaming plans
#
# A plan is the params tree with a `Streamed` leaf per parameter: its final shape and dtype and
# zero-argument readers that each read and convert ONE checkpoint tensor. loading.place_streamed
# puts the leaves on the mesh one tensor at a time, so a load never holds the whole model on the
# host (and a stacked [L, ...] scan parameter is assembled on the devices layer by layer).


class Streamed(NamedTuple):
    """One parameter, read lazily. shape/dtype: the parameter's (ours, stacked [L, ...] when
    stacked); parts: the readers, one per layer when stacked, else a single one for the whole
    parameter; each returns an np.ndarray in our layout (a layer's shape when stacked)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    parts: tuple[Callable[[], np.ndarray], ...]
    stacked: bool = False

    def read(self) -> np.ndarray:
        """The whole parameter on the host (tests and small models)."""
        arrays = [part() for part in self.parts]
        return np.stack(arrays) if self.stacked else arrays[0]


def _converted_shape(convert: Callable, shape: tuple[int, ...], dtype) -> tuple[int, ...]:
    """The shape `convert` (a reshape/transpose) gives a tensor of `shape`, without data."""
    return tuple(jax.eval_shape(convert, jax.ShapeDtypeStruct(shape, dtype)).shape)


def backbone_plan(cfg: DecoderConfig, tensors: Mapping[str, np.ndarray], prefix: str = "model.",
                  dtype=None) -> dict:
    """The streaming twin of backbone_from_hf_tensors: the same tree (stacked when cfg.scan_layers)
    with a Streamed leaf per parameter; names and shapes are checked from the headers only."""
    dtype = np.dtype(cfg.weight_dtype if dtype is None else dtype)
    expected = backbone_hf_shapes(cfg, prefix)
    missing = {n: s for n, s in expected.items() if n not in tensors}
    if missing:
        check_tensors({}, missing, where="checkpoint")
    shape_of = tensors.shape if hasattr(tensors, "shape") else (lambda n: tuple(tensors[n].shape))
    for name, shape in expected.items():
        if tuple(shape_of(name)) != tuple(shape):
            raise CheckpointError(f"tensor {name}: expected shape {tuple(shape)}, got {tuple(shape_of(name))}")

    def reader(name, convert=lambda x: x):
        return lambda: convert(np.asarray(tensors[name]).astype(dtype))

    def leaf(name, convert=lambda x: x):
        return Streamed(_converted_shape(convert, expected[name], dtype), dtype, (reader(name, convert),))

    backbone: dict = {"embed_tokens": {"embedding": leaf(f"{prefix}embed_tokens.weight")},
                      "norm": {"scale": leaf(f"{prefix}norm.weight")}}
    spec = _layer_spec(cfg)
    layer_name = lambda i, suffix: f"{prefix}layers.{i}.{suffix}"  # noqa: E731
    if cfg.scan_layers:
        stacked: dict = {}
        for suffix, path, _, from_hf, _ in spec:
            shape = _converted_shape(from_hf, expected[layer_name(0, suffix)], dtype)
            parts = tuple(reader(layer_name(i, suffix), from_hf) for i in range(cfg.num_hidden_layers))
            _set(stacked, path, Streamed((cfg.num_hidden_layers,) + shape, dtype, parts, stacked=True))
        backbone["layers"] = stacked
    else:
        for i in range(cfg.num_hidden_layers):
            layer: dict = {}
            for suffix, path, _, from_hf, _ in spec:
                _set(layer, path, leaf(layer_name(i, suffix), from_hf))
            backbone[f"layers_{i}"] = layer
    return backbone


def lm_params_plan(cfg: DecoderConfig, tensors: Mapping[str, np.ndarray], dtype=None) -> dict:
    """The streaming twin of params_from_hf_tensors (same checks, Streamed leaves)."""
    dtype = np.dtype(cfg.weight_dtype if dtype is None else dtype)
    tied_extra = lambda n: cfg.tie_word_embeddings and n == "lm_head.weight"  # noqa: E731
    check_tensors(tensors, lm_hf_shapes(cfg), ignore=tied_extra)
    plan = {"model": backbone_plan(cfg, tensors, dtype=dtype)}
    if not cfg.tie_word_embeddings:
        read = lambda: np.asarray(tensors["lm_head.weight"]).T.astype(dtype)  # noqa: E731
        plan["lm_head"] = {"kernel": Streamed((cfg.hidden_size, cfg.vocab_size), dtype, (read,))}
    return plan


def is_streamed(x) -> bool:
    return isinstance(x, Streamed)


# ----------------------------------------------------------------------------- causal LM


def lm_hf_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF tensor names -> shapes of the family's *ForCausalLM."""
    shapes = backbone_hf_shapes(cfg)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def params_to_hf_tensors(cfg: DecoderConfig, params: Mapping, dtype=None) -> dict[str, np.ndarray]:
    """Causal-LM params -> the family's *ForCausalLM tensors."""
    tensors = backbone_to_hf_tensors(cfg, params["model"], dtype=dtype)
    if not cfg.tie_word_embeddings:
        kernel = np.asarray(params["lm_head"]["kernel"])
        tensors["lm_head.weight"] = kernel.T if dtype is None else kernel.T.astype(dtype)
    return tensors


def params_from_hf_tensors(cfg: DecoderConfig, tensors: Mapping[str, np.ndarray], dtype=None) -> dict:
    """The family's *ForCausalLM tensors -> causal-LM params (numpy), with full name and shape
    checks."""
    dtype = cfg.weight_dtype if dtype is None else dtype
    # A tied checkpoint may still carry a copy of the embeddings as lm_head.weight.
    tied_extra = lambda n: cfg.tie_word_embeddings and n == "lm_head.weight"  # noqa: E731
    check_tensors(tensors, lm_hf_shapes(cfg), ignore=tied_extra)
    params = {"model": backbone_from_hf_tensors(cfg, tensors, dtype=dtype)}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = {"kernel": np.asarray(tensors["lm_head.weight"]).T.astype(dtype)}
    return params


def load_config(path: str | os.PathLike, **overrides) -> DecoderConfig:
    """The family config (llama.LlamaConfig, qwen.Qwen3Config, gemma.Gemma2Config, ...) of a
    checkpoint dir's config.json, chosen by its model_type (errors name the file)."""
    file = pathlib.Path(path) / CONFIG_NAME
    try:
        return families.config_from_hf(read_config(path), **overrides)
    except (ValueError, TypeError, KeyError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{file}: {e}") from e


def config_from_hf(hf_config: Mapping, **overrides) -> DecoderConfig:
    """The family config of an HF config.json dict, chosen by its model_type (no model_type:
    llama); the same as models.config_from_hf."""
    return families.config_from_hf(hf_config, **overrides)


def from_pretrained(path: str | os.PathLike, dtype: str = "float32", **overrides):
    """(cfg, params) from an HF checkpoint dir of any supported family (config.json's
    model_type: families.SUPPORTED_MODEL_TYPES). `dtype` is the compute dtype (cfg.dtype);
    params are stored in cfg.param_dtype (override with param_dtype=...). Params are jax arrays."""
    cfg = load_config(path, dtype=dtype, **overrides)
    params = params_from_hf_tensors(cfg, read_safetensors_dir(path))
    return cfg, jax.tree_util.tree_map(jax.numpy.asarray, params)


def save_pretrained(
    out_dir: str | os.PathLike,
    cfg: DecoderConfig,
    params: Mapping,
    max_shard_size: int | str | None = None,
) -> None:
    """Writes config.json + model.safetensors (sharded when max_shard_size is given) that the
    family's transformers class (LlamaForCausalLM, Qwen3ForCausalLM, Gemma2ForCausalLM, ...)
    from_pretrained loads. Tensors are saved in cfg.param_dtype."""
    tensors = params_to_hf_tensors(cfg, jax.device_get(params))
    tensors = {k: v.astype(cfg.weight_dtype) for k, v in tensors.items()}
    write_safetensors(out_dir, tensors, max_shard_size=max_shard_size)
    write_config(out_dir, cfg.to_hf_config())
