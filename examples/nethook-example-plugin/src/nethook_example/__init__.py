"""An example nethook plugin: a striped concept source, a clamp intervention, a subcommand.

nethook finds it through the entry point ``example = "nethook_example.plugin"`` in
group ``nethook`` (see pyproject.toml); ``plugin.py`` holds the hook implementations.
"""

__version__ = "0.1.0"
