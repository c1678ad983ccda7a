"""The sm90 bit layout: a permutation, and what the kernel's decoder does.

The inline-PTX decoder runs only on the GPU (tests/pallas_kernels GPU tier);
here its integer steps are replayed in numpy on twiddled words, so a change
to the layout tables that the decoder would not undo fails on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax.format import sm90_layout

SIGN_AND_MAGNITUDE = 0x81C081C0  # bits 15, 6..8 of each bf16 half


def rotl(words, r):
  return ((words << r) | (words >> (32 - r))) & 0xFFFFFFFF


def test_sources_are_a_permutation_of_32_bits():
  assert sorted(sm90_layout.SOURCES.ravel()) == list(range(32))


def test_untwiddle_inverts_twiddle(rng):
  packed = jnp.asarray(rng.integers(0, 256, (3, 5, 64), dtype=np.uint8))
  twiddled = sm90_layout.twiddle(packed)
  assert twiddled.shape == packed.shape and twiddled.dtype == jnp.uint8
  np.testing.assert_array_equal(sm90_layout.untwiddle(twiddled), packed)
  assert not np.array_equal(twiddled, packed)


def test_decoder_steps_give_each_code_in_bf16_position(rng):
  packed = jnp.asarray(rng.integers(0, 256, (16, 128), dtype=np.uint8))
  words = np.asarray(sm90_layout._words(sm90_layout.twiddle(packed)))
  words = words.astype(np.uint64)
  natural = np.asarray(sm90_layout._words(packed)).astype(np.uint64)
  # The kernel's steps: three rotations and a mask, and one output masked
  # in place with its mantissa bits from the word rotated by 8 (prmt).
  outputs = [rotl(words, r) & SIGN_AND_MAGNITUDE for r in (2, 6, 12)]
  outputs.append((words & 0x81808180) | (rotl(words, 8) & 0x00400040))
  for output, got in enumerate(outputs):
    for half in range(2):
      code = (natural >> (4 * (output + 4 * half))) & 0xF
      want = ((code & 8) << 12) | ((code & 7) << 6)
      np.testing.assert_array_equal((got >> (16 * half)) & 0xFFFF, want)


def test_row_pairs_invert_and_place_each_code_as_the_kernel_reads_it(rng):
  packed = jnp.asarray(rng.integers(0, 256, (2, 32, 64), dtype=np.uint8))
  grouped = sm90_layout.to_row_pairs(packed)
  assert grouped.shape == packed.shape and grouped.dtype == jnp.uint8
  np.testing.assert_array_equal(sm90_layout.from_row_pairs(grouped), packed)
  codes = np.stack([np.asarray(packed) & 0xF, np.asarray(packed) >> 4], -1)
  codes = codes.reshape(2, 32, 128)  # natural codes [E, N, K]
  words = np.asarray(sm90_layout._words(grouped))  # [E, N, K/8]
  # Thread t's word of 16-byte group j of stored row 16g + 8p + q (the
  # WGMMA_8BIT register of row half p) is chunk c = 2j + p of rows 16g + q
  # and 16g + q + 8. The decode's output o = u + 2h, half e (nibble o + 4e)
  # goes to A register (column group 2c + u, row half h): row 16g + q +
  # 8h, column 16c + 8u + 2t + e.
  for g, p, q, j, t in np.ndindex(2, 2, 8, 4, 4):
    word = words[:, 16 * g + 8 * p + q, 4 * j + t]
    c = 2 * j + p
    for o, e in np.ndindex(4, 2):
      u, h = o % 2, o // 2
      got = (word >> (4 * (o + 4 * e))) & 0xF
      want = codes[:, 16 * g + q + 8 * h, 16 * c + 8 * u + 2 * t + e]
      np.testing.assert_array_equal(got, want)


def test_plane_row_order_gathers_what_to_plane_rows_permutes(rng):
  x = rng.integers(0, 256, (3, 512, 24), dtype=np.uint8)
  # The order: where to_plane_rows puts each row index.
  rows = np.arange(512, dtype=np.int32)[None, :, None]
  order = np.asarray(sm90_layout.to_plane_rows(rows, axis=1)).ravel()
  assert sorted(order) == list(range(512))
  np.testing.assert_array_equal(
    np.take(x, order, axis=1), sm90_layout.to_plane_rows(x, axis=1)
  )


@pytest.mark.parametrize("axis", [1, -1])
def test_plane_rows_gather_equals_the_transpose(rng, monkeypatch, axis):
  # CPU permutes by a gather of the static order (fast to compile), other
  # backends by the reshape-transpose: the same permutation both ways.
  x = rng.standard_normal((3, 256, 256)).astype(np.float32)
  got = {}
  for backend in ("cpu", "gpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    planes = np.asarray(sm90_layout.to_plane_rows(x, axis=axis))
    back = np.asarray(sm90_layout.from_plane_rows(planes, axis=axis))
    np.testing.assert_array_equal(back, x)
    got[backend] = planes
  np.testing.assert_array_equal(got["cpu"], got["gpu"])
  assert not np.array_equal(got["cpu"], x)
