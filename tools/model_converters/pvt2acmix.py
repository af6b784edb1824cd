"""Convert a plain PVT v1 ImageNet checkpoint for ``mmacmix.ACmixPVT``.

SRC is an original release (whai362/PVT ``pvt_tiny.pth``, ``pvt_small.pth``:
the files mmdet's PVT configs load) or weights in the layout of mmdet's
``PyramidVisionTransformer``. The ACmix parameters are new and are listed;
they start with the convolution path switched off (``rate2 = 0``), so the
converted backbone computes the plain PVT until fine-tuning grows the path.
"""

from collections.abc import Mapping

from torch import Tensor

from mmacmix.checkpoint import describe_keys
from mmacmix.cli import convert_cli
from mmacmix.models.converters import convert_pvt_to_acmix, new_acmix_pvt_keys


def convert(checkpoint: Mapping) -> dict[str, Tensor]:
    """The conversion, naming the ACmix tensors SRC did not provide."""
    state_dict = convert_pvt_to_acmix(checkpoint)
    new = new_acmix_pvt_keys(state_dict)
    print(f'new (not in SRC): {len(new)} ACmix tensors, {describe_keys(new)}')
    return state_dict


def main(argv: list[str] | None = None) -> None:
    convert_cli(convert, __doc__.splitlines()[0], argv)


if __name__ == '__main__':
    main()
