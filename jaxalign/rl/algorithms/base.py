"""What an RL algorithm declares, and the defaults PPO-style algorithms share.

An algorithm is a frozen (hashable) dataclass, so the compiled steps close over it:

    scorers     frozen score roles it reads at the last real token: ("reward",), ("reward", "cost")
    streams     advantage streams of the experience, e.g. ("reward", "cost")
    critics     the streams that have a trained critic (role "<stream>_critic"); () = critic-free
    sequence_scores(settings, scores)         {scorer: [B]} -> {stream: [B]} (reward shaping: R - nu*C)
    token_streams(settings)                   the cost streams scored per token (config.rl.cost_per_token):
                                              their scorer's per-token prefix scores reach stream_advantages
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


def kl_shaping(stream: str):
    """The KL shaping of a stream: "reward" is the reward; every other stream is a cost (multi_lag's
    constraints included)."""
    return KL_SHAPING["reward" if stream == "reward" else "cost"]


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

    def token_streams(self, settings: RLSettings) -> tuple[str, ...]:
        """The cost streams whose cost comes per token (config.rl.cost_per_token), each from the
        scorer of the same name. Default: none (every stream scored at the end of the answer)."""
        del settings
        return ()

    def stream_advantages(self, settings: RLSettings, stream: str, sequence_score: jax.Array, kl: jax.Array,
                          end_index: jax.Array, kl_coeff: jax.Array, values: jax.Array | None,
                          response_mask: jax.Array,
                          token_scores: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(per-token shaped scores [B,R], advantages [B,R], returns [B,R] or None) of one stream.

        Default: KL-shaped per-token scores (clipped), then GAE against the stream's critic values.
        The score is the sequence score [B] at the end slot; for a stream of token_streams,
        token_scores [B,R] (the scorer's prefix score after each response token) give the cost
        c_t = s_t - s_t-1 at every token instead (ppo.prefix_score_differences): the costs sum to
        the end score, so returns and the episode cost keep their per-answer meaning, and GAE
        credits the token whose prefix made the answer unsafe.
        """
        if token_scores is None:
            shaped = kl_shaping(stream)(sequence_score, kl, end_index, kl_coeff, settings.clip_range_score)
        else:
            costs = ppo.prefix_score_differences(token_scores, response_mask)
            shaped = ppo.kl_shaped_token_costs(costs, kl, kl_coeff, settings.clip_range_score)
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
        (parallel/mesh.py global_rows), so the algorithm's state is identical on every host."""
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
