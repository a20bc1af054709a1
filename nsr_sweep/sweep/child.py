"""The isolated launch's own process: `python -m nsr_sweep.sweep.child ARGS`, started by
`localray.spawn_isolated`. It enters its network namespace before it imports anything that starts threads (the
kernel grants a user namespace only to a single-threaded process), then runs the launch."""

from __future__ import annotations

import json
import sys

from .localray import enter_child


def main(args: dict) -> int:
    entered = enter_child(args)
    if entered is None:  # the parent died before the child could follow it
        return 1
    from .launch import run_isolated_launch  # the heavy imports start threads: only now

    return run_isolated_launch(args, *entered)


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
