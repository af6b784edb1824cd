"""Packaging for mmacmix; pinned versions for a CPU setup live in
requirements/constraints.txt."""

import sys
from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    """Reads ``__version__`` without importing the package (torch-free)."""
    text = Path(__file__).with_name('mmacmix').joinpath('version.py')
    scope: dict = {}
    exec(text.read_text(), scope)
    return scope['__version__']


def extensions() -> dict:
    """The compiled CPU kernels, built only when torch is importable.

    Without them (no torch at build time, no compiler, a failed build) the
    package still works, on a much slower PyTorch fallback.
    """
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
        compile_args, link_args = ['-O3', '-fopenmp'], ['-fopenmp']
    extension = CppExtension(
        'mmacmix.ops._ext',
        ['mmacmix/ops/csrc/local_attention.cpp'],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        # A failed build is reported and skipped, not fatal.
        optional=True,
    )
    # Without ninja, compiler errors are the ones `optional` catches.
    build = BuildExtension.with_options(use_ninja=False)
    return {'ext_modules': [extension], 'cmdclass': {'build_ext': build}}


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
        ],
    },
    keywords='computer vision, object detection, segmentation, acmix',
    classifiers=[
        'Programming Language :: Python :: 3',
        'License :: OSI Approved :: Apache Software License',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
    ],
    **extensions(),
)
