"""The command-line tools, each run as python -m alexnet_jax.commands.<tool>: evaluate, predict,
neighbors, export, convert, plot, study, pack, resize. Every __main__ lives here; nothing imports a command.
"""
