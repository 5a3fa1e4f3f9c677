"""Reference key modes of diffkv_sglang.quant: per-channel keys (``channel``) and a per-channel offset before
per-token codes (``channel_offset``), over the tokens of one (block, tier)."""

import pytest
import torch

from diffkv_sglang.quant import (KEY_MODES, dequantize, dequantize_channel_offset, dequantize_channels, meta_scale,
                                 quantize, quantize_channel_offset, quantize_channels, round_trip)

# float32 arithmetic in (x - zero) / scale, code * scale + zero and x - offset adds a few ulps on top of scale / 2.
FP32_SLACK = 1e-5
BLOCKS, PAGE, DIM = 6, 32, 64


def _pages(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[BLOCKS, PAGE, DIM]`` keys divided by their block meta scale, and a ``[BLOCKS, PAGE]`` tier mask.

    Normal channels of random spread, plus per block: constant channels (one float16-exact, one not), a
    near-constant channel of large magnitude (the Qwen layer-0 kind: mean -145, spread 0.3) and a channel with one
    outlier token. The mask holds random tokens, and one block each with no token, one token and every token."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BLOCKS, PAGE, DIM, generator=gen) * torch.rand(BLOCKS, 1, DIM, generator=gen) * 3
    x[:, :, 5] = 0.75
    x[:, :, 9] = torch.randn(BLOCKS, 1, generator=gen) * 7
    x[:, :, 62] = -145.0 + 0.3 * torch.randn(BLOCKS, PAGE, generator=gen)
    x[:, 3, 30] = 60.0
    x = x / meta_scale(x.abs().amax((1, 2)))[:, None, None]
    mask = torch.rand(BLOCKS, PAGE, generator=gen) < 0.6
    mask[0], mask[1], mask[2] = False, torch.arange(PAGE) == 7, True
    return x, mask


def _quantize_and_bound(mode: str, x: torch.Tensor, bits: int, groups: int, mask: torch.Tensor):
    """``(x_hat, half_scale)`` ``[..., P, D]`` float32 of one mode (``half_scale``: its per-element bound)."""
    if mode == "channel":
        codes, scale, zero = quantize_channels(x, bits, mask)
        assert scale.dtype == zero.dtype == torch.float16 and scale.shape == x.shape[:-2] + x.shape[-1:]
        return dequantize_channels(codes, scale, zero), (scale.float() / 2)[..., None, :].expand(x.shape)
    codes, scale, zero, offset = quantize_channel_offset(x, bits, groups, mask)
    assert offset.dtype == torch.float16 and offset.shape == x.shape[:-2] + x.shape[-1:]
    assert scale.dtype == zero.dtype == torch.float16 and scale.shape == x.shape[:-1] + (groups,)
    return dequantize_channel_offset(codes, scale, zero, offset), (scale.float() / 2).repeat_interleave(
        x.shape[-1] // groups, -1)


@pytest.mark.parametrize("mode, groups", [("channel", 1), ("channel_offset", 1), ("channel_offset", 4)])
@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_error_within_half_scale_for_the_tier_tokens(seeded, mode, groups, bits):
    x, mask = _pages(seeded)
    x_hat, half_scale = _quantize_and_bound(mode, x, bits, groups, mask)
    assert x_hat.dtype == torch.float32 and x_hat.shape == x.shape
    slack = FP32_SLACK * x.abs().amax((1, 2), keepdim=True)
    err = (x_hat - x).abs()
    assert torch.all((err <= half_scale + slack)[mask]), float((err - half_scale)[mask].max())


@pytest.mark.parametrize("mode", ["channel", "channel_offset"])
def test_tokens_outside_the_tier_change_nothing(seeded, mode):
    x, mask = _pages(seeded)
    quantizer = {"channel": lambda y: quantize_channels(y, 4, mask),
                 "channel_offset": lambda y: quantize_channel_offset(y, 4, 2, mask)}[mode]
    poisoned = torch.where(mask[..., None], x, torch.randn(x.shape) * 1e3)
    for before, after in zip(quantizer(x), quantizer(poisoned)):
        assert torch.equal(before, after)
    codes = quantizer(x)[0]
    assert torch.all(codes[~mask] == 0) and torch.any(codes[mask] > 0)
    # without a mask every token counts: the poisoned tokens now move the statistics
    assert not torch.equal(quantize_channels(poisoned, 4)[1], quantize_channels(x, 4)[1])


def test_channel_mode_by_hand():
    # channel 0 spans [0, 3] over 2 bits: zero 0, scale 1; channel 1 is constant 10: scale 0, code 0, exact
    x = torch.tensor([[0.0, 10.0], [1.4, 10.0], [3.0, 10.0]])
    codes, scale, zero = quantize_channels(x, 2)
    assert scale.tolist() == [1.0, 0.0] and zero.tolist() == [0.0, 10.0]
    assert codes.tolist() == [[0, 0], [1, 0], [3, 0]]
    assert torch.equal(dequantize_channels(codes, scale, zero), torch.tensor([[0.0, 10.0], [1.0, 10.0], [3.0, 10.0]]))
    # signed zero never leaks into a stored zero point
    assert quantize_channels(torch.tensor([[-0.0], [0.0], [1.0]]), 4)[2].view(torch.int16).item() == 0


def test_channel_offset_is_the_midrange_and_empty_tiers_are_zero():
    x = torch.tensor([[1.0, -4.0], [3.0, -2.0], [100.0, 50.0]])
    mask = torch.tensor([True, True, False])
    codes, scale, zero, offset = quantize_channel_offset(x, 4, 1, mask)
    assert offset.tolist() == [2.0, -3.0]                    # (min + max) / 2 over the first two tokens
    assert torch.equal(dequantize_channel_offset(codes, scale, zero, offset)[:2], x[:2])   # residuals +-1: on grid
    for quantized in (quantize_channel_offset(x, 4, 1, torch.zeros(3, dtype=torch.bool)),
                      quantize_channels(x, 4, torch.zeros(3, dtype=torch.bool))):
        assert all(torch.all(part == 0) for part in quantized)


def test_per_channel_keys_absorb_a_near_constant_outlier_channel(seeded):
    """The Qwen failure: one channel near -145 with spread 0.3 sets every per-token range; per channel it costs
    nothing, and the other channels keep their own precision."""
    x, _ = _pages(seeded)
    errors = {mode: (round_trip(x, mode, 4, 1) - x).norm() / x.norm() for mode in KEY_MODES}
    assert errors["channel"] < errors["token"] / 4 and errors["channel_offset"] < errors["token"] / 4


def test_round_trip_dispatches_on_the_key_mode(seeded):
    x, mask = _pages(seeded)
    assert torch.equal(round_trip(x, "token", 4, 2, mask), dequantize(*quantize(x, 4, 2)))
    assert torch.equal(round_trip(x, "channel", 4, 2, mask), dequantize_channels(*quantize_channels(x, 4, mask)))
    assert torch.equal(round_trip(x, "channel_offset", 2, 2, mask),
                       dequantize_channel_offset(*quantize_channel_offset(x, 2, 2, mask)))
    with pytest.raises(ValueError, match="channel_offset"):
        round_trip(x, "per_head", 4, 1)
    with pytest.raises(ValueError, match="bits=3"):
        quantize_channels(x, 3)
