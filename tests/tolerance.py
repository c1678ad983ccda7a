"""The shared closeness check for kernel outputs against float64 oracles."""

import numpy as np


class WithSlack(np.ndarray):
  """An oracle's values with `slack`: per element, how far an implementation
  may also differ because a rounding the oracle cannot pin down (a value
  within float32 noise of a bf16 tie) may go either way."""

  slack: np.ndarray | float = 0.0

  def __array_finalize__(self, obj):
    self.slack = getattr(obj, "slack", 0.0)


def with_slack(values: np.ndarray, slack: np.ndarray) -> WithSlack:
  out = np.asarray(values).view(WithSlack)
  out.slack = slack
  return out


def assert_close(
  out, want: np.ndarray, rtol: float, floor: float = 0.05
) -> None:
  """Elementwise `|out - want| <= rtol * (|want| + floor * max|want|)`,
  plus `want.slack` where the oracle carries one (`WithSlack`).

  The floor keeps near-zero outputs (sums that cancel) from demanding more
  than the inputs' rounding allows; NaN or inf never passes.
  """
  slack = np.asarray(getattr(want, "slack", 0.0), np.float64)
  want = np.asarray(want, np.float64)
  out = np.asarray(out, np.float64)
  assert out.shape == want.shape, (out.shape, want.shape)
  assert np.all(np.isfinite(out)), "NaN/inf in the output"
  scale = np.abs(want).max() + 1e-30
  err = np.abs(out - want)
  assert np.all(err <= rtol * (np.abs(want) + floor * scale) + slack), (
    f"max error {err.max():.3g} vs scale {scale:.3g}"
  )
