"""Each workaround in sampler.compat: upstream still needs it (probed unpatched in a child
process, so a crash cannot take the test run down) and ours still works."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

import converters
from sampler import SamplerConfig, SglangJaxSampler, UnsupportedModelError, compat
from tests import helpers
from tests.upstream_probe import busy_fraction

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[1]


def one_device_flags() -> str:
    """This run's XLA flags less the simulated device count: a probe has one device unless it
    asks for more (``upstream_probe.configure``)."""
    return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f)


class ProbeServer:
    """One ``tests.upstream_probe --serve`` fork server for this module's probes: each probe runs
    in its own forked child (unpatched, crashes contained) without paying the imports again."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def run(self, request: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.upstream_probe", "--serve"],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "XLA_FLAGS": one_device_flags()},
            )
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the probe server died (exit status {self.proc.wait()})")
        return json.loads(answer)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(60)


PROBES = ProbeServer()


@pytest.fixture(scope="module", autouse=True)
def _probe_server():
    yield
    PROBES.close()


def probe(mode: str, model_dir, **engine_kwargs) -> tuple[int, dict | None, str]:
    """Runs ``tests.upstream_probe`` MODE on ``model_dir``: (exit status, its PROBE result, its output)."""
    answer = PROBES.run({"mode": mode, "model_dir": str(model_dir), "extra": engine_kwargs})
    out = answer["out"]
    if answer["rc"] is None:  # a hang is not "upstream still fails"
        raise TimeoutError(f"probe {mode} ran past its timeout:\n{out[-3000:]}")
    lines = [line for line in out.splitlines() if line.startswith("PROBE ")]
    return answer["rc"], (json.loads(lines[-1][6:]) if lines else None), out


def test_upstream_version_is_the_one_checked():
    assert compat.upstream_version() == compat.SGLANG_JAX_VERSION


def test_merge_kv_workaround_still_needed(model_dir):
    rc, result, out = probe("generate", model_dir("llama-untied"))
    assert result is None and rc != 0, "unpatched Llama generation works now: drop patch_merge_kv_sharding"
    assert "ShardingTypeError" in out


def test_merge_kv_workaround_works(model_dir, engines):
    compat.patch_merge_kv_sharding()
    from sgl_jax.srt.mem_cache import memory_pool

    assert hasattr(memory_pool.merge_kv, "__wrapped__")
    tokens, _ = helpers.greedy(engines.get(model_dir("llama-untied"), load_format="safetensors"))
    assert all(len(t) == 8 for t in tokens)
    engines.drop(model_dir("llama-untied"), load_format="safetensors")


def test_non_stream_chunk_workaround_still_needed(model_dir):
    rc, result, out = probe("long_generate", model_dir("qwen3-tied"))
    assert rc == 0 and result is not None, out[-3000:]
    assert result["completion_tokens"] == 120
    assert result["output_ids"] > 120 and result["output_token_logprobs"] > 120, (
        f"upstream returns {result} for 120 tokens now: drop patch_non_stream_chunks"
    )


def test_non_stream_chunk_workaround_works(model_dir, engines):
    sampler = engines.get(model_dir("qwen3-tied"), load_format="safetensors")
    out = sampler(["1+1="], max_generation_steps=120, temperature=0.0, ignore_eos=True)
    assert len(out.tokens[0]) == 120 and len(out.logprobs[0]) == 120
    (res,) = sampler.generate_ids([[5, 6, 7]], {"max_new_tokens": 120, "temperature": 0.0, "ignore_eos": True})
    assert len(res["output_ids"]) == 120 and len(res["meta_info"]["output_token_logprobs"]) == 120
    # the long answer continues the short one: no token repeated or lost
    (short,) = sampler.generate_ids([[5, 6, 7]], {"max_new_tokens": 60, "temperature": 0.0, "ignore_eos": True})
    assert res["output_ids"][:60] == short["output_ids"]
    engines.drop(model_dir("qwen3-tied"), load_format="safetensors")


def test_mixed_logprob_workaround_still_needed(model_dir):
    rc, result, out = probe("mixed_logprob", model_dir("qwen3-tied"))
    assert result is None and rc != 0, (
        f"mixed logprob batches work upstream now ({result}): drop patch_mixed_logprob_batches"
    )
    assert "next_token_logprobs" in out or "not subscriptable" in out


def test_mixed_logprob_workaround_works(model_dir, engines):
    sampler = engines.get(model_dir("qwen3-tied"), load_format="safetensors")
    out = sampler._handle.run(
        sampler.engine.async_generate(
            input_ids=[[5, 6, 7], [8, 9, 10]],
            sampling_params={"max_new_tokens": 3, "temperature": 0.0},
            return_logprob=[True, False],
        ),
        timeout=120,
    )
    assert [len(o["output_ids"]) for o in out] == [3, 3]
    assert len(out[0]["meta_info"]["output_token_logprobs"]) == 3 and "output_token_logprobs" not in out[1]["meta_info"]
    assert sampler.healthy
    engines.drop(model_dir("qwen3-tied"), load_format="safetensors")


def test_fault_containment_still_needed(model_dir):
    rc, result, out = probe("fault", model_dir("qwen3-tied"))
    assert result is None and rc != 0, (
        f"upstream survives an engine-thread fault now ({result}): drop patch_contain_engine_faults"
    )
    assert "Scheduler hit an exception" in out


def test_fault_containment_works(model_dir):
    rc, result, out = probe("fault_contained", model_dir("qwen3-tied"))
    assert rc == 0 and result is not None, out[-3000:]
    assert result["raised"] == "EngineFaultError" and "scheduler" in result["message"], result
    assert result["healthy"] is False and result["refuses_next_call"] and result["alive"]
    assert result["inflight_finish"] == "abort", result  # another client's request got an answer


def test_head_dim_limit_still_real(model_dir, tmp_path):
    path = helpers.write_case(tmp_path / "hd64", "qwen3-tied", head_dim=64)
    rc, result, out = probe("generate", path)
    assert result is None and rc != 0, "head_dim 64 serves on CPU now: drop check_head_dim"


def test_head_dim_is_refused_before_the_engine_starts(tmp_path):
    path = helpers.write_case(tmp_path / "hd64", "qwen3-tied", head_dim=64)
    before = set(threading.enumerate())
    with pytest.raises(UnsupportedModelError, match="head_dim=64"):
        SglangJaxSampler(config=SamplerConfig(model_path=str(path), context_length=128, max_running_requests=2))
    assert set(threading.enumerate()) <= before


#: Loop iterations a second above which a scheduler spins (a waiting one makes
#: 1000 / IDLE_POLL_MS = 50).
SPINNING_ITERATIONS_PER_S = 1000


def test_lifecycle_workarounds_still_needed(model_dir):
    rc, result, out = probe("lifecycle", model_dir("qwen3-tied"))
    assert result is not None, out[-3000:]
    # a waiting scheduler looks 1000 / IDLE_POLL_MS times a second; a spinning one far more
    # often however loaded the machine is (loop iterations, not CPU time, are counted)
    assert result["idle_iterations_per_s"] > SPINNING_ITERATIONS_PER_S, (
        f"upstream's idle scheduler no longer spins ({result}): drop quiet_idle_scheduler"
    )
    assert "sglang::scheduler" in result["threads_after_shutdown"], "upstream shutdown stops its threads now"
    assert result["iterations_after_shutdown_per_s"] > SPINNING_ITERATIONS_PER_S, result
    assert result["child_killed"], "upstream shutdown no longer kills child processes"
    assert result["sigchld_replaced"], "upstream no longer installs a SIGCHLD handler"


def test_lifecycle_workarounds_work(model_dir):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sigchld = signal.getsignal(signal.SIGCHLD)
    before = set(threading.enumerate())
    try:
        with SglangJaxSampler(
            config=SamplerConfig(model_path=str(model_dir("qwen3-tied")), context_length=128, max_running_requests=2)
        ) as s:
            assert signal.getsignal(signal.SIGCHLD) is sigchld
            helpers.greedy(s, steps=2)
            assert busy_fraction(1.5) < 0.3  # idle engine waits instead of spinning
            started = [t for t in threading.enumerate() if t not in before]
        time.sleep(0.2)
        alive = [t.name for t in started if t.is_alive() and "watchdog" not in t.name and t.name != "tqdm_monitor"]
        assert alive == []
        assert busy_fraction(1.0) < 0.2
        assert child.poll() is None, "shutdown killed a child process of the host"
    finally:
        child.kill()


def test_zmq_linger_workaround(model_dir, engines):
    """Upstream sockets keep an infinite linger (exit can hang in zmq_ctx_term); ours use 0."""
    import zmq
    from sgl_jax.srt.utils import common_utils

    compat.patch_zmq_linger()
    upstream = common_utils.get_zmq_socket.__wrapped__
    ctx = zmq.Context()
    sock = upstream(ctx, zmq.PUSH, "inproc://linger-probe", True)
    try:
        assert sock.getsockopt(zmq.LINGER) == -1, "upstream sockets no longer linger: drop patch_zmq_linger"
    finally:
        sock.close(linger=0)
        ctx.term()
    sampler = engines.get(model_dir("qwen3-tied"))
    tm = sampler.engine.tokenizer_manager
    sockets = [v for v in vars(tm).values() if isinstance(v, zmq.Socket)]
    assert sockets and all(s.getsockopt(zmq.LINGER) == 0 for s in sockets)


@pytest.mark.parametrize("case", ["qwen3-tied", "llama-untied"])
def test_tunix_rope_theta_workaround_still_needed(case, model_dir):
    """Unpatched Tunix 0.1.7 Qwen3 / Llama3 compute the same outputs whatever
    config.rope_theta says (a child process: the patch is process-wide here)."""
    rc, result, out = probe("tunix_rope_theta", model_dir(case))
    assert rc == 0 and result is not None, out[-3000:]
    assert result["same_output"], "Tunix honours rope_theta now: drop patch_tunix_rope_theta"


#: Tunix fp32 trainer vs the float64 reference forward, prompt logprobs (nats).
TRAINER_REFERENCE_ATOL = 1e-3


def tunix_prompt_logprobs(model, ids: list[int]) -> np.ndarray:
    import jax.numpy as jnp

    n = len(ids)
    logits = model(jnp.asarray([ids]), jnp.arange(n)[None], None, jnp.tril(jnp.ones((n, n), bool))[None])[0]
    logps = jax.nn.log_softmax(np.asarray(logits[0], np.float64)[:-1], axis=-1)
    return logps[np.arange(n - 1), ids[1:]]


@pytest.mark.parametrize(
    "architecture,theta",
    [("Qwen3ForCausalLM", 10_000.0), ("LlamaForCausalLM", 500_000.0), ("Qwen3MoeForCausalLM", 5_000_000.0)],
)
def test_tunix_rope_theta_workaround_works(architecture, theta, tmp_path):
    """Patched, a Tunix trainer of a checkpoint with another rope_theta than Tunix's fixed 1e6
    computes the HF model (the float64 reference forward); its ModelConfig's own value rules."""
    from sampler.tunix.models import load_tunix_model
    from tests import reference_forward as ref

    path = helpers.write_varied_case(tmp_path / architecture, architecture=architecture, rope_theta=theta)
    config, tensors = converters.read_hf_config(path), helpers.hf_tensors(path)
    ids = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 9, 300, 31, 77]
    want = ref.prompt_logprobs(config, tensors, ids)
    got = tunix_prompt_logprobs(load_tunix_model(path), ids)
    np.testing.assert_allclose(got, want, atol=TRAINER_REFERENCE_ATOL)
    fixed = tunix_prompt_logprobs(load_tunix_model(path, rope_theta=compat.TUNIX_FIXED_ROPE_THETA), ids)
    assert np.abs(fixed - want).max() > 100 * TRAINER_REFERENCE_ATOL  # what unpatched Tunix computes


def test_configs_tunix_cannot_follow_are_refused_naming_the_field(tmp_path):
    """rope_scaling (any family), Gemma's rope_theta and query_pre_attn_scalar, Qwen3-MoE's
    routing options: Tunix 0.1.7 has no such setting (checked on its config classes), so a
    trainer of such a checkpoint is refused before any weights load, unless allowed."""
    import dataclasses

    from tunix.models.gemma import model as gemma
    from tunix.models.llama3 import model as llama3
    from tunix.models.qwen2 import model as qwen2
    from tunix.models.qwen3 import model as qwen3

    from sampler.tunix.models import load_tunix_model

    for lib in (gemma, llama3, qwen2, qwen3):
        fields = {f.name for f in dataclasses.fields(lib.ModelConfig)}
        assert not fields & {"rope_scaling", "rope_type", "scaling_factor"}, (lib.__name__, fields)
    gemma_fields = {f.name for f in dataclasses.fields(gemma.ModelConfig)}
    assert not gemma_fields & {"query_pre_attn_scalar", "rope_theta", "rope_base_frequency"}, gemma_fields
    qwen3_fields = {f.name for f in dataclasses.fields(qwen3.ModelConfig)}
    assert not qwen3_fields & {"norm_topk_prob", "mlp_only_layers", "decoder_sparse_step"}, qwen3_fields

    llama3_scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}  # fmt: skip
    refused = [
        ("llama-untied", {"rope_scaling": llama3_scaling}, "rope_scaling"),
        ("qwen2.5", {"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ("gemma2", {"rope_theta": 1_000_000.0}, "rope_theta"),
        ("gemma2", {"query_pre_attn_scalar": 144}, "query_pre_attn_scalar"),
        ("qwen3-moe", {"norm_topk_prob": False}, "norm_topk_prob"),
    ]
    for case, overrides, field in refused:
        path = helpers.write_case(tmp_path / f"{case}-{field}", case, **overrides)
        with pytest.raises(compat.TrainerMismatchError, match=field):
            load_tunix_model(path)
        assert load_tunix_model(path, allow_mismatch=True) is not None  # the user's explicit choice
    # what Tunix does follow is not refused: plain RoPE ("default"), Gemma's own values
    plain = helpers.write_case(tmp_path / "plain", "qwen3-tied", rope_scaling={"rope_type": "default"})
    assert load_tunix_model(plain) is not None


def test_a_rollout_refuses_a_trainer_of_another_model_before_its_engine_starts(tmp_path):
    """An actor whose ModelConfig disagrees with the checkpoint the engine serves (a preset's
    rope_theta) is refused, naming the field, before any engine thread starts; allowed on request."""
    import functools

    from tunix.rl.rollout import base_rollout

    from sampler import SglangJaxRollout
    from sampler.tunix.models import load_tunix_model

    path = helpers.write_case(tmp_path / "theta", "qwen3-tied", rope_theta=10_000.0)
    actor = load_tunix_model(path, rope_theta=compat.TUNIX_FIXED_ROPE_THETA)
    config = base_rollout.RolloutConfig(
        max_tokens_to_generate=4, max_prompt_length=8, rollout_sglang_jax_model_version=str(path),
        rollout_sglang_jax_context_length=32, rollout_sglang_jax_max_running_requests=2,
    )  # fmt: skip
    before = set(threading.enumerate())
    with pytest.raises(compat.TrainerMismatchError, match="rope_theta=10000 in the checkpoint, 1e.06"):
        SglangJaxRollout(rollout_actor=actor, rollout_config=config)
    assert set(threading.enumerate()) <= before
    allowed = functools.partial(SglangJaxRollout, allow_trainer_mismatch=True)
    allowed(rollout_actor=actor, rollout_config=config).shutdown()


def test_upstream_internals_the_sampler_reads_still_exist(model_dir, engines):
    """sampler.compat.internals reads these upstream internals; a rename upstream fails here
    with the name, not somewhere inside a swap."""
    from flax import nnx
    from sgl_jax.srt.entrypoints import http_server

    for name in ("_GlobalState", "set_global_state", "app", "lifespan", "validation_exception_handler"):
        assert hasattr(http_server, name), f"sgl_jax http_server.{name} is gone"
    assert isinstance(getattr(nnx.Param(np.zeros(2)), "_raw_value", None), np.ndarray | jax.Array)
    sampler = engines.get(model_dir("qwen3-tied"))
    scheduler = compat.scheduler_of(sampler.engine)
    for name in ("recv_requests", "flush_cache", "is_fully_idle", "_engine_paused", "recv_from_tokenizer"):
        assert hasattr(scheduler, name), f"Scheduler.{name} is gone"
    assert compat.model_runner_of(sampler.engine) is sampler._handle.model_runner
    tm = sampler.engine.tokenizer_manager
    for name in ("is_pause", "is_pause_cond", "rid_to_state"):
        assert hasattr(tm, name), f"TokenizerManager.{name} is gone"
    for name in (
        "process_input_requests", "pause_generation", "abort_request", "running_batch", "last_batch", "cur_batch",
        "waiting_queue", "grammar_queue", "pending_dp_reqs", "chunked_reqs", "tree_cache", "enable_overlap",
        "_add_request_to_queue",
    ):  # fmt: skip
        assert hasattr(scheduler, name), f"Scheduler.{name} is gone (sampler.compat.scheduler reads it)"
    assert hasattr(tm, "_wait_one_response"), "TokenizerManager._wait_one_response is gone (weight-version stamps)"


# ---------------------------------------------------------------------------- model families
SWA_OFF = compat.HYBRID_SWA_OFF


def test_hybrid_swa_memory_workaround_still_needed(model_dir):
    rc, result, out = probe("generate", model_dir("gemma2"))
    assert result is None and rc != 0, "Gemma 2 generates on CPU with the hybrid SWA pool now: drop HYBRID_SWA_OFF"
    assert "set_kv_buffer_legacy" in out


def test_hybrid_swa_memory_workaround_works(model_dir, engines):
    sampler = engines.get(model_dir("gemma2"), load_format="safetensors")
    assert all(len(t) == 8 for t in helpers.greedy(sampler)[0])
    assert sampler._handle.kwargs["disable_hybrid_swa_memory"] is True
    assert (
        compat.prepare_engine("Gemma2ForCausalLM", {"attention_backend": "fa"}).get("disable_hybrid_swa_memory") is None
    )
    engines.drop(model_dir("gemma2"), load_format="safetensors")


@pytest.mark.parametrize(
    "name,case,overrides,engine_kwargs,symptom",
    [
        ("gemma4 tp > kv heads", "gemma4-moe", {}, dict(tp_size=2, **SWA_OFF), "ShardingTypeError"),
        ("gemma4 mixed head dims", "gemma4-moe", dict(global_head_dim=256), SWA_OFF, "Incompatible types"),
        (
            "gemma4 k_eq_v kv counts",
            "gemma4-keqv",
            dict(num_kv_heads=2, num_global_kv_heads=1),
            SWA_OFF,
            "Incompatible types",
        ),
        ("qwen3-moe sparse step", "qwen3-moe", dict(decoder_sparse_step=2), {}, "not found"),
        ("qwen3-moe ep > tp", "qwen3-moe", {}, dict(ep_size=2), "cannot reshape"),
        ("qwen3-moe fused on cpu", "qwen3-moe", {}, dict(moe_backend="fused"), "Expected TPU devices"),
    ],
)
def test_refused_model_configurations_still_fail_upstream(name, case, overrides, engine_kwargs, symptom, tmp_path):
    """What tests/test_families.py REFUSED turns away before an engine starts: unrefused,
    upstream still fails on it (the process dies or the load raises)."""
    path = helpers.write_case(tmp_path / "m", case, **overrides)
    rc, result, out = probe("generate", path, **engine_kwargs)
    assert result is None and rc != 0, f"{name}: upstream serves it now ({result}); drop its check in compat/models.py"
    assert symptom in out, out[-3000:]


@pytest.mark.parametrize(
    "name,case,engine_kwargs,symptom",
    [
        (
            "LoRA on a quantized base",
            "qwen3-tied",
            dict(
                quantization_config_path="int8.yaml",
                enable_static_lora=True,
                lora_target_modules=["q_proj"],
                max_lora_rank=4,
                lora_scaling=1.0,
                max_loras_per_batch=1,
            ),
            "lora_backend",
        ),
        ("quantized Gemma 2", "gemma2", dict(quantization_config_path="int8.yaml"), "ShardingTypeError"),
    ],
)
def test_refused_quantized_engines_still_fail_upstream(name, case, engine_kwargs, symptom, model_dir):
    """What ``compat.check_quantized_engine`` refuses: with every other patch applied and the
    refusal lifted, the engine starts but faults at the first generation."""
    rc, result, out = probe("quantized_unchecked", model_dir(case), **engine_kwargs)
    assert result is None and rc != 0, f"{name}: upstream serves it now ({result}); drop it from check_quantized_engine"
    assert symptom in out, out[-3000:]


def test_gemma4_ep_size_still_ignored(model_dir):
    rc, result, out = probe("moe_mesh", model_dir("gemma4-moe-tp"), tp_size=2, ep_size=2, **SWA_OFF)
    assert result is not None, out[-3000:]
    assert result["expert_mesh"] == {"expert": 1, "tensor": 2}, (
        f"Gemma 4 honours ep_size now ({result['expert_mesh']}): drop the warning in check_gemma4"
    )


def test_gemma4_text_dtype_workaround(tmp_path):
    """sglang-jax's engine dtype comes from text_config alone: float32 although config.json
    says bfloat16; the quirk passes the top-level dtype."""
    from sgl_jax.srt.configs.model_config import ModelConfig

    path = helpers.write_case(tmp_path / "m", "gemma4-moe")
    config = json.loads((path / "config.json").read_text())
    del config["text_config"]["torch_dtype"]
    (path / "config.json").write_text(json.dumps(config))
    assert np.dtype(ModelConfig(str(path)).dtype).name == "float32", "upstream reads the top-level dtype now: drop it"
    kwargs = compat.prepare_engine("Gemma4ForCausalLM", {"tp_size": 1}, config)
    assert kwargs["dtype"] == "bfloat16"
    assert np.dtype(ModelConfig(str(path), dtype=kwargs["dtype"]).dtype).name == "bfloat16"
    # a caller's own choice wins
    assert compat.prepare_engine("Gemma4ForCausalLM", {"tp_size": 1, "dtype": "float32"}, config)["dtype"] == "float32"


def test_tokenizer_loop_containment_still_needed(model_dir):
    """A negative id among the logprob token ids kills the whole process (SIGKILL) upstream."""
    rc, result, out = probe("logprob_negative_id", model_dir("qwen3-tied"))
    assert result is None and rc != 0, (
        f"upstream survives a failing tokenizer-manager loop now ({result}): drop "
        "patch_contain_tokenizer_loop_faults and patch_logprob_token_decoding"
    )
    assert "TokenizerManager hit an exception" in out and "OverflowError" in out


def test_tokenizer_loop_containment_works(model_dir):
    """With the decoding patch undone, the same input fails the tokenizer manager's loop: the
    fault is contained (callers told, the process lives)."""
    rc, result, out = probe("tokenizer_loop_contained", model_dir("qwen3-tied"))
    assert rc == 0 and result is not None, out[-3000:]
    assert result["finish"]["type"] == "abort" and "tokenizer manager" in result["finish"]["message"], result
    assert result["healthy"] is False and "tokenizer manager (handle_loop)" in result["next_call"], result
    assert result["alive"]


def test_logprob_decoding_workaround_still_needed(model_dir):
    from sgl_jax.srt.managers.tokenizer_manager import TokenizerManager
    from transformers import AutoTokenizer

    compat.patch_logprob_token_decoding()
    upstream = TokenizerManager.detokenize_logprob_tokens.__wrapped__
    tm = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(str(model_dir("qwen3-tied"))))
    with pytest.raises(OverflowError):
        upstream(tm, [-1.5], [-1], True)


def test_logprob_decoding_workaround_works(model_dir, engines):
    from sampler.serve.faults import POISON_REQUESTS, generate_unchecked

    sampler = engines.get(model_dir("qwen3-tied"), load_format="safetensors")
    tm = sampler.engine.tokenizer_manager
    known = helpers.raw_generate(sampler, [5, 6, 7], 4)
    decoded = tm.detokenize_logprob_tokens([-1.0, -2.0, -3.0], [5, -1, 2**40], True)
    assert [text for _, _, text in decoded] == [tm.tokenizer.decode([5]), None, None]
    out = sampler._handle.run(generate_unchecked(tm, **POISON_REQUESTS["tokenizer"]), 120)
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    ((_, token, text),) = out["meta_info"]["output_token_ids_logprobs"][0]
    assert token == -1 and text is None
    assert sampler.healthy and helpers.raw_generate(sampler, [5, 6, 7], 4) == known


def test_rollout_data_workarounds_still_needed(special_dir):
    """Unpatched upstream, on answers with special ids mid-sequence (tests/rollout_facts.py):
    ``output_ids`` lose special ids and the stop token and repeat in streams; a batch's text
    follows its first request's ``skip_special_tokens``; a streamed text keeps a replacement
    character; output logprobs shift between rows of a batch mixing logprob kinds and repeat
    in streams; streamed logprob values are not JSON."""
    rc, result, out = probe("rollout_facts", special_dir)
    assert rc == 0 and result is not None, out[-3000:]
    assert result["special_mid_answer"] > 0, result
    for claim in (
        "broken_ids", "broken_stop_token", "broken_stream_ids", "broken_mixed_options_text",
        "broken_stream_text",  # patch_detokenizer_output
        "broken_mixed_logprob_rows", "broken_stream_logprobs",  # patch_output_logprob_rows
        "broken_stream_json",  # patch_logprob_token_decoding
    ):  # fmt: skip
        assert result.get(claim, 0) > 0, f"upstream no longer breaks {claim} ({result}): drop its workaround"


def test_rollout_data_workarounds_work(special_dir, engines):
    from tests.rollout_facts import facts

    sampler = engines.get(special_dir, load_format="safetensors")
    result = sampler._handle.run(facts(sampler.engine, sampler.tokenizer.tokenizer), timeout=600)
    assert result["special_mid_answer"] > 0, result
    assert {k: v for k, v in result.items() if k.startswith("broken_") and v} == {}, result
    engines.drop(special_dir, load_format="safetensors")


def test_filtered_logprob_lists_workaround_still_needed(special_dir):
    rc, result, out = probe(
        "join_after_scoring", special_dir, context_length=256, max_total_tokens=2048, max_running_requests=4
    )
    assert result is None and rc != 0, f"upstream keeps the batch's logprob lists right now ({result}): drop it"
    assert "IndexError" in out and "filter_batch" in out, out[-3000:]


def test_filtered_logprob_lists_workaround_works(special_dir, engines):
    from tests.rollout_facts import JOIN_TOKENS, join_after_scoring

    sampler = engines.get(special_dir, load_format="safetensors", context_length=256, max_total_tokens=2048)
    n = JOIN_TOKENS
    assert sampler._handle.run(join_after_scoring(sampler.engine), timeout=600) == [2, n // 2, n, n]
    assert sampler.healthy
    engines.drop(special_dir, load_format="safetensors", context_length=256, max_total_tokens=2048)


def test_invalid_grammar_workaround_still_needed(model_dir):
    rc, result, out = probe("invalid_grammar", model_dir("qwen3-tied"))
    assert result is None and rc != 0, f"an invalid grammar no longer crashes upstream ({result}): drop it"
    assert "NotImplementedError" in out


def test_invalid_grammar_workaround_works(model_dir, engines):
    sampler = engines.get(model_dir("qwen3-tied"), load_format="safetensors")
    known = helpers.raw_generate(sampler, [5, 6, 7], 4)
    for _ in range(2):  # the second one hits upstream's cache of invalid grammars
        for kind, grammar in (("regex", "("), ("json_schema", "{"), ("ebnf", "root ::= ("), ("structural_tag", "x")):
            with pytest.raises(ValueError, match="Invalid grammar request"):
                sampler.generate_ids([[5, 6, 7]], {"max_new_tokens": 2, kind: grammar})
    assert sampler.healthy and helpers.raw_generate(sampler, [5, 6, 7], 4) == known


def test_inputs_validation_refuses_still_crash_upstream(model_dir):
    """Each request of compat.UPSTREAM_CRASHES, sent past request validation, still fails the
    engine thread it is listed for (contained here; upstream alone then kills the process).
    A dedicated sampler, restarted after each fault."""
    from sampler.serve.faults import generate_unchecked

    path = str(model_dir("qwen3-tied"))
    sampler = SglangJaxSampler(config=SamplerConfig(model_path=path, load_format="safetensors", context_length=128))
    fixed = []
    try:
        for name, crash in compat.UPSTREAM_CRASHES.items():
            sampler.handle.run(generate_unchecked(sampler.engine.tokenizer_manager, **crash.request), 300)
            fault = sampler.fault
            if fault is None or crash.thread not in fault or crash.error not in fault:
                fixed.append(f"{name}: {fault}")
            if fault is not None:
                sampler.restart()
    finally:
        sampler.shutdown()
    assert not fixed, f"upstream no longer crashes as listed in compat.UPSTREAM_CRASHES: {fixed}"


def test_greedy_in_mixed_batch_workaround_still_needed(model_dir):
    """Zero weights: every logit ties. Alone, a greedy request gets token 0 (the argmax); next to
    a sampled request it is sampled among the tied tokens."""
    rc, result, out = probe("greedy_in_mixed_batch", model_dir("qwen3-tied"))
    assert rc == 0 and result is not None, out[-3000:]
    assert result["solo"] == [0] * 8
    assert result["mixed"] != result["solo"], f"greedy rows are argmax in mixed batches now ({result}): drop the patch"


def test_greedy_in_mixed_batch_workaround_works(model_dir, engines):
    sampler = engines.get(model_dir("qwen3-tied"))
    served = {p: x for p, x in sampler.engine_params().items() if p in set(sampler.weight_paths())}
    zeros = {p: jax.numpy.zeros_like(x) for p, x in served.items()}
    sampler.update_params(zeros, source_format="sglang")
    try:
        greedy = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True, "skip_special_tokens": False}
        sampled = {**greedy, "temperature": 1.0}
        assert sampler.generate_ids([[5, 6, 7]], greedy)[0]["output_ids"] == [0] * 8
        for _ in range(3):
            out = sampler.generate_ids([[5, 6, 7], [8, 9, 10]], [greedy, sampled])
            assert out[0]["output_ids"] == [0] * 8 and out[1]["output_ids"] != [0] * 8
    finally:
        sampler.update_params(served, source_format="sglang")


# --------------------------------------------------------------------------------------
# in-flight weight swaps (sampler.compat.scheduler); the works tests are in test_inflight.py
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scheduler_probe(varied_dir):
    """Upstream's retract, flush and abort on a parked scheduler, in one child process."""
    rc, result, out = probe("retract_flush_abort", varied_dir(0))
    assert rc == 0 and result is not None, out[-3000:]
    return result


def test_retract_loses_a_just_prefilled_request_still_needed(scheduler_probe):
    """Upstream's retract (Scheduler.pause_generation(mode="retract")) on a scheduler parked
    right after a request's prefill drops the request: it is held nowhere while its client
    waits. Works test: test_inflight.py::test_recompute_tail_is_the_new_weights_continuation[right-after-prefill]."""
    result = scheduler_probe["retract_after_prefill"]
    assert result["in_flight"]
    assert not result["held_after_retract"], (
        "upstream's retract keeps a just-prefilled request now: drop retract_last_prefill_batch"
    )


def test_flush_refuses_while_retracted_requests_wait_still_needed(scheduler_probe):
    """Upstream's flush_cache refuses while a retracted request waits in the queue, though it
    holds no KV. Works test: test_inflight.py::test_recompute_flushes_the_prefix_cache_while_retracted_requests_wait."""
    result = scheduler_probe["flush_while_retracted"]
    assert result["in_flight"] and result["held_after_retract"] and result["finished"]
    assert not result["flushed"] and "waiting=1" in result["message"], (
        f"upstream flushes with retracted requests waiting now ({result}): drop flush_prefix_cache_ignoring_queues"
    )


def test_abort_of_a_queued_request_stays_in_flight_still_needed(scheduler_probe):
    """Upstream's abort of a queued request answers the client but leaves the request in the
    tokenizer manager's table for ever (a draining swap then waits for it), so in-flight swaps
    take requests out of the queue and answer them themselves (take_queued, answer_aborted).
    Works test: test_inflight.py::test_swap_failing_midway_aborts_requests_in_flight."""
    result = scheduler_probe["abort_queued"]
    assert result["queued"] and result["answer"] == "abort"
    assert result["still_in_flight"], "upstream forgets aborted queued requests now: answer_aborted may go"


def test_sort_topk_crash_with_seeded_sampling_still_needed(varied_dir):
    """Seeded (deterministic) sampling through the sort-based top-k/top-p path, one request:
    the scheduler thread raises and the process dies."""
    rc, result, out = probe("sort_topk_one_request", varied_dir(0))
    assert result is None and rc != 0, f"seeded sort sampling of one request works upstream now ({result})"
    assert "ShardingTypeError" in out


def test_sort_topk_workaround_works(varied_dir):
    """SglangJaxRollout with Tunix's defaults (use_sort_for_toppk_minp=True) and seeded
    sampling: the engine runs without the sort path, one prompt at a time, and a seed repeats.
    In a child process: deterministic sampling is a process-wide switch in sglang-jax."""
    rc, result, out = probe("sort_topk_rollout", varied_dir(0))
    assert rc == 0 and result is not None, out[-3000:]
    assert result == {"tunix_default_sort": True, "engine_sort": False, "generated": 3, "seeded_repeats": True}


# --------------------------------------------------------------------------------------
# Tunix's agentic learner: the draining RolloutSyncLock
# --------------------------------------------------------------------------------------


def _stack_functions(thread: threading.Thread) -> list[str]:
    frame = sys._current_frames().get(thread.ident)
    names = []
    while frame is not None:
        names.append(frame.f_code.co_name)
        frame = frame.f_back
    return names


def _runner_on_loop(lock, unpatched: bool = False):
    """Tunix's RolloutOrchestrator starting one episode on its own event loop thread (the
    episode body replaced by an event: only the lock's effect on the loop is looked at);
    ``unpatched``: Tunix's own runner, without ``patch_rollout_start_off_loop``."""
    import asyncio
    import types

    from tunix.rl.agentic.pipeline.rollout_orchestrator import RolloutOrchestrator

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    orchestrator = RolloutOrchestrator(rollout_sync_lock=lock, max_concurrency=1)
    started = threading.Event()

    async def episode(**kwargs):
        started.set()
        return 1

    orchestrator._run_and_queue_one_episode = episode
    env = types.SimpleNamespace(extra_kwargs={"pair_index": 0})
    runner = RolloutOrchestrator._runner
    runner = getattr(runner, "__wrapped__", runner) if unpatched else runner
    future = asyncio.run_coroutine_threadsafe(
        runner(
            orchestrator, agent=None, env=env, manager=None, group_key_fn=None, start_step_fn=None, collect_mode=None
        ),
        loop,
    )
    return loop, thread, started, future


def _loop_blocked_or_started(thread, started) -> bool:
    """Wait for either outcome; True when the loop thread itself waits in acquire_rollout."""
    deadline = time.monotonic() + 60
    while not started.is_set():
        if "acquire_rollout" in _stack_functions(thread) and "wait" in _stack_functions(thread)[:3]:
            return True
        assert time.monotonic() < deadline, "the runner neither started nor blocked"
        time.sleep(0.005)
    return False


def test_tunix_sync_lock_blocks_the_learners_event_loop_still_needed():
    """The deadlock of Tunix 0.1.7's agentic learner: once a weight sync waits for the
    episodes in flight, the orchestrator starting another episode waits inside
    ``acquire_rollout`` on the learner's event loop thread, the very loop the episodes in
    flight need to finish. Works test: test_agentic.py::test_agentic_grpo_syncs_without_waiting_for_episodes
    (max_concurrency below the episodes queued) and the one below."""
    from tunix.rl.agentic.utils import RolloutSyncLock

    lock = RolloutSyncLock()
    lock.acquire_rollout()  # an episode in flight
    sync = threading.Thread(target=lambda: (lock.acquire_weight_sync(), lock.release_weight_sync()))
    sync.start()
    deadline = time.monotonic() + 60
    while lock._weight_syncs_waiting == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    loop, thread, started, future = _runner_on_loop(lock, unpatched=True)
    try:
        assert _loop_blocked_or_started(thread, started), (
            "Tunix's orchestrator no longer blocks its event loop while a sync waits: drop patch_rollout_start_off_loop"
        )
    finally:
        lock.release_rollout()  # the episode ends (from here, not the loop): the sync, then the runner go on
        sync.join(60)
        future.result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)


def _sync_waiting(lock) -> threading.Thread:
    """A weight sync waiting on Tunix's lock (it runs once the episodes in flight end)."""
    sync = threading.Thread(target=lambda: (lock.acquire_weight_sync(), lock.release_weight_sync()))
    sync.start()
    deadline = time.monotonic() + 60
    while lock._weight_syncs_waiting == 0:
        assert time.monotonic() < deadline, "the sync never started waiting"
        time.sleep(0.005)
    return sync


def test_rollout_start_off_loop_keeps_the_loop_free_and_drains():
    """With the patch (SglangJaxRollout applies it), Tunix's own draining lock: while a sync
    waits for the episode in flight, an episode about to start waits off the loop (the loop
    still runs other coroutines); once the episode in flight ends, the sync runs, then the
    new episode starts (Tunix's sync preference kept)."""
    import asyncio

    from tunix.rl.agentic.utils import RolloutSyncLock

    compat.patch_rollout_start_off_loop()
    lock = RolloutSyncLock()
    lock.acquire_rollout()  # an episode in flight
    sync = _sync_waiting(lock)
    loop, thread, started, future = _runner_on_loop(lock)
    try:
        # the loop answers while the new episode waits for the sync (it would not, blocked)
        assert asyncio.run_coroutine_threadsafe(asyncio.sleep(0, result="free"), loop).result(60) == "free"
        assert not started.is_set() and sync.is_alive()
        lock.release_rollout()  # the episode in flight ends
        sync.join(60)
        assert not sync.is_alive(), "the sync never ran"
        future.result(60)
        assert started.is_set() and lock._rollouts == 0  # the new episode ran and released its start
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)


def test_non_draining_lock_leaves_the_event_loop_free():
    lock = compat.NonDrainingSyncLock()
    lock.acquire_rollout()
    lock.acquire_weight_sync()  # a sync under way, an episode in flight: neither waits
    loop, thread, started, future = _runner_on_loop(lock)
    try:
        assert not _loop_blocked_or_started(thread, started)
        future.result(60)
        assert started.is_set()
    finally:
        lock.release_weight_sync()
        lock.release_rollout()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(60)


# ---------------------------------------------------------------------------- Tunix's agentic prompts


def _agentic_user_message(agent_class) -> str:
    """The user message an agent of ``agent_class`` builds for the prompt "3+4=", the way
    Tunix 0.1.7's agentic learner hands it over: re-batched into micro-batches of one by
    ``_create_micro_batch_iterator``, wrapped in a ``TaskEnvironment``, its observation
    passed to the agent, and rendered by a chat parser."""
    from tunix.rl.agentic.agentic_rl_learner import AgenticRLLearner
    from tunix.rl.agentic.environments.task_environment import TaskEnvironment

    from training_examples.async_grpo import chat_parser

    (example,) = AgenticRLLearner._create_micro_batch_iterator(None, iter([{"prompts": ["3+4="]}]), 1)
    observation, _ = TaskEnvironment(example, reward_fn=lambda **kw: 0.0).reset()
    agent = agent_class(system_prompt="")
    agent.update_from_env(observation, 0.0, False, {})
    return chat_parser(None).parse(agent.chat_completions[1:])


def test_tunix_agentic_prompt_is_an_array_repr_still_needed():
    """Tunix 0.1.7's agentic learner gives each agent its prompt as a one-element numpy
    array, which every chat parser renders as the array's repr: the model is asked
    "['3+4=']", not "3+4=". Works test: the one below, and test_agentic.py's prompt check."""
    from tunix.rl.agentic.agents.model_agent import ModelAgent

    rendered = _agentic_user_message(ModelAgent)
    assert rendered == "Q: ['3+4=']\n", (
        f"Tunix's agentic learner now renders the prompt itself ({rendered!r}): drop compat.prompt_text_agent"
    )


def test_prompt_text_agent_renders_the_prompt_itself():
    assert _agentic_user_message(compat.prompt_text_agent()) == "Q: 3+4=\n"
    assert compat.prompt_text(np.array(["x"])) == "x"
    assert compat.prompt_text("x") == "x"
    two = np.array(["a", "b"])
    assert compat.prompt_text(two) is two  # only a one-element array is unwrapped


# ---------------------------------------------------------------------------- HTTP routes, several engines
def _model_paths_served(apps) -> list[str]:
    from starlette.testclient import TestClient

    return [TestClient(app).get("/get_model_info").json()["model_path"] for app in apps]


def _two_engines(model_dir, engines):
    paths = [str(model_dir("qwen3-tied", seed)) for seed in (0, 1)]
    return paths, [engines.get(path, load_format="safetensors").engine for path in paths]


def test_upstream_http_global_state_workaround_still_needed(model_dir, engines):
    """Upstream's routes read one module-global engine state: an app built for engine A
    serves engine B once B's app is built."""
    from fastapi import FastAPI
    from fastapi.routing import APIRoute
    from sgl_jax.srt.entrypoints import http_server as upstream

    paths, pair = _two_engines(model_dir, engines)
    before, apps = upstream._global_state, []
    for engine in pair:  # upstream's own way of serving an engine: set the global, mount the routes
        upstream.set_global_state(upstream._GlobalState(engine.tokenizer_manager, engine.template_manager, {}))
        app = FastAPI()
        app.router.routes.extend(r for r in upstream.app.router.routes if isinstance(r, APIRoute))
        apps.append(app)
    try:
        served = _model_paths_served(apps)
    finally:
        upstream.set_global_state(before)
    assert served == [paths[1], paths[1]], "upstream's routes serve per-app state now: drop engine_scope"


def test_upstream_http_global_state_workaround_works(model_dir, engines):
    from sgl_jax.srt.entrypoints import http_server as upstream

    paths, pair = _two_engines(model_dir, engines)
    before = upstream._global_state
    apps = [compat.upstream_http_app(engine) for engine in pair]
    assert _model_paths_served(apps) == paths
    assert upstream._global_state is before, "upstream's module global was touched"
