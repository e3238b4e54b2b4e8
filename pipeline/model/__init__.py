"""GRU4Rec: the network, its losses, optimizer and negative sampler, training, evaluation, prediction, tuning.

Reading clicks and the item map: ``clicks``. Training: ``schedule`` (the epoch's session-parallel layout),
``step`` (the epoch loop and the training step, ``lanes`` for its opt-in two-thread form), ``checkpoint``,
``train`` (the entry point). Then ``evaluate``, ``predict`` and ``tune``.

Free of I/O except reading a session dataset through ``pipeline.data``; nothing here knows about MLflow or
Airflow.
"""
