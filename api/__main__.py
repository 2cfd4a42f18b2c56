"""``python -m mmssl ...``: the ``mmssl`` command (what a launcher starts: ``torchrun ... -m mmssl pretrain ...``)."""

from mmssl.tools.cli import main

main()
