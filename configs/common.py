"""Shared config parts. Model configs build on ``data_config``; every key can be overridden from
the command line (``--config.data.dataroot=...``)."""
import ml_collections

from fd3d_jax.data.nuscenes_meta import CLASS_NAMES, POINT_CLOUD_RANGE, SUBMISSION_META

# mmdet normalisations: torchvision RGB (tiny, R50) and caffe BGR (small/base/DETR3D, R101).
RGB_NORM = dict(image_mean=(123.675, 116.28, 103.53), image_std=(58.395, 57.12, 57.375), to_rgb=True)
CAFFE_NORM = dict(image_mean=(103.53, 116.28, 123.675), image_std=(1.0, 1.0, 1.0), to_rgb=False)


def data_config(toy=False):
    """The input pipeline. ``toy``: the embedded synthetic set (``make demo`` writes it)."""
    c = ml_collections.ConfigDict()
    c.dataroot = 'data/synthetic' if toy else 'data/nuscenes'
    c.version = 'v1.0-mini' if toy else 'v1.0-trainval'
    c.train_split = 'mini_train' if toy else 'train'
    c.val_split = 'mini_val' if toy else 'val'
    c.records_dir = ''                # records cache; '' = <dataroot>/fd3d_records, or a user cache folder when
                                      # the dataroot is read-only (fd3d_jax/data/records.py, docs/nuscenes.md)
    c.can_bus_root = ''               # folder holding can_bus/ (the CAN bus expansion); '' = beside the dataroot
                                      # (the official layout data/can_bus), else inside it
    c.can_bus_from_poses = False      # True: no CAN bus expansion; acceleration, rotation rate and velocity of
                                      # can_bus estimated from ego poses (differs from what official models saw)
    c.raw_image_wh = (320, 180) if toy else (1600, 900)  # camera images before scaling (shape checks)
    c.class_names = CLASS_NAMES
    c.point_cloud_range = POINT_CLOUD_RANGE
    c.image_scale = 0.5               # RandomScaleImageMultiViewImage(scales=[s])
    c.pad_divisor = 32                # PadMultiViewImage(size_divisor=32)
    c.image_mean, c.image_std, c.to_rgb = RGB_NORM['image_mean'], RGB_NORM['image_std'], RGB_NORM['to_rgb']
    c.queue_length = 3                # BEVFormer temporal queue (frames per training sample)
    c.max_gt = 64 if toy else 256     # static number of GT slots (padded with a mask)
    c.use_valid_flag = True           # drop GT without lidar/radar points
    c.filter_empty_gt = True          # resample training queues with a GT-less frame
    c.photometric = True              # PhotoMetricDistortionMultiViewImage on training images
    c.skip_bad_samples = False        # training only: log and redraw a sample that fails to load
                                      # (missing/corrupt image); evaluation never skips
    c.num_workers = 0 if toy else -1  # grain worker processes building samples (0: threads of the training
                                      # process; -1: one per core but one, at most 16); same batches for any
    c.num_threads = 2                 # grain read threads (image decoding) per reading process
    c.prefetch = 2                    # batches read ahead
    c.device_prefetch = 2             # batches sent to the device ahead of the step (training loop, evaluation)
    c.device_normalize = not toy      # True: the pipeline emits raw uint8 images (+ photometric draws) and
                                      # fd3d_jax.data.device_input.prepare_images distorts/normalises/resizes/
                                      # pads them in the jitted step (same result up to float rounding; the
                                      # toy/demo runs keep the host path, so their results stay bit for bit)
    return c


def resnet(depth, style='pytorch', out_indices=(3,), dcn=False, remat=False):
    """mmdet ResNet config: frozen BN, frozen stem + stage 1, DCNv2 in stages 3-4 when ``dcn``. ``repeated_blocks``
    'auto': a stage's repeated blocks unrolled on the CPU unless rematerialised, else a loop (``ResNet``)."""
    return ml_collections.ConfigDict(dict(
        depth=depth, style=style, out_indices=tuple(out_indices), frozen_stages=1,
        dcn_stages=(False, False, dcn, dcn), remat=remat, repeated_blocks='auto', base_width=64, stage_blocks=None))


def fpn(in_channels, num_outs, start_level=0, out_channels=256):
    """mmdet FPN config with extra levels on the output (``add_extra_convs='on_output'``)."""
    return ml_collections.ConfigDict(dict(
        in_channels=tuple(in_channels), out_channels=out_channels, num_outs=num_outs, start_level=start_level,
        add_extra_convs='on_output', relu_before_extra_convs=True))


def bevformer_model(**overrides):
    """BEVFormer's common hyper-parameters (projects/configs/bevformer/*.py); configs override."""
    m = ml_collections.ConfigDict()
    m.name = 'bevformer'
    m.embed_dims, m.num_heads, m.ffn_dims, m.dropout = 256, 8, 512, 0.1
    m.bev_h = m.bev_w = 200
    m.num_cams = 6
    m.num_levels = 4
    m.encoder_layers, m.decoder_layers = 6, 6
    m.num_query, m.num_classes = 900, len(CLASS_NAMES)
    m.num_points_in_pillar, m.sca_points, m.tsa_points, m.decoder_points = 4, 8, 4, 4
    m.pc_range = POINT_CLOUD_RANGE
    m.use_can_bus = m.use_cams_embeds = m.use_shift = m.rotate_prev_bev = True
    m.rotate_center = (100, 100)          # the original's fixed centre (exact only for 200x200)
    m.reproduce_shift_bug = False         # quirks of the original, for checkpoint parity
    m.reproduce_can_bus_bug = False       # can_bus[3:7] fed as [w, w, w, w] (the original's data code; on in :full)
    m.tsa_batch_bug = False
    m.sca_batch0_hits = False
    m.sca_max_cameras = 0                 # 0: SCA over all cameras (dense); K: K camera slots per BEV query
    m.prev_bev_batch0 = False
    m.remat = False                       # jax.checkpoint per encoder/decoder layer
    m.dtype = 'float32'                   # compute precision: 'float32' | 'bfloat16' (params stay float32)
    m.max_num = 300                       # boxes kept by the NMS-free decoder
    m.grid_mask = True                    # use_grid_mask=True: GridMask(prob=0.7) in training
    m.backbone = resnet(101, 'caffe', (1, 2, 3), dcn=True)
    m.neck = fpn((512, 1024, 2048), 4)
    m.update(overrides)
    return m


def detr3d_model(**overrides):
    """DETR3D's hyper-parameters (projects/configs/detr3d/detr3d_res101_gridmask.py)."""
    m = ml_collections.ConfigDict()
    m.name = 'detr3d'
    m.embed_dims, m.num_heads, m.ffn_dims, m.dropout = 256, 8, 512, 0.1
    m.num_cams = 6
    m.num_levels = 4
    m.num_points = 1
    m.decoder_layers = 6
    m.num_query, m.num_classes = 900, len(CLASS_NAMES)
    m.pc_range = POINT_CLOUD_RANGE
    m.remat = False
    m.dtype = 'float32'                   # compute precision: 'float32' | 'bfloat16' (params stay float32)
    m.max_num = 300
    m.grid_mask = True                    # use_grid_mask=True: GridMask(prob=0.7) in training
    m.backbone = resnet(101, 'caffe', (0, 1, 2, 3), dcn=True)
    m.neck = fpn((256, 512, 1024, 2048), 4, start_level=1)
    m.update(overrides)
    return m


def toy_backbone(model):
    """Shrinks a model config to run in seconds on CPU: a 1-block-per-stage ResNet of width 8 with
    C4/C5 + one extra FPN level (3 levels: 6x10, 3x5, 2x3 at 96x160), C=32, 4 heads, FFN 64."""
    model.backbone = ml_collections.ConfigDict(dict(
        depth=50, style='pytorch', out_indices=(2, 3), frozen_stages=-1, dcn_stages=(False,) * 4, remat=False,
        repeated_blocks='auto', base_width=8, stage_blocks=(1, 1, 1, 1)))
    model.neck = fpn((128, 256), 3, out_channels=32)
    model.num_levels = 3
    model.embed_dims, model.num_heads, model.ffn_dims = 32, 4, 64
    model.decoder_layers = 2
    model.num_query = 16
    model.max_num = 20
    return model


def toy_bevformer(config):
    """The toy BEVFormer: toy backbone, non-square 8x10 BEV (catches h/w swaps), 2 encoder layers,
    rotation about the true BEV centre, no remat; images of the synthetic set scaled by 0.5."""
    config.data.image_scale = 0.5
    toy_backbone(config.model)
    config.model.bev_h, config.model.bev_w = 8, 10
    config.model.encoder_layers = 2
    config.model.rotate_center = (5, 4)
    config.model.remat = False
    return config


def check_arg(name, arg, allowed):
    if arg not in allowed:
        raise ValueError(f"configs/{name}.py takes one of {', '.join(':' + a for a in allowed)}, got ':{arg}'")


def add_training(config, toy=False):
    """Training, optimiser and loss keys (the original recipe: BEVFormer's and DETR3D's configs
    ``optimizer``, ``lr_config``, ``train_cfg`` and loss settings); every
    key is overridable (``--config.train.num_steps=2000``)."""
    t = ml_collections.ConfigDict()
    t.batch_size = 8 if not toy else 1  # global batch (8 GPUs x 1 sample in the original)
    t.per_device_batch_size = 0 if toy else 1  # > 0: global batch = this x the devices (batch_size ignored)
    t.epochs = 24                       # schedule length when num_steps is 0
    t.num_steps = 0                     # 0: epochs x steps per epoch
    t.checkpoint_every = 1000           # steps between checkpoints
    t.keep_checkpoints = 3
    t.log_every = 50                    # steps between metric lines
    t.eval_every = 0                    # steps between evaluations (0: only at the end)
    t.eval_batch_size = 0               # 0: one sample per device of the mesh
    t.ema_decay = 0.0                   # > 0: evaluate and export an EMA of the params (e.g. 0.9999; BEVDet)
    t.ema_ramp_steps = 2000             # decay * (1 - exp(-step / ramp)): the average forgets the init early
    t.init_from = ''                    # pretrained sources, comma-separated (fd3d_jax/convert/init_from.py)
    t.init_from_original = ''           # what the original recipe starts from (named in the :full configs)
    t.nonfinite = 'stop'                # non-finite loss/gradient: 'stop' (name the step, keep the last good
                                        # checkpoint) or 'skip' (no update; counted in metrics skipped_steps)
    t.profile = 0                       # > 0: a device trace (jax.profiler) of this many steps, after the first
                                        # (compiling) step, written to W/profile (TensorBoard's profile plugin)
    config.train = t
    o = ml_collections.ConfigDict()
    o.lr = 2e-4                         # at the global batch lr_base_batch
    o.lr_scaling = 'none' if toy else 'linear'  # 'linear': lr x global batch / lr_base_batch (Goyal et al.)
    o.lr_base_batch = 8                 # the original's global batch (8 GPUs x 1)
    o.weight_decay = 0.01               # decoupled (AdamW), on all parameters
    o.betas = (0.9, 0.999)
    o.eps = 1e-8
    o.backbone_lr_mult = 0.1            # img_backbone lr x 0.1
    o.grad_clip = 35.0                  # global L2 norm
    o.warmup_iters = 500
    o.warmup_ratio = 1.0 / 3
    o.min_lr_ratio = 1e-3               # cosine annealing to min_lr_ratio x lr
    o.by_epoch = True                   # mmcv CosineAnnealing steps once per epoch
    config.optim = o
    loss = ml_collections.ConfigDict()
    loss.cls_weight = 2.0               # focal loss and focal matching cost
    loss.bbox_weight = 0.25             # L1 loss and L1 matching cost (first 8 code entries)
    loss.focal_alpha = 0.25
    loss.focal_gamma = 2.0
    loss.code_weights = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2)
    loss.matcher = 'auto'               # Hungarian matching: 'scipy' (host callback), 'jax' (in the graph, no
                                        # host round trip; fd3d_jax/detection/matching.py::hungarian_jax), 'auto'
                                        # (jax on GPUs/TPUs, scipy on the CPU); per device shard either way
    config.loss = loss
    # ``meta`` of a results.json (the nuScenes submission format): what the method used; the original configs'
    # input_modality (BEVFormer's declare use_external=True, DETR3D's False). Scores do not depend on it.
    config.submission = ml_collections.ConfigDict(SUBMISSION_META)
    return config


def as_original_bevformer(config):
    """What the released BEVFormer runs saw and declared (the ``:full`` and ``:fd3d`` sizes, after
    ``add_training``): can_bus[3:7] as [w, w, w, w] (docs/models.md) and ``use_external=True``."""
    config.model.reproduce_can_bus_bug = True
    config.submission.use_external = True
    return config


def demo_model(config):
    """The ``:demo`` size: the toy detector grown to learn the synthetic set in ~20 minutes on a
    2-core CPU (docs/training.md): images at full synthetic size (320x180 -> 320x192),
    a width-16 one-block-per-stage ResNet with C3-C5 + one extra FPN level (4 levels), C=64, 4 heads,
    3 decoder layers, 200 queries; lr 1e-3 (no pretrained backbone, so backbone lr x 1); no GridMask
    or photometric distortion (in 20 minutes they cost more than they give: mAP 0.106 vs 0.124)."""
    toy_backbone(config.model)
    config.data.photometric = False
    config.model.grid_mask = False
    m = config.model
    config.data.image_scale = 1.0
    m.backbone.base_width = 16
    m.backbone.out_indices = (1, 2, 3)
    m.neck = fpn((128, 256, 512), 4, out_channels=64)
    m.num_levels = 4
    m.embed_dims, m.num_heads, m.ffn_dims = 64, 4, 128
    m.decoder_layers = 3
    m.num_query = m.max_num = 200
    return config


def demo_bevformer(config):
    """``demo_model`` for BEVFormer: BEV 32x32 (3.2 m cells) rotated about its true centre,
    2 encoder layers, a queue of 2 frames (one history frame)."""
    demo_model(config)
    config.model.bev_h = config.model.bev_w = 32
    config.model.rotate_center = (16, 16)
    config.model.encoder_layers = 2
    config.model.remat = False
    config.data.queue_length = 2
    return config


def demo_training(config, num_steps=5000):
    """Training settings of the ``:demo`` size (after ``add_training``)."""
    config.optim.lr = 1e-3
    config.optim.backbone_lr_mult = 1.0
    config.optim.warmup_iters = 200
    config.train.batch_size = 1
    config.train.num_steps = num_steps
    config.train.checkpoint_every = 500
    config.train.log_every = 50
    return config


def expert_config(expert):
    """``config.expert`` of a distillation pair from the expert's own config: its model and its image
    normalisation (the apprentice's images are renormalised for it)."""
    e = ml_collections.ConfigDict()
    e.model = expert.model
    e.image_mean, e.image_std, e.to_rgb = expert.data.image_mean, expert.data.image_std, expert.data.to_rgb
    return e


def distill_config(method='fd3d', expert_upsample=1, expert_bev_channels=256):
    """``config.distill``: the method and its switches (``expert_bev_channels``: the expert's BEV channels, which
    convert the heatmap baseline's released weight to a per-element one). [R] = released fact (FocalDistiller codebase,
    MGD), [I] = reconstruction of the unreleased FD3D losses (docs/fd3d_reconstruction.md), each a switch.
    The weights of every method live here and are applied in one place (``fd3d_jax.distill.Distiller.loss``)."""
    d = ml_collections.ConfigDict()
    d.method = method                     # none | fitnet | mgd | heatmap | fd3d
    d.expert_checkpoint = ''              # workdir of fd3d_jax.train (or a converted params folder)
    d.expert_upsample = expert_upsample   # [R] expert input = apprentice images x2 (lidar2img scaled)
    d.init_apprentice_head = True         # [R] duplicate_student_head: apprentice head <- expert head
    d.log_grad_norms = True               # log each term's gradient norm on the apprentice's BEV / FPN levels
    d.feature_norm = 'none'               # none | expert | both: standardise (BN, no affine) the expert's
                                          # features [R: bev_feats_norm] | and the apprentice's FPN levels
    d.head = ml_collections.ConfigDict(dict(
        train=False,                      # [I] False: the expert's head, frozen; True: a copy trained on GT
        loss_weight=1.0))
    d.mask = ml_collections.ConfigDict(dict(
        select='score',                   # [I] queries defining masks: score | topk | gt (Hungarian-matched)
        score_thresh=0.3, topk=30,
        box_scale=1.0,                    # [I] box enlargement (w, l, h x scale)
        mode='zero',                      # [I] zero: S * (1 - M); random: MGD mask restricted to M
        random_ratio=0.65))               # lambda of the 'random' mode
    # [I] FD3D's weights, per element; 3 chosen by the weight sweep on the BEVFormer pair's tuning split (1 / 3 / 10,
    # three seeds, docs/experiments.md; the DETR3D pair sets its own, 0.3); 0 switches a term off
    d.generative = ml_collections.ConfigDict(dict(
        bev_weight=3.0, pv_weight=3.0,
        area='full'))                     # [I] full: the loss counts the whole map (as MGD); instance: the masked
                                          # area only (then a zeroed instance interior is out of the generator's reach)
    d.focal = ml_collections.ConfigDict(dict(
        weight=3.0,                       # [I] per element (mean over layers, queries and channels)
        source='raw',                     # [I] apprentice BEV sampled: raw (upsampled) | generated
        queries='selected'))              # [I] all | selected (weighted by score): selected separated from all on
                                          # the BEVFormer pair's tuning split (5 seeds, docs/experiments.md)
    # FitNet's weights, per element; 3 chosen by the same sweep (1 / 3 / 10 on the tuning split, three seeds)
    d.fitnet = ml_collections.ConfigDict(dict(bev_weight=3.0, pv_weight=3.0))
    # [R] MGD's mask ratio; its released alpha 2e-5 weights a per-image sum: per element about 1 at our sizes
    d.mgd = ml_collections.ConfigDict(dict(weight=1.0, ratio=0.65))
    d.heatmap = ml_collections.ConfigDict(dict(                       # [R] the released baseline:
        cwd_tau=2.0, cwd_weight=0.25,     # CWD per (image, channel) as released
        # the released 0.1 weights a per-cell sum over the expert's BEV channels: per element 0.1 x channels
        # (25.6 at the released 256; 6.4 at :demo's 64)
        bev_weight=0.1 * expert_bev_channels,
        grid_hw=(128, 128), min_overlap=0.1, min_radius=2))
    return d


def toy_distill(config):
    """Distillation switches for the toy pairs (16 queries of an untrained expert: top-k masks)."""
    config.distill.mask.select = 'topk'
    config.distill.mask.topk = 8
    return config
