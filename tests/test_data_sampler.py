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
