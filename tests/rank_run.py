"""Run by each rank under mlx.launch (tests/test_distributed.py): logits of a prompt and greedy ids,
saved per rank, for the test to compare with one process."""

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

sys.path[:0] = [str(Path(__file__).resolve().parent.parent)]
import mixtral  # noqa: E402

model_path, out, temp = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
model, tok = mixtral.load_model(model_path, dtype=mx.float32)
rank = model.group.rank() if model.group else 0
ids = tok.encode("Mixtral is a sparse mixture of experts: each token is routed to two of eight blocks.")
logits, _ = model(mx.array([ids]))
gen = [t for t, _ in zip(mixtral.generate(model, ids, temp=temp, seed=7), range(40))]
weights = sum(w.nbytes for _, w in tree_flatten(model.parameters()))
np.savez(
    out / f"rank{rank}.npz",
    logits=np.array(logits[0]),
    ids=np.array(gen),
    size=model.group.size() if model.group else 1,
    weight_bytes=weights,
)
