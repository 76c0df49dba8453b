"""The CWT+Replay auxiliary generator (Qu et al., seed paper 004): a one-level VQ-VAE over (image, mask) pairs,
trained one site at a time on real data plus pairs replayed by the generator frozen at the start of the visit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_fedpriv.generative import (
    ReplayGenerator,
    VisitResult,
    build_generator,
    replay_pairs,
    train_generator_at_site,
)


def shapes(n: int, seed: int, *, square: bool = False, size: int = 16, channels: int = 1):
    """``n`` bright discs (or squares) on a dark background, and their masks."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = (torch.randint(5, size - 5, (n, 1, 1), generator=g) for _ in range(2))
    r = torch.randint(2, 5, (n, 1, 1), generator=g)
    dy, dx = yy[None] - cy, xx[None] - cx
    inside = torch.maximum(dy.abs(), dx.abs()) <= r if square else dy**2 + dx**2 <= r**2
    masks = inside.float()[:, None]
    return masks.repeat(1, channels, 1, 1) * 0.8 + 0.1, masks


def tiny(image_channels: int = 1, seed: int = 0) -> ReplayGenerator:
    return build_generator(
        2, image_channels, num_embeddings=32, embedding_dim=8, channels=(8, 16), downsample=4, seed=seed
    )


def visit(gen, data, codes, rng, *, epochs=2, batch_size=4, lr=1e-2) -> VisitResult:
    opt = torch.optim.Adam(gen.parameters(), lr=lr)
    return train_generator_at_site(
        gen, data, codes, epochs=epochs, optimizer=opt, generator_rng=rng, batch_size=batch_size
    )


def rows(codes: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(c.flatten().tolist()) for c in codes}


# -- generator ------------------------------------------------------------------------------------------------------
def test_encode_decode_shapes_dtypes_and_determinism():
    gen = tiny(image_channels=3)
    images, masks = shapes(4, seed=1, size=32, channels=3)
    before = {k: v.clone() for k, v in gen.state_dict().items()}
    codes = gen.encode_codes(images, masks)  # train mode: must still not touch the EMA codebook
    assert codes.dtype == torch.long and codes.shape == (4, 8, 8) == (4, *gen.latent_shape((32, 32)))
    assert int(codes.min()) >= 0 and int(codes.max()) < 32
    out_images, out_masks = gen.decode_pairs(codes)
    assert out_images.shape == (4, 3, 32, 32) and out_images.dtype == torch.float32
    assert out_masks.shape == (4, 1, 32, 32) and out_masks.dtype == torch.float32
    assert set(out_masks.unique().tolist()) <= {0.0, 1.0}
    gen.eval()
    assert torch.equal(gen.encode_codes(images, masks[:, 0]), codes)  # (B, H, W) masks accepted too
    again = gen.decode_pairs(codes)
    assert torch.equal(again[0], out_images) and torch.equal(again[1], out_masks)
    assert all(torch.equal(before[k], v) for k, v in gen.state_dict().items())
    assert torch.isfinite(gen.loss(images, masks))


def test_first_training_step_seeds_the_codebook_from_data():
    images, masks = shapes(8, seed=4)
    gen = tiny()
    assert gen.encode_codes(images, masks).unique().numel() == 1  # N(0, 1) codebook: every latent picks one code
    gen.loss(images, masks)  # train mode: seeds, then EMA-updates, the codebook
    assert gen.codebook_ready and gen.encode_codes(images, masks).unique().numel() > 1


def test_bad_inputs_raise_value_errors():
    gen = tiny(image_channels=3)
    images, masks = shapes(2, seed=0, size=16, channels=3)
    with pytest.raises(ValueError, match="images must be"):
        gen.encode_codes(images[:, :1], masks)
    with pytest.raises(ValueError, match="binary"):
        gen.loss(images, masks * 0.5)
    with pytest.raises(ValueError, match="multiples of 4"):
        gen.encode_codes(images[..., :14], masks[..., :14])
    with pytest.raises(ValueError, match="masks must be"):
        gen.encode_codes(images, masks[:1])
    codes = gen.encode_codes(images, masks)
    for bad in (codes.int(), codes[0], torch.full_like(codes, 32), codes[:0]):
        with pytest.raises(ValueError, match="codes must"):
            gen.decode_pairs(bad)
    with pytest.raises(ValueError, match="downsample"):
        build_generator(2, 1, channels=(8,), downsample=4)
    with pytest.raises(ValueError, match="image_channels"):
        build_generator(2, 0)
    rng = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="batch_size"):
        visit(gen, (images, masks), None, rng, batch_size=None)
    with pytest.raises(ValueError, match="one-shot"):
        visit(gen, iter([(images, masks)]), None, rng)
    with pytest.raises(ValueError, match=r"codes must be \(N"):
        visit(gen, (images, masks), torch.zeros(2, 2, 2, dtype=torch.long), rng)
    with pytest.raises(ValueError, match="count"):
        replay_pairs(gen, codes, 3, rng)


# -- one site's visit -----------------------------------------------------------------------------------------------
def test_visit_replays_only_the_frozen_old_generator_on_earlier_codes(monkeypatch):
    """Every site's codes are labelled by monkeypatching ``encode_codes`` (site k encodes to all-k grids), so what
    ``decode_pairs`` receives tells exactly whose codes were replayed, whatever the generator learnt."""
    log: list[tuple[str, ReplayGenerator, torch.Tensor]] = []
    site = {"label": 0}
    decode, encode = ReplayGenerator.decode_pairs, ReplayGenerator.encode_codes

    def spy_decode(self, codes):
        log.append(("decode", self, codes.clone()))
        return decode(self, codes)

    def labelled_encode(self, images, masks):
        log.append(("encode", self, images))
        return torch.full_like(encode(self, images, masks), site["label"])

    monkeypatch.setattr(ReplayGenerator, "decode_pairs", spy_decode)
    monkeypatch.setattr(ReplayGenerator, "encode_codes", labelled_encode)
    gen, rng = tiny(), torch.Generator().manual_seed(0)
    codes = None
    for label, seed in ((1, 1), (2, 2), (3, 3)):
        log.clear()
        site["label"] = label
        at_start = {k: v.clone() for k, v in gen.state_dict().items()}
        result = visit(gen, shapes(6, seed=seed, square=label == 2), codes, rng)
        decodes = [e for e in log if e[0] == "decode"]
        encodes = [e for e in log if e[0] == "encode"]
        kinds = [e[0] for e in log]
        assert torch.equal(result.codes[-6:], torch.full((6, 4, 4), label))
        # the site's own codes: encoded by the trained generator (two batches), after every replay
        assert len(encodes) == 2 and all(e[1] is gen for e in encodes) and kinds[-2:] == ["encode", "encode"]
        if label == 1:
            assert result.replayed == 0 and not decodes  # the first site trains on real data only
            codes = result.codes
            continue
        frozen = decodes[0][1]
        assert frozen is not gen and all(e[1] is frozen for e in decodes)
        assert all(torch.equal(at_start[k], v) for k, v in frozen.state_dict().items())  # D_old = D at the start
        assert any(not torch.equal(at_start[k], v) for k, v in gen.state_dict().items())  # D itself did train
        replayed = torch.cat([e[2] for e in decodes])
        assert set(replayed.unique().tolist()) <= set(range(1, label))  # earlier sites only, never this one
        # batches of 4 and 2 real items, each joined by as many replayed pairs, for 2 epochs
        assert result.replayed == len(replayed) == 2 * (4 + 2)
        codes = result.codes
    assert codes is not None and codes.shape == (18, 4, 4)


def test_codes_accumulate_in_site_order():
    gen, rng = tiny(), torch.Generator().manual_seed(5)
    a, b, c = shapes(5, seed=1), shapes(3, seed=2, square=True), shapes(4, seed=3)
    batches_b = [(b[0][:2], b[1][:2]), (b[0][2:], b[1][2:, 0])]  # an iterable of batches, (B, H, W) masks
    codes = None
    expected: list[torch.Tensor] = []
    for data in (a, batches_b, c):
        result = visit(gen, data, codes, rng)
        own = torch.cat([gen.encode_codes(i, m) for i, m in (data if isinstance(data, list) else [data])])
        expected.append(own)  # this site's codes as encoded by the generator at the end of its visit
        assert torch.equal(result.codes, torch.cat(expected))
        codes = result.codes
    assert codes is not None and codes.shape == (5 + 3 + 4, 4, 4)


def test_training_lowers_reconstruction_loss():
    gen = tiny(seed=3)
    images, masks = shapes(8, seed=4)

    def reconstruction() -> float:
        gen.eval()
        with torch.no_grad():
            recon, logits, _ = gen(images, masks)
        return float(F.mse_loss(recon, images) + F.binary_cross_entropy_with_logits(logits, masks))

    before = reconstruction()
    assert not gen.codebook_ready  # an eval pass leaves the codebook alone
    result = visit(gen, (images, masks), None, torch.Generator().manual_seed(0), epochs=60, batch_size=8)
    after = reconstruction()
    assert len(result.losses) == 60 and gen.codebook_ready
    assert after < 0.5 * before, (before, after)  # seeded: 0.89 -> 0.27


def test_same_seeds_give_identical_codes_and_weights():
    state = torch.random.get_rng_state()

    def run():
        gen, rng = tiny(seed=7), torch.Generator().manual_seed(11)
        codes = None
        for data in (shapes(5, seed=1), shapes(5, seed=2, square=True)):
            codes = visit(gen, data, codes, rng, epochs=3, batch_size=2).codes
        return codes, gen.state_dict()

    (codes1, weights1), (codes2, weights2) = run(), run()
    assert torch.equal(codes1, codes2)
    assert weights1.keys() == weights2.keys() and all(torch.equal(weights1[k], weights2[k]) for k in weights1)
    assert torch.equal(torch.random.get_rng_state(), state)  # no draw from the global RNG


def test_replay_pairs_for_the_segmentation_phase():
    gen = tiny()
    codes = gen.encode_codes(*shapes(6, seed=1))
    first = replay_pairs(gen, codes, 4, torch.Generator().manual_seed(2))
    second = replay_pairs(gen, codes, 4, torch.Generator().manual_seed(2))
    assert first[0].shape == (4, 1, 16, 16) and first[1].shape == (4, 1, 16, 16)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    with pytest.raises(ValueError, match="count"):
        replay_pairs(gen, codes, 0, torch.Generator())
