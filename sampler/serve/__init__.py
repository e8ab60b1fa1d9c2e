"""Serve in-process engines (one, or several behind one port or one port each) over HTTP with
hot weight reloads, and the admin client."""

from sampler.serve.server import WeightServer, perturb_weights, report_summary

__all__ = ["WeightServer", "perturb_weights", "report_summary"]
