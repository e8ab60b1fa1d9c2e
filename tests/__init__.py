"""The test suite: real sglang-jax engines on JAX's CPU backend (see conftest.py)."""
