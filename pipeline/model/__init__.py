"""GRU4Rec: the network, its losses, optimizer and negative sampler, training, evaluation, prediction, tuning.

Free of I/O except reading a session dataset through ``pipeline.data``; nothing here knows about MLflow or
Airflow.
"""
