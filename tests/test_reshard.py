"""Resharded updates: every leaf of an FSDP trainer placed onto a tp=4 engine (4 simulated
CPU devices), through each reshard strategy, bit for bit what sglang-jax's own loader
serves; the extra memory stays within the configured bucket; many updates in a row never
deadlock; data-parallel pushes overlap."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import converters
from sampler.sync.leaves import buffer_pointers
from sampler.tunix.models import load_tunix_model
from tests import helpers

pytestmark = pytest.mark.engine

CASE, TP = "qwen3-4h", 4  # 4 heads, 2 KV heads over 4 devices: KV replication too


@pytest.fixture(scope="module")
def fsdp(model_dir, engines):
    """(engine, trainer states A and B in bf16 and fp32, FSDP over the engine's 4 devices, expected leaves)."""
    path_a, path_b = model_dir(CASE), model_dir(CASE, 1)
    sampler = engines.get(path_a, tp_size=TP)
    mesh = jax.make_mesh((4, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    states = {}
    for name, path in (("a", path_a), ("b", path_b)):
        with mesh:
            for dtype in (jnp.bfloat16, jnp.float32):
                states[name, jnp.dtype(dtype).name] = nnx.state(
                    load_tunix_model(path, mesh=mesh, dtype=dtype), nnx.Param
                )
    expected = {n: helpers.upstream_engine_leaves(p, tp=TP) for n, p in (("a", path_a), ("b", path_b))}
    return sampler, states, expected


def _served(sampler):
    return {k: np.asarray(v) for k, v in sampler.engine_params().items()}


@pytest.mark.parametrize("strategy", ["auto", "bucket", "leaf"])
def test_every_strategy_gives_the_loaders_leaves(fsdp, strategy):
    sampler, states, expected = fsdp
    saved = sampler.config.reshard
    sampler.config.reshard = strategy
    try:
        for name in ("a", "b"):
            report = sampler.update_params(states[name, "bfloat16"])
            helpers.assert_same_bits(_served(sampler), expected[name])
            kinds = set(report.paths.values())
            if strategy == "auto":  # CPU: reshape-only reshards placed from host views
                assert kinds <= {"alias", "convert", "convert in place", "reshard (host)", "reshard"}, kinds
                assert report.paths["model.layers.0.mlp.gate_proj.weight"] == "reshard (host)"
                assert report.paths["model.layers.0.self_attn.o_proj.weight"] == "reshard (host)"
                # KV heads replicated over 4 devices: an XLA program (not a reshape)
                assert report.paths["model.layers.0.self_attn.k_proj.weight"] == "reshard"
            elif strategy == "bucket":
                assert "reshard (bucket)" in kinds and "reshard (host)" not in kinds
            else:
                assert "reshard (host)" not in kinds and "reshard (bucket)" not in kinds
            # bytes per path, against the served leaves' sizes (host reshards: only non-view shards)
            served = sampler.engine_params()
            for kind in kinds:
                size = sum(served[p].nbytes for p, k in report.paths.items() if k == kind)
                if kind == "reshard (host)":
                    assert 0 < report.moved_bytes[kind] <= size, (kind, report.moved_bytes)
                else:
                    assert report.moved_bytes.get(kind, 0) == (0 if kind in ("alias", "view") else size), (
                        kind,
                        report.moved_bytes,
                    )
        fp32 = sampler.update_params(states["a", "float32"])  # casts: XLA, whatever the strategy
        helpers.assert_same_bits(_served(sampler), expected["a"])
        weights = [x for p, x in sampler.engine_params().items() if sampler.sync.is_weight(p)]
        assert fp32.copied_bytes == sum(x.nbytes for x in weights)
    finally:
        sampler.config.reshard = saved


def test_views_share_the_trainers_memory(fsdp):
    """A leaf whose every target shard is a source shard reshaped (Tunix's (N, D, H) o_proj with
    its heads over the devices -> the engine's row-sharded (N*D, H)) shares the trainer's
    buffers, device by device: no bytes move."""
    sampler, states, expected = fsdp
    sampler.update_params(states["a", "bfloat16"])
    mesh = jax.make_mesh((4, 1), ("fsdp", "tp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    heads_split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", None, None))
    o_proj = jax.device_put(states["b", "bfloat16"]["layers"][1]["attn"]["o_proj"]["w"].get_value(), heads_split)
    report = sampler.update_params({"layers.1.attn.o_proj.w": o_proj}, source_format="tunix", strict=False)
    path = "model.layers.1.self_attn.o_proj.weight"
    assert report.paths == {path: "view"} and report.copied_bytes == 0
    served = sampler.engine_params()[path]
    assert sorted(buffer_pointers(o_proj)) == sorted(buffer_pointers(served))
    np.testing.assert_array_equal(helpers.bits(served), helpers.bits(expected["b"][path]))


@pytest.mark.parametrize("budget_leaves", [1, 3])
def test_extra_memory_stays_within_the_bucket(fsdp, budget_leaves):
    sampler, states, expected = fsdp
    sampler.update_params(states["b", "bfloat16"])
    leaf = max(x.nbytes for x in sampler.engine_params().values())
    saved = sampler.config.reshard_bucket_bytes
    sampler.config.reshard_bucket_bytes = budget_leaves * leaf
    try:
        report = sampler.update_params(states["a", "bfloat16"], track_peak_memory=True)
    finally:
        sampler.config.reshard_bucket_bytes = saved
    helpers.assert_same_bits(_served(sampler), expected["a"])
    host = [p for p, k in report.paths.items() if k == "reshard (host)"]
    assert len(host) > budget_leaves  # several buckets ran
    assert 0 < report.peak_extra_bytes <= budget_leaves * leaf, (report.peak_extra_bytes, leaf)


def test_many_resharded_updates_in_a_row(fsdp):
    """Alternating sets, bf16 (host placement) and fp32 (XLA casts): no deadlock, the right
    weights every time, live memory flat."""
    sampler, states, expected = fsdp
    prints = {n: converters.fingerprint({k: jnp.asarray(v) for k, v in expected[n].items()}) for n in ("a", "b")}
    for cycle in range(30):
        name = "ab"[cycle % 2]
        sampler.update_params(states[name, "float32" if cycle % 5 == 0 else "bfloat16"])
        assert sampler.fingerprint() == prints[name], cycle
    assert all(len(t) for t in helpers.greedy(sampler, steps=2)[0])


def test_data_parallel_pushes_overlap(model_dir, monkeypatch):
    """The engines of a DataParallelSampler take their writes at the same time: each engine's
    write waits at a barrier that only opens when all are writing (serial pushes never meet)."""
    from sampler import DataParallelSampler, SamplerConfig

    path = model_dir("qwen3-tied")
    dp = DataParallelSampler(
        config=SamplerConfig(model_path=str(path), data_parallel_size=2, context_length=64, max_running_requests=2)
    )
    try:
        barrier = threading.Barrier(2, timeout=60)
        for s in dp.samplers:
            inner = s.sync.apply

            def met(push, window=None, inner=inner):
                barrier.wait()
                return inner(push, window)

            monkeypatch.setattr(s.sync, "apply", met)
        report = dp.load_checkpoint(path)
        assert len(report.engines) == 2
        assert dp.fingerprints() == [converters.fingerprint_params(helpers.hf_tensors(path), path)] * 2
    finally:
        dp.shutdown()
