"""The Lightning Trainer front end: ``LocalSGDStrategy`` (a thin adapter over the driver) and
``SGDBaselineStrategy``, with exact resume through rank files, simulated workers' glue,
stop requests and preemption."""
