"""What an RL algorithm declares, and the defaults PPO-style algorithms share.

An algorithm is a frozen (hashable) dataclass, so the compiled steps close over it:

    scorers     frozen score roles it reads at the last real token: ("reward",), ("reward", "cost")
    streams     advantage streams of the experience, e.g. ("reward", "cost")
    critics     the streams that have a trained critic (role "<stream>_critic"); () = critic-free
    sequence_scores(settings, scores)         {scorer: [B]} -> {stream: [B]} (reward shaping: R - nu*C)
    stream_advantages(settings, stream, ...)  per-token advantages (and returns when there is a critic)
    actor_advantages(settings, advantages, multiplier)   {stream: [B,R]} -> [B,R] for the PPO-clip loss
    init_state(settings) / observe(...) / before_update(...) / multiplier(...)
                                              the algorithm's own state and its per-iteration hook
                                              (PPO-Lagrangian: the cost window and the lambda step)

The shared machinery (rollout, scoring, PPO-clip actor update with PTX, clipped critic updates,
checkpointed loop) is in rl/rollout.py and rl/steps.py and never branches on the algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.objectives import ppo
from jaxalign.rl.settings import RLSettings

# KL shaping per stream (spec §5.4, §5.8): the reward stream pays -beta*KL, the cost stream +beta*KL.
KL_SHAPING = {"reward": ppo.kl_shaped_rewards, "cost": ppo.kl_shaped_costs}


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Defaults: one reward stream with a critic, KL-shaped GAE, no state, multiplier 0."""

    name: ClassVar[str] = ""
    scorers: ClassVar[tuple[str, ...]] = ("reward",)
    streams: ClassVar[tuple[str, ...]] = ("reward",)
    critics: ClassVar[tuple[str, ...]] = ("reward",)

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role the algorithm uses: actor, reference, its scorers and critics."""
        return ("actor", "reference", *self.scorers, *(f"{stream}_critic" for stream in self.critics))

    # ------------------------------------------------------------------ traced (inside jit)

    def sequence_scores(self, settings: RLSettings, scores: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The sequence-level score of each stream. {scorer: [B]} -> {stream: [B]}."""
        del settings
        return {stream: scores[stream] for stream in self.streams}

    def stream_advantages(self, settings: RLSettings, stream: str, sequence_score: jax.Array, kl: jax.Array,
                          end_index: jax.Array, kl_coeff: jax.Array, values: jax.Array | None,
                          response_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(per-token shaped scores [B,R], advantages [B,R], returns [B,R] or None) of one stream.

        Default: KL-shaped per-token scores (clipped), then GAE against the stream's critic values.
        """
        shaped = KL_SHAPING[stream](sequence_score, kl, end_index, kl_coeff, settings.clip_range_score)
        advantages, returns = ppo.gae(shaped, values, response_mask, 0, settings.gamma, settings.gae_lambda)
        return shaped, advantages, returns

    def actor_advantages(self, settings: RLSettings, advantages: dict[str, jax.Array],
                         multiplier: jax.Array) -> jax.Array:
        """The advantage of the PPO-clip actor loss. [B,R]."""
        del settings, multiplier
        return advantages["reward"]

    # ------------------------------------------------------------------ host (between jitted steps)

    def init_state(self, settings: RLSettings) -> Any:
        """The algorithm's checkpointed state (a pytree of arrays)."""
        del settings
        return {}

    def observe(self, settings: RLSettings, state: Any, local_scores: dict[str, np.ndarray]) -> Any:
        """Sees the sequence scores {scorer: [B]} of a new rollout: every row, the same on every process
        (rl/iteration.py global_rows), so the algorithm's state is identical on every host."""
        del settings, local_scores
        return state

    def before_update(self, settings: RLSettings, state: Any, actor_step: int) -> tuple[Any, dict[str, float]]:
        """Runs before every actor update (PPO-Lagrangian's lambda step). -> (state, metrics)."""
        del settings, actor_step
        return state, {}

    def multiplier(self, settings: RLSettings, state: Any) -> jax.Array:
        """The scalar handed to actor_advantages (lambda, nu or 0). []."""
        del settings, state
        return jnp.zeros((), jnp.float32)
