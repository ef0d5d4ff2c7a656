"""HHA encoding (smmcl.data.hha) on depth rendered from rooms of known geometry."""
import os.path as osp

import cv2
import numpy as np
import pytest

from smmcl.data.hha import (NYU_INTRINSICS, encode_hha, hha_float, main, matlab_uint8, point_cloud,
                            read_depth)

H, W = 240, 320
# NYU's camera at half resolution, so the scenes look like NYU's at a quarter of the pixels.
INTRINSICS = tuple(v / 2 for v in NYU_INTRINSICS)


def rotation(pitch=0.0, roll=0.0):
    """World -> camera rotation of a camera pitched down by ``pitch`` and rolled by ``roll`` degrees."""
    p, r = np.deg2rad(pitch), np.deg2rad(roll)
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ rx


def render(planes, camera=np.eye(3), intrinsics=INTRINSICS, size=(H, W)):
    """Ray-cast planes ``n . p = c`` (world frame: camera at the origin, Y down, Z forward, cm).

    Returns:
        depth in metres (H-W, 0 where no plane is hit) and the index of the plane seen (-1 none).
    """
    rays = point_cloud(np.ones(size), intrinsics)  # camera frame, z = 1
    rays_world = rays @ camera  # R^T d for each pixel
    nearest, which = np.full(size, np.inf), np.full(size, -1)
    for i, (normal, offset) in enumerate(planes):
        with np.errstate(divide='ignore'):
            t = offset / (rays_world @ np.asarray(normal, float))
        t[t <= 0] = np.inf
        closer = t < nearest
        nearest[closer], which[closer] = t[closer], i
    return np.where(np.isfinite(nearest), nearest, 0.0) / 100.0, which


def interior(which, index, radius=3):
    """Pixels of plane ``index`` whose (2r+1)^2 window sees only that plane."""
    mask = (which == index).astype(np.uint8)
    return cv2.erode(mask, np.ones((2 * radius + 1,) * 2, np.uint8), borderValue=1).astype(bool)


def floor(drop_cm):
    return (0, 1, 0), drop_cm


def wall(distance_cm):
    return (0, 0, 1), distance_cm


def test_matlab_uint8_rounds_half_away_and_saturates():
    x = np.array([-300.0, -0.5, 0.49, 0.5, 1.5, 2.5, 254.49, 254.5, 256.0, 1e9, np.nan, np.inf])
    assert matlab_uint8(x).tolist() == [0, 0, 0, 1, 2, 3, 254, 255, 255, 255, 0, 255]


def test_floor_alone_gives_a_constant_angle():
    camera = rotation(pitch=35.0, roll=5.0)  # looking down: every pixel sees the floor
    depth, which = render([floor(140.0)], camera)
    assert (which == 0).all()
    channels, down = hha_float(depth, INTRINSICS)
    # 1e-5 degrees: arccos of the cosine one ulp below 1 is already 1.2e-6 degrees
    assert np.rad2deg(np.arccos(np.clip(down @ (camera @ [0, 1, 0]), -1, 1))) < 1e-5
    hha = matlab_uint8(channels)
    assert np.all(hha[..., 2] == 38)  # normal parallel to gravity: 0 + 128 - 90
    assert np.all(hha[..., 1] == 0)  # the floor is the lowest point


def test_floor_and_wall_angles_and_gravity():
    depth, which = render([floor(120.0), wall(400.0)])
    channels, down = hha_float(depth, INTRINSICS)
    hha = matlab_uint8(channels)
    # Windows across the floor-wall crease see neither plane; the few of them within the thresholds
    # tilt the estimate a little.
    assert np.rad2deg(np.arccos(down @ [0, 1, 0])) < 0.3
    on_floor, on_wall = interior(which, 0), interior(which, 1)
    assert on_floor.sum() > 5000 and on_wall.sum() > 20000
    assert np.all(hha[..., 2][on_floor] == 38)
    assert np.all(hha[..., 2][on_wall] == 128)  # perpendicular: 90 + 38
    assert np.abs(channels[..., 2][on_wall] - 128).max() < 0.3


def test_height_grows_linearly_up_the_wall():
    drop, distance = 120.0, 400.0
    depth, which = render([floor(drop), wall(distance)])
    channels, _ = hha_float(depth, INTRINSICS)
    hha = matlab_uint8(channels)
    assert np.all(hha[..., 1][interior(which, 0)] == 0)  # the floor is the lowest point
    fy, cy = INTRINSICS[1], INTRINSICS[3]
    rows = np.flatnonzero(interior(which, 1)[:, W // 2])
    # A point of the wall at image row i is (i + 1 - cy) * distance / fy below the camera.
    expected = drop - (rows + 1 - cy) * distance / fy
    assert np.allclose(channels[rows, W // 2, 1], expected, atol=0.05)
    visible = expected < 254  # above that the channel saturates
    assert np.abs(hha[rows, W // 2, 1][visible].astype(float) - expected[visible]).max() <= 0.51
    assert np.all(hha[rows, W // 2, 1][~visible] == 255)
    slope = np.polyfit(rows, channels[rows, W // 2, 1], 1)[0]
    assert slope == pytest.approx(-distance / fy, rel=1e-4)  # cm per row, up is smaller rows


def test_disparity_is_31000_over_z_and_saturates_below_1_22_m():
    rng = np.random.default_rng(0)
    depth, _ = render([floor(120.0), wall(400.0)])
    depth = depth * rng.uniform(0.2, 1.5, depth.shape)  # any depth: disparity ignores the geometry
    hha = encode_hha(depth, INTRINSICS)
    expected = matlab_uint8(31000.0 / np.maximum(depth * 100, 100))
    assert np.array_equal(hha[..., 0], np.where(depth > 0, expected, 0))
    values = {0.5: 255, 1.0: 255, 1.21: 255, 1.218: 255, 1.22: 254, 1.55: 200, 2.0: 155, 3.1: 100}
    for z, disparity in values.items():
        assert encode_hha(np.full((20, 30), z), INTRINSICS)[..., 0].max() == disparity, z


@pytest.mark.parametrize('pitch, roll', [(20.0, 0.0), (15.0, 10.0)])
def test_tilted_camera_is_corrected_by_the_gravity_estimate(pitch, roll):
    camera = rotation(pitch, roll)
    depth, which = render([floor(150.0), wall(300.0)], camera)
    channels, down = hha_float(depth, INTRINSICS)
    hha = matlab_uint8(channels)
    true_down = camera @ [0, 1, 0]
    assert np.rad2deg(np.arccos(true_down @ [0, 1, 0])) > 17  # image y is far from gravity
    assert np.rad2deg(np.arccos(np.clip(down @ true_down, -1, 1))) < 0.3
    on_floor, on_wall = interior(which, 0), interior(which, 1)
    assert np.all(hha[..., 2][on_floor] == 38) and np.all(hha[..., 2][on_wall] == 128)
    assert hha[..., 1][on_floor].max() <= 1  # floor at height 0 up to the estimate's error
    # Height above the floor of every wall point, from the world geometry.
    points_world = point_cloud(depth * 100, INTRINSICS) @ camera  # R^T p
    expected = 150.0 - points_world[..., 1]
    assert np.abs(channels[..., 1][on_wall] - expected[on_wall]).max() < 1.0


@pytest.mark.parametrize('drop, floor_value', [(80.0, 50), (100.0, 0)])
def test_floor_assumed_130_cm_below_when_no_point_is_90_cm_below(drop, floor_value):
    depth, which = render([floor(drop), wall(400.0)])
    hha = encode_hha(depth, INTRINSICS)
    heights = hha[..., 1][interior(which, 0)].astype(int)  # 130 - 80, or the floor itself
    assert np.abs(heights - floor_value).max() <= 1 and np.median(heights) == floor_value


def test_missing_depth():
    depth, which = render([floor(120.0), wall(400.0)])
    rng = np.random.default_rng(1)
    holes = rng.random(depth.shape) < 0.05
    holes[60:120, 100:180] = True
    holed = np.where(holes, 0.0, depth)
    channels, down = hha_float(holed, INTRINSICS)
    assert np.isfinite(channels).all()
    hha = matlab_uint8(channels)
    assert np.all(hha[holes] == 0)
    full = encode_hha(depth, INTRINSICS)
    assert np.array_equal(hha[..., 0][~holes], full[..., 0][~holes])
    assert np.rad2deg(np.arccos(down @ [0, 1, 0])) < 0.6
    # Holes next to the crease let other crease windows into the estimate: ~0.4 degrees off, so a
    # floor point 5 m away comes out 3-4 cm high.
    floor_heights = hha[..., 1][interior(which, 0) & ~holes]
    assert np.median(floor_heights) == 0 and floor_heights.max() <= 4
    on_floor, on_wall = interior(which, 0), interior(which, 1)
    assert np.abs(hha[..., 2][on_floor & ~holes].astype(int) - 38).max() <= 1
    assert np.abs(hha[..., 2][on_wall & ~holes].astype(int) - 128).max() <= 1

    assert not encode_hha(np.zeros((30, 40)), INTRINSICS).any()
    lone = np.zeros((30, 40))
    lone[15, 20] = 2.0  # no plane anywhere: gravity stays straight down the image
    channels, down = hha_float(lone, INTRINSICS)
    assert np.isfinite(channels).all() and down.tolist() == [0.0, 1.0, 0.0]
    above_camera = -point_cloud(lone * 100, INTRINSICS)[15, 20, 1]
    # 31000 / 200; height by the floor rule; saveHHA.m's min/max turn a NaN cosine into -1: 180 + 38.
    assert matlab_uint8(channels)[15, 20].tolist() == [155, round(130 + above_camera), 218]


def test_filled_depth_with_raw_holes():
    """saveHHA(D, RD): geometry from the filled depth, the raw depth's holes left out of the fits."""
    depth, which = render([floor(120.0), wall(400.0)])
    holes = np.zeros(depth.shape, bool)
    holes[100:140, 150:200] = True
    hha = encode_hha(depth, INTRINSICS, missing=holes)
    assert hha[holes].all()  # filled pixels are encoded
    near_edge = holes & ~interior(holes.astype(int), 1, radius=2)  # 2 rows of valid points in the window
    assert np.all(hha[..., 2][near_edge & interior(which, 1)] == 128)
    # Deep inside the hole no point is left to fit: the NaN normal gives an angle of 180 (218).
    assert np.all(hha[..., 2][interior(holes.astype(int), 1)] == 218)


def test_cli_writes_rgb_ordered_files(tmp_path):
    depth_dir, raw_dir, out = tmp_path / 'depth', tmp_path / 'raw', tmp_path / 'hha'
    depth_dir.mkdir()
    raw_dir.mkdir()
    depth, _ = render([floor(120.0), wall(400.0)], rotation(10.0))
    stored = np.round(depth * 1000).astype(np.uint16)  # millimetres
    cv2.imwrite(str(depth_dir / 'a.png'), stored)
    raw = stored.copy()
    raw[:50] = 0
    cv2.imwrite(str(raw_dir / 'a.png'), raw)
    intrinsics = [str(v) for v in INTRINSICS]
    assert main(['--depth', str(depth_dir), '--out', str(out), '--intrinsics', *intrinsics]) == 0
    written = cv2.imread(str(out / 'a.png'), cv2.IMREAD_UNCHANGED)
    expected = encode_hha(read_depth(str(depth_dir / 'a.png')), INTRINSICS)
    assert np.array_equal(written[..., ::-1], expected)  # file R, G, B = disparity, height, angle
    assert np.array_equal(read_depth(str(depth_dir / 'a.png')), stored * 0.001)

    # Depth stored in units of 0.1 mm, and a hole-filled map paired with its raw holes.
    cv2.imwrite(str(depth_dir / 'a.png'), np.round(depth * 10000).astype(np.uint16))
    assert main(['--depth', str(depth_dir), '--out', str(out), '--intrinsics', *intrinsics,
                 '--depth-scale', '0.0001', '--raw-depth', str(raw_dir), '--ext', 'jpg']) == 0
    jpg = cv2.imread(str(out / 'a.jpg'), cv2.IMREAD_COLOR)[..., ::-1].astype(int)
    exact = encode_hha(np.round(depth * 10000) * 0.0001, INTRINSICS, missing=raw == 0).astype(int)
    assert np.abs(jpg - exact).mean() < 2


def test_cli_refuses_8_bit_depth(tmp_path, capsys):
    (tmp_path / 'depth').mkdir()
    path = tmp_path / 'depth' / 'x.png'
    cv2.imwrite(str(path), np.full((10, 12), 100, np.uint8))
    assert main(['--depth', str(tmp_path / 'depth'), '--out', str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and '16-bit' in err and 'Fix' in err
    assert not osp.exists(tmp_path / 'out' / 'x.png')


def test_default_intrinsics_warn_on_another_size(tmp_path):
    (tmp_path / 'depth').mkdir()
    cv2.imwrite(str(tmp_path / 'depth' / 'small.png'), np.full((48, 64), 2000, np.uint16))
    with pytest.warns(UserWarning, match='--intrinsics'):
        assert main(['--depth', str(tmp_path / 'depth'), '--out', str(tmp_path / 'out'),
                     '--workers', '1']) == 0
