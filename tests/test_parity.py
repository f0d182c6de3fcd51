"""The converted model against Hugging Face transformers' MixtralForCausalLM (float32)."""

import mlx.core as mx
import numpy as np
import pytest
import torch  # noqa: E402  the reference: a missing one fails the suite, never skips it
import transformers  # noqa: E402

import mixtral

PROMPT = "Mixtral is a sparse mixture of experts: each token is routed to two of eight feed-forward blocks."
STEPS = 10


@pytest.fixture(scope="module")
def hf_model(hf_tiny):
    model, info = transformers.MixtralForCausalLM.from_pretrained(
        hf_tiny, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # every tensor of our layout was recognised
    return model.eval()


def hf_forward(hf_model, ids):
    with torch.no_grad():
        out = hf_model(torch.tensor([ids]), output_router_logits=True)
    return out.logits[0].numpy(), [r.numpy() for r in out.router_logits]


def test_logits_match_transformers_after_prompt_and_each_cached_greedy_step(hf_model, mlx_fp, tokenizer):
    model, _ = mixtral.load_model(mlx_fp, dtype=mx.float32)
    ids = tokenizer.encode(PROMPT)
    assert len(ids) >= 20

    ref, _ = hf_forward(hf_model, ids)
    logits, cache = model(mx.array([ids]))
    np.testing.assert_allclose(np.array(logits[0]), ref, atol=1e-4, rtol=0)

    for _ in range(STEPS):
        ids.append(int(np.argmax(ref[-1])))  # greedy by the reference
        logits, cache = model(mx.array([ids[-1:]]), cache)
        ref, router_logits = hf_forward(hf_model, ids)  # full recompute, no cache
        np.testing.assert_allclose(np.array(logits[0, -1]), ref[-1], atol=1e-4, rtol=0)

    # The comparison is only meaningful if no token had a near-tie between its 2nd and 3rd expert.
    for layer in router_logits:
        top = np.sort(layer, axis=-1)
        assert (top[:, -2] - top[:, -3]).min() > 1e-3


def test_greedy_ids_from_generate_equal_transformers_greedy(hf_model, mlx_fp, tokenizer):
    model, _ = mixtral.load_model(mlx_fp)
    ids = tokenizer.encode(PROMPT)
    ours = [t for t, _ in zip(mixtral.generate(model, ids), range(STEPS))]
    ref = list(ids)
    for _ in range(STEPS):
        logits, _ = hf_forward(hf_model, ref)
        ref.append(int(np.argmax(logits[-1])))
    assert ours == ref[len(ids) :]
