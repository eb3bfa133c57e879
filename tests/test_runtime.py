"""Process settings of lib_lightning.runtime: glibc keeping freed memory (checked in child processes, since
the setting is process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib_lightning.runtime import MAX_KEEP_FREED_MB, _glibc_mallopt, keep_freed_memory

ROOT = Path(__file__).resolve().parents[1]

# A pattern like an analysis': a 64 MiB, a 24 MiB and a 12 MiB temporary, freed, again; prints the page
# faults of four rounds after five to settle.
_FAULTS = """
import json, resource, sys, torch
from lib_lightning.runtime import keep_freed_memory
applied = keep_freed_memory(int(sys.argv[1])) if sys.argv[1] != "none" else None
def round_():
    a = torch.ones(16 << 20)
    b = a[: 6 << 20] * 2.0
    c = torch.ones(3 << 20) + b[: 3 << 20]
    del a, b, c
for _ in range(5):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    round_()
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _FAULTS, setting], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("bad", [0, -1, MAX_KEEP_FREED_MB + 1, True, 1.5, "64"])
def test_keep_freed_memory_rejects_what_mallopt_cannot_take(bad):
    with pytest.raises(ValueError, match=rf"keep_freed_mb must be an int in 1 \.\. {MAX_KEEP_FREED_MB} \(MiB\), got"):
        keep_freed_memory(bad)


@pytest.mark.skipif(_glibc_mallopt() is None, reason="glibc only")
def test_kept_memory_is_not_faulted_in_again():
    """Temporaries of 12-64 MiB freed and allocated again: by default glibc unmaps or trims them and their
    pages fault anew every round (about 20,000 a round); with the setting freed pages serve the next round
    (none fault in 5 of 8 runs measured, at most 3,072 in the others, where aligned allocations land past
    the freed ones; by default 65,540-77,828)."""
    default, kept = _faults("none"), _faults("256")
    assert kept["applied"] is True
    assert default["faults"] > 4 * 16_000, default  # the 64 MiB one alone is 16,384 pages a round
    assert kept["faults"] < default["faults"] / 2, (kept, default)
