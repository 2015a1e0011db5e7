"""The ML core of SAE Studio: models, trainer, metrics, activation sources.

Importable without Flask, RQ or Peewee. It reports through callbacks and knows nothing
of the web; the job layer (`app.work`) wires it to the database.
"""
