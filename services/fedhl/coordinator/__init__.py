"""The coordinator: schedules rounds, assigns ranks, serves agents (gRPC) and admins (REST)."""
