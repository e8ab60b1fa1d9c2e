"""Moved to ``sampler.serve.admin_client`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.serve.admin_client import *  # noqa: F403

warn("sampler.admin_client", "sampler.serve.admin_client")

if __name__ == "__main__":
    from sampler.serve.admin_client import main

    raise SystemExit(main())
