"""The loss registry: built-ins by name, a user's own loss, hyper-parameter checking."""

import jax.numpy as jnp
import numpy as np
import pytest

from sgalm_jax.errors import ConfigError
from sgalm_jax.losses import get_loss, list_losses, loss_family, make_loss, register_loss, spin_loss, unregister_loss


def test_builtins_registered():
    names = set(list_losses())
    assert {"sft", "spin", "iris", "space", "spif", "dpo", "sgalm_discriminator", "sgalm_generator",
            "bradley_terry", "grpo"} <= names
    assert set(list_losses("selfplay")) >= {"spin", "iris", "space", "spif", "dpo"}
    assert get_loss("spin") is spin_loss and loss_family("iris") == "selfplay"
    with pytest.raises(ConfigError, match="unknown loss"):
        get_loss("spni")
    with pytest.raises(ConfigError, match="family"):
        get_loss("grpo", family="selfplay")


def test_user_loss_registered_and_used_by_name():
    @register_loss("test_margin_l2", family="selfplay")
    def margin_l2(policy_real, policy_syn, ref_real, ref_syn, *, real_mask=None, syn_mask=None, target=1.0):
        z = (policy_real - ref_real) - (policy_syn - ref_syn)
        loss = jnp.mean((z - target) ** 2)
        return loss, {"loss": loss}

    try:
        fn = make_loss("test_margin_l2", family="selfplay", target=2.0)
        x = jnp.asarray([1.0, 2.0])
        loss, _ = fn(x, x - 1.0, x, x)  # z = 1 everywhere
        np.testing.assert_allclose(loss, 1.0)
        with pytest.raises(ConfigError, match="already registered"):
            register_loss("test_margin_l2", family="selfplay")(lambda *a, **k: None)
        with pytest.raises(ConfigError, match="hyper-parameter"):
            make_loss("test_margin_l2", tagret=2.0)
        spin = make_loss("spin", beta=0.5, loss_type="hinge")
        assert spin.keywords == {"beta": 0.5, "loss_type": "hinge"}
    finally:
        unregister_loss("test_margin_l2")
    assert "test_margin_l2" not in list_losses()
