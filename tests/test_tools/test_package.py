"""mmacmix as a built, installed package: no file left behind, and the
configs found without the source tree.

The wheel is built from a copy of the checkout without the compiled
kernels (``MMACMIX_WITH_OPS=0``: the C++ build takes minutes on 2 cores;
the package falls back to PyTorch without them). Unpacked, a wheel is
exactly what ``pip install`` puts in site-packages.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What setup.py ships in mmacmix/.mim/, by folder of the checkout.
MIM_FILES = {'configs': ('*.py',), 'tools': ('*.py', '*.sh')}
NOT_SOURCE = shutil.ignore_patterns(
    '.*', '__pycache__', '*.so', '*.egg-info', 'build', 'dist', 'data',
    'work_dirs', 'checkpoints',
)  # fmt: skip


def expected_files() -> set[str]:
    """Paths in the wheel of every module, config and tool of the checkout."""
    files = {
        str(path.relative_to(REPO))
        for path in (REPO / 'mmacmix').rglob('*.py')
    }
    for folder, patterns in MIM_FILES.items():
        for pattern in patterns:
            files |= {
                f'mmacmix/.mim/{path.relative_to(REPO)}'
                for path in (REPO / folder).rglob(pattern)
            }
    return files


def test_wheel_holds_every_file_and_finds_its_configs_when_installed(
    tmp_path,
):
    source, wheels, site = (tmp_path / name for name in ('src', 'whl', 'site'))
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    env = dict(os.environ, MMACMIX_WITH_OPS='0', PIP_NO_INDEX='1')
    subprocess.run(
        [sys.executable, '-m', 'pip', 'wheel', '--no-deps']
        + ['--no-build-isolation', '-q', '-w', str(wheels), str(source)],
        check=True,
        capture_output=True,
        env=env,
    )
    [wheel] = wheels.glob('mmacmix-*.whl')
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)
    missing = sorted(expected_files() - names)
    assert not missing, f'not in the wheel: {missing}'

    # Installed: from a folder without the checkout, every shipped config
    # parses (its mmdet::/mmseg::/mmpretrain:: and relative bases), mim's
    # lookup (mmacmix/.mim/configs, .mim/tools/train.py) and ours find them.
    script = textwrap.dedent("""
        import sys
        from pathlib import Path
        from mmengine.config import Config
        import mmacmix
        from mmacmix.configs import config_root, find_config
        from mmacmix.demo.pipeline import default_config

        package = Path(mmacmix.__file__).parent
        assert package == Path(sys.argv[1], 'mmacmix'), package
        assert config_root() == package / '.mim' / 'configs'
        assert (package / '.mim' / 'tools' / 'train.py').is_file()
        configs = sorted(config_root().rglob('*.py'))
        for path in configs:
            Config.fromfile(str(path))
        print(len(configs))
        print(default_config())
        print(find_config('mask-rcnn_acmix-r50_fpn_1x_coco.py'))
    """)
    out = subprocess.run(
        [sys.executable, '-c', script, str(site)],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=dict(os.environ, PYTHONPATH=str(site)),
    ).stdout.split('\n')
    configs = site / 'mmacmix/.mim/configs'
    assert int(out[0]) == len(list((REPO / 'configs').rglob('*.py')))
    assert out[1] == str(configs / 'demo/mask-rcnn_acmix-r26_fpn_shapes.py')
    assert out[2] == str(
        configs / 'acmix_resnet/mask-rcnn_acmix-r50_fpn_1x_coco.py'
    )
