"""The configs shipped with mmacmix, found without the source tree.

A built and installed mmacmix carries ``configs/`` and ``tools/`` in
``mmacmix/.mim/``, OpenMMLab's layout, where ``mim train mmacmix NAME``
looks for them; a source checkout (editable install) has them beside the
package. ``python -m mmacmix.configs NAME`` prints the path of a config,
e.g. for ``mim train mmdet $(python -m mmacmix.configs NAME)``.
"""

import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def config_root() -> Path:
    """The folder of the shipped configs.

    Raises:
        FileNotFoundError: If neither an installed nor a checkout layout
            holds them.
    """
    for root in (PACKAGE / '.mim' / 'configs', PACKAGE.parent / 'configs'):
        if root.is_dir():
            return root
    raise FileNotFoundError(
        f'no configs found beside mmacmix ({PACKAGE}): expected '
        f'{PACKAGE / ".mim" / "configs"} (pip install .) or '
        f'{PACKAGE.parent / "configs"} (source checkout)'
    )


def find_config(name: str) -> str:
    """Returns the path of a shipped config.

    Args:
        name (str): Its path below ``configs/``
            (``'demo/mask-rcnn_acmix-r26_fpn_shapes.py'``) or, as ``mim``
            accepts, its file name alone.

    Raises:
        FileNotFoundError: If no config, or several, have that name.
    """
    root = config_root()
    path = root / name
    if path.is_file():
        return str(path)
    found = sorted(root.rglob(Path(name).name)) if name else []
    if len(found) == 1:
        return str(found[0])
    names = ', '.join(str(p.relative_to(root)) for p in found)
    raise FileNotFoundError(
        f'{name!r} is not one config under {root}'
        + (f': several have that name ({names})' if found else '')
        + '; give its path below configs/, e.g. '
        "'acmix_resnet/mask-rcnn_acmix-r50_fpn_1x_coco.py'"
    )


if __name__ == '__main__':
    from mmacmix.cli import exit_on_error

    with exit_on_error():
        if len(sys.argv) != 2:
            raise ValueError('usage: python -m mmacmix.configs NAME')
        print(find_config(sys.argv[1]))
