"""``python -m localsgd ...`` is the ``localsgd`` command (:func:`localsgd.cli.main`)."""

from localsgd.cli import main

if __name__ == "__main__":  # an import (the API docs inspect every module) runs nothing
    main()
