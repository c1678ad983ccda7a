"""Implementation registry shared by the ops' `api.py` files."""

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence


def dispatch(
  op: str,
  implementations: Mapping[str, Callable],
  default_order: Sequence[str],
  implementation: str | None,
  *args,
  **kwargs,
):
  """Runs the named implementation, or the first of `default_order` that runs.

  Only `NotImplementedError` falls through to the next one; if none runs, an
  ExceptionGroup carries every reason.
  """
  if implementation is not None:
    if implementation not in implementations:
      raise ValueError(
        f"{implementation=} must be None or one of {tuple(implementations)}"
      )
    return implementations[implementation](*args, **kwargs)
  failures = []
  for name in default_order:
    try:
      return implementations[name](*args, **kwargs)
    except NotImplementedError as e:
      failures.append(e)
  raise ExceptionGroup(f"no {op} implementation ran", failures)
