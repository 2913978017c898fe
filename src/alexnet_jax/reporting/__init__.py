"""What the loop reports: metric writers and progress (metrics), figures (conv1 filters) and the
training curves (curves). Below the loop, never a command.
"""
