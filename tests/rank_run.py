"""Run by each rank under mlx.launch (tests/test_parallel.py): logits of a prompt and greedy ids,
saved per rank, for the test to compare with one process; and what the rank holds (its plan, its
weights, its peak memory after loading).

    rank_run.py MODEL OUT TEMP [SHARES]
"""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]
import machine  # noqa: E402
import mixtral  # noqa: E402
import parallel  # noqa: E402

model_path, out, temp = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
shares = parallel.shares_flag(sys.argv[4]) if len(sys.argv) > 4 else None
# A float32 cache, as the tests choose the exact kernels: the ranks' sums in another order differ by ~1e-6,
# and rounding keys and values to float16 would turn a few of those into 1e-4 ones (test_mixtral and
# test_chat test the float16 cache; the server's tests on ranks run it).
model, tok = mixtral.load_model(model_path, dtype=mx.float32, shares=shares, kv_dtype="float32")
peak = mx.get_peak_memory()  # after loading: the weights, and what reading them took
rank = model.group.rank() if model.group else 0
plan = model.plan
ids = tok.encode("Mixtral is a sparse mixture of experts: each token is routed to two of eight blocks.")
logits, _ = model(mx.array([ids]))
gen = [t for t, _ in zip(mixtral.generate(model, ids, temp=temp, seed=7), range(40))]
np.savez(
    out / f"rank{rank}.npz",
    logits=np.array(logits[0]),
    ids=np.array(gen),
    size=model.group.size() if model.group else 1,
    weight_bytes=machine.weight_bytes(model),
    peak_load=peak,
    heads=np.array(plan.heads if plan else [model.args.n_kv_heads]),
    groups=np.array(plan.groups if plan else [0]),
    planned_bytes=plan.weight_bytes(rank) if plan else machine.weight_bytes(model),
)
