"""Whether a decoder's layer loop (nn.scan over the stacked layers, decoder.Backbone) runs unrolled.

On single-device XLA:CPU an unrolled loop is faster for fwd+bwd (1.06-1.18x: no while loop whose
stacked residual buffers are zeroed and copied) and for decoding, while a forward alone is faster
rolled (1.1-1.3x; hidden 512, 8 layers, [8, 64] .. [4, 512] tokens) except for tiny models.
Elsewhere the loop stays rolled: see unroll_layers.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_FORWARD_ONLY = contextvars.ContextVar("jaxalign_forward_only", default=False)


def unroll_layers() -> bool:
    """Whether to run the layers unrolled: on XLA:CPU with whole weights on each device. It is
    ~10% faster there (fwd+bwd: no while loop whose stacked residual buffers are zeroed and
    copied through; decode: no per-layer slices of the weights and the stacked cache in the
    loop, 1.8x faster here). With weights sharded over a mesh
    the layers stay a loop, so each layer's weights are gathered inside its own iteration:
    unrolled inside the sampler's loop, XLA hoists every layer's gather out of it and holds the
    whole model on every device (7B at fsdp 64: 3.3 -> 50 GiB per device). A rolled loop also
    compiles faster, which matters on accelerators with many layers."""
    mesh = jax.sharding.get_abstract_mesh()
    return platform() == "cpu" and (mesh.empty or mesh.size == 1)


def platform() -> str:
    """The platform the traced program is for: the current mesh's devices (compile-only TPU devices
    when jaxalign.plan compiles on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


@contextlib.contextmanager
def forward_only():
    """Functions traced inside keep the layer loop rolled even where unroll_layers() holds (for
    models of hidden >= ROLLED_FORWARD_MIN_HIDDEN): on XLA:CPU a forward alone runs 1.1-1.3x faster
    rolled, while fwd+bwd runs 1.06-1.18x faster unrolled (hidden 512, 8 layers; [8, 64] .. [4, 512]
    tokens). For scoring and evaluation steps:
    enter it inside the jitted function, where tracing happens. Same params, same numbers."""
    token = _FORWARD_ONLY.set(True)
    try:
        yield
    finally:
        _FORWARD_ONLY.reset(token)


# Inside forward_only() the loop is rolled from this width on. The RL score step (six forwards)
# measured rolled / unrolled: 1.13x faster rolled at hidden 512 x 8 layers, 0.85x at hidden 64 x 2
# layers (the tiny models, where the loop's per-iteration overhead dominates).
ROLLED_FORWARD_MIN_HIDDEN = 512


def unroll_training(hidden_size: int) -> bool:
    """The rule decoder.Backbone's layer scan follows: unroll_layers(), except inside forward_only() for
    models at least ROLLED_FORWARD_MIN_HIDDEN wide."""
    return unroll_layers() and not (_FORWARD_ONLY.get() and hidden_size >= ROLLED_FORWARD_MIN_HIDDEN)
