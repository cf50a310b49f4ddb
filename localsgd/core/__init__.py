"""The algorithm, framework-free: nothing under this package imports Lightning.

``driver.py`` (:class:`~localsgd.core.driver.LocalSGD`) is where every sync happens; the other
modules are its parts: ``comm`` (all communication), ``buckets`` and ``averager`` (flat
averaging), ``control`` (the message before each sync), ``optim_state``, ``schedules``,
``outer``, ``scaling``, ``gradients``, ``replicas`` (simulated workers) and ``files`` (rank files).
"""
