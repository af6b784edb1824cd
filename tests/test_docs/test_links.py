"""Every link and file path the documentation names resolves.

Checks README.md, CHANGELOG.md, docs/ and the config folders' READMEs:
each relative link (and its ``#anchor``, against the target's headings),
and each repository path they name in text or code (``configs/...``,
``tools/...`` and so on, with ``{a,b}`` alternatives and ``*`` globs).
It also checks that no test, module or tool cites a repository file that
does not exist.
"""

import itertools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_FOLDERS = ('configs', 'docs', 'mmacmix', 'requirements', 'tests', 'tools')
# A repository path with an extension, not inside a longer path or a URL.
PATH = re.compile(
    r'(?<![\w./:-])((?:' + '|'.join(TOP_FOLDERS) + r')/[\w./{},*-]*?'
    r'\.(?:py|md|yml|yaml|sh|txt|cpp|h|png))(?![\w/])'
)
LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')
FENCE = re.compile(r'^(```|~~~).*?^\1', re.M | re.S)
HEADING = re.compile(r'^#{1,6}\s+(.+?)\s*$', re.M)


def markdown_files() -> list[Path]:
    """The documentation: README, changelog, docs/ and config READMEs."""
    files = [REPO / 'README.md', REPO / 'CHANGELOG.md']
    files += sorted((REPO / 'docs').rglob('*.md'))
    files += sorted((REPO / 'configs').glob('*/README.md'))
    return [path for path in files if '_build' not in path.parts]


def source_files() -> list[Path]:
    """The code whose docstrings and comments may cite files."""
    files = []
    for folder in ('mmacmix', 'tools', 'tests'):
        for pattern in ('*.py', '*.sh'):
            files += sorted((REPO / folder).rglob(pattern))
    return files


def slug(title: str) -> str:
    """The anchor GitHub (and myst's heading anchors) give a heading."""
    title = re.sub(r'[`*]', '', title).strip().lower()
    title = re.sub(r'[^\w\- ]', '', title)
    return title.replace(' ', '-')


def anchors(path: Path) -> set[str]:
    text = FENCE.sub('', path.read_text())
    return {slug(title) for title in HEADING.findall(text)}


def expand(pattern: str) -> list[str]:
    """``a{b,c}d`` to ``abd``, ``acd``."""
    parts = re.split(r'\{([^{}]*,[^{}]*)\}', pattern)
    options = [
        part.split(',') if index % 2 else [part]
        for index, part in enumerate(parts)
    ]
    return [''.join(choice) for choice in itertools.product(*options)]


def missing_paths(text: str) -> list[str]:
    """Paths named in ``text`` that match no file of the repository."""
    missing = []
    for named in sorted(set(PATH.findall(text))):
        for path in expand(named):
            if '{' in path or '/.mim/' in path:
                continue  # a format string; an installed copy's path
            if (
                not any(REPO.glob(path))
                if '*' in path
                else not (REPO / path).exists()
            ):
                missing.append(path)
    return missing


def test_the_path_pattern_finds_paths_and_expands_alternatives():
    text = (
        'run `tools/train.py` on configs/acmix_resnet/acmix-r{26,50}'
        '_8xb16_in1k.py, not .venv/bin/x or mmacmix/.mim/tools/test.py; '
        'https://host/tools/a.py and configs/missing_config.py'
    )
    assert PATH.findall(text) == [
        'tools/train.py',
        'configs/acmix_resnet/acmix-r{26,50}_8xb16_in1k.py',
        'mmacmix/.mim/tools/test.py',
        'configs/missing_config.py',
    ]
    assert missing_paths(text) == ['configs/missing_config.py']
    assert slug('Mixed precision (AMP)') == 'mixed-precision-amp'
    assert slug('`weights_only`') == 'weights_only'


@pytest.mark.parametrize(
    'path', markdown_files(), ids=lambda path: str(path.relative_to(REPO))
)
def test_every_relative_link_and_named_path_resolves(path):
    text = path.read_text()
    broken = []
    for target in LINK.findall(FENCE.sub('', text)):
        if re.match(r'[a-z]+:', target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition('#')
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(f'{target} (no such file)')
        elif anchor and resolved.suffix == '.md':
            if anchor not in anchors(resolved):
                broken.append(f'{target} (no heading #{anchor})')
    assert not broken, f'{path.relative_to(REPO)}: broken links {broken}'
    missing = missing_paths(text)
    assert not missing, f'{path.relative_to(REPO)} names {missing}'


def test_no_code_cites_a_missing_file():
    citing = {}
    for path in source_files():
        if path == Path(__file__):
            continue  # its own examples name a missing config on purpose
        missing = missing_paths(path.read_text())
        if missing:
            citing[str(path.relative_to(REPO))] = missing
    assert not citing, f'files named that do not exist: {citing}'
