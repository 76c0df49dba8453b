"""Auxiliary generator for generative replay: a VQ-VAE over an image and its segmentation mask.

Qu et al. (seed paper 004, "Handling data heterogeneity with generative replay in collaborative learning for
medical imaging") replay earlier sites' data by decoding stored discrete latent codes with an auxiliary VQ-VAE-2
(Razavi et al. 2019, two levels: 32x32 top and 64x64 bottom codes at 256x256 input). For segmentation a replayed
image needs a mask, so here the generator autoencodes the image *and* its mask together (``image_channels + 1``
channels) and one code grid decodes to an (image, mask) pair.

This is a **one-level** VQ-VAE (van den Oord et al. 2017) built on MONAI's :class:`monai.networks.nets.VQVAE`, not the
seed's two-level VQ-VAE-2: the second level roughly doubles encoder/decoder cost, and this package must train on a
CPU. Extension point: :class:`ReplayGenerator` touches the MONAI model only in five hooks (``_latents``,
``_quantize``, ``_indices``, ``_embed``, ``_decode``); a VQ-VAE-2 goes in by overriding them (its codes would be a
pair of grids, so :mod:`monai_fedpriv.generative.cyclic` would then index and concatenate each grid).

Codebook: MONAI learns it by exponential moving averages (van den Oord et al. 2017, appendix), so the quantisation
loss returned by MONAI is the commitment term only. The EMA update runs only in ``forward``/``loss`` in training mode;
:meth:`ReplayGenerator.encode_codes` and :meth:`ReplayGenerator.decode_pairs` never change any state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.nets import VQVAE
from torch import nn

__all__ = ["ReplayGenerator", "build_generator"]


class ReplayGenerator(nn.Module):
    """A VQ-VAE that encodes (image, mask) pairs to discrete codes and decodes codes back to pairs.

    Output channels ``0..image_channels-1`` are the image (linear); the last output channel is the mask's logit.

    Parameters
    ----------
    autoencoder
        A MONAI ``VQVAE`` with ``image_channels + 1`` input and output channels.
    spatial_dims
        2 or 3.
    image_channels
        Number of image channels (the mask adds one).
    downsample
        Total spatial downsampling factor of the encoder (input side / code-grid side).
    """

    def __init__(self, autoencoder: VQVAE, spatial_dims: int, image_channels: int, downsample: int) -> None:
        super().__init__()
        if autoencoder.in_channels != image_channels + 1 or autoencoder.out_channels != image_channels + 1:
            raise ValueError(f"the autoencoder must have image_channels + 1 = {image_channels + 1} in/out channels.")
        self._autoencoder = autoencoder
        self.spatial_dims = spatial_dims
        self.image_channels = image_channels
        self.downsample = downsample
        self.num_embeddings = int(autoencoder.num_embeddings)
        self.codebook_ready: torch.Tensor
        self.register_buffer("codebook_ready", torch.tensor(False))  # set by the first training step

    # -- validation ------------------------------------------------------------------------------------------------
    def _join(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Check an (images, masks) batch and concatenate it to ``(B, image_channels + 1, *spatial)``."""
        if images.ndim != self.spatial_dims + 2 or images.shape[1] != self.image_channels:
            raise ValueError(f"images must be (B, {self.image_channels}, <{self.spatial_dims} spatial dims>), got "
                             f"{tuple(images.shape)}.")  # fmt: skip
        if masks.ndim == images.ndim - 1:
            masks = masks.unsqueeze(1)
        if masks.shape != (images.shape[0], 1, *images.shape[2:]):
            raise ValueError(f"masks must be (B, 1, *spatial) matching images {tuple(images.shape)}, got "
                             f"{tuple(masks.shape)}.")  # fmt: skip
        if not bool(((masks == 0) | (masks == 1)).all()):
            raise ValueError("masks must be binary (values in {0, 1}).")
        if any(s % self.downsample for s in images.shape[2:]):
            raise ValueError(f"spatial sizes {tuple(images.shape[2:])} must be multiples of {self.downsample}.")
        return torch.cat([images.float(), masks.to(images.device, torch.float32)], dim=1)

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``codes`` is a non-empty int64 ``(B, *latent)`` grid of valid indices."""
        if codes.dtype != torch.long or codes.ndim != self.spatial_dims + 1 or codes.shape[0] == 0:
            raise ValueError(f"codes must be a non-empty LongTensor (B, <{self.spatial_dims} latent dims>), got "
                             f"{codes.dtype} {tuple(codes.shape)}.")  # fmt: skip
        if bool((codes < 0).any()) or bool((codes >= self.num_embeddings).any()):
            raise ValueError(f"codes must lie in [0, {self.num_embeddings}).")

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one item's code grid for an input of ``spatial_shape``."""
        return tuple(int(s) // self.downsample for s in spatial_shape)

    # -- the extension point: everything model-specific goes through these five hooks -------------------------------
    def _latents(self, x: torch.Tensor) -> torch.Tensor:
        return self._autoencoder.encode(x)

    def _quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Straight-through quantised latents and the commitment loss (updates the EMA codebook in training)."""
        if self.training and not bool(self.codebook_ready):
            self._init_codebook(z.detach())
        return self._autoencoder.quantize(z)

    @torch.no_grad()
    def _init_codebook(self, z: torch.Tensor) -> None:
        """Seed the codebook with latent vectors of the first training batch, evenly spaced (no RNG).

        MONAI's codebook starts as N(0, 1) vectors, far larger than a fresh encoder's outputs (~0.03 here), so every
        latent picks the same code and the codebook collapses to one entry. Data-dependent initialisation is a common
        remedy (e.g. Dhariwal et al. 2020, Jukebox; Lancucki et al. 2020). Each seeded code counts as one sample in
        the EMA (cluster size 1) so the first update does not blow up unused entries.
        """
        quantizer = self._autoencoder.quantizer.quantizer
        flat = z.movedim(1, -1).reshape(-1, z.shape[1]).float()
        picks = torch.linspace(0, len(flat) - 1, self.num_embeddings, device=flat.device).round().long()
        quantizer.embedding.weight.copy_(flat[picks])
        quantizer.ema_w.copy_(flat[picks])
        quantizer.ema_cluster_size.fill_(1.0)
        self.codebook_ready.fill_(True)

    def _indices(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices, without the EMAQuantizer forward pass that would update the codebook."""
        return self._autoencoder.quantizer.quantizer.quantize(z)[2].long()

    def _embed(self, codes: torch.Tensor) -> torch.Tensor:
        device = self._autoencoder.quantizer.quantizer.embedding.weight.device
        return self._autoencoder.quantizer.embed(codes.to(device))

    def _decode(self, quantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._autoencoder.decode(quantized)
        return out[:, : self.image_channels], out[:, self.image_channels :]

    # -- public API ------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct a batch: ``(images, mask_logits, quantisation_loss)``."""
        quantized, q_loss = self._quantize(self._latents(self._join(images, masks)))
        recon, logits = self._decode(quantized)
        return recon, logits, q_loss

    def loss(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Training loss: image MSE + mask BCE-with-logits + MONAI's commitment (quantisation) loss, weights 1.

        Parameters
        ----------
        images
            ``(B, image_channels, *spatial)`` float.
        masks
            ``(B, 1, *spatial)`` or ``(B, *spatial)``, values in {0, 1}.
        """
        recon, logits, q_loss = self(images, masks)
        target = masks.unsqueeze(1) if masks.ndim == images.ndim - 1 else masks
        return F.mse_loss(recon, images.float()) + F.binary_cross_entropy_with_logits(logits, target.float()) + q_loss

    @torch.no_grad()
    def encode_codes(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Discrete code indices ``(B, *latent_shape)`` (int64) of (image, mask) pairs; changes no state."""
        return self._indices(self._latents(self._join(images, masks)))

    @torch.no_grad()
    def decode_pairs(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode code grids to ``(images, masks)``; a mask is ``sigmoid(logit) > 0.5`` as float {0, 1}."""
        self.check_codes(codes)
        images, logits = self._decode(self._embed(codes))
        return images, (logits > 0).float()


def build_generator(
    spatial_dims: int,
    image_channels: int,
    *,
    num_embeddings: int = 256,
    embedding_dim: int = 32,
    channels: Sequence[int] = (32, 64),
    downsample: int = 4,
    num_res_layers: int = 1,
    seed: int = 0,
) -> ReplayGenerator:
    """Build a small one-level VQ-VAE replay generator for ``image_channels`` images plus one mask channel.

    Parameters
    ----------
    spatial_dims
        2 or 3.
    image_channels
        Image channels (>= 1); the network sees ``image_channels + 1``.
    num_embeddings, embedding_dim
        Codebook size and code-vector width (the seed's VQ-VAE-2 uses 512 x 64; smaller here for CPU).
    channels
        Encoder width per level (the decoder mirrors it).
    downsample
        Total downsampling factor, a power of two ``2**k`` with ``1 <= k <= len(channels)``: the first ``k`` levels
        stride by 2 (kernel 4), the others by 1 (kernel 3). The default 4 matches the seed's bottom level (256 -> 64).
    num_res_layers
        Residual units per level.
    seed
        Seeds the weight initialisation inside :func:`torch.random.fork_rng`, so the global RNG is left untouched.
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
    if image_channels < 1:
        raise ValueError(f"image_channels must be >= 1, got {image_channels}.")
    levels = len(channels)
    k = downsample.bit_length() - 1
    if levels < 1 or downsample < 2 or downsample != 2**k or k > levels:
        raise ValueError(f"downsample must be 2**k with 1 <= k <= len(channels)={levels}, got {downsample}.")
    down = tuple((2, 4, 1, 1) if i < k else (1, 3, 1, 1) for i in range(levels))
    # the decoder runs the levels in reverse, so its stride-2 levels are the last k
    up = tuple((2, 4, 1, 1, 0) if i >= levels - k else (1, 3, 1, 1, 0) for i in range(levels))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        autoencoder = VQVAE(
            spatial_dims=spatial_dims,
            in_channels=image_channels + 1,
            out_channels=image_channels + 1,
            channels=tuple(channels),
            num_res_layers=num_res_layers,
            num_res_channels=tuple(channels),
            downsample_parameters=down,
            upsample_parameters=up,
            num_embeddings=num_embeddings,
            embedding_dim=embedding_dim,
            ddp_sync=False,
        )
    return ReplayGenerator(autoencoder, spatial_dims, image_channels, downsample)
