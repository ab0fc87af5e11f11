"""First-party nethook plugins (installed as the package ``nethook_plugins``).

They register through the ``nethook`` entry-point group in ``pyproject.toml``,
exactly as a third-party distribution would.
"""
