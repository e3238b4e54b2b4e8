"""``python -m pipeline <command>``: argument parsing only; every handler imports its stage when it runs.

``main`` builds the parser from the areas (``data``, ``model``, ``mlflow``, ``dag``, ``ops``); ``settings`` is
the one ``--config FILE`` / ``--set section.name=value`` convention every command that reads settings uses.
"""
