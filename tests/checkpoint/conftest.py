"""Fixtures for the checkpoint tests: a fresh, reproducible RNG per test."""

import os
import zlib

import numpy as np
import pytest

# Set to rerun a failing test with the seed it printed.
_SEED_ENV = "FP4JAX_TEST_SEED"


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A Generator seeded from the test name plus a random salt.

  Each run draws new data; the seed is printed so that pytest shows it with a
  failure, and exporting it as FP4JAX_TEST_SEED replays that run.
  """
  salt = os.environ.get(_SEED_ENV)
  salt = int(salt) if salt else int.from_bytes(os.urandom(4), "little")
  seed = zlib.crc32(request.node.nodeid.encode()) ^ salt
  print(f"rng salt: {_SEED_ENV}={salt} (seed {seed})")
  return np.random.default_rng(seed)
