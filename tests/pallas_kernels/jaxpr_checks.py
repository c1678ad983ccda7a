"""Checks on the jaxpr of a Pallas Mosaic GPU kernel (traced on any host)."""

import jax


def wgmma_waits(jaxpr) -> list[tuple[int, int]]:
  """(wgmmas issued since the previous wait, the wait's n) for every
  `wgmma_wait` in `jaxpr` and the jaxprs nested in it."""
  found, issued = [], 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "wgmma_ref":
      issued += 1
    elif eqn.primitive.name == "wgmma_wait":
      found.append((issued, eqn.params["n"]))
      issued = 0
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += wgmma_waits(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += wgmma_waits(sub)
  return found


def assert_waits_leave_only_the_last_part(jaxpr) -> None:
  """With async wgmmas a K part's decode reuses the A registers of the
  part before: every wait must leave in flight at most the wgmmas issued
  since the previous one (`wgmma_wait(0)` or `wgmma_wait(issued)`)."""
  waits = wgmma_waits(jaxpr)
  assert waits, "no wgmma_wait in the kernel"
  for issued, n_left in waits:
    assert n_left in (0, issued), waits
