"""A synthetic street scene: a curved road, the ego trajectory, and actors of all ten classes.

Road coordinates: arc length ``s`` along the centre line and lateral offset ``d`` (left positive).
Cross-section (|d| in metres): car lanes 0-3.5 (ego lane on the right, d=-1.75, oncoming on the
left), bike lanes 3.5-5, parking strips 5-8.5, sidewalks 8.5-11.5, verge beyond. Every actor moves
along its own line at a speed shared by the line (or stands still) and lines are filled front to
back, so actors never overlap, motion is consistent across samples, and velocities follow from
positions. Work zones (cones at the parking-strip edge, a barrier row, a construction vehicle
behind) interrupt the parking.
"""
import dataclasses

import numpy as np

from fd3d_jax.data.nuscenes_meta import CLASS_NAMES

SAMPLE_PERIOD = 0.5  # s, nuScenes key frames at 2 Hz
EGO_D = -1.75
EGO_SIZE = (1.73, 4.08, 1.56)  # Renault Zoe (w, l, h); the ego is never annotated
LANES = dict(car=1.75, bike=4.25, parking=6.75, walk_out=9.2, walk_in=10.1, curb=11.0,
             cones=5.6, zone_barriers=7.8, verge_barriers=12.0)
LANE_MARKING = 3.5
BIKE_MARKING = 5.0
SIDEWALK = (8.5, 11.5)
ROAD_HALF_WIDTH = 8.5  # drivable area (lanes + bike lanes + parking)

# Class-typical sizes (w, l, h) in metres (nuScenes means) and relative jitter.
SIZES = {
    'car': ((1.95, 4.62, 1.73), 0.08),
    'truck': ((2.52, 6.94, 2.84), 0.12),
    'construction_vehicle': ((2.82, 6.56, 3.20), 0.12),
    'bus': ((2.94, 11.19, 3.47), 0.06),
    'trailer': ((2.92, 12.28, 3.87), 0.08),
    'barrier': ((2.51, 0.50, 0.98), 0.05),
    'motorcycle': ((0.77, 2.11, 1.47), 0.08),
    'bicycle': ((0.61, 1.70, 1.30), 0.08),
    'pedestrian': ((0.67, 0.73, 1.77), 0.07),
    'traffic_cone': ((0.41, 0.41, 1.07), 0.08),
}
SPAWN_RANGE = 90.0  # actors are spawned within this distance (along s) of the ego route


@dataclasses.dataclass
class Road:
    """Centre line sampled every ``step`` metres from arc length ``s0``."""
    s0: float
    step: float
    xy: np.ndarray       # (K, 2) global
    heading: np.ndarray  # (K,) unwrapped

    def pose(self, arc_length, offset):
        """Global (x, y) and heading of road coordinates (s, d) = (``arc_length``, ``offset``); arrays
        broadcast."""
        arc_length = np.asarray(arc_length, dtype=np.float64)
        frac_index = np.clip((arc_length - self.s0) / self.step, 0, len(self.heading) - 1.000001)
        index = np.floor(frac_index).astype(int)
        weight = frac_index - index
        xy = self.xy[index] * (1 - weight)[..., None] + self.xy[index + 1] * weight[..., None]
        heading = self.heading[index] * (1 - weight) + self.heading[index + 1] * weight
        normal = np.stack([-np.sin(heading), np.cos(heading)], axis=-1)
        return xy + np.asarray(offset, dtype=np.float64)[..., None] * normal, heading


def make_road(rng, s_min, s_max, origin, heading0, step=0.5):
    """Piecewise-constant curvature (straights and gentle curves) integrated from ``origin``."""
    num_points = int(np.ceil((s_max - s_min) / step)) + 1
    kappa = np.zeros(num_points)
    start = 0
    while start < num_points:
        seg = int(rng.uniform(30.0, 90.0) / step)
        kappa[start:start + seg] = rng.choice([0.0, 0.0, 1 / 60, -1 / 60, 1 / 120, -1 / 120])
        start += seg
    heading = heading0 + np.concatenate([[0.0], np.cumsum(kappa[:-1]) * step])
    xy = np.asarray(origin, dtype=np.float64) + np.concatenate(
        [[[0.0, 0.0]], np.cumsum(step * np.stack([np.cos(heading[:-1]), np.sin(heading[:-1])], -1), 0)])
    return Road(s0=s_min, step=step, xy=xy, heading=heading)


def ego_speed_profile(rng, duration, dt=0.02):
    """Ego speed (m/s) on a dense time grid: cruising, slow, or stop-and-go."""
    times = np.arange(0.0, duration + 1.0 + dt, dt) - 1.0  # starts 1 s before the first sample
    kind = rng.choice(['cruise', 'cruise', 'slow', 'stop'])
    if kind == 'cruise':
        v0, v1 = rng.uniform(5.0, 11.0, size=2)
        speeds = v0 + (v1 - v0) * np.clip(times / duration, 0, 1)
    elif kind == 'slow':
        speeds = np.full_like(times, rng.uniform(1.5, 4.0))
    else:
        cruise = rng.uniform(5.0, 9.0)
        t_stop = rng.uniform(0.2, 0.5) * duration
        wait = rng.uniform(2.0, 5.0)
        knots_t = [-1.0, t_stop - 3.0, t_stop, t_stop + wait, t_stop + wait + 3.0, duration + 1.0]
        knots_v = [cruise, cruise, 0.0, 0.0, cruise, cruise]
        speeds = np.interp(times, knots_t, knots_v)
    travelled = np.concatenate([[0.0], np.cumsum(0.5 * (speeds[1:] + speeds[:-1]) * dt)])
    return times, speeds, travelled


@dataclasses.dataclass
class Actors:
    """Actor table (n actors). Motion: s(t) = s0 + sign * (lane_speed * t  or ego_s(t))."""
    name: np.ndarray       # (n,) class names
    size: np.ndarray       # (n, 3) w, l, h
    s0: np.ndarray         # (n,)
    d: np.ndarray          # (n,)
    motion: np.ndarray     # (n,) 'static' | 'const' | 'ego'
    speed: np.ndarray      # (n,) signed lane speed for 'const'
    yaw_offset: np.ndarray  # (n,) added to the road heading
    parked: np.ndarray     # (n,) parked (static vehicles / cycles) vs stopped in traffic
    style: np.ndarray      # (n,) int, appearance variant
    color: np.ndarray      # (n, 3) float RGB in [0, 1]


def actor_states(actors, road, time_s, ego_s_at):
    """Global boxes and speeds at time ``time_s``.

    Returns (n, 7) boxes (x, y, z, w, l, h, yaw) with z the gravity centre, and (n,) speeds (m/s).
    """
    arc_pos = actors.s0.copy()
    speed = np.zeros(len(arc_pos))
    const = actors.motion == 'const'
    arc_pos[const] += actors.speed[const] * time_s
    speed[const] = np.abs(actors.speed[const])
    follow = actors.motion == 'ego'
    if follow.any():
        ego_s, ego_v = ego_s_at(time_s)
        arc_pos[follow] += ego_s
        speed[follow] = ego_v
    xy, heading = road.pose(arc_pos, actors.d)
    boxes = np.concatenate([xy, actors.size[:, 2:3] / 2, actors.size,
                            (heading + actors.yaw_offset)[:, None]], axis=1)
    return boxes, speed


def _size(rng, name):
    mean, jitter = SIZES[name]
    return np.asarray(mean) * np.exp(rng.normal(0.0, jitter, size=3).clip(-1.5, 1.5) * np.array([1, 1, 0.7]))


_PALETTES = {
    'car': [(0.92, 0.92, 0.92), (0.75, 0.76, 0.78), (0.12, 0.12, 0.14), (0.70, 0.10, 0.10),
            (0.15, 0.25, 0.60), (0.35, 0.36, 0.38), (0.55, 0.60, 0.70)],
    'truck': [(0.95, 0.95, 0.95), (0.80, 0.15, 0.12), (0.20, 0.35, 0.70)],
    'construction_vehicle': [(0.93, 0.70, 0.08), (0.95, 0.55, 0.05)],
    'bus': [(0.85, 0.15, 0.15), (0.15, 0.45, 0.85), (0.20, 0.60, 0.35)],
    'trailer': [(0.78, 0.80, 0.82), (0.60, 0.62, 0.65)],
    'barrier': [(0.85, 0.12, 0.10)],
    'motorcycle': [(0.10, 0.10, 0.12), (0.70, 0.08, 0.08), (0.15, 0.20, 0.55)],
    'bicycle': [(0.15, 0.55, 0.25), (0.12, 0.30, 0.70), (0.60, 0.60, 0.10)],
    'pedestrian': [(0.90, 0.30, 0.20), (0.20, 0.50, 0.85), (0.95, 0.80, 0.20), (0.30, 0.70, 0.35),
                   (0.80, 0.80, 0.80), (0.55, 0.25, 0.65)],
    'traffic_cone': [(1.0, 0.45, 0.05)],
}


class _ActorList:
    def __init__(self, rng):
        self.rng = rng
        self.rows = []

    def add(self, name, s0, offset, motion='static', speed=0.0, yaw_offset=0.0, parked=True):
        palette = _PALETTES[name]
        palette_index = int(self.rng.integers(len(palette)))
        color = np.clip(np.asarray(palette[palette_index]) * self.rng.uniform(0.9, 1.1), 0, 1)
        self.rows.append((name, _size(self.rng, name), s0, offset, motion, speed, yaw_offset, parked,
                          int(self.rng.integers(1 << 16)), color))
        return self.rows[-1][1]

    def build(self):
        cols = list(zip(*self.rows))
        return Actors(name=np.array(cols[0]), size=np.array(cols[1]), s0=np.array(cols[2], float),
                      d=np.array(cols[3], float), motion=np.array(cols[4]),
                      speed=np.array(cols[5], float), yaw_offset=np.array(cols[6], float),
                      parked=np.array(cols[7], bool), style=np.array(cols[8]), color=np.array(cols[9]))


def _fill_line(rng, lo, hi, gap, place):
    """Places items along [lo, hi] front to back; ``place(arc_pos)`` adds one and returns the length it
    occupies along the road (0 to leave a gap)."""
    arc_pos = lo + rng.uniform(0, gap[1])
    while arc_pos < hi:
        arc_pos += place(arc_pos) + rng.uniform(*gap)


def spawn_actors(rng, route_s, duration, ego_s_end):
    """Spawns the actors of one scene around the ego route [route_s, route_s + ego_s_end]."""
    acts = _ActorList(rng)
    lo, hi = route_s - SPAWN_RANGE, route_s + ego_s_end + SPAWN_RANGE

    # Ego lane: vehicles that keep their gap to the ego (they follow its speed profile).
    for sign in (1, -1):
        arc_pos = route_s + sign * rng.uniform(12.0, 20.0)
        while lo < arc_pos < hi:
            name = rng.choice(['car', 'car', 'car', 'truck', 'bus', 'motorcycle'])
            size = acts.add(name, arc_pos, -LANES['car'] + rng.normal(0, 0.1), motion='ego', parked=False)
            arc_pos += sign * (size[1] + rng.uniform(8.0, 30.0))

    # Constant-speed lines: oncoming lane, bike lanes, two walking lines per sidewalk. Each is
    # spawned over the stretch it sweeps through the route during the scene.
    lines = [(LANES['car'], -rng.uniform(5.0, 11.0), ['car'] * 4 + ['truck', 'bus', 'motorcycle'], (8.0, 30.0)),
             (-LANES['bike'], rng.uniform(2.5, 5.0), ['bicycle'] * 3 + ['motorcycle'], (25.0, 80.0)),
             (LANES['bike'], -rng.uniform(2.5, 5.0), ['bicycle'] * 3 + ['motorcycle'], (25.0, 80.0))]
    for side in (1, -1):
        lines.append((side * LANES['walk_out'], rng.uniform(0.9, 1.6), ['pedestrian'], (15.0, 70.0)))
        lines.append((side * LANES['walk_in'], -rng.uniform(0.9, 1.6), ['pedestrian'], (15.0, 70.0)))
    for offset, lane_speed, names, gap in lines:
        noise = 0.05 if names == ['pedestrian'] else 0.1

        def moving(arc_pos, offset=offset, lane_speed=lane_speed, names=names, noise=noise):
            size = acts.add(rng.choice(names), arc_pos, offset + rng.normal(0, noise), 'const', lane_speed,
                            0.0 if lane_speed > 0 else np.pi, parked=False)
            return size[1]
        sweep = abs(lane_speed) * duration
        _fill_line(rng, lo - (sweep if lane_speed > 0 else 0), hi + (sweep if lane_speed < 0 else 0), gap, moving)

    # Work zones along the route: cones at the parking-strip edge, a barrier row inside the strip,
    # a construction vehicle on the verge behind.
    zones = []
    n_zones = max(2, int((hi - lo) / 100))
    for zone in range(n_zones):
        arc_pos = route_s + (zone + rng.uniform(0.1, 0.9)) * max(ego_s_end, 20.0) / n_zones
        side = rng.choice([-1, 1])
        n_cones, n_barriers = int(rng.integers(3, 7)), int(rng.integers(2, 4))
        length = max(n_cones * 2.5, n_barriers * 2.6) + 2.0
        zones.append((side, arc_pos - 1.0, arc_pos + length))
        for slot in range(n_cones):
            acts.add('traffic_cone', arc_pos + slot * 2.5, side * LANES['cones'] + rng.normal(0, 0.05))
        for slot in range(n_barriers):
            acts.add('barrier', arc_pos + 1.3 + slot * 2.6, side * LANES['zone_barriers'], yaw_offset=np.pi / 2)
        acts.add('construction_vehicle', arc_pos + rng.uniform(0, 10), side * rng.uniform(16.0, 19.0),
                 yaw_offset=rng.uniform(-np.pi, np.pi))

    # Parking strips (skipping work zones): a shuffled bag guarantees every vehicle class.
    bag = ['truck', 'construction_vehicle', 'bus', 'trailer', 'motorcycle', 'bicycle'] * 2
    rng.shuffle(bag)
    weights = dict(car=0.55, truck=0.12, bus=0.05, trailer=0.09, construction_vehicle=0.05,
                   motorcycle=0.07, bicycle=0.07)
    names, probs = list(weights), np.array(list(weights.values()))
    for side in (-1, 1):
        def parked(arc_pos, side=side):
            if rng.uniform() < 0.35:
                return 0.0
            in_route = route_s - 10 < arc_pos < route_s + ego_s_end + 10
            name = bag.pop() if (bag and in_route and rng.uniform() < 0.5) else rng.choice(names, p=probs)
            length = SIZES[name][0][1] * 1.2
            if any(z_side == side and arc_pos - length < z_hi and arc_pos + length > z_lo
                   for z_side, z_lo, z_hi in zones):
                return 3.0
            yaw = (0.0 if side < 0 else np.pi) + rng.normal(0, 0.02)
            size = acts.add(name, arc_pos + length / 2, side * LANES['parking'] + rng.normal(0, 0.1), yaw_offset=yaw)
            return size[1] / 2 + length / 2
        _fill_line(rng, lo, hi, (2.0, 12.0), parked)

    # Curb line: standing pedestrians and parked cycles; verge: more barrier rows.
    for side in (-1, 1):
        def curb(arc_pos, side=side):
            name = rng.choice(['pedestrian', 'pedestrian', 'pedestrian', 'bicycle', 'motorcycle'])
            yaw = rng.uniform(-np.pi, np.pi) if name == 'pedestrian' else rng.choice([0.0, np.pi])
            acts.add(name, arc_pos + 1.1, side * LANES['curb'], yaw_offset=yaw)
            return 2.2
        _fill_line(rng, lo, hi, (6.0, 40.0), curb)

        def verge_barriers(arc_pos, side=side):
            count = int(rng.integers(2, 4))
            for slot in range(count):
                acts.add('barrier', arc_pos + 1.3 + slot * 2.6, side * LANES['verge_barriers'], yaw_offset=np.pi / 2)
            return count * 2.6
        _fill_line(rng, lo, hi, (60.0, 150.0), verge_barriers)
    return acts.build()


def attribute_of(name, speed, parked):
    """nuScenes attribute name (or '') of an actor moving at ``speed``."""
    moving = speed > 0.3
    if name in ('car', 'truck', 'construction_vehicle', 'bus', 'trailer'):
        return 'vehicle.moving' if moving else ('vehicle.parked' if parked else 'vehicle.stopped')
    if name in ('motorcycle', 'bicycle'):
        return 'cycle.without_rider' if parked else 'cycle.with_rider'
    if name == 'pedestrian':
        return 'pedestrian.moving' if moving else 'pedestrian.standing'
    return ''


assert set(SIZES) == set(CLASS_NAMES) == set(_PALETTES)
