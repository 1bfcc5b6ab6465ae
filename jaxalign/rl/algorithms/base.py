"""What an RL algorithm declares, and the defaults PPO-style algorithms share.

An algorithm is a frozen (hashable) dataclass, so the compiled steps close over it. Every hook takes
`rl` (RLSettings: the shared config.rl) first; the algorithm's own settings are `self.settings`
(an AlgorithmSettings subclass read from config.rl.<name>, checked when the algorithm is built):

    scorers     frozen score roles it reads at the last real token: ("reward",), ("reward", "cost")
    streams     advantage streams of the experience, e.g. ("reward", "cost")
    critics     the streams that have a trained critic (role "<stream>_critic"); () = critic-free
    moderation_signals                  (role, signal) of extra cost roles read from the moderation model
    sequence_scores(rl, scores)         {scorer: [B]} -> {stream: [B]} (reward shaping: R - nu*C)
    token_streams(rl)                   the cost streams scored per token (cost_per_token): their
                                        scorer's per-token prefix scores reach stream_advantages
    stream_advantages(rl, stream, ...)  per-token advantages (and returns when there is a critic)
    actor_advantages(rl, advantages, multiplier)   {stream: [B,R]} -> [B,R], the actor loss's advantage
    actor_loss(rl, log_probs, exp, advantages)     the actor's RL loss (default: PPO-clip per token)
    init_state(rl) / observe(...) / before_update(...) / multiplier(...)
                                        the algorithm's own state and its per-iteration hook
                                        (PPO-Lagrangian: the cost window and the lambda step)

The shared machinery (rollout, scoring, the actor update with PTX, clipped critic updates,
checkpointed loop) is in rl/rollout.py and rl/steps.py and never branches on the algorithm.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.objectives import ppo
from jaxalign.rl.settings import AlgorithmSettings, RLSettings

if TYPE_CHECKING:
    from jaxalign.rl.rollout import Experience

# KL shaping per stream (upstream safe-rlhf/safe_rlhf/algorithms/ppo_lag/trainer.py
# add_kl_divergence_regularization, after safe-rlhf PR #173): the reward stream pays -beta*KL, the cost
# stream +beta*KL.
KL_SHAPING = {"reward": ppo.kl_shaped_rewards, "cost": ppo.kl_shaped_costs}


def kl_shaping(stream: str):
    """The KL shaping of a stream: "reward" is the reward; every other stream is a cost (multi_lag's
    constraints included)."""
    return KL_SHAPING["reward" if stream == "reward" else "cost"]


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Defaults: one reward stream with a critic, KL-shaped GAE, the PPO-clip loss, no settings of
    its own, no state, multiplier 0."""

    name: ClassVar[str] = ""
    scorers: ClassVar[tuple[str, ...]] = ("reward",)
    streams: ClassVar[tuple[str, ...]] = ("reward",)
    critics: ClassVar[tuple[str, ...]] = ("reward",)
    settings: AlgorithmSettings = AlgorithmSettings()  # a subclass: its own settings class and defaults

    def __post_init__(self):
        self.settings.check(f"config.rl.{self.name}")

    @classmethod
    def build(cls, settings: AlgorithmSettings, has_cost_model: bool) -> "Algorithm":
        """The algorithm of a run from its settings (config.rl.<name>); has_cost_model: whether
        config.rl.cost_model_path is set."""
        algorithm = cls(settings=settings)
        if "cost" in algorithm.scorers and not has_cost_model:
            raise ValueError(f"{cls.name} needs a cost model: set config.rl.cost_model_path")
        return algorithm

    @property
    def roles(self) -> tuple[str, ...]:
        """Every role the algorithm uses: actor, reference, its scorers and critics."""
        return ("actor", "reference", *self.scorers, *(f"{stream}_critic" for stream in self.critics))

    @property
    def moderation_signals(self) -> tuple[tuple[str, str], ...]:
        """(scorer role, moderation signal) of the scorers other than "cost" that read the moderation
        model at config.rl.cost_model_path (multi_lag's constraints); () by default."""
        return ()

    # ------------------------------------------------------------------ traced (inside jit)

    def sequence_scores(self, rl: RLSettings, scores: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """The sequence-level score of each stream. {scorer: [B]} -> {stream: [B]}."""
        del rl
        return {stream: scores[stream] for stream in self.streams}

    def token_streams(self, rl: RLSettings) -> tuple[str, ...]:
        """The cost streams whose cost comes per token (cost_per_token of ppo_lag / multi_lag), each
        from the scorer of the same name. Default: none (every stream scored at the end of the answer)."""
        del rl
        return ()

    def stream_advantages(self, rl: RLSettings, stream: str, sequence_score: jax.Array, kl: jax.Array,
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
            shaped = kl_shaping(stream)(sequence_score, kl, end_index, kl_coeff, rl.clip_range_score)
        else:
            costs = ppo.prefix_score_differences(token_scores, response_mask)
            shaped = ppo.kl_shaped_token_costs(costs, kl, kl_coeff, rl.clip_range_score)
        advantages, returns = ppo.gae(shaped, values, response_mask, 0, rl.gamma, rl.gae_lambda)
        return shaped, advantages, returns

    def actor_advantages(self, rl: RLSettings, advantages: dict[str, jax.Array],
                         multiplier: jax.Array) -> jax.Array:
        """The advantage the actor loss reads. [B,R]."""
        del rl, multiplier
        return advantages["reward"]

    def actor_loss(self, rl: RLSettings, log_probs: jax.Array, exp: "Experience", advantages: jax.Array) -> jax.Array:
        """The actor's RL loss on one experience batch (minimised; the PTX term is added by rl/steps.py).

        log_probs [B,R]: the trained policy's log-probs of the response tokens (differentiable);
        exp: the batch's Experience (old_log_probs, ref_log_probs, response_mask [B,R], ...);
        advantages [B,R]: actor_advantages, whitened if rl.whiten_advantages. -> [].
        Default: PPO's clipped surrogate per token (Schulman et al. 2017, arXiv:1707.06347 eq. 7) as
        upstream safe-rlhf/safe_rlhf/algorithms/ppo/trainer.py actor_loss_fn.
        """
        return ppo.actor_loss(log_probs, exp.old_log_probs, advantages, exp.response_mask, rl.clip_range_ratio)

    # ------------------------------------------------------------------ host (between jitted steps)

    def init_state(self, rl: RLSettings) -> Any:
        """The algorithm's checkpointed state (a pytree of arrays)."""
        del rl
        return {}

    def observe(self, rl: RLSettings, state: Any, local_scores: dict[str, np.ndarray]) -> Any:
        """Sees the sequence scores {scorer: [B]} of a new rollout: every row, the same on every process
        (parallel/mesh.py global_rows), so the algorithm's state is identical on every host."""
        del rl, local_scores
        return state

    def before_update(self, rl: RLSettings, state: Any, actor_step: int) -> tuple[Any, dict[str, float]]:
        """Runs before every actor update (PPO-Lagrangian's lambda step). -> (state, metrics)."""
        del rl, actor_step
        return state, {}

    def multiplier(self, rl: RLSettings, state: Any) -> jax.Array:
        """The scalar handed to actor_advantages (lambda, nu or 0). []."""
        del rl, state
        return jnp.zeros((), jnp.float32)
