"""Pairwise covers of parameter matrices: the CPU's share of a test whose
GPU tier takes the whole product.

Written here rather than taken from a library (allpairspy) because the GPU
runners import the tests and have no package index.
"""

import itertools
from collections.abc import Sequence

import pytest


def cover(*factors: Sequence) -> list[tuple]:
  """Rows of the product of `factors` in which every value of each factor
  meets every value of each other factor at least once.

  Greedy (each row the first of the product that covers the most pairs not
  yet covered), so the same factors always give the same rows.
  """
  rows = list(itertools.product(*map(range, map(len, factors))))
  if len(factors) < 2:
    chosen = rows
  else:
    chosen = []
    uncovered = set().union(*map(_pairs, rows))
    while uncovered:
      best = max(rows, key=lambda row: len(_pairs(row) & uncovered))
      chosen.append(best)
      uncovered -= _pairs(best)
  return [
    tuple(factor[i] for factor, i in zip(factors, row, strict=True))
    for row in chosen
  ]


def _pairs(row: tuple[int, ...]) -> set[tuple[int, int, int, int]]:
  return {
    (i, row[i], j, row[j])
    for i, j in itertools.combinations(range(len(row)), 2)
  }


def by_backend(cpu_rows, gpu_rows) -> list:
  """`pytest.mark.parametrize` values whose first field is the backend:
  ("cpu", *row) for each of `cpu_rows`, ("gpu", *row) marked `gpu` for
  each of `gpu_rows`."""
  return [("cpu", *row) for row in cpu_rows] + [
    pytest.param("gpu", *row, marks=pytest.mark.gpu) for row in gpu_rows
  ]
