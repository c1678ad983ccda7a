"""The shared closeness check for kernel outputs against float64 oracles."""

import numpy as np


def assert_close(
  out, want: np.ndarray, rtol: float, floor: float = 0.05
) -> None:
  """Elementwise `|out - want| <= rtol * (|want| + floor * max|want|)`.

  The floor keeps near-zero outputs (sums that cancel) from demanding more
  than the inputs' rounding allows; NaN or inf never passes.
  """
  out = np.asarray(out, np.float64)
  assert out.shape == want.shape, (out.shape, want.shape)
  assert np.all(np.isfinite(out)), "NaN/inf in the output"
  scale = np.abs(want).max() + 1e-30
  err = np.abs(out - want)
  assert np.all(err <= rtol * (np.abs(want) + floor * scale)), (
    f"max error {err.max():.3g} vs scale {scale:.3g}"
  )
