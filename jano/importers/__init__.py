"""
Importers: other routers' configuration files in, Jano's TOML out.

Each importer is a command (``python -m jano.importers.<name> FILE``) that
writes the TOML on stdout and, on stderr, one line for every setting it
could not carry over and why, so nothing is dropped silently.  They are
pure translations: no Twisted, and nothing here is imported by the router.

- :mod:`jano.importers.llama_swap` -- llama-swap's YAML (needs PyYAML:
  ``pip install 'jano[import]'``).
"""

__all__: list[str] = []
