"""Rank 0 of 2 stuck inside MLX, as after a lost peer: it waits on a sum that rank 1 never joins.

stuck_rank.py eval   rank 0 blocks in mx.eval (a SIGTERM's handler cannot run)
stuck_rank.py exit   rank 0 fails with a MixtralError, the sum still pending: its exit waits on it

Rank 0 asks runtime.at_end to say `at the end: WHY`.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import runtime  # noqa: E402


def body(mode: str):
    group = mx.distributed.init()
    if group.rank() != 0:
        time.sleep(120)  # alive, and never in the sum
        return
    runtime.at_end(lambda why: print(f"at the end: {why}", file=sys.stderr, flush=True))
    total = mx.distributed.all_sum(mx.ones(4), group=group)
    print("waiting", file=sys.stderr, flush=True)
    if mode == "eval":
        mx.eval(total)
    else:
        mx.async_eval(total)
        raise runtime.MixtralError("a bad input, found while the sum is under way")


if __name__ == "__main__":
    runtime.run_program(body, sys.argv[1])
