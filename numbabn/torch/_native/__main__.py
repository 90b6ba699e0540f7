"""``python -m numbabn.torch._native``: build numbabn's PyTorch op ahead of first use."""

from . import main

main()
