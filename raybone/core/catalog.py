"""The networks and losses raybone offers, by name. Importing this loads no framework, so that a spec or a model
folder is validated without torch (model.py and loss.py implement each name and check they cover them all)."""

MODELS = ("vgg16", "googlenet")
LOSSES = ("ce", "l2ce")
