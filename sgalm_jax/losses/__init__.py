"""Losses: pure, jittable functions on arrays, each returning ``(loss, metrics)``.

Layer 4 of the library (see DESIGN.md): no model, sampler or training imports here. All math is fp32;
every detached path is a ``jax.lax.stop_gradient`` with a comment saying why. Per-token arrays follow
one alignment convention: ``logits[:, t]`` predicts ``targets[:, t]`` (see :mod:`.common`).

Modules:
  common          sequence_logprobs and masked statistics (the shared building block)
  sft             masked cross-entropy
  sgalm           SGALM discriminator score / BCE loss and generator (score-function) loss
  selfplay        SPIN, IRIS (Rényi order α), SPACE, SPIF, α schedules
  preference      Bradley-Terry (GAD's discriminator), DPO
  policy_gradient GRPO (group advantages, clipped ratio, k1/k2/k3 KL, aggregation modes)
  registry        register_loss / get_loss / make_loss: pick a loss by name from a config

Importing this package registers the built-in losses: ``list_losses()`` shows them.
"""

from sgalm_jax.losses.registry import (  # noqa: I001  (registry first: the modules below use it)
    FAMILIES,
    get_loss,
    list_losses,
    loss_family,
    make_loss,
    register_loss,
    unregister_loss,
)
from sgalm_jax.losses.common import (
    SequenceLogprobs,
    causal_lm_logprobs,
    effective_sample_size,
    masked_mean,
    masked_std,
    masked_sum,
    sequence_logprobs,
    sequence_logprobs_from_hidden,
    shift_targets,
    token_logprobs_and_entropy_from_hidden,
    standardize,
    token_logprobs,
)
from sgalm_jax.losses.sft import sft_loss, sft_loss_from_logprobs
from sgalm_jax.losses.sgalm import (
    balanced_gradient_sum,
    discriminator_loss,
    discriminator_prob,
    discriminator_score_logits,
    gather_answer_logits,
    generator_loss,
    generator_reward,
)
from sgalm_jax.losses.preference import bradley_terry_loss, dpo_loss, last_token_scores
from sgalm_jax.losses.selfplay import (
    ALPHA_SCHEDULES,
    adaptive_alpha,
    constant_alpha,
    cosine_alpha,
    iris_limit_loss,
    iris_loss,
    likelihood_gap,
    linear_alpha,
    logratio_gap,
    make_alpha_schedule,
    space_loss,
    spif_loss,
    spin_loss,
    tilted_mean,
)
from sgalm_jax.losses.policy_gradient import aggregate_token_loss, group_advantages, grpo_loss, kl_penalty

__all__ = [
    # registry
    "FAMILIES", "get_loss", "list_losses", "loss_family", "make_loss", "register_loss", "unregister_loss",
    # common
    "SequenceLogprobs", "causal_lm_logprobs", "effective_sample_size", "masked_mean", "masked_std",
    "masked_sum", "sequence_logprobs", "sequence_logprobs_from_hidden", "shift_targets", "standardize",
    "token_logprobs", "token_logprobs_and_entropy_from_hidden",
    # sft
    "sft_loss", "sft_loss_from_logprobs",
    # sgalm
    "balanced_gradient_sum", "discriminator_loss", "discriminator_prob",
    "discriminator_score_logits", "gather_answer_logits", "generator_loss", "generator_reward",
    # preference
    "bradley_terry_loss", "dpo_loss", "last_token_scores",
    # selfplay
    "ALPHA_SCHEDULES", "adaptive_alpha", "constant_alpha", "cosine_alpha", "iris_limit_loss", "iris_loss",
    "likelihood_gap", "linear_alpha", "logratio_gap", "make_alpha_schedule", "space_loss", "spif_loss",
    "spin_loss", "tilted_mean",
    # policy gradient
    "aggregate_token_loss", "group_advantages", "grpo_loss", "kl_penalty",
]
