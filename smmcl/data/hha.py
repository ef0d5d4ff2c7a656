"""HHA images from depth (Gupta, Girshick, Arbelaez, Malik, "Learning Rich Features from RGB-D Images
for Object Detection and Segmentation", ECCV 2014).

``python -m smmcl.data.hha --depth DIR --out DIR [--intrinsics fx fy cx cy] [--depth-scale S]`` encodes
every 16-bit depth PNG of DIR as an HHA image: three 8-bit channels, in the file's R, G, B order

1. horizontal disparity ``31000 / z``, z the depth in centimetres clamped to at least 100 (so it saturates
   at 255 for anything nearer than 1.22 m);
2. height in centimetres above the lowest point along the estimated gravity direction; when the lowest
   point is less than 90 cm below the camera, a floor 130 cm below the camera is assumed;
3. the angle in degrees between the local surface normal and gravity, plus 38 (``angle + 128 - 90``):
   38 on a floor, 128 on a wall, 218 on a ceiling.

This follows the authors' MATLAB code, s-gupta/rcnn-depth: ``rcnn/saveHHA.m`` (channels and ``uint8``),
``mcg/depth_features/processDepthImage.m`` (window sizes, the gravity parameters and the floor rule), and
its rgbdutils: ``computeNormalsSquareSupport.m`` (the plane fit), ``getYDir.m`` (gravity),
``getRMatrix.m``, ``getPointCloudFromZ.m`` (1-based pixel coordinates) and ``getCameraParam.m`` (NYU's
colour camera, our default). Decided here, where their code leaves it to the caller or to rounding:
pixels without depth (0) are written as 0 in all three channels (saveHHA.m expects hole-filled depth;
``--raw-depth`` takes the raw holes as its ``RD`` when the depth is filled); a window with fewer than 3
points has no normal (MATLAB: 0/0 or a normal made of rounding noise); a gravity iteration that selects
no normal keeps the direction (MATLAB: a zero or arbitrary vector). Vectorised NumPy plus OpenCV
separable sums, in float64 like MATLAB: about 0.25 s for a 640x480 map on one core.

Known limits of the method, kept: the gravity estimate starts from the image's down direction and only
looks at normals within 45 degrees of it or of its perpendicular, so a camera tilted by 45 degrees or more
is not corrected; windows straddling a floor-wall crease tilt the estimate by a few tenths of a degree.
"""
from __future__ import annotations

import argparse
import os
import os.path as osp
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

# getCameraParam('color') of rgbdutils: the NYU Depth V2 colour camera (fx, fy, cx, cy) at 640x480, with
# the principal point in MATLAB's 1-based pixel coordinates.
NYU_INTRINSICS = (5.1885790117450188e+02, 5.1946961112127485e+02, 3.2558244941119034e+02,
                  2.5373616633400465e+02)
NYU_SIZE = (480, 640)  # H, W the NYU intrinsics belong to
DEPTH_SCALE = 0.001  # 16-bit PNG value -> metres: millimetres, as NYU's toolbox and saveHHA.m store them

# processDepthImage.m: its normalParam.patchSize = [3 10] are radii in computeNormalsSquareSupport.m,
# windows of 7x7 (angle channel) and 21x21 (gravity) pixels; the iterative gravity estimate's angle
# thresholds (degrees) and iterations per threshold.
NORMAL_RADIUS = 3
GRAVITY_RADIUS = 10
GRAVITY_THRESHOLDS = (45.0, 15.0)
GRAVITY_ITERATIONS = (5, 5)
DOWN = np.array([0.0, 1.0, 0.0])  # y0: image y grows downwards, so gravity starts as +y
# saveHHA.m / processDepthImage.m constants, in centimetres.
MIN_DEPTH_CM = 100.0
DISPARITY_NUMERATOR = 31000.0
FLOOR_MIN_DROP_CM = 90.0
ASSUMED_FLOOR_DROP_CM = 130.0
ANGLE_OFFSET = 128.0 - 90.0


def matlab_uint8(x: np.ndarray) -> np.ndarray:
    """MATLAB's ``uint8(x)``: round half away from zero, saturate to 0..255, NaN -> 0 (NumPy's
    ``astype`` truncates and wraps instead)."""
    x = np.nan_to_num(np.asarray(x, np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    # Below zero everything saturates to 0, so floor(x + 0.5) is half-away-from-zero where it matters.
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def point_cloud(z: np.ndarray, intrinsics: Sequence[float]) -> np.ndarray:
    """Back-project depth ``z`` (H-W, any unit) through a pinhole camera (getPointCloudFromZ.m).

    Pixel (row i, column j) has MATLAB coordinates (j + 1, i + 1): the NYU calibration is 1-based.

    Returns:
        H-W-3 float64 points (X right, Y down, Z forward) in the unit of ``z``.
    """
    fx, fy, cx, cy = (float(v) for v in intrinsics)
    h, w = z.shape
    u = (np.arange(1, w + 1, dtype=np.float64) - cx) / fx
    v = (np.arange(1, h + 1, dtype=np.float64) - cy) / fy
    z = z.astype(np.float64)
    return np.stack([u[None, :] * z, v[:, None] * z, z], -1)


def plane_fit_normals(points: np.ndarray, missing: np.ndarray, radius: int) -> np.ndarray:
    """Unit normals from a least-squares plane through the valid points of each (2r+1)^2 window
    (computeNormalsSquareSupport.m, one superpixel).

    The plane ``n . p = 1`` divided by Z is linear in (X/Z, Y/Z, 1) with target 1/Z; the 3x3 normal
    equations are summed over the window with zero padding (MATLAB's ``filter2``), and solved
    with the adjugate (the determinant only scales n). Missing points add nothing to the sums.
    Orientation as theirs: first n_z >= 0, then n . p >= 0 (away from the camera).

    Args:
        points: H-W-3 point cloud (:func:`point_cloud`), used for the orientation everywhere.
        missing: H-W bool, points left out of the fits.
        radius: r.

    Returns:
        H-W-3 float64 unit normals; NaN where the window holds fewer than 3 valid points.
    """
    x, y, z = (np.where(missing, np.nan, points[..., k]) for k in range(3))
    with np.errstate(divide='ignore', invalid='ignore'):
        xz, yz, inv_z = x / z, y / z, 1.0 / z
        one = np.where(np.isnan(z), np.nan, 1.0)
        terms = np.stack([xz * xz, xz * yz, xz, yz * yz, yz, one,  # A^T A, upper triangle
                          xz * inv_z, yz * inv_z, inv_z], -1)      # A^T b
    terms = np.nan_to_num(terms, nan=0.0, posinf=0.0, neginf=0.0)
    # Direct separable sums, not cv2.boxFilter's running sums: those leave ~1e-12 where a window holds no
    # point, which would turn "no plane" (NaN, as in MATLAB) into a random normal.
    ones = np.ones(2 * radius + 1)
    sums = cv2.sepFilter2D(terms, -1, ones, ones, borderType=cv2.BORDER_CONSTANT)
    a1, a2, a3, a4, a5, a6, b1, b2, b3 = np.moveaxis(sums, -1, 0)
    # Adjugate of the symmetric [[a1 a2 a3] [a2 a4 a5] [a3 a5 a6]].
    c11, c12, c13 = a4 * a6 - a5 * a5, a3 * a5 - a2 * a6, a2 * a5 - a3 * a4
    c22, c23, c33 = a1 * a6 - a3 * a3, a2 * a3 - a1 * a5, a1 * a4 - a2 * a2
    n = np.stack([c11 * b1 + c12 * b2 + c13 * b3,
                  c12 * b1 + c22 * b2 + c23 * b3,
                  c13 * b1 + c23 * b2 + c33 * b3], -1)
    # Fewer than 3 points fix no plane. MATLAB's adjugate is then 0 or, through rounding in a2*a5 - a3*a4
    # and the like, ~1e-17 and normalised into an arbitrary normal; we make those NaN too.
    n[a6 < 3] = 0.0
    with np.errstate(divide='ignore', invalid='ignore'):
        n = n / np.linalg.norm(n, axis=-1, keepdims=True)  # 0 / 0 = NaN: no plane
        flip = np.sign(n[..., 2:])
        n = n * np.where(flip == 0, 1.0, flip)  # sign(NaN) stays NaN, as in MATLAB
        away = np.sign(np.sum(n * points, -1, keepdims=True))
    return n * np.where((away == 0) | np.isnan(away), 1.0, away)


def gravity_direction(normals: np.ndarray, thresholds: Sequence[float] = GRAVITY_THRESHOLDS,
                      iterations: Sequence[int] = GRAVITY_ITERATIONS) -> np.ndarray:
    """The direction of gravity from a normal field (getYDir.m).

    Starting from straight down in the image, each iteration takes the normals within ``t`` degrees of
    the current direction (floor, ceiling) and those within ``t`` of perpendicular (walls), and picks
    the direction most parallel to the first and most perpendicular to the second: the eigenvector of
    the smallest eigenvalue of ``NW NW^T - NF NF^T``, signed to agree with the previous one.

    Args:
        normals: H-W-3 unit normals (NaN ones are skipped).

    Returns:
        (3,) unit vector in camera coordinates (Y down).
    """
    nn = normals.reshape(-1, 3)
    nn = nn[~np.isnan(nn[:, 0])]
    down = DOWN.copy()
    for threshold, count in zip(thresholds, iterations):
        cos_t, sin_t = np.cos(np.deg2rad(threshold)), np.sin(np.deg2rad(threshold))
        for _ in range(count):
            similarity = np.abs(nn @ down)
            parallel, perpendicular = nn[similarity > cos_t], nn[similarity < sin_t]
            if not (len(parallel) or len(perpendicular)):
                break  # no evidence (e.g. no normals at all): keep the direction, not an arbitrary axis
            scatter = perpendicular.T @ perpendicular - parallel.T @ parallel  # 3x3
            _, vectors = np.linalg.eigh(scatter)  # eigenvalues ascending
            new = vectors[:, 0]
            # MATLAB's sign(0) = 0 would zero the direction (a measure-zero case); keep it instead.
            down = new * (1.0 if new @ down >= 0 else -1.0)
    return down


def hha_float(depth_m: np.ndarray, intrinsics: Sequence[float] = NYU_INTRINSICS,
              missing: Optional[np.ndarray] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The three HHA channels before the 8-bit conversion, and the gravity direction.

    Args:
        depth_m: H-W depth in metres, 0 where unknown.
        intrinsics: (fx, fy, cx, cy) in pixels, principal point 1-based (MATLAB).
        missing: H-W bool, points left out of the normal fits (saveHHA's ``RD == 0``); default
            ``depth_m == 0``. Pass the raw depth's holes when ``depth_m`` is hole-filled.

    Returns:
        H-W-3 float64 (disparity, height in cm, angle + 38), finite, 0 where ``depth_m`` is 0; and the
        (3,) gravity direction.
    """
    depth_m = np.asarray(depth_m, np.float64)
    if depth_m.ndim != 2:
        raise ValueError(f'depth must be an H-W map, not of shape {depth_m.shape}')
    depth_m = np.where(np.isfinite(depth_m) & (depth_m > 0), depth_m, 0.0)
    known = depth_m > 0
    missing = ~known if missing is None else (np.asarray(missing, bool) | ~known)
    if not known.any():
        return np.zeros(depth_m.shape + (3,)), DOWN.copy()
    z_cm = depth_m * 100.0
    points = point_cloud(z_cm, intrinsics)
    down = gravity_direction(plane_fit_normals(points, missing, GRAVITY_RADIUS))
    normals = plane_fit_normals(points, missing, NORMAL_RADIUS)

    # saveHHA.m clamps the cosine with MATLAB's min/max, which drop NaN: a normal without a plane
    # gives cos = -1, an angle of 180.
    cosine = np.clip(np.nan_to_num(normals @ down, nan=-1.0), -1.0, 1.0)
    angle = np.rad2deg(np.arccos(cosine)) + ANGLE_OFFSET

    # getRMatrix.m rotates by less than 0.1 degrees as the identity: height is then along image y.
    tilt = np.rad2deg(np.arccos(np.clip(down @ DOWN, -1.0, 1.0)))
    height = -(points @ (down if tilt > 0.1 else DOWN))
    lowest = height[known].min()
    if lowest > -FLOOR_MIN_DROP_CM:  # no point far enough below the camera to be the floor
        lowest = -ASSUMED_FLOOR_DROP_CM
    height = height - lowest

    disparity = DISPARITY_NUMERATOR / np.maximum(z_cm, MIN_DEPTH_CM)
    channels = np.stack([disparity, height, angle], -1)
    return np.where(known[..., None], channels, 0.0), down


def encode_hha(depth_m: np.ndarray, intrinsics: Sequence[float] = NYU_INTRINSICS,
               missing: Optional[np.ndarray] = None) -> np.ndarray:
    """HHA of a depth map (:func:`hha_float` converted with MATLAB's ``uint8``).

    Returns:
        H-W-3 uint8 in R, G, B order: (disparity, height, angle); 0 where the depth is 0. Write it with
        :func:`write_hha` (OpenCV writes B, G, R).
    """
    channels, _ = hha_float(depth_m, intrinsics, missing)
    return matlab_uint8(channels)


def write_hha(path: str, hha: np.ndarray, jpeg_quality: int = 95) -> None:
    """Write an R, G, B ordered HHA image (PNG, or JPEG by the extension) so that the file's R channel is
    disparity, as saveHHA.m's ``imwrite`` does."""
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.lower().endswith(('.jpg', '.jpeg')) else []
    if not cv2.imwrite(path, np.ascontiguousarray(hha[..., ::-1]), params):
        raise OSError(f'could not write {path}. Fix: check that its folder exists and is writable.')


def read_depth(path: str, scale: float = DEPTH_SCALE) -> np.ndarray:
    """A single-channel 16-bit depth PNG as metres (stored value * ``scale``, 0 = missing).

    Raises:
        ValueError: the file is missing, not an image, or not one channel of 16 bits.
    """
    depth = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if depth is None:
        raise ValueError(f'depth file {path} does not exist or cannot be decoded. Fix: give 16-bit PNG '
                         f'depth maps (millimetres by default, see --depth-scale).')
    if depth.ndim != 2 or depth.dtype != np.uint16:
        kind = f'{depth.shape[2] if depth.ndim == 3 else 1}-channel {depth.dtype}'
        raise ValueError(f'depth file {path} is a {kind} image, not a 1-channel 16-bit depth map: 8-bit '
                         f'or colour depth has lost its metric values. Fix: export the raw 16-bit depth '
                         f'(e.g. cv2.imwrite(path, depth_mm.astype(np.uint16))).')
    return depth.astype(np.float64) * scale


def warn_if_not_nyu_size(shape, intrinsics, path: str) -> None:
    """Warn once per call when NYU's default intrinsics meet a depth map of another size."""
    if tuple(intrinsics) == NYU_INTRINSICS and tuple(shape[:2]) != NYU_SIZE:
        warnings.warn(f'{path} is {shape[0]}x{shape[1]} but the default intrinsics are those of NYU\'s '
                      f'640x480 camera: normals, gravity and height will be wrong. Fix: pass '
                      f'--intrinsics fx fy cx cy of your camera.', stacklevel=2)


def encode_file(depth_path: str, out_path: str, intrinsics: Sequence[float] = NYU_INTRINSICS,
                scale: float = DEPTH_SCALE, raw_depth_path: Optional[str] = None) -> np.ndarray:
    """Encode one depth PNG to ``out_path``; returns the R, G, B ordered HHA."""
    depth = read_depth(depth_path, scale)
    missing = None
    if raw_depth_path is not None:
        raw = read_depth(raw_depth_path, scale)
        if raw.shape != depth.shape:
            raise ValueError(f'raw depth {raw_depth_path} is {raw.shape[0]}x{raw.shape[1]} but depth '
                             f'{depth_path} is {depth.shape[0]}x{depth.shape[1]}. Fix: pair maps of one '
                             f'size.')
        missing = raw == 0
    warn_if_not_nyu_size(depth.shape, intrinsics, depth_path)
    hha = encode_hha(depth, intrinsics, missing)
    write_hha(out_path, hha)
    return hha


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description='Encode 16-bit depth PNGs as HHA images (Gupta et al., ECCV 2014): R = disparity, '
                    'G = height above the floor, B = angle with gravity.')
    parser.add_argument('--depth', required=True, help='folder of 1-channel 16-bit depth PNGs (0 = missing)')
    parser.add_argument('--out', required=True, help='folder to write <name>.png (or --ext jpg) into')
    parser.add_argument('--intrinsics', nargs=4, type=float, default=list(NYU_INTRINSICS),
                        metavar=('FX', 'FY', 'CX', 'CY'),
                        help='camera of the depth maps in pixels, principal point 1-based as in MATLAB '
                             '(default: NYU Depth V2, 640x480)')
    parser.add_argument('--depth-scale', type=float, default=DEPTH_SCALE, metavar='S',
                        help='metres per stored depth unit (default 0.001: millimetres)')
    parser.add_argument('--raw-depth', default=None, metavar='DIR',
                        help='raw depth maps of the same names when --depth is hole-filled: their zeros '
                             'are left out of the normal fits (saveHHA.m D / RD)')
    parser.add_argument('--ext', choices=('png', 'jpg'), default='png', help='output format (default png)')
    parser.add_argument('--workers', type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    if not osp.isdir(args.depth):
        parser.error(f'--depth {args.depth} is not a folder')
    names = sorted(f for f in os.listdir(args.depth) if f.lower().endswith('.png'))
    if not names:
        parser.error(f'--depth {args.depth} holds no .png depth maps')
    os.makedirs(args.out, exist_ok=True)

    def one(name):
        stem = osp.splitext(name)[0]
        raw = osp.join(args.raw_depth, name) if args.raw_depth else None
        encode_file(osp.join(args.depth, name), osp.join(args.out, f'{stem}.{args.ext}'),
                    args.intrinsics, args.depth_scale, raw)

    try:
        with ThreadPoolExecutor(max(args.workers, 1)) as pool:  # NumPy and OpenCV release the GIL
            list(pool.map(one, names))
    except (ValueError, OSError) as e:
        print(f'ERROR {e}', file=sys.stderr)
        return 1
    print(f'wrote {len(names)} HHA images to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
