"""The README's API example runs as written."""

import re
from pathlib import Path

import numpy as np

README = Path(__file__).parent.parent / "README.md"


def test_readme_api_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)  # noqa: S102 - our own README
    x, y, stats = namespace["x"], namespace["y"], namespace["stats"]
    assert y.shape == x.shape and stats.mean.shape == (x.shape[-1],)
    np.testing.assert_allclose(stats.mean, x.mean(axis=(0, 1, 2), dtype=np.float64), rtol=1e-6)
    np.testing.assert_array_equal(namespace["y_nchw"], y.transpose(0, 3, 1, 2))
