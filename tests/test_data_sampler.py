import pytest

from vlajax.rl.data import StateSampler


def test_epochs_cover_every_pair_once_and_ids_are_unique():
    s = StateSampler(num_tasks=3, num_trials_per_task=4, seed=1)
    groups = s.next_groups(5) + s.next_groups(7)  # exactly one epoch, split unevenly
    assert sorted((g.task_id, g.state_id) for g in groups) == [(t, i) for t in range(3) for i in range(4)]
    more = s.next_groups(12)
    assert [g.group_id for g in groups + more] == list(range(24))
    assert [(g.task_id, g.state_id) for g in more] != [(g.task_id, g.state_id) for g in groups]  # reshuffled


def test_resume_draws_what_the_uninterrupted_run_draws():
    a = StateSampler(5, 10, seed=3)
    a.next_groups(17)
    b = StateSampler(5, 10, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.next_groups(40) == b.next_groups(40)


def test_state_of_another_dataset_is_rejected():
    a = StateSampler(5, 10, seed=3)
    with pytest.raises(ValueError, match="5 tasks x 10 trials"):
        StateSampler(4, 10, seed=3).load_state_dict(a.state_dict())


def test_sampled_states_resume_exactly_and_are_fresh_each_epoch():
    """init_states="sampled": each (task, trial) slot gets a sampled state id whose seed follows from
    the checkpointed position, so a run resumed from its (JSON) sampler state draws the same states."""
    import json

    from vlajax.envs.base import sampled_state_seed

    a = StateSampler(3, 4, seed=42, init_states="sampled")
    first_epoch = a.next_groups(12)
    a.next_groups(5)
    b = StateSampler(3, 4, seed=42, init_states="sampled")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.next_groups(30) == b.next_groups(30)  # across two epoch boundaries

    assert sorted(g.task_id for g in first_epoch) == [t for t in range(3) for _ in range(4)]
    seeds = [sampled_state_seed(g.state_id) for g in first_epoch]
    assert None not in seeds and len(set(seeds)) == 12
    again = StateSampler(3, 4, seed=42, init_states="sampled")
    assert again.next_groups(12) == first_epoch  # a function of (seed, epoch, slot) only
    second = {sampled_state_seed(g.state_id) for g in again.next_groups(12)}
    assert not second & set(seeds)  # a new epoch draws new states
    other = StateSampler(3, 4, seed=43, init_states="sampled").next_groups(12)
    assert {sampled_state_seed(g.state_id) for g in other}.isdisjoint(seeds)


def test_fixed_and_sampled_sampler_states_do_not_mix():
    fixed = StateSampler(3, 4, seed=1)
    assert all(0 <= g.state_id < 4 for g in fixed.next_groups(12))
    with pytest.raises(ValueError, match="fixed init states"):
        StateSampler(3, 4, seed=1, init_states="sampled").load_state_dict(fixed.state_dict())
    old = {k: v for k, v in fixed.state_dict().items() if k != "init_states"}  # a checkpoint from before the option
    resumed = StateSampler(3, 4, seed=1)
    resumed.load_state_dict(old)
    assert resumed.next_groups(5) == fixed.next_groups(5)
    with pytest.raises(ValueError, match="init_states must be one of fixed, sampled, got 'random'"):
        StateSampler(3, 4, init_states="random")
