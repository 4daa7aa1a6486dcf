import numpy as np
import pytest

from vlajax.rl.samples import Trajectories, make_samples, pad_samples, token_mask

C, T = 3, 56  # 3 chunks of 8 env steps x 7 action dims


def _traj(finish_step, chunk_valid, success):
    n = len(finish_step)
    rng = np.random.default_rng(0)
    return Trajectories(
        actions_tokens=rng.integers(0, 256, (n, C, T), dtype=np.int32),
        old_logp=-rng.random((n, C, T), dtype=np.float32),
        chunk_valid=np.asarray(chunk_valid, bool),
        success=np.asarray(success, bool),
        finish_step=np.asarray(finish_step, np.int32),
        group_id=np.arange(n, dtype=np.int64) + 100,
        task_id=np.array(["a", "b", "c"][:n]),
    )


def test_masking_after_success_is_token_exact():
    # traj 0: success at env step 10 -> finish_step 11: chunk 0 all valid, chunk 1 env
    #   steps 8, 9, 10 -> tokens 0..20 valid, chunk 2 (env kept stepping) fully masked.
    # traj 1: failure, all 24 steps; traj 2: failure, budget ended after 2 chunks.
    tr = _traj([11, 24, 16], [[1, 1, 1], [1, 1, 1], [1, 1, 0]], [True, False, False])
    s = make_samples(tr, np.array([0.5, -1.0, 2.0], np.float32))
    assert list(s.traj_index) == [0, 0, 1, 1, 1, 2, 2]
    assert list(s.chunk_index) == [0, 1, 0, 1, 2, 0, 1]
    assert list(s.mask.sum(1)) == [56, 21, 56, 56, 56, 56, 56]
    assert s.mask[1, :21].all() and not s.mask[1, 21:].any()
    np.testing.assert_array_equal(s.advantages[1], np.where(np.arange(56) < 21, 0.5, 0.0))
    np.testing.assert_array_equal(s.advantages[5], np.full(56, 2.0))
    np.testing.assert_array_equal(s.reward, [1, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(s.tokens[4], tr.actions_tokens[1, 2])
    np.testing.assert_array_equal(s.old_logp[6], tr.old_logp[2, 1])
    assert list(s.group_id) == [100, 100, 101, 101, 101, 102, 102]
    assert list(s.task_id) == ["a", "a", "b", "b", "b", "c", "c"]


def test_mask_equals_reference_finish_step_times_7():
    # SimpleVLA-RL: flat response mask = arange(C*56) < finish_step * 7
    fs = np.array([1, 7, 8, 9, 17, 24], np.int32)
    tr = Trajectories(
        actions_tokens=np.zeros((6, C, T), np.int32), old_logp=np.zeros((6, C, T), np.float32),
        chunk_valid=np.ones((6, C), bool), success=np.ones(6, bool), finish_step=fs,
        group_id=np.zeros(6, np.int64), task_id=np.zeros(6))
    ref = np.arange(C * T)[None] < fs[:, None] * 7
    np.testing.assert_array_equal(token_mask(tr).reshape(6, C * T), ref)


def test_drop_empty_and_boundary():
    # finish_step 8 = success on the last step of chunk 0: chunks 1, 2 carry no valid token
    tr = _traj([8], [[1, 1, 1]], [True])
    assert len(make_samples(tr, [1.0])) == 1
    s = make_samples(tr, [1.0], drop_empty=False)
    assert len(s) == 3 and list(s.mask.sum(1)) == [56, 0, 0]
    assert not s.advantages[1:].any()


def test_pad_samples():
    tr = _traj([11, 24, 16], [[1, 1, 1], [1, 1, 1], [1, 1, 0]], [True, False, False])
    s = make_samples(tr, [0.5, -1.0, 2.0])
    p = pad_samples(s, 4)
    assert len(p) == 8
    assert p.mask[7].sum() == 0 and p.advantages[7].sum() == 0
    assert p.traj_index[7] == s.traj_index[0]
    np.testing.assert_array_equal(p.mask[:7], s.mask)
    assert pad_samples(p, 4) is p
    sub = p.take(np.array([1, 3]))
    assert list(sub.chunk_index) == [1, 1]


def test_validation_errors():
    with pytest.raises(ValueError, match=r"covers chunk 1 but chunk_valid\[0,1\] is False"):
        make_samples(_traj([9], [[1, 0, 0]], [True]), [1.0])
    with pytest.raises(ValueError, match=r"finish_step\[0\]=25 outside"):
        make_samples(_traj([25], [[1, 1, 1]], [False]), [1.0])
    with pytest.raises(ValueError, match="expected chunk_len"):
        make_samples(_traj([8], [[1, 1, 1]], [True]), [1.0], action_dim=14)
    with pytest.raises(ValueError, match="advantages must have shape"):
        make_samples(_traj([8], [[1, 1, 1]], [True]), [1.0, 2.0])
    tr = _traj([8], [[1, 1, 1]], [True])
    bad = Trajectories(**{**tr.__dict__, "group_id": np.zeros(2, np.int64)})
    with pytest.raises(ValueError, match=r"Trajectories.group_id has shape \(2,\)"):
        make_samples(bad, [1.0])
