"""grain input pipeline: records -> static-shape numpy batches.

Per sample (BEVFormer's ``prepare_train_data`` + ``union2one``, mmdet3d's loading transforms; in
training with ``photometric`` each raw image is first distorted, ``fd3d_jax.data.augment``):
  img             (T, N, H, W, 3) float32  normalised (``(x - mean) / std``, RGB or BGR), resized by
                                           ``image_scale`` (bilinear), zero-padded to ``pad_divisor``
  lidar2img       (T, N, 4, 4)   float32  ``diag(s, s, 1, 1) @ viewpad(K) @ lidar2cam``
  can_bus         (T, 18)        float32  with temporal deltas (position, yaw in degrees)
  prev_bev_exists (T,)           bool     False where the chain restarts (first frame, new scene)
  gt_boxes        (G, 9)         float32  (x, y, z_gravity, w, l, h, yaw, vx, vy), LiDAR frame
  gt_labels       (G,)           int32    class index, -1 for padding
  gt_mask         (G,)           bool
  sample_idx      ()             int32    index of the current frame in the records
  valid           ()             bool     False for evaluation padding
With ``bev`` (the BEV grid of a BEVFormer config) also the ego-motion alignment of the previous BEV:
  bev_shift       (T, 2)         float32  shift of the previous-BEV reference points (x, y)
  bev_rot_index   (T, Q)         int32    nearest-neighbour rotation of the previous BEV as a gather
  bev_rot_valid   (T, Q)         bool     (``geometry.bev_rotation_index``; Q = bev_h * bev_w)
With ``expert_bev`` (distillation from a BEVFormer expert) the same three for the expert's grid, as
``expert_bev_shift``, ``expert_bev_rot_index``, ``expert_bev_rot_valid``.
Batches add a leading batch axis. T = ``queue_length`` for training and 1 for evaluation; G =
``max_gt``; GT is of the current (last) frame, filtered by ``valid_flag``, class and BEV range.

With ``data.device_normalize`` the images are only decoded here: ``img`` is the raw camera images,
(T, N, H_raw, W_raw, 3) uint8 RGB, and training with ``photometric`` adds the per-image random draws
``photo_params`` (T, N, 5) float32 and ``photo_perm`` (T, N, 3) int32, drawn from the same RNG stream in the same
order as the distortion here draws them; ``fd3d_jax.data.device_input.prepare_images`` turns them into the
float32 ``img`` above inside the jitted step.

Samples are built by ``data.num_workers`` grain worker processes (``mp_prefetch``; 0: threads of this
process, -1: one per core but one, at most ``MAX_AUTO_WORKERS``), each with ``data.num_threads`` read threads,
and batched in this process. Every sample depends only on the seed and its position in the stream, so the
batches are the same, bit for bit, whatever the worker and thread counts.

Bad input raises ``DataError`` naming the file, sample token or config key: missing or corrupt
images, GT boxes with a non-finite centre/size/yaw or a non-positive size, more GT than
``data.max_gt`` (``check_max_gt``, when a dataset is made: before the first step), a split without GT when
training with ``data.filter_empty_gt``. In training only, ``data.skip_bad_samples`` turns a sample that fails
to load into a logged warning and another draw.
"""
import os
import signal

import cv2
import grain
import numpy as np
from absl import flags, logging
from PIL import Image, UnidentifiedImageError

from fd3d_jax.data import geometry
from fd3d_jax.data.augment import photometric_arrays, photometric_distortion, photometric_params
from fd3d_jax.data.geometry import can_bus_delta
from fd3d_jax.errors import DataConfigError, DataError


def output_image_hw(records, cfg):
    """Padded (H, W) of the pipeline's images (static for jit)."""
    cam = records['samples'][0]['cams'][0]
    height, width = int(cam['height'] * cfg.image_scale), int(cam['width'] * cfg.image_scale)
    divisor = cfg.pad_divisor
    return -(-height // divisor) * divisor, -(-width // divisor) * divisor


def _decode_failure(path, error):
    """Why PIL could not decode the file ``path``, in a few words."""
    try:
        if os.path.getsize(path) == 0:
            return 'the file is empty (0 bytes)'
    except OSError:
        pass
    if isinstance(error, UnidentifiedImageError):   # its message repeats the path
        return 'not an image format PIL knows (overwritten or not an image)'
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def load_image(path, sample_token):
    """The image file ``path`` as (H, W, 3) uint8 RGB. A DataError naming the file and the sample: ``image not
    found: <path> (sample <token>)``, ``cannot read image <path> (sample <token>): <why>`` (no permission, a
    folder, an I/O error) or ``cannot decode image <path> (sample <token>): <why>`` (empty, truncated or
    overwritten: whatever PIL raises while decoding it, which depends on the format and where the bytes stop).
    In grain worker processes the DataError reaches the training process as it is."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))
    except FileNotFoundError:
        raise DataError(f'image not found: {path} (sample {sample_token})') from None
    except MemoryError:
        raise
    except Exception as error:   # PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, EOFError, ...
        if isinstance(error, OSError) and error.errno is not None and not isinstance(error, UnidentifiedImageError):
            raise DataError(f'cannot read image {path} (sample {sample_token}): {error.strerror}') from None
        raise DataError(f'cannot decode image {path} (sample {sample_token}): {_decode_failure(path, error)}') \
            from None


def load_frame(record, dataroot, cfg, out_hw, rng=None):
    """Six normalised, resized, padded images (N, H, W, 3) and their lidar2img (N, 4, 4). With a
    numpy Generator ``rng`` every raw image first gets its own photometric distortion (training)."""
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    scale = cfg.image_scale
    imgs = np.zeros((len(record['cams']), *out_hw, 3), np.float32)
    l2i = np.zeros((len(record['cams']), 4, 4), np.float32)
    for cam_index, cam in enumerate(record['cams']):
        img = load_image(os.path.join(dataroot, cam['path']), record['token'])
        if img.shape[:2] != (cam['height'], cam['width']):
            raise DataError(f"image {cam['path']} is {img.shape[1]}x{img.shape[0]}, the tables say "
                            f"{cam['width']}x{cam['height']} (sample {record['token']})")
        img = img.astype(np.float32)
        if rng is not None:
            img = photometric_distortion(img, rng)
        if not cfg.to_rgb:
            img = img[..., ::-1]
        img = (img - mean) / std
        height, width = int(img.shape[0] * scale), int(img.shape[1] * scale)
        if (height, width) != img.shape[:2]:
            img = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
        if height > out_hw[0] or width > out_hw[1]:
            raise DataError(f"camera {cam['channel']} of sample {record['token']} is larger than the "
                            f'first camera of the split; all images must share one size')
        imgs[cam_index, :height, :width] = img
        l2i[cam_index] = geometry.lidar2img(np.asarray(cam['intrinsic']), np.asarray(cam['sensor2lidar']), scale)
    return imgs, l2i


def raw_image_hw(records):
    """(H, W) of the raw camera images of a split (its first camera; all must share it)."""
    cam = records['samples'][0]['cams'][0]
    return int(cam['height']), int(cam['width'])


def load_frame_raw(record, dataroot, cfg, raw_hw, rng=None):
    """``data.device_normalize``: six decoded images (N, H_raw, W_raw, 3) uint8 RGB, their lidar2img (N, 4, 4),
    and with a numpy Generator ``rng`` each image's photometric draws ((N, 5) float32, (N, 3) int32;
    ``augment.photometric_arrays``), drawn in ``load_frame``'s order; else None."""
    num = len(record['cams'])
    imgs = np.empty((num, *raw_hw, 3), np.uint8)
    l2i = np.zeros((num, 4, 4), np.float32)
    photo = (np.zeros((num, 5), np.float32), np.zeros((num, 3), np.int32)) if rng is not None else None
    for cam_index, cam in enumerate(record['cams']):
        img = load_image(os.path.join(dataroot, cam['path']), record['token'])
        if img.shape[:2] != (cam['height'], cam['width']):
            raise DataError(f"image {cam['path']} is {img.shape[1]}x{img.shape[0]}, the tables say "
                            f"{cam['width']}x{cam['height']} (sample {record['token']})")
        if img.shape[:2] != tuple(raw_hw):
            raise DataError(f"camera {cam['channel']} of sample {record['token']} is {img.shape[1]}x{img.shape[0]}, "
                            f'the first camera of the split {raw_hw[1]}x{raw_hw[0]}; with config '
                            f'data.device_normalize=True all images must share one size')
        imgs[cam_index] = img
        if photo is not None:
            photo[0][cam_index], photo[1][cam_index] = photometric_arrays(photometric_params(rng))
        l2i[cam_index] = geometry.lidar2img(np.asarray(cam['intrinsic']), np.asarray(cam['sensor2lidar']),
                                            cfg.image_scale)
    return imgs, l2i, photo


def check_boxes(boxes, sample_token):
    """DataError naming the sample and the annotation index of the first box (N, 7) with a
    non-finite centre/size/yaw or a non-positive size."""
    bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 3:6] <= 0).any(axis=1)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise DataError(f'sample {sample_token}: GT box of annotation {index} is invalid (non-finite or non-positive '
                        f'size): (x, y, z, w, l, h, yaw) = {boxes[index].tolist()}')


def gt_keep(record, cfg, boxes):
    """(N,) bool: which of a record's N GT boxes (N, 7) the pipeline keeps: a class of ``cfg.class_names``, the
    ``valid_flag`` with ``cfg.use_valid_flag``, and the centre inside ``cfg.point_cloud_range`` in BEV (a
    non-finite centre is outside)."""
    keep = np.array([n in cfg.class_names for n in record['gt_names']], bool).reshape(-1)
    if cfg.use_valid_flag:
        keep &= np.asarray(record['valid_flag'], bool).reshape(-1)
    x0, y0, _, x1, y1, _ = cfg.point_cloud_range
    keep &= (boxes[:, 0] > x0) & (boxes[:, 1] > y0) & (boxes[:, 0] < x1) & (boxes[:, 1] < y1)
    return keep


def _too_many_gt(token, count, cfg):
    return DataConfigError(f'sample {token} has {count} GT boxes after filtering, more than '
                           f'config data.max_gt={cfg.max_gt}; raise data.max_gt')


def check_max_gt(records, cfg):
    """A DataConfigError naming the first sample of ``records`` with more GT after ``gt_keep``'s filtering than
    ``cfg.max_gt`` (its token, its count, ``data.max_gt`` and the split's largest count), before any batch is read:
    ``ground_truth`` would raise it mid-epoch, and ``data.skip_bad_samples`` never skips it."""
    counts = []
    for rec in records['samples']:
        boxes = np.asarray(rec['gt_boxes'], np.float64).reshape(-1, 7)
        counts.append(int(gt_keep(rec, cfg, boxes).sum()))   # an invalid box is ``check_boxes``'s, when read
    over = [index for index, count in enumerate(counts) if count > cfg.max_gt]
    if over:
        first = records['samples'][over[0]]['token']
        error = _too_many_gt(first, counts[over[0]], cfg)
        raise DataConfigError(f"{error} ({len(over)} of the {len(counts)} samples of split "
                              f"'{records.get('split', '?')}' exceed it; the most GT of one sample: {max(counts)})")


def ground_truth(record, cfg):
    """Filtered (``gt_keep``) and padded GT of one record: boxes (G, 9), labels (G,), mask (G,); invalid boxes
    raise (``check_boxes``)."""
    boxes = np.asarray(record['gt_boxes'], np.float64).reshape(-1, 7)
    check_boxes(boxes, record['token'])
    vel = np.asarray(record['gt_velocity'], np.float64).reshape(-1, 2)
    names = list(record['gt_names'])
    idx = np.flatnonzero(gt_keep(record, cfg, boxes))
    if len(idx) > cfg.max_gt:
        raise _too_many_gt(record['token'], len(idx), cfg)
    out = np.zeros((cfg.max_gt, 9), np.float32)
    labels = np.full((cfg.max_gt,), -1, np.int32)
    out[:len(idx), :7] = boxes[idx]
    out[:len(idx), 7:] = vel[idx]
    labels[:len(idx)] = [cfg.class_names.index(names[i]) for i in idx]
    return out, labels, labels >= 0


def train_queue_indices(index, queue_length, rng):
    """BEVFormer's queue: a random ordered subset of the ``queue_length`` previous indices minus
    one, then ``index`` (negative indices clamp to 0)."""
    prev = list(range(index - queue_length, index))
    rng.shuffle(prev)
    return [max(0, i) for i in sorted(prev[1:])] + [index]


def _queue_can_bus(samples, indices):
    """``union2one``: can_bus deltas w.r.t. the previous queue frame of the same scene."""
    can_bus, exists = [], []
    prev = None
    for index in indices:
        rec = samples[index]
        same = prev is not None and samples[prev]['scene_token'] == rec['scene_token']
        can_bus.append(can_bus_delta(rec['can_bus'], samples[prev]['can_bus'] if same else None))
        exists.append(same)
        prev = index
    return np.asarray(can_bus, np.float32), np.asarray(exists, bool)


def bev_alignment(can_bus, bev):
    """BEV shift (T, 2) and rotation maps (T, Q) of a queue's can_bus (T, 18) for a BEV grid
    ``bev = dict(bev_hw, rotate_center, real_hw, use_shift, rotate_prev_bev)``."""
    shift = geometry.bev_shift(can_bus, bev['bev_hw'], bev['real_hw']) * float(bev['use_shift'])
    maps = [geometry.bev_rotation_index(cb[-1] if bev['rotate_prev_bev'] else 0.0, bev['bev_hw'],
                                        bev['rotate_center']) for cb in can_bus]
    return dict(bev_shift=shift.astype(np.float32), bev_rot_index=np.stack([m[0] for m in maps]),
                bev_rot_valid=np.stack([m[1] for m in maps]))


def bev_config(model_cfg):
    """The ``bev`` argument of the datasets from a BEVFormer ``config.model`` (None otherwise)."""
    if 'bev_h' not in model_cfg:
        return None
    pc = model_cfg.pc_range
    return dict(bev_hw=(model_cfg.bev_h, model_cfg.bev_w), rotate_center=tuple(model_cfg.rotate_center),
                real_hw=(pc[4] - pc[1], pc[3] - pc[0]), use_shift=model_cfg.use_shift,
                rotate_prev_bev=model_cfg.rotate_prev_bev)


MAX_DRAWS = 100  # training: draws for a queue with GT, and consecutive skipped samples, before giving up


class SampleLoader:
    """Turns record indices into samples (see the module docstring). ``skipped``: training samples
    skipped so far because they failed to load (``data.skip_bad_samples``)."""

    def __init__(self, records, dataroot, cfg, bev=None, expert_bev=None):
        self.samples = records['samples']
        self.split = records.get('split', '?')
        self.skipped = 0
        self.dataroot = dataroot
        self.cfg = cfg
        self.bev = bev
        self.expert_bev = expert_bev
        self.out_hw = output_image_hw(records, cfg)
        self.raw_hw = raw_image_hw(records)
        self.device_normalize = bool(cfg.get('device_normalize', False))

    def _sample(self, indices, can_bus, exists, valid=True, rng=None):
        if self.device_normalize:
            frames = [load_frame_raw(self.samples[i], self.dataroot, self.cfg, self.raw_hw, rng) for i in indices]
        else:
            frames = [load_frame(self.samples[i], self.dataroot, self.cfg, self.out_hw, rng) for i in indices]
        boxes, labels, mask = ground_truth(self.samples[indices[-1]], self.cfg)
        out = dict(img=np.stack([f[0] for f in frames]), lidar2img=np.stack([f[1] for f in frames]),
                   can_bus=can_bus, prev_bev_exists=exists, gt_boxes=boxes, gt_labels=labels,
                   gt_mask=mask & valid, sample_idx=np.int32(indices[-1]), valid=np.bool_(valid))
        if self.device_normalize and rng is not None:
            out['photo_params'] = np.stack([f[2][0] for f in frames])
            out['photo_perm'] = np.stack([f[2][1] for f in frames])
        if self.bev is not None:
            out.update(bev_alignment(can_bus, self.bev))
        if self.expert_bev is not None:
            out.update({'expert_' + k: v for k, v in bev_alignment(can_bus, self.expert_bev).items()})
        return out

    def train(self, index, rng):
        """A training queue ending at ``index``; queues with a GT-less frame are resampled at a
        random index, as mmdet's ``filter_empty_gt`` loop does (a DataError after ``MAX_DRAWS``
        draws without GT in every frame). ``cfg.photometric``: every image of every queue frame gets
        its own photometric distortion drawn from ``rng``. With ``cfg.skip_bad_samples`` a queue
        that fails to load (DataError: missing or corrupt image, invalid GT box) is logged, counted
        in ``skipped`` and replaced by a queue at another index drawn from ``rng``; otherwise, after
        ``MAX_DRAWS`` consecutive failures, and for config mismatches (``data.max_gt``, no GT) the
        DataError propagates."""
        for _ in range(MAX_DRAWS):
            try:
                return self._train_queue(index, rng)
            except DataConfigError:
                raise
            except DataError as error:
                if not self.cfg.get('skip_bad_samples', False):
                    raise
                self.skipped += 1
                logging.warning('data.skip_bad_samples: skipping training index %d (%d skipped so far): %s',
                                int(index), self.skipped, error)
            index = rng.integers(len(self.samples))
        raise DataError(f"{MAX_DRAWS} consecutive training samples of split '{self.split}' failed to load with "
                        f'config data.skip_bad_samples=True (see the warnings); check the data')

    def _train_queue(self, index, rng):
        for _ in range(MAX_DRAWS):
            indices = train_queue_indices(int(index), self.cfg.queue_length, rng)
            if not self.cfg.filter_empty_gt or all(ground_truth(self.samples[i], self.cfg)[2].any() for i in indices):
                break
            index = rng.integers(len(self.samples))
        else:
            raise self._no_gt_error()
        can_bus, exists = _queue_can_bus(self.samples, indices)
        return self._sample(indices, can_bus, exists, rng=rng if self.cfg.get('photometric', False) else None)

    def _no_gt_error(self):
        with_gt = sum(bool(ground_truth(rec, self.cfg)[2].any()) for rec in self.samples)
        what = (f'no sample of split {self.split!r} has' if not with_gt else
                f'only {with_gt} of {len(self.samples)} samples of split {self.split!r} have')
        return DataConfigError(f'{what} GT within config data.point_cloud_range / data.class_names (with '
                          f'data.use_valid_flag={self.cfg.use_valid_flag}): {MAX_DRAWS} draws found no training '
                          f'queue with GT in every frame; set data.filter_empty_gt=False to train without GT')

    def eval(self, index, valid=True):
        """One frame; deltas w.r.t. the previous sample of its scene (BEVFormer ``forward_test``).
        Never skips a sample (``data.skip_bad_samples`` is for training only): the devkit's
        evaluation needs results for every sample of the split, so a DataError propagates."""
        index = int(index)
        prev = [index - 1] if index > 0 and valid else []
        can_bus, exists = _queue_can_bus(self.samples, prev + [index])
        return self._sample([index], can_bus[-1:], exists[-1:] & valid, valid)


MAX_AUTO_WORKERS = 16  # data.num_workers=-1: each worker holds a copy of the split's records


def ignore_interrupts(worker_index, worker_count):
    """grain's ``worker_init_fn``: a worker ignores Ctrl-C (the terminal sends SIGINT to the whole process
    group), so that only the training process decides: it finishes its step, saves and stops its workers."""
    del worker_index, worker_count
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def num_workers(cfg):
    """Worker processes of ``cfg`` (``data.num_workers``; -1: the cores this process may use but one, at most
    ``MAX_AUTO_WORKERS``)."""
    workers = int(cfg.get('num_workers', 0))
    if workers == -1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
        workers = min(MAX_AUTO_WORKERS, cores - 1)
    return max(0, workers)


class Batches:
    """Batches of a MapDataset of samples: ``iter()`` gives a ``BatchIterator``. The samples are built by
    ``data.num_workers`` processes with ``data.num_threads`` read threads each (``num_workers`` 0: threads of
    this process), ``data.prefetch`` batches ahead, and stacked here."""

    def __init__(self, samples, batch_size, cfg, drop_remainder):
        self.samples, self.batch_size, self.cfg, self.drop_remainder = samples, batch_size, cfg, drop_remainder

    def __iter__(self):
        return BatchIterator(self)

    def iter_from(self, next_batch):
        """A grain iterator over the batches from batch ``next_batch`` on."""
        ds = self.samples[next_batch * self.batch_size:] if next_batch else self.samples
        workers, threads = num_workers(self.cfg), self.cfg.num_threads
        ahead = self.cfg.prefetch * self.batch_size   # samples read ahead in all
        if not workers:
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=ahead))
        else:   # each worker keeps its threads busy and holds its share of the read-ahead
            if not flags.FLAGS.is_parsed():  # grain reads its absl flags (their defaults) to start workers
                flags.FLAGS.mark_as_parsed()
            ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=workers, per_worker_buffer_size=max(1, -(-ahead // workers))),
                worker_init_fn=ignore_interrupts)
        return iter(ds.batch(self.batch_size, drop_remainder=self.drop_remainder))


class BatchIterator:
    """Iterator of ``Batches`` with grain's ``get_state``/``set_state``/``close``. The state is the number of
    batches read, ``{'next_index': n}`` (what grain's iterator of batches saved before the samples were built by
    workers, so checkpoints of either restore in the other), whatever the worker count."""

    def __init__(self, batches):
        self._batches, self._next, self._it = batches, 0, None

    def __iter__(self):
        return self

    def __next__(self):
        if self._it is None:
            self._it = self._batches.iter_from(self._next)
        try:
            batch = next(self._it)
        except StopIteration:
            self.close()
            raise
        self._next += 1
        return batch

    def get_state(self):
        return {'next_index': self._next}

    def set_state(self, state):
        self.close()
        self._next = int(state['next_index'])

    def close(self):
        """Stops the read threads and worker processes (a later ``next`` starts them again)."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, 'close'):
            it.close()


def train_dataset(records, dataroot, cfg, batch_size, seed, shard_index=0, shard_count=1, bev=None,
                  expert_bev=None):
    """Infinite, shuffled (reshuffled every epoch), batched training data of this process's shard.

    One global stream (shuffle, repeat, per-element augmentation RNG keyed by the global position) is cut
    into global batches of ``batch_size * shard_count``; shard ``p`` gets rows ``[p * batch_size, (p + 1) *
    batch_size)`` of each. So the global batch, and the training run, does not depend on how many processes
    feed it, and every shard's iterator is at the same position (one saved iterator state serves all).
    Deterministic for a seed, whatever ``data.num_workers`` / ``num_threads``; ``iter(...)`` gives an iterator
    with ``get_state``/``set_state``/``close`` (``BatchIterator``).
    ``expert_bev``: also the BEV alignment of a distillation expert's grid (``expert_bev_*`` keys).
    """
    check_max_gt(records, cfg)
    loader = SampleLoader(records, dataroot, cfg, bev, expert_bev)
    ds = grain.MapDataset.range(len(records['samples'])).shuffle(seed=seed).repeat(None)
    ds = ds.random_map(lambda i, rng: loader.train(i, rng), seed=seed)
    if shard_count > 1:
        stream, per_batch = ds, batch_size * shard_count
        ds = grain.MapDataset.range(len(stream) // shard_count).map(
            lambda index: stream[(index // batch_size) * per_batch + shard_index * batch_size + index % batch_size])
    return Batches(ds, batch_size, cfg, drop_remainder=True)


def eval_streams(records, num_streams):
    """Splits the scenes into ``num_streams`` sequences of record indices (whole scenes, in time
    order, balanced by length) so every stream can carry its previous BEV from frame to frame."""
    scenes = {}
    for index, rec in enumerate(records['samples']):
        scenes.setdefault(rec['scene_token'], []).append(index)
    streams = [[] for _ in range(num_streams)]
    for chain in sorted(scenes.values(), key=len, reverse=True):
        min(streams, key=len).extend(chain)
    return streams


def eval_dataset(records, dataroot, cfg, batch_size, shard_index=0, shard_count=1, bev=None):
    """Batched evaluation data: batch element j of step t is frame t of stream j of this shard;
    all shards get the same number of steps, padding has ``valid=False``."""
    check_max_gt(records, cfg)
    loader = SampleLoader(records, dataroot, cfg, bev)
    streams = eval_streams(records, batch_size * shard_count)
    steps = max(len(s) for s in streams)
    mine = streams[shard_index * batch_size:(shard_index + 1) * batch_size]
    items = [(s[t], True) if t < len(s) else (s[-1] if s else 0, False) for t in range(steps) for s in mine]
    ds = grain.MapDataset.source(items).map(lambda item: loader.eval(*item))
    return Batches(ds, batch_size, cfg, drop_remainder=False)
