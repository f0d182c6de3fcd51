import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import convert  # noqa: E402
import mixtral  # noqa: E402
from synthetic import TOKENIZER, write_hf_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    return write_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny", seed=0)


def _converted(tmp_path_factory, hf_path, name, **kw):
    out = tmp_path_factory.mktemp("mlx") / name
    convert.convert(hf_path, out, log=lambda s: None, **kw)
    return out


@pytest.fixture(scope="session")
def mlx_fp(tmp_path_factory, hf_tiny):
    return _converted(tmp_path_factory, hf_tiny, "fp", q_bits=None)


@pytest.fixture(scope="session")
def mlx_q8(tmp_path_factory, hf_tiny):
    return _converted(tmp_path_factory, hf_tiny, "q8", q_bits=8)


@pytest.fixture(scope="session")
def tokenizer():
    return mixtral.Tokenizer(TOKENIZER)
