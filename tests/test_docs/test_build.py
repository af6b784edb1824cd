"""The documentation builds with Sphinx and myst-parser, warnings as
errors, as CI builds it (the ``docs`` extra)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / 'docs' / 'en'

if os.environ.get('CI') != 'true':
    # Without the docs extra, skip; in CI a missing Sphinx fails the build.
    pytest.importorskip('sphinx')
    pytest.importorskip('myst_parser')


def sphinx_build(source: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-q']
        + ['-b', 'html', '-d', str(out / 'doctrees'), str(source), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_docs_build_without_warnings_and_every_page_is_in_a_toctree(
    tmp_path,
):
    result = sphinx_build(DOCS, tmp_path)
    assert result.returncode == 0, result.stderr
    pages = {
        str(path.relative_to(DOCS).with_suffix(''))
        for path in DOCS.rglob('*.md')
        if '_build' not in path.parts
    }
    built = {
        str(path.relative_to(tmp_path).with_suffix(''))
        for path in tmp_path.rglob('*.html')
    }
    assert pages <= built, f'pages not built: {sorted(pages - built)}'
    assert 'index' in pages


def test_a_broken_reference_fails_the_build(tmp_path):
    # A copy of the docs with one link to a missing section: -W must make
    # Sphinx fail on it, naming the page and the target.
    source = tmp_path / 'en'
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns('_build'))
    conf = source / 'conf.py'
    # conf.py finds the package's version from its own place; keep it.
    conf.write_text(
        conf.read_text().replace(
            'Path(__file__).resolve().parents[2]', f'Path({str(REPO)!r})'
        )
    )
    page = source / 'troubleshooting.md'
    page.write_text(page.read_text() + '\nSee [x](benchmarks.md#no-such).\n')
    result = sphinx_build(source, tmp_path / 'html')
    assert result.returncode != 0
    assert 'troubleshooting.md' in result.stderr
    assert "'no-such'" in result.stderr
