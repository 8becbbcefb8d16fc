"""Exported models: the folder format, `raybone best --export` (export) and `raybone predict` / `evaluate`
(predict). Never Ray: a model folder is used where no cluster is."""
