"""Several samplers one after another in one process, and a clean interpreter exit."""

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sampler import SamplerConfig, SglangJaxSampler
from tests import helpers

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]


def test_samplers_one_after_another(model_dir):
    path = str(model_dir("qwen3-tied"))
    baseline = {t.name for t in threading.enumerate()}
    outputs = []
    for _ in range(3):
        s = SglangJaxSampler(config=SamplerConfig(model_path=path, context_length=128, max_running_requests=2))
        outputs.append(helpers.greedy(s, steps=3)[0])
        s.shutdown()
        s.shutdown()  # idempotent
        with pytest.raises(RuntimeError, match="shut down"):
            helpers.greedy(s, steps=3)
    assert outputs[0] == outputs[1] == outputs[2]
    leftover = [
        t.name
        for t in threading.enumerate()
        if t.name not in baseline and "watchdog" not in t.name and t.name != "tqdm_monitor"
    ]
    assert leftover == []


def test_interpreter_exits_cleanly(model_dir):
    script = textwrap.dedent(
        f"""
        import os
        os.environ["JAX_PLATFORMS"] = "cpu"
        from sampler import SamplerConfig, SglangJaxSampler
        for _ in range(2):
            with SglangJaxSampler(config=SamplerConfig(model_path={str(model_dir("qwen3-tied"))!r},
                                                       context_length=128, max_running_requests=2)) as s:
                print(s(["1+1="], max_generation_steps=3).tokens[0].tolist(), flush=True)
        # one more left running on purpose: exit must still be clean
        s = SglangJaxSampler(config=SamplerConfig(model_path={str(model_dir("qwen3-tied"))!r},
                                                  context_length=128, max_running_requests=2))
        print("bye", flush=True)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("bye")
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr, proc.stderr[-3000:]


def test_shutdown_answers_callers_waiting_on_the_engine(model_dir):
    """shutdown() while generate_ids waits in other threads: each gets an exception at once
    instead of waiting forever. The requests are held in flight by parking the scheduler."""
    s = SglangJaxSampler(
        config=SamplerConfig(model_path=str(model_dir("qwen3-tied")), context_length=128, max_running_requests=2)
    )
    results: dict[int, BaseException | list] = {}

    def call(i):
        try:
            results[i] = s.generate_ids([[5, 6, 7]], {"max_new_tokens": 8, "temperature": 0.0})
        except BaseException as e:  # noqa: BLE001
            results[i] = e

    assert s._handle._park.park(60)
    callers = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    for t in callers:
        t.start()
    deadline = time.monotonic() + 60
    while len(s.engine.tokenizer_manager.rid_to_state) < 2:
        assert time.monotonic() < deadline, "the requests never reached the engine"
        time.sleep(0.005)
    s.shutdown()
    for t in callers:
        t.join(60)
    assert not any(t.is_alive() for t in callers), "a caller still waits on an engine that was shut down"
    for r in results.values():
        assert isinstance(r, RuntimeError) and "shut down" in str(r), repr(r)
    with pytest.raises(RuntimeError, match="shut down"):
        s.generate_ids([[5]], {"max_new_tokens": 1})
