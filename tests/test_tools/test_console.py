"""A command's output starts with its own lines: the deprecation warnings
of other packages (pkg_resources, which MMEngine imports while it reads a
config) are held where the command starts, not when mmacmix is imported,
and go to the run's log file (checked by the segmentation demo's test in
tests/test_demo)."""

import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / 'configs/demo/mask-rcnn_acmix-r26_fpn_shapes.py'
# What MMEngine does while it reads a config with an mmdet:: base.
READ_PACKAGE = "from mmengine.utils import is_installed; is_installed('mmdet')"


def python(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_command_prints_only_its_own_line(tmp_path):
    checkpoint = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), checkpoint)
    result = python(
        str(REPO / 'tools' / 'test.py'),
        str(DEMO_CONFIG),
        str(checkpoint),
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert result.stdout == ''
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: '{checkpoint}' holds a Tensor")


def test_importing_mmacmix_filters_nothing(tmp_path):
    """The warnings exist here, and a program that imports mmacmix (but
    runs none of its commands) still sees them."""
    for imports in ('', 'import mmacmix.cli, mmacmix.demo, mmacmix.apis; '):
        result = python('-c', imports + READ_PACKAGE, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert 'pkg_resources is deprecated' in result.stderr
