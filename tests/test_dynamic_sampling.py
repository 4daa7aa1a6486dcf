import numpy as np
import pytest

from vlajax.rl.dynamic_sampling import GroupBuffer, filter_groups


def test_filter_bounds_are_inclusive():
    # groups of 4: success rates 0, 1/4, 2/4, 3/4, 1 (ids deliberately interleaved)
    gids = np.array([0, 1, 2, 3, 4] * 4)
    success = np.zeros(20, bool)
    for g, k in [(1, 1), (2, 2), (3, 3), (4, 4)]:
        success[np.flatnonzero(gids == g)[:k]] = True
    keep, stats = filter_groups(success, gids, lower=0.25, upper=0.75)
    assert set(gids[keep]) == {1, 2, 3}  # 0.25 and 0.75 sit on the bounds: kept
    assert stats == dict(groups=5, kept_groups=3, kept_fraction=0.6,
                         all_success_groups=1, all_fail_groups=1)
    keep, _ = filter_groups(success, gids)  # defaults 0.1 / 0.9
    assert set(gids[keep]) == {1, 2, 3}
    with pytest.raises(ValueError, match="lower <= upper"):
        filter_groups(success, gids, lower=0.9, upper=0.1)


def _round(ids, rates, n=4):
    """Trajectory pytree for groups `ids`, each with `rate*n` successes."""
    gid = np.repeat(np.asarray(ids), n)
    success = np.concatenate([np.arange(n) < round(r * n) for r in rates])
    return {"group_id": gid, "success": success, "x": gid * 10 + np.tile(np.arange(n), len(ids))}


def _add(buf, r):
    return buf.add(r, r["success"], r["group_id"])


def test_buffer_accumulates_and_carries_excess():
    buf = GroupBuffer(3, max_rounds=4, keep_excess=True)
    _add(buf, _round([0, 1, 2], [0.0, 0.5, 0.25]))  # keeps 1, 2
    assert not buf.done
    _add(buf, _round([3, 4, 5], [1.0, 0.75, 0.5]))  # keeps 4, 5 -> 4 groups, full
    assert buf.done
    b = buf.pop()
    assert b.full and b.num_groups == 3
    assert list(np.unique(b.trajectories["group_id"])) == [1, 2, 4]
    assert len(b.trajectories["x"]) == 12
    assert b.metrics["rounds"] == 2 and b.metrics["groups_seen"] == 6
    assert b.metrics["kept_fraction"] == pytest.approx(4 / 6)
    assert b.metrics["carried_out"] == 1
    # next step starts with group 5 from the buffer
    assert buf.num_groups == 1 and buf.rounds == 0
    _add(buf, _round([6, 7], [0.5, 0.5]))
    b2 = buf.pop()
    assert list(np.unique(b2.trajectories["group_id"])) == [5, 6, 7]
    assert b2.metrics["carried_in"] == 1


def test_buffer_drops_excess_when_asked():
    buf = GroupBuffer(1, keep_excess=False)
    _add(buf, _round([0, 1], [0.5, 0.5]))
    b = buf.pop()
    assert b.num_groups == 1 and b.metrics["dropped_excess"] == 1
    assert buf.num_groups == 0


def test_round_bound_warns_and_returns_partial_batch(caplog):
    buf = GroupBuffer(3, max_rounds=2)
    _add(buf, _round([0, 1], [0.0, 0.5]))
    _add(buf, _round([2, 3], [1.0, 1.0]))
    assert buf.done and not buf.full
    with pytest.warns(RuntimeWarning, match=r"only 1/3 groups .* after 2 rollout rounds"):
        b = buf.pop()
    assert b.num_groups == 1 and not b.full
    assert not caplog.records  # warned once, not logged as well (the CLI printed each warning twice)
    buf2 = GroupBuffer(2, max_rounds=1)
    _add(buf2, _round([0], [0.0]))
    with pytest.warns(RuntimeWarning, match="only 0/2"):
        assert buf2.pop() is None


def test_group_ids_must_be_unique_across_rounds():
    buf = GroupBuffer(4)
    _add(buf, _round([0, 1], [0.5, 0.5]))
    with pytest.raises(ValueError, match=r"group ids \[1\] are already buffered"):
        _add(buf, _round([1, 2], [0.5, 0.5]))
    with pytest.raises(ValueError, match="leading dim"):
        buf.add({"x": np.zeros(3)}, np.zeros(4, bool), np.arange(4))


def test_buffer_with_trajectories_dataclass():
    from vlajax.rl.samples import Trajectories

    n, c, t = 8, 2, 56
    tr = Trajectories(
        actions_tokens=np.zeros((n, c, t), np.int32), old_logp=np.zeros((n, c, t), np.float32),
        chunk_valid=np.ones((n, c), bool), success=np.array([1, 0, 1, 0, 1, 1, 1, 1], bool),
        finish_step=np.full(n, 16, np.int32), group_id=np.repeat([11, 12], 4),
        task_id=np.array(["t0"] * 4 + ["t1"] * 4))
    buf = GroupBuffer(1)
    buf.add(tr, tr.success, tr.group_id)  # group 11: 2/4 kept, group 12: 4/4 dropped
    b = buf.pop()
    assert isinstance(b.trajectories, Trajectories) and len(b.trajectories) == 4
    assert list(b.trajectories.task_id) == ["t0"] * 4
