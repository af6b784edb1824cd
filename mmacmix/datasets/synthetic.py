"""A synthetic shapes dataset in COCO and ADE20K formats.

Coloured shapes of a few classes on textured backgrounds, with exact
instance masks (occlusion resolved by painting order). The same images serve
instance segmentation (COCO json with polygons) and semantic segmentation
(ADE20K folder layout, label 0 = background), so one dataset exercises
mmdet and mmseg configs without downloading anything. Generation is
deterministic for a given seed and written atomically.

Layout under ``root``::

    coco/annotations/instances_{train,val}.json
    coco/{train,val}/NNNNNN.jpg
    ade/images/{training,validation}/NNNNNN.jpg
    ade/annotations/{training,validation}/NNNNNN.png
"""

import json
import os
import os.path as osp
import shutil
import tempfile
from dataclasses import asdict, dataclass

import cv2
import numpy as np

SHAPE_CLASSES = ('circle', 'square', 'triangle', 'star')
SPLITS = {'train': 'training', 'val': 'validation'}


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate.

    Args:
        num_train (int): Training images.
        num_val (int): Validation images.
        image_size (tuple[int, int]): Height and width.
        max_instances (int): At most this many shapes per image (at least 1).
        classes (tuple[str, ...]): Category names, one shape kind each, in
            the order of :data:`SHAPE_CLASSES` (names may differ, e.g. COCO
            names so that mmdet's COCO configs accept the file).
        seed (int): Random seed.
    """

    num_train: int = 200
    num_val: int = 50
    image_size: tuple[int, int] = (128, 128)
    max_instances: int = 4
    classes: tuple[str, ...] = SHAPE_CLASSES
    seed: int = 0


def generate_shapes_dataset(root: str, spec: ShapesSpec = ShapesSpec()) -> str:
    """Generates the dataset under ``root`` unless it is already there.

    An existing ``root`` generated from the same ``spec`` is reused; one
    generated from another spec is an error (delete it or pick another
    root). The dataset is built in a temporary folder and renamed into
    place, so an interrupted run leaves nothing half-written.

    Args:
        root (str): Destination folder.
        spec (ShapesSpec): What to generate.

    Returns:
        str: ``root``.
    """
    if len(spec.classes) > len(SHAPE_CLASSES):
        raise ValueError(
            f'at most {len(SHAPE_CLASSES)} classes are '
            f'supported, got {len(spec.classes)}'
        )
    marker = osp.join(root, 'spec.json')
    wanted = json.dumps(asdict(spec), sort_keys=True)
    if osp.exists(marker):
        with open(marker) as file:
            found = file.read()
        if found == wanted:
            return root
        there = json.loads(found)
        differences = ', '.join(
            f'{key} {there.get(key)!r} instead of {value!r}'
            for key, value in json.loads(wanted).items()
            if there.get(key) != value
        )
        raise FileExistsError(
            f'{root!r} holds a shapes dataset of another spec '
            f'({differences}); choose another folder'
        )
    if osp.exists(root) and os.listdir(root):
        raise FileExistsError(f'{root!r} exists and is no shapes dataset')
    parent = osp.dirname(osp.abspath(root))
    os.makedirs(parent, exist_ok=True)
    build = tempfile.mkdtemp(dir=parent, prefix='.shapes-')
    try:
        rng = np.random.default_rng(spec.seed)
        counts = {'train': spec.num_train, 'val': spec.num_val}
        for split, count in counts.items():
            _write_split(build, split, count, spec, rng)
        with open(osp.join(build, 'spec.json'), 'w') as file:
            file.write(wanted)
        if osp.exists(root):
            os.rmdir(root)  # empty, checked above
        os.replace(build, root)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return root


def _write_split(
    root: str,
    split: str,
    count: int,
    spec: ShapesSpec,
    rng: np.random.Generator,
) -> None:
    ade_split = SPLITS[split]
    folders = {
        'coco': osp.join(root, 'coco', split),
        'ade_img': osp.join(root, 'ade', 'images', ade_split),
        'ade_ann': osp.join(root, 'ade', 'annotations', ade_split),
    }
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    os.makedirs(osp.join(root, 'coco', 'annotations'), exist_ok=True)
    height, width = spec.image_size
    images, annotations = [], []
    for index in range(count):
        image, masks, labels = draw_image(spec, rng)
        name = f'{index:06d}'
        cv2.imwrite(osp.join(folders['coco'], f'{name}.jpg'), image)
        cv2.imwrite(osp.join(folders['ade_img'], f'{name}.jpg'), image)
        semantic = np.zeros((height, width), np.uint8)
        for mask, label in zip(masks, labels):
            semantic[mask] = label + 1
        cv2.imwrite(osp.join(folders['ade_ann'], f'{name}.png'), semantic)
        image_id = index + 1
        images.append(
            dict(
                id=image_id,
                file_name=f'{name}.jpg',
                height=height,
                width=width,
            )
        )
        for mask, label in zip(masks, labels):
            annotation = _coco_annotation(mask, label)
            if annotation is not None:
                annotation.update(id=len(annotations) + 1, image_id=image_id)
                annotations.append(annotation)
    categories = [
        dict(id=i + 1, name=name, supercategory='shape')
        for i, name in enumerate(spec.classes)
    ]
    with open(
        osp.join(root, 'coco', 'annotations', f'instances_{split}.json'), 'w'
    ) as file:
        json.dump(
            dict(
                images=images, annotations=annotations, categories=categories
            ),
            file,
        )


def draw_image(
    spec: ShapesSpec, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray], list[int]]:
    """Draws one image.

    Returns:
        tuple: The BGR image (H, W, 3) uint8, the visible boolean mask of
        each instance, and each instance's class index.
    """
    height, width = spec.image_size
    image = _texture(height, width, rng)
    masks: list[np.ndarray] = []
    labels: list[int] = []
    for _ in range(rng.integers(1, spec.max_instances + 1)):
        label = int(rng.integers(len(spec.classes)))
        mask = _shape_mask(SHAPE_CLASSES[label], height, width, rng)
        colour = rng.integers(0, 256, 3)
        shade = _texture(height, width, rng).astype(np.float32) / 255
        fill = np.clip(colour * (0.6 + 0.4 * shade), 0, 255).astype(np.uint8)
        image[mask] = fill[mask]
        # Later shapes hide earlier ones: keep only what stays visible.
        masks = [m & ~mask for m in masks]
        masks.append(mask)
        labels.append(label)
    visible = [(m, lab) for m, lab in zip(masks, labels) if m.sum() >= 16]
    return image, [m for m, _ in visible], [lab for _, lab in visible]


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency colour noise plus stripes: a background with edges."""
    coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    ys, xs = np.mgrid[0:height, 0:width]
    angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
    stripes = np.sin(
        (xs * np.cos(angle) + ys * np.sin(angle)) / period * 2 * np.pi
    )
    noise = rng.normal(0, 12, (height, width, 1))
    image = smooth + 25 * stripes[..., None] + noise
    return np.clip(image, 0, 255).astype(np.uint8)


def _shape_mask(
    kind: str, height: int, width: int, rng: np.random.Generator
) -> np.ndarray:
    size = rng.uniform(0.12, 0.3) * min(height, width)
    cx = rng.uniform(size, width - size)
    cy = rng.uniform(size, height - size)
    canvas = np.zeros((height, width), np.uint8)
    if kind == 'circle':
        cv2.circle(canvas, (round(cx), round(cy)), round(size), 1, -1)
    else:
        corners = {'square': 4, 'triangle': 3, 'star': 10}[kind]
        turn = rng.uniform(0, 2 * np.pi)
        angles = turn + np.arange(corners) * 2 * np.pi / corners
        radii = np.full(corners, size)
        if kind == 'star':
            radii[1::2] *= 0.45
        points = np.stack(
            [cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1
        )
        cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1)
    return canvas.astype(bool)


def _coco_annotation(mask: np.ndarray, label: int) -> dict | None:
    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = [
        c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3
    ]
    if not polygons:
        return None
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    box = [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]
    return dict(
        category_id=label + 1,
        bbox=box,
        area=float(mask.sum()),
        segmentation=polygons,
        iscrowd=0,
    )
