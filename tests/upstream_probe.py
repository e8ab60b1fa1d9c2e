"""Runs unpatched sglang-jax in a child process and prints what it did, as JSON.

Used by test_compat.py to show that each workaround in sampler.compat is still
needed (upstream still misbehaves). Usage:
python -m tests.upstream_probe MODE MODEL_DIR [ENGINE_KWARGS_JSON]
(extra Engine arguments, e.g. '{"tp_size": 2, "disable_hybrid_swa_memory": true}').

``python -m tests.upstream_probe --serve`` is a fork server for the same probes: it imports
JAX, sglang-jax and transformers once (without starting a JAX backend), then runs each probe
named by a JSON line on stdin (``{"mode", "model_dir", "extra"}``) in a forked child, and
answers one JSON line (``{"rc", "out"}``: the exit status as ``subprocess`` gives it, None for
a probe killed at its timeout, and the child's stdout and stderr). A probe then costs its
engine, not the imports.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

os.environ["JAX_PLATFORMS"] = "cpu"
#: Extra Engine arguments of the probe being run (``configure``).
EXTRA: dict = {}
#: A probe that runs longer than this is killed (its answer says so).
PROBE_TIMEOUT_S = 600


def configure(mode: str, extra: dict) -> None:
    """Sets the probe's Engine arguments and the devices it needs (before JAX starts a backend)."""
    global EXTRA
    EXTRA = dict(extra)
    # fault: a second device to misplace a weight on
    devices = 2 if mode.startswith("fault") else EXTRA.get("tp_size", 1)
    if devices > 1:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def busy_fraction(seconds: float = 2.0) -> float:
    c0, t0 = cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds() - c0) / (time.monotonic() - t0)


class IterationCounter:
    """Counts a scheduler's loop iterations (its ``recv_requests`` calls): a spinning loop
    makes thousands a second even on a loaded machine, a waiting one a few."""

    def __init__(self, scheduler):
        self.calls = 0
        inner = scheduler.recv_requests

        def recv_requests():
            self.calls += 1
            return inner()

        scheduler.recv_requests = recv_requests

    def per_second(self, seconds: float) -> float:
        c0, t0 = self.calls, time.monotonic()
        time.sleep(seconds)
        return (self.calls - c0) / (time.monotonic() - t0)


def engine(model_dir, load_format="safetensors"):
    from sgl_jax.srt.entrypoints.engine import Engine

    defaults = dict(context_length=128, max_running_requests=2, max_total_tokens=256)
    return Engine(
        model_path=model_dir,
        load_format=load_format,
        enable_single_process=True,
        device="cpu",
        attention_backend="native",
        disable_precompile=True,
        disable_overlap_schedule=True,
        log_level="error",
        **{**defaults, **EXTRA},
    )


def main(mode: str, model_dir: str) -> None:
    result = {}
    if mode == "generate":  # merge_kv sharding / head_dim: does a plain generate survive?
        e = engine(model_dir)
        out = e.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3, "temperature": 0})
        result["generated"] = len(out["meta_info"].get("output_token_logprobs") or out["output_ids"] or [0]) > 0
    elif mode == "quantized_unchecked":  # our engine (every patch), with the quantized-engine refusal lifted
        from sampler import SamplerConfig, SglangJaxSampler, compat

        compat.check_quantized_engine = lambda *args, **kwargs: None
        sampler = SglangJaxSampler(
            config=SamplerConfig(
                model_path=model_dir, load_format="safetensors", context_length=128, engine_kwargs=EXTRA
            )
        )
        out = sampler.generate_ids([[5, 6, 7]], {"max_new_tokens": 3, "temperature": 0}, timeout=120)
        result["generated"] = len(out[0]["output_ids"])
    elif mode == "moe_mesh":  # the mesh sglang-jax puts the experts on, and their dtype
        e = engine(model_dir)
        runner = e.scheduler_info["scheduler"].tp_worker.worker.model_runner
        import jax
        from flax import nnx

        from converters.source import key_paths

        state = nnx.state(runner.model, nnx.Param)
        for path, x in zip(key_paths(state), jax.tree_util.tree_leaves(state)):
            if path.endswith("wi_0"):
                result["expert_mesh"] = dict(x.sharding.mesh.shape)
            result.setdefault("dtypes", {})[path] = str(x.dtype)
    elif mode == "long_generate":  # non-streamed outputs longer than 50 tokens
        e = engine(model_dir)
        out = e.generate(
            input_ids=[5, 6, 7],
            sampling_params={"max_new_tokens": 120, "temperature": 0, "ignore_eos": True},
            return_logprob=True,
        )
        result["completion_tokens"] = out["meta_info"]["completion_tokens"]
        result["output_ids"] = len(out["output_ids"])
        result["output_token_logprobs"] = len(out["meta_info"]["output_token_logprobs"])
    elif mode == "mixed_logprob":  # one request with output logprobs, one without, one batch
        e = engine(model_dir)
        out = e.generate(
            input_ids=[[5, 6, 7], [8, 9, 10]],
            sampling_params={"max_new_tokens": 3, "temperature": 0},
            return_logprob=[True, False],
        )
        result["generated"] = [len(o["output_ids"]) for o in out]
    elif mode in ("fault", "fault_contained"):
        # A real engine-thread fault: one served weight moved to another device, as a buggy
        # weight update would; the next forward pass raises inside the scheduler thread.
        import jax

        if mode == "fault":
            e = engine(model_dir)
            runner = e.scheduler_info["scheduler"].tp_worker.worker.model_runner
            generate = lambda: e.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3, "temperature": 0})
        else:
            from sampler import EngineFaultError, SamplerConfig, SglangJaxSampler

            sampler = SglangJaxSampler(
                config=SamplerConfig(model_path=model_dir, load_format="safetensors", context_length=128)
            )
            runner = sampler._handle.model_runner
            generate = lambda: sampler.generate_ids([[5, 6, 7]], {"max_new_tokens": 3, "temperature": 0}, timeout=120)
        generate()
        inflight = {}
        if mode == "fault_contained":
            # A request from another client, in flight when the fault hits whatever the machine's
            # speed: the scheduler is parked before it is sent and released after the weight moved.
            assert sampler._handle._park.park(60)
            raw = lambda: sampler._handle.run(
                sampler.engine.async_generate(
                    input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 100, "temperature": 0, "ignore_eos": True}
                )
            )
            waiter = threading.Thread(target=lambda: inflight.setdefault("out", raw()), daemon=True)
            waiter.start()
            while not sampler.engine.tokenizer_manager.rid_to_state:
                time.sleep(0.001)
        leaves = list(runner.model_state_leaves)
        leaves[0] = jax.device_put(leaves[0], jax.devices()[1])
        runner.model_state_leaves = leaves
        if mode == "fault_contained":
            sampler._handle._park.release()
        try:
            generate()
            result["raised"] = None
        except Exception as err:  # noqa: BLE001
            result["raised"] = type(err).__name__
            result["message"] = str(err)
        if mode == "fault_contained":
            waiter.join(30)
            out = inflight.get("out")
            result["inflight_finish"] = (
                out["meta_info"]["finish_reason"]["type"] if isinstance(out, dict) else repr(out)
            )
            result["healthy"] = sampler.healthy
            try:
                sampler.generate_ids([[5]], {"max_new_tokens": 1})
            except EngineFaultError:
                result["refuses_next_call"] = True
            sampler.shutdown()
            time.sleep(2)
            result["alive"] = True
    elif mode == "logprob_negative_id":  # a negative id among the logprob token ids
        e = engine(model_dir)
        out = e.generate(
            input_ids=[5, 6, 7],
            sampling_params={"max_new_tokens": 2, "temperature": 0},
            return_logprob=True,
            token_ids_logprob=[-1],
        )
        result["served"] = out["meta_info"]["finish_reason"]
        time.sleep(5)  # the kill comes from the tokenizer manager's loop, after the answer may be out
    elif mode == "invalid_grammar":  # an invalid regex
        e = engine(model_dir)
        try:
            out = e.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2, "regex": "("})
            result["served"] = out["meta_info"]["finish_reason"]
        except ValueError as err:
            result["error"] = str(err)
    elif mode == "tokenizer_loop_contained":  # our containment, with the logprob decoding patch undone
        from sgl_jax.srt.managers.tokenizer_manager import TokenizerManager

        from sampler import EngineFaultError, SamplerConfig, SglangJaxSampler
        from sampler.serve.faults import POISON_REQUESTS, generate_unchecked

        config = SamplerConfig(model_path=model_dir, load_format="safetensors", context_length=128)
        sampler = SglangJaxSampler(config=config)
        patched = TokenizerManager.detokenize_logprob_tokens
        TokenizerManager.detokenize_logprob_tokens = patched.__wrapped__
        try:
            poison = generate_unchecked(sampler.engine.tokenizer_manager, **POISON_REQUESTS["tokenizer"])
            out = sampler._handle.run(poison, 120)
            result["raised"], result["finish"] = None, out["meta_info"]["finish_reason"]
        except Exception as err:  # noqa: BLE001
            result["raised"], result["message"] = type(err).__name__, str(err)
        TokenizerManager.detokenize_logprob_tokens = patched
        result["healthy"] = sampler.healthy
        try:
            sampler.generate_ids([[5]], {"max_new_tokens": 1})
        except EngineFaultError as err:
            result["next_call"] = str(err)
        sampler.shutdown()
        time.sleep(2)
        result["alive"] = True
    elif mode == "greedy_in_mixed_batch":  # zero weights: every logit ties
        e = engine(model_dir, load_format="dummy")
        greedy = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True, "skip_special_tokens": False}
        sampled = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True, "skip_special_tokens": False}
        result["solo"] = e.generate(input_ids=[5, 6, 7], sampling_params=greedy)["output_ids"]
        out = e.generate(input_ids=[[5, 6, 7], [8, 9, 10]], sampling_params=[greedy, sampled])
        result["mixed"] = out[0]["output_ids"]
    elif mode == "retract_flush_abort":
        # Upstream's own retract, flush and abort on a scheduler parked at known points (our
        # park only holds the thread; none of the in-flight workarounds runs).
        from sgl_jax.srt.managers.io_struct import AbortReq, PauseGenerationReqInput

        from sampler import SamplerConfig, SglangJaxSampler
        from sampler.compat.scheduler import held_requests
        from tests import helpers

        sampler = SglangJaxSampler(
            config=SamplerConfig(model_path=model_dir, load_format="safetensors", context_length=128)
        )
        scheduler, tm, park = sampler._handle.scheduler, sampler.engine.tokenizer_manager, sampler._handle.park

        def retract(n):  # parked once a request has n tokens (1: right after its prefill iteration)
            out = {}
            with helpers.parked_at_tokens(sampler, n) as wait:
                future = helpers.send_async(sampler, [5, 6, 7, 8], 40)
                wait()
                rid = held_requests(scheduler)[0].rid
                out["in_flight"] = rid in tm.rid_to_state
                scheduler.pause_generation(PauseGenerationReqInput(mode="retract"))
                out["held_after_retract"] = [r.rid for r in held_requests(scheduler)] == [rid]
                if out["held_after_retract"]:
                    ok, message, _ = scheduler.flush_cache()
                    out["flushed"], out["message"] = ok, message
                scheduler._engine_paused = False  # upstream's continue_generation
            if out["held_after_retract"]:
                out["finished"] = len(future.result(120)["output_ids"]) == 40
            return out

        result["flush_while_retracted"] = retract(5)  # first: the other leaves a request lost
        # a queued request aborted by upstream's abort_request
        with helpers.parked_at_tokens(sampler, 2) as wait:
            first = helpers.send_async(sampler, [5, 6, 7, 8], 40)
            wait()
            second = helpers.send_async(sampler, [9, 10, 11], 40)  # queued behind the park
            while len(tm.rid_to_state) < 2:
                time.sleep(0.005)
            rid = next(r for r in tm.rid_to_state if r not in {q.rid for q in held_requests(scheduler)})
            scheduler._engine_paused = True  # upstream's in-place pause: requests are queued, none scheduled
        assert park.park(60, fresh=True)  # the scheduler has taken the second request into its queue
        queued = rid in [r.rid for r in scheduler.waiting_queue]
        scheduler.abort_request(AbortReq(rid=rid))
        scheduler._engine_paused = False
        park.release()
        answer = second.result(120)["meta_info"]["finish_reason"]["type"]
        first.result(120)
        result["abort_queued"] = {"queued": queued, "answer": answer, "still_in_flight": rid in tm.rid_to_state}
        result["retract_after_prefill"] = retract(1)
    elif mode == "sort_topk_rollout":  # the workaround: SglangJaxRollout with Tunix's defaults
        from tunix.rl.rollout import base_rollout

        from sampler import SglangJaxRollout

        config = base_rollout.RolloutConfig(
            max_tokens_to_generate=3, max_prompt_length=16, temperature=1.0, top_p=1.0, seed=7,
            rollout_sglang_jax_model_version=model_dir, rollout_sglang_jax_context_length=64,
            rollout_sglang_jax_max_running_requests=2, rollout_sglang_jax_log_level="error",
            rollout_sglang_jax_enable_deterministic_sampling=True, rollout_sglang_jax_load_format="safetensors",
        )  # fmt: skip
        result["tunix_default_sort"] = config.rollout_sglang_jax_use_sort_for_toppk_minp
        rollout = SglangJaxRollout(rollout_config=config, mesh=None)
        result["engine_sort"] = rollout.sampler._handle.kwargs.get("use_sort_for_toppk_minp")
        outs = [rollout.generate(["1+1="], config).tokens[0].tolist() for _ in range(2)]
        result["generated"] = len(outs[0])
        result["seeded_repeats"] = outs[0] == outs[1]
        rollout.shutdown()
    elif mode == "sort_topk_one_request":  # Tunix's default use_sort_for_toppk_minp + seeded sampling
        from sgl_jax.srt.entrypoints.engine import Engine

        e = Engine(
            model_path=model_dir,
            load_format="safetensors",
            enable_single_process=True,
            device="cpu",
            attention_backend="native",
            disable_precompile=True,
            disable_overlap_schedule=True,
            context_length=128,
            max_running_requests=2,
            max_total_tokens=256,
            log_level="error",
            enable_deterministic_sampling=True,
            use_sort_for_toppk_minp=True,
        )
        params = {"max_new_tokens": 3, "temperature": 1.0, "top_p": 1.0, "sampling_seed": 7}
        out = e.generate(input_ids=[[5, 6, 7]], sampling_params=[params])
        result["generated"] = len(out[0]["output_ids"]) if isinstance(out, list) else len(out["output_ids"])
    elif mode == "tunix_rope_theta":  # Tunix's own Qwen3 and Llama3, unpatched, at two rope_theta values
        import jax.numpy as jnp
        from tunix.models.llama3 import params as llama_params
        from tunix.models.qwen3 import params as qwen3_params

        from converters import read_hf_config
        from sampler.tunix.models import tunix_model_config

        loader = {"Qwen3ForCausalLM": qwen3_params, "LlamaForCausalLM": llama_params}
        ids, pos = jnp.asarray([[5, 6, 7, 8, 9, 10]]), jnp.arange(6)[None]
        mask = jnp.tril(jnp.ones((6, 6), bool))[None]
        lib = loader[read_hf_config(model_dir)["architectures"][0]]
        outs = [
            lib.create_model_from_safe_tensors(model_dir, tunix_model_config(model_dir, rope_theta=theta))(
                ids, pos, None, mask
            )[0]
            for theta in (10_000, 1_000_000)
        ]
        result["same_output"] = bool(jnp.array_equal(outs[0], outs[1]))
    elif mode == "join_after_scoring":  # a request joins a batch a scoring request has left
        from sampler.compat import patch_merge_kv_sharding
        from tests.rollout_facts import join_after_scoring

        patch_merge_kv_sharding()  # a Llama checkpoint
        e = engine(model_dir)
        result["generated"] = e.loop.run_until_complete(join_after_scoring(e))
    elif mode == "rollout_facts":  # output ids, logprobs and text (tests/rollout_facts.py)
        from transformers import AutoTokenizer

        from sampler.compat import patch_filtered_logprob_lists, patch_merge_kv_sharding
        from tests.rollout_facts import facts

        # two other upstream bugs, tested on their own: the checkpoint is a Llama (no forward
        # pass on CPU without the first); the batches mixing logprob kinds can crash the
        # scheduler thread, depending on timing, without the second
        patch_merge_kv_sharding()
        patch_filtered_logprob_lists()
        e = engine(model_dir)
        result = e.loop.run_until_complete(facts(e, AutoTokenizer.from_pretrained(model_dir)))
    elif mode == "lifecycle":  # idle spin, threads after shutdown, signal handlers, child processes
        before = signal.getsignal(signal.SIGCHLD)
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        from sampler.compat import scheduler_of

        e = engine(model_dir)
        result["sigchld_replaced"] = signal.getsignal(signal.SIGCHLD) is not before
        iterations = IterationCounter(scheduler_of(e))
        result["idle_iterations_per_s"] = iterations.per_second(2.0)
        e.shutdown()
        time.sleep(0.5)
        result["threads_after_shutdown"] = sorted(
            t.name for t in threading.enumerate() if t is not threading.main_thread()
        )
        result["iterations_after_shutdown_per_s"] = iterations.per_second(1.0)
        result["child_killed"] = child.poll() is not None
        child.kill()
    emit_result(result)
    os._exit(0)  # upstream leaves threads that would keep the interpreter busy


def emit_result(result: dict) -> None:
    """Writes the ``PROBE`` line in one system call on a line of its own: upstream's threads
    write to the same output, and ``print`` writes the text and its newline separately, so a
    thread's output could land between them."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.write(1, ("\nPROBE " + json.dumps(result) + "\n").encode())


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit status as ``subprocess`` reports it (-N for signal N), or None when it
    ran past ``timeout`` (then it is killed)."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.05)


def _run_forked(request: dict) -> dict:
    with tempfile.TemporaryFile() as out:
        pid = os.fork()
        if pid == 0:  # the probe, as if started on its own
            try:
                signal.signal(signal.SIGQUIT, signal.SIG_DFL)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                configure(request["mode"], request.get("extra") or {})
                main(request["mode"], request["model_dir"])  # ends the process
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(1)
        rc = _wait(pid, request.get("timeout", PROBE_TIMEOUT_S))
        out.seek(0)
        return {"rc": rc, "out": out.read().decode(errors="replace")}


def serve() -> None:
    """The fork server (module docstring). Upstream's engine threads signal their parent
    process with SIGQUIT on some faults: here that is this server, which ignores it (the child
    restores the default)."""
    import jax  # noqa: F401  (imported only: each child starts the backend with its devices)
    import transformers  # noqa: F401
    from sgl_jax.srt.entrypoints.engine import Engine  # noqa: F401

    signal.signal(signal.SIGQUIT, lambda *_: None)
    for line in sys.stdin:
        print(json.dumps(_run_forked(json.loads(line))), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        serve()
    else:
        configure(sys.argv[1], json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})
        main(sys.argv[1], sys.argv[2])
