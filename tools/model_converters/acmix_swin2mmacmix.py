"""Convert an official ACmix-Swin checkpoint for ``ACmixSwinTransformer``.

Usage: python tools/model_converters/acmix_swin2mmacmix.py SRC DST [--force]
[--keep-classifier]

With ``--keep-classifier`` DST is an mmpretrain ``ImageClassifier``
checkpoint (``backbone.*``, ``head.fc.*``) that ``tools/test.py`` evaluates
with configs/acmix_swin/acmix-swin-*_in1k.py; its backbone also loads into
the detection and segmentation configs.
"""

from mmacmix.cli import convert_cli
from mmacmix.models import convert_acmix_swin


def main(argv: list[str] | None = None) -> None:
    convert_cli(
        convert_acmix_swin,
        __doc__.splitlines()[0],
        argv,
        extra_arguments={
            '--keep-classifier': dict(
                action='store_true',
                help='write an mmpretrain ImageClassifier with the released '
                'ImageNet classifier',
            )
        },
        whole_model_option='keep_classifier',
    )


if __name__ == '__main__':
    main()
