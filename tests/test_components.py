"""graph.labels.connected_components: the union solver behind every dependency group (numpy, no scipy)."""
import numpy as np
import pytest

from prunekit.graph.labels import connected_components


def test_hand_cases():
    assert connected_components(1, np.zeros(0, np.int64), np.zeros(0, np.int64)).tolist() == [0]
    # 0-3, 3-1 and 4-2: components {0,1,3}, {2,4}, {5}, numbered by their smallest member
    a, b = np.array([0, 3, 4]), np.array([3, 1, 2])
    assert connected_components(6, a, b).tolist() == [0, 0, 1, 0, 1, 2]
    chain = np.random.default_rng(0).permutation(500)               # one long path in random id order
    assert connected_components(500, chain[:-1], chain[1:]).max() == 0


def test_matches_scipy_on_random_graphs():
    sparse = pytest.importorskip("scipy.sparse")
    csgraph = pytest.importorskip("scipy.sparse.csgraph")
    rng = np.random.default_rng(1)
    for _ in range(100):
        n, m = int(rng.integers(1, 200)), int(rng.integers(0, 300))
        a, b = rng.integers(0, n, m), rng.integers(0, n, m)
        ref = csgraph.connected_components(sparse.coo_matrix((np.ones(m), (a, b)), shape=(n, n)), directed=False)[1]
        assert connected_components(n, a, b).tolist() == ref.tolist()
