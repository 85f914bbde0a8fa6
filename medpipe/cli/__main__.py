"""``python -m medpipe.cli``: the same as the ``medpipe`` command."""

from medpipe.cli import main

main()
