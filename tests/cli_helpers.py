"""Running the command lines under tools/ in the test process, as a user
would, and reading what they print.

Shared by tests/test_tools; pytest puts this folder on ``sys.path`` (it
holds the root conftest.py). A subprocess would spend seconds importing
torch and mmdet per case.
"""

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tool(name: str):
    """The ``main`` of a script under tools/ (e.g. ``'deploy/x.py'``)."""
    return runpy.run_path(str(REPO / 'tools' / name))['main']


def run(main, args, capsys) -> tuple[int, str]:
    """Calls ``main(args)``; returns its exit status and stderr.

    What ``main`` returned (e.g. the Runner of tools/train.py) is kept in
    ``run.result`` (None after an exit).
    """
    run.result = None
    try:
        run.result = main([str(arg) for arg in args])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def listing(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*'))


def error_line(err: str) -> str:
    """The ``error:`` line of stderr, checked to be the only one of it."""
    [line] = [line for line in err.splitlines() if line.startswith('error:')]
    return line
