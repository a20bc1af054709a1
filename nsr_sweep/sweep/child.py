"""The isolated launch's own process: `python -m nsr_sweep.sweep.child ARGS`, started by
`localray.spawn_isolated`. It enters its network namespace before it imports anything that starts threads (the
kernel grants a user namespace only to a single-threaded process), then runs the launch."""

from __future__ import annotations

import json
import sys

from .localray import enter_child
from .options import LaunchOptions


def main(args: dict) -> int:
    options = LaunchOptions.from_json(args["options"])  # as the CLI or the API built them
    isolation = enter_child(args)
    if isolation is None:  # the parent died before the child could follow it
        return 1
    from .launch import run_isolated_launch  # the heavy imports start threads: only now

    return run_isolated_launch(options, isolation)


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
