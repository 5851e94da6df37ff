"""lokid workers: the edit queue consumer and the editing core (``workers.editing``)."""
