"""The shell launchers (tools/dist_*.sh, tools/slurm_*.sh), run as a user
runs them.

A bad argument (process count, node rank, port, Slurm sizes, a config or
checkpoint that is not there) is one ``error:`` line before anything
starts: the stand-in interpreter below records whether it was started.
Under torchrun (CPU, gloo), a worker that fails has its own error line
printed last, after torchrun's report of the failure.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / 'tools'


def stand_in(folder: Path) -> Path:
    """An interpreter that writes its arguments into ``started``."""
    path = folder / 'python'
    path.write_text(f'#!/bin/sh\necho "$@" > {folder / "started"}\n')
    path.chmod(0o755)
    return path


def launch(script, args, cwd, **env) -> subprocess.CompletedProcess:
    """Runs a launcher from ``cwd`` with ``env`` added to the caller's."""
    base = {k: v for k, v in os.environ.items() if k != 'PYTHON'}
    return subprocess.run(
        ['bash', str(TOOLS / script), *args],
        cwd=cwd,
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def user_folder(tmp_path) -> Path:
    """A working folder with a config and a checkpoint, and the stand-in
    interpreter (outside it)."""
    work = tmp_path / 'work'
    work.mkdir()
    (work / 'cfg.py').write_text("model = dict(type='X')\n")
    (work / 'ckpt.pth').write_bytes(b'')
    stand_in(tmp_path)
    return work


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


@pytest.mark.parametrize(
    'script, args, env, status, message',
    [
        (
            'dist_train.sh',
            ['cfg.py', 'abc'],
            {},
            2,
            'NPROC (processes per machine) must be a positive integer, '
            "got 'abc'",
        ),
        (
            'dist_train.sh',
            ['cfg.py', '0'],
            {},
            2,
            'NPROC (processes per machine) must be a positive integer, '
            "got '0'",
        ),
        (
            'dist_test.sh',
            ['cfg.py', 'ckpt.pth', '-2'],
            {},
            2,
            'NPROC (processes per machine) must be a positive integer, '
            "got '-2'",
        ),
        (
            'dist_train.sh',
            ['cfg.py', '2'],
            dict(NNODES='2', NODE_RANK='2'),
            2,
            'NODE_RANK (with NNODES=2) must be an integer from 0 to 1, '
            "got '2'",
        ),
        (
            'dist_train.sh',
            ['cfg.py', '2'],
            dict(NNODES='x'),
            2,
            "NNODES must be a positive integer, got 'x'",
        ),
        (
            'dist_train.sh',
            ['cfg.py', '2'],
            dict(PORT='80000'),
            2,
            "PORT must be an integer from 1 to 65535, got '80000'",
        ),
        (
            'dist_train.sh',
            ['absent.py', '2'],
            {},
            1,
            "config 'absent.py' does not exist",
        ),
        (
            'dist_train.sh',
            ['.', '2'],
            {},
            1,
            "config '.' is a folder; expected a config file (.py)",
        ),
        (
            'dist_test.sh',
            ['cfg.py', 'absent.pth', '2'],
            {},
            1,
            "checkpoint 'absent.pth' does not exist",
        ),
        (
            'slurm_train.sh',
            ['partition', 'job', 'absent.py'],
            {},
            1,
            "config 'absent.py' does not exist",
        ),
        (
            'slurm_train.sh',
            ['partition', 'job', 'cfg.py'],
            dict(GPUS='eight'),
            2,
            "GPUS must be a positive integer, got 'eight'",
        ),
        (
            'slurm_test.sh',
            ['partition', 'job', 'cfg.py', 'ckpt.pth'],
            dict(GPUS_PER_NODE='0'),
            2,
            "GPUS_PER_NODE must be a positive integer, got '0'",
        ),
        (
            'slurm_test.sh',
            ['partition', 'job', 'cfg.py', 'ckpt.pth'],
            dict(CPUS_PER_TASK='1.5'),
            2,
            "CPUS_PER_TASK must be a positive integer, got '1.5'",
        ),
    ],
)
def test_bad_arguments_stop_before_anything_starts(
    script, args, env, status, message, user_folder
):
    before = listing(user_folder.parent)
    result = launch(
        script,
        args,
        user_folder,
        PYTHON=str(user_folder.parent / 'python'),
        **env,
    )
    assert result.returncode == status
    assert result.stderr == f'error: {message}\n'
    assert result.stdout == ''
    # Neither torchrun nor srun started; nothing was written.
    assert listing(user_folder.parent) == before


@pytest.mark.parametrize(
    'script, bad, good',
    [
        ('dist_train.sh', ['cfg.py', 'abc'], ['cfg.py', '2']),
        (
            'dist_test.sh',
            ['cfg.py', 'ckpt.pth', '0'],
            ['cfg.py', 'ckpt.pth', '1'],
        ),
    ],
)
def test_the_corrected_count_starts_torchrun(script, bad, good, user_folder):
    python = str(user_folder.parent / 'python')
    assert launch(script, bad, user_folder, PYTHON=python).returncode == 2
    result = launch(script, good, user_folder, PYTHON=python)
    assert result.returncode == 0, result.stderr
    started = (user_folder.parent / 'started').read_text()
    assert started.startswith('-m torch.distributed.run ')
    assert f'--nproc_per_node={good[-1]} ' in started


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('127.0.0.1', 0))
        return probe.getsockname()[1]


def test_a_failing_workers_error_line_is_printed_last(tmp_path):
    """Both workers of tools/train.py fail on the config; after torchrun's
    ChildFailedError report, the workers' own line ends the output."""
    config = tmp_path / 'broken.py'
    config.write_text("model = dict(\n    type='X',\n    depth=26\n")
    (tmp_path / 'tmp').mkdir()
    result = launch(
        'dist_train.sh',
        [str(config), '2', '--work-dir', str(tmp_path / 'work')],
        tmp_path,
        PYTHON=sys.executable,
        PORT=str(free_port()),
        OMP_NUM_THREADS='1',
        TMPDIR=str(tmp_path / 'tmp'),
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    expected = f"error: config '{config}', line 1: '(' was never closed"
    assert lines[-1].startswith(expected), result.stderr[-3000:]
    # torchrun's own report comes before it.
    report = result.stderr.rindex('ChildFailedError')
    assert report < result.stderr.rindex(expected)
    assert not (tmp_path / 'work').exists()
    # The launcher's folder for the workers' lines is gone too.
    assert sorted(p.name for p in tmp_path.iterdir()) == ['broken.py', 'tmp']
    assert list((tmp_path / 'tmp').glob('mmacmix-launch.*')) == []


@pytest.mark.skipif(shutil.which('srun') is not None, reason='Slurm here')
def test_without_slurm_the_suggested_launcher_starts(user_folder):
    python = str(user_folder.parent / 'python')
    result = launch(
        'slurm_train.sh',
        ['partition', 'job', 'cfg.py'],
        user_folder,
        PYTHON=python,
    )
    assert result.returncode == 1
    assert 'Elsewhere use tools/dist_*.sh' in result.stderr
    assert not (user_folder.parent / 'started').exists()
    result = launch(
        'dist_train.sh', ['cfg.py', '1'], user_folder, PYTHON=python
    )
    assert result.returncode == 0, result.stderr
    started = (user_folder.parent / 'started').read_text()
    assert started.startswith('-m torch.distributed.run ')
