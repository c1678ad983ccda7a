import itertools

from hypothesis import given
from hypothesis import strategies as st

from tests import pairwise

_FACTORS = st.lists(st.integers(1, 4), min_size=0, max_size=5).map(
  lambda sizes: [[f"{i}{v}" for v in range(n)] for i, n in enumerate(sizes)]
)


@given(_FACTORS)
def test_every_pair_of_values_meets_in_some_row(factors):
  rows = pairwise.cover(*factors)
  product = list(itertools.product(*factors))
  assert set(rows) <= set(product) and len(set(rows)) == len(rows)
  if len(factors) < 2:
    assert rows == product
  for (i, a), (j, b) in itertools.combinations(enumerate(factors), 2):
    met = {(row[i], row[j]) for row in rows}
    assert met == set(itertools.product(a, b))
  assert pairwise.cover(*factors) == rows  # the same rows every time


def test_fewer_rows_than_the_product():
  rows = pairwise.cover([1, 2, 3, 4], [1, 16, 4096], ["a", "b", "c"], [0, 1])
  assert len(rows) == 12  # 4 x 3, the fewest any cover can have
