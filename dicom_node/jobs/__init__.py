"""Jobs: the data model (one job per study, its instances, outputs and deliveries), the one state machine
that moves it, the SQLite and PostgreSQL stores it runs on, schema migrations, study completeness and the
routing rules that choose the series the model sees.
"""
