"""One classification image per shape, cut out of the shapes dataset.

The demo's ``--pretrain`` teaches ACmix-ResNet-26 to tell the four shapes
apart before it learns to detect them, as ImageNet pretraining does for real
detectors. Every annotated instance of the COCO splits becomes one crop: a
square around its box, widened by ``margin`` on every side and clipped to
the image, saved losslessly (PNG) so that its pixels are exactly those of
the source image there. Its label is the annotation's category. Occluded
instances are kept as they are, other shapes' parts included: the label says
which shape the box was drawn for.

Layout under ``<shapes root>/cls`` (mmpretrain's ``CustomDataset`` reads it
with ``ann_file='meta/{split}.txt'`` and ``data_prefix='{split}/'``, or from
the class folders alone, which it orders alphabetically)::

    spec.json                 what was generated (checked on reuse)
    meta/{train,val}.txt      one 'circle/000012_00031.png 0' line per crop
    crops_{train,val}.json    where each crop comes from (image, annotation
                              id, box x0, y0, x1, y1 in pixels, end excluded)
    {train,val}/<class>/<image>_<annotation id>.png
"""

import json
import math
import os
import os.path as osp
import shutil
import tempfile

import cv2

CROPS_FOLDER = 'cls'
CROP_SPLITS = ('train', 'val')


def crop_box(
    bbox: list[float], image_size: tuple[int, int], margin: float
) -> tuple[int, int, int, int]:
    """The square, clipped crop around a COCO box.

    Args:
        bbox (list[float]): ``[x, y, width, height]`` in pixels.
        image_size (tuple[int, int]): Height and width of the image.
        margin (float): Context added on each side, as a share of the box's
            longer side.

    Returns:
        tuple[int, int, int, int]: ``x0, y0, x1, y1`` (ends excluded); the
        box lies inside, and so does the crop inside the image.
    """
    x, y, width, height = bbox
    side = max(width, height) * (1 + 2 * margin)
    cx, cy = x + width / 2, y + height / 2
    rows, cols = image_size
    # Rounding outwards keeps every pixel of the box inside the crop.
    x0 = max(0, math.floor(cx - side / 2))
    y0 = max(0, math.floor(cy - side / 2))
    x1 = min(cols, math.ceil(cx + side / 2))
    y1 = min(rows, math.ceil(cy + side / 2))
    return x0, y0, x1, y1


def generate_shape_crops(root: str, margin: float = 0.15) -> str:
    """Writes the crops of the shapes dataset at ``root`` into ``root/cls``.

    Nothing is done when ``root/cls`` already holds the crops of this
    dataset with this ``margin``. The crops are built in a hidden temporary
    folder inside ``root`` and renamed into place, so an interrupted run
    leaves no half-written ``cls`` folder.

    Args:
        root (str): A shapes dataset (see
            :func:`~mmacmix.datasets.generate_shapes_dataset`).
        margin (float): Context around each box, as a share of its longer
            side, on every side; in ``[0, 1]``. Defaults to 0.15.

    Returns:
        str: The crops' folder, ``root/cls``.

    Raises:
        ValueError: If ``margin`` lies outside ``[0, 1]``.
        FileNotFoundError: If ``root`` holds no shapes dataset.
        FileExistsError: If ``root/cls`` holds something else: crops of
            another margin or dataset, or files of unknown origin.
    """
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise ValueError(f'margin must be a number, got {margin!r}')
    if not 0 <= margin <= 1:
        raise ValueError(f'margin must lie in [0, 1], got {margin!r}')
    source_marker = osp.join(root, 'spec.json')
    if not osp.isfile(source_marker):
        raise FileNotFoundError(
            f'{root!r} holds no shapes dataset (no spec.json); generate it '
            'first (python -m mmacmix.demo --data-only)'
        )
    with open(source_marker) as file:
        source = json.load(file)
    wanted = json.dumps(
        dict(margin=float(margin), source=source), sort_keys=True
    )
    out = osp.join(root, CROPS_FOLDER)
    marker = osp.join(out, 'spec.json')
    if osp.isfile(marker):
        with open(marker) as file:
            if file.read() == wanted:
                return out
        raise FileExistsError(
            f'{out!r} holds crops of another margin or dataset; delete it '
            'to generate them again'
        )
    if osp.lexists(out):
        raise FileExistsError(f'{out!r} exists and holds no shape crops')
    build = tempfile.mkdtemp(dir=root, prefix=f'.{CROPS_FOLDER}-')
    try:
        for split in CROP_SPLITS:
            _write_split(root, build, split, margin)
        with open(osp.join(build, 'spec.json'), 'w') as file:
            file.write(wanted)
        # mkdtemp makes the folder private; give it what mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(build, 0o777 & ~umask)
        os.replace(build, out)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return out


def _write_split(root: str, build: str, split: str, margin: float) -> None:
    coco = osp.join(root, 'coco')
    with open(
        osp.join(coco, 'annotations', f'instances_{split}.json')
    ) as file:
        annotations = json.load(file)
    # Category ids are 1-based and follow the classes' order.
    classes = {
        category['id']: category['name']
        for category in annotations['categories']
    }
    labels = {cid: index for index, cid in enumerate(sorted(classes))}
    for name in classes.values():
        os.makedirs(osp.join(build, split, name), exist_ok=True)
    by_image: dict[int, list[dict]] = {}
    for annotation in annotations['annotations']:
        by_image.setdefault(annotation['image_id'], []).append(annotation)
    lines, records = [], []
    for image_info in sorted(annotations['images'], key=lambda i: i['id']):
        path = osp.join(coco, split, image_info['file_name'])
        image = cv2.imread(path)
        if image is None:
            raise OSError(f'cannot read the image {path!r}')
        stem = osp.splitext(image_info['file_name'])[0]
        for annotation in sorted(
            by_image.get(image_info['id'], []), key=lambda a: a['id']
        ):
            x0, y0, x1, y1 = crop_box(
                annotation['bbox'], image.shape[:2], margin
            )
            category = annotation['category_id']
            file_name = (
                f'{classes[category]}/{stem}_{annotation["id"]:05d}.png'
            )
            cv2.imwrite(osp.join(build, split, file_name), image[y0:y1, x0:x1])
            lines.append(f'{file_name} {labels[category]}\n')
            records.append(
                dict(
                    file=file_name,
                    label=labels[category],
                    image=image_info['file_name'],
                    annotation_id=annotation['id'],
                    box=[x0, y0, x1, y1],
                )
            )
    os.makedirs(osp.join(build, 'meta'), exist_ok=True)
    with open(osp.join(build, 'meta', f'{split}.txt'), 'w') as file:
        file.writelines(lines)
    with open(osp.join(build, f'crops_{split}.json'), 'w') as file:
        json.dump(
            dict(classes=[classes[c] for c in sorted(classes)], crops=records),
            file,
        )
