"""The search spaces that ship with raybone, installed as the package data `raybone.search_spaces`: `raybone search
--config NAME` finds them by name from any working directory. The files stay here, at the top of the repository."""
