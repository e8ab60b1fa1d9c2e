"""Moved to ``sampler.multiprocess.launch`` (this path works for one more release)."""

from sampler.moved import warn
from sampler.multiprocess.launch import *  # noqa: F403

warn("sampler.launch", "sampler.multiprocess.launch")

if __name__ == "__main__":
    from sampler.multiprocess.launch import main

    raise SystemExit(main())
