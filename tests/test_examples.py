"""The custom-loop example: update_params inside a plain optax step, zero-copy on CPU."""

import pytest

from training_examples import custom_loop

pytestmark = pytest.mark.engine


def test_custom_loop_syncs_without_copies(tmp_path):
    reports = custom_loop.run(steps=3, workdir=str(tmp_path), verbose=False)
    assert [r.version for r in reports] == [1, 2, 3]
    assert all(r.copied == [] and r.copied_bytes == 0 for r in reports)
    assert all(r.plan_reused for r in reports[1:])
