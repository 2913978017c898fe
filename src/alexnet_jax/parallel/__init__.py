"""Devices and processes (distributed: jax.distributed, launchers, meshes), accelerator platforms
(accelerators), and the schemes that place one step on a mesh (schemes).
"""
