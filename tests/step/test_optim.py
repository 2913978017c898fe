import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alexnet_jax import config as config_lib
from alexnet_jax.step import optim


def _config(**overrides):
    config = config_lib.base_config()
    for key, value in overrides.items():
        config[key] = value
    return config


def test_step_schedule_divides_by_ten_at_each_drop_epoch():
    config = _config(schedule="step", learning_rate=0.01, lr_drop_epochs=(2, 4))
    schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=60)
    values = [float(schedule(s)) for s in (0, 19, 20, 39, 40, 59)]
    np.testing.assert_allclose(values, [0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001], rtol=1e-6)


def test_step_schedule_with_warmup():
    config = _config(schedule="step", learning_rate=0.1, lr_drop_epochs=(3,), warmup_epochs=1)
    schedule = optim.make_schedule(config, steps_per_epoch=10, total_steps=50)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == pytest.approx(0.05)
    assert float(schedule(10)) == pytest.approx(0.1)
    assert float(schedule(30)) == pytest.approx(0.01)


def test_warmup_cosine():
    config = _config(schedule="cosine", learning_rate=0.4, warmup_epochs=2)
    schedule = optim.make_schedule(config, steps_per_epoch=5, total_steps=110)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(0.4)
    assert float(schedule(60)) == pytest.approx(0.2, rel=1e-3)  # half-way through the decay
    assert float(schedule(110)) == pytest.approx(0.0, abs=1e-7)


def test_linear_scaling_with_the_global_batch():
    config = _config(learning_rate=0.1, lr_scaling="linear", lr_base_batch_size=256, batch_size=1024)
    assert optim.base_learning_rate(config) == pytest.approx(0.4)
    assert optim.base_learning_rate(_config(learning_rate=0.1, batch_size=1024)) == pytest.approx(0.1)


def test_sgd_matches_the_papers_update_rule():
    """v <- 0.9 v - 5e-4 lr w - lr g;  w <- w + v (Krizhevsky et al. 2012, section 5)."""
    config = _config(schedule="constant", learning_rate=0.01)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 1, 10))
    w = {"w": jnp.array([1.0, -2.0, 3.0])}
    state = tx.init(w)
    v = np.zeros(3)
    w_ref = np.array([1.0, -2.0, 3.0])
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.normal(size=3)
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, w)
        w = optax.apply_updates(w, updates)
        v = 0.9 * v - 5e-4 * 0.01 * w_ref - 0.01 * g
        w_ref = w_ref + v
    np.testing.assert_allclose(np.asarray(w["w"]), w_ref, rtol=1e-5)


def test_lars_masks_biases_out_of_decay_and_trust_ratio():
    config = _config(optimizer="lars", schedule="constant", learning_rate=1.0, weight_decay=0.1)
    tx = optim.make_optimizer(config, optim.make_schedule(config, 1, 10))
    params = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 3.0)}
    grads = {"kernel": jnp.full((2, 2), 1e-3), "bias": jnp.full((2,), 1e-3)}
    updates, _ = tx.update(grads, tx.init(params), params)
    # bias: plain momentum SGD on the gradient alone (no decay, no trust ratio)
    np.testing.assert_allclose(np.asarray(updates["bias"]), -1e-3, rtol=1e-5)
    # kernel: trust ratio ||w|| / ||g + wd w|| times the coefficient, with decay in the direction
    w, g = np.full((2, 2), 3.0), np.full((2, 2), 1e-3)
    direction = g + 0.1 * w
    ratio = 0.001 * np.linalg.norm(w) / np.linalg.norm(direction)
    np.testing.assert_allclose(np.asarray(updates["kernel"]), -ratio * direction, rtol=1e-4)


def test_large_batch_config_scales_lars_lr_to_the_global_batch():
    import importlib.util
    import os

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("large_batch", os.path.join(REPO, "configs", "large_batch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.optimizer == "lars" and config.batch_size == 8192
    assert optim.base_learning_rate(config) == pytest.approx(0.25 * 32)
    schedule = optim.make_schedule(config, steps_per_epoch=156, total_steps=156 * 95)
    assert float(schedule(0)) == 0.0 and float(schedule(156 * 5)) == pytest.approx(8.0, rel=1e-3)
