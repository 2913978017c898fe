"""The one evaluation core (core: device batches -> masked sums -> metrics), used by the training loop
and by the evaluate and study commands.
"""
