"""SIGKILL at random moments of a training run, a resume after each: the run ends bit-identical to an
uninterrupted one (scripts/kill_resume.py; figures of a longer run in docs/reliability.md)."""

import pytest
from kill_resume import kill_and_resume


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    record = kill_and_resume(tmp_path, kills=3, steps=12, seed=1)
    assert record["kills"] == 3 and record["landed_mid_run"] >= 1, record
    assert record["identical"], record
