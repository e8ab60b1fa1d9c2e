"""Serve an in-process engine over HTTP with hot weight reloads, and its admin client."""

from sampler.serve.server import WeightServer, perturb_weights, report_summary

__all__ = ["WeightServer", "perturb_weights", "report_summary"]
