import numpy as np
import pytest

from vlajax.rl.advantages import (
    compute_advantages,
    grpo_advantages,
    reinforce_plus_plus_advantages,
)

S3 = 1 / np.sqrt(3)  # group {1, 0, 1}: mean 2/3, unbiased std sqrt(1/3)


def test_grpo_groups_out_of_order():
    # group 7 = rows 0, 2, 4 (rewards 1, 0, 1); group 3 = rows 1, 3, 5 (0, 1, 0)
    rewards = [1, 0, 0, 1, 1, 0]
    gids = np.array([7, 3, 7, 3, 7, 3], np.int64)
    adv = grpo_advantages(rewards, gids)
    # (1 - 2/3)/sqrt(1/3) = 1/sqrt(3); (0 - 2/3)/sqrt(1/3) = -2/sqrt(3)
    expected = [S3, -S3, -2 * S3, 2 * S3, S3, -S3]
    np.testing.assert_allclose(adv, expected, rtol=1e-5)
    assert adv.dtype == np.float32


def test_grpo_without_std_division():
    adv = grpo_advantages([1, 0, 0, 1, 1, 0], [7, 3, 7, 3, 7, 3], norm_by_std=False)
    np.testing.assert_allclose(adv, [1 / 3, -1 / 3, -2 / 3, 2 / 3, 1 / 3, -1 / 3], rtol=1e-6)


def test_grpo_degenerate_groups():
    # all-equal group -> 0 (0 / (0 + eps)); singleton -> mean 0, std 1 (verl) -> A = R
    adv = grpo_advantages([1, 1, 1, 0.5], [0, 0, 0, 9])
    np.testing.assert_allclose(adv, [0, 0, 0, 0.5], atol=1e-6)


def test_grpo_matches_torch_std_semantics():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    r = rng.random(24)
    g = rng.permutation(np.repeat(np.arange(4), 6))
    adv = grpo_advantages(r, g)
    for gid in range(4):
        sel = g == gid
        t = torch.tensor(r[sel])
        ref = ((t - t.mean()) / (torch.std(t) + 1e-6)).numpy()
        np.testing.assert_allclose(adv[sel], ref, rtol=1e-5)


def test_reinforce_plus_plus_global_whitening():
    # mean 1/4, unbiased var (9/16 + 3/16)/3 = 1/4 -> std 1/2
    adv = reinforce_plus_plus_advantages([1, 0, 0, 0])
    np.testing.assert_allclose(adv, [1.5, -0.5, -0.5, -0.5], rtol=1e-5)


def test_reinforce_plus_plus_token_weights():
    # weights 3, 1: mean 3/4, var (3/16 + 9/16)/(4 - 1) = 1/4 -> std 1/2
    adv = reinforce_plus_plus_advantages([1, 0], weights=[3, 1])
    np.testing.assert_allclose(adv, [0.5, -1.5], rtol=1e-5)


def test_dispatch_by_name_and_errors():
    r, g = [1, 0, 1, 0], [0, 0, 1, 1]
    np.testing.assert_allclose(compute_advantages("grpo", r, g), grpo_advantages(r, g))
    np.testing.assert_allclose(
        compute_advantages("reinforce_plus_plus", r, g), reinforce_plus_plus_advantages(r)
    )
    with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'"):
        compute_advantages("ppo", r, g)
    with pytest.raises(ValueError, match="needs group_ids"):
        compute_advantages("grpo", r)
    with pytest.raises(TypeError, match="group_ids must be integers"):
        grpo_advantages(r, ["a", "a", "b", "b"])
    with pytest.raises(ValueError, match="same length"):
        grpo_advantages(r, [0, 0, 1])


def test_trainer_whitens_reinforce_plus_plus_over_valid_tokens_as_verl():
    """verl whitens REINFORCE++ returns over every valid token of the batch: a long failed episode
    weighs more than a short success. The trainer passes each trajectory's valid-token count."""
    from vlajax.config import load_config
    from vlajax.rl.samples import Trajectories, token_mask
    from vlajax.train import trajectory_advantages

    n, c, k, a = 6, 4, 2, 7
    tr = Trajectories(actions_tokens=np.zeros((n, c, k * a), np.int32), old_logp=np.zeros((n, c, k * a), np.float32),
                      chunk_valid=np.arange(c)[None, :] < np.array([1, 4, 2, 4, 3, 4])[:, None],
                      success=np.array([1, 0, 1, 0, 1, 0], bool), finish_step=np.array([1, 8, 4, 8, 5, 8], np.int32),
                      group_id=np.arange(n), task_id=np.zeros(n, np.int64))
    cfg = load_config("demo", ["algorithm.adv_estimator=reinforce_plus_plus"])
    adv = trajectory_advantages(cfg, tr, action_dim=a, chunk_len=k)
    mask = token_mask(tr, action_dim=a, chunk_len=k)
    r = np.broadcast_to(tr.success[:, None, None].astype(np.float64), mask.shape)[mask]  # one return per token
    want = (tr.success - r.mean()) / (r.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(adv, want, rtol=1e-6)
    assert not np.allclose(adv, reinforce_plus_plus_advantages(tr.success.astype(np.float32)))  # per trajectory differs
