"""BEVFormer (Li et al., ECCV 2022) in Flax, faithful to fundamentalvision/BEVFormer.

``BEVFormer.__call__`` takes a batch from ``fd3d_jax.data.pipeline`` (with the BEV alignment
metadata): images (B, T, N, H, W, 3) of a temporal queue. The T-1 history frames are encoded in
order without gradients and in inference mode (``obtain_history_bev``: ``torch.no_grad`` + ``eval()``),
the chain restarting where ``prev_bev_exists`` is False; the last frame runs the full detector.
At evaluation T = 1 and the previous BEV is passed in (``prev_bev``) by the caller, which carries
it from frame to frame (``video_test_mode``).

Outputs (dict): ``bev`` (B, Q, C), ``img_feats`` (list of (B, N, H_l, W_l, C)), the head's
``cls_scores`` (L, B, NQ, K), ``bbox_preds`` (L, B, NQ, 10), ``queries``, ``references`` and
per-layer decoder ``sampling`` (locations, weights).

The history frames run as a scan with the parameters broadcast (one frame's activations at a time).

``dtype`` (``config.model.dtype``, ``fd3d_jax.models.precision``): the compute precision of the backbone, the
encoder and the decoder; the BEV it returns and carries between frames is float32 whatever it.
"""
import functools
from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fd3d_jax.models.backbone import FPN, ResNet
from fd3d_jax.models.bev_encoder import BEVEncoder
from fd3d_jax.models.detector import Detector
from fd3d_jax.models.decoder import BEVCrossAttention, DetectionHead, layer_norm, xavier_uniform
from fd3d_jax.models.grid_mask import grid_mask as apply_grid_mask
from fd3d_jax.models.precision import compute_dtype
from fd3d_jax.models.spatial_cross_attention import point_sampling, reference_points_2d, reference_points_3d
from fd3d_jax.models.temporal_self_attention import hybrid_reference_points, rotate_bev


class ImageFeatures(nn.Module):
    """Backbone + FPN per camera image: (B, N, H, W, 3) -> list of (B, N, H_l, W_l, C).
    ``grid_mask``: GridMask on the B*N images when not ``deterministic`` (rng 'dropout'). The images are cast to
    ``dtype`` after the mask; the levels come out in it."""
    backbone: dict
    neck: dict
    grid_mask: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, img, deterministic=True):
        batch, num_cams = img.shape[:2]
        img = img.reshape((batch * num_cams,) + img.shape[2:])
        if self.grid_mask and not deterministic:
            img = apply_grid_mask(img, self.make_rng('dropout'))
        feats = ResNet(**self.backbone, dtype=self.dtype, name='backbone')(img.astype(self.dtype))
        feats = FPN(**self.neck, dtype=self.dtype, name='neck')(feats)
        return [f.reshape((batch, num_cams) + f.shape[1:]) for f in feats]


def original_can_bus(can_bus):
    """can_bus (..., 18) as the original's data code makes it: the ego->global quaternion slots ``[3:7]``
    (w, x, y, z) all hold w. ``CustomNuScenesDataset.get_data_info`` assigns a pyquaternion ``Quaternion`` to
    the numpy slice ``can_bus[3:7]``; numpy converts it with ``float()``, its scalar part, and broadcasts it.
    The released BEVFormer checkpoints were trained and evaluated on that; the records keep the true
    quaternion, and ``model.reproduce_can_bus_bug`` applies this in the model (tests/models: against the
    original statement run with pyquaternion on a nuScenes ego pose)."""
    can_bus = jnp.asarray(can_bus)
    return can_bus.at[..., 4:7].set(jnp.broadcast_to(can_bus[..., 3:4], can_bus[..., 4:7].shape))


class BEVFormer(Detector):
    """BEVFormer (``Detector``): a BEV of ``bev_h`` x ``bev_w`` cells carried between frames."""
    has_bev: ClassVar[bool] = True

    backbone: dict
    neck: dict
    embed_dims: int = 256
    num_heads: int = 8
    ffn_dims: int = 512
    dropout: float = 0.1
    bev_h: int = 50
    bev_w: int = 50
    num_cams: int = 6
    num_levels: int = 1
    encoder_layers: int = 3
    decoder_layers: int = 6
    num_query: int = 900
    num_classes: int = 10
    num_points_in_pillar: int = 4
    sca_points: int = 8
    tsa_points: int = 4
    decoder_points: int = 4
    pc_range: Sequence[float] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0)
    use_can_bus: bool = True
    use_cams_embeds: bool = True
    reproduce_shift_bug: bool = False
    reproduce_can_bus_bug: bool = False   # can_bus[3:7] = [w, w, w, w] (``original_can_bus``)
    tsa_batch_bug: bool = False
    sca_batch0_hits: bool = False
    sca_max_cameras: int = 0              # spatial cross-attention: K camera slots per BEV query (0: all, dense)
    prev_bev_batch0: bool = False
    remat: bool = False
    grid_mask: bool = False               # GridMask on the current frame's images in training
    dtype: str = 'float32'                # compute precision ('float32' | 'bfloat16'); params stay float32

    def setup(self):
        embed_dims, num_bev_queries = self.embed_dims, self.bev_h * self.bev_w
        dtype = compute_dtype(self.dtype)
        self.image_features = ImageFeatures(dict(self.backbone), dict(self.neck), self.grid_mask, dtype)
        self.bev_embedding = self.param('bev_embedding', nn.initializers.normal(1.0), (num_bev_queries, embed_dims))
        # LearnedPositionalEncoding(num_feats=C/2): [col_embed(x) | row_embed(y)].
        self.row_embed = self.param('row_embed', nn.initializers.normal(1.0), (self.bev_h, embed_dims // 2))
        self.col_embed = self.param('col_embed', nn.initializers.normal(1.0), (self.bev_w, embed_dims // 2))
        self.cams_embeds = self.param('cams_embeds', nn.initializers.normal(1.0), (self.num_cams, embed_dims))
        self.level_embeds = self.param('level_embeds', nn.initializers.normal(1.0), (self.num_levels, embed_dims))
        self.can_bus_fc0 = nn.Dense(embed_dims // 2, kernel_init=xavier_uniform, dtype=dtype)
        self.can_bus_fc1 = nn.Dense(embed_dims, kernel_init=xavier_uniform, dtype=dtype)
        self.can_bus_norm = layer_norm(dtype=dtype)
        layer_kwargs = dict(embed_dims=embed_dims, num_heads=self.num_heads, ffn_dims=self.ffn_dims,
                            num_levels=self.num_levels, sca_points=self.sca_points, tsa_points=self.tsa_points,
                            num_z_anchors=self.num_points_in_pillar, bev_hw=(self.bev_h, self.bev_w),
                            dropout=self.dropout, tsa_batch_bug=self.tsa_batch_bug,
                            sca_batch0_hits=self.sca_batch0_hits, sca_max_cameras=self.sca_max_cameras,
                            dtype=dtype)
        self.encoder = BEVEncoder(self.encoder_layers, layer_kwargs, self.remat)
        self.head = self.build_head(None)

    @nn.nowrap
    def bev_shape(self):
        return self.bev_h, self.bev_w, self.embed_dims

    @nn.nowrap
    def pillar_points(self):
        """(D, Q, 3) normalised pillar anchors over the range's full height ``pc_range[5] - pc_range[2]``."""
        return reference_points_3d(self.bev_h, self.bev_w, self.num_points_in_pillar,
                                   self.pc_range[5] - self.pc_range[2])

    @nn.nowrap
    def extra_batch_keys(self, batch_size, queue_length):
        """The BEV alignment of each frame to the next (``fd3d_jax.data.pipeline.bev_alignment``)."""
        batch, num_frames, num_bev_queries = batch_size, queue_length, self.bev_h * self.bev_w
        return dict(bev_shift=((batch, num_frames, 2), jnp.float32),
                    bev_rot_index=((batch, num_frames, num_bev_queries), jnp.int32),
                    bev_rot_valid=((batch, num_frames, num_bev_queries), jnp.bool_))

    @nn.nowrap
    def build_head(self, img_hw, name=None):
        """The decoder reads the BEV (context ``dict(bev=(B, Q, C))``); ``img_hw`` is not used."""
        del img_hw
        dtype = compute_dtype(self.dtype)
        cross = functools.partial(BEVCrossAttention, (self.bev_h, self.bev_w), self.embed_dims, self.num_heads,
                                  self.decoder_points, self.dropout, dtype)
        return DetectionHead(self.num_query, self.embed_dims, self.num_heads, self.ffn_dims, self.decoder_layers,
                             self.num_classes, self.dropout, tuple(self.pc_range), cross, self.remat, dtype,
                             name=name)

    @nn.nowrap
    def head_context(self, out, lidar2img):
        del lidar2img
        return dict(bev=out['bev'].astype(compute_dtype(self.dtype)))

    def bev_pos(self, batch_size):
        pos = jnp.concatenate([
            jnp.broadcast_to(self.col_embed[None, :, :], (self.bev_h, self.bev_w, self.embed_dims // 2)),
            jnp.broadcast_to(self.row_embed[:, None, :], (self.bev_h, self.bev_w, self.embed_dims // 2))], -1)
        return jnp.broadcast_to(pos.reshape(1, -1, self.embed_dims), (batch_size, self.bev_h * self.bev_w, self.embed_dims))

    def flatten_feats(self, feats):
        """list of (B, N, H_l, W_l, C) -> (B, N, S, C) with camera and level embeddings."""
        out = []
        for lvl, feat in enumerate(feats):
            batch, num_cams, height, width, channels = feat.shape
            feat = feat.reshape(batch, num_cams, height * width, channels)
            if self.use_cams_embeds:
                feat = feat + self.cams_embeds[None, :, None, :].astype(feat.dtype)
            out.append(feat + self.level_embeds[lvl][None, None, None, :].astype(feat.dtype))
        return jnp.concatenate(out, 2), tuple((f.shape[2], f.shape[3]) for f in feats)

    def encode_bev(self, feats, lidar2img, can_bus, prev_bev, prev_exists, shift, rot_index, rot_valid,
                   img_hw, deterministic):
        """One frame's BEV. feats: list of (B, N, H_l, W_l, C); lidar2img (B, N, 4, 4); can_bus (B, 18);
        prev_bev (B, Q, C); prev_exists (B,); shift (B, 2); rot_index/rot_valid (B, Q)."""
        batch = lidar2img.shape[0]
        dtype = feats[0].dtype
        if self.prev_bev_batch0:   # the original: ``if not img_metas[0]['prev_bev_exists']: prev_bev = None``
            prev_exists = jnp.broadcast_to(prev_exists[:1], prev_exists.shape)
        bev_query = jnp.broadcast_to(self.bev_embedding[None].astype(dtype), (batch,) + self.bev_embedding.shape)
        if self.reproduce_can_bus_bug:
            can_bus = original_can_bus(can_bus)
        can = self.can_bus_norm(nn.relu(self.can_bus_fc1(nn.relu(self.can_bus_fc0(can_bus.astype(dtype))))))
        bev_query = bev_query + can[:, None, :] * float(self.use_can_bus)
        flat, shapes = self.flatten_feats(feats)
        ref_cam, bev_mask = point_sampling(self.pillar_points(), self.pc_range, lidar2img, img_hw)
        prev = rotate_bev(prev_bev, rot_index, rot_valid).astype(dtype)
        hybrid = hybrid_reference_points(jnp.asarray(reference_points_2d(self.bev_h, self.bev_w)), shift,
                                         prev_exists, self.reproduce_shift_bug)
        bev = self.encoder(bev_query, self.bev_pos(batch).astype(dtype), prev, prev_exists, hybrid, flat, shapes,
                           ref_cam, bev_mask, deterministic)
        return bev.astype(jnp.float32)

    def __call__(self, batch, prev_bev=None, deterministic=True):
        """batch: img (B, T, N, H, W, 3), lidar2img (B, T, N, 4, 4), can_bus (B, T, 18),
        prev_bev_exists (B, T), bev_shift (B, T, 2), bev_rot_index / bev_rot_valid (B, T, Q).
        prev_bev: optional (B, Q, C) BEV of the frame before the first one (evaluation)."""
        img = batch['img']
        batch_size, num_frames = img.shape[:2]
        img_hw = img.shape[3:5]
        num_bev_queries, embed_dims = self.bev_h * self.bev_w, self.embed_dims
        prev = (jnp.zeros((batch_size, num_bev_queries, embed_dims), jnp.float32) if prev_bev is None
                else prev_bev.astype(jnp.float32))

        keys = ('img', 'lidar2img', 'can_bus', 'prev_bev_exists', 'bev_shift', 'bev_rot_index', 'bev_rot_valid')

        def encode_frame(mdl, prev, frame, deterministic):
            feats = mdl.image_features(frame['img'], deterministic)
            bev = mdl.encode_bev(feats, frame['lidar2img'], frame['can_bus'], prev, frame['prev_bev_exists'],
                                 frame['bev_shift'], frame['bev_rot_index'], frame['bev_rot_valid'], img_hw,
                                 deterministic)
            return bev, feats

        if num_frames > 1:  # history: no gradient, inference mode, one frame at a time
            def history_step(mdl, prev, frame):
                return jax.lax.stop_gradient(encode_frame(mdl, prev, frame, True)[0]), None
            history = {k: jnp.moveaxis(batch[k][:, :num_frames - 1], 1, 0) for k in keys}
            prev, _ = nn.scan(history_step, variable_broadcast='params', split_rngs={'params': False, 'dropout': False})(
                self, prev, history)
        bev, feats = encode_frame(self, prev, {k: batch[k][:, num_frames - 1] for k in keys}, deterministic)
        out = self.head(self.head_context(dict(bev=bev), None), batch_size, deterministic)
        return dict(out, bev=bev, img_feats=feats)

