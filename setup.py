"""Packaging for mmacmix; pinned versions for a CPU setup live in
requirements/constraints.txt."""

from pathlib import Path

from setuptools import find_packages, setup


def read_version() -> str:
    """Reads ``__version__`` without importing the package (torch-free)."""
    text = Path(__file__).with_name('mmacmix').joinpath('version.py')
    scope: dict = {}
    exec(text.read_text(), scope)
    return scope['__version__']


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
    python_requires='>=3.8',
    packages=find_packages(include=['mmacmix', 'mmacmix.*']),
    install_requires=['torch>=1.13', 'mmengine>=0.10,<1', 'mmcv>=2.0,<2.2'],
    extras_require={
        'mmdet': ['mmdet>=3.3,<4'],
        'mmseg': ['mmsegmentation>=1.2,<2', 'ftfy', 'regex'],
        'all': [
            'mmdet>=3.3,<4',
            'mmsegmentation>=1.2,<2',
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
)
