"""Old module paths keep working for one release (CHANGELOG.md): each imports, warns once that
it moved, and still offers every public name it had before the package was laid out by concern."""

import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Each old path and the public names it had (its ``__all__``, else its top-level functions and
#: classes) before the move.
OLD_PATHS = {
    "sampler.base": [
        "RolloutEngine",
        "SglangSamplerOutput",
        "SharingReport",
        "as_tokenizer_adapter",
        "generated_tokens",
        "next_power_of_2",
    ],
    "sampler.core": ["UpdateGate", "SwapWindow", "check_finite_leaves", "Push", "moved_bytes", "is_path", "WeightSync"],
    "sampler.weights": ["buffer_pointers", "live_device_bytes", "EngineWeights"],
    "sampler.inflight": [
        "check_in_flight",
        "token_versions",
        "token_staleness",
        "oldest_version",
        "WeightVersions",
        "InFlightSwitch",
    ],
    "sampler.recovery": [
        "WeightsLostError",
        "WeightSource",
        "ServedWeights",
        "RestartReport",
        "capture",
        "restore",
        "restart_config",
    ],
    "sampler.validation": [
        "InvalidRequestError",
        "RequestLimits",
        "RequestValidator",
        "SAMPLING_PARAMS",
        "check_openai_request",
        "check_sampling_params",
        "per_prompt",
        "prompt_ids",
    ],
    "sampler.progress": ["progress"],
    "sampler.launch": ["free_port_block", "ProcessResult", "process_env", "launch", "exit_code", "main"],
    "sampler.rollout": ["SyncRecord", "SglangJaxRollout", "StepMismatch", "MismatchMonitor", "measure_mismatch"],
    "sampler.tunix_config": [
        "is_tunix_config",
        "engine_options",
        "load_format",
        "from_tunix_config",
        "as_sampler_config",
        "mapping_format",
        "from_rollout_config",
    ],
    "sampler.tunix_models": ["tunix_model_config", "load_tunix_model", "random_tunix_model", "check_trainer"],
    "sampler.testing": [
        "train_tokenizer",
        "hf_config",
        "random_hf_weights",
        "write_weights",
        "write_tiny_model",
        "inject_fault",
        "write_eos_prone_model",
    ],
    "sampler.admin_client": ["main"],
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_an_old_path_imports_warns_and_keeps_its_names(old):
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) and old in str(w.message) for w in caught), old
    missing = [name for name in OLD_PATHS[old] if not hasattr(module, name)]
    assert not missing, f"{old} lost {missing}"


def test_python_m_sampler_admin_client_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "sampler.admin_client", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stdout + proc.stderr
    assert "RuntimeWarning" not in proc.stderr, proc.stderr  # the module ran before its package imported it


def test_python_m_sampler_serve_admin_client_runs_without_a_warning():
    proc = subprocess.run(
        [sys.executable, "-m", "sampler.serve.admin_client", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "usage" in proc.stdout.lower(), proc.stdout + proc.stderr
    assert "RuntimeWarning" not in proc.stderr, proc.stderr
