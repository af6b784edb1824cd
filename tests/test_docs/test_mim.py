"""``mim search mmacmix`` on an installed (not editable) mmacmix lists
every config, with the params and FLOPs of its metafile entry.

mim reads ``mmacmix/.mim/model-index.yml`` of the installed package and
the metafiles it imports, which setup.py ships beside the configs. The
package is installed from a copy of the checkout without the compiled
kernels (``MMACMIX_WITH_OPS=0``), into a folder put first on the path.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
NOT_SOURCE = shutil.ignore_patterns(
    '.*', '__pycache__', '*.so', '*.egg-info', 'build', 'dist', 'data',
    'work_dirs', 'checkpoints', '_build',
)  # fmt: skip

if os.environ.get('CI') != 'true':
    # openmim comes with the tests extra; in CI its absence is a failure.
    pytest.importorskip('mim')


def metafile_entries() -> dict[str, dict]:
    index = yaml.safe_load((REPO / 'model-index.yml').read_text())
    entries = {}
    for metafile in index['Import']:
        for model in yaml.safe_load((REPO / metafile).read_text())['Models']:
            entries[model['Name']] = model
    return entries


def test_mim_search_lists_every_config_of_the_installed_package(tmp_path):
    source, site = tmp_path / 'src', tmp_path / 'site'
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    env = dict(os.environ, MMACMIX_WITH_OPS='0', PIP_NO_INDEX='1')
    subprocess.run(
        [sys.executable, '-m', 'pip', 'install', '--no-deps', '-q']
        + ['--no-build-isolation', '--target', str(site), str(source)],
        check=True,
        capture_output=True,
        env=env,
    )
    assert (site / 'mmacmix' / '.mim' / 'model-index.yml').is_file()

    out = tmp_path / 'search.json'
    env = dict(os.environ, PYTHONPATH=str(site))
    result = subprocess.run(
        [sys.executable, '-m', 'mim', 'search', 'mmacmix', '--json', str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # pandas' default JSON: {field: {model name: value}}.
    found = json.loads(out.read_text())

    entries = metafile_entries()
    configs = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / 'configs').glob('[!_]*/*.py')
    )
    assert sorted(entry['Config'] for entry in entries.values()) == configs
    assert sorted(found['config']) == sorted(entries)
    for name, entry in entries.items():
        assert found['config'][name] == entry['Config']
        assert found['parameters'][name] == entry['Metadata']['Parameters']
        assert found['flops'][name] == entry['Metadata']['FLOPs']

    # The table a person reads names every config too.
    result = subprocess.run(
        [sys.executable, '-m', 'mim', 'search', 'mmacmix']
        + ['--field', 'config', '--display-width', '200'],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for config in configs:
        assert config in result.stdout, config
