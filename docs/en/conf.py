"""Sphinx configuration of the mmacmix documentation (myst-parser).

Build with warnings as errors, as the tests do::

    sphinx-build -W -b html docs/en /tmp/mmacmix-docs
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _version() -> str:
    """Reads ``__version__`` without importing mmacmix (no torch needed)."""
    scope: dict = {}
    exec((ROOT / 'mmacmix' / 'version.py').read_text(), scope)
    return scope['__version__']


project = 'mmacmix'
author = 'mmacmix contributors'
copyright = 'mmacmix contributors'
release = version = _version()

extensions = ['myst_parser']
source_suffix = {'.md': 'markdown'}
# Links to a section (page.md#title) resolve like GitHub's anchors.
myst_heading_anchors = 3
exclude_patterns = ['_build']
html_theme = 'alabaster'
html_title = f'mmacmix {release}'
