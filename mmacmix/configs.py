"""The configs shipped with mmacmix, found without the source tree.

A built and installed mmacmix carries ``configs/`` and ``tools/`` in
``mmacmix/.mim/``, OpenMMLab's layout, where ``mim train mmacmix NAME``
looks for them; a source checkout (editable install) has them beside the
package. The command line prints the path of a config, e.g. for
``mim train mmdet $(python -m mmacmix.configs NAME)``, and lists them::

    python -m mmacmix.configs NAME
    python -m mmacmix.configs --list [PATTERN]

A config with a syntax error is named with its line by
:func:`explain_syntax_error`, which every command uses.
"""

import ast
import fnmatch
import os
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
EXAMPLE = 'acmix_resnet/mask-rcnn_acmix-r50_fpn_1x_coco.py'


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


def shipped_configs() -> list[str]:
    """Every shipped config, as its path below ``configs/``.

    Configs that only others inherit (``_base_/``) are left out.
    """
    root = config_root()
    return sorted(
        path.relative_to(root).as_posix()
        for path in root.rglob('*.py')
        if '_base_' not in path.relative_to(root).parts
    )


def find_config(name: str) -> str:
    """Returns the path of a shipped config.

    Args:
        name (str): Its path below ``configs/``
            (``'demo/mask-rcnn_acmix-r26_fpn_shapes.py'``) or, as ``mim``
            accepts, its file name alone, with or without ``.py``.

    Raises:
        FileNotFoundError: If no config, or several, have that name; the
            message names the closest shipped configs.
    """
    root = config_root()
    path = root / name
    if name and path.is_file():
        return str(path)
    file_name = Path(name).name if name else ''
    if file_name and not file_name.endswith('.py'):
        file_name += '.py'
    found = sorted(root.rglob(file_name)) if file_name else []
    if len(found) == 1:
        return str(found[0])
    if found:
        names = ', '.join(str(p.relative_to(root)) for p in found)
        problem = f'several have that name ({names})'
    else:
        problem = 'no config has that name'
    from mmacmix.registry import closest

    shipped = shipped_configs()
    by_file = {Path(config).name: config for config in shipped}
    near = closest(name, shipped) or [
        by_file[match] for match in closest(file_name, by_file)
    ]
    hint = (
        '; did you mean ' + ' or '.join(near) + '?'
        if near and not found
        else f"; give its path below configs/, e.g. '{EXAMPLE}'"
    )
    raise FileNotFoundError(
        f'{name!r} is not one config under {root}: {problem}{hint} '
        '(python -m mmacmix.configs --list shows them all)'
    )


def explain_syntax_error(error: SyntaxError) -> str | None:
    """Names the config file and line of a syntax error.

    MMEngine reports a syntax error in a config without the file (the top
    config), or with the name of a temporary copy (a ``_base_`` config).
    The files that its config reader was reading, named in the
    traceback, are parsed again to find the one at fault.

    Args:
        error (SyntaxError): Raised while a command read its config.

    Returns:
        str | None: ``"config 'PATH', line N: MESSAGE: TEXT"``, or None if
        no config that the traceback names has a syntax error (then the
        error is not a config's).
    """
    for path in _files_being_read(error):
        try:
            ast.parse(Path(path).read_bytes(), filename=path)
        except SyntaxError as found:
            text = (found.text or '').strip()
            return f'config {path!r}, line {found.lineno}: {found.msg}' + (
                f': {text}' if text else ''
            )
        except OSError:
            continue
    return None


def _files_being_read(error: BaseException) -> list[str]:
    """Python files named by a ``filename`` local of the frames that
    ``error`` passed through, innermost first. (MMEngine's temporary
    copies of a config are gone by the time the error is reported.)"""
    files: list[str] = []
    trace = error.__traceback__
    while trace is not None:
        name = trace.tb_frame.f_locals.get('filename')
        if (
            isinstance(name, str)
            and name.endswith('.py')
            and os.path.isfile(name)
            and os.path.normpath(name) not in files
        ):
            files.insert(0, os.path.normpath(name))
        trace = trace.tb_next
    return files


def main(argv: list[str] | None = None) -> None:
    """``python -m mmacmix.configs``: a shipped config's path, or the
    list of them."""
    from mmacmix.cli import ArgumentParser, exit_on_error, start_command

    start_command()
    parser = ArgumentParser(
        prog='python -m mmacmix.configs',
        description='Print the path of a config shipped with mmacmix, e.g. '
        'for: mim train mmdet $(python -m mmacmix.configs NAME)',
    )
    parser.add_argument(
        'name',
        nargs='?',
        help='its path below configs/, or its file name alone',
    )
    parser.add_argument(
        '--list',
        nargs='?',
        const='*',
        metavar='PATTERN',
        help='list the shipped configs (those matching PATTERN, e.g. '
        "'*upernet*')",
    )
    args = parser.parse_args(argv)
    if args.list is not None and args.name is not None:
        parser.error('give either NAME or --list')
    if args.list is None and args.name is None:
        parser.error('give a config NAME, or --list to see them')
    with exit_on_error():
        if args.name is not None:
            print(find_config(args.name))
            return
        pattern = args.list if '*' in args.list else f'*{args.list}*'
        listed = [
            name
            for name in shipped_configs()
            if fnmatch.fnmatch(name, pattern)
        ]
        if not listed:
            raise FileNotFoundError(
                f'no shipped config matches {args.list!r} '
                '(--list without a pattern shows them all)'
            )
        print('\n'.join(listed))


if __name__ == '__main__':
    main()
