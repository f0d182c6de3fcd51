"""The memory plan against the Macs people have, and docs/memory.md's table against the plan."""

import re

import pytest

from conftest import ROOT
from machine import memory_plan

GB, GiB = 1e9, 2**30

# Metal's max_recommended_working_set_size as reported for these Macs: about 2/3 of the RAM up to
# 36 GB, about 3/4 above (48 GB on a 64 GB Mac), 107.5 GiB on a 128 GB one.
MACS = {ram: (2 / 3 if ram <= 36 else 3 / 4) * ram * GiB for ram in (16, 32, 36, 48, 64, 96, 192)}
MACS[128] = 107.5 * GiB
KV_PER_TOKEN = 32 * 2 * 8 * 128 * 2  # Mixtral, float16
WEIGHTS = {"float16": 93.4 * GB, "8-bit": 49.62 * GB, "4-bit": 26.27 * GB}  # docs/several-macs.md


def verdict(weights, ram):
    runs, advice = memory_plan(int(weights), KV_PER_TOKEN, 4096, int(MACS[ram]), ram * GiB)
    return "refused" if not runs else "sysctl" if advice and "sysctl" in advice else "as is" if not advice else "other"


def test_8bit_mixtral_runs_on_a_64gb_mac_whose_working_set_is_48gb_and_says_the_sysctl_line():
    runs, advice = memory_plan(int(49.62 * GB), KV_PER_TOKEN, 4096, int(48 * GB), 64 * GiB)
    assert runs and "sudo sysctl iogpu.wired_limit_mb=" in advice
    mb = int(re.search(r"wired_limit_mb=(\d+)", advice).group(1))
    assert 49.62 * GB + 4096 * KV_PER_TOKEN < mb * 2**20 <= 60 * GiB  # enough, and leaves macOS its share


def test_4bit_mixtral_runs_on_a_36gb_mac():
    assert verdict(WEIGHTS["4-bit"], 36) == "sysctl"


def test_weights_larger_than_the_ram_are_refused_with_the_ways_out():
    runs, advice = memory_plan(int(49.62 * GB), KV_PER_TOKEN, 4096, int(MACS[32]), 32 * GiB)
    assert not runs and "--q-bits 4" in advice and "several machines" in advice


def test_a_long_context_that_does_not_fit_suggests_a_smaller_one():
    # 20 GB of weights fit a 22 GB working set; 32k tokens of cache (4.3 GB) do not.
    runs, advice = memory_plan(int(20 * GB), KV_PER_TOKEN, 32768, int(22 * GB), 32 * GiB)
    assert runs and "smaller --max-context (about 7629 tokens fit)" in advice  # (22 - 20 - 1 GB) / 128 KiB


def test_without_a_gpu_working_set_only_the_ram_counts():
    assert memory_plan(int(10 * GB), KV_PER_TOKEN, 4096, None, 24 * GiB) == (True, None)


def readme_rows():
    table = (ROOT / "docs" / "memory.md").read_text()
    rows = {}
    for line in filter(lambda line: line.startswith("|"), table.splitlines()):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for name in WEIGHTS:
            if cells[0].startswith(name):
                sizes = lambda cell: {int(n) for n in re.findall(r"\d+", cell)}
                rows[name] = {"refused": sizes(cells[3]), "sysctl": sizes(cells[4]), "as is": sizes(cells[5])}
    return rows


@pytest.mark.parametrize("precision", list(WEIGHTS))
def test_readme_memory_table_agrees_with_the_plan(precision):
    row = readme_rows()[precision]
    for ram in MACS:
        assert ram in row[verdict(WEIGHTS[precision], ram)], (precision, ram, verdict(WEIGHTS[precision], ram))
