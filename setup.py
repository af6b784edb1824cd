"""Packaging for mmacmix; pinned versions for a CPU setup live in
requirements/constraints.txt."""

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# Shipped inside the package, as OpenMMLab packages ship theirs: ``mim``
# and mmacmix.configs find them in mmacmix/.mim/ of an installed copy
# (``mim search`` reads model-index.yml and the metafiles it imports).
MIM_FOLDERS = {'configs': ('*.py', 'metafile.yml'), 'tools': ('*.py', '*.sh')}
MIM_FILES = ('model-index.yml',)


def read_version() -> str:
    """Reads ``__version__`` without importing the package (torch-free)."""
    text = Path(__file__).with_name('mmacmix').joinpath('version.py')
    scope: dict = {}
    exec(text.read_text(), scope)
    return scope['__version__']


class BuildWithMimFiles(build_py):
    """Copies configs/ and tools/ into mmacmix/.mim/ of the build.

    An editable install reads them from the checkout instead.
    """

    def run(self) -> None:
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        mim = Path(self.build_lib, 'mmacmix', '.mim')
        shutil.rmtree(mim, ignore_errors=True)
        sources = [ROOT / name for name in MIM_FILES]
        for folder, patterns in MIM_FOLDERS.items():
            for pattern in patterns:
                sources += (ROOT / folder).rglob(pattern)
        for source in sources:
            target = mim / source.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def extensions() -> dict:
    """The compiled CPU kernels, built only when torch is importable.

    Without them (no torch at build time, no compiler, a failed build, or
    ``MMACMIX_WITH_OPS=0``) the package still works, on a much slower
    PyTorch fallback.
    """
    if os.environ.get('MMACMIX_WITH_OPS', '1') == '0':
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print('mmacmix: torch is not importable; skipping the compiled ops')
        return {}
    if sys.platform == 'win32':
        compile_args, link_args = ['/O2', '/openmp'], []
    elif sys.platform == 'darwin':  # Apple clang has no -fopenmp
        compile_args, link_args = ['-O3'], []
    else:
        # -Wno-psabi: the kernels pass wide vector types between inlined
        # helpers only, never across an ABI boundary.
        compile_args = ['-O3', '-fopenmp', '-Wno-psabi']
        link_args = ['-fopenmp']
    extension = CppExtension(
        'mmacmix.ops._ext',
        [
            f'mmacmix/ops/csrc/{name}.cpp'
            for name in (
                'bindings',
                'cpu_isa',
                'local_attention',
                'pixel_shift',
            )
        ],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        # A failed build is reported and skipped, not fatal.
        optional=True,
    )
    # Without ninja, compiler errors are the ones `optional` catches.
    build = BuildExtension.with_options(use_ninja=False)
    return {'ext_modules': [extension], 'cmdclass': {'build_ext': build}}


ops = extensions()
setup(
    name='mmacmix',
    version=read_version(),
    description=(
        'ACmix and X-volution backbones for OpenMMLab detection and '
        'segmentation'
    ),
    long_description=Path(__file__).with_name('README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.10',
    packages=find_packages(include=['mmacmix', 'mmacmix.*']),
    install_requires=['torch>=2.4', 'mmengine>=0.10,<1', 'mmcv>=2.0,<2.2'],
    extras_require={
        'mmdet': ['mmdet>=3.3,<4'],
        'mmseg': ['mmsegmentation>=1.2,<2', 'ftfy', 'regex'],
        'mmpretrain': ['mmpretrain>=1.2,<2', 'torchvision'],
        'all': [
            'mmdet>=3.3,<4',
            'mmsegmentation>=1.2,<2',
            'mmpretrain>=1.2,<2',
            'torchvision',
            'ftfy',
            'regex',
            'matplotlib',
        ],
        'tests': [
            'pytest',
            'pytest-xdist',
            'hypothesis',
            'onnx',
            'onnxruntime',
            'ruff',
            'openmim',
        ],
        'docs': ['sphinx>=7.2,<9', 'myst-parser>=3,<5'],
    },
    keywords='computer vision, object detection, segmentation, acmix',
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    ext_modules=ops.get('ext_modules', []),
    cmdclass={'build_py': BuildWithMimFiles, **ops.get('cmdclass', {})},
)
