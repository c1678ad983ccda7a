"""The sm90 bit layout: a permutation, and what the kernel's decoder does.

The inline-PTX decoder runs only on the GPU (tests/pallas_kernels GPU tier);
here its integer steps are replayed in numpy on twiddled words, so a change
to the layout tables that the decoder would not undo fails on CPU.
"""

import jax.numpy as jnp
import numpy as np

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
