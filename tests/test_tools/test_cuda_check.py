"""The GPU check's dry run (CI runs the GPU check's code on the CPU), its
preflight and its wheel check."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / 'tools' / 'analysis' / 'cuda_check.sh'
DRIVER = REPO / 'tools' / 'analysis' / 'cuda_check.py'
sys.path.insert(0, str(DRIVER.parent))
import cuda_check  # noqa: E402


def run_script(*args, env=None, timeout=300):
    return subprocess.run(
        ['bash', str(SCRIPT), *map(str, args)],
        env=dict(os.environ, PYTHON=sys.executable, **(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope='module')
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('cuda_check')
    result = run_script('--dry-run', out)
    return result, out


def test_dry_run_passes_and_every_part_writes_its_output(dry_run):
    result, out = dry_run
    assert result.returncode == 0, (
        result.stdout[-3000:] + result.stderr[-3000:]
    )
    data = json.loads((out / 'cuda_check.json').read_text())
    assert set(data) == set(cuda_check.PHASES)
    for parts in data.values():
        env = parts['preflight']['environment']
        assert env['torch'] and env['device'].startswith('cpu')
        assert set(parts['preflight']['smoke_max_abs_diff']) == {
            'local_attention',
            'patch_aggregation',
        }
    ops = data['ops']
    expected = {'preflight', 'tests', 'sdpa_backends'} | {
        f'{name}_{dtype}' for name, dtype in cuda_check.OP_TABLES
    }
    assert set(ops) == expected
    # The CUDA tests are collected (and skip on the CPU).
    assert ops['tests']['exit_code'] == 0 and ops['tests']['tests'] > 0
    assert (out / 'tests.xml').exists()
    assert set(ops['sdpa_backends']) >= {'MATH', 'FLASH_ATTENTION'}
    assert ops['sdpa_backends']['MATH'] == 'runs'
    backbones = data['backbones']
    assert set(backbones) == {'preflight'} | {
        f'backbone_{name}_{dtype}'
        for name in cuda_check.BACKBONE_CASES
        for dtype in ('float32', 'float16')
    }
    tables = {**ops, **backbones}
    for part, table in tables.items():
        if part in ('preflight', 'tests', 'sdpa_backends'):
            continue
        assert table['rows'], part
        for row in table['rows']:
            assert 'error' not in row and 'skipped' not in row, (part, row)
            timed = row['cases']
            # Every case of the table timed (on the CPU the SAN table has
            # no separate PyTorch-loop column: 'auto' is that loop there).
            wanted = set(table['cases'])
            if part.startswith('san-aggregation'):
                wanted.discard('aggregation-loop')
            assert set(timed) == wanted, part
            assert all(case['ms'] > 0 for case in timed.values()), part
    # Half-precision op tables ran on half tensors: the ACmix op agrees
    # with its unfold reference only to half precision.
    assert ops['acmix_float16']['note'].startswith('float16 tensors')
    markdown = (out / 'cuda_check.md').read_text()
    assert '## backbones: backbone_resnet_float16' in markdown
    assert '| shape | conv ms | acmix ms |' in markdown


def test_a_missing_package_stops_the_preflight(tmp_path):
    # A broken mmengine first on the path: the preflight names it and
    # nothing but its own record is written.
    fake = tmp_path / 'path' / 'mmengine'
    fake.mkdir(parents=True)
    (fake / '__init__.py').write_text("raise ImportError('simulated')\n")
    out = tmp_path / 'out'
    result = subprocess.run(
        [sys.executable, str(DRIVER), '--phase', 'ops', '--dry-run', out],
        env=dict(os.environ, PYTHONPATH=f'{fake.parent}:{REPO}'),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        'preflight failed: RuntimeError: mmengine cannot be imported: '
        'simulated'
    )
    data = json.loads((out / 'cuda_check.json').read_text())
    assert data == {
        'ops': {
            'preflight': {
                'error': 'RuntimeError: mmengine cannot be imported: simulated'
            }
        }
    }
    assert not (out / 'tests.xml').exists()


def test_bad_phase_is_refused_before_anything_runs(tmp_path):
    result = run_script('--phase', 'gpu', tmp_path / 'out', timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "cuda_check.sh: --phase must be ops, backbones or all, got 'gpu'"
    )
    assert not (tmp_path / 'out').exists()


def test_mmdet_is_blocked():
    code = (
        f'import sys; sys.path.insert(0, {str(DRIVER.parent)!r}); '
        'import cuda_check; cuda_check.block_imports(); import mmdet'
    )
    result = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        'ModuleNotFoundError: mmdet is blocked: the GPU check must run '
        'without mmdet'
    )


def test_wheel_check_names_a_missing_requirement(tmp_path):
    # A wheel whose requirement is neither in the folder nor on the GPU
    # machine, and one built for another Python.
    import zipfile

    for name, requires in (
        ('demo-1.0-py3-none-any.whl', 'Requires-Dist: addict>=2\n'),
        ('other-1.0-cp311-cp311-manylinux2014_x86_64.whl', ''),
    ):
        package = name.split('-')[0]
        with zipfile.ZipFile(tmp_path / name, 'w') as wheel:
            wheel.writestr(
                f'{package}-1.0.dist-info/METADATA',
                f'Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n'
                + requires,
            )
    result = subprocess.run(
        [sys.executable, str(DRIVER), '--check-wheels', tmp_path],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'other-1.0-cp311-cp311-manylinux2014_x86_64.whl does not install on '
        'CPython 3.12 x86-64 Linux',
        'demo-1.0-py3-none-any.whl needs addict>=2: not in the folder',
    ]
