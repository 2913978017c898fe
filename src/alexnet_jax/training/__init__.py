"""The training loop (loop.train_and_evaluate) and what only the loop uses: preemption, profiling and
the watchdog.
"""
