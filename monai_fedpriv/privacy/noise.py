"""Where privacy noise comes from.

Every random draw of a privacy mechanism (DP-SGD's Poisson sampling and Gaussian noise, SVT's Laplace noise, the
Gaussian update filter) uses an explicit ``torch.Generator``. A generator seeded from a number in a shared config is
reproducible, which simulations want, and predictable, which voids the guarantee against anyone who knows the seed:
they can regenerate the noise and subtract it. So:

* ``seed=None`` (the default of every override file, hence of a bundle run on its own and of an exported NVFlare
  job): each generator is seeded from OS entropy (:func:`secrets.randbits`), and its state lives only in the site's
  own checkpoint, so a resumed site continues the stream instead of replaying it;
* an explicit seed (what the in-process simulator sets, unless ``--noise secure``): every generator is derived from
  it and a stream name, and reports say ``noise_source: "seeded (simulation only, ...)"``.

Caveat: the generators are PyTorch's Mersenne Twister (CPU) or Philox (CUDA) streams, seeded with 63 bits of OS
entropy; they are not cryptographically secure generators, and floating-point Laplace/Gaussian samplers are not
hardened against the least-significant-bit attacks of Mironov (2012).
"""

from __future__ import annotations

import secrets

import torch

from monai_fedpriv.errors import PrivacyConfigError

__all__ = ["NOISE_SECURE", "NOISE_SEEDED", "make_generator", "noise_generator", "noise_source", "secure_seed"]

NOISE_SECURE = "os-entropy"
NOISE_SEEDED = "seeded (simulation only, no privacy guarantee against anyone who knows the seed)"


def secure_seed() -> int:
    """A 63-bit seed from the operating system's entropy source."""
    return secrets.randbits(63)


def noise_source(seed: int | None) -> str:
    """The ``noise_source`` reported for generators derived from ``seed``."""
    return NOISE_SECURE if seed is None else NOISE_SEEDED


def noise_generator(seed: int | None, stream: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for one noise stream of a site: derived from ``(seed, stream)``, or from OS entropy if ``seed`` is
    ``None``.

    Args:
        seed: the site's noise seed (simulation) or ``None`` (deployment).
        stream: names the use (``"dp_sampler"``, ``"dp_noise"``, ``"svt"``, ...), so streams never share draws.
        device: where the generator lives (the noise is drawn on the parameters' device).

    Example:
        >>> g = noise_generator(None, "svt")  # OS entropy: unpredictable
        >>> noise_generator(3, "svt").initial_seed() == noise_generator(3, "svt").initial_seed()
        True
    """
    from monai_fedpriv.data.stream import derive_seed

    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise PrivacyConfigError(f"noise seed must be an int or None (OS entropy), got {seed!r}.")
    value = secure_seed() if seed is None else derive_seed(seed, "privacy-noise", stream)
    return torch.Generator(device=device).manual_seed(value)


def make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    """An explicit CPU generator: the one given, one seeded with an int, or (``None``) one seeded from OS entropy."""
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise PrivacyConfigError(f"generator must be a CPU torch.Generator, got one on {generator.device}.")
        return generator
    if generator is None:
        return torch.Generator().manual_seed(secure_seed())
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(int(generator))
    raise PrivacyConfigError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}.")
