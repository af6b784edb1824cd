"""What the Triton interpreter tests share: the child process that runs a
test file's cases with ``TRITON_INTERPRET=1``, and the error measure.

Triton reads ``TRITON_INTERPRET`` when its kernels are defined, so a test
file runs itself as a script in a child started with the flag; the script
prints one JSON line, which :func:`run_interpreted` returns.
"""

import json
import os
import subprocess
import sys
from collections.abc import Iterable

import torch


def run_interpreted(script: str):
    """Runs ``script`` under Triton's interpreter; returns its last line,
    parsed as JSON."""
    env = dict(os.environ, TRITON_INTERPRET='1', OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def relative_errors(
    names: Iterable[str],
    got: Iterable[torch.Tensor],
    expected: Iterable[torch.Tensor],
    dtype: torch.dtype,
) -> dict[str, float]:
    """Largest error of each result against its float64 reference,
    relative to max(1, the reference's largest magnitude); each result
    must have ``dtype`` and the reference's shape."""
    errors = {}
    for name, a, b in zip(names, got, expected):
        assert a.dtype == dtype and a.shape == b.shape, name
        scale = max(1.0, b.abs().max().item())
        errors[name] = (a.cpu().double() - b).abs().max().item() / scale
    return errors
