"""The config every decoder family shares: its HF hyper-parameters (HF names), the runtime fields,
and the hooks through which a family's config tells the shared blocks what it is.

A family's config subclasses DecoderConfig with its model_type / hf_architecture class constants,
its own HF keys as fields (`_fields_from_hf`, `to_hf_config`) and, where it differs from a plain
pre-norm decoder, the hooks:

    attention_options   layers.AttentionOptions: q/k/v and o biases, per-head q/k norm, query scale,
                        attention logit softcap (the same for every layer)
    attention_kinds     the distinct kinds of attention layer, each its RoPE and sliding window
    layer_kinds         per layer, the index of its kind (Gemma: sliding layers between global ones)

Frozen and hashable, so a config is a static argument of jit; the class is the family, so a config
can never disagree with its family (families.of).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import jax.numpy as jnp

from jaxalign.models.attention_kernels import check_impl
from jaxalign.models.layers import RopeScaling, parse_rope_scaling

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": "nothing_saveable",
    "nothing_saveable": "nothing_saveable",
    "dots_saveable": "dots_saveable",
    "dots_with_no_batch_dims_saveable": "dots_with_no_batch_dims_saveable",
    "everything_saveable": "everything_saveable",
}
_REQUIRED_HF_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
    """The sampler's layout of the same weights (made by layouts.decode_params, never stored or
    exported): q/k/v fused as "qkv_proj" [D, KV, G+2, Dh] and gate/up as "gate_up_proj" [D, F, 2],
    matmul inputs in matmul_dtype (None: the compute dtype; "int8": qwix int8 kernels)."""

    matmul_dtype: str | None = None

    def __post_init__(self):
        if self.matmul_dtype not in (None, "float32", "bfloat16", "int8"):
            raise ValueError(f"matmul_dtype={self.matmul_dtype!r} is not one of None, float32, bfloat16, int8")


@dataclasses.dataclass(frozen=True)
class AttentionOptions:
    """What a family's attention layers do besides RoPE and GQA, the same in every layer."""

    qkv_bias: bool = False  # biases on q/k/v (Llama attention_bias, Qwen2 always)
    o_bias: bool = False  # a bias on o_proj (Llama attention_bias)
    qk_norm: bool = False  # per-head norm of q and k over head_dim before RoPE (Qwen3, Gemma 3)
    query_scale: float | None = None  # None: head_dim ** -0.5 (Gemma: query_pre_attn_scalar ** -0.5)
    softcap: float | None = None  # attention logit softcap (Gemma 2)


@dataclasses.dataclass(frozen=True)
class AttentionKind:
    """One kind of attention layer: its RoPE (theta, scaling) and sliding window (None: global)."""

    rope_theta: float
    rope_scaling: RopeScaling | None = None
    window: int | None = None


def parse_rope(hf: Mapping, default_theta: float = 10000.0) -> tuple[float, RopeScaling | None]:
    """(rope_theta, RopeScaling or None) of an HF config dict: legacy rope_theta / rope_scaling keys
    or transformers-5 rope_parameters (rope_theta inside it)."""
    rope_theta = hf.get("rope_theta")
    rope = hf.get("rope_scaling")
    params = hf.get("rope_parameters")
    if params is not None:
        params = dict(params)
        if "rope_theta" in params:
            rope_theta = params.pop("rope_theta")
        if rope is None:
            rope = params
    scaling = parse_rope_scaling(dict(rope)) if rope else None
    return float(rope_theta if rope_theta is not None else default_theta), scaling


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters every family has (HF names) plus runtime fields (dtype, param_dtype, scan,
    remat, attention_impl, decode_layout). Subclasses add their HF keys and override the hooks (module docstring)."""

    model_type: ClassVar[str]
    hf_architecture: ClassVar[str]

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None -> num_attention_heads (MHA)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # Runtime fields (not in HF config.json).
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"
    attention_impl: str = "auto"  # auto (by platform: pallas on TPU, cudnn on GPU, else xla) | xla | pallas | cudnn
    decode_layout: DecodeLayout | None = None  # set by layouts.decode_params only

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", parse_rope_scaling(dict(self.rope_scaling)))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in DTYPES:
                raise ValueError(f"{field}={getattr(self, field)!r} is not one of {sorted(DTYPES)}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r} is not one of {sorted(REMAT_POLICIES)}")
        check_impl(self.attention_impl)

    # ------------------------------------------------------------------ family hooks

    @property
    def attention_options(self) -> AttentionOptions:
        """What every attention layer of the family does besides RoPE and GQA (default: nothing)."""
        return AttentionOptions()

    @property
    def attention_kinds(self) -> tuple[AttentionKind, ...]:
        """The distinct kinds of attention layer (default: one, global, with the model's RoPE)."""
        return (AttentionKind(self.rope_theta, self.rope_scaling),)

    @property
    def layer_kinds(self) -> tuple[int, ...]:
        """Per layer, the index of its kind in attention_kinds (default: all 0)."""
        return (0,) * self.num_hidden_layers

    # ------------------------------------------------------------------ derived

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """EOS ids as a tuple (empty when none)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @property
    def matmul_dtype(self) -> str | None:
        """The matmul-input dtype of the decode layout (None: the compute dtype)."""
        return None if self.decode_layout is None else self.decode_layout.matmul_dtype

    # ------------------------------------------------------------------ HF config.json

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], **overrides) -> "DecoderConfig":
        """Builds a config from an HF config.json dict; `overrides` set any field (e.g. dtype,
        scan_layers). A config.json without model_type is read as this class's family."""
        hf = dict(hf)
        model_type = hf.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(
                f"model_type={model_type!r} is not {cls.model_type!r}: read it with "
                "hf.load_config or models.config_from_hf, which pick the family"
            )
        fields = cls._fields_from_hf(hf)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown {cls.__name__} overrides: {unknown}")
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def _fields_from_hf(cls, hf: dict) -> dict:
        """The shared fields of an HF config dict; families add their keys (super() then update)."""
        missing = [k for k in _REQUIRED_HF_KEYS if hf.get(k) is None]
        if missing:
            raise ValueError(f"HF config is missing required keys: {missing}")
        attention_dropout = hf.get("attention_dropout") or 0.0
        if attention_dropout != 0.0:
            raise ValueError(f"unsupported attention_dropout={attention_dropout!r}; must be 0.0")
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        rope_theta, rope_scaling = parse_rope(hf, defaults["rope_theta"])
        return dict(
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_hidden_layers=int(hf["num_hidden_layers"]),
            num_attention_heads=int(hf["num_attention_heads"]),
            num_key_value_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"),
            rms_norm_eps=float(hf.get("rms_norm_eps", defaults["rms_norm_eps"])),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", defaults["tie_word_embeddings"])),
            max_position_embeddings=int(hf.get("max_position_embeddings", defaults["max_position_embeddings"])),
            initializer_range=float(hf.get("initializer_range", defaults["initializer_range"])),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )

    def to_hf_config(self) -> dict:
        """The shared keys of the family's config.json (families add theirs)."""
        eos = self.eos_token_id
        return {
            "architectures": [self.hf_architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_hf() if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "max_position_embeddings": self.max_position_embeddings,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
