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


def test_readme_keras_example_runs():
    import keras

    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "import keras_layer" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    x = np.random.default_rng(0).standard_normal((4, 28, 28, 1)).astype(np.float32)
    model, stock, again = namespace["model"], namespace["stock"], namespace["again"]
    assert type(stock.layers[1]) is keras.layers.BatchNormalization
    np.testing.assert_allclose(model.predict(x, verbose=0), stock.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(model.predict(x, verbose=0), again.predict(x, verbose=0))
