"""The examples: the custom loop (update_params inside a plain optax step, zero-copy on CPU) and
the GRPO demo's command line and quantized-rollout comparison."""

import json

import pytest

from training_examples import custom_loop

pytestmark = pytest.mark.engine


def test_custom_loop_syncs_without_copies(tmp_path):
    reports = custom_loop.run(steps=3, workdir=str(tmp_path), verbose=False)
    assert [r.version for r in reports] == [1, 2, 3]
    assert all(r.copied == [] and r.copied_bytes == 0 for r in reports)
    assert all(r.plan_reused for r in reports[1:])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--truncated-is", "0"], "--truncated-is must be a finite number > 0"),
        (["--truncated-is", "nan"], "--truncated-is must be a finite number > 0"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--learning-rate", "-1"], "--learning-rate must be a finite number > 0"),
        (["--rollout-quantization", "int4"], "argument --rollout-quantization: invalid choice"),
        (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    ],
)
def test_grpo_demo_options_are_checked(monkeypatch, capsys, argv, message):
    from training_examples import grpo_tiny

    monkeypatch.setattr("sys.argv", ["grpo_tiny", *argv])
    with pytest.raises(SystemExit) as exit_:
        grpo_tiny.main()
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_grpo_demo_compares_bf16_int8_and_fp8_rollouts(tmp_path):
    from training_examples import grpo_tiny

    runs = grpo_tiny.compare_quantization(1, str(tmp_path), plot=False, verbose=False)
    assert list(runs) == [label for label, _ in grpo_tiny.COMPARED] == ["bf16", "int8", "fp8"]
    for label, logs in runs.items():
        assert len(logs) == 1 and logs[0].logp_diff_mean is not None, label
    assert (tmp_path / "grpo_tiny_quantization.png").stat().st_size > 0
    saved = json.loads((tmp_path / "grpo_tiny_quantization.json").read_text())
    assert saved["int8"][0]["logp_diff_mean"] == runs["int8"][0].logp_diff_mean
