from dbunit import sessions, unit_database

__all__ = ["sessions", "unit_database"]
