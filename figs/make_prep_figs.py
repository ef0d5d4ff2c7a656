"""figs/hha.png and figs/convert.png: a synthetic room seen by an RGB-D camera (NYU intrinsics, 1.4 m
above the floor, pitched 8 degrees down), its HHA channels (smmcl.data.hha), and the raw RGB-D folder
converted to the NYU layout (smmcl.data.convert rgbd).
    python figs/make_prep_figs.py [OUT_DIR]   # from the repository root; OUT_DIR defaults to figs
"""
import os
import os.path as osp
import sys
import tempfile

import cv2
import numpy as np

from smmcl.data.convert import main as convert_main
from smmcl.data.hha import NYU_INTRINSICS, hha_float, matlab_uint8
from smmcl.tools.figure import colour_labels, fit, grid, lift, palette_rgb, x_panel
from smmcl.engine.evaluate import cmx_palette

H, W = 480, 640
FIGS = sys.argv[1] if len(sys.argv) > 1 else 'figs'

# Axis-aligned world boxes / planes: (label NYU-40 file value, colour BGR at full light). World: x right,
# y up, z forward; floor y = 0.
WALL, FLOOR, CABINET, TABLE, CEILING, BED = 1, 2, 3, 7, 22, 4
COLOURS = {WALL: (150, 170, 190), FLOOR: (60, 90, 140), CABINET: (40, 120, 60), TABLE: (40, 60, 170),
           CEILING: (200, 200, 200), BED: (160, 80, 80)}
ROOM = dict(x=(-1.8, 2.2), y=(0.0, 2.4), z=(-1.0, 4.5))
BOXES = [(TABLE, (-0.7, 0.4), (0.0, 0.75), (2.3, 3.1)), (CABINET, (1.3, 2.2), (0.0, 1.5), (3.0, 4.2)),
         (BED, (-1.8, -0.9), (0.0, 0.5), (2.2, 4.5))]


def render():
    fx, fy, cx, cy = NYU_INTRINSICS
    v, u = np.mgrid[1:H + 1, 1:W + 1].astype(np.float64)  # 1-based, as the intrinsics
    ray_cam = np.stack([(u - cx) / fx, -(v - cy) / fy, np.ones_like(u)], -1)  # camera: y up here
    pitch = np.deg2rad(-8)  # looking down
    rot = np.array([[1, 0, 0], [0, np.cos(pitch), np.sin(pitch)], [0, -np.sin(pitch), np.cos(pitch)]])
    ray = ray_cam @ rot.T  # world directions; t along it is the camera z
    origin = np.array([0.2, 1.4, 0.0])
    best = np.full((H, W), np.inf)
    label = np.zeros((H, W), np.uint8)
    normal_axis = np.zeros((H, W), np.int64)

    def hit(axis, value, bounds, cls, inside_room):
        t = (value - origin[axis]) / np.where(np.abs(ray[..., axis]) < 1e-12, 1e-12, ray[..., axis])
        p = origin + t[..., None] * ray
        ok = t > 0
        for a, (lo, hi) in bounds.items():
            ok &= (p[..., a] >= lo - 1e-9) & (p[..., a] <= hi + 1e-9)
        closer = ok & (t < best)
        best[closer] = t[closer]
        label[closer] = cls
        normal_axis[closer] = axis

    (x0, x1), (y0, y1), (z0, z1) = ROOM['x'], ROOM['y'], ROOM['z']
    hit(1, y0, {0: (x0, x1), 2: (z0, z1)}, FLOOR, True)
    hit(1, y1, {0: (x0, x1), 2: (z0, z1)}, CEILING, True)
    hit(2, z1, {0: (x0, x1), 1: (y0, y1)}, WALL, True)
    hit(0, x0, {1: (y0, y1), 2: (z0, z1)}, WALL, True)
    hit(0, x1, {1: (y0, y1), 2: (z0, z1)}, WALL, True)
    for cls, bx, by, bz in BOXES:
        b = {0: bx, 1: by, 2: bz}
        for axis in range(3):
            for value in b[axis]:
                hit(axis, value, {a: b[a] for a in range(3) if a != axis}, cls, False)
    depth = best
    rng = np.random.default_rng(0)
    shade = np.array([0.55, 1.0, 0.8])[normal_axis]  # a light from above-front
    colour = np.array([COLOURS.get(c, (0, 0, 0)) for c in range(41)], np.float64)[label]
    light = 0.25 * (1 - 0.6 * (((u - W / 2) / W) ** 2 + ((v - H / 2) / H) ** 2))
    rgb = np.clip(colour * (shade * light)[..., None] + rng.normal(0, 3, (H, W, 3)), 0, 255).round().astype(np.uint8)
    depth_noisy = depth * (1 + rng.normal(0, 0.001, depth.shape))
    depth_noisy[rng.random(depth.shape) < 0.01] = 0  # sensor holes
    return rgb, depth_noisy, label


def main():
    os.makedirs(FIGS, exist_ok=True)
    rgb, depth, label = render()
    depth_clean = depth
    channels, down = hha_float(depth)
    hha = matlab_uint8(channels)  # R, G, B = disparity, height, angle
    print('gravity', down, 'angle on the floor', np.median(hha[label == FLOOR][:, 2]),
          'on walls', np.median(hha[label == WALL][:, 2]), 'ceiling', np.median(hha[label == CEILING][:, 2]))
    size = (180, 240)
    grey = lambda c: cv2.cvtColor(c, cv2.COLOR_GRAY2BGR)  # noqa: E731
    depth_vis = x_panel(np.repeat((np.clip(depth / depth.max(), 0, 1) * 255).astype(np.uint8)[..., None], 3, 2),
                        True)
    depth_vis[depth == 0] = 0
    panels = [depth_vis, grey(hha[..., 0]), grey(hha[..., 1]), grey(hha[..., 2]), hha[..., ::-1]]
    fig = grid([[fit(p, size, False) for p in panels]],
               [f'depth ({depth[depth > 0].min():.1f}-{depth.max():.1f} m, holes black)', 'disparity 31000/z', 'height above floor (cm)',
                'angle to gravity + 38', 'HHA as saved (R,G,B)'])
    cv2.imwrite(osp.join(FIGS, 'hha.png'), fig)

    with tempfile.TemporaryDirectory() as tmp:
        src = osp.join(tmp, 'my_rgbd')
        for d in ('rgb', 'depth', 'label'):
            os.makedirs(osp.join(src, d))
        cv2.imwrite(osp.join(src, 'rgb', 'room.png'), rgb)
        cv2.imwrite(osp.join(src, 'depth', 'room.png'), np.round(depth * 1000).astype(np.uint16))
        cv2.imwrite(osp.join(src, 'label', 'room.png'), label)
        out = osp.join(tmp, 'my_nyu')
        assert convert_main(['rgbd', '--src', src, '--out', out]) == 0
        print(sorted(os.listdir(out)))
        hha_jpg = cv2.imread(osp.join(out, 'HHA', 'room.jpg'))
        rgb_jpg = cv2.imread(osp.join(out, 'RGB', 'room.jpg'))
        lab = cv2.imread(osp.join(out, 'Label', 'room.png'), cv2.IMREAD_GRAYSCALE)
        depth16 = cv2.imread(osp.join(src, 'depth', 'room.png'), cv2.IMREAD_UNCHANGED)
    pal = cmx_palette()
    nyu_pal = np.zeros((256, 3), np.uint8)
    nyu_pal[1:41] = pal[:40]  # file value v is class v - 1 (gt_transform)
    panels = [lift(rgb), x_panel(np.repeat(cv2.normalize(depth16, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)[..., None], 3, 2), True),
              hha_jpg, colour_labels(lab, nyu_pal)]
    fig = grid([[fit(p, size, i == 3) for i, p in enumerate(panels)]],
               ['in: rgb/ (lifted)', 'in: depth/ 16-bit mm', 'out: HHA/*.jpg', 'out: Label/*.png'])
    cv2.imwrite(osp.join(FIGS, 'convert.png'), fig)


if __name__ == '__main__':
    main()
