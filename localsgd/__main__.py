"""``python -m localsgd ...`` is the ``localsgd`` command (:func:`localsgd.cli.main`)."""

from localsgd.cli import main

main()
